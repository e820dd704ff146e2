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
