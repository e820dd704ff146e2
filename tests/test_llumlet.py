"""The llumlet: token routing across migrations, aborts during migration, refusals."""

from __future__ import annotations

import threading

import pytest

from llumnix_py.engines.types import Request, SamplingParams
from llumnix_py.frontend.handles import OrderedStream
from llumnix_py.llumlet import Llumlet
from llumnix_py.llumlet_migration import LockedSource
from llumnix_py.llumlet_types import LlumletConfig
from llumnix_py.tokens import CallbackSink
from migration import wire
from migration.driver import TransportPort
from migration.protocol import MigrationConfig, MigrationStatus
from migration.transports import register_transport
from migration.transports.inproc import InprocMigrationServer, InprocMigrationTransport
from tests.cluster_helpers import HoldOutputs, ManualClock, wait_for
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
        self.gates: dict[str, HoldOutputs] = {}  # llumlets held after each batch they deliver

    def hold(self, *instance_ids: str) -> list[HoldOutputs]:
        """Hold these llumlets after their next batch (the engine thread waits in this sink)."""
        for iid in instance_ids:
            self.gates[iid] = HoldOutputs(None, iid)
            self.gates[iid].hold()
        return [self.gates[iid] for iid in instance_ids]

    def release(self) -> None:
        for gate in self.gates.values():
            gate.release()

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
        gate = self.gates.get(instance_id)
        if gate is not None:
            gate.after_batch()

    def wait(self, ids, timeout=60.0) -> None:
        def finished() -> bool:
            with self.lock:
                return set(ids) <= self.done

        wait_for(finished, timeout, f"requests {sorted(ids)} to finish")


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
        rec.release()
        a.stop()
        b.stop()


def test_abort_during_migration_aborts_wherever_the_request_ends_up():
    rec = Recorder()
    a, b = make_pair(rec)
    (held,) = rec.hold("a")  # r1 runs, and is still there when it is migrated and aborted
    try:
        a.add_request(request("r1", max_tokens=400))
        held.wait_held()
        assert a.load().running
        assert a.migrate_out("r1", b.address, "m-abort")
        # Broadcast abort, as the frontend does, while the migration is in flight.
        a.abort("r1")
        b.abort("r1")
        rec.release()
        wait_for(lambda: a.is_idle() and b.is_idle(), 30, "both llumlets to be idle")
        for llumlet in (a, b):
            load = llumlet.load()
            assert load.used_blocks == 0 and not load.running and not load.waiting
            llumlet.engine.check_invariants()
        results = a.pop_results()
        assert results and results[0].request_id == "r1"
    finally:
        rec.release()
        a.stop()
        b.stop()


def test_destination_full_refuses_and_the_source_keeps_the_request():
    rec = Recorder()
    a, b = make_pair(rec, num_blocks=16, block_size=4, max_batch_size=1)
    held = rec.hold("a", "b")  # both running, neither done, when the migration is tried
    try:
        b.add_request(request("busy", n=8, max_tokens=200))
        a.add_request(request("r2", n=30, max_tokens=30))
        for gate in held:
            gate.wait_held()
        assert a.load().running and b.load().running
        before_b = b.load().used_blocks
        result = a.migrate_now("r2", b.address, "m-full")
        assert result.status == MigrationStatus.ABORTED_DST
        assert b.load().used_blocks >= before_b and not b.dest.incoming
        rec.release()
        rec.wait(["r2", "busy"])
        assert rec.tokens["r2"] == reference_tokens(["r2"], n=30, max_tokens=30)["r2"]
    finally:
        rec.release()
        a.stop()
        b.stop()


def test_migrate_out_refuses_unknown_or_busy_requests():
    rec = Recorder()
    engine = make_engine(dtype="float64", num_blocks=64, max_batch_size=8)
    a = Llumlet(LlumletConfig(instance_id="a", transport="zmq", migration_timeout_s=1.0), engine, CallbackSink(rec))
    (held,) = rec.hold("a")
    a.start()
    try:
        assert not a.migrate_out("nope", "tcp://127.0.0.1:9", "m1")
        a.add_request(request("r3", max_tokens=300))
        held.wait_held()  # r3 is running, and stays until both migrate_out calls are made
        # Nobody listens at the destination: the migration waits for its pre-allocation reply.
        assert a.migrate_out("r3", "tcp://127.0.0.1:9", "m2")
        assert not a.migrate_out("r3", "tcp://127.0.0.1:9", "m3")  # already migrating
        rec.release()
        rec.wait(["r3"])
        wait_for(lambda: bool(a.results), 30, "the migration's result")
        results = a.pop_results()
        assert [r.status for r in results] == [MigrationStatus.ABORTED_DST]
        assert rec.tokens["r3"] == reference_tokens(["r3"], max_tokens=300)["r3"]
        assert a.load().used_blocks == 0
    finally:
        rec.release()
        a.stop()


def test_migration_between_llumlets_needs_the_shared_secret():
    rec = Recorder()

    def llumlet(name, secret):
        cfg = LlumletConfig(instance_id=name, transport="zmq", secret=secret, migration_timeout_s=1.0)
        return Llumlet(cfg, make_engine(dtype="float64", num_blocks=64, max_batch_size=8), CallbackSink(rec))

    a, b, c = llumlet("a", "s3cret"), llumlet("b", "s3cret"), llumlet("c", "other")
    held = rec.hold("a", "b")  # r5 is running on a, then on b, when each migration is tried
    for x in (a, b, c):
        x.start()
    try:
        a.add_request(request("r5", max_tokens=450))
        held[0].wait_held()
        moved = a.migrate_now("r5", b.address, "m-secret")
        assert moved.status == MigrationStatus.FINISHED, moved.reason
        refused = b.migrate_now("r5", c.address, "m-wrong-secret")
        assert refused.status == MigrationStatus.ABORTED_DST
        assert c.load().used_blocks == 0 and not c.engine.seqs
        rec.release()
        rec.wait(["r5"])
        assert rec.tokens["r5"] == reference_tokens(["r5"], max_tokens=450)["r5"]
    finally:
        rec.release()
        for x in (a, b, c):
            x.stop()


class _MeetingTransport(InprocMigrationTransport):
    """An inproc connection on which the first messages of the migrations named in ``meet``
    wait for each other (so those migrations are in flight at once), noting which
    connection each arrived on."""

    meet = ("m-1", "m-2")
    meeting = threading.Barrier(2, timeout=60)
    arrived: dict[str, int] = {}  # migration id -> id() of the connection its first message used

    def call(self, message):
        mid = getattr(message, "migration_id", None)
        if mid in self.meet and mid not in self.arrived:
            self.arrived[mid] = id(self)
            self.meeting.wait()
        return super().call(message)


def test_concurrent_migrations_to_one_destination_use_their_own_connections():
    """After a migration from a to b left a connection idle, two migrations from a to b at once
    (``max_outgoing`` 2) each use a connection of their own (a shared one interleaves their
    sequence numbers and block replies), both finish with exact tokens, and both
    connections go back to the idle pool."""
    register_transport("test-meeting-inproc", InprocMigrationServer, _MeetingTransport)
    rec = Recorder()
    cfg = dict(transport="test-meeting-inproc", max_outgoing=2, max_incoming=2)
    a = Llumlet(LlumletConfig(instance_id="a", **cfg), make_engine(dtype="float64", num_blocks=64, max_batch_size=8),
                CallbackSink(rec))
    b = Llumlet(LlumletConfig(instance_id="b", **cfg), make_engine(dtype="float64", num_blocks=64, max_batch_size=8),
                CallbackSink(rec))
    a.start()
    b.start()
    (held,) = rec.hold("a")  # the requests run on a, none done, when they migrate
    try:
        a.add_request(request("r0", n=16, max_tokens=60))
        a.add_request(request("r1", max_tokens=60))
        a.add_request(request("r2", n=24, max_tokens=60))
        held.wait_held()
        wait_for(lambda: len(a.load().running) == 3, 30, "the requests to run on a")
        assert a.migrate_now("r0", b.address, "m-0").status == MigrationStatus.FINISHED  # leaves a connection idle
        assert a.migrate_out("r1", b.address, "m-1") and a.migrate_out("r2", b.address, "m-2")
        wait_for(lambda: len(b.load().running) + len(b.load().waiting) == 3, 60, "the requests to land on b")
        rec.release()
        rec.wait(["r0", "r1", "r2"])
        results = {r.request_id: r.status for r in a.pop_results()}
        assert results == {rid: MigrationStatus.FINISHED for rid in ("r0", "r1", "r2")}
        assert _MeetingTransport.arrived["m-1"] != _MeetingTransport.arrived["m-2"]
        assert sorted(map(id, a._outgoing._idle[b.address])) == sorted(_MeetingTransport.arrived.values())
        expected = {"r0": reference_tokens(["r0"], n=16, max_tokens=60)["r0"],
                    "r1": reference_tokens(["r1"], max_tokens=60)["r1"],
                    "r2": reference_tokens(["r2"], n=24, max_tokens=60)["r2"]}
        assert {rid: rec.tokens[rid] for rid in expected} == expected
        assert rec.misrouted == 0
    finally:
        rec.release()
        a.stop()
        b.stop()


def gated_llumlet(clock: ManualClock, **config):
    """A started llumlet whose engine's next step, once ``gate[0]`` is set, waits inside (the
    engine lock held) until ``go`` is set: (llumlet, steps, gate, inside, go)."""
    engine = make_engine(dtype="float64", num_blocks=64, max_batch_size=8)
    b = Llumlet(LlumletConfig(instance_id="b", transport="inproc", **config), engine, CallbackSink(Recorder()),
                clock=clock)
    steps, gate, inside, go = [0], [False], threading.Event(), threading.Event()
    engine_step = engine.step

    def gated_step():
        steps[0] += 1
        if gate[0]:
            gate[0] = False
            inside.set()
            assert go.wait(60)
        return engine_step()

    engine.step = gated_step
    b.start()
    return b, steps, gate, inside, go


def test_a_poll_during_a_step_counts_the_prompts_that_step_admitted():
    """The load a poll reads while a step runs (the engine lock held) shows the requests that
    step took from the inbox: their prompts are still to prefill. Before, it was the load of
    the step before, and they were in neither (prefill-queue dispatch sent more prompts there)."""
    from policies.dispatch import prefill_backlog

    clock = ManualClock(100.0)
    b, steps, gate, inside, go = gated_llumlet(clock)
    try:
        assert prefill_backlog(b.load()) == 0  # idle: a fresh load
        gate[0] = True
        b.add_request(request("p", n=20, max_tokens=4))
        assert inside.wait(60)  # the step that admitted it is in progress
        load = b.load()
        assert [r.request_id for r in load.waiting + load.running] == ["p"]
        assert prefill_backlog(load) == 20
        go.set()
        wait_for(lambda: b.core.is_idle(), 60, "the request to finish")
        assert prefill_backlog(b.load()) == 0
    finally:
        go.set()
        b.stop()


def test_a_hold_is_answered_after_the_step_in_progress_and_no_step_starts_until_it_ends():
    """``wire.Hold`` (a source's stop-and-copy is next): set at once, answered once the step in
    progress ended; the engine loop then starts no step until the migration aborts (or
    activates) or the hold's deadline passes on the llumlet's clock."""
    clock = ManualClock(100.0)
    b, steps, gate, inside, go = gated_llumlet(clock, max_step_hold_s=0.5)
    engine = b.engine
    told = [0]  # loop iterations told to hold
    holding = b.core.holding

    def counted_holding(now):
        until = holding(now)
        told[0] += until is not None
        return until

    b.core.holding = counted_holding
    client = InprocMigrationTransport(b.address, timeout_s=60)
    client.connect()
    try:
        b.add_request(request("bg", max_tokens=2000))
        wait_for(lambda: steps[0] >= 2, 60, "the background request to run")
        assert client.call(wire.PreAlloc("m1", "incoming", 2)).ok
        gate[0] = True
        assert inside.wait(60)  # a step is in progress
        replies: list[wire.Reply] = []
        sender = threading.Thread(target=lambda: replies.append(client.call(wire.Hold("m1", 0.2))))
        sender.start()
        wait_for(lambda: holding(clock()) is not None, 60, "the hold to be set, before any lock")
        assert sender.is_alive() and not replies  # its answer waits for the step in progress
        in_progress = steps[0]
        go.set()
        sender.join(60)
        assert replies and replies[0].ok
        told_before = told[0]
        wait_for(lambda: told[0] >= told_before + 3, 60, "the engine loop to be told to hold")
        assert steps[0] == in_progress  # no step started while held
        clock.advance(0.3)  # past the hold's deadline (0.2 s from the step boundary)
        wait_for(lambda: steps[0] > in_progress, 60, "steps to resume after the deadline")

        assert client.call(wire.Hold("m1", 0.2)).ok  # held again: now the migration ends it
        at_hold = steps[0]
        told_before = told[0]
        wait_for(lambda: told[0] >= told_before + 3, 60, "the engine loop to be told to hold")
        assert steps[0] == at_hold
        assert client.call(wire.Abort("m1", "source gave up")).ok
        wait_for(lambda: steps[0] > at_hold, 60, "steps to resume after the abort")
        assert engine.load().reserved_blocks == 0
    finally:
        go.set()
        client.close()
        b.stop()


def test_the_source_starts_no_step_from_the_freeze_to_the_end_of_a_live_stop_and_copy(monkeypatch):
    """The commit is held on the destination until the source's engine loop was told three
    times to hold; the source's step count is the same at the freeze and at the free."""
    rec = Recorder()
    a, b = make_pair(rec)
    try:
        told = [0]
        holding = a.core.holding

        def counted_holding(now):
            until = holding(now)
            told[0] += until is not None
            return until

        monkeypatch.setattr(a.core, "holding", counted_holding)
        steps, steps_at = [0], {}
        engine_step = a.engine.step

        def counted_step():  # under the engine lock, as freeze and free_src are
            steps[0] += 1
            return engine_step()

        monkeypatch.setattr(a.engine, "step", counted_step)
        for name in ("freeze", "free_src"):
            def wrapped(rid, _orig=getattr(a.engine, name), _name=name):
                steps_at[_name] = steps[0]
                return _orig(rid)
            monkeypatch.setattr(a.engine, name, wrapped)
        handle = b.core.handle

        def commit_after_the_source_held(msg, payload, now):
            if isinstance(msg, wire.Commit):
                wait_for(lambda: told[0] >= 3, 60, "the source's engine loop to be told to hold")
            return handle(msg, payload, now)

        monkeypatch.setattr(b.core, "handle", commit_after_the_source_held)
        a.add_request(request("bg", max_tokens=300))
        a.add_request(request("r3", n=40, max_tokens=60))
        wait_for(lambda: len(rec.tokens.get("r3", [])) >= 3, 60, "r3 to decode")
        result = a.migrate_now("r3", b.address, "m-held", config=MigrationConfig(commit_hold_s=0.5))
        assert result.status == MigrationStatus.FINISHED, result.reason
        assert told[0] >= 3 and steps_at["freeze"] == steps_at["free_src"]
        rec.wait(["r3"])
        assert rec.tokens["r3"] == reference_tokens(["r3"], n=40, max_tokens=60)["r3"]
    finally:
        rec.release()
        a.abort("bg")
        a.stop()
        b.stop()


def test_freeze_in_is_the_rest_of_the_step_in_progress_and_a_hold_carries_it():
    """A source tells its destination how soon it can freeze: the step in progress began at the
    llumlet's clock reading, and should last as long as the latest one."""
    clock = ManualClock(100.0)
    b, steps, gate, inside, go = gated_llumlet(clock)
    try:
        b.add_request(request("bg", max_tokens=2000))
        wait_for(lambda: steps[0] >= 2 and b.core.stats.last_step_ms > 0, 60, "a measured step")
        gate[0] = True
        assert inside.wait(60)  # a step is in progress, begun at 100.0 on the manual clock
        last = b.core.stats.last_step_ms / 1e3
        assert b.core.freeze_in(clock()) == pytest.approx(last)
        clock.advance(last / 2)
        assert b.core.freeze_in(clock()) == pytest.approx(last / 2)
        sent: list = []

        class Capture:  # a transport that records what it is asked to send
            chunk_blocks = 16

            def call(self, msg):
                sent.append(msg)
                return wire.Reply(True)

        source = LockedSource(b.core, b._locked, 0.05, clock)
        assert TransportPort(Capture(), source).hold("m1", 0.05) == (True, "")
        assert sent[0] == wire.Hold("m1", 0.05, pytest.approx(last / 2), pytest.approx(last))  # its timing
        clock.advance(last)
        assert b.core.freeze_in(clock()) == 0.0  # overdue: the freeze comes as soon as the step ends
    finally:
        go.set()
        b.stop()


def test_a_refused_hold_lets_the_engine_loop_step_on_at_once():
    """A source whose freeze is further away than half a step here is refused at this
    instance's step boundary, and the next step starts without waiting for any deadline (the
    manual clock never moves)."""
    clock = ManualClock(100.0)
    b, steps, gate, inside, go = gated_llumlet(clock, max_step_hold_s=0.5)
    client = InprocMigrationTransport(b.address, timeout_s=60)
    client.connect()
    try:
        b.add_request(request("bg", max_tokens=2000))
        wait_for(lambda: steps[0] >= 2 and b.core.stats.last_step_ms > 0, 60, "a measured step")
        assert client.call(wire.PreAlloc("m1", "incoming", 2)).ok
        gate[0] = True
        assert inside.wait(60)
        replies: list[wire.Reply] = []
        far = min(wire.MAX_HOLD_S, b.core.stats.last_step_ms / 1e3 + 0.2)  # more than half a step away
        sender = threading.Thread(target=lambda: replies.append(client.call(wire.Hold("m1", 0.2, far))))
        sender.start()
        wait_for(lambda: b.core.holding(clock()) is not None, 60, "the tentative hold, before any lock")
        in_progress = steps[0]
        go.set()
        sender.join(60)
        assert replies and not replies[0].ok and "steps on" in replies[0].error
        assert b.core.holding(clock()) is None
        wait_for(lambda: steps[0] > in_progress, 60, "the next step, with the clock standing still")
    finally:
        go.set()
        client.close()
        b.stop()
