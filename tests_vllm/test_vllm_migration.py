"""Live migration between two real vLLM instances (in this process) through the
migration protocol: ``SourceMigration`` driven by ``MigrationDriver`` over a
``LocalPort(DestinationMigrations(dst), src)``.

Invariant checked throughout: a greedy request produces exactly the tokens of an
unmigrated run, at consecutive output indices, whichever instance emitted them;
and both instances end with every KV block free.
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest

from llumnix_py.engines.types import Request, SamplingParams, SeqStatus
from migration import protocol as p
from migration.destination import DestinationMigrations
from migration.driver import LocalPort, MigrationDriver
from migration.protocol import MigrationConfig, MigrationMode, MigrationStatus, SourceMigration
from migration.transports.base import TransportError
from vllm_helpers import solo_tokens

PROMPT = tuple(range(5, 75))  # 70 tokens: 2 full blocks of 32 and a partial one
_REFS: dict[tuple, list[int]] = {}


def req(rid: str, max_tokens: int = 100, prompt=PROMPT) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def reference(engine, request: Request) -> list[int]:
    """Tokens of ``request`` run alone, unmigrated (memoized per prompt and length)."""
    key = (request.prompt_token_ids, request.sampling)
    if key not in _REFS:
        _REFS[key] = solo_tokens(engine, Request("ref-" + request.request_id, request.prompt_token_ids,
                                                 request.sampling))
    return _REFS[key]


class Pair:
    """Source and destination adapters, the tokens seen per request, and a stepwise driver."""

    def __init__(self, src, dst) -> None:
        self.src, self.dst = src, dst
        self.dest = DestinationMigrations(dst)
        self.tokens: dict[str, list[int]] = {}
        self.finished: set[str] = set()

    @classmethod
    def started(cls, engines, request_id: str, max_tokens: int, steps: int) -> tuple["Pair", list[int]]:
        """One request on the first engine of ``engines`` after ``steps`` steps, and its reference tokens."""
        a, b = engines
        r = req(request_id, max_tokens=max_tokens)
        ref = reference(a, r)
        pair = cls(a, b)
        pair.add(r)
        pair.step(a, steps)
        return pair, ref

    def add(self, *requests: Request) -> None:
        for r in requests:
            self.src.add_request(r)
            self.tokens[r.request_id] = []

    def step(self, engine, n: int = 1) -> None:
        for _ in range(n):
            for o in engine.step().outputs:
                got = self.tokens[o.request_id]
                assert o.index == len(got), f"{o.request_id}: index {o.index} after {len(got)} tokens"
                got.extend(o.new_token_ids)
                if o.finished:
                    self.finished.add(o.request_id)
            engine.check_invariants()

    def drive(self, m: SourceMigration, before: Optional[Callable[[p.Action], None]] = None,
              port: Optional[LocalPort] = None):
        """Run ``m``; ``before(action)`` runs before each action (to step engines in between)."""
        driver = MigrationDriver(self.src, port or LocalPort(self.dest, self.src))
        action, seen = m.start(), []
        while not isinstance(action, p.Done):
            seen.append(action)
            if before is not None:
                before(action)
            action = m.on(driver.execute(m, action))
        return action, seen

    def finish(self) -> dict[str, list[int]]:
        for e in (self.src, self.dst):
            while e.has_unfinished():
                self.step(e)
        for e in (self.src, self.dst):
            e.step()  # the workers drop state of requests that left
            e.check_invariants()
        return self.tokens


def test_live_migration_mid_decode_matches_unmigrated(engines):
    a, b = engines
    pair, ref = Pair.started(engines, "m", max_tokens=160, steps=10)  # prefill + 9 decodes
    commits = []

    def before(action):
        if isinstance(action, p.QueryBlocks) and not action.include_last:
            pair.step(a, 32)  # the request keeps decoding during pre-copy: one more full block
        if isinstance(action, p.Commit):
            commits.append(action.state)

    m = SourceMigration("mig", "m", config=MigrationConfig(max_stages=4, last_stage_max_blocks=0))
    done, seen = pair.drive(m, before)
    assert done.status == MigrationStatus.FINISHED, done
    copies = [len(x.src_block_ids) for x in seen if isinstance(x, p.CopyBlocks)]
    (state,) = commits
    assert len(copies) == 4 and copies[:3] == [3, 1, 1], copies  # 3 pre-copy stages, then stop-and-copy
    assert sum(copies) == -(-state.num_computed_tokens // 32)
    moved_at = len(pair.tokens["m"])
    assert moved_at == len(state.output_token_ids) and 0 < moved_at < 160
    assert state.num_computed_tokens == len(PROMPT) + moved_at - 1
    assert a.load().used_blocks == 0 and "m" not in a.request_ids()
    assert [x.request_id for x in b.load().running] == ["m"] and b.load().running[0].output_len == moved_at
    tokens = pair.finish()
    assert tokens["m"] == ref
    assert "m" in pair.finished


@pytest.mark.parametrize("mode", [MigrationMode.BLOCKING, MigrationMode.RECOMPUTE])
def test_blocking_and_recompute_modes_match_unmigrated(engines, mode):
    a, b = engines
    pair, ref = Pair.started(engines, "m", max_tokens=60, steps=25)
    done, _ = pair.drive(SourceMigration("mig", "m", config=MigrationConfig(mode=mode)))
    assert done.status == MigrationStatus.FINISHED
    assert pair.finish()["m"] == ref


class _CommitReplyLostPort(LocalPort):
    """The commit reaches the destination (which parks the request), its reply is lost."""

    def commit(self, migration_id, state):
        ok, err = super().commit(migration_id, state)
        assert ok, err
        assert migration_id in self.dst.parked  # adopted, frozen: not scheduled, no token
        raise TransportError("injected: the commit's reply is lost")


def test_a_parked_copy_is_dropped_by_the_abort_and_the_source_runs_on(engines):
    """Ownership under message loss on vLLM: the destination's commit only parks the request;
    the source, which never saw the reply, aborts; the abort drops the parked copy (its blocks
    come back) and the source unfreezes and finishes with the unmigrated tokens."""
    a, b = engines
    pair, ref = Pair.started(engines, "m", max_tokens=60, steps=10)
    port = _CommitReplyLostPort(pair.dest, pair.src)
    done, seen = pair.drive(SourceMigration("mig", "m", config=MigrationConfig(max_stages=2)), port=port)
    assert done.status != MigrationStatus.FINISHED, done
    assert any(isinstance(x, p.Commit) for x in seen)
    assert not pair.dest.parked and b.load().used_blocks == 0 and "m" not in b.request_ids()
    assert "m" in a.request_ids()
    assert pair.finish()["m"] == ref


class _ZeroingPort(LocalPort):
    """Sends zeros instead of the source's KV data (a negative control)."""

    def copy(self, migration_id, src_ids, dst_ids):
        data = self.src.read_blocks(src_ids)
        data.zero_()
        from migration import wire

        reply = self._handle(wire.Blocks(migration_id, tuple(dst_ids), "uint8", (len(dst_ids),)), data)
        assert reply.ok, reply


def test_copied_kv_is_what_the_destination_decodes_from(engines):
    """Control: with the KV data replaced by zeros the continuation differs, so the
    token-identity tests above really depend on the copied KV cache."""
    a, b = engines
    pair, ref = Pair.started(engines, "m", max_tokens=60, steps=10)
    port = _ZeroingPort(pair.dest, a)
    done, _ = pair.drive(SourceMigration("mig", "m"), port=port)
    assert done.status == MigrationStatus.FINISHED
    moved_at = 10
    tokens = pair.finish()["m"]
    assert tokens[:moved_at] == ref[:moved_at]
    assert tokens[moved_at:] != ref[moved_at:]


def test_migrated_request_migrates_again_and_back(engines):
    a, b = engines
    r = req("m", max_tokens=90)
    ref = reference(a, r)
    there, back = Pair(a, b), Pair(b, a)
    there.add(r)
    there.step(a, 20)
    assert there.drive(SourceMigration("m1", "m"))[0].status == MigrationStatus.FINISHED
    there.step(b, 25)
    back.tokens = there.tokens  # same token record, roles swapped
    done, _ = back.drive(SourceMigration("m2", "m"))
    assert done.status == MigrationStatus.FINISHED
    assert back.finish()["m"] == ref


def test_waiting_request_migrates_and_runs_on_destination(engines):
    a, b = engines
    pair, ref = Pair.started(engines, "w", max_tokens=30, steps=0)
    done, seen = pair.drive(SourceMigration("mig", "w", waiting=True))
    assert done.status == MigrationStatus.FINISHED
    assert not any(isinstance(x, p.CopyBlocks) for x in seen)
    assert [x.request_id for x in b.load().waiting] == ["w"]
    assert pair.finish()["w"] == ref


def test_destination_refuses_nothing_changes(engines):
    a, b = engines
    pair, ref = Pair.started(engines, "m", max_tokens=60, steps=10)
    hog = b.pre_alloc("hog", b.load().free_blocks - 1)  # the destination is (nearly) full
    assert hog is not None
    a_before, b_before = a.load(), b.load()
    done, seen = pair.drive(SourceMigration("mig", "m"))
    assert done.status == MigrationStatus.ABORTED_DST
    assert not any(isinstance(x, (p.CopyBlocks, p.Freeze)) for x in seen)
    assert a.load() == a_before and b.load() == b_before  # nothing changed on either side
    assert b.free_pre_alloc("hog") == len(hog)
    assert pair.finish()["m"] == ref


class _FailingCommitPort(LocalPort):
    def commit(self, migration_id, state):
        return False, "destination crashed before committing"


def test_commit_failure_after_freeze_rolls_back_and_request_continues(engines):
    a, b = engines
    pair, ref = Pair.started(engines, "m", max_tokens=60, steps=10)
    port = _FailingCommitPort(pair.dest, a)
    done, seen = pair.drive(SourceMigration("mig", "m"), port=port)
    assert done.status == MigrationStatus.ABORTED_DST
    assert any(isinstance(x, p.Rollback) and x.unfreeze for x in seen)
    assert b.load().reserved_blocks == 0 and b.load().used_blocks == 0 and pair.dest.num_aborted == 1
    load = a.load()
    assert [x.request_id for x in load.running] == ["m"] and not load.running[0].migrating
    assert pair.finish()["m"] == ref


def test_request_aborted_during_precopy_aborts_migration(engines):
    a, b = engines
    pair = Pair(a, b)
    pair.add(req("m", max_tokens=200))
    pair.step(a, 40)

    def before(action):
        if isinstance(action, p.QueryBlocks) and action.num_sent > 0:
            a.abort_request("m")

    done, _ = pair.drive(SourceMigration("mig", "m", config=MigrationConfig(max_stages=3, last_stage_max_blocks=0)),
                         before)
    assert done.status == MigrationStatus.ABORTED_SRC
    assert b.load().reserved_blocks == 0 and a.load().used_blocks == 0
    pair.finish()


def test_one_request_of_a_batch_migrates_others_unaffected(engines):
    a, b = engines
    reqs = [req("x", max_tokens=40), req("y", max_tokens=50, prompt=tuple(range(100, 140))),
            req("z", max_tokens=45, prompt=tuple(range(200, 290)))]
    refs = {r.request_id: reference(a, r) for r in reqs}
    pair = Pair(a, b)
    pair.add(*reqs)
    pair.step(a, 12)
    state_seen = []

    def before(action):
        if isinstance(action, p.Commit):
            state_seen.append(action.state)
        pair.step(a, 1) if isinstance(action, p.QueryBlocks) and not action.include_last else None

    done, _ = pair.drive(SourceMigration("mig", "y"), before)
    assert done.status == MigrationStatus.FINISHED
    (state,) = state_seen
    assert state.status == SeqStatus.RUNNING
    assert state.num_computed_tokens == len(state.prompt_token_ids) + len(state.output_token_ids) - 1
    assert pair.finish() == refs


def test_request_preempted_during_precopy_aborts_migration(engines):
    """vLLM preempts the newest running request when blocks run out; its blocks are recycled,
    so a pre-copy that began before must abort (ABORTED_SRC), not send stale KV."""
    a, b = engines
    long_prompt = tuple(range(5, 5 + 300))  # 10 blocks each; three of them outgrow 40 blocks
    pair = Pair(a, b)
    pair.add(*(req(f"p{i}", max_tokens=200, prompt=long_prompt) for i in range(3)))
    pair.step(a, 2)
    preempted = []

    def before(action):
        if isinstance(action, p.QueryBlocks) and action.num_sent > 0:
            for _ in range(400):  # bounded: the test fails below rather than hang
                if preempted:
                    break
                out = a.step()
                preempted.extend(out.preempted)
                for o in out.outputs:
                    pair.tokens[o.request_id].extend(o.new_token_ids)

    m = SourceMigration("mig", "p2", config=MigrationConfig(max_stages=3, last_stage_max_blocks=0))
    done, _ = pair.drive(m, before)
    assert preempted == ["p2"]
    assert done.status == MigrationStatus.ABORTED_SRC, done
    assert b.load().reserved_blocks == 0 and b.load().used_blocks == 0
    assert [r.request_id for r in a.load().waiting] == ["p2"] and not a.load().waiting[0].migrating
    for rid in ("p0", "p1", "p2"):
        a.abort_request(rid)
    pair.finish()
