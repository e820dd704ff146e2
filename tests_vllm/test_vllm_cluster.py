"""A whole deployment over vLLM: ``Cluster`` (local runtime: scheduler daemon, two llumlets
over vLLM instances, ZeroMQ migrations) serving requests while one instance is drained,
so its requests live-migrate to the other and finish there with unchanged tokens."""

from __future__ import annotations

import contextlib

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, LlumletConfig
from llumnix_py.engines.types import Request, SamplingParams
from tests.cluster_helpers import HoldOutputs, wait_for
from vllm_helpers import solo_tokens

PROMPTS = {"x": tuple(range(5, 75)), "y": tuple(range(100, 160))}


def reference(engine, rid: str, max_tokens: int) -> list[int]:
    return solo_tokens(engine, Request("ref-" + rid, PROMPTS[rid], SamplingParams(max_tokens=max_tokens,
                                                                               ignore_eos=True)))


def test_drained_instance_migrates_its_requests_and_tokens_match(checkpoint, engines):
    from llumnix_py.frontend.cluster import Cluster

    max_tokens = 300
    refs = {rid: reference(engines[0], rid, max_tokens) for rid in PROMPTS}
    config = ClusterConfig(
        num_instances=2, runtime="local",
        engine=EngineSpec(kind="vllm", checkpoint=checkpoint, max_model_len=512,
                          engine=EngineConfig(num_blocks=40, block_size=32, max_batch_size=8)),
        llumlet=LlumletConfig(instance_id="template", transport="zmq"),
    )
    cluster = Cluster.start(config)
    try:
        with contextlib.ExitStack() as stack:
            # Each instance runs batch by batch until its requests have 20 tokens, and the
            # victim stays held while it is drained: "x" is still running when it migrates.
            gates = {iid: stack.enter_context(HoldOutputs(cluster, iid)) for iid in cluster.instance_ids()}
            for gate in gates.values():
                gate.hold()
            handles = {rid: cluster.submit(PROMPTS[rid], SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                           request_id=rid) for rid in PROMPTS}
            for iid in {h.instance_id for h in handles.values()}:
                mine = [h for h in handles.values() if h.instance_id == iid]
                gates[iid].run_until(lambda: min(len(h.token_ids) for h in mine) >= 20, "20 tokens each")
            victim = handles["x"].instance_id
            cluster.drain(victim)
            held_by_victim = cluster.control.instance(victim).llumlet.has_request
            wait_for(lambda: not held_by_victim("x"), 120, "the drain to move x off the victim")
        tokens = {rid: h.result(timeout=120) for rid, h in handles.items()}
        state = cluster.state()
    finally:
        cluster.stop()
    assert tokens == refs
    assert state["migrations"].get("finished", 0) >= 1, state["migrations"]
    assert victim in handles["x"].instances_seen and len(handles["x"].instances_seen) == 2
    assert state["misrouted_outputs"] == 0
