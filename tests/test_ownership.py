"""Ownership of a migrating request when messages are lost (issue 13, item 4b).

- ``OwnershipArbiter``: hypothesis properties (first claim wins, for every later claim
  of the same id; bounded memory; a dead instance settles for the source side).
- The protocol machine: an uncertain commit, aborts without an answer, the claim.
- Driver + destination over two in-process engines (float64 tiny model): the commit
  reply, every abort and the activation lost, each way the arbiter can answer; tokens
  equal a run without migration, nothing runs twice, no block leaks.
"""

from __future__ import annotations


from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.engines.types import SeqStatus
from llumnix_py.llumlet_core import LlumletCore
from llumnix_py.llumlet_types import LlumletConfig
from migration import protocol as p
from migration import wire
from migration.driver import MigrationDriver
from migration.ownership import Owner, OwnershipArbiter, ask
from migration.protocol import MigrationStatus, SourceMigration
from migration.transports.base import TransportError
from tests.test_migration_protocol import Pair, engine, reference, req, state

SIDES = st.sampled_from([Owner.SOURCE, Owner.DESTINATION])


# ----------------------------------------------------------------------------- the arbiter
@settings(max_examples=200, deadline=None)
@given(claims=st.lists(st.tuples(st.integers(0, 5), SIDES, st.floats(0, 50)), min_size=1, max_size=40))
def test_every_later_claim_gets_the_first_claims_answer(claims):
    arb = OwnershipArbiter(ttl_s=1e6)
    first: dict[int, Owner] = {}
    now = 0.0
    for mid, side, dt in claims:
        now += dt  # the clock only moves forward; everything here stays within the TTL
        got = arb.claim(f"m{mid}", side, now)
        assert got == first.setdefault(mid, side)
        assert arb.decided(f"m{mid}") == got


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 60), cap=st.integers(1, 20), ttl=st.floats(1, 10))
def test_memory_is_bounded_by_count_and_ttl(n, cap, ttl):
    arb = OwnershipArbiter(ttl_s=ttl, max_entries=cap)
    for i in range(n):
        arb.claim(f"m{i}", Owner.SOURCE, float(i) * 0.01)
        assert len(arb) <= cap
    arb.claim("late", Owner.DESTINATION, n * 0.01 + ttl + 1)
    assert len(arb) == 1  # everything older than the TTL is forgotten


@settings(max_examples=100, deadline=None)
@given(first=st.one_of(st.none(), SIDES), dead=st.sampled_from(["a", "b", "c"]))
def test_a_dead_instance_settles_its_open_migrations_for_the_source(first, dead):
    arb = OwnershipArbiter()
    arb.open("m", "a", "b", 0.0)
    if first is not None:
        arb.claim("m", first, 0.5)
    settled = arb.settle_dead(dead, 1.0)
    want = first if first is not None else (Owner.SOURCE if dead in ("a", "b") else None)
    assert arb.decided("m") == want
    assert (settled == ["m"]) == (first is None and dead in ("a", "b"))
    for side in Owner:  # whatever comes later
        if want is not None:
            assert arb.claim("m", side, 2.0) == want


def test_ask_returns_none_when_the_arbiter_does_not_answer():
    def down(mid, side):
        raise ConnectionError("partitioned")

    assert ask(down, "m", Owner.SOURCE) is None
    assert ask(None, "m", Owner.SOURCE) is None
    assert ask(lambda mid, side: "destination", "m", Owner.SOURCE) is Owner.DESTINATION


# ----------------------------------------------------------------------------- the machine
def committed_machine() -> SourceMigration:
    m = SourceMigration("m", "r", waiting=True)
    m.start()
    assert isinstance(m.on(p.Frozen(state(status=SeqStatus.WAITING))), p.Commit)
    return m


def test_uncertain_commit_then_unanswered_abort_claims_and_keeps_frozen():
    m = committed_machine()
    a = m.on(p.Committed(False, "timeout", uncertain=True))
    assert isinstance(a, p.Rollback) and a.uncertain and a.abort_dst
    assert m.on(p.RolledBack(unanswered=True)) == p.ClaimOwnership()
    a = m.on(p.OwnershipDecided("source"))
    assert isinstance(a, p.Rollback) and a.best_effort and a.unfreeze
    assert m.on(p.RolledBack()).status == MigrationStatus.ABORTED_DST


def test_the_arbiter_gives_it_to_the_destination():
    m = committed_machine()
    m.on(p.Committed(False, "timeout", uncertain=True))
    m.on(p.RolledBack(unanswered=True))
    assert m.on(p.OwnershipDecided("destination")) == p.Activate()
    assert m.on(p.Activated(False, "lost")) == p.FreeSrc()
    assert m.on(p.SrcFreed()).status == MigrationStatus.FINISHED


def test_no_answer_from_the_arbiter_ends_unresolved_and_frozen():
    m = committed_machine()
    m.on(p.Committed(False, "timeout", uncertain=True))
    m.on(p.RolledBack(unanswered=True))
    done = m.on(p.OwnershipDecided(None))
    assert done.status == MigrationStatus.ABORTED_DST and m.unresolved and m.frozen


def test_an_answered_abort_decides_without_the_arbiter():
    m = committed_machine()
    m.on(p.Committed(False, "timeout", uncertain=True))
    assert m.on(p.RolledBack()).status == MigrationStatus.ABORTED_DST  # dropped there: keep it
    m = committed_machine()
    m.on(p.Committed(False, "timeout", uncertain=True))
    assert m.on(p.RolledBack(committed_on_dst=True)) == p.FreeSrc()  # runs there already
    assert m.on(p.SrcFreed()).status == MigrationStatus.FINISHED


# ----------------------------------------------------------------------------- driver + destination
class LossyPort:
    """Loses the commit's reply, every abort, and the activation (the destination is alive)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.aborts = 0

    def pre_alloc(self, *a):
        return self.inner.pre_alloc(*a)

    def copy(self, *a):
        return self.inner.copy(*a)

    def hold(self, *a):
        return self.inner.hold(*a)

    def commit(self, mid, st):
        ok, _ = self.inner.commit(mid, st)
        assert ok
        raise TransportError("commit reply lost")

    def activate(self, mid):
        raise TransportError("activate lost")

    def abort(self, mid, reason, attempts=3):
        self.aborts += 1
        return None  # no answer


class Arbiter:
    """The arbiter behind a port that fails ``down`` times first."""

    def __init__(self, down: int = 0) -> None:
        self.arb = OwnershipArbiter()
        self.down = down
        self.calls = 0

    def __call__(self, mid, side):
        self.calls += 1
        if self.calls <= self.down:
            raise ConnectionError("arbiter unreachable")
        return self.arb.claim(mid, side, 0.0)


def lossy_run(pair: Pair, arbiter: Arbiter, claim_timeout_s: float = 10.0):
    port = LossyPort(pair.port)
    driver = MigrationDriver(pair.src, port, ownership=arbiter, claim_timeout_s=claim_timeout_s,
                             claim_retry_s=0.0, sleep=lambda s: None)
    return driver.run(SourceMigration("m", "x")), port


def setup_pair():
    reqs = [req("x", 50, max_tokens=20, seeded=True), req("z", 10, max_tokens=20)]
    pair = Pair(timeout_s=5.0)
    pair.add(*reqs)
    pair.step_src(3)
    return pair, reference(reqs)


def test_source_claims_first_keeps_the_request_and_the_parked_copy_is_dropped():
    pair, ref = setup_pair()
    arbiter = Arbiter()
    res, port = lossy_run(pair, arbiter)
    assert res.status == MigrationStatus.ABORTED_DST and port.aborts == 2  # the uncertain one, the best effort
    assert pair.src.seqs["x"].status == SeqStatus.RUNNING
    assert pair.dst.seqs["x"].status == SeqStatus.FROZEN  # parked, never run
    pair.step_src(2)  # the source runs on; the parked copy emits nothing
    pair.now = 6.0
    assert pair.dest.claims_due(pair.now, retry_s=1.0) == [("m", "x")]
    assert pair.dest.claims_due(pair.now, retry_s=1.0) == []  # in flight: not repeated at once
    assert pair.dest.settle("m", arbiter("m", Owner.DESTINATION)) is None  # the source won
    assert "x" not in pair.dst.seqs and not pair.dest.parked
    pair.assert_clean()
    assert pair.dst.blocks.num_free == 96
    assert pair.finish() == ref


def test_destination_claims_first_activates_and_the_source_frees():
    pair, ref = setup_pair()
    arbiter = Arbiter()
    m = SourceMigration("m", "x")
    port = LossyPort(pair.port)
    driver = MigrationDriver(pair.src, port, ownership=arbiter, claim_retry_s=0.0, sleep=lambda s: None)
    action = m.start()
    while not isinstance(action, p.ClaimOwnership):
        action = m.on(driver.execute(m, action))
    # The destination's timeout comes first: it claims and runs the request.
    pair.now = 6.0
    assert pair.dest.claims_due(pair.now, retry_s=1.0) == [("m", "x")]
    assert pair.dest.settle("m", arbiter("m", Owner.DESTINATION)) is not None
    assert pair.dst.seqs["x"].status == SeqStatus.RUNNING and pair.src.seqs["x"].status == SeqStatus.FROZEN
    while not isinstance(action, p.Done):
        action = m.on(driver.execute(m, action))
    assert action.status == MigrationStatus.FINISHED and "x" not in pair.src.seqs
    pair.assert_clean()
    assert pair.finish() == ref


def test_arbiter_unreachable_for_a_while_then_the_request_completes_exactly():
    pair, ref = setup_pair()
    arbiter = Arbiter(down=3)
    res, _ = lossy_run(pair, arbiter)
    assert arbiter.calls == 4 and res.status == MigrationStatus.ABORTED_DST
    assert pair.src.seqs["x"].status == SeqStatus.RUNNING
    pair.now = 6.0
    pair.dest.claims_due(pair.now, retry_s=1.0)
    pair.dest.settle("m", arbiter("m", Owner.DESTINATION))
    pair.assert_clean()
    assert pair.finish() == ref


def test_arbiter_unreachable_past_the_bound_keeps_the_request_frozen():
    """The source hands the claim to its llumlet core, which keeps claiming; nothing runs
    meanwhile on either side, and the first answer settles both."""
    pair, ref = setup_pair()
    clock = [0.0]
    arbiter = Arbiter(down=10 ** 6)
    port = LossyPort(pair.port)

    def sleep(s):
        clock[0] += 1.0

    driver = MigrationDriver(pair.src, port, clock=lambda: clock[0], ownership=arbiter, claim_timeout_s=3.0,
                             claim_retry_s=1.0, sleep=sleep)
    res = driver.run(SourceMigration("m", "x"))
    assert res.unresolved and res.status == MigrationStatus.ABORTED_DST
    assert pair.src.seqs["x"].status == SeqStatus.FROZEN and pair.dst.seqs["x"].status == SeqStatus.FROZEN
    # The source's llumlet core keeps the claim (and the request) until the arbiter answers.
    core = LlumletCore(LlumletConfig("s", transport="inproc", claim_retry_s=1.0), pair.src)
    core._reply_to["x"] = ""
    core.end_migration(res)
    assert core.held(["x"]) == ["x"] and not core.is_idle()
    assert core.claims_due(0.0) == [("m", Owner.SOURCE)] and core.claims_due(0.5) == []
    assert core.on_owner("m", Owner.SOURCE, None, 0.5) is False  # still unreachable: stays frozen
    assert core.claims_due(1.0) == [("m", Owner.SOURCE)]
    arbiter.down = 0
    owner = ask(arbiter, "m", Owner.SOURCE)
    assert owner is Owner.SOURCE and core.on_owner("m", Owner.SOURCE, owner, 1.0) is True
    assert pair.src.seqs["x"].status == SeqStatus.RUNNING
    pair.now = 6.0
    pair.dest.claims_due(pair.now, retry_s=1.0)
    assert pair.dest.settle("m", arbiter("m", Owner.DESTINATION)) is None
    pair.assert_clean()
    assert pair.finish() == ref


def test_an_abort_drops_a_parked_copy_and_resume_and_client_abort_cover_it():
    dst = engine(64)
    core = LlumletCore(LlumletConfig("d", transport="inproc", migration_timeout_s=5.0), dst)
    src = engine(64)
    for mid in ("m1", "m2", "m3"):
        x = f"x{mid}"
        src.add_request(req(x, 30, max_tokens=8))
        st_ = src.freeze(x)  # a waiting request: no KV to copy
        assert core.handle(wire.Commit(mid, st_), None, 0.0).ok
        assert core.held([x]) == [] and dst.seqs[x].status == SeqStatus.FROZEN and not core.is_idle()
        if mid == "m1":
            assert core.handle(wire.Abort(mid, "lost reply"), None, 0.0).ok  # parked: dropped, not committed
            assert x not in dst.seqs
        elif mid == "m2":
            assert core.resume(st_, 0.0) is True  # the source died: recomputed here instead
            assert dst.seqs[x].status == SeqStatus.WAITING and core.held([x]) == [x]
            assert not core.handle(wire.Activate(mid), None, 0.0).ok  # the parked copy is gone
            core.abort(x, 0.0)
        else:
            assert core.abort(x, 0.0) is True  # a client abort reaches the parked copy
            assert x not in dst.seqs
        assert not core.dest.parked and core.is_idle()
        dst.check_invariants()
        src.free_src(x)


def test_activation_makes_a_parked_copy_held_and_running():
    dst = engine(64)
    core = LlumletCore(LlumletConfig("d", transport="inproc"), dst)
    src = engine(64)
    src.add_request(req("x", 30, max_tokens=8))
    st_ = src.freeze("x")
    assert core.handle(wire.Commit("m", st_), None, 0.0).ok and not core.step_due()
    assert core.handle(wire.Activate("m"), None, 0.0).ok
    assert core.held(["x"]) == ["x"] and core.step_due() and core.stats.migrations_in == 1
    assert core.handle(wire.Abort("m", "late"), None, 0.0).is_already_committed


# ----------------------------------------------------------------------------- any loss, any order
class SelectiveLoss(LossyPort):
    def __init__(self, inner, commit_reply: bool, abort: bool, activate: bool) -> None:
        super().__init__(inner)
        self.lose = {"commit": commit_reply, "abort": abort, "activate": activate}

    def commit(self, mid, st):
        if self.lose["commit"]:
            return super().commit(mid, st)
        return self.inner.commit(mid, st)

    def activate(self, mid):
        if self.lose["activate"]:
            return super().activate(mid)
        return self.inner.activate(mid)

    def abort(self, mid, reason, attempts=3):
        if self.lose["abort"]:
            return super().abort(mid, reason, attempts)
        return self.inner.abort(mid, reason, attempts)



@settings(max_examples=40, deadline=None, derandomize=True)
@given(lose_commit=st.booleans(), lose_abort=st.booleans(), lose_activate=st.booleans(),
       dst_first=st.booleans(), down=st.integers(0, 4), steps=st.integers(0, 2))
def test_any_lost_messages_and_claim_order_serve_the_request_once(lose_commit, lose_abort, lose_activate,
                                                                  dst_first, down, steps):
    pair, ref = setup_pair()
    clock = [0.0]
    arbiter = Arbiter(down=down)

    def sleep(s):
        clock[0] += 1.0

    port = SelectiveLoss(pair.port, lose_commit, lose_abort, lose_activate)
    driver = MigrationDriver(pair.src, port, clock=lambda: clock[0], ownership=arbiter, claim_timeout_s=2.0,
                             claim_retry_s=1.0, sleep=sleep)
    m = SourceMigration("m", "x")
    action = m.start()

    def dst_claims() -> None:
        pair.now += 6.0
        for mid, _ in pair.dest.claims_due(pair.now, retry_s=0.0):
            while (owner := ask(arbiter, mid, Owner.DESTINATION)) is None:
                pass
            pair.dest.settle(mid, owner)

    while not isinstance(action, p.Done):
        if isinstance(action, p.ClaimOwnership) and dst_first:
            dst_claims()
        action = m.on(driver.execute(m, action))
    if m.unresolved:  # what the source's llumlet core does from its engine loop
        while (owner := ask(arbiter, "m", Owner.SOURCE)) is None:
            pass
        (pair.src.unfreeze if owner == Owner.SOURCE else pair.src.free_src)("x")
    pair.step_src(steps)  # the source runs on if it kept the request; a parked copy emits nothing
    dst_claims()
    holders = [e for e in (pair.src, pair.dst) if "x" in e.seqs]
    assert len(holders) == 1 and holders[0].seqs["x"].status != SeqStatus.FROZEN
    assert not pair.dest.parked
    pair.assert_clean()
    assert pair.finish() == ref  # consecutive indices: nothing emitted twice, nothing lost
