"""Capacity at a tail-latency objective, from a rate sweep with several seeds (pure functions).

The serving experiment sweeps the arrival rate through the knee region of every
system, with several seeds per rate and each workload replayed at several lengths
(its first 2,500, 5,000 and 10,000 requests). From the P99 prefill latencies:

* **capacity** of a system at an objective (e.g. P99 prefill <= 5 s), per seed: the
  highest rate at which the P99 stays under it, interpolated between the last rate of
  the sweep under the objective and the first above it (linearly in log P99, which
  grows roughly exponentially past the knee)::

      log P99 |              x  first rate above
      log obj |- - - - - -/- - - - -
              |     x----/   last rate under
              +-----------|---------- rate
                        capacity

  If the P99 is under the objective at every rate, the capacity is at least the
  highest rate (``censored="above"``); if it is over at the lowest, at most the
  lowest (``censored="below"``). Seeds are summarized by median, min and max.
* **overloaded**: a point (system, rate, seed) whose P99 grows with run length
  (the longest run's P99 above ``growth`` times the shortest's and not below the
  middle one's): the system is above its capacity there and the P99 measures the
  run's length, not the system. A rate is marked overloaded for a system when most
  seeds are.
* **largest ratio in the window**: the rate with the largest median (over seeds)
  P99 ratio of a baseline to Llumnix: a point between the two knees, reported with
  both systems' overload marks, never as the result.

Input everywhere: ``p99[system][rate][seed][length] -> seconds`` (floats).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Optional, Sequence

P99 = Mapping[str, Mapping[float, Mapping[int, Mapping[int, float]]]]


def capacity_one(rates: Sequence[float], p99s: Sequence[float], objective: float) -> tuple[float, Optional[str]]:
    """``(capacity, censored)`` of one seed: rates ascending, their P99s (seconds).

    ``censored`` is None (interpolated), ``"above"`` (under the objective at every
    rate: capacity >= the highest rate) or ``"below"`` (over it at the lowest rate:
    capacity <= the lowest rate).
    """
    if not rates or len(rates) != len(p99s):
        raise ValueError("capacity needs as many P99s as rates, at least one")
    if list(rates) != sorted(rates):
        raise ValueError("rates must be ascending")
    if objective <= 0:
        raise ValueError("objective must be positive")
    for i, (rate, y) in enumerate(zip(rates, p99s)):
        if y > objective:
            if i == 0:
                return float(rate), "below"
            r0, y0 = rates[i - 1], p99s[i - 1]
            lo, hi, target = math.log(max(y0, 1e-9)), math.log(y), math.log(objective)
            frac = (target - lo) / (hi - lo) if hi > lo else 1.0
            return float(r0 + min(1.0, max(0.0, frac)) * (rate - r0)), None
    return float(rates[-1]), "above"


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max (and how many values)."""
    if not values:
        raise ValueError("spread of no values")
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "n": len(values)}


def is_overloaded(by_length: Mapping[int, float], growth: float = 1.5) -> bool:
    """Whether P99 grows with run length (lengths in requests -> P99 seconds)."""
    lengths = sorted(by_length)
    if len(lengths) < 2:
        return False
    first, last = by_length[lengths[0]], by_length[lengths[-1]]
    middle = by_length[lengths[len(lengths) // 2]] if len(lengths) > 2 else first
    return last > growth * first and last >= middle


def main_length(p99: P99) -> int:
    """The longest run length in the sweep (the one capacity is read from)."""
    return max(n for by_rate in p99.values() for by_seed in by_rate.values() for by_len in by_seed.values()
               for n in by_len)


def capacities(p99: P99, objectives: Sequence[float]) -> dict[str, dict[str, Any]]:
    """``{system: {objective: {median, min, max, n, per_seed, censored}}}`` at the main length."""
    n = main_length(p99)
    out: dict[str, dict[str, Any]] = {}
    for system, by_rate in p99.items():
        rates = sorted(by_rate)
        seeds = sorted(set.intersection(*(set(by_rate[r]) for r in rates)))
        for obj in objectives:
            per_seed, censored = {}, {}
            for seed in seeds:
                cap, cens = capacity_one(rates, [by_rate[r][seed][n] for r in rates], obj)
                per_seed[seed] = cap
                if cens is not None:
                    censored[seed] = cens
            entry = spread(list(per_seed.values())) if per_seed else {}
            entry["per_seed"] = {str(s): c for s, c in per_seed.items()}
            entry["censored"] = {str(s): c for s, c in censored.items()}
            out.setdefault(system, {})[_key(obj)] = entry
    return out


def gains(caps: Mapping[str, Mapping[str, Any]], ours: str, base: str) -> dict[str, dict[str, Any]]:
    """``ours``' capacity gain over ``base`` per objective: paired by seed (``ours / base - 1``)."""
    out: dict[str, dict[str, Any]] = {}
    if ours not in caps or base not in caps:
        return out
    for obj, entry in caps[ours].items():
        other = caps[base].get(obj)
        if not other:
            continue
        seeds = sorted(set(entry["per_seed"]) & set(other["per_seed"]))
        per_seed = [entry["per_seed"][s] / other["per_seed"][s] - 1.0 for s in seeds if other["per_seed"][s] > 0]
        if not per_seed:
            continue
        g = spread(per_seed)
        g["censored"] = bool(entry["censored"] or other["censored"])
        out[obj] = g
    return out


def overload_marks(p99: P99, growth: float = 1.5) -> dict[str, dict[float, dict[str, Any]]]:
    """``{system: {rate: {overloaded_seeds, seeds, overloaded}}}``; ``overloaded`` when most seeds are."""
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for system, by_rate in p99.items():
        for rate, by_seed in by_rate.items():
            k = sum(1 for by_len in by_seed.values() if is_overloaded(by_len, growth))
            out.setdefault(system, {})[rate] = {"overloaded_seeds": k, "seeds": len(by_seed),
                                                "overloaded": 2 * k > len(by_seed)}
    return out


def largest_ratio(p99: P99, base: str, ours: str, marks: Mapping[str, Mapping[float, Mapping[str, Any]]]
                  ) -> Optional[dict[str, Any]]:
    """The rate with the largest median P99 ratio ``base / ours`` at the main length, with the
    ratio's spread over seeds and both systems' overload marks there (a point, not the result)."""
    if base not in p99 or ours not in p99:
        return None
    n = main_length(p99)
    best: Optional[dict[str, Any]] = None
    for rate in sorted(set(p99[base]) & set(p99[ours])):
        seeds = sorted(set(p99[base][rate]) & set(p99[ours][rate]))
        ratios = [p99[base][rate][s][n] / p99[ours][rate][s][n] for s in seeds if p99[ours][rate][s][n] > 0]
        if not ratios:
            continue
        entry = {"rate": rate, "ratio": spread(ratios), "base": base, "ours": ours,
                 "base_overloaded": dict(marks[base][rate]), "ours_overloaded": dict(marks[ours][rate])}
        if best is None or entry["ratio"]["median"] > best["ratio"]["median"]:
            best = entry
    return best


def _key(objective: float) -> str:
    return f"{objective:g}"
