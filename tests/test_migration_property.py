"""Stateful property test of live migration between two in-process built-in engines.

Hypothesis interleaves engine steps on either side, new requests, aborts, preemptions,
and migrations (live, blocking, recompute; running or waiting requests) driven one
protocol action at a time through ``MigrationDriver.execute``, with a fault injected at
a chosen stage (refusal, transport error on pre-alloc/copy/commit, a commit whose reply
is lost, an abort that never arrives). After every rule:

- every unfinished request is owned by exactly one engine (a frozen request counts for
  its source until the destination commits it);
- both engines pass ``check_invariants``;
- with no migration in flight, no reservation is left, no request is frozen and no
  request is reported as migrating.

At teardown both engines run to completion and every request's tokens equal a run of
the same requests on one engine without migration (tiny model in float64: exact under
any batch composition; greedy and seeded sampling). Aborted requests got a prefix.
"""

from __future__ import annotations

from typing import Optional

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llumnix_py.engines.types import Request, SamplingParams, SeqStatus
from migration import protocol as p
from migration.destination import DestinationMigrations
from migration.driver import LocalPort, MigrationDriver
from migration.protocol import MigrationConfig, MigrationStatus, SourceMigration
from migration.transports.base import TransportError
from tests.factories import make_engine

BS = 4
NUM_BLOCKS = 40
TIMEOUT_S = 10.0
FAULTS = ["none", "none", "none", "refuse", "pre_alloc", "copy", "hold", "commit", "commit_lost", "abort_lost"]


def new_engine(num_blocks: int = NUM_BLOCKS):
    return make_engine("torch", num_blocks=num_blocks, block_size=BS, dtype="float64", watermark=0.0,
                       max_batch_size=8, max_model_len=200)


class FaultyPort:
    """A ``DestinationPort`` that fails once, as chosen: ``refuse`` (pre-alloc answered no),
    ``pre_alloc``/``copy``/``hold``/``commit`` (``TransportError`` on the ``nth`` such call),
    ``commit_lost`` (the commit goes through, its reply is lost), ``abort_lost`` (the abort
    never arrives: the destination must expire the reservation itself)."""

    def __init__(self, inner: LocalPort, fault: str, nth: int) -> None:
        self.inner = inner
        self.fault = fault
        self.nth = nth
        self.calls: dict[str, int] = {}
        self.abort_lost = False

    def _hit(self, op: str) -> bool:
        self.calls[op] = self.calls.get(op, 0) + 1
        return self.fault == op and self.calls[op] == self.nth

    def pre_alloc(self, mid, rid, n):
        if self._hit("pre_alloc"):
            raise TransportError("injected: pre_alloc")
        if self.fault == "refuse" and self.calls["pre_alloc"] == self.nth:
            return None, "injected refusal"
        return self.inner.pre_alloc(mid, rid, n)

    def copy(self, mid, src_ids, dst_ids):
        if self._hit("copy"):
            raise TransportError("injected: copy")
        return self.inner.copy(mid, src_ids, dst_ids)

    def hold(self, mid, hold_s):
        if self._hit("hold"):
            raise TransportError("injected: hold")
        return self.inner.hold(mid, hold_s)  # a bare DestinationMigrations refuses it: no loop to hold

    def commit(self, mid, state):
        self.calls["commit"] = self.calls.get("commit", 0) + 1
        if self.fault == "commit":
            raise TransportError("injected: commit")
        if self.fault == "commit_lost":
            ok, err = self.inner.commit(mid, state)
            if ok:
                raise TransportError("injected: commit reply lost")
            return ok, err
        return self.inner.commit(mid, state)

    def activate(self, mid):
        return self.inner.activate(mid)

    def abort(self, mid, reason):
        if self.fault == "abort_lost":
            self.abort_lost = True
            return False  # what TransportPort answers when the destination is unreachable
        return self.inner.abort(mid, reason)


class InFlight:
    def __init__(self, machine: SourceMigration, driver: MigrationDriver, src: str, dst: str, port: FaultyPort):
        self.machine = machine
        self.driver = driver
        self.src = src
        self.dst = dst
        self.port = port
        self.action: p.Action = machine.start()

    @property
    def committed(self) -> bool:
        """The destination owns the request (only the source's free is left)."""
        return isinstance(self.action, p.FreeSrc)


class MigrationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engines = {"A": new_engine(), "B": new_engine()}
        self.now = 0.0
        self.dests = {k: DestinationMigrations(e, max_incoming=1, timeout_s=TIMEOUT_S) for k, e in self.engines.items()}
        self.requests: dict[str, Request] = {}
        self.tokens: dict[str, list[int]] = {}
        self.finished: set[str] = set()
        self.aborted: set[str] = set()
        self.flight: Optional[InFlight] = None
        self.results: list[MigrationStatus] = []
        self.counter = 0

    # ----- helpers ---------------------------------------------------------------------
    def _record(self, out) -> None:
        for o in out.outputs:
            got = self.tokens.setdefault(o.request_id, [])
            assert o.index == len(got), f"{o.request_id}: index {o.index}, have {len(got)} (duplicate or gap)"
            assert o.request_id not in self.finished
            got.extend(o.new_token_ids)
            if o.finished:
                self.finished.add(o.request_id)

    def _live(self) -> list[str]:
        return sorted(r for r in self.requests if r not in self.finished and r not in self.aborted)

    def _port(self, src: str, dst: str) -> LocalPort:
        return LocalPort(self.dests[dst], self.engines[src], now=lambda: self.now)

    def _finish_flight(self, done: p.Done) -> None:
        f = self.flight
        assert f is not None
        self.results.append(done.status)
        if f.port.abort_lost and self.dests[f.dst].incoming:
            # the source is gone from the destination's point of view: it expires the reservation
            self.now += TIMEOUT_S + 1
            expired = self.dests[f.dst].expire(self.now)
            assert expired == [f.machine.migration_id]
        if done.status == MigrationStatus.FINISHED:
            assert f.machine.request_id not in self.engines[f.src].seqs
        self.flight = None

    def _advance(self) -> None:
        f = self.flight
        assert f is not None
        event = f.driver.execute(f.machine, f.action)
        f.action = f.machine.on(event)
        if isinstance(f.action, p.Done):
            self._finish_flight(f.action)

    # ----- rules -----------------------------------------------------------------------
    @initialize(n=st.integers(1, 4), steps=st.integers(0, 3), salt=st.integers(0, 2**16))
    def some_running_requests(self, n, steps, salt):
        for i in range(n):
            self.add_request("A", 8 + 9 * i, 12, i % 2 == 1, salt + i)
        self.step("A", steps)

    @rule(where=st.sampled_from(["A", "B"]), prompt_len=st.integers(3, 48), max_tokens=st.integers(2, 24),
          seeded=st.booleans(), salt=st.integers(0, 2**16))
    def add_request(self, where, prompt_len, max_tokens, seeded, salt):
        rid = f"q{self.counter}"
        self.counter += 1
        prompt = tuple((salt * 31 + i * 17) % 319 + 1 for i in range(prompt_len))
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.9 if seeded else 0.0,
                            top_p=0.95 if seeded else 1.0, seed=salt if seeded else None)
        r = Request(rid, prompt, sp, arrival_time=float(self.counter))
        self.requests[rid] = r
        self.engines[where].add_request(r)

    @rule(where=st.sampled_from(["A", "B"]), n=st.integers(0, 3))
    def step(self, where, n):
        for _ in range(n):
            self._record(self.engines[where].step())

    @rule(pick=st.integers(0, 10_000))
    def abort(self, pick):
        cands = []
        for e in self.engines.values():
            cands += [r for r, s in e.seqs.items() if s.status != SeqStatus.FROZEN]
        if not cands:
            return
        rid = sorted(cands)[pick % len(cands)]
        for e in self.engines.values():
            # A frozen copy (the source's, between activation and its free) is not aborted
            # directly: the llumlet defers an abort of a migrating request to the migration's end.
            if rid in e.seqs and e.seqs[rid].status != SeqStatus.FROZEN:
                e.abort_request(rid)
        self.aborted.add(rid)

    @rule(where=st.sampled_from(["A", "B"]), pick=st.integers(0, 10_000))
    def preempt(self, where, pick):
        e = self.engines[where]
        running = list(e.scheduler.running)
        if running:
            e.scheduler.preempt(running[pick % len(running)])

    @precondition(lambda self: self.flight is None)
    @rule(src=st.sampled_from(["A", "B"]), pick=st.integers(0, 10_000),
          mode=st.sampled_from(["live", "live", "blocking", "recompute"]), max_stages=st.integers(1, 4),
          last=st.integers(0, 4), fault=st.sampled_from(FAULTS), nth=st.integers(1, 3))
    def start_migration(self, src, pick, mode, max_stages, last, fault, nth):
        e = self.engines[src]
        cands = sorted(r for r, s in e.seqs.items() if s.status in (SeqStatus.RUNNING, SeqStatus.WAITING))
        if not cands:
            return
        rid = cands[pick % len(cands)]
        dst = "B" if src == "A" else "A"
        waiting = e.seqs[rid].status == SeqStatus.WAITING
        cfg = MigrationConfig(max_stages=max_stages, last_stage_max_blocks=last, mode=mode)
        port = FaultyPort(self._port(src, dst), fault, nth)
        m = SourceMigration(f"m{self.counter}-{rid}", rid, waiting=waiting, config=cfg)
        self.counter += 1
        self.flight = InFlight(m, MigrationDriver(e, port), src, dst, port)

    @precondition(lambda self: self.flight is not None)
    @rule(n=st.integers(1, 4))
    def advance_migration(self, n):
        for _ in range(n):
            if self.flight is None:
                break
            self._advance()

    @precondition(lambda self: self.flight is not None)
    @rule()
    def run_migration_to_end(self):
        while self.flight is not None:
            self._advance()

    # ----- invariants ------------------------------------------------------------------
    @invariant()
    def each_request_has_one_owner(self):
        f = self.flight
        for rid in self._live():
            holders = [k for k, e in self.engines.items() if rid in e.seqs]
            if len(holders) == 2:
                # Between the destination's commit and the source's free_src (a lost commit reply
                # takes the abort path to learn of it), the source holds a frozen copy.
                committed = f is not None and (f.committed or f.machine.migration_id in self.dests[f.dst].committed)
                assert f is not None and f.machine.request_id == rid and committed, (rid, holders)
                assert self.engines[f.src].seqs[rid].status == SeqStatus.FROZEN
                holders = [f.dst]
            assert len(holders) == 1, f"{rid} is held by {holders}"
        in_flight = {f.machine.request_id} if f is not None else set()
        for e in self.engines.values():
            assert set(e.seqs) <= set(self._live()) | in_flight

    @invariant()
    def engines_consistent(self):
        for e in self.engines.values():
            e.check_invariants()

    @invariant()
    def nothing_left_behind_without_migration(self):
        if self.flight is not None:
            return
        for k, e in self.engines.items():
            assert not self.dests[k].incoming, f"{k}: incoming {self.dests[k].incoming}"
            load = e.load()
            assert load.reserved_blocks == 0
            assert not e._prealloc
            assert all(s.status != SeqStatus.FROZEN for s in e.seqs.values())
            assert not any(r.migrating for r in load.running + load.waiting), "a request stays marked migrating"

    # ----- teardown --------------------------------------------------------------------
    def teardown(self):
        while self.flight is not None:
            self._advance()
        self.nothing_left_behind_without_migration()
        for _ in range(2000):
            if not any(e.has_unfinished() for e in self.engines.values()):
                break
            for e in self.engines.values():
                self._record(e.step())
                e.check_invariants()
        for k, e in self.engines.items():
            assert not e.seqs and e.blocks.num_free == NUM_BLOCKS, k
        ref = new_engine(num_blocks=1024)
        ref_tokens: dict[str, list[int]] = {}
        for rid, r in self.requests.items():
            ref.add_request(r)
        while ref.has_unfinished():
            for o in ref.step().outputs:
                ref_tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        for rid in self.requests:
            got = self.tokens.get(rid, [])
            if rid in self.aborted:
                assert got == ref_tokens[rid][:len(got)], rid
            else:
                assert rid in self.finished, rid
                assert got == ref_tokens[rid], f"{rid}: tokens differ from the run without migration"


MigrationMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
TestMigrationMachine = MigrationMachine.TestCase
