"""The built-in engine with vLLM's sampling fields and log probabilities, including across a migration.

A migrated request must produce exactly the tokens, and the log probabilities, it would
have produced without the migration: penalties read the request's prompt and output
tokens and ``min_tokens`` its output length, which travel in ``MigrationRequestState``
(checked here through its wire form, as the migration protocol sends it).
"""

from __future__ import annotations

import random

import pytest
import torch

from llumnix_py.engines.sequence import cdiv
from llumnix_py.engines.torch_engine.model import dense_reference_forward
from llumnix_py.engines.types import FinishReason, MigrationRequestState, Request, SamplingParams, SeqStatus
from llumnix_py.errors import InvalidRequestError
from tests.factories import SMALL_VOCAB, make_engine

EOS = 257  # the small model's tokenizer's end-of-sequence id (make_engine's default)
BLOCK = 4


def penalized_requests(max_tokens: int = 12) -> list[Request]:
    """Greedy and seeded requests, each with another mix of the new sampling fields, all with logprobs."""
    rng = random.Random(18)
    sps = [
        SamplingParams(max_tokens=max_tokens, repetition_penalty=0.5, frequency_penalty=1.5, presence_penalty=0.5,
                       logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=max_tokens, temperature=0.9, seed=11, presence_penalty=1.2, top_k=20,
                       logprobs=0, ignore_eos=True),
        SamplingParams(max_tokens=max_tokens, temperature=1.1, seed=12, min_p=0.05, frequency_penalty=-0.4,
                       logit_bias=((3, 2.0), (5, -50.0)), logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.8, repetition_penalty=0.8, seed=13,
                       min_tokens=max_tokens, logprobs=1, prompt_logprobs=2),
    ]
    return [Request(f"p{i}", tuple(rng.randrange(SMALL_VOCAB) for _ in range(7 + 3 * i)), sp, arrival_time=float(i))
            for i, sp in enumerate(sps)]


def run(engines, outputs: dict, max_steps: int = 1000) -> None:
    """Step every engine until none holds a request, collecting outputs per request id."""
    for _ in range(max_steps):
        if not any(e.has_unfinished() for e in engines):
            return
        for e in engines:
            for o in e.step().outputs:
                outputs.setdefault(o.request_id, []).append(o)
            e.check_invariants()
    raise AssertionError("engines did not finish")


def flatten(outs) -> tuple[list[int], list, object, FinishReason]:
    """Tokens, per-token logprobs, prompt logprobs and finish reason of one request's outputs (in order)."""
    assert outs
    tokens, lps, prompt = [], [], None
    for o in outs:
        assert o.index == len(tokens)
        tokens += o.new_token_ids
        lps += o.logprobs or ()
        prompt = prompt or o.prompt_logprobs
    return tokens, lps, prompt, outs[-1].finish_reason


def test_penalized_and_seeded_requests_migrate_with_identical_tokens_and_logprobs():
    requests = penalized_requests()
    ref: dict = {}
    ref_engine = make_engine(dtype="float64", block_size=BLOCK)
    for r in requests:
        ref_engine.add_request(r)
    run([ref_engine], ref)

    src, dst = make_engine(dtype="float64", block_size=BLOCK), make_engine(dtype="float64", block_size=BLOCK)
    got: dict = {}
    for r in requests:
        src.add_request(r)
    for _ in range(5):  # every request has a few outputs (the penalties have something to read)
        for o in src.step().outputs:
            got.setdefault(o.request_id, []).append(o)
    for r in requests:  # migrate each one: pre-copy all blocks, freeze, state over the wire, commit
        state = src.freeze(r.request_id)
        assert state is not None and state.status == SeqStatus.RUNNING and state.output_token_ids
        state = MigrationRequestState.from_wire(state.to_wire())
        assert state.sampling == r.sampling
        blocks = dst.pre_alloc(r.request_id, cdiv(state.num_computed_tokens, BLOCK))
        dst.write_blocks(blocks, src.read_blocks(src.incremental_blocks(r.request_id, 0, include_last=True)))
        dst.commit_dst(state)
        src.free_src(r.request_id)
    run([src, dst], got)
    for r in requests:
        want, have = flatten(ref[r.request_id]), flatten(got[r.request_id])
        assert have[0] == want[0], f"{r.request_id}: tokens differ after migration"
        assert len(have[1]) == len(have[0]) and have[1] == want[1], f"{r.request_id}: logprobs differ"
        assert have[2] == want[2] and have[3] == want[3]
        k = r.sampling.logprobs
        assert all(len(lp.top) == k for lp in have[1])
    assert flatten(got["p3"])[2] is not None and flatten(got["p0"])[2] is None
    # the penalties really changed the outputs: without them the greedy request differs
    plain: dict = {}
    e = make_engine(dtype="float64", block_size=BLOCK)
    e.add_request(Request("p0", requests[0].prompt_token_ids, SamplingParams(max_tokens=12, ignore_eos=True)))
    run([e], plain)
    assert flatten(plain["p0"])[0] != flatten(ref["p0"])[0]


def test_min_tokens_holds_off_eos_and_stop_tokens():
    def tokens(**kw) -> tuple[list[int], FinishReason]:
        engine = make_engine()
        engine.add_request(Request("m", (1, 2, 3), SamplingParams(max_tokens=8, **kw)))
        out: dict = {}
        run([engine], out)
        t, _, _, reason = flatten(out["m"])
        return t, reason

    assert tokens(logit_bias={EOS: 100.0}) == ([EOS], FinishReason.STOP)  # forced eos ends at once
    t, reason = tokens(logit_bias={EOS: 100.0}, min_tokens=3)
    assert len(t) == 4 and EOS not in t[:3] and t[3] == EOS and reason == FinishReason.STOP
    t, reason = tokens(logit_bias={9: 100.0}, stop_token_ids=(9,), min_tokens=2, temperature=1.0, seed=5)
    assert len(t) == 3 and 9 not in t[:2] and t[2] == 9 and reason == FinishReason.STOP
    t, reason = tokens(logit_bias={EOS: 100.0}, min_tokens=8)
    assert len(t) == 8 and EOS not in t and reason == FinishReason.LENGTH


def test_prompt_logprobs_match_a_dense_forward_and_come_once():
    engine = make_engine(dtype="float64", block_size=BLOCK)
    prompt = (5, 17, 200, 3, 3, 64)
    engine.add_request(Request("s", prompt, SamplingParams(max_tokens=3, prompt_logprobs=2, logprobs=1,
                                                           ignore_eos=True)))
    out: dict = {}
    run([engine], out)
    assert out["s"][0].prompt_logprobs is not None
    assert all(o.prompt_logprobs is None for o in out["s"][1:])
    tokens, lps, plps, _ = flatten(out["s"])
    dense = torch.log_softmax(dense_reference_forward(engine.executor.model, torch.tensor(prompt + tuple(tokens))),
                              dim=-1)
    assert plps[0] is None and len(plps) == len(prompt)
    for i in range(1, len(prompt)):
        assert plps[i].logprob == pytest.approx(dense[i - 1, prompt[i]].item(), abs=1e-9)
        assert [t for t, _ in plps[i].top] == torch.topk(dense[i - 1], 2).indices.tolist()
    for j, lp in enumerate(lps):
        assert lp.logprob == pytest.approx(dense[len(prompt) - 1 + j, tokens[j]].item(), abs=1e-9)
        assert lp.top[0][0] == tokens[j]  # greedy: the sampled token is the most likely one


def test_engine_refuses_what_it_cannot_honour():
    engine = make_engine()
    for sp in (SamplingParams(logit_bias={SMALL_VOCAB: 1.0}), SamplingParams(stop_token_ids=(SMALL_VOCAB + 5,))):
        with pytest.raises(InvalidRequestError, match="vocabulary"):
            engine.add_request(Request("x", (1, 2), sp))
    sim = make_engine("sim")
    for sp in (SamplingParams(logprobs=0), SamplingParams(prompt_logprobs=1)):
        with pytest.raises(InvalidRequestError, match="log probabilities"):
            sim.check_request(Request("x", (1, 2), sp))
    assert engine.request_ids() == [] and engine.blocks.num_free == engine.config.num_blocks
