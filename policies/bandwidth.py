"""Link-aware migration decisions, from the bandwidth each llumlet measures on its real copies.

Each llumlet keeps, per peer, the smoothed bandwidth its finished migrations achieved
(``smooth``: an exponentially weighted mean of ``bytes / seconds`` of each migration,
control round trips included, so it is what a migration really gets, not the wire's
peak). The scheduler folds the measurements into the load snapshots and two rules use
them:

* **hand-off pick** (``pick_by_link``): among the decode instances whose freeness after
  the hand-off is within ``tolerance`` (relative) of the best, take the one whose
  measured link from the prefill instance is fastest; links not measured yet rank
  below measured ones; ties fall back to freeness, then id.
* **decline rule** (``migration_pays``): a load-balancing migration is declined when its
  predicted copy time, ``blocks * block_bytes / bandwidth``, exceeds its benefit, the
  decode steps of room it gives the source (``src_after - src_before``, in freeness
  units, which are decode steps) times the source's step time: if the copy outlasts
  the room it buys, the source runs out of memory before the move can help. Without a
  measured link, a step time or a block size, or with an infinite or undefined gain (a
  draining source, whose freeness is -inf), the migration is not declined.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

DEFAULT_ALPHA = 0.3  # weight of the newest sample in the smoothed bandwidth


def smooth(previous: Optional[float], sample: float, alpha: float = DEFAULT_ALPHA) -> float:
    """Exponentially weighted mean: the first sample as is, then ``alpha`` of each new one."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if not math.isfinite(sample) or sample <= 0:
        raise ValueError(f"a bandwidth sample must be positive and finite, got {sample!r}")
    return sample if previous is None else (1 - alpha) * previous + alpha * sample


def copy_time_s(blocks: int, block_bytes: int, gbps: Optional[float]) -> Optional[float]:
    """Predicted seconds to copy ``blocks`` over a link of ``gbps`` GB/s (None if unknown)."""
    if gbps is None or gbps <= 0 or block_bytes <= 0:
        return None
    return blocks * block_bytes / (gbps * 1e9)


def pick_by_link(candidates: Sequence[tuple[str, float, Optional[float]]], tolerance: float) -> Optional[str]:
    """``(instance id, freeness after the move, link GB/s or None)`` -> the instance to use.

    Candidates within ``tolerance`` of the best freeness (``f >= best - tolerance * |best|``)
    compete on link speed (measured beats unmeasured), then freeness, then id.
    """
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    if not candidates:
        return None
    best = max(f for _, f, _ in candidates)
    near = [c for c in candidates if c[1] >= best - tolerance * abs(best)]
    return min(near, key=lambda c: (c[2] is None, -(c[2] or 0.0), -c[1], c[0]))[0]


def migration_pays(blocks: int, block_bytes: int, gbps: Optional[float], src_gain_steps: float,
                   step_s: Optional[float]) -> bool:
    """The decline rule (module docstring): False only when the predicted copy time is
    known and exceeds ``src_gain_steps * step_s``."""
    copy = copy_time_s(blocks, block_bytes, gbps)
    if copy is None or step_s is None or step_s <= 0 or math.isnan(src_gain_steps) or src_gain_steps == math.inf:
        return True  # unknown, or an infinite gain (a draining source): never declined
    return copy <= max(0.0, src_gain_steps) * step_s
