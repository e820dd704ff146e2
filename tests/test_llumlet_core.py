"""The sans-IO llumlet core: events in with ``now`` passed in, actions out; no threads.

Unit tests over the simulated engine (scheduling only, fast), and a hypothesis state
machine over two cores that interleaves requests, steps, aborts, lease expiry, role changes and
migrations (started, advanced action by action, finished); invariants: every request
is in exactly one place, every block is owned once, and a request a decode instance
holds never runs.
"""

from __future__ import annotations

import contextlib

from typing import Optional

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llumnix_py.engines.types import FinishReason, MigrationRequestState, Request, SamplingParams, SeqStatus
from llumnix_py.errors import InvalidRequestError
from llumnix_py.llumlet_core import LlumletCore
from llumnix_py.llumlet_types import LlumletConfig
from migration import protocol as p
from migration import wire
from migration.driver import LocalPort, MigrationDriver, MigrationResult
from migration.protocol import MigrationConfig, MigrationStatus, SourceMigration
from tests.factories import make_engine

FRONTEND = "local://frontend-a"


def make_core(iid: str = "i0", num_blocks: int = 64, lease_s: Optional[float] = 5.0, **kw) -> LlumletCore:
    engine = make_engine("sim", num_blocks=num_blocks, max_batch_size=8)
    return LlumletCore(LlumletConfig(iid, transport="inproc", lease_timeout_s=lease_s, **kw), engine)


def request(rid: str, n: int = 20, max_tokens: int = 8, reply_to: str = FRONTEND) -> Request:
    return Request(rid, tuple(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   reply_to=reply_to)


def run_migration(src: LlumletCore, dst: LlumletCore, rid: str, mid: str, now: float = 0.0) -> MigrationResult:
    assert src.begin_migration(rid, mid)
    driver = MigrationDriver(src.engine, LocalPort(dst, src.engine, now=lambda: now), clock=lambda: now)
    result = driver.run(SourceMigration(mid, rid, config=MigrationConfig()))
    src.end_migration(result)
    return result


def test_submitted_requests_wait_in_the_inbox_and_count_as_waiting_until_admitted():
    core = make_core()
    core.submit(request("r0"))
    assert core.has_inbox() and core.has_request("r0") and not core.step_due()
    assert [r.request_id for r in core.load(core.engine.load()).waiting] == ["r0"]
    with pytest.raises(InvalidRequestError):
        core.submit(request("r0"))
    assert core.admit(now=0.0) == {}
    assert not core.has_inbox() and core.step_due()


def test_a_step_routes_outputs_to_their_frontends_and_forgets_finished_requests():
    core = make_core()
    core.submit(request("a", max_tokens=2, reply_to="fe-1"))
    core.submit(request("b", max_tokens=2, reply_to="fe-2"))
    core.admit(0.0)
    seen: dict[str, list[str]] = {}
    while core.step_due():
        out, groups = core.step()
        core.on_published(out)
        for target, outs in groups.items():
            seen.setdefault(target, []).extend(o.request_id for o in outs)
    assert set(seen) == {"fe-1", "fe-2"}
    assert set(seen["fe-1"]) == {"a"} and set(seen["fe-2"]) == {"b"}
    assert core.held(["a", "b"]) == [] and core.is_idle()
    assert core.stats.tokens == 4 and core.stats.steps >= 2


def test_the_load_carries_the_engines_busy_seconds_and_preemptions():
    core = make_core(num_blocks=8)  # 4 prompts of 2 blocks each fill it: their growth preempts
    assert core.load(core.engine.load()).busy_s == 0 and core.load(core.engine.load()).preemptions == 0
    for i in range(4):
        core.submit(request(f"r{i}", n=30, max_tokens=40))
    core.admit(0.0)
    while core.step_due():
        core.on_published(core.step()[0])
    load = core.load(core.engine.load())
    assert core.stats.preemptions >= 1 and core.stats.busy_s > 0
    assert (load.busy_s, load.preemptions) == (core.stats.busy_s, core.stats.preemptions)


def test_a_step_without_routing_still_forgets_finished_requests():
    core = make_core()
    core.submit(request("a", max_tokens=1))
    core.admit(0.0)
    out, groups = core.step(route=False)
    assert groups == {} and [o.finish_reason for o in out.outputs] == [FinishReason.LENGTH]
    assert core.held(["a"]) == []


def test_a_lapsed_lease_aborts_its_requests_and_a_renewed_one_does_not():
    core = make_core(lease_s=1.0)
    core.submit(request("gone", max_tokens=100, reply_to="fe-gone"))
    core.submit(request("alive", max_tokens=100, reply_to="fe-alive"))
    core.admit(now=0.0)
    core.step()
    assert core.on_timer(now=0.5) == {}
    core.renew_lease("fe-alive", now=0.9)
    lapsed = core.on_timer(now=1.5)
    assert list(lapsed) == ["fe-gone"]
    assert [(o.request_id, o.finish_reason) for o in lapsed["fe-gone"]] == [("gone", FinishReason.ABORT)]
    assert core.held(["gone", "alive"]) == ["alive"] and core.stats.lease_aborts == 1


def test_an_abort_is_remembered_and_refuses_a_migration_bringing_the_request_in():
    src, dst = make_core("src"), make_core("dst")
    src.submit(request("r"))
    src.admit(0.0)
    src.step()
    assert dst.abort("r", now=0.0) is False  # not there, but remembered
    result = run_migration(src, dst, "r", "m1")
    assert result.status == MigrationStatus.ABORTED_DST
    assert src.held(["r"]) == ["r"] and not dst.dest.incoming
    with pytest.raises(InvalidRequestError):
        dst.resume(waiting_state("r"), now=0.0)


def waiting_state(rid: str, delivered: tuple[int, ...] = ()) -> MigrationRequestState:
    """A request to resume by recomputation, with the tokens already delivered."""
    return MigrationRequestState(rid, tuple(range(3, 23)), delivered, SamplingParams(max_tokens=8, ignore_eos=True),
                                 0, 0.0, 0, SeqStatus.WAITING, 0, reply_to=FRONTEND)


def test_a_migration_moves_the_request_and_its_frontend_to_the_destination():
    src, dst = make_core("src"), make_core("dst")
    src.submit(request("r", max_tokens=30))
    src.admit(0.0)
    for _ in range(3):
        src.step()
    result = run_migration(src, dst, "r", "m1")
    assert result.status == MigrationStatus.FINISHED, result.reason
    assert src.held(["r"]) == [] and dst.held(["r"]) == ["r"]
    assert dst.stats.migrations_in == 1 and src.stats.migrations == {"finished": 1}
    out, groups = dst.step()
    assert list(groups) == [FRONTEND] and out.outputs[0].request_id == "r"


def test_migrations_out_are_bounded_and_one_per_request():
    core = make_core(max_outgoing=1)
    for rid in ("a", "b"):
        core.submit(request(rid))
    core.admit(0.0)
    assert not core.begin_migration("nowhere", "m0")
    assert core.begin_migration("a", "m1")
    assert not core.begin_migration("a", "m2")  # already migrating
    assert not core.begin_migration("b", "m3")  # max_outgoing reached
    assert core.begin_migration("b", "m3", bounded=False)  # a caller that runs it itself


def test_a_request_still_in_the_inbox_leaves_as_a_waiting_request():
    """A migration ordered for a request the engine has not admitted yet (its loop is
    mid-step or held) admits it first and moves it queued: prefilled on the destination
    only, once, with every token; nothing stays on the source."""
    src, dst = make_core("src"), make_core("dst")
    src.submit(request("r", max_tokens=6))
    assert not src.begin_migration("r", "m0")  # without ``now``: not admitted, not migrated
    assert src.begin_migration("r", "m1", now=1.0)
    assert not src.has_inbox() and [r.request_id for r in src.engine.load().waiting] == ["r"]
    driver = MigrationDriver(src.engine, LocalPort(dst, src.engine, now=lambda: 1.0), clock=lambda: 1.0)
    result = driver.run(SourceMigration("m1", "r", waiting=True, config=MigrationConfig()))
    src.end_migration(result)
    assert result.status == MigrationStatus.FINISHED, result.reason
    assert src.held(["r"]) == [] and src.engine.load().used_blocks == 0 and not src.step_due()
    assert dst.held(["r"]) == ["r"]
    tokens = []
    while dst.step_due():
        out, _ = dst.step()
        tokens += [t for o in out.outputs for t in o.new_token_ids]
    assert len(tokens) == 6 and dst.engine.load().used_blocks == 0


def test_a_request_aborted_while_migrating_out_is_aborted_when_its_migration_fails():
    core = make_core()
    core.submit(request("r", max_tokens=50))
    core.admit(0.0)
    core.step()
    assert core.begin_migration("r", "m1")
    assert core.abort("r", now=1.0) is True
    assert core.held(["r"]) == ["r"]  # still migrating
    core.end_migration(MigrationResult("m1", "r", MigrationStatus.ABORTED_DST, "x", "live", 0, 0, 0.0, 0.0))
    assert core.held(["r"]) == [] and "r" not in core.engine.seqs


def test_a_crashed_core_serves_no_migration_message():
    core = make_core()
    core.crash()
    reply = core.handle(wire.PreAlloc("m1", "r", 2), None, 0.0)
    assert core.dead and not reply.ok and "crashed" in (reply.error or "")


def test_resume_recomputes_a_request_and_refuses_a_duplicate():
    core = make_core()
    state = waiting_state("r", delivered=(5, 6))
    assert core.resume(state, now=0.0) is True
    assert core.resume(state, now=0.0) is False
    out, groups = core.step()
    assert groups[FRONTEND][0].index == 2  # continues after the tokens already delivered


# ----- interleavings ---------------------------------------------------------------------------------
class TwoCores(RuleBasedStateMachine):
    """Two cores over small sim engines; migrations advance one action at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.cores = {i: make_core(i, num_blocks=40, lease_s=3.0, max_outgoing=2, max_incoming=2)
                      for i in ("a", "b")}
        self.n = 0
        self.flights: list[tuple[str, str, SourceMigration, MigrationDriver, p.Action]] = []
        self.finished: set[str] = set()

    def _other(self, iid: str) -> str:
        return "b" if iid == "a" else "a"

    @rule(where=st.sampled_from("ab"), n=st.integers(1, 60), max_tokens=st.integers(1, 30), fe=st.sampled_from("xy"))
    def add(self, where, n, max_tokens, fe):
        self.n += 1
        self.cores[where].submit(request(f"r{self.n}", n=n, max_tokens=max_tokens, reply_to=fe))

    @rule(where=st.sampled_from("ab"))
    def step(self, where):
        core = self.cores[where]
        core.admit(self.now)
        if core.step_due():
            out, groups = core.step()
            for outs in groups.values():
                self.finished |= {o.request_id for o in outs if o.finished}
        core.on_timer(self.now)

    @rule(dt=st.floats(0.1, 2.0))
    def time_passes(self, dt):
        self.now += dt

    @rule(fe=st.sampled_from("xy"))
    def renew(self, fe):
        for core in self.cores.values():
            core.renew_lease(fe, self.now)

    @rule(pick=st.integers(0, 10_000))
    def abort(self, pick):
        if self.n:
            rid = f"r{pick % self.n + 1}"
            for core in self.cores.values():
                core.abort(rid, self.now)

    @rule(src=st.sampled_from("ab"), pick=st.integers(0, 10_000))
    def start_migration(self, src, pick):
        core = self.cores[src]
        here = sorted(core.engine.seqs)
        if not here:
            return
        rid = here[pick % len(here)]
        mid = f"m{self.n}-{pick}"
        if not core.begin_migration(rid, mid):
            return
        dst = self.cores[self._other(src)]
        driver = MigrationDriver(core.engine, LocalPort(dst, core.engine, now=lambda: self.now),
                                 clock=lambda: self.now)
        machine = SourceMigration(mid, rid, config=MigrationConfig(max_stages=3, last_stage_max_blocks=1))
        self.flights.append((src, rid, machine, driver, machine.start()))

    @precondition(lambda self: self.flights)
    @rule(k=st.integers(0, 100), actions=st.integers(1, 4))
    def advance_migration(self, k, actions):
        i = k % len(self.flights)
        src, rid, machine, driver, action = self.flights[i]
        for _ in range(actions):
            if isinstance(action, p.Done):
                break
            action = machine.on(driver.execute(machine, action))
        if isinstance(action, p.Done):
            del self.flights[i]
            self.cores[src].end_migration(MigrationResult(machine.migration_id, rid, machine.status, machine.reason,
                                                          "live", machine.stages, machine.blocks_sent, 0.0, 0.0))
        else:
            self.flights[i] = (src, rid, machine, driver, action)

    @invariant()
    def every_request_is_in_exactly_one_place(self):
        ids = [f"r{k}" for k in range(1, self.n + 1)]
        tracked = {i: set(c.held(ids)) for i, c in self.cores.items()}
        frozen = {rid for _, rid, m, _, _ in self.flights if m.frozen}
        both = tracked["a"] & tracked["b"]
        assert both <= frozen, both  # on both sides only between the commit and the source's release
        assert not (tracked["a"] | tracked["b"]) & self.finished - frozen, "a finished request is still tracked"
        for iid, core in self.cores.items():
            queued = {r.request_id for r in core._inbox}
            in_engine = set(core.engine.seqs)
            reserved = {rec.request_id for rec in core.dest.incoming.values()}
            reserved |= {rec.request_id for rec in core.dest.parked.values()}  # committed, not activated: not held
            assert tracked[iid] <= in_engine | queued, tracked[iid] - in_engine - queued
            assert in_engine - reserved <= tracked[iid], in_engine - reserved - tracked[iid]
            assert not queued & in_engine

    @rule(where=st.sampled_from("ab"), role=st.sampled_from(["both", "decode", "prefill"]))
    def set_role(self, where, role):
        self.cores[where].set_role(role, self.now)

    @invariant()
    def a_held_request_waits_and_the_engine_holds_what_the_core_holds(self):
        for core in self.cores.values():
            held = core.held_prefills()
            assert core.engine.scheduler.held == held
            assert not held & {s.request_id for s in core.engine.scheduler.running}
            if core.role.value != "decode":
                assert not held

    @invariant()
    def every_block_is_owned_once(self):
        for core in self.cores.values():
            core.engine.check_invariants()

    def teardown(self):
        while self.flights:
            self.advance_migration(0, 100)
        for core in self.cores.values():
            for rid in list(core.engine.seqs):
                core.abort(rid, self.now)
            core.dest.abort_all()
            assert core.engine.blocks.num_free == core.engine.config.num_blocks


TestTwoCores = TwoCores.TestCase
TestTwoCores.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                 suppress_health_check=[HealthCheck.too_slow])


def test_a_hold_keeps_steps_off_until_its_migration_aborts_or_its_deadline_capped_by_the_destination():
    dst = make_core("dst", max_step_hold_s=0.1)
    refused = dst.handle(wire.Hold("m1", 0.05), None, now=0.0)
    assert not refused.ok and "no incoming migration" in refused.error  # nothing to tie it to
    assert dst.holding(0.0) is None
    assert dst.handle(wire.PreAlloc("m1", "r", 2), None, now=0.0).ok
    assert dst.handle(wire.Hold("m1", 0.5), None, now=1.0).ok
    assert dst.holding(1.0) == pytest.approx(1.1)  # the destination's cap, not the 0.5 asked
    assert dst.holding(1.0999) == pytest.approx(1.1)
    assert dst.holding(1.1) is None  # the deadline: steps resume even if the source went silent
    assert dst.handle(wire.Hold("m1", 0.05), None, now=2.0).ok  # a later hold replaces it
    assert dst.holding(2.0) == pytest.approx(2.05)
    assert dst.handle(wire.Abort("m1", "source gave up"), None, now=2.01).ok
    assert dst.holding(2.01) is None  # the migration is gone: so is its hold
    assert dst.engine.load().reserved_blocks == 0


def test_a_hold_lasts_through_the_commit_and_ends_with_the_activation():
    src, dst = make_core("src"), make_core("dst")
    src.submit(request("r", n=40, max_tokens=30))
    src.admit(0.0)
    for _ in range(3):
        src.step()
    assert src.begin_migration("r", "m1")
    machine = SourceMigration("m1", "r", config=MigrationConfig(commit_hold_s=0.05))
    driver = MigrationDriver(src.engine, LocalPort(dst, src.engine, now=lambda: 0.0), clock=lambda: 0.0)
    held_at: dict[str, Optional[float]] = {}
    action = machine.start()
    while not isinstance(action, p.Done):
        held_at[type(action).__name__] = dst.holding(0.0)
        action = machine.on(driver.execute(machine, action))
    assert machine.status == MigrationStatus.FINISHED, machine.reason
    assert held_at["HoldDestination"] is None  # asked for just before the freeze
    assert held_at["Freeze"] == held_at["Commit"] == held_at["Activate"] == pytest.approx(0.05)
    assert held_at["FreeSrc"] is None and dst.holding(0.0) is None  # activated: it runs there


def test_a_hold_idles_for_the_source_s_freeze_at_most_part_of_a_step_here():
    """``wire.Hold.freeze_in_s``: the destination waits for the source's freeze at its step
    boundary only if that freeze comes within ``hold_wait_fraction`` of its own latest step
    (before any step, ``max_step_hold_s``); otherwise it refuses and steps on, instead of
    idling and then lapsing anyway. A held hold lasts to the freeze plus the stop-and-copy."""
    dst = make_core("dst", max_step_hold_s=0.1)  # hold_wait_fraction 0.5
    assert dst.handle(wire.PreAlloc("m1", "r", 2), None, now=0.0).ok
    assert dst.hold(wire.Hold("m1", 0.05, 0.08), 1.0).ok  # no step measured yet: waits up to 0.1 s
    assert dst.holding(1.0) == pytest.approx(1.0 + 0.08 + 0.05)
    late = dst.hold(wire.Hold("m1", 0.05, 0.2), 2.0)
    assert not late.ok and "steps on" in late.error and dst.holding(2.0) is None

    dst.stats.last_step_ms = 200.0  # its steps take 200 ms: it idles 100 ms at most for a freeze
    msg = wire.Hold("m1", 0.05, 0.15)  # arrives mid-step at 3.0; the source freezes at 3.15
    assert dst.hold(msg, 3.0, boundary=False).ok
    assert dst.holding(3.01) is not None  # no step starts before the decision at the boundary
    assert dst.hold(msg, 3.08, arrived=3.0).ok  # its step ended at 3.08: 70 ms to wait
    assert dst.holding(3.08) == pytest.approx(3.15 + 0.05)
    msg = wire.Hold("m1", 0.05, 0.3)
    assert dst.hold(msg, 4.0, boundary=False).ok
    refused = dst.hold(msg, 4.05, arrived=4.0)  # 250 ms to the freeze at the boundary: not worth it
    assert not refused.ok and "250.0 ms" in refused.error and dst.holding(4.05) is None
    assert dst.hold(wire.Hold("m1", 0.5), 5.0).ok  # a source already between steps: as before
    assert dst.holding(5.0) == pytest.approx(5.1)  # capped by max_step_hold_s
    msg = wire.Hold("m1", 0.05, 0.02, 0.06)  # freeze due at 6.02; the source's steps take 60 ms
    assert dst.hold(msg, 6.0, boundary=False).ok
    assert dst.hold(msg, 6.1, arrived=6.0).ok  # answered after 6.02: the source freezes at 6.14, its next boundary
    assert dst.holding(6.1) == pytest.approx(6.14 + 0.05)

    never = make_core("never", max_step_hold_s=0.1, hold_wait_fraction=0.0)
    never.stats.last_step_ms = 200.0
    assert never.handle(wire.PreAlloc("m1", "r", 2), None, now=0.0).ok
    assert not never.hold(wire.Hold("m1", 0.05, 0.01), 1.0).ok  # waits for no freeze
    assert never.hold(wire.Hold("m1", 0.05), 1.0).ok  # a freeze due now
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="hold_wait_fraction"):
            LlumletConfig("x", transport="inproc", hold_wait_fraction=bad)


def test_a_source_frozen_for_its_stop_and_copy_tells_a_second_hold_it_is_at_a_standstill():
    """A hold refused while the source still stepped is asked again once the request is frozen
    (``SourceMigration.hold_refused``). The source's steps are held then (``held_out``), so it
    says its steps take 0 s: the destination, answering at the end of its own step, must not
    expect the source's freeze a source step later, and holds."""
    from llumnix_py.llumlet_migration import LockedSource
    from migration.driver import _hold

    src = make_core("src", max_step_hold_s=0.1)
    src.submit(request("r", n=40, max_tokens=30))
    src.admit(0.0)
    src.step()
    src.stats.last_step_ms = 60.0
    assert src.begin_migration("r", "m1")
    clock = [1.0]
    source = LockedSource(src, contextlib.nullcontext, 0.05, lambda: clock[0])
    assert source.step_s() == pytest.approx(0.06) and not src.held_out(1.0)  # stepping: its steps' length
    assert source.freeze("r") is not None  # frozen, and its steps held
    assert src.held_out(1.0) and source.step_s() == 0.0
    hold = _hold(source, "m1", 0.05)
    assert (hold.freeze_in_s, hold.source_step_s) == (0.0, 0.0)

    dst = make_core("dst", max_step_hold_s=0.1)
    dst.stats.last_step_ms = 10.0  # idles 5 ms at most for a freeze
    assert dst.handle(wire.PreAlloc("m1", "r", 2), None, now=0.0).ok
    assert dst.hold(hold, 1.0, boundary=False).ok
    assert dst.hold(hold, 1.009, arrived=1.0).ok  # answered 9 ms later, at its boundary: held
    assert dst.holding(1.009) == pytest.approx(1.009 + 0.05)
    # the same late answer to a source still stepping every 60 ms would expect its freeze at 1.06: refused
    stepping = wire.Hold("m1", 0.05, 0.0, 0.06)
    assert dst.hold(stepping, 1.0, boundary=False).ok
    assert not dst.hold(stepping, 1.009, arrived=1.0).ok
    clock[0] = 1.2  # the hold out lapsed: the source steps again
    assert not src.held_out(1.2) and source.step_s() == pytest.approx(0.06)


def test_holds_are_refused_when_off_or_crashed_and_the_cap_is_validated():
    off = make_core("off", max_step_hold_s=0.0)
    assert off.handle(wire.PreAlloc("m1", "r", 1), None, now=0.0).ok
    reply = off.handle(wire.Hold("m1", 0.05), None, now=0.0)
    assert not reply.ok and "does not hold" in reply.error and off.holding(0.0) is None
    dead = make_core("dead")
    assert dead.handle(wire.PreAlloc("m1", "r", 1), None, now=0.0).ok
    dead.crash()
    assert not dead.hold(wire.Hold("m1", 0.05), 0.0).ok and dead.holding(0.0) is None
    for bad in (-0.1, p.MAX_HOLD_S + 1):
        with pytest.raises(ValueError, match="max_step_hold_s"):
            LlumletConfig("x", transport="inproc", max_step_hold_s=bad)


def test_a_request_frozen_for_its_stop_and_copy_holds_the_source_until_released_or_its_migration_ends():
    src = make_core("src", max_step_hold_s=0.1)
    src.submit(request("r", n=40, max_tokens=30))
    src.admit(0.0)
    src.step()
    src.hold_out("r", 0.05, now=0.0)
    assert src.holding(0.0) is None  # not migrating: nothing to hold for
    assert src.begin_migration("r", "m1")
    src.hold_out("r", 0.5, now=1.0)
    assert src.holding(1.0) == pytest.approx(1.1)  # capped by max_step_hold_s
    assert src.holding(1.1) is None  # the deadline
    src.hold_out("r", 0.05, now=2.0)
    src.release_out("r")  # freed or unfrozen
    assert src.holding(2.0) is None
    src.hold_out("r", 0.05, now=3.0)
    src.end_migration(MigrationResult("m1", "r", MigrationStatus.ABORTED_DST, "refused", "live", 0, 0, 0.0, 0.0))
    assert src.holding(3.0) is None  # the migration ended: so did its hold
