"""Workload generation: length distributions, arrivals, trace loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.workloads import (
    BURSTGPT_STATS,
    GENERATED_TRACES,
    MAX_LEN,
    PAPER_DISTRIBUTIONS,
    SHAREGPT_STATS,
    LengthTrace,
    WorkloadRequest,
    burstgpt_like,
    fit_lognormal,
    gamma_arrivals,
    generated_trace,
    load_burstgpt_csv,
    load_sharegpt_json,
    make_workload,
    poisson_arrivals,
    sharegpt_like,
    zipf_lengths,
)
from llumnix_py.engines.types import HIGH_PRIORITY, NORMAL_PRIORITY


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def within(value: float, target: float, tol: float) -> bool:
    return abs(value - target) <= tol * target


# ---- lengths --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PAPER_DISTRIBUTIONS))
def test_zipf_mean_and_bounds(name):
    mean, exponent = PAPER_DISTRIBUTIONS[name]
    x = zipf_lengths(100_000, mean, exponent, rng=rng(1))
    assert x.dtype == np.int64 and len(x) == 100_000
    assert within(x.mean(), mean, 0.05)
    assert x.min() >= 1 and x.max() <= MAX_LEN


def test_zipf_respects_a_small_cap():
    x = zipf_lengths(20_000, 128, 1.15, cap=300, rng=rng(2))
    assert x.max() <= 300 and within(x.mean(), 128, 0.05)


def test_zipf_rejects_bad_arguments():
    with pytest.raises(ValueError):
        zipf_lengths(10, 0, 1.0, rng=rng())
    with pytest.raises(ValueError):
        zipf_lengths(10, 512, 1.0, cap=100, rng=rng())


@pytest.mark.parametrize("kind", GENERATED_TRACES)
def test_generated_trace_means(kind):
    prompts, outputs = generated_trace(kind, 50_000, rng(3))
    p_kind, o_kind = kind.split("-")
    assert within(prompts.mean(), PAPER_DISTRIBUTIONS[p_kind][0], 0.05)
    assert within(outputs.mean(), PAPER_DISTRIBUTIONS[o_kind][0], 0.05)


def test_generated_trace_rejects_unknown_kind():
    with pytest.raises(ValueError):
        generated_trace("S-X", 10, rng())


@pytest.mark.parametrize("sampler,stats", [(sharegpt_like, SHAREGPT_STATS), (burstgpt_like, BURSTGPT_STATS)],
                         ids=["sharegpt", "burstgpt"])
def test_trace_like_lengths_match_table1(sampler, stats):
    inputs, outputs = sampler(50_000, rng(4))
    for values, (mean, p99) in ((inputs, stats["input"]), (outputs, stats["output"])):
        assert within(values.mean(), mean, 0.15)
        assert within(np.percentile(values, 99), p99, 0.15)
        assert values.min() >= 1 and values.max() <= MAX_LEN


def test_fit_lognormal_hits_p99_and_rejects_impossible():
    mu, sigma = fit_lognormal(306, 3388)
    assert np.exp(mu + 2.3263478740408408 * sigma) == pytest.approx(3388)
    with pytest.raises(ValueError):
        fit_lognormal(500, 400)


# ---- arrivals ----------------------------------------------------------------------------
def test_poisson_mean_gap_and_cv():
    t = poisson_arrivals(50_000, rate=4.0, rng=rng(5))
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert (gaps > 0).all()
    assert within(gaps.mean(), 0.25, 0.03)
    assert within(gaps.std() / gaps.mean(), 1.0, 0.05)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_mean_gap_and_cv(cv):
    t = gamma_arrivals(100_000, rate=2.0, cv=cv, rng=rng(6))
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert within(gaps.mean(), 0.5, 0.05)
    assert within(gaps.std() / gaps.mean(), cv, 0.1)


@pytest.mark.parametrize("kw", [{"rate": 0.0}, {"rate": float("inf")}, {"rate": 1.0, "cv": 0.0}])
def test_arrivals_reject_bad_parameters(kw):
    with pytest.raises(ValueError):
        gamma_arrivals(10, kw["rate"], kw.get("cv", 1.0), rng())


# ---- make_workload -----------------------------------------------------------------------------
@pytest.mark.parametrize("trace", GENERATED_TRACES + ("sharegpt", "burstgpt"))
def test_make_workload_deterministic_and_sorted(trace):
    a = make_workload(trace, 200, rate=5.0, seed=7)
    b = make_workload(trace, 200, rate=5.0, seed=7)
    c = make_workload(trace, 200, rate=5.0, seed=8)
    assert len(a) == 200
    assert a == b and a != c
    assert all(isinstance(r, WorkloadRequest) for r in a)
    times = [r.arrival_time for r in a]
    assert times == sorted(times)
    assert all(r.prompt_len >= 1 and r.output_len >= 1 for r in a)


def test_make_workload_rate_sweep_keeps_lengths():
    slow = make_workload("sharegpt", 100, rate=1.0, seed=3)
    fast = make_workload("sharegpt", 100, rate=10.0, cv=3.0, seed=3)
    assert [r.prompt_len for r in slow] == [r.prompt_len for r in fast]
    assert fast[-1].arrival_time < slow[-1].arrival_time


def test_make_workload_priority_ratio():
    reqs = make_workload("M-M", 10_000, rate=10.0, priority_ratio=0.1, seed=1)
    high = sum(r.priority == HIGH_PRIORITY for r in reqs)
    assert 0.08 * len(reqs) <= high <= 0.12 * len(reqs)
    assert all(r.priority in (HIGH_PRIORITY, NORMAL_PRIORITY) for r in reqs)
    assert all(r.priority == NORMAL_PRIORITY for r in make_workload("M-M", 100, rate=1.0))


@pytest.mark.parametrize("kw", [{"trace": "nope"}, {"priority_ratio": 1.5}, {"rate": -1.0}, {"rate": None}])
def test_make_workload_rejects_bad_arguments(kw):
    args = {"trace": "S-S", "n": 10, "rate": 1.0} | kw
    with pytest.raises(ValueError):
        make_workload(**args)


# ---- trace files ---------------------------------------------------------------------------------
def write_sharegpt(path, entries):
    path.write_text(json.dumps(entries))
    return path


def conv(human: str, gpt: str):
    return {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


def test_load_sharegpt(tmp_path):
    path = write_sharegpt(tmp_path / "sg.json", [
        conv("a" * 400, "b" * 40),
        {"conversations": [{"from": "human", "value": "only one turn"}]},  # skipped
        {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},  # skipped
        conv("hi", "c" * 80000),
    ])
    trace = load_sharegpt_json(path)
    assert trace.prompt_lens.tolist() == [100, 1]  # len("hi")//4 == 0, clipped to 1
    assert trace.output_lens.tolist() == [10, MAX_LEN]
    assert trace.arrival_times is None
    assert load_sharegpt_json(path, tokenizer_len_fn=len, n=1).prompt_lens.tolist() == [400]


@pytest.mark.parametrize("content", [
    "not json",
    json.dumps({"conversations": []}),
    json.dumps([{"no": "conversations"}]),
    json.dumps([{"conversations": [{"from": "human"}]}]),
    json.dumps([{"conversations": [{"from": "human", "value": "only"}]}]),  # nothing usable
])
def test_load_sharegpt_rejects_malformed(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        load_sharegpt_json(path)


def test_load_burstgpt_and_replay(tmp_path):
    path = tmp_path / "burst.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,100,20,120,Conversation log\n"
        "6.5,GPT-4,300,0,300,Conversation log\n"  # failed request: skipped
        "7,ChatGPT,9000,30,9030,API log\n"
    )
    trace = load_burstgpt_csv(path)
    assert trace.prompt_lens.tolist() == [100, MAX_LEN]
    assert trace.output_lens.tolist() == [20, 30]
    assert trace.arrival_times.tolist() == [0.0, 2.0]
    replay = make_workload(trace, 2, rate=None)
    assert [(r.arrival_time, r.prompt_len, r.output_len) for r in replay] == [(0.0, 100, 20), (2.0, MAX_LEN, 30)]
    assert len(load_burstgpt_csv(path, n=1).prompt_lens) == 1
    with pytest.raises(ValueError):
        make_workload(trace, 3, rate=1.0)  # more requests than the trace holds


@pytest.mark.parametrize("content", [
    "Timestamp,Request tokens\n1,2\n",  # missing column
    "Timestamp,Request tokens,Response tokens\n1,abc,3\n",  # non-numeric
    "Timestamp,Request tokens,Response tokens\n1,-4,3\n",  # negative
    "Timestamp,Request tokens,Response tokens\n1,inf,3\n",  # infinite
    "Timestamp,Request tokens,Response tokens\n",  # no rows
])
def test_load_burstgpt_rejects_malformed(tmp_path, content):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError):
        load_burstgpt_csv(path)


def test_length_trace_without_times_cannot_replay():
    trace = LengthTrace(np.array([5, 6]), np.array([7, 8]))
    with pytest.raises(ValueError):
        make_workload(trace, 2, rate=None)
    assert [r.prompt_len for r in make_workload(trace, 2, rate=1.0)] in ([5, 6], [6, 5])
