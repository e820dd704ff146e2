"""The built-in sampler, one parameter at a time, on hand-built logits (vLLM's semantics).

Every test builds a logits row whose answer is known by hand, so a parameter that is
ignored, applied to the wrong tokens or in the wrong order changes the sampled token.
"""

from __future__ import annotations

import math

import pytest
import torch

from llumnix_py.engines.executor import SeqWork
from llumnix_py.engines.torch_engine.sampler import (
    apply_penalties,
    process_logits,
    prompt_logprobs,
    sample,
    token_logprobs,
)
from llumnix_py.engines.types import SamplingParams
from llumnix_py.errors import InvalidRequestError

VOCAB = 8


def work(sp: SamplingParams, history=(), prompt_len: int = 0, banned=(), index: int = 0, rid: str = "r") -> SeqWork:
    return SeqWork(rid, (1,), 4, (0,), sp, index, is_prefill=False, history=tuple(history),
                   prompt_len=prompt_len, banned_token_ids=tuple(banned))


def row(*values: float) -> torch.Tensor:
    x = torch.full((VOCAB,), -10.0)
    x[:len(values)] = torch.tensor(values)
    return x


def draw(x: torch.Tensor, sp: SamplingParams, n: int = 200, **kw) -> list[int]:
    """Tokens sampled at output positions 0..n-1 (each position has its own seeded draw)."""
    return [sample(x.unsqueeze(0), [work(sp, index=i, **kw)])[0] for i in range(n)]


def test_greedy_takes_argmax_and_seeded_draws_repeat():
    x = row(1.0, 3.0, 2.0)
    assert sample(x.unsqueeze(0), [work(SamplingParams())]) == [1]
    sp = SamplingParams(temperature=1.0, seed=7)
    assert draw(x, sp, 50) == draw(x, sp, 50)
    assert set(draw(x, sp)) >= {0, 1, 2}  # a real distribution, not argmax


def test_top_k_keeps_only_the_k_most_likely():
    x = row(2.0, 1.9, 1.8, 1.7)
    assert set(draw(x, SamplingParams(temperature=1.0, top_k=2, seed=1))) == {0, 1}
    assert set(draw(x, SamplingParams(temperature=1.0, top_k=0, seed=1))) == {0, 1, 2, 3}


def test_min_p_drops_tokens_below_a_fraction_of_the_most_likely():
    # probabilities about 0.58, 0.21, 0.21 (ratio e^-1 = 0.37) and e^-3 of the first
    x = row(3.0, 2.0, 2.0, 0.0)
    assert set(draw(x, SamplingParams(temperature=1.0, min_p=0.3, seed=2))) == {0, 1, 2}
    assert set(draw(x, SamplingParams(temperature=1.0, min_p=0.4, seed=2))) == {0}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    sp = SamplingParams(repetition_penalty=2.0)
    x = row(4.0, 3.0, -1.0, -1.0)
    out = apply_penalties(x, sp, prompt=[0], output=[2])
    assert out[:4].tolist() == [2.0, 3.0, -2.0, -1.0]  # prompt token 0 and output token 2 are penalized
    assert sample(x.unsqueeze(0), [work(sp, history=(0, 2), prompt_len=1)]) == [1]  # 3.0 now beats 2.0


def test_frequency_penalty_counts_output_tokens_and_presence_penalty_does_not():
    x = row(5.0, 4.0, 3.9)
    history = (0, 0, 0, 1, 0)  # prompt (0,), output (0, 0, 1, 0): token 0 three times, token 1 once
    freq = apply_penalties(x, SamplingParams(frequency_penalty=0.5), prompt=[0], output=[0, 0, 1, 0])
    assert freq[:3].tolist() == pytest.approx([3.5, 3.5, 3.9])
    pres = apply_penalties(x, SamplingParams(presence_penalty=0.5), prompt=[0], output=[0, 0, 1, 0])
    assert pres[:3].tolist() == pytest.approx([4.5, 3.5, 3.9])
    assert sample(x.unsqueeze(0), [work(SamplingParams(frequency_penalty=0.5), history, 1)]) == [2]
    assert sample(x.unsqueeze(0), [work(SamplingParams(presence_penalty=0.5), history, 1)]) == [0]
    # the prompt alone does not count for frequency or presence (vLLM: over generated tokens)
    assert sample(x.unsqueeze(0), [work(SamplingParams(frequency_penalty=2.0), (0, 0, 0), 3)]) == [0]
    # a negative penalty rewards repeats
    assert sample(row(3.0, 4.0).unsqueeze(0), [work(SamplingParams(presence_penalty=-2.0), (5, 0), 1)]) == [0]


def test_logit_bias_is_added_before_greedy_choice():
    x = row(2.0, 1.0)
    assert sample(x.unsqueeze(0), [work(SamplingParams(logit_bias=((1, 5.0),)))]) == [1]
    assert sample(x.unsqueeze(0), [work(SamplingParams(logit_bias={0: -100.0}))]) == [1]
    assert set(draw(x, SamplingParams(temperature=1.0, seed=3, logit_bias=((0, -100.0), (1, -100.0))))) <= set(
        range(2, VOCAB))


def test_banned_tokens_cannot_be_sampled():
    x = row(9.0, 1.0)
    assert sample(x.unsqueeze(0), [work(SamplingParams(), banned=(0,))]) == [1]
    assert 0 not in draw(x, SamplingParams(temperature=2.0, seed=4), banned=(0,))


def test_processing_order_bias_then_penalties():
    # bias lifts token 1 to 6.0, then repetition penalty (token 1 in the prompt) halves it: 3.0 < 4.0
    sp = SamplingParams(logit_bias=((1, 5.0),), repetition_penalty=2.0)
    x = row(4.0, 1.0)
    assert process_logits(x, work(sp, history=(1,), prompt_len=1))[:2].tolist() == [4.0, 3.0]


def test_logprobs_are_of_the_raw_logits_with_the_top_k():
    x = row(2.0, 1.0, 0.5)
    lp = torch.log_softmax(x, -1)
    [got] = token_logprobs(x.unsqueeze(0), [1], 2)
    assert got.logprob == pytest.approx(lp[1].item())
    assert [t for t, _ in got.top] == [0, 1]
    assert [v for _, v in got.top] == pytest.approx([lp[0].item(), lp[1].item()])
    assert token_logprobs(x.unsqueeze(0), [2], 0)[0].top == ()
    assert math.exp(got.top[0][1]) + math.exp(got.top[1][1]) < 1.0


def test_prompt_logprobs_score_each_token_from_the_position_before():
    logits = torch.stack([row(0.0, 5.0), row(5.0, 0.0), row(1.0, 1.0)])
    got = prompt_logprobs(logits, [7, 1, 0], 1)
    assert got[0] is None and len(got) == 3
    assert got[1].logprob == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())
    assert got[2].logprob == pytest.approx(torch.log_softmax(logits[1], -1)[0].item())
    assert prompt_logprobs(logits[:1], [3], 0) == (None,)


@pytest.mark.parametrize("kw", [
    {"top_k": -1}, {"top_k": 1.5}, {"min_p": 1.5}, {"min_p": float("nan")}, {"presence_penalty": 2.5},
    {"frequency_penalty": -3}, {"repetition_penalty": 0.0}, {"repetition_penalty": float("inf")},
    {"logit_bias": ((1, 101.0),)}, {"logit_bias": ((-1, 1.0),)}, {"logit_bias": ((1, 1.0), (1, 2.0))},
    {"logit_bias": "x"}, {"min_tokens": -1}, {"min_tokens": 17}, {"logprobs": 21}, {"prompt_logprobs": -1},
    {"logprobs": True}, {"ignore_eos": 1},
])
def test_invalid_sampling_params_are_refused(kw):
    with pytest.raises(InvalidRequestError):
        SamplingParams(max_tokens=16, **kw)


def test_sampling_params_round_trip_the_wire():
    sp = SamplingParams(max_tokens=9, temperature=0.7, top_k=3, min_p=0.1, presence_penalty=0.5,
                        frequency_penalty=-0.5, repetition_penalty=1.3, logit_bias={5: 2.0, 1: -1.0},
                        min_tokens=2, seed=-5, stop_token_ids=(4,), logprobs=3, prompt_logprobs=0)
    assert sp.logit_bias == ((1, -1.0), (5, 2.0))
    assert SamplingParams.from_wire(sp.to_wire()) == sp
    with pytest.raises(InvalidRequestError):
        SamplingParams.from_wire({**sp.to_wire(), "mirostat": 1})
