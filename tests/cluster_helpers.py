"""Helpers shared by the cluster and fault-injection tests (local and Ray runtimes).

The rule for every test here: a test states the condition it waits for (an event, a
token count, a membership change), never a duration it hopes is enough. ``wait_for``'s
timeout is a failure bound for a condition that never comes, not a pause. Where a test
needs a request to still be running at some point, it holds that instance's engine
(``HoldOutputs``) or drives time by hand (``ManualClock``) instead of counting on the
engine being slow: a decode step of the tiny model takes well under a millisecond.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Iterator, Optional, Sequence, Union

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec
from llumnix_py.engines.registry import build_engine
from llumnix_py.engines.types import Request, SamplingParams
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.frontend.handles import RequestHandle
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


class ManualClock:
    """A clock that moves only when the test says so (``clock.now = t`` or ``advance``).

    Inject it where a component takes ``clock=`` (``Llumlet``, ``SchedulerDaemon``) to
    make leases, timeouts and heartbeats happen exactly when the test decides."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


class HoldOutputs:
    """Holds an in-process instance's engine loop right after each token batch it delivers.

    The llumlet hands each step's tokens to its sink outside its engine lock, on the
    engine thread; in the local runtime that sink calls ``cluster.on_outputs``. While
    held, the instance makes no progress (its requests cannot finish) but still answers
    every call (the lock is free). ``step`` lets exactly one more batch through. Use as a
    context manager: leaving it releases the engine, whatever happened.

    Args:
        cluster: a ``Cluster`` of the local runtime, whose ``on_outputs`` is hooked; None
            when the test's own sink calls ``after_batch``.
        instance_id: the instance to hold; the others run on.
    """

    def __init__(self, cluster: Optional[Cluster], instance_id: str, timeout: float = RESULT_TIMEOUT_S) -> None:
        self.instance_id = instance_id
        self.timeout = timeout
        self._cond = threading.Condition()
        self._armed = False
        self._released = False
        self._permits = 0
        self._waiting = False
        self._holds = 0  # times the engine thread started waiting here
        self._cluster = cluster
        if cluster is not None:
            inner = self._inner = cluster.on_outputs

            def hooked(iid, outputs):
                inner(iid, outputs)  # this batch is delivered; the engine stops after it
                if iid == instance_id:
                    self.after_batch()

            self._hooked = cluster.on_outputs = hooked  # type: ignore[method-assign]

    def after_batch(self) -> None:
        """Called on the engine thread after each batch it delivered (the cluster's hook does;
        a test's own token sink may call it instead, with ``cluster=None``)."""
        with self._cond:
            if not self._armed or self._released:
                return
            if self._permits:
                self._permits -= 1
                return
            self._waiting = True
            self._holds += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._released or self._permits > 0)
            if not self._released:
                self._permits -= 1
            self._waiting = False

    def hold(self) -> None:
        """After its next batch is delivered, the engine thread waits (until ``step`` or ``release``)."""
        with self._cond:
            self._armed = True

    def wait_held(self) -> None:
        """Block until the engine thread waits here; fails the test after ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._waiting or self._released, self.timeout):
                raise AssertionError(f"{self.instance_id} delivered no batch to hold after")

    def step(self, wait: bool = True) -> bool:
        """Let one more batch through and (``wait``) wait until the engine is held after it.
        False if it was not held again (released, or it had nothing left to run)."""
        with self._cond:
            holds = self._holds
            self._permits += 1
            self._cond.notify_all()
            if not wait:
                return True
            return self._cond.wait_for(lambda: self._holds > holds and self._waiting and not self._released,
                                       self.timeout)

    def run_until(self, cond, what: str = "condition") -> None:
        """Let batches through one at a time until ``cond()`` holds; the engine is held after.

        E.g. ``run_until(lambda: all(h.token_ids for h in handles))``: every request is
        running and none can have finished (each batch adds one token a request)."""
        step_until(self, cond, what)

    @property
    def holds(self) -> int:
        """How many times the engine has been held so far (the current hold's number while held)."""
        with self._cond:
            return self._holds

    @property
    def waiting(self) -> bool:
        with self._cond:
            return self._waiting and not self._released

    def release(self) -> None:
        with self._cond:
            self._released = True
            self._cond.notify_all()

    def __enter__(self) -> "HoldOutputs":
        return self

    def __exit__(self, *exc) -> None:
        """Release the engine and take the hook off (gates stacked on one cluster leave in reverse order)."""
        self.release()
        if self._cluster is not None and self._cluster.on_outputs is self._hooked:
            self._cluster.on_outputs = self._inner  # type: ignore[method-assign]


def step_until(gate, cond, what: str = "condition") -> None:
    """Let a held engine (``HoldOutputs`` or ``tests.ray_gates.RayEngineGate``) run one batch at
    a time until ``cond()`` holds; it is held after. Fails if it stops being held first."""
    gate.wait_held()
    while not cond():
        if not gate.step():
            raise AssertionError(f"{gate.instance_id} stopped before {what}")


class InLockstep:
    """Steps held instances only as fast as the scheduler looks at them (local runtime).

    Each held instance (its ``HoldOutputs`` armed with ``hold``) runs one batch per
    migration round: before it may run the next, a round of the scheduler daemon must
    have read a load of it polled after its latest batch. So the scheduler reacts to
    every state the instances pass through (it migrates before requests finish), and
    instances held together advance at the same pace, whatever the speed of the engine
    or the machine.

    Args:
        cluster: a ``Cluster`` of the local runtime.
        gates: the ``HoldOutputs`` of the instances to hold (instances without requests
            are simply not held until they get some).
    """

    def __init__(self, cluster: Cluster, gates: Sequence[HoldOutputs], timeout: float = RESULT_TIMEOUT_S) -> None:
        assert gates
        self.gates = {g.instance_id: g for g in gates}
        self.timeout = timeout
        self._cond = threading.Condition()
        self._tags: dict[int, tuple[str, int]] = {}  # id(load) -> (instance, the hold it was polled in)
        self._seen: dict[str, int] = {}  # instance -> the latest hold whose load reached the scheduler core
        self._round_for: dict[str, int] = {}  # instance -> the latest hold a migration round was run on
        core = cluster.control.daemon.core
        for iid, gate in self.gates.items():
            llumlet = cluster.control.instance(iid).llumlet
            llumlet.load = self._tagging(iid, gate, llumlet.load)  # type: ignore[method-assign]
        on_load, migration_round = core.on_load, core.migration_round

        def seen(instance_id, load, now):
            with self._cond:
                tag = self._tags.pop(id(load), None)
                if tag is not None:
                    self._seen[tag[0]] = max(self._seen.get(tag[0], -1), tag[1])
            return on_load(instance_id, load, now)

        def counted_round(now):
            orders = migration_round(now)
            with self._cond:
                self._round_for.update(self._seen)
                self._cond.notify_all()
            return orders

        core.on_load = seen  # type: ignore[method-assign]
        core.migration_round = counted_round  # type: ignore[method-assign]

    def _tagging(self, iid: str, gate: HoldOutputs, poll):
        def tagged_poll():
            hold = gate.holds if gate.waiting else None  # held: the engine lock is free, the load is fresh
            load = poll()
            if hold is not None:
                with self._cond:
                    self._tags[id(load)] = (iid, hold)
            return load

        return tagged_poll

    def _round_saw(self, holds: dict[str, int]) -> bool:
        with self._cond:
            return all(self._round_for.get(iid, -1) >= h for iid, h in holds.items())

    def run_until(self, cond, what: str = "condition") -> None:
        """Step the held instances, one migration round a batch, until ``cond()`` holds."""
        deadline = time.monotonic() + self.timeout
        while not cond():
            held = {iid: g.holds for iid, g in self.gates.items() if g.waiting}
            if held:
                wait_for(lambda: cond() or self._round_saw(held), self.timeout,
                         f"a migration round that saw {sorted(held)} after their batches")
                if cond():
                    return
                for iid in held:
                    self.gates[iid].step(wait=False)
                for iid, hold in held.items():  # each has left its hold: it runs one batch, no more
                    gate = self.gates[iid]
                    wait_for(lambda: not (gate.waiting and gate.holds == hold), self.timeout, f"{iid} to run")
            elif time.monotonic() > deadline:
                raise AssertionError(f"no held instance has anything to run before {what}")
            else:
                time.sleep(0.001)  # none is held now: an instance is between batches or idle


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> None:
    """Wait until ``cond()`` is true; ``timeout`` only bounds a condition that never comes."""
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
