"""Torch's thread count is per process: builders leave it alone, the runtime that owns the
process sets it, and in-process instances must agree on one value."""

from __future__ import annotations

import pytest
import torch

from llumnix_py.config import ClusterConfig, LlumletConfig
from llumnix_py.engines.registry import build_engine
from llumnix_py.engines.threads import claim_process_threads
from llumnix_py.frontend.cluster import Cluster
from tests.cluster_helpers import small_spec


def other_than(n: int) -> int:
    return n + 1


def test_building_an_engine_leaves_the_process_threads_alone():
    before = torch.get_num_threads()
    want = other_than(before)
    build_engine(small_spec())  # EngineSpec.num_threads defaults to 1
    assert torch.get_num_threads() == before
    spec = small_spec()
    build_engine(type(spec)(engine=spec.engine, model=spec.model, num_threads=want))
    assert torch.get_num_threads() == before


def test_claims_stack_restore_and_refuse_a_different_value():
    before = torch.get_num_threads()
    want = other_than(before)
    a = claim_process_threads(want, "a")
    b = claim_process_threads(want, "b")
    assert torch.get_num_threads() == want
    with pytest.raises(ValueError, match="already runs instances with"):
        claim_process_threads(other_than(want), "c")
    a.release()
    a.release()  # once only
    assert torch.get_num_threads() == want  # b still holds it
    b.release()
    assert torch.get_num_threads() == before
    assert claim_process_threads(None, "none").num_threads is None
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive"):
        claim_process_threads(0, "zero")


def test_a_local_cluster_sets_its_threads_once_and_gives_them_back():
    before = torch.get_num_threads()
    want = other_than(before)
    spec = small_spec()
    engine = type(spec)(engine=spec.engine, model=spec.model, num_threads=want)
    cfg = ClusterConfig(num_instances=2, runtime="local", engine=engine,
                        llumlet=LlumletConfig(instance_id="template", transport="inproc"))
    cluster = Cluster.start(cfg)
    try:
        assert torch.get_num_threads() == want
        clash = ClusterConfig(num_instances=1, runtime="local",
                              engine=type(spec)(engine=spec.engine, model=spec.model, num_threads=other_than(want)),
                              llumlet=LlumletConfig(instance_id="template", transport="inproc"))
        with pytest.raises(ValueError, match="torch threads"):
            Cluster.start(clash)
        assert torch.get_num_threads() == want
    finally:
        cluster.stop()
    assert torch.get_num_threads() == before


@pytest.mark.ray
def test_each_ray_instance_sets_its_own_process_threads(ray_session):
    """On Ray each instance is its own process, so ``EngineSpec.num_threads`` is exactly its
    torch thread count there, and the driver's own setting is left alone. Instances and the
    scheduler run at niceness 0, not at Ray's default for workers."""
    from llumnix_py.runtime.ray_runtime import INSTANCE_PREFIX, SCHEDULER_NAME
    from tests.cluster_helpers import running_ray_cluster

    before = torch.get_num_threads()
    want = other_than(before)
    spec = small_spec()
    namespace = "llumnix-test-threads"
    cfg = ClusterConfig(num_instances=2, runtime="ray", ray_namespace=namespace,
                        engine=type(spec)(engine=spec.engine, model=spec.model, num_threads=want))
    with running_ray_cluster(ray_session, cfg) as cluster:
        for iid in cluster.instance_ids():
            actor = ray_session.get_actor(INSTANCE_PREFIX + iid, namespace=namespace)
            # A lambda travels by value; a module-level function would be looked up by module there.
            threads = ray_session.get(actor.__ray_call__.remote(lambda self: __import__("torch").get_num_threads()),
                                      timeout=60)
            assert threads == want
            # Not Ray's default worker niceness (15): an engine must not yield to every other process.
            assert ray_session.get(actor.__ray_call__.remote(lambda self: __import__("os").nice(0)), timeout=60) == 0
        scheduler = ray_session.get_actor(SCHEDULER_NAME, namespace=namespace)
        assert ray_session.get(scheduler.__ray_call__.remote(lambda self: __import__("os").nice(0)), timeout=60) == 0
        assert torch.get_num_threads() == before
