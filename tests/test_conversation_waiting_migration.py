"""A waiting turn migrated with its conversation's stored KV (issue 17, item 4), on the
built-in engine (float64, host pool, conversation reuse).

Turn 1 ends on the source, which keeps its KV in the host pool. Turn 2 of the same
conversation waits in the source's queue and migrates as a waiting request; its stored
prefix travels as a stop-and-copy stage of the migration
frame (``SourceMigration``, ``MigrationDriver``, ``DestinationMigrations``; the state goes
through the wire format; the stored blocks are read from the host pool, so the carry needs
no free device block on the source). Checks:

- the turn's tokens equal a run without reuse or migration;
- the destination prefills only the tokens past the carried prefix, restored from its
  conversation store; the source keeps no stale copy;
- no device or host block leaks on either side;
- a fault at each stage (copy, commit, a lost commit reply) leaves both instances exactly
  as before, and a refused or failed pre-allocation moves the turn without its prefix
  (recomputed, exact; the source keeps its stored turn, which never left);
- the wire refuses a waiting state whose computed tokens cannot be a stored prefix, and the
  destination refuses carried blocks that do not match it, freeing the reservation.
"""

from __future__ import annotations

import pytest

from llumnix_py.engines.types import MigrationRequestState, Request, SamplingParams, SeqStatus
from llumnix_py.errors import InvalidRequestError
from migration import wire
from migration.destination import DestinationMigrations
from migration.driver import LocalPort, MigrationDriver
from migration.protocol import MigrationStatus, SourceMigration
from tests.factories import make_engine, run_to_completion
from tests.test_migration_property import FaultyPort

BS = 4
SP = SamplingParams(max_tokens=10, ignore_eos=True)
P1 = tuple((7 * j) % 200 + 1 for j in range(22))


def new_engine():
    return make_engine("torch", num_blocks=48, block_size=BS, dtype="float64", watermark=0.0, max_batch_size=4,
                       num_host_blocks=32, conversation_host_blocks=24)


def run(engine, tokens: dict) -> int:
    """Step to the end; the prompt tokens computed over all steps."""
    prefilled = 0
    while engine.has_unfinished():
        out = engine.step()
        prefilled += out.num_prefill_tokens
        for o in out.outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        engine.check_invariants()
    return prefilled


class WirePort:
    """A ``LocalPort`` whose commits go through the wire format, as over a socket."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def commit(self, mid, state):
        return self.inner.commit(mid, MigrationRequestState.from_wire(state.to_wire()))


def setup():
    """Turn 1 done on ``src`` (its KV stored), turn 2 waiting there; the reference tokens."""
    src, dst = new_engine(), new_engine()
    t1 = run_to_completion(src, requests=[Request("t1", P1, SP, client_id="alice", conversation_id="c")])["t1"]
    assert "c" in src.conversations
    p2 = P1 + tuple(t1) + (150, 151, 152)
    ref = run_to_completion(make_engine("torch", num_blocks=256, block_size=BS, dtype="float64"),
                            requests=[Request("t2", p2, SP)])["t2"]
    src.add_request(Request("t2", p2, SP, client_id="alice", conversation_id="c"))
    return src, dst, p2, ref


def snapshot(engine) -> tuple:
    """What must be as before after an aborted migration."""
    return ({r: s.status for r, s in engine.seqs.items()}, [s.request_id for s in engine.scheduler.waiting],
            engine.blocks.num_used, engine.host.num_used, engine.reserved_blocks("t2"),
            [(c, t.tokens, t.host_blocks) for c, t in engine.conversations.entries().items()],  # LRU order too
            engine.conversations.num_blocks)


def migrate(src, dst, port_fault: str = "none", nth: int = 1):
    dests = DestinationMigrations(dst, max_incoming=1, timeout_s=10.0)
    port = FaultyPort(WirePort(LocalPort(dests, src)), port_fault, nth)
    return MigrationDriver(src, port).run(SourceMigration("m1", "t2", waiting=True)), dests


def test_a_waiting_turn_carries_its_stored_prefix_and_prefills_only_its_new_tokens():
    src, dst, p2, ref = setup()
    k = src.conversations.reusable_blocks("c", p2)
    assert k > 0
    res, _ = migrate(src, dst)
    assert res.status == MigrationStatus.FINISHED and res.blocks == k  # the prefix went as migrated blocks
    assert "t2" not in src.seqs and "c" not in src.conversations  # no stale copy kept on the source
    assert src.blocks.num_used == 0 and src.host.num_used == 0
    src.check_invariants()
    assert dst.conversations.entries()["c"].tokens == p2[:k * BS]  # kept there for the turn
    tokens: dict = {}
    prefilled = run(dst, tokens)
    assert tokens["t2"] == ref  # exact
    assert prefilled == len(p2) - k * BS  # only the new tokens were prefilled
    assert dst.conversations.hits == 1 and dst.conversations.restored_tokens == k * BS
    assert dst.blocks.num_used == 0 and dst.host.num_used == dst.conversations.num_blocks  # turn 2's KV kept
    assert dst.conversations.entries()["c"].tokens[:len(p2)] == p2


def test_the_destinations_store_of_the_carried_prefix_is_charged_to_its_next_step():
    """Keeping the carried prefix copies it to the host pool between steps (synchronous swap):
    the next step pays for that copy, and the stall meter counts it."""
    src, dst, p2, ref = setup()
    store_s = 5.0  # far longer than any real step here: the copy's time cannot hide in one
    real_swap_out = dst.executor.swap_out

    def slow_swap_out(runs):
        real_swap_out(runs)
        return store_s

    dst.executor.swap_out = slow_swap_out
    res, _ = migrate(src, dst)
    assert res.status == MigrationStatus.FINISHED and dst.swapper.meter.stall_s == 0.0
    first = dst.step()
    assert first.duration_s >= store_s and dst.swapper.meter.stall_s >= store_s
    dst.executor.swap_out = real_swap_out
    tokens = {"t2": list(first.outputs[0].new_token_ids) if first.outputs else []}
    run(dst, tokens)
    assert tokens["t2"] == ref


def test_the_prefix_travels_from_the_host_pool_even_when_the_source_has_no_free_device_block():
    """The source is why the turn leaves: full. The stored turn is read straight from its
    host pool into the migration frame, so the carry needs no device block there."""
    src, dst, p2, ref = setup()
    filler = src.blocks.allocate(("seq", "filler"), src.blocks.num_free)  # every device block taken
    assert filler and src.blocks.num_free == 0
    k = src.conversations.reusable_blocks("c", p2)
    res, _ = migrate(src, dst)
    assert res.status == MigrationStatus.FINISHED and res.blocks == k
    src.blocks.free(("seq", "filler"), filler)
    tokens: dict = {}
    assert run(dst, tokens) == len(p2) - k * BS and tokens["t2"] == ref


def test_a_second_conversation_stored_behind_keeps_its_place_after_an_abort():
    """The lent turn goes back where it was in the LRU order, not to the young end."""
    src, dst = new_engine(), new_engine()
    t1 = run_to_completion(src, requests=[Request("t1", P1, SP, client_id="alice", conversation_id="c")])["t1"]
    run_to_completion(src, requests=[Request("u1", tuple(range(30, 52)), SP, client_id="x", conversation_id="d")])
    assert list(src.conversations.entries()) == ["c", "d"]  # c is the older: evicted first
    src.add_request(Request("t2", P1 + tuple(t1) + (150,), SP, client_id="alice", conversation_id="c"))
    before = snapshot(src), snapshot(dst)
    res, _ = migrate(src, dst, "copy")
    assert res.status == MigrationStatus.ABORTED_DST and res.reason
    assert (snapshot(src), snapshot(dst)) == before and list(src.conversations.entries()) == ["c", "d"]


def test_without_migration_the_turn_reuses_the_same_prefix():
    """The baseline the carried prefix must match: turn 2 on its home restores ``k`` blocks."""
    src, _, p2, ref = setup()
    k = src.conversations.reusable_blocks("c", p2)
    tokens: dict = {}
    assert run(src, tokens) == len(p2) - k * BS and tokens["t2"] == ref


@pytest.mark.parametrize("fault", ["copy", "commit", "commit_lost"])
def test_an_abort_at_any_stage_leaves_both_instances_as_before(fault):
    src, dst, p2, ref = setup()
    before = snapshot(src), snapshot(dst)
    res, dests = migrate(src, dst, fault)
    assert res.status == MigrationStatus.ABORTED_DST, res
    assert (snapshot(src), snapshot(dst)) == before
    assert not dests.parked and not dests.incoming
    src.check_invariants()
    dst.check_invariants()
    k = src.conversations.reusable_blocks("c", p2)
    tokens: dict = {}
    assert run(src, tokens) == len(p2) - k * BS  # it runs on at home with its prefix reused
    assert tokens["t2"] == ref


@pytest.mark.parametrize("fault", ["refuse", "pre_alloc"])
def test_a_refused_reservation_moves_the_turn_without_its_prefix(fault):
    """The prefix never left: the source keeps its stored turn, where it was."""
    src, dst, p2, ref = setup()
    kept = snapshot(src)[5:]
    res, _ = migrate(src, dst, fault)
    assert res.status == MigrationStatus.FINISHED and res.blocks == 0
    assert "t2" not in src.seqs and src.blocks.num_used == 0 and snapshot(src)[5:] == kept
    src.check_invariants()
    assert "c" not in dst.conversations
    tokens: dict = {}
    assert run(dst, tokens) == len(p2)  # recomputed whole
    assert tokens["t2"] == ref


def test_a_turn_with_nothing_stored_migrates_as_before():
    src, dst, p2, ref = setup()
    src.conversations.drop("c")
    res, _ = migrate(src, dst)
    assert res.status == MigrationStatus.FINISHED and res.blocks == 0
    tokens: dict = {}
    assert run(dst, tokens) == len(p2) and tokens["t2"] == ref


def state(**kw) -> MigrationRequestState:
    base = dict(request_id="t2", prompt_token_ids=tuple(range(1, 13)), output_token_ids=(), sampling=SP,
                priority=0, arrival_time=0.0, num_preemptions=0, status=SeqStatus.WAITING, num_computed_tokens=8,
                conversation_id="c")
    base.update(kw)
    return MigrationRequestState(**base)


@pytest.mark.parametrize("bad", [dict(conversation_id=""), dict(num_computed_tokens=12)])
def test_the_wire_refuses_a_waiting_state_that_cannot_carry_a_prefix(bad):
    with pytest.raises(InvalidRequestError):
        MigrationRequestState.from_wire(state(**bad).to_wire())
    assert MigrationRequestState.from_wire(state().to_wire()).num_computed_tokens == 8


@pytest.mark.parametrize("computed, blocks", [(6, 2), (8, 1), (8, 3)])
def test_the_destination_refuses_carried_blocks_that_do_not_match_and_frees_them(computed, blocks):
    """Not whole blocks, or not as many blocks as reserved: an error reply, the reservation freed."""
    dst = new_engine()
    dests = DestinationMigrations(dst, max_incoming=1, timeout_s=10.0)
    ids = dests.handle(wire.PreAlloc("m1", "t2", blocks), None, 0.0).block_ids
    data = dst.read_blocks(list(ids))
    assert dests.handle(wire.Blocks("m1", tuple(ids), wire.dtype_name(data.dtype), tuple(data.shape)), data, 0.0).ok
    reply = dests.handle(wire.Commit("m1", state(num_computed_tokens=computed)), None, 0.0)
    assert not reply.ok and "whole blocks" in reply.error
    assert dst.blocks.num_used == 0 and "t2" not in dst.seqs and not dests.incoming and not dests.parked
    dst.check_invariants()


def test_a_carried_prefix_without_reserved_blocks_is_refused():
    dst = new_engine()
    dests = DestinationMigrations(dst, max_incoming=1, timeout_s=10.0)
    reply = dests.handle(wire.Commit("m1", state()), None, 0.0)
    assert not reply.ok and "reserved blocks" in reply.error
    assert "t2" not in dst.seqs and dst.blocks.num_used == 0
