"""EngineCore end to end: the built-in engine over the small model, and the sim engine.

Exact token equality across different batch compositions (batched vs alone,
preempted vs not, frozen vs not) is checked in float64, where a different
summation order cannot flip an argmax or a sampled token.
"""

from __future__ import annotations

import dataclasses

import pytest

from llumnix_py.engines.core import EngineCore
from llumnix_py.engines.sequence import cdiv
from llumnix_py.engines.types import (
    HIGH_PRIORITY,
    FinishReason,
    Request,
    SamplingParams,
    SeqStatus,
    StepOutput,
)
from llumnix_py.errors import InvalidRequestError, MigrationError, UnknownRequestError
from tests.factories import RunResult, make_engine, make_requests, run_engine, run_engines, run_to_completion


def step(engine: EngineCore) -> StepOutput:
    """One step, then the engine's invariants."""
    out = engine.step()
    engine.check_invariants()
    return out


def assert_idle(engine: EngineCore) -> None:
    """Nothing left: no requests, no reservations, every block free."""
    engine.check_invariants()
    assert not engine.has_unfinished() and engine.request_ids() == []
    assert engine.blocks.num_free == engine.config.num_blocks
    load = engine.load()
    assert load.used_blocks == 0 and load.reserved_blocks == 0


def solo_tokens(requests: list[Request], **engine_kw) -> dict[str, list[int]]:
    """Each request alone on one (reused, idle in between) engine."""
    engine = make_engine(**engine_kw)
    out: dict[str, list[int]] = {}
    for r in requests:
        out.update(run_to_completion(engine, requests=[r]))
        assert_idle(engine)
    return out


def snapshot(engine: EngineCore):
    """Everything a failed call must leave as it was."""
    return (engine.load(), engine.blocks.owners(), sorted(engine.request_ids()),
            {r: engine.reserved_blocks(r) for r in engine._prealloc})


# ----- batching is invisible to the tokens ---------------------------------------------------
@pytest.mark.parametrize("sampling", ["greedy", "seeded", "mixed"])
def test_batched_equals_one_at_a_time_float64(sampling):
    requests = make_requests(6, seed=11, sampling=sampling, max_tokens=12, prompt_len=(3, 40))
    engine = make_engine(dtype="float64")
    batched = run_engine(engine, requests=requests)
    assert_idle(engine)
    assert len(batched.tokens) == len(requests)
    assert set(batched.finish_reasons.values()) == {FinishReason.LENGTH}
    assert all(len(t) == 12 for t in batched.tokens.values())
    assert any(o.num_decode_tokens > 1 for o in batched.steps), "requests were never batched together"
    assert batched.tokens == solo_tokens(requests, dtype="float64")


def test_batched_equals_one_at_a_time_float32_greedy():
    requests = make_requests(4, seed=5, sampling="greedy", max_tokens=10, prompt_len=(5, 30))
    batched = run_to_completion(make_engine(dtype="float32"), requests=requests)
    assert batched == solo_tokens(requests, dtype="float32")


def test_seeded_sampling_depends_on_seed_not_id():
    base = make_requests(2, seed=3, sampling="seeded", max_tokens=10)
    r0, r1 = base
    same_seed = dataclasses.replace(r1, prompt_token_ids=r0.prompt_token_ids, sampling=r0.sampling)
    toks = run_to_completion(make_engine(dtype="float64"), requests=[r0, same_seed])
    assert toks["r0"] == toks["r1"]
    other_seed = dataclasses.replace(same_seed, sampling=dataclasses.replace(r0.sampling, seed=r0.sampling.seed + 1))
    toks2 = run_to_completion(make_engine(dtype="float64"), requests=[r0, other_seed])
    assert toks2["r0"] == toks["r0"] and toks2["r1"] != toks["r0"]


# ----- preemption --------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["newest", "largest"])
def test_preemption_gives_the_same_tokens_as_a_large_engine(policy):
    requests = make_requests(5, seed=21, sampling="mixed", max_tokens=20, prompt_len=(6, 14))
    small = make_engine(dtype="float64", num_blocks=14, block_size=4, watermark=0.0, preemption_policy=policy)
    seen_preempted_waiting = []

    def watch(_round: int) -> None:
        load = small.load()
        assert load.num_running <= small.config.max_batch_size
        seen_preempted_waiting.extend(r.request_id for r in load.waiting if r.num_preemptions > 0)

    res = run_engine(small, requests=requests, before_step=watch)
    assert_idle(small)
    preempted = [rid for s in res.steps for rid in s.preempted]
    assert preempted, "the small engine never preempted; shrink it"
    assert seen_preempted_waiting, "load() never showed a preempted request waiting"
    assert set(seen_preempted_waiting) <= set(preempted)

    large = run_to_completion(make_engine(dtype="float64", num_blocks=256, block_size=4), requests=requests)
    assert res.tokens == large
    assert all(len(t) == 20 for t in large.values())


def test_load_counts_preemptions_of_running_requests():
    engine = make_engine("sim", num_blocks=5, block_size=4, watermark=0.0)
    long = SamplingParams(max_tokens=12, ignore_eos=True)
    engine.add_request(Request("a", tuple(range(8)), SamplingParams(max_tokens=6), arrival_time=0.0))
    engine.add_request(Request("b", tuple(range(8)), long, arrival_time=1.0))
    res = RunResult()
    res.record(step(engine))  # both prefilled: 4 of 5 blocks
    out = step(engine)  # a takes the last block; b must go
    res.record(out)
    assert out.preempted == ("b",)
    load = engine.load()
    assert [r.request_id for r in load.waiting] == ["b"]
    assert load.waiting[0].num_preemptions == 1 and load.waiting[0].num_blocks == 0
    assert load.waiting[0].blocks_needed == cdiv(8 + 1, 4)  # prompt + the one output it had
    run_engine(engine, result=res)
    assert res.finish_reasons == {"a": FinishReason.LENGTH, "b": FinishReason.LENGTH}
    assert len(res.tokens["a"]) == 6 and len(res.tokens["b"]) == 12
    assert_idle(engine)


def test_request_outgrowing_the_pool_finishes():
    engine = make_engine("sim", num_blocks=4, block_size=4, watermark=0.0)
    engine.add_request(Request("big", tuple(range(16)), SamplingParams(max_tokens=10)))  # prompt fits exactly
    res = run_engine(engine, max_steps=50)
    assert res.finish_reasons.get("big") == FinishReason.LENGTH
    assert_idle(engine)


# ----- abort -------------------------------------------------------------------------------------
def test_abort_frees_blocks():
    engine = make_engine(dtype="float32", num_blocks=16, block_size=4, max_batch_size=2)
    requests = make_requests(4, seed=2, max_tokens=30, prompt_len=(5, 9))
    for r in requests:
        engine.add_request(r)
    step(engine)
    step(engine)
    load = engine.load()
    running = [r.request_id for r in load.running]
    waiting = [r.request_id for r in load.waiting]
    assert running and waiting
    engine.abort_request(running[0])
    engine.abort_request(waiting[-1])
    engine.check_invariants()
    assert running[0] not in engine.request_ids() and waiting[-1] not in engine.request_ids()
    res = run_engine(engine)
    assert running[0] not in res.tokens and waiting[-1] not in res.tokens  # nothing after the abort
    assert_idle(engine)
    with pytest.raises(UnknownRequestError, match=running[0]):
        engine.abort_request(running[0])  # already aborted


def test_abort_unknown_and_finished_requests_raise():
    engine = make_engine("sim")
    with pytest.raises(UnknownRequestError, match="nope"):
        engine.abort_request("nope")
    run_to_completion(engine, requests=make_requests(1, seed=0, max_tokens=2))
    with pytest.raises(UnknownRequestError):
        engine.abort_request("r0")
    assert_idle(engine)


def test_abort_everything_mid_run():
    engine = make_engine(dtype="float32")
    for r in make_requests(5, seed=9, max_tokens=50):
        engine.add_request(r)
    for _ in range(3):
        step(engine)
    ids = engine.request_ids()
    assert ids
    for rid in ids:
        engine.abort_request(rid)
    assert_idle(engine)
    assert step(engine).outputs == ()


# ----- input validation --------------------------------------------------------------------------
def _req(**kw) -> Request:
    kw.setdefault("request_id", "x")
    kw.setdefault("prompt_token_ids", (1, 2, 3))
    return Request(**kw)


BAD_REQUESTS = {
    "empty prompt": (lambda: _req(prompt_token_ids=()), "prompt is empty"),
    "max_tokens zero": (lambda: _req(sampling=SamplingParams(max_tokens=0)), "max_tokens"),
    "max_tokens negative": (lambda: _req(sampling=SamplingParams(max_tokens=-3)), "max_tokens"),
    "negative priority": (lambda: _req(priority=-1), "priority"),
    "negative temperature": (lambda: _req(sampling=SamplingParams(temperature=-0.1)), "temperature"),
    "top_p zero": (lambda: _req(sampling=SamplingParams(top_p=0.0)), "top_p"),
    "top_p above one": (lambda: _req(sampling=SamplingParams(top_p=1.5)), "top_p"),
    "token above vocab": (lambda: _req(prompt_token_ids=(1, 320)), "vocabulary"),
    "negative token": (lambda: _req(prompt_token_ids=(-1, 2)), "vocabulary"),
    "float token": (lambda: _req(prompt_token_ids=(1.5, 2)), "vocabulary"),
    "bool token": (lambda: _req(prompt_token_ids=(True, 2)), "vocabulary"),
    "string token": (lambda: _req(prompt_token_ids=("3", 2)), "vocabulary"),
    "prompt at max_model_len": (lambda: _req(prompt_token_ids=(1,) * 64), "context"),
    "prompt beyond max_model_len": (lambda: _req(prompt_token_ids=(1,) * 100), "context"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_inputs_raise_invalid_request(name):
    make, match = BAD_REQUESTS[name]
    engine = make_engine(dtype="float32", max_model_len=64)
    before = snapshot(engine)
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request(make())
    assert snapshot(engine) == before
    assert_idle(engine)


def test_prompt_needing_more_blocks_than_the_engine_has():
    engine = make_engine(dtype="float32", num_blocks=4, block_size=4, watermark=0.0)
    with pytest.raises(InvalidRequestError, match="KV blocks"):
        engine.add_request(_req(prompt_token_ids=(1,) * 17))
    assert_idle(engine)


def test_duplicate_request_id():
    engine = make_engine("sim")
    r = make_requests(1, seed=1, max_tokens=4)[0]
    engine.add_request(r)
    before = snapshot(engine)
    with pytest.raises(InvalidRequestError, match="already exists"):
        engine.add_request(r)
    assert snapshot(engine) == before
    step(engine)
    with pytest.raises(InvalidRequestError, match="already exists"):
        engine.add_request(r)  # while running, too
    assert run_to_completion(engine)["r0"]
    engine.add_request(r)  # a finished id may be reused
    assert len(run_to_completion(engine)["r0"]) == 4


# ----- finishing ---------------------------------------------------------------------------------
def _greedy_reference(engine_kw: dict, prompt: tuple[int, ...], n: int) -> list[int]:
    r = Request("ref", prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    return run_to_completion(make_engine(**engine_kw), requests=[r])["ref"]


def test_stop_token_and_eos_end_with_stop():
    kw = dict(dtype="float64")
    prompt = tuple(range(10, 30))
    ref = _greedy_reference(kw, prompt, 16)
    assert len(ref) == 16
    stop = ref[5]
    cut = ref.index(stop) + 1

    r = Request("s", prompt, SamplingParams(max_tokens=16, stop_token_ids=(stop,), ignore_eos=True))
    res = run_engine(make_engine(**kw), requests=[r])
    assert res.finish_reasons == {"s": FinishReason.STOP}
    assert res.tokens["s"] == ref[:cut]

    eos_engine = make_engine(**kw, eos_token_id=stop)
    res = run_engine(eos_engine, requests=[Request("e", prompt, SamplingParams(max_tokens=16))])
    assert res.finish_reasons == {"e": FinishReason.STOP} and res.tokens["e"] == ref[:cut]
    assert_idle(eos_engine)

    res = run_engine(eos_engine, requests=[Request("i", prompt, SamplingParams(max_tokens=16, ignore_eos=True))])
    assert res.finish_reasons == {"i": FinishReason.LENGTH} and res.tokens["i"] == ref


def test_max_tokens_ends_with_length():
    res = run_engine(make_engine("sim"), requests=make_requests(3, seed=4, max_tokens=7))
    assert res.finish_reasons == {f"r{i}": FinishReason.LENGTH for i in range(3)}
    assert [len(res.tokens[f"r{i}"]) for i in range(3)] == [7, 7, 7]
    one = run_engine(make_engine("sim"), requests=make_requests(1, seed=4, max_tokens=1))
    assert one.finish_reasons == {"r0": FinishReason.LENGTH} and len(one.tokens["r0"]) == 1


def test_max_model_len_ends_with_length():
    engine = make_engine(dtype="float32", max_model_len=40, block_size=4)
    r = Request("m", tuple(range(1, 31)), SamplingParams(max_tokens=100, ignore_eos=True))
    res = run_engine(engine, requests=[r])
    assert res.finish_reasons == {"m": FinishReason.LENGTH}
    assert len(res.tokens["m"]) == 40 - 30
    assert_idle(engine)


# ----- scheduling limits and priorities ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["sim", "torch"])
def test_high_priority_request_is_admitted_first(kind):
    engine = make_engine(kind, max_batch_size=1)
    normal = make_requests(3, seed=6, max_tokens=3, prompt_len=(4, 8))
    for r in normal:
        engine.add_request(r)
    first = step(engine)
    assert [o.request_id for o in first.outputs] == ["r0"]
    vip = Request("vip", (5, 6, 7), SamplingParams(max_tokens=3, ignore_eos=True), priority=HIGH_PRIORITY,
                  arrival_time=100.0)
    engine.add_request(vip)
    assert [r.request_id for r in engine.load().waiting] == ["vip", "r1", "r2"]
    res = run_engine(engine)
    order = []
    for s in res.steps:
        assert len(s.outputs) <= 1
        order += [o.request_id for o in s.outputs if o.index == 0]
    assert order == ["vip", "r1", "r2"]  # r0 ran first; it is not preempted for vip
    assert_idle(engine)


def test_max_batch_size_and_max_batched_tokens_are_respected():
    max_batch, max_tokens = 3, 40
    engine = make_engine("sim", num_blocks=200, block_size=4, max_batch_size=max_batch,
                         max_batched_tokens=max_tokens)
    requests = make_requests(9, seed=8, max_tokens=5, prompt_len=(5, 25))
    requests.append(Request("long", tuple(range(60)), SamplingParams(max_tokens=3)))  # > budget: runs alone
    seen_running = []

    def watch(_round: int) -> None:
        seen_running.append(engine.load().num_running)

    res = run_engine(engine, requests=requests, before_step=lambda r: watch(r))
    assert res.steps and len(res.tokens) == 10
    assert max(seen_running) == max_batch
    saw_alone = False
    for s in res.steps:
        assert len(s.outputs) <= max_batch
        num_prefills = len(s.outputs) - s.num_decode_tokens
        if s.num_prefill_tokens + s.num_decode_tokens > max_tokens:
            assert num_prefills == 1 and s.num_decode_tokens == 0, s
            saw_alone = True
    assert saw_alone, "the long prompt never ran"
    assert_idle(engine)


@pytest.mark.parametrize("kind", ["sim", "torch"])
def test_an_over_budget_prompt_does_not_wait_for_the_batch_to_empty(kind):
    """A prompt over the step's token budget gets the next step to itself; the running
    requests wait that one step and then go on, with exactly their solo tokens."""
    cfg = dict(num_blocks=64, block_size=4, max_batched_tokens=40)
    decoding = [Request(f"d{i}", tuple(range(3 + i, 11 + i)), SamplingParams(max_tokens=30)) for i in range(2)]
    long = Request("long", tuple(range(5, 65)), SamplingParams(max_tokens=4))  # 60 tokens > 40
    engine = make_engine(kind, **cfg)
    for r in decoding:
        engine.add_request(r)
    tokens: dict[str, list[int]] = {}

    def collect(out) -> None:
        for o in out.outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)

    collect(engine.step())  # both prompts
    collect(engine.step())  # both decode
    engine.add_request(long)
    out = engine.step()
    collect(out)
    assert [o.request_id for o in out.outputs] == ["long"] and out.num_decode_tokens == 0
    out = engine.step()
    collect(out)
    assert {o.request_id for o in out.outputs} == {"d0", "d1", "long"}
    engine.check_invariants()
    full = run_to_completion(engine)  # picks up each request's outputs so far
    assert all(full[rid][:len(t)] == t for rid, t in tokens.items())
    assert full == solo_tokens(decoding + [long], kind=kind, **cfg)
    assert_idle(engine)


def test_prefill_stops_at_the_first_request_that_does_not_fit():
    """FCFS admission: a small request behind a big one that does not fit waits too."""
    engine = make_engine("sim", num_blocks=10, block_size=4, watermark=0.0, max_batch_size=8)
    engine.add_request(Request("a", tuple(range(20)), SamplingParams(max_tokens=8), arrival_time=0))  # 5 blocks
    engine.add_request(Request("b", tuple(range(20)), SamplingParams(max_tokens=8), arrival_time=1))  # 5 blocks
    engine.add_request(Request("c", tuple(range(24)), SamplingParams(max_tokens=8), arrival_time=2))  # 6 blocks
    engine.add_request(Request("d", (1,), SamplingParams(max_tokens=8), arrival_time=3))
    out = step(engine)
    assert sorted(o.request_id for o in out.outputs) == ["a", "b"]
    assert [r.request_id for r in engine.load().waiting] == ["c", "d"]
    run_to_completion(engine)
    assert_idle(engine)


# ----- migration primitives (engine level, no protocol) ------------------------------------------
def test_pre_alloc_respects_the_watermark():
    engine = make_engine("sim", num_blocks=20, block_size=4, watermark=0.1)
    assert engine.config.watermark_blocks == 2
    before = snapshot(engine)
    assert engine.pre_alloc("m", 19) is None
    assert snapshot(engine) == before
    got = engine.pre_alloc("m", 18)
    assert got is not None and len(got) == 18
    engine.check_invariants()
    assert engine.load().reserved_blocks == 18 and engine.reserved_blocks("m") == got
    assert engine.pre_alloc("m", 1) is None  # would dip into the watermark
    assert engine.pre_alloc("n", 1) is None
    assert engine.free_pre_alloc("m") == 18
    assert engine.free_pre_alloc("m") == 0
    assert engine.free_pre_alloc("never") == 0
    got = engine.pre_alloc("m", 3) + engine.pre_alloc("m", 2)  # reservations accumulate
    assert engine.reserved_blocks("m") == got
    assert engine.free_pre_alloc("m") == 5
    assert_idle(engine)


def test_pre_alloc_for_a_request_already_here_raises():
    engine = make_engine("sim")
    engine.add_request(make_requests(1, seed=0)[0])
    before = snapshot(engine)
    with pytest.raises(MigrationError):
        engine.pre_alloc("r0", 1)
    assert snapshot(engine) == before


@pytest.mark.parametrize("freeze_waiting", [False, True])
def test_freeze_unfreeze_round_trip_keeps_tokens(freeze_waiting):
    requests = make_requests(4, seed=31, sampling="mixed", max_tokens=12, prompt_len=(4, 20))
    reference = run_to_completion(make_engine(dtype="float64"), requests=requests)
    engine = make_engine(dtype="float64", max_batch_size=3)
    for r in requests:
        engine.add_request(r)
    tokens: dict[str, list[int]] = {}

    def collect(out: StepOutput) -> StepOutput:
        for o in out.outputs:
            assert o.index == len(tokens.setdefault(o.request_id, []))
            tokens[o.request_id].extend(o.new_token_ids)
        return out

    collect(step(engine))
    collect(step(engine))
    load = engine.load()
    target = load.waiting[0].request_id if freeze_waiting else load.running[1].request_id
    blocks_before = list(engine.seqs[target].block_table)

    state = engine.freeze(target)
    engine.check_invariants()
    assert state is not None and state.request_id == target
    if freeze_waiting:
        assert state.status == SeqStatus.WAITING and state.num_computed_tokens == 0
    else:
        assert state.status == SeqStatus.RUNNING
        assert state.num_computed_tokens == len(state.prompt_token_ids) + len(state.output_token_ids) - 1
        assert engine.incremental_blocks(target, 0, include_last=True) == blocks_before
    assert engine.freeze(target) is None  # already frozen
    frozen = [r for r in engine.load().running if r.request_id == target]
    assert len(frozen) == 1 and frozen[0].migrating
    assert target not in [r.request_id for r in engine.load().waiting]

    for _ in range(3):
        out = collect(step(engine))
        assert target not in [o.request_id for o in out.outputs]
        assert engine.seqs[target].block_table == blocks_before  # a frozen request's blocks stay put
    engine.unfreeze(target)
    engine.check_invariants()
    with pytest.raises(MigrationError):
        engine.unfreeze(target)
    while engine.has_unfinished():
        collect(step(engine))
    assert tokens == reference
    assert_idle(engine)


def test_freeze_unfreeze_tokens_identical_to_run_without_freeze():
    requests = make_requests(3, seed=41, sampling="mixed", max_tokens=10, prompt_len=(4, 20))
    reference = run_to_completion(make_engine(dtype="float64"), requests=requests)
    engine = make_engine(dtype="float64")

    def freeze_r1(round_no: int) -> None:
        if round_no == 2:
            assert engine.freeze("r1") is not None
        if round_no == 5:
            engine.unfreeze("r1")

    res = run_engine(engine, requests=requests, before_step=freeze_r1)
    assert res.tokens == reference
    assert_idle(engine)


def test_free_src_releases_a_frozen_request():
    engine = make_engine("sim", block_size=4)
    for r in make_requests(2, seed=1, max_tokens=8):
        engine.add_request(r)
    step(engine)
    with pytest.raises(MigrationError):
        engine.free_src("r0")  # not frozen
    assert engine.freeze("r0") is not None
    engine.free_src("r0")
    engine.check_invariants()
    assert "r0" not in engine.request_ids()
    res = run_engine(engine)
    assert set(res.tokens) == {"r1"}
    assert_idle(engine)


def test_incremental_blocks_is_none_after_preemption():
    engine = make_engine("sim", num_blocks=5, block_size=4, watermark=0.0)
    engine.add_request(Request("a", tuple(range(8)), SamplingParams(max_tokens=4), arrival_time=0))
    engine.add_request(Request("b", tuple(range(8)), SamplingParams(max_tokens=12), arrival_time=1))
    step(engine)  # both prefilled, 2 blocks each
    first = engine.incremental_blocks("b", 0, include_last=False)
    assert first == engine.seqs["b"].block_table and len(first) == 2
    assert engine.incremental_blocks("b", 2, include_last=False) == []
    out = step(engine)
    assert out.preempted == ("b",)
    assert engine.incremental_blocks("b", 2, include_last=False) is None  # waiting now
    while engine.seqs["b"].status != SeqStatus.RUNNING:
        step(engine)
    assert engine.seqs["b"].num_preemptions == 1
    assert engine.incremental_blocks("b", 2, include_last=False) is None  # running again, blocks recycled
    assert engine.freeze("b") is None
    # A fresh migration (num_sent == 0) starts a new epoch.
    assert engine.incremental_blocks("b", 0, include_last=True) == engine.seqs["b"].block_table
    assert engine.freeze("b") is not None
    engine.unfreeze("b")
    run_to_completion(engine)
    assert_idle(engine)


def _frozen_source(requests, steps: int, rid: str):
    """A float64 engine that ran ``requests`` for ``steps`` steps, then froze ``rid``."""
    src = make_engine(dtype="float64", block_size=4)
    for r in requests:
        src.add_request(r)
    res = RunResult()
    for _ in range(steps):
        res.record(step(src))
    state = src.freeze(rid)
    assert state is not None and state.status == SeqStatus.RUNNING
    return src, state, res


def test_commit_dst_checks_the_reservation_then_migration_keeps_tokens():
    requests = make_requests(2, seed=51, sampling="mixed", max_tokens=14, prompt_len=(9, 15))
    reference = run_to_completion(make_engine(dtype="float64", block_size=4), requests=requests)
    src, state, res = _frozen_source(requests, steps=4, rid="r1")
    need = cdiv(state.num_computed_tokens, 4)
    assert need >= 2

    dst = make_engine(dtype="float64", block_size=4)
    for wrong in (need - 1, need + 1):
        assert dst.pre_alloc("r1", wrong) is not None
        before = snapshot(dst)
        with pytest.raises(MigrationError, match="reserved blocks"):
            dst.commit_dst(state)
        assert snapshot(dst) == before
        dst.check_invariants()
        assert dst.free_pre_alloc("r1") == wrong
    bad_state = dataclasses.replace(state, num_computed_tokens=state.num_computed_tokens - 1)
    dst.pre_alloc("r1", cdiv(bad_state.num_computed_tokens, 4))
    before = snapshot(dst)
    with pytest.raises(MigrationError):
        dst.commit_dst(bad_state)  # KV must cover all but the last token
    assert snapshot(dst) == before
    dst.free_pre_alloc("r1")

    # The correct reservation: copy the KV, commit, and the request continues token for token.
    blocks = dst.pre_alloc("r1", need)
    src_blocks = src.incremental_blocks("r1", 0, include_last=True)
    assert blocks is not None and src_blocks is not None and len(src_blocks) == need
    dst.write_blocks(blocks, src.read_blocks(src_blocks))
    dst.commit_dst(state)
    dst.check_invariants()
    src.free_src("r1")
    with pytest.raises(MigrationError, match="already"):
        dst.commit_dst(state)
    run_engines([src, dst], result=res)  # outputs merge per request: r1's indices continue on dst
    assert_idle(src)
    assert_idle(dst)
    assert res.tokens == reference


# ----- the simulated engine ----------------------------------------------------------------------
def test_sim_engine_runs_a_batch_deterministically():
    requests = make_requests(40, seed=61, sampling="mixed", max_tokens=24, prompt_len=(16, 400))

    def run():
        engine = make_engine("sim", num_blocks=120, block_size=16, max_batch_size=16)
        res = run_engine(engine, requests=requests)
        assert_idle(engine)
        return res

    a, b = run(), run()
    assert len(a.tokens) == 40 and all(len(t) == 24 for t in a.tokens.values())
    assert set(a.finish_reasons.values()) == {FinishReason.LENGTH}
    assert a.tokens == b.tokens
    assert [s.duration_s for s in a.steps] == [s.duration_s for s in b.steps]
    assert [s.preempted for s in a.steps] == [s.preempted for s in b.steps]
    assert all(s.duration_s > 0 for s in a.steps if s.outputs)
    assert any(s.preempted for s in a.steps), "expected memory pressure with 120 blocks"
