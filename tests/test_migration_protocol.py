"""The live-migration state machine (``migration.protocol``) with scripted events, and the
driver/destination pair over two in-process engines: every stage, every mode, every abort.

Engine-level tests use the tiny model in float64, so tokens are exact whatever the batch
composition, and compare each request's tokens with a run without migration.
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

from llumnix_py.engines.types import MigrationRequestState, Request, SamplingParams, SeqStatus
from migration import protocol as p
from migration import wire
from migration.destination import DestinationMigrations
from migration.driver import LocalPort, MigrationDriver, TransportPort
from migration.protocol import MigrationConfig, MigrationMode, MigrationStatus, SourceMigration
from migration.transports import get_transport
from migration.transports.base import TransportError
from tests.factories import RunResult, make_engine, run_engines

BS = 4  # small blocks: many blocks per request, so stages have something to copy


# ----------------------------------------------------------------------------- helpers
def state(rid: str = "r", status: SeqStatus = SeqStatus.RUNNING, computed: int = 9) -> MigrationRequestState:
    return MigrationRequestState(rid, tuple(range(1, 9)), (5, 6), SamplingParams(max_tokens=8), 0, 0.0, 0,
                                 status, computed if status == SeqStatus.RUNNING else 0)


def ids(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b))


def engine(num_blocks: int = 96, **kw):
    return make_engine("torch", num_blocks=num_blocks, block_size=BS, dtype="float64", watermark=0.0, **kw)


def req(rid: str, prompt_len: int, max_tokens: int = 24, seeded: bool = False, arrival: float = 0.0) -> Request:
    prompt = tuple((7 * i + len(rid) * 13 + sum(map(ord, rid))) % 300 + 1 for i in range(prompt_len))
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.8 if seeded else 0.0,
                        top_p=0.9 if seeded else 1.0, seed=11 if seeded else None)
    return Request(rid, prompt, sp, arrival_time=arrival)


def reference(requests: list[Request], num_blocks: int = 256) -> dict[str, list[int]]:
    e = engine(num_blocks)
    return run_engines([e], requests=list(requests)).tokens


def to_freeze(m: SourceMigration, event: p.Event) -> p.Action:
    """``m.on(event)``, through the destination hold that precedes a live stop-and-copy."""
    a = m.on(event)
    if isinstance(a, p.HoldDestination):
        a = m.on(p.HoldReplied(True))
    return a


def precopied(config: Optional[MigrationConfig] = None) -> SourceMigration:
    """A live source machine after one pre-copy stage of 8 blocks, about to stop-and-copy."""
    m = SourceMigration("m", "r", config=config or MigrationConfig())
    m.start()
    m.on(p.BlocksQueried(ids(0, 8)))
    m.on(p.PreAllocated(ids(0, 8)))
    m.on(p.Copied(True))
    return m


def owners(e) -> dict:
    return dict(e.blocks.owners())


def step(e, n: int = 1, into: Optional[dict] = None) -> None:
    for _ in range(n):
        out = e.step()
        if into is not None:
            for o in out.outputs:
                got = into.setdefault(o.request_id, [])
                assert o.index == len(got)
                got.extend(o.new_token_ids)
        e.check_invariants()


class Pair:
    """Source and destination engines, the destination's bookkeeping, and the tokens seen so far."""

    def __init__(self, src_blocks: int = 96, dst_blocks: int = 96, max_incoming: int = 1, timeout_s: float = 10.0):
        self.src = engine(src_blocks)
        self.dst = engine(dst_blocks)
        self.now = 0.0
        self.dest = DestinationMigrations(self.dst, max_incoming=max_incoming, timeout_s=timeout_s)
        self.port = LocalPort(self.dest, self.src, now=lambda: self.now)
        self.tokens: dict[str, list[int]] = {}

    def add(self, *requests: Request) -> None:
        for r in requests:
            self.src.add_request(r)

    def step_src(self, n: int = 1) -> None:
        step(self.src, n, self.tokens)

    def driver(self, port=None) -> MigrationDriver:
        return MigrationDriver(self.src, port or self.port)

    def drive(self, m: SourceMigration, before: Optional[Callable[[p.Action], None]] = None, port=None,
              ) -> tuple[p.Done, list[p.Action]]:
        """Execute ``m`` one action at a time; ``before(action)`` runs before each action is carried out."""
        d = self.driver(port)
        action = m.start()
        seen = [action]
        while not isinstance(action, p.Done):
            if before is not None:
                before(action)
            action = m.on(d.execute(m, action))
            seen.append(action)
        return action, seen

    def finish(self) -> dict[str, list[int]]:
        res = run_engines([self.src, self.dst], result=RunResult(tokens={r: list(t) for r, t in self.tokens.items()}))
        self.tokens = res.tokens
        return self.tokens

    def assert_clean(self) -> None:
        assert not self.dest.incoming
        assert self.dst.load().reserved_blocks == 0
        self.src.check_invariants()
        self.dst.check_invariants()


# ============================================================================= scripted machine
class TestScripted:
    def test_live_happy_path_stage_counts(self):
        m = SourceMigration("m", "r", config=MigrationConfig(max_stages=3, last_stage_max_blocks=4))
        assert m.start() == p.QueryBlocks(0, include_last=False)
        assert m.on(p.BlocksQueried(ids(0, 100))) == p.PreAllocate(100)
        a = m.on(p.PreAllocated(ids(200, 300)))
        assert a == p.CopyBlocks(ids(0, 100), ids(200, 300))
        assert m.on(p.Copied(True)) == p.QueryBlocks(100, include_last=False)
        assert m.stages == 1 and m.blocks_sent == 100 and not m.frozen
        # a large increment: another pre-copy stage
        assert m.on(p.BlocksQueried(ids(100, 110))) == p.PreAllocate(10)
        assert isinstance(m.on(p.PreAllocated(ids(300, 310))), p.CopyBlocks)
        assert m.on(p.Copied(True)) == p.QueryBlocks(110, include_last=False)
        # out of stages (3 - 1 left for stop-and-copy): freeze however large the increment,
        # once the destination was asked to hold its steps for it
        assert m.on(p.BlocksQueried(ids(110, 118))) == p.HoldDestination(m.config.commit_hold_s)
        assert not m.frozen
        assert m.on(p.HoldReplied(True)) == p.Freeze()
        st = state(computed=119 * BS)
        assert m.on(p.Frozen(st)) == p.QueryBlocks(110, include_last=True)
        assert m.frozen and m.last_stage
        assert m.on(p.BlocksQueried(ids(110, 120))) == p.PreAllocate(10)
        assert m.on(p.PreAllocated(ids(310, 320))) == p.CopyBlocks(ids(110, 120), ids(310, 320))
        assert m.on(p.Copied(True)) == p.Commit(st)
        assert m.on(p.Committed(True)) == p.Activate()
        assert m.on(p.Activated(True)) == p.FreeSrc()
        assert m.on(p.SrcFreed()) == p.Done(MigrationStatus.FINISHED, "")
        assert m.status == MigrationStatus.FINISHED
        assert m.stages == 3 == m.config.max_stages and m.blocks_sent == 120 and m.reserved == 120

    def test_small_increment_goes_to_stop_and_copy(self):
        m = SourceMigration("m", "r", config=MigrationConfig(max_stages=5, last_stage_max_blocks=4))
        m.start()
        m.on(p.BlocksQueried(ids(0, 50)))
        m.on(p.PreAllocated(ids(0, 50)))
        m.on(p.Copied(True))
        assert to_freeze(m, p.BlocksQueried(ids(50, 54))) == p.Freeze()  # 4 <= last_stage_max_blocks

    def test_first_stage_is_never_skipped_for_being_small(self):
        m = SourceMigration("m", "r", config=MigrationConfig(max_stages=3, last_stage_max_blocks=16))
        m.start()
        assert m.on(p.BlocksQueried(ids(0, 3))) == p.PreAllocate(3)

    def test_no_full_block_freezes_at_once(self):
        m = SourceMigration("m", "r")
        m.start()
        assert m.on(p.BlocksQueried(())) == p.Freeze()
        st = state(computed=3)
        assert m.on(p.Frozen(st)) == p.QueryBlocks(0, include_last=True)
        assert m.on(p.BlocksQueried((0,))) == p.PreAllocate(1)

    def test_frozen_with_nothing_left_commits(self):
        m = SourceMigration("m", "r")
        m.start()
        m.on(p.BlocksQueried(ids(0, 4)))
        m.on(p.PreAllocated(ids(0, 4)))
        m.on(p.Copied(True))
        assert to_freeze(m, p.BlocksQueried(())) == p.Freeze()
        st = state(computed=16)
        m.on(p.Frozen(st))
        assert m.on(p.BlocksQueried(())) == p.Commit(st)

    def test_stop_and_copy_asks_the_destination_to_hold_only_once_it_holds_a_reservation(self):
        # after a pre-copy: hold, and a refused or unanswered hold changes nothing but latency
        for answer in (p.HoldReplied(True), p.HoldReplied(False, "refused")):
            m = precopied(MigrationConfig(commit_hold_s=0.02))
            assert m.on(p.BlocksQueried(())) == p.HoldDestination(0.02)
            assert m.on(answer) == p.Freeze()
            st = state(computed=33)
            if answer.ok:
                assert m.on(p.Frozen(st)) == p.QueryBlocks(8, include_last=True)
                continue
            # refused while the freeze was still far: asked once more at the freeze, whatever the answer
            assert m.on(p.Frozen(st)) == p.HoldDestination(0.02)
            assert m.on(p.HoldReplied(False, "refused again")) == p.QueryBlocks(8, include_last=True)
            assert m.on(p.BlocksQueried(ids(8, 9))) == p.PreAllocate(1)
            assert m.on(p.PreAllocated(ids(40, 41))) == p.CopyBlocks(ids(8, 9), ids(40, 41))
            assert m.on(p.Copied(True)) == p.Commit(st)
        # nothing reserved there (no full block to pre-copy): nothing to tie a hold to
        m = SourceMigration("m", "r", config=MigrationConfig(commit_hold_s=0.02))
        m.start()
        assert m.on(p.BlocksQueried(())) == p.Freeze()
        # holds off
        m = precopied(MigrationConfig(commit_hold_s=0))
        assert m.on(p.BlocksQueried(())) == p.Freeze()
        # blocking mode freezes first: the whole copy is downtime, no hold
        assert SourceMigration("m", "r", config=MigrationConfig(mode="blocking", commit_hold_s=0.02)).start() \
            == p.Freeze()

    def test_a_request_that_leaves_after_the_hold_rolls_back_and_aborts_on_the_destination(self):
        m = precopied()
        assert isinstance(m.on(p.BlocksQueried(())), p.HoldDestination)
        m.on(p.HoldReplied(True))
        a = m.on(p.Frozen(None))
        assert isinstance(a, p.Rollback) and a.abort_dst and not a.unfreeze  # the abort ends the hold there

    def test_single_stage_config(self):
        m = SourceMigration("m", "r", config=MigrationConfig(max_stages=1))
        m.start()
        assert m.on(p.BlocksQueried(ids(0, 100))) == p.Freeze()

    def test_blocking_mode(self):
        m = SourceMigration("m", "r", config=MigrationConfig(mode="blocking"))
        assert m.start() == p.Freeze()
        st = state()
        assert m.on(p.Frozen(st)) == p.QueryBlocks(0, include_last=True)
        assert m.on(p.BlocksQueried(ids(0, 40))) == p.PreAllocate(40)
        m.on(p.PreAllocated(ids(0, 40)))
        assert m.on(p.Copied(True)) == p.Commit(st)
        assert m.on(p.Committed(True)) == p.Activate()
        assert m.on(p.Activated(True)) == p.FreeSrc()
        assert m.on(p.SrcFreed()).status == MigrationStatus.FINISHED
        assert m.stages == 1

    def test_recompute_mode_sends_a_waiting_state(self):
        m = SourceMigration("m", "r", config=MigrationConfig(mode=MigrationMode.RECOMPUTE))
        assert m.start() == p.Freeze()
        a = m.on(p.Frozen(state(computed=9)))
        assert isinstance(a, p.Commit)
        assert a.state.status == SeqStatus.WAITING and a.state.num_computed_tokens == 0
        assert a.state.output_token_ids == (5, 6)
        assert m.on(p.Committed(True)) == p.Activate()
        assert m.on(p.Activated(True)) == p.FreeSrc()
        assert m.on(p.SrcFreed()).status == MigrationStatus.FINISHED
        assert m.stages == 0 and m.blocks_sent == 0

    def test_waiting_request(self):
        m = SourceMigration("m", "r", waiting=True)
        assert m.start() == p.Freeze()
        st = state(status=SeqStatus.WAITING)
        assert m.on(p.Frozen(st)) == p.Commit(st)
        assert m.on(p.Committed(True)) == p.Activate()

    def test_waiting_request_that_started_running_aborts(self):
        m = SourceMigration("m", "r", waiting=True)
        m.start()
        a = m.on(p.Frozen(state(status=SeqStatus.RUNNING)))
        assert a == p.Rollback(unfreeze=True, abort_dst=True, status=MigrationStatus.ABORTED_SRC, reason=a.reason)
        assert m.on(p.RolledBack()).status == MigrationStatus.ABORTED_SRC

    @pytest.mark.parametrize("where", ["first_query", "later_query", "freeze"])
    def test_request_left_source(self, where):
        m = SourceMigration("m", "r")
        m.start()
        if where == "first_query":
            a = m.on(p.BlocksQueried(None))
            assert a.unfreeze is False
        else:
            m.on(p.BlocksQueried(ids(0, 10)))
            m.on(p.PreAllocated(ids(0, 10)))
            m.on(p.Copied(True))
            if where == "later_query":
                a = m.on(p.BlocksQueried(None))
            else:
                assert to_freeze(m, p.BlocksQueried(())) == p.Freeze()
                a = m.on(p.Frozen(None))
            assert a.unfreeze is False
        assert isinstance(a, p.Rollback) and a.abort_dst and a.status == MigrationStatus.ABORTED_SRC
        assert m.on(p.RolledBack()) == p.Done(MigrationStatus.ABORTED_SRC, a.reason)

    @pytest.mark.parametrize("frozen", [False, True])
    def test_refusal_and_failures_abort_dst(self, frozen):
        for fail in ("prealloc", "short_prealloc", "copy", "commit"):
            m = SourceMigration("m", "r", config=MigrationConfig(mode="blocking" if frozen else "live"))
            a = m.start()
            if frozen:
                a = m.on(p.Frozen(state()))
            assert isinstance(a, p.QueryBlocks)
            m.on(p.BlocksQueried(ids(0, 8)))
            if fail == "prealloc":
                a = m.on(p.PreAllocated(None, "full"))
            elif fail == "short_prealloc":
                a = m.on(p.PreAllocated(ids(0, 7)))
            else:
                a = m.on(p.PreAllocated(ids(0, 8)))
                if fail == "copy":
                    a = m.on(p.Copied(False, "boom"))
                else:
                    if not frozen:
                        m.on(p.Copied(True))
                        assert to_freeze(m, p.BlocksQueried(())) == p.Freeze()
                        m.on(p.Frozen(state(computed=32)))
                        a = m.on(p.BlocksQueried((8,)))
                        a = m.on(p.PreAllocated((8,)))
                    a = m.on(p.Copied(True))
                    assert isinstance(a, p.Commit)
                    a = m.on(p.Committed(False, "nope"))
            assert isinstance(a, p.Rollback), (fail, a)
            assert a.status == MigrationStatus.ABORTED_DST and a.abort_dst
            assert a.unfreeze == (frozen or fail == "commit")
            done = m.on(p.RolledBack())
            assert done.status == MigrationStatus.ABORTED_DST and m.status == MigrationStatus.ABORTED_DST

    def test_lost_commit_reply_finishes(self):
        m = SourceMigration("m", "r", config=MigrationConfig(mode="blocking"))
        m.start()
        m.on(p.Frozen(state()))
        m.on(p.BlocksQueried(ids(0, 3)))
        m.on(p.PreAllocated(ids(0, 3)))
        m.on(p.Copied(True))
        a = m.on(p.Committed(False, "timeout"))
        assert isinstance(a, p.Rollback)
        assert m.on(p.RolledBack(committed_on_dst=True)) == p.FreeSrc()
        assert m.on(p.SrcFreed()).status == MigrationStatus.FINISHED

    def test_event_that_does_not_answer_raises(self):
        m = SourceMigration("m", "r")
        m.start()
        with pytest.raises(RuntimeError):
            m.on(p.Copied(True))
        with pytest.raises(RuntimeError):
            SourceMigration("m", "r").on(p.SrcFreed())

    def test_config_validation(self):
        with pytest.raises(ValueError):
            MigrationConfig(max_stages=0)
        with pytest.raises(ValueError):
            MigrationConfig(last_stage_max_blocks=-1)
        with pytest.raises(ValueError):
            MigrationConfig(mode="teleport")
        for bad in (-0.01, p.MAX_HOLD_S + 0.5):
            with pytest.raises(ValueError, match="commit_hold_s"):
                MigrationConfig(commit_hold_s=bad)
        assert MigrationConfig(mode="blocking").mode is MigrationMode.BLOCKING


# ============================================================================= engines: happy paths
def test_live_long_request_stages_shrink_and_tokens_match():
    """Pre-copy stages while the request keeps decoding (steps proportional to blocks copied):
    at most ``max_stages`` stages, each increment smaller than the last."""
    reqs = [req("long", 240, max_tokens=40), req("other", 30, max_tokens=40, seeded=True)]
    ref = reference(reqs)
    pair = Pair(src_blocks=160, dst_blocks=160)
    pair.add(*reqs)
    pair.step_src(2)
    sizes = []

    def before(a):
        if isinstance(a, p.CopyBlocks):
            sizes.append(len(a.src_block_ids))
            if not m.frozen:
                pair.step_src(max(1, len(a.src_block_ids) // 4))  # copying takes time; decoding goes on

    cfg = MigrationConfig(max_stages=4, last_stage_max_blocks=1)
    m = SourceMigration("m1", "long", config=cfg)
    done, _ = pair.drive(m, before)
    assert done.status == MigrationStatus.FINISHED
    assert 2 <= m.stages <= cfg.max_stages
    assert len(sizes) == m.stages
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes
    assert "long" in pair.dst.seqs and "long" not in pair.src.seqs
    pair.assert_clean()
    assert pair.finish() == ref
    assert pair.src.blocks.num_free == 160 and pair.dst.blocks.num_free == 160


@pytest.mark.parametrize("mode", ["live", "blocking", "recompute"])
@pytest.mark.parametrize("seeded", [False, True])
def test_modes_token_identical(mode, seeded):
    reqs = [req(f"r{i}", 20 + 9 * i, max_tokens=20, seeded=seeded) for i in range(3)]
    ref = reference(reqs)
    pair = Pair()
    pair.add(*reqs)
    pair.step_src(6)
    for rid in ("r0", "r2"):
        res = pair.driver().run(SourceMigration(f"m-{rid}", rid, config=MigrationConfig(mode=mode)))
        assert res.status == MigrationStatus.FINISHED, res
        assert res.mode == mode
        if mode == "recompute":
            assert res.blocks == 0 and res.stages == 0
            assert pair.dst.seqs[rid].status == SeqStatus.WAITING
        else:
            assert res.blocks == len(pair.dst.seqs[rid].block_table) > 0
            assert res.stages == (1 if mode == "blocking" else res.stages) >= 1
        assert res.downtime_s >= 0 and res.total_s >= res.downtime_s
        pair.assert_clean()
    assert set(pair.src.seqs) == {"r1"}
    assert pair.finish() == ref
    assert pair.src.blocks.num_free == pair.dst.blocks.num_free == 96


def test_waiting_requests_keep_arrival_order_on_destination():
    reqs = [req(f"w{i}", 12, max_tokens=10, arrival=float(i)) for i in range(5)]
    ref = reference(reqs)
    pair = Pair()
    pair.add(*reqs)  # never stepped: all waiting on the source
    pair.dst.add_request(reqs[2])  # the destination has its own waiting request (arrival 2)
    pair.src.abort_request("w2")
    # migrate out of order: w4, w0, w3
    for rid in ("w4", "w0", "w3"):
        res = pair.driver().run(SourceMigration(f"m-{rid}", rid, waiting=True))
        assert res.status == MigrationStatus.FINISHED and res.blocks == 0
        pair.assert_clean()
    assert [r.request_id for r in pair.dst.load().waiting] == ["w0", "w2", "w3", "w4"]
    assert [r.request_id for r in pair.src.load().waiting] == ["w1"]
    assert all(pair.dst.seqs[r].status == SeqStatus.WAITING for r in ("w0", "w3", "w4"))
    assert pair.finish() == ref


# ============================================================================= engines: aborts
def snapshot(pair: Pair):
    return (pair.src.load(), owners(pair.src), pair.dst.load(), owners(pair.dst),
            {r: (s.status, list(s.block_table), list(s.output_token_ids)) for r, s in pair.src.seqs.items()})


@pytest.mark.parametrize("mode", ["live", "blocking"])
def test_destination_refuses_pre_alloc_nothing_changes(mode):
    reqs = [req("big", 120, max_tokens=16), req("small", 10, max_tokens=16)]
    ref = reference(reqs)
    pair = Pair(dst_blocks=12)  # 30 blocks needed, 12 in the pool
    pair.add(*reqs)
    pair.step_src(2)
    before = snapshot(pair)
    res = pair.driver().run(SourceMigration("m", "big", config=MigrationConfig(mode=mode)))
    assert res.status == MigrationStatus.ABORTED_DST
    assert "watermark" in res.reason or "free blocks" in res.reason
    after = snapshot(pair)
    if mode == "live":
        assert after == before
    else:  # unfrozen: back in the batch (possibly at another position), same blocks and tokens
        assert after[1:] == before[1:]
        assert sorted(after[0].running, key=lambda r: r.request_id) == \
            sorted(before[0].running, key=lambda r: r.request_id)
    assert pair.dest.num_aborted == 0 and not pair.dest.incoming
    pair.assert_clean()
    assert pair.finish() == ref


def test_destination_refuses_in_last_stage_rolls_back():
    reqs = [req("big", 100, max_tokens=30)]
    ref = reference(reqs)
    pair = Pair(dst_blocks=39)  # 25 blocks pre-copied + 14 of the filler: full
    pair.add(*reqs)
    pair.step_src(1)

    def before(a):
        if isinstance(a, p.Freeze):  # the destination fills up while pre-copy was running
            pair.dst.add_request(req("filler", 56, max_tokens=2))
            step(pair.dst, 1, pair.tokens)
            pair.step_src()

    m = SourceMigration("m", "big", config=MigrationConfig(max_stages=2))
    done, seen = pair.drive(m, before)
    assert done.status == MigrationStatus.ABORTED_DST
    assert any(isinstance(a, p.Rollback) and a.unfreeze for a in seen)
    assert pair.src.seqs["big"].status == SeqStatus.RUNNING
    assert pair.dest.num_aborted == 1
    pair.assert_clean()
    assert set(owners(pair.dst)) == {("seq", "filler")}
    tokens = pair.finish()
    assert tokens["big"] == ref["big"]


@pytest.mark.parametrize("how", ["finished", "preempted", "aborted"])
@pytest.mark.parametrize("when", ["pre_copy", "before_freeze"])
def test_request_leaves_source_mid_migration(how, when):
    reqs = [req("x", 60, max_tokens=6), req("y", 20, max_tokens=30)]
    ref = reference(reqs)
    pair = Pair()
    pair.add(*reqs)
    pair.step_src(1)
    src_free_before = None

    def before(a):
        nonlocal src_free_before
        hit = isinstance(a, p.QueryBlocks) and a.num_sent > 0 if when == "pre_copy" else isinstance(a, p.Freeze)
        if not hit or src_free_before is not None:
            return
        assert pair.dest.incoming  # the destination holds a reservation now
        if how == "finished":
            while "x" in pair.src.seqs:
                pair.step_src()
        elif how == "preempted":
            pair.src.scheduler.preempt(pair.src.seqs["x"])
        else:
            pair.src.abort_request("x")
        src_free_before = pair.src.blocks.num_free

    m = SourceMigration("m", "x", config=MigrationConfig(max_stages=3, last_stage_max_blocks=0 if when ==
                                                         "pre_copy" else 100))
    done, _ = pair.drive(m, before)
    assert src_free_before is not None
    assert done.status == MigrationStatus.ABORTED_SRC, done
    pair.assert_clean()
    assert pair.dst.blocks.num_free == 96 and pair.dest.num_aborted == 1
    assert "x" not in pair.dst.seqs
    if how == "preempted":
        assert pair.src.seqs["x"].status == SeqStatus.WAITING
        assert pair.finish() == ref
    else:
        tokens = pair.finish()
        assert tokens["y"] == ref["y"]
        if how == "finished":
            assert tokens["x"] == ref["x"]


class FaultyPort:
    """A ``DestinationPort`` wrapper: ``fail_copy`` raises on copy; ``commit_mode``: ``refuse`` answers
    not-ok, ``lose_reply`` commits then raises (the reply is lost)."""

    def __init__(self, inner: LocalPort, fail_copy: int = 0, commit_mode: str = "") -> None:
        self.inner = inner
        self.fail_copy = fail_copy  # fail the Nth copy (1-based); 0: never
        self.copies = 0
        self.commit_mode = commit_mode
        self.aborts = 0

    def pre_alloc(self, *a):
        return self.inner.pre_alloc(*a)

    def copy(self, *a):
        self.copies += 1
        if self.copies == self.fail_copy:
            raise TransportError("link down")
        return self.inner.copy(*a)

    def hold(self, *a):
        return self.inner.hold(*a)

    def commit(self, mid, st):
        if self.commit_mode == "refuse":
            return False, "refused"
        if self.commit_mode == "lose_reply":
            ok, _ = self.inner.commit(mid, st)
            assert ok
            raise TransportError("reply lost")
        return self.inner.commit(mid, st)

    def abort(self, mid, reason):
        self.aborts += 1
        return self.inner.abort(mid, reason)


@pytest.mark.parametrize("nth", [1, 2])
def test_copy_fails_aborts_dst_and_frees_reservation(nth):
    reqs = [req("x", 80, max_tokens=20, seeded=True)]
    ref = reference(reqs)
    pair = Pair()
    pair.add(*reqs)
    pair.step_src(2)
    port = FaultyPort(pair.port, fail_copy=nth)
    src_owners = owners(pair.src)
    res = pair.driver(port).run(SourceMigration("m", "x"))
    assert res.status == MigrationStatus.ABORTED_DST and "link down" in res.reason
    assert port.aborts == 1
    pair.assert_clean()
    assert pair.dst.blocks.num_free == 96 and owners(pair.src) == src_owners
    assert pair.src.seqs["x"].status == SeqStatus.RUNNING
    assert pair.finish() == ref


def test_commit_fails_source_keeps_the_request():
    reqs = [req("x", 50, max_tokens=20), req("z", 10, max_tokens=20)]
    ref = reference(reqs)
    pair = Pair()
    pair.add(*reqs)
    pair.step_src(3)
    port = FaultyPort(pair.port, commit_mode="refuse")
    res = pair.driver(port).run(SourceMigration("m", "x"))
    assert res.status == MigrationStatus.ABORTED_DST and "refused" in res.reason
    assert pair.src.seqs["x"].status == SeqStatus.RUNNING and "x" not in pair.dst.seqs
    pair.assert_clean()
    assert pair.dst.blocks.num_free == 96
    assert pair.finish() == ref


def test_commit_fails_on_destination_validation():
    """A commit the destination itself rejects (missing reservation) frees everything."""
    pair = Pair()
    pair.add(req("x", 20))
    pair.step_src(1)
    reply = pair.dest.handle(wire.Commit("m", pair.src.seqs["x"].to_migration_state(SeqStatus.RUNNING)), None, 0.0)
    assert not reply.ok
    pair.assert_clean()


def test_lost_commit_reply_finishes_without_duplicate():
    """Issue 13 (4b): the commit only parked the request; the abort that settles the lost
    reply drops the parked copy, so the source keeps the request (it never ran there)."""
    reqs = [req("x", 50, max_tokens=20, seeded=True), req("z", 10, max_tokens=20)]
    ref = reference(reqs)
    pair = Pair()
    pair.add(*reqs)
    pair.step_src(3)
    port = FaultyPort(pair.port, commit_mode="lose_reply")
    res = pair.driver(port).run(SourceMigration("m", "x"))
    assert res.status == MigrationStatus.ABORTED_DST and port.aborts == 1
    assert pair.src.seqs["x"].status == SeqStatus.RUNNING and "x" not in pair.dst.seqs
    assert pair.dest.handle(wire.Abort("m", "again"), None, 0.0).ok  # nothing to abort any more
    assert not pair.dest.handle(wire.Activate("m"), None, 0.0).ok  # a dropped copy never runs
    pair.assert_clean()
    assert pair.finish() == ref  # run_engines asserts consecutive indices: no duplicate token


def test_retried_commit_and_activate_are_idempotent():
    reqs = [req("x", 50, max_tokens=20, seeded=True)]
    ref = reference(reqs)
    pair = Pair()
    pair.add(*reqs)
    pair.step_src(3)
    m = SourceMigration("m", "x")
    d = pair.driver()
    action = m.start()
    while not isinstance(action, p.Activate):
        action = m.on(d.execute(m, action))
    assert pair.dst.seqs["x"].status == SeqStatus.FROZEN  # parked: no step runs it
    assert pair.dest.handle(wire.Commit("m", pair.dst.seqs["x"].to_migration_state(SeqStatus.RUNNING)),
                            None, 0.0).ok  # a retried commit
    assert pair.dest.handle(wire.Activate("m"), None, 0.0).ok
    assert pair.dest.handle(wire.Activate("m"), None, 0.0).ok  # a retried activation
    assert pair.dst.seqs["x"].status == SeqStatus.RUNNING and len(pair.dst.seqs) == 1
    assert pair.dest.handle(wire.Abort("m", "late"), None, 0.0).code is wire.ReplyCode.ALREADY_COMMITTED
    while not isinstance(action, p.Done):  # the machine's own activation is a retry too; then the free
        action = m.on(d.execute(m, action))
    assert action.status == MigrationStatus.FINISHED and "x" not in pair.src.seqs
    pair.assert_clean()
    assert pair.finish() == ref


def test_abort_over_a_transport_reads_the_typed_already_committed_reply():
    """``TransportPort.abort`` learns the destination committed from the reply's code, not its text."""
    pair = Pair()
    pair.add(req("x", 50, max_tokens=20))
    pair.step_src(3)
    assert pair.driver().run(SourceMigration("m", "x")).status == MigrationStatus.FINISHED
    server_cls, transport_cls = get_transport("inproc")
    replies = {"committed": lambda msg, payload: pair.dest.handle(msg, payload, 0.0).to_header(),
               "text only": lambda msg, payload: wire.Reply(False, "already committed").to_header()}
    seen = {}
    for name, handler in replies.items():
        server = server_cls(handler)
        client = transport_cls(server.start(), timeout_s=1.0)
        client.connect()
        try:
            seen[name] = TransportPort(client, pair.src).abort("m", "lost reply")
        finally:
            client.close()
            server.stop()
    assert seen == {"committed": True, "text only": False}


@pytest.mark.parametrize("stop_after", ["prealloc", "copy", "freeze"])
def test_source_vanishes_destination_expires_reservation(stop_after):
    pair = Pair(timeout_s=5.0)
    pair.add(req("x", 60, max_tokens=20))
    pair.step_src(1)
    m = SourceMigration("m", "x")
    d = pair.driver()
    action = m.start()
    kinds = {"prealloc": p.PreAllocate, "copy": p.CopyBlocks, "freeze": p.Freeze}
    while True:
        ev = d.execute(m, action)
        if isinstance(action, kinds[stop_after]):
            break
        action = m.on(ev)
    assert pair.dest.incoming and pair.dst.load().reserved_blocks > 0
    pair.now = 4.0
    assert pair.dest.expire(pair.now) == []
    assert pair.dst.load().reserved_blocks > 0
    pair.now = 5.5
    assert pair.dest.expire(pair.now) == ["m"]
    pair.assert_clean()
    assert pair.dst.blocks.num_free == 96
    # a late message of the vanished source is refused, and frees nothing more
    assert not pair.dest.handle(wire.Commit("m", state("x")), None, 6.0).ok
    pair.assert_clean()


def _reserve(pair: Pair, n: int = 3) -> tuple[int, ...]:
    reply = pair.dest.handle(wire.PreAlloc("m", "x", n), None, 0.0)
    assert reply.ok and len(reply.block_ids) == n
    return reply.block_ids


def test_malformed_blocks_unreserved_ids():
    pair = Pair()
    got = _reserve(pair)
    other = next(b for b in range(96) if b not in got)
    data = pair.dst.read_blocks([other])
    reply = pair.dest.handle(wire.Blocks("m", (other,), "float64", tuple(data.shape)), data, 0.0)
    assert not reply.ok and "not reserved" in reply.error
    pair.assert_clean()
    assert pair.dst.blocks.num_free == 96
    assert not pair.dest.handle(wire.Blocks("m", got[:1], "float64", tuple(data.shape)), data, 0.0).ok  # gone


@pytest.mark.parametrize("bad", ["shape", "dtype", "not_a_tensor"])
def test_malformed_blocks_wrong_payload(bad):
    pair = Pair()
    got = _reserve(pair, 2)
    good = pair.src.read_blocks([0, 1])
    if bad == "shape":
        data = good[:1]
    elif bad == "dtype":
        data = good.to(torch.float32)
    else:
        data = b"\0" * 64
    reply = pair.dest.handle(wire.Blocks("m", got, "float64", (2,)), data, 0.0)
    assert not reply.ok and reply.error
    pair.assert_clean()
    assert pair.dst.blocks.num_free == 96


def test_blocks_of_another_migration_are_refused():
    pair = Pair(max_incoming=2)
    got = _reserve(pair)
    assert pair.dest.handle(wire.PreAlloc("m2", "y", 1), None, 0.0).ok
    data = pair.src.read_blocks([0])
    reply = pair.dest.handle(wire.Blocks("m2", got[:1], "float64", (1,)), data, 0.0)
    assert not reply.ok
    assert list(pair.dest.incoming) == ["m"]  # only the offender's reservation is dropped
    pair.dst.check_invariants()


def test_commit_before_all_blocks_written_is_refused():
    pair = Pair()
    pair.add(req("x", 20))
    pair.step_src(1)
    st = pair.src.freeze("x")
    got = _reserve(pair, len(pair.src.seqs["x"].block_table))
    reply = pair.dest.handle(wire.Commit("m", st), None, 0.0)
    assert not reply.ok and "written" in reply.error and got
    pair.assert_clean()
    pair.src.unfreeze("x")
    pair.src.check_invariants()


def test_destination_limits_concurrent_incoming():
    pair = Pair(max_incoming=1)
    _reserve(pair)
    reply = pair.dest.handle(wire.PreAlloc("m2", "y", 1), None, 0.0)
    assert not reply.ok and "full" in reply.error
    reply = pair.dest.handle(wire.Abort("m", "bye"), None, 0.0)
    assert reply.ok
    pair.assert_clean()
