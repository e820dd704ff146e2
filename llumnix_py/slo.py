"""Service-level objectives: attainment, goodput and SLO scale, as DistServe defines them.

The one place this math lives; the simulator's results, ``llumnix-py bench``, the
server's Prometheus metrics and the experiments all call it. Pure functions over
plain numbers (seconds), no clocks, no I/O.

A request *meets* its objectives when its time to first token is at most the TTFT
objective and its time per output token (the mean gap after the first token) at most
the TPOT objective; a request with one output token has no TPOT and is judged on TTFT
alone. Objectives are arguments, a scalar for every request or one value per request
(so per-request objectives plug in unchanged).

* attainment: the share of requests that meet both objectives;
* goodput (DistServe, OSDI 2024): the highest request rate at which at least 90% of
  requests meet both; ``goodput`` reads it off a sweep of rates, ``max_rate`` finds it
  by bisection over a function of the rate (a simulation), and per GPU it is divided
  by the instances (GPUs) used;
* SLO scale: the tightest factor ``s`` such that at least 90% of requests meet
  ``s * TTFT`` and ``s * TPOT``; exactly the 90th-percentile (by rank) of each request's
  own need ``max(ttft / TTFT, tpot / TPOT)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

DEFAULT_TARGET = 0.9  # DistServe: 90% of requests meet both objectives

Objective = Union[float, Sequence[float]]
"""One objective (seconds) for every request, or one per request."""


@dataclass(frozen=True)
class SLO:
    """A TTFT and a TPOT objective, in seconds (both positive and finite)."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"SLO {name} must be a positive number of seconds, got {value!r}")

    @classmethod
    def from_ms(cls, ttft_ms: float, tpot_ms: float) -> "SLO":
        """From milliseconds (the CLI's unit); ``ValueError`` names the bad one."""
        for name, value in (("TTFT", ttft_ms), ("TPOT", tpot_ms)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"the {name} objective must be a positive number of milliseconds, got {value!r}")
        return cls(ttft_ms / 1e3, tpot_ms / 1e3)

    def scaled(self, factor: float) -> "SLO":
        return SLO(self.ttft_s * factor, self.tpot_s * factor)


def meets(ttft_s: float, tpot_s: Optional[float], ttft_slo_s: float, tpot_slo_s: float) -> bool:
    """Whether one request meets both objectives (no TPOT: judged on TTFT alone)."""
    return ttft_s <= ttft_slo_s and (tpot_s is None or tpot_s <= tpot_slo_s)


def _objectives(ttfts_s: Sequence[float], tpots_s: Sequence[Optional[float]], ttft_slo_s: Objective,
                tpot_slo_s: Objective) -> tuple[list[float], list[float]]:
    """Each request's TTFT and TPOT objective (checked: as many TPOTs as TTFTs)."""
    n = len(ttfts_s)
    if len(tpots_s) != n:
        raise ValueError(f"{n} TTFTs but {len(tpots_s)} TPOTs")
    return _per_request(ttft_slo_s, n, "TTFT"), _per_request(tpot_slo_s, n, "TPOT")


def _per_request(objective: Objective, n: int, name: str) -> list[float]:
    if isinstance(objective, (int, float)):
        return [float(objective)] * n
    values = [float(v) for v in objective]
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} objectives for {n} requests")
    return values


def attainment(ttfts_s: Sequence[float], tpots_s: Sequence[Optional[float]], ttft_slo_s: Objective,
               tpot_slo_s: Objective) -> float:
    """The share of requests meeting both objectives (``nan`` for no request).

    Args:
        ttfts_s: each request's time to first token.
        tpots_s: each request's time per output token (None: one output token).
        ttft_slo_s / tpot_slo_s: the objectives, one for all or one per request.
    """
    if not ttfts_s and not tpots_s:
        return math.nan
    ttft_obj, tpot_obj = _objectives(ttfts_s, tpots_s, ttft_slo_s, tpot_slo_s)
    n = len(ttfts_s)
    met = sum(1 for t, p, a, b in zip(ttfts_s, tpots_s, ttft_obj, tpot_obj) if meets(t, p, a, b))
    return met / n


def slo_scale(ttfts_s: Sequence[float], tpots_s: Sequence[Optional[float]], ttft_slo_s: Objective,
              tpot_slo_s: Objective, target: float = DEFAULT_TARGET) -> float:
    """The smallest ``s`` with ``attainment(..., s * TTFT, s * TPOT) >= target`` (``nan`` for
    no request): the ``ceil(target * n)``-th smallest of the requests' needs
    ``max(ttft / TTFT, tpot / TPOT)``."""
    _check_target(target)
    if not ttfts_s and not tpots_s:
        return math.nan
    ttft_obj, tpot_obj = _objectives(ttfts_s, tpots_s, ttft_slo_s, tpot_slo_s)
    n = len(ttfts_s)
    needs = sorted(max(t / a, (p / b) if p is not None else 0.0)
                   for t, p, a, b in zip(ttfts_s, tpots_s, ttft_obj, tpot_obj))
    k = max(1, math.ceil(target * n - 1e-9))
    return needs[k - 1]


def goodput(rates: Iterable[float], attainments: Iterable[float], target: float = DEFAULT_TARGET) -> float:
    """The highest swept rate at which attainment reaches ``target``, every lower rate too.

    Reads DistServe's goodput off a sweep (rates in any order): rates are taken in
    increasing order and the sweep stops at the first one below ``target`` (so a lucky
    point past the knee does not count). 0.0 when the lowest rate already misses.
    """
    _check_target(target)
    pairs = sorted(zip(rates, attainments))
    if not pairs:
        raise ValueError("goodput needs at least one (rate, attainment) point")
    best = 0.0
    for rate, att in pairs:
        if not (att >= target):  # nan (no request) counts as a miss
            break
        best = rate
    return best


def _check_target(target: float) -> None:
    if not 0 < target <= 1:
        raise ValueError(f"the attainment target must be in (0, 1], got {target!r}")


def max_rate(attainment_at: Callable[[float], float], low: float, high: float, *, iterations: int = 8,
             target: float = DEFAULT_TARGET, grow: int = 0) -> float:
    """Goodput by bisection, as DistServe's placement search finds it: the highest rate in
    ``[low, high]`` whose ``attainment_at(rate)`` reaches ``target``, assuming attainment
    falls as the rate grows. 0.0 if ``low`` already misses. While ``high`` still meets, the
    range moves up to ``[high, 2 * high]``, at most ``grow`` times; ``high`` if it still meets
    then (so a result equal to the top is a bound, not a knee). ``iterations`` halvings of the
    final range bound the error to its width / ``2**iterations``.
    """
    _check_target(target)
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got {low!r}, {high!r}")
    if isinstance(grow, bool) or not isinstance(grow, int) or grow < 0:
        raise ValueError(f"grow must be an integer >= 0, got {grow!r}")
    if not attainment_at(low) >= target:
        return 0.0
    while attainment_at(high) >= target:
        if grow == 0:
            return high
        low, high, grow = high, 2 * high, grow - 1
    for _ in range(iterations):
        mid = (low + high) / 2
        if attainment_at(mid) >= target:
            low = mid
        else:
            high = mid
    return low
