"""The vLLM adapter as an engine: serving, load snapshots, validation, registration."""

from __future__ import annotations

import pytest

from llumnix_py.engines.types import FinishReason, Request, SamplingParams
from llumnix_py.errors import InvalidRequestError, UnknownRequestError

PROMPT = tuple(range(5, 75))  # 70 tokens: two full 32-token blocks and a partial one


def run_alone(engine, request: Request) -> list[int]:
    """Tokens of ``request`` run to completion on ``engine``, checking output indices."""
    engine.add_request(request)
    tokens: list[int] = []
    finished = None
    while engine.has_unfinished():
        for o in engine.step().outputs:
            assert o.request_id == request.request_id
            assert o.index == len(tokens), (o.index, len(tokens))
            tokens.extend(o.new_token_ids)
            finished = o.finish_reason or finished
        engine.check_invariants()
    assert finished is not None
    return tokens


def test_registered_as_engine_kind(checkpoint):
    from llumnix_py.engines.registry import EngineSpec, engine_kinds

    assert "vllm" in engine_kinds()
    spec = EngineSpec(kind="vllm", checkpoint=checkpoint)
    assert spec.kind == "vllm"


def test_unsupported_version_is_a_clear_error():
    from llumnix_py.engines.vllm._internals import UnsupportedVLLMVersionError, check_version

    assert check_version().startswith("0.32.")
    with pytest.raises(UnsupportedVLLMVersionError, match="vLLM 0.31.0 is not supported"):
        check_version("0.31.0")


def test_generates_with_consecutive_indices_and_frees_blocks(engines):
    a, _ = engines
    tokens = run_alone(a, Request("r1", PROMPT, SamplingParams(max_tokens=20, ignore_eos=True)))
    assert len(tokens) == 20
    assert run_alone(a, Request("r2", PROMPT, SamplingParams(max_tokens=20, ignore_eos=True))) == tokens


def test_step_reports_prefill_then_decode_and_load(engines):
    a, _ = engines
    a.add_request(Request("r", PROMPT, SamplingParams(max_tokens=5, ignore_eos=True), priority=1))
    load = a.load()
    assert [r.request_id for r in load.waiting] == ["r"] and load.waiting[0].blocks_needed == 3
    first = a.step()
    assert first.num_prefill_tokens == len(PROMPT) and first.num_decode_tokens == 0
    assert [(o.index, len(o.new_token_ids)) for o in first.outputs] == [(0, 1)]
    load = a.load()
    assert [r.request_id for r in load.running] == ["r"]
    r = load.running[0]
    assert (r.num_blocks, r.prompt_len, r.output_len, r.priority) == (3, 70, 1, 1)
    assert load.used_blocks == 3 and load.free_blocks == load.total_blocks - 3
    second = a.step()
    assert second.num_prefill_tokens == 0 and second.num_decode_tokens == 1
    while a.has_unfinished():
        out = a.step()
    assert out.outputs[-1].finish_reason == FinishReason.LENGTH and out.outputs[-1].index == 4


def test_stop_token_finishes_with_stop(engines):
    a, _ = engines
    ref = run_alone(a, Request("ref", PROMPT, SamplingParams(max_tokens=10, ignore_eos=True)))
    stop = ref[3]
    a.add_request(Request("s", PROMPT, SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(stop,))))
    outs = []
    while a.has_unfinished():
        outs.extend(a.step().outputs)
    assert outs[-1].finish_reason == FinishReason.STOP
    assert [t for o in outs for t in o.new_token_ids] == ref[: ref.index(stop) + 1]


def test_abort_frees_blocks(engines):
    a, _ = engines
    a.add_request(Request("x", PROMPT, SamplingParams(max_tokens=50, ignore_eos=True)))
    a.step()
    assert a.load().used_blocks == 3
    a.abort_request("x")
    assert a.load().used_blocks == 0 and not a.has_unfinished()
    with pytest.raises(UnknownRequestError):
        a.abort_request("x")
    a.step()  # the worker forgets it


def test_invalid_requests_are_refused(engines):
    a, _ = engines
    vocab = a._vocab_size
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        a.add_request(Request("v", (1, vocab), SamplingParams()))
    with pytest.raises(InvalidRequestError, match="no room for output"):
        a.add_request(Request("l", tuple([5] * 512), SamplingParams()))
    a.add_request(Request("d", PROMPT, SamplingParams(max_tokens=2)))
    with pytest.raises(InvalidRequestError, match="already exists"):
        a.add_request(Request("d", PROMPT, SamplingParams(max_tokens=2)))
    a.abort_request("d")


def test_sampling_fields_are_passed_to_vllm_sampling_params():
    from vllm import SamplingParams as VSamplingParams

    from llumnix_py.engines.vllm.adapter import vllm_sampling_kwargs

    sp = SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, presence_penalty=0.5,
                        frequency_penalty=-0.3, repetition_penalty=1.2, logit_bias={7: 3.0}, min_tokens=4,
                        seed=11, stop_token_ids=(2,), logprobs=3, prompt_logprobs=1)
    v = VSamplingParams(**vllm_sampling_kwargs(sp, remaining=9, num_prior=0, seed=sp.seed))
    assert (v.top_k, v.min_p, v.presence_penalty, v.frequency_penalty, v.repetition_penalty) == (5, 0.1, 0.5, -0.3, 1.2)
    assert v.logit_bias == {7: 3.0} and v.min_tokens == 4 and v.seed == 11 and v.stop_token_ids == [2]
    assert (v.logprobs, v.prompt_logprobs, v.max_tokens, v.temperature, v.top_p) == (3, 1, 9, 0.7, 0.9)
    # a migrated-in request with 3 outputs already: min_tokens counts down, the prompt was scored at its start
    moved = VSamplingParams(**vllm_sampling_kwargs(sp, remaining=6, num_prior=3, seed=5))
    assert moved.min_tokens == 1 and moved.prompt_logprobs is None and moved.max_tokens == 6
    plain = VSamplingParams(**vllm_sampling_kwargs(SamplingParams(), remaining=16, num_prior=0, seed=None))
    assert plain.top_k == 0 and plain.logit_bias is None and plain.logprobs is None and plain.repetition_penalty == 1.0


def test_logit_bias_and_logprobs_come_back_from_vllm(engines):
    a, _ = engines
    sp = SamplingParams(max_tokens=4, ignore_eos=True, logit_bias={7: 100.0}, logprobs=2, prompt_logprobs=1)
    a.add_request(Request("lp", PROMPT, sp))
    outs = []
    while a.has_unfinished():
        outs.extend(o for o in a.step().outputs if o.new_token_ids)
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == [7, 7, 7, 7]  # the bias reached vLLM's sampler
    lps = [lp for o in outs for lp in o.logprobs]
    assert len(lps) == 4 and all(len(lp.top) == 2 and lp.logprob <= 0 for lp in lps)
    assert all(lp.top[0][1] >= lp.top[1][1] for lp in lps)  # most likely first
    prompt = outs[0].prompt_logprobs
    assert prompt is not None and prompt[0] is None and len(prompt) == len(PROMPT)
    assert all(p is not None and len(p.top) == 1 for p in prompt[1:])
    assert all(o.prompt_logprobs is None for o in outs[1:])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        a.add_request(Request("bad", PROMPT, SamplingParams(logit_bias={a._vocab_size: 1.0})))
    a.step()
