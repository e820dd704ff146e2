"""Multi-turn KV reuse: a turn's KV kept in the host pool, restored for the next turn."""

from __future__ import annotations

import dataclasses
import random

import pytest

from llumnix_py.engines.types import Request, SamplingParams
from tests.factories import make_engine

BS = 4


def engine(kind="torch", budget=64, **kw):
    if kind == "torch":
        kw.setdefault("dtype", "float64")
    return make_engine(kind, num_blocks=64, block_size=BS, watermark=0.0, num_host_blocks=80,
                       conversation_host_blocks=budget, **kw)


def run_turn(e, req):
    """Run one request alone to its end: (tokens, prefill tokens fed)."""
    e.add_request(req)
    tokens, fed = [], 0
    while e.has_unfinished():
        out = e.step()
        e.check_invariants()
        fed += out.num_prefill_tokens
        for o in out.outputs:
            tokens.extend(o.new_token_ids)
    return tokens, fed


def sampling(kind: str, seed: int) -> SamplingParams:
    if kind == "seeded":
        return SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=seed, ignore_eos=True)
    return SamplingParams(max_tokens=10, ignore_eos=True)


def prompt(n: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(300) for _ in range(n))


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_next_turn_restores_the_shared_prefix_and_gives_the_same_tokens(kind):
    reuse, fresh = engine(), engine(budget=0)
    p1 = prompt(13, 1)
    t1 = Request("t1", p1, sampling(kind, 7), conversation_id="c")
    out1, fed1 = run_turn(reuse, t1)
    assert run_turn(fresh, t1)[0] == out1 and fed1 == len(p1)
    assert "c" in reuse.conversations and "c" not in fresh.conversations
    p2 = p1 + tuple(out1) + prompt(6, 2)  # the history, then the new user message
    t2 = Request("t2", p2, sampling(kind, 8), conversation_id="c")
    out2, fed2 = run_turn(reuse, t2)
    ref2, ref_fed2 = run_turn(fresh, t2)
    kept = (len(p1) + len(out1) - 1) // BS  # full blocks of the first turn's computed tokens
    assert kept > 0
    assert ref_fed2 == len(p2)
    assert fed2 == len(p2) - kept * BS, "the second turn prefilled more than its new tokens"
    assert out2 == ref2
    assert reuse.conversations.hits == 1 and reuse.conversations.restored_tokens == kept * BS


@pytest.mark.parametrize("changed_at", [0, 5, 17])
def test_a_changed_history_never_reuses_kv_after_the_change(changed_at):
    reuse, fresh = engine(), engine(budget=0)
    p1 = prompt(14, 3)
    out1, _ = run_turn(reuse, Request("t1", p1, sampling("greedy", 0), conversation_id="c"))
    history = list(p1 + tuple(out1))
    history[changed_at] = (history[changed_at] + 1) % 300  # the client edited its history
    p2 = tuple(history) + prompt(5, 4)
    t2 = Request("t2", p2, sampling("greedy", 0), conversation_id="c")
    out2, fed2 = run_turn(reuse, t2)
    ref2, _ = run_turn(fresh, t2)
    assert out2 == ref2
    assert fed2 == len(p2) - (changed_at // BS) * BS  # only whole blocks before the change


def test_another_conversation_or_none_reuses_nothing():
    e = engine()
    p1 = prompt(12, 5)
    out1, _ = run_turn(e, Request("t1", p1, sampling("greedy", 0), conversation_id="c"))
    p2 = p1 + tuple(out1) + prompt(3, 6)
    _, fed = run_turn(e, Request("t2", p2, sampling("greedy", 0), conversation_id="other"))
    assert fed == len(p2)
    _, fed = run_turn(e, Request("t3", p2, sampling("greedy", 0)))
    assert fed == len(p2)
    assert "c" in e.conversations  # untouched by the others


def test_the_budget_evicts_the_least_recently_stored_turn():
    e = engine("sim", budget=12)
    for i, cid in enumerate(["a", "b", "c"]):
        # 13 prompt + 10 output tokens, 22 computed: 5 full blocks kept per turn
        run_turn(e, Request(f"t{i}", prompt(13, i), sampling("greedy", 0), conversation_id=cid))
        assert e.conversations.num_blocks <= 12
    assert list(e.conversations.entries()) == ["b", "c"]
    assert e.host.num_used == e.conversations.num_blocks == 10


def test_an_aborted_turn_is_not_kept():
    e = engine()
    e.add_request(Request("t1", prompt(13, 1), sampling("greedy", 0), conversation_id="c"))
    e.step()
    e.abort_request("t1")
    e.check_invariants()
    assert "c" not in e.conversations and e.host.num_used == 0


def test_swap_preemption_evicts_stored_turns_when_the_host_pool_is_full():
    e = make_engine("sim", num_blocks=14, block_size=BS, watermark=0.0, num_host_blocks=8,
                    conversation_host_blocks=8, preemption_mode="swap")
    run_turn(e, Request("t0", prompt(20, 9), sampling("greedy", 0), conversation_id="c"))  # 29 computed: 7 blocks
    assert e.host.num_free == e.host.num_blocks - 7
    for i in range(4):
        e.add_request(Request(f"r{i}", prompt(8, 20 + i), SamplingParams(max_tokens=16, ignore_eos=True)))
    while e.has_unfinished():
        e.step()
        e.check_invariants()
    assert e.swapper.meter.copies > 1, "no swap-out happened"
    assert "c" not in e.conversations  # it gave way to a running request's swap-out


def test_request_rejects_bad_ids():
    from llumnix_py.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        Request("x", (1,), conversation_id=5)
    with pytest.raises(InvalidRequestError):
        Request("x", (1,), client_id="u" * 300)
    assert dataclasses.replace(Request("x", (1,)), client_id="u").client_id == "u"


def test_client_and_conversation_travel_with_a_migration():
    from llumnix_py.engines.types import MigrationRequestState
    from llumnix_py.errors import InvalidRequestError as Invalid

    src, dst = engine("sim"), engine("sim")
    src.add_request(Request("t1", prompt(13, 1), sampling("greedy", 0), client_id="alice", conversation_id="c"))
    state = src.freeze("t1")  # still waiting: it moves without KV
    wire = state.to_wire()
    assert wire["client_id"] == "alice" and wire["conversation_id"] == "c"
    back = MigrationRequestState.from_wire(wire)
    assert back == state
    for bad in ({"client_id": 3}, {"conversation_id": "x" * 300}):
        with pytest.raises(Invalid):
            MigrationRequestState.from_wire({**wire, **bad})
    dst.commit_dst(back)
    src.free_src("t1")
    while dst.has_unfinished():
        dst.step()
        dst.check_invariants()
    assert "c" in dst.conversations  # the destination kept the turn for the conversation's next one
