"""Helpers shared by the cluster and fault-injection tests (local and Ray runtimes)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterator, Sequence, Union

from llumnix_py.cluster import Cluster, RequestHandle
from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec
from llumnix_py.engines.registry import build_engine
from llumnix_py.engines.types import Request, SamplingParams
from tests.factories import run_to_completion

# A tiny Llama in float64: tokens are exact whatever the batch (so migrated, preempted and
# resumed requests can be compared token for token with a run on one engine).
SMALL_MODEL = (("num_layers", 2), ("hidden_size", 64), ("intermediate_size", 128), ("num_heads", 4),
               ("num_kv_heads", 2), ("dtype", "float64"))
RESULT_TIMEOUT_S = 120.0


def small_spec(num_blocks: int = 128, max_batch_size: int = 32) -> EngineSpec:
    return EngineSpec(engine=EngineConfig(num_blocks=num_blocks, max_batch_size=max_batch_size), model=SMALL_MODEL)


def prompts(n: int, base_len: int = 40, step: int = 5) -> list[tuple[int, ...]]:
    """Distinct, deterministic prompts of growing length (tokens in 1..300)."""
    return [tuple((7 * i + 13 * j) % 300 + 1 for j in range(base_len + step * i)) for i in range(n)]


def samplings(n: int, max_tokens: int, seed_base: int = 1000) -> list[SamplingParams]:
    """Alternating greedy and seeded sampling."""
    return [SamplingParams(max_tokens=max_tokens, ignore_eos=True) if i % 2 == 0 else
            SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9, seed=seed_base + i, ignore_eos=True)
            for i in range(n)]


def reference(engine: EngineSpec, ps: Sequence[tuple[int, ...]],
              sps: Union[int, Sequence[SamplingParams]]) -> list[list[int]]:
    """The tokens of an undisturbed run: one engine, no migration. ``sps`` may be a
    ``max_tokens`` for greedy decoding. The pool is made large enough to run every
    request at once; tokens do not depend on it (float64)."""
    if isinstance(sps, int):
        sps = [SamplingParams(max_tokens=sps, ignore_eos=True)] * len(ps)
    big = dataclasses.replace(engine, engine=dataclasses.replace(engine.engine, num_blocks=4096))
    reqs = [Request(f"ref{i}", p, sp, arrival_time=float(i)) for i, (p, sp) in enumerate(zip(ps, sps))]
    tokens = run_to_completion(build_engine(big), requests=reqs)
    return [tokens[f"ref{i}"] for i in range(len(ps))]


def wait_all(handles: Sequence[RequestHandle]) -> list[list[int]]:
    assert handles
    return [h.result(timeout=RESULT_TIMEOUT_S) for h in handles]


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def assert_no_leak(cluster: Cluster, timeout: float = 30.0) -> None:
    """Every live instance ends empty: no running or waiting request, no used or reserved
    block. In-process instances are also waited on until idle (no migration in flight) and
    their engine's invariants are checked."""
    ids = cluster.instance_ids()
    assert ids
    for iid in ids:
        inst = cluster.control.instance(iid)
        assert inst is not None
        llumlet = getattr(inst, "llumlet", None)  # in-process runtime: the engine itself is at hand

        def empty() -> bool:
            load = inst.load()
            return (not (load.used_blocks or load.running or load.waiting)
                    and (llumlet is None or llumlet.is_idle()))

        wait_for(empty, timeout, f"{iid} to free its blocks")  # a release may trail the last token
        load = inst.load()
        assert load.used_blocks == 0, f"{iid} leaks {load.used_blocks} blocks"
        assert load.reserved_blocks == 0 and not load.running and not load.waiting
        if llumlet is not None:
            llumlet.engine.check_invariants()


def named_actors(ray, namespace: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == namespace)


@contextlib.contextmanager
def running_ray_cluster(ray, cfg: ClusterConfig) -> Iterator[Cluster]:
    """A Ray cluster for one test; whatever happens, no actor of its namespace is left."""
    assert named_actors(ray, cfg.ray_namespace) == [], "a previous test left actors behind"
    cluster = Cluster.start(cfg)
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            for name in named_actors(ray, cfg.ray_namespace):
                with contextlib.suppress(Exception):
                    ray.kill(ray.get_actor(name, namespace=cfg.ray_namespace), no_restart=True)
