"""Request workloads for the experiments: lengths, arrivals, priorities.

Lengths (``prompt_len``, ``output_len`` in tokens):

* the paper's generated distributions: a power law (Zipf) over
  ``1 .. 2*mean-1``, rescaled to the target mean and capped at 6144 tokens;
  ``S``/``M``/``L`` = mean 128/256/512 with exponent 2.0/1.5/1.15, combined as
  ``"S-L"`` (short inputs, long outputs) and so on;
* ShareGPT-like and BurstGPT-like synthetic lengths: a log-normal per
  column, fitted to the mean and P99 of the paper's Table 1 (see
  ``fit_lognormal``); input and output are drawn independently;
* real trace files, when a user has one (``load_sharegpt_json``,
  ``load_burstgpt_csv``).

Arrivals: a Poisson process, or a Gamma renewal process with a chosen
coefficient of variation (burstier for CV > 1). ``make_workload`` ties it
together from one seed; lengths, arrivals and priorities use independent
streams of that seed, so sweeping the rate keeps the same lengths.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from llumnix_py.engines.types import HIGH_PRIORITY, NORMAL_PRIORITY, Objective

MAX_LEN = 6144
PAPER_DISTRIBUTIONS: dict[str, tuple[int, float]] = {"S": (128, 2.0), "M": (256, 1.5), "L": (512, 1.15)}
GENERATED_TRACES = tuple(f"{a}-{b}" for a, b in (("S", "S"), ("M", "M"), ("L", "L"), ("S", "L"), ("L", "S")))

# Paper, Table 1: (mean, P99) of input and output lengths.
SHAREGPT_STATS = {"input": (306.0, 3388.0), "output": (500.0, 1234.0)}
BURSTGPT_STATS = {"input": (830.0, 3549.0), "output": (271.0, 964.0)}

_Z99 = 2.3263478740408408  # standard normal quantile at 0.99


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload: when it arrives and how long it is."""

    arrival_time: float
    prompt_len: int
    output_len: int
    priority: int = NORMAL_PRIORITY
    objective: Optional[Objective] = None  # SLO experiments (experiments/slo.py); None: none


@dataclass(frozen=True)
class LengthTrace:
    """Lengths (and, for traces that record them, arrival times) read from a file."""

    prompt_lens: np.ndarray
    output_lens: np.ndarray
    arrival_times: Optional[np.ndarray] = None


# ---- lengths -----------------------------------------------------------------
def _zipf_pmf(mean: int, exponent: float) -> tuple[np.ndarray, np.ndarray]:
    support = np.arange(1, 2 * mean, dtype=np.float64)
    weights = support**-exponent
    return support, weights / weights.sum()


def _zipf_scale(mean: float, exponent: float, cap: int) -> float:
    """The factor s with E[clip(round(s * k), 1, cap)] == mean, by bisection."""
    support, pmf = _zipf_pmf(int(mean), exponent)

    def scaled_mean(s: float) -> float:
        return float(pmf @ np.clip(np.rint(s * support), 1, cap))

    lo, hi = 0.0, float(cap)
    if scaled_mean(hi) < mean:
        raise ValueError(f"mean {mean} is unreachable under cap {cap}")
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if scaled_mean(mid) < mean else (lo, mid)
    return hi


def zipf_lengths(n: int, mean: int, exponent: float, cap: int = MAX_LEN, *, rng: np.random.Generator) -> np.ndarray:
    """``n`` lengths from the paper's power law, as int64 in ``[1, cap]``.

    ``k`` is drawn from ``P(k) ~ k**-exponent`` over ``1 .. 2*mean-1``, then
    scaled by the factor that makes the *population* mean of the rounded,
    capped lengths equal ``mean``.
    """
    _check_n(n)
    if mean < 1 or exponent <= 0 or cap < mean:
        raise ValueError(f"need mean >= 1, exponent > 0, cap >= mean; got {mean}, {exponent}, {cap}")
    support, pmf = _zipf_pmf(int(mean), exponent)
    scale = _zipf_scale(mean, exponent, cap)
    k = rng.choice(support, size=n, p=pmf)
    return np.clip(np.rint(scale * k), 1, cap).astype(np.int64)


def generated_trace(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths of a generated trace ``kind`` in ``S-S, M-M, L-L, S-L, L-S``."""
    if kind not in GENERATED_TRACES:
        raise ValueError(f"unknown generated trace {kind!r}; expected one of {GENERATED_TRACES}")
    prompt_kind, output_kind = kind.split("-")
    prompts = zipf_lengths(n, *PAPER_DISTRIBUTIONS[prompt_kind], rng=rng)
    outputs = zipf_lengths(n, *PAPER_DISTRIBUTIONS[output_kind], rng=rng)
    return prompts, outputs


def _clipped_lognormal_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(X, cap)] for X ~ LogNormal(mu, sigma)."""
    phi = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))  # noqa: E731
    c = math.log(cap)
    below = math.exp(mu + sigma**2 / 2) * phi((c - mu - sigma**2) / sigma)
    return below + cap * (1.0 - phi((c - mu) / sigma))


def fit_lognormal(mean: float, p99: float, cap: float = MAX_LEN) -> tuple[float, float]:
    """(mu, sigma) of a log-normal whose P99 is ``p99`` and whose mean *after capping* is ``mean``.

    P99 fixes ``mu = ln(p99) - z99 * sigma``; the capped mean then falls as
    sigma grows from 0 (where the mean is ``p99``) to ``z99``, so bisection on
    sigma in ``(0, z99)`` finds the narrower of the two solutions.
    """
    if not (0 < mean < p99 < cap):
        raise ValueError(f"need 0 < mean < p99 < cap, got {mean}, {p99}, {cap}")
    lo, hi = 1e-6, _Z99
    for _ in range(200):
        mid = (lo + hi) / 2
        if _clipped_lognormal_mean(math.log(p99) - _Z99 * mid, mid, cap) > mean:
            lo = mid
        else:
            hi = mid
    sigma = (lo + hi) / 2
    return math.log(p99) - _Z99 * sigma, sigma


def _lognormal_lengths(n: int, mean: float, p99: float, rng: np.random.Generator) -> np.ndarray:
    mu, sigma = fit_lognormal(mean, p99)
    return np.clip(np.rint(rng.lognormal(mu, sigma, size=n)), 1, MAX_LEN).astype(np.int64)


def sharegpt_like(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Lengths matching ShareGPT's Table 1 statistics (input 306/3388, output 500/1234 mean/P99)."""
    _check_n(n)
    return (
        _lognormal_lengths(n, *SHAREGPT_STATS["input"], rng),
        _lognormal_lengths(n, *SHAREGPT_STATS["output"], rng),
    )


def burstgpt_like(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Lengths matching BurstGPT's Table 1 statistics (input 830/3549, output 271/964 mean/P99)."""
    _check_n(n)
    return (
        _lognormal_lengths(n, *BURSTGPT_STATS["input"], rng),
        _lognormal_lengths(n, *BURSTGPT_STATS["output"], rng),
    )


# ---- trace files ---------------------------------------------------------------
def _default_len(text: str) -> int:
    return len(text) // 4


def load_sharegpt_json(
    path: Union[str, Path],
    tokenizer_len_fn: Callable[[str], int] = _default_len,
    n: Optional[int] = None,
    cap: int = MAX_LEN,
) -> LengthTrace:
    """Lengths of the first (human, gpt) turn pair of each ShareGPT conversation.

    The file is a JSON list of ``{"conversations": [{"from": ..., "value": ...}, ...]}``.
    Conversations with fewer than two turns, or whose first two turns are not a
    human prompt and a model answer, are skipped (as vLLM's benchmark does).
    Lengths come from ``tokenizer_len_fn`` (default: characters // 4) and are
    clipped to ``[1, cap]``; ``n`` keeps the first ``n`` usable conversations.

    Raises:
        ValueError: not JSON, not the structure above, or no usable conversation.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    prompts, outputs = [], []
    for i, entry in enumerate(data):
        if n is not None and len(prompts) >= n:
            break
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            raise ValueError(f"{path}: entry {i} has no 'conversations' list")
        for turn in turns:
            if not (isinstance(turn, dict) and all(isinstance(turn.get(k), str) for k in ("from", "value"))):
                raise ValueError(f"{path}: entry {i} has a turn without string 'from' and 'value'")
        if len(turns) < 2 or turns[0]["from"] not in ("human", "user"):
            continue
        if turns[1]["from"] not in ("gpt", "chatgpt", "assistant", "bard", "bing"):
            continue
        prompts.append(tokenizer_len_fn(turns[0]["value"]))
        outputs.append(tokenizer_len_fn(turns[1]["value"]))
    if not prompts:
        raise ValueError(f"{path}: no usable (human, gpt) conversation")
    clip = lambda xs: np.clip(np.asarray(xs, dtype=np.int64), 1, cap)  # noqa: E731
    return LengthTrace(clip(prompts), clip(outputs))


BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")


def load_burstgpt_csv(path: Union[str, Path], n: Optional[int] = None, cap: int = MAX_LEN) -> LengthTrace:
    """Lengths and arrival times of a BurstGPT CSV (``Timestamp``, ``Request tokens``, ``Response tokens``).

    Rows with 0 response tokens (failed requests in BurstGPT) are skipped.
    Lengths are clipped to ``[1, cap]``; arrival times are the timestamps
    (seconds) shifted to start at 0, in file order; ``n`` keeps the first ``n`` rows.

    Raises:
        ValueError: a missing column, a non-numeric value, or no usable row.
    """
    times, prompts, outputs = [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in BURSTGPT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        for lineno, row in enumerate(reader, start=2):
            if n is not None and len(prompts) >= n:
                break
            try:
                t = float(row["Timestamp"])
                req, resp = int(float(row["Request tokens"])), int(float(row["Response tokens"]))
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"{path}:{lineno}: non-numeric value in {row!r}") from None
            if not math.isfinite(t) or req < 0 or resp < 0:
                raise ValueError(f"{path}:{lineno}: bad timestamp or negative token count")
            if resp == 0:
                continue
            times.append(t)
            prompts.append(req)
            outputs.append(resp)
    if not prompts:
        raise ValueError(f"{path}: no usable rows")
    arrival = np.asarray(times, dtype=np.float64)
    clip = lambda xs: np.clip(np.asarray(xs, dtype=np.int64), 1, cap)  # noqa: E731
    return LengthTrace(clip(prompts), clip(outputs), arrival - arrival.min())


# ---- arrivals -----------------------------------------------------------------
def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")


def _check_rate(rate: float) -> None:
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number > 0, got {rate!r}")


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (seconds, increasing) of a Poisson process: exponential gaps of mean ``1/rate``."""
    _check_n(n)
    _check_rate(rate)
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def gamma_arrivals(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Gamma renewal process: gaps with mean ``1/rate`` and coefficient of variation ``cv``.

    Shape ``1/cv**2``, scale ``cv**2/rate``; ``cv = 1`` is a Poisson process in distribution.
    """
    _check_n(n)
    _check_rate(rate)
    if not (isinstance(cv, (int, float)) and math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv must be a finite number > 0, got {cv!r}")
    shape = 1.0 / cv**2
    return np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), size=n))


# ---- workloads -------------------------------------------------------------------
def _lengths(trace: Union[str, LengthTrace], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(trace, LengthTrace):
        if n > len(trace.prompt_lens):
            raise ValueError(f"trace holds {len(trace.prompt_lens)} requests, asked for {n}")
        return trace.prompt_lens[:n], trace.output_lens[:n]
    if trace == "sharegpt":
        return sharegpt_like(n, rng)
    if trace == "burstgpt":
        return burstgpt_like(n, rng)
    if trace in GENERATED_TRACES:
        return generated_trace(trace, n, rng)
    raise ValueError(f"unknown trace {trace!r}; expected one of {GENERATED_TRACES + ('sharegpt', 'burstgpt')}")


def make_workload(
    trace: Union[str, LengthTrace],
    n: int,
    rate: Optional[float],
    *,
    cv: Optional[float] = None,
    priority_ratio: float = 0.0,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """``n`` requests sorted by arrival time.

    Args:
        trace: ``"S-S"``, ``"M-M"``, ``"L-L"``, ``"S-L"``, ``"L-S"``, ``"sharegpt"``,
            ``"burstgpt"``, or a ``LengthTrace`` loaded from a file (its first ``n`` requests).
        n: number of requests.
        rate: mean arrivals per second; ``None`` replays a ``LengthTrace``'s own arrival times.
        cv: coefficient of variation of the gaps (Gamma arrivals); ``None`` means Poisson.
        priority_ratio: fraction of requests marked ``HIGH_PRIORITY`` (each independently).
        seed: seeds lengths, arrivals and priorities (independent streams).

    Raises:
        ValueError: an unknown trace, a bad rate, cv or ratio.
    """
    _check_n(n)
    if not (0.0 <= priority_ratio <= 1.0):
        raise ValueError(f"priority_ratio must be in [0, 1], got {priority_ratio!r}")
    length_rng, arrival_rng, priority_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    prompts, outputs = _lengths(trace, n, length_rng)
    if rate is None:
        if not isinstance(trace, LengthTrace) or trace.arrival_times is None:
            raise ValueError("rate=None replays recorded arrival times; this trace has none")
        arrivals = trace.arrival_times[:n]
    elif cv is None:
        arrivals = poisson_arrivals(n, rate, arrival_rng)
    else:
        arrivals = gamma_arrivals(n, rate, cv, arrival_rng)
    high = priority_rng.random(n) < priority_ratio
    requests = [
        WorkloadRequest(
            arrival_time=float(arrivals[i]),
            prompt_len=int(prompts[i]),
            output_len=int(outputs[i]),
            priority=HIGH_PRIORITY if high[i] else NORMAL_PRIORITY,
        )
        for i in range(n)
    ]
    return sorted(requests, key=lambda r: r.arrival_time)
