"""Two llumlets over real vLLM instances: the engine loops run in their own threads and a
live migration goes over the ZeroMQ transport while the request keeps decoding."""

from __future__ import annotations

import threading

from llumnix_py.engines.types import Request, SamplingParams
from llumnix_py.frontend.handles import OrderedStream
from llumnix_py.llumlet import Llumlet
from llumnix_py.llumlet_migration import LockedSource
from llumnix_py.llumlet_types import LlumletConfig
from llumnix_py.tokens import CallbackSink
from migration.protocol import MigrationConfig, MigrationStatus
from tests.cluster_helpers import HoldOutputs, wait_for
from vllm_helpers import solo_tokens

FRONTEND = "tcp://frontend-under-test"
PROMPT = tuple(range(5, 75))


class Recorder:
    """A frontend: per-request ordered streams (dedup and reorder across instances)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.streams: dict[str, OrderedStream] = {}
        self.tokens: dict[str, list[int]] = {}
        self.done: set[str] = set()
        self.emitters: dict[str, set[str]] = {}
        self.gates: dict[str, HoldOutputs] = {}  # llumlets held after each batch they deliver

    def __call__(self, instance_id, reply_to, outputs) -> None:
        assert reply_to == FRONTEND
        with self.lock:
            for o in outputs:
                self.emitters.setdefault(o.request_id, set()).add(instance_id)
                ready, done = self.streams.setdefault(o.request_id, OrderedStream()).push(instance_id, o)
                self.tokens.setdefault(o.request_id, []).extend(ready)
                if done:
                    self.done.add(o.request_id)
        gate = self.gates.get(instance_id)
        if gate is not None:
            gate.after_batch()

    def count(self, rid: str) -> int:
        with self.lock:
            return len(self.tokens.get(rid, ()))

    def wait(self, rid: str, timeout: float = 120.0) -> None:
        def finished() -> bool:
            with self.lock:
                return rid in self.done

        wait_for(finished, timeout, f"request {rid} to finish")


def reference(engine, max_tokens: int) -> list[int]:
    return solo_tokens(engine, Request("ref", PROMPT, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))


def test_live_migration_over_zmq_while_decoding(engines, monkeypatch):
    ref = reference(engines[0], 300)  # before the llumlets own the engines' threads
    rec = Recorder()
    gate = rec.gates["a"] = HoldOutputs(None, "a")
    gate.hold()  # the source runs batch by batch: the test decides how far the request gets
    cfg = dict(transport="zmq", lease_timeout_s=None, migration=MigrationConfig(max_stages=3, last_stage_max_blocks=1))
    a = Llumlet(LlumletConfig(instance_id="a", **cfg), engines[0], CallbackSink(rec))
    b = Llumlet(LlumletConfig(instance_id="b", **cfg), engines[1], CallbackSink(rec))
    a.start()
    b.start()
    try:
        a.add_request(Request("r", PROMPT, SamplingParams(max_tokens=300, ignore_eos=True), reply_to=FRONTEND))
        gate.run_until(lambda: rec.count("r") >= 40, "40 tokens")
        original = LockedSource.incremental_blocks

        def one_batch_per_stage(self, *args):
            gate.step(wait=False)  # the request decodes one more batch during each stage
            return original(self, *args)

        monkeypatch.setattr(LockedSource, "incremental_blocks", one_batch_per_stage)
        result = a.migrate_now("r", b.address, "m1")
        gate.release()
        assert result.status == MigrationStatus.FINISHED, result.reason
        assert result.stages >= 2 and result.blocks >= 3
        rec.wait("r")
        assert rec.tokens["r"] == ref
        assert rec.emitters["r"] == {"a", "b"}
        wait_for(lambda: a.is_idle() and b.is_idle(), 60, "both llumlets to be idle")
    finally:
        gate.release()
        a.stop()
        b.stop()
    for e in engines:
        e.step()
        e.check_invariants()
        assert e.load().used_blocks == 0
