"""The llumlet: token routing across migrations, aborts during migration, refusals."""

from __future__ import annotations

import threading
import time


from llumnix_py.engines.types import Request, SamplingParams
from llumnix_py.llumlet import Llumlet, LlumletConfig
from llumnix_py.frontend.handles import OrderedStream
from llumnix_py.tokens import CallbackSink
from migration.protocol import MigrationStatus
from tests.factories import make_engine

FRONTEND = "tcp://frontend-under-test"


class Recorder:
    """A frontend: per-request ordered streams, fed only with outputs addressed to it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.streams: dict[str, OrderedStream] = {}
        self.tokens: dict[str, list[int]] = {}
        self.done: set[str] = set()
        self.misrouted = 0

    def __call__(self, instance_id, reply_to, outputs) -> None:
        with self.lock:
            if reply_to != FRONTEND:
                self.misrouted += len(outputs)
                return
            for o in outputs:
                s = self.streams.setdefault(o.request_id, OrderedStream())
                ready, done = s.push(instance_id, o)
                self.tokens.setdefault(o.request_id, []).extend(ready)
                if done:
                    self.done.add(o.request_id)

    def wait(self, ids, timeout=60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if set(ids) <= self.done:
                    return
            time.sleep(0.01)
        raise AssertionError(f"requests {set(ids) - self.done} did not finish")


def make_pair(recorder, **engine_kw):
    kw = dict(dtype="float64", num_blocks=64, max_batch_size=8)
    kw.update(engine_kw)
    a = Llumlet(LlumletConfig(instance_id="a", transport="inproc"), make_engine(**kw), CallbackSink(recorder))
    b = Llumlet(LlumletConfig(instance_id="b", transport="inproc"), make_engine(**kw), CallbackSink(recorder))
    a.start()
    b.start()
    return a, b


def request(rid, n=20, max_tokens=40):
    return Request(rid, tuple(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   reply_to=FRONTEND)


def reference_tokens(rids, **kw):
    engine = make_engine(dtype="float64", num_blocks=256, max_batch_size=8)
    for rid in rids:
        engine.add_request(request(rid, **kw))
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step().outputs:
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def test_tokens_of_the_step_before_a_migration_reach_the_frontend(monkeypatch):
    """A migration that commits between a step and the publishing of its tokens must not
    make the source forget where that step's tokens go (a race seen on Ray)."""
    rec = Recorder()
    a, b = make_pair(rec)
    try:
        original = Llumlet._publish
        fired = threading.Event()

        def publish_after_migrating(self, out, groups):
            if self is a and not fired.is_set() and any(o.request_id == "r0" and o.index >= 5 for o in out.outputs):
                fired.set()
                result = a.migrate_now("r0", b.address, "m-race")
                assert result.status == MigrationStatus.FINISHED, result.reason
            original(self, out, groups)

        monkeypatch.setattr(Llumlet, "_publish", publish_after_migrating)
        a.add_request(request("r0"))
        rec.wait(["r0"])
        assert fired.is_set()
        assert rec.misrouted == 0
        assert rec.tokens["r0"] == reference_tokens(["r0"])["r0"]
    finally:
        a.stop()
        b.stop()


def test_abort_during_migration_aborts_wherever_the_request_ends_up():
    rec = Recorder()
    a, b = make_pair(rec)
    try:
        a.add_request(request("r1", max_tokens=400))
        while not a.load().running:
            time.sleep(0.005)
        assert a.migrate_out("r1", b.address, "m-abort")
        # Broadcast abort, as the frontend does, while the migration is in flight.
        a.abort("r1")
        b.abort("r1")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (a.is_idle() and b.is_idle()):
            time.sleep(0.01)
        assert a.is_idle() and b.is_idle()
        for llumlet in (a, b):
            load = llumlet.load()
            assert load.used_blocks == 0 and not load.running and not load.waiting
            llumlet.engine.check_invariants()
        results = a.pop_results()
        assert results and results[0].request_id == "r1"
    finally:
        a.stop()
        b.stop()


def test_destination_full_refuses_and_the_source_keeps_the_request():
    rec = Recorder()
    a, b = make_pair(rec, num_blocks=16, block_size=4, max_batch_size=1)
    try:
        b.add_request(request("busy", n=8, max_tokens=200))
        a.add_request(request("r2", n=30, max_tokens=30))
        while not (a.load().running and b.load().running):
            time.sleep(0.005)
        before_b = b.load().used_blocks
        result = a.migrate_now("r2", b.address, "m-full")
        assert result.status == MigrationStatus.ABORTED_DST
        assert b.load().used_blocks >= before_b and not b.dest.incoming
        rec.wait(["r2", "busy"])
        assert rec.tokens["r2"] == reference_tokens(["r2"], n=30, max_tokens=30)["r2"]
    finally:
        a.stop()
        b.stop()


def test_migrate_out_refuses_unknown_or_busy_requests():
    rec = Recorder()
    engine = make_engine(dtype="float64", num_blocks=64, max_batch_size=8)
    a = Llumlet(LlumletConfig(instance_id="a", transport="zmq", migration_timeout_s=1.0), engine, CallbackSink(rec))
    a.start()
    try:
        assert not a.migrate_out("nope", "tcp://127.0.0.1:9", "m1")
        a.add_request(request("r3", max_tokens=300))
        while not a.load().running:
            time.sleep(0.005)
        # Nobody listens at the destination: the migration waits for its pre-allocation reply.
        assert a.migrate_out("r3", "tcp://127.0.0.1:9", "m2")
        assert not a.migrate_out("r3", "tcp://127.0.0.1:9", "m3")  # already migrating
        rec.wait(["r3"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not a.results:
            time.sleep(0.01)
        results = a.pop_results()
        assert [r.status for r in results] == [MigrationStatus.ABORTED_DST]
        assert rec.tokens["r3"] == reference_tokens(["r3"], max_tokens=300)["r3"]
        assert a.load().used_blocks == 0
    finally:
        a.stop()


def test_migration_between_llumlets_needs_the_shared_secret():
    rec = Recorder()

    def llumlet(name, secret):
        cfg = LlumletConfig(instance_id=name, transport="zmq", secret=secret, migration_timeout_s=1.0)
        return Llumlet(cfg, make_engine(dtype="float64", num_blocks=64, max_batch_size=8), CallbackSink(rec))

    a, b, c = llumlet("a", "s3cret"), llumlet("b", "s3cret"), llumlet("c", "other")
    for x in (a, b, c):
        x.start()
    try:
        a.add_request(request("r5", max_tokens=450))
        while not a.load().running:
            time.sleep(0.005)
        moved = a.migrate_now("r5", b.address, "m-secret")
        assert moved.status == MigrationStatus.FINISHED, moved.reason
        refused = b.migrate_now("r5", c.address, "m-wrong-secret")
        assert refused.status == MigrationStatus.ABORTED_DST
        assert c.load().used_blocks == 0 and not c.engine.seqs
        rec.wait(["r5"])
        assert rec.tokens["r5"] == reference_tokens(["r5"], max_tokens=450)["r5"]
    finally:
        for x in (a, b, c):
            x.stop()
