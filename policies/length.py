"""Output-length estimation with imprecise information: a prior and a conditional bound.

JITServe (Zhang et al., "SLO-aware LLM Serving with Imprecise Request Information",
arXiv 2504.20068) does not know a request's output length. It schedules from a
conservative estimate drawn from the lengths of recent requests and refines it as the
request generates: having produced ``n`` tokens, the request is known to be longer
than ``n``, so the estimate is a quantile of the prior *conditional on* ``L > n``.
This module is that idea, pure:

* ``LengthPrior`` keeps the recent output lengths (a bounded window) per objective kind
  and prompt-length bucket. The llumlet core feeds it as requests finish; lookups fall
  back from the bucket to the kind to everything when a key has too few samples.
* ``quantile_bound(lengths, generated, quantile)`` is the remaining-length bound: the
  ``quantile`` of the prior's lengths above ``generated``, minus ``generated``. Its
  predicted end (``generated + bound``) never decreases as ``generated`` grows (the
  conditional quantile is monotone), and on the prior's own distribution it undershoots
  the true remaining length with probability at most ``1 - quantile``.
* ``oracle_bound(true_len, generated)`` knows the truth: experiments only, to measure
  what imprecision costs.

                   prior lengths (sorted):  3  8  20  41  90  400
    generated = 10, quantile 0.8:  above 10 -> 20 41 90 400; the 0.8-quantile -> 400 (upper
    order statistic, ceil(0.8 * 4) = 4th) -> bound 400 - 10 = 390

No clocks, no I/O, no engine objects.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Optional, Sequence

PROMPT_BUCKETS = (128, 512, 2048, 8192)  # upper edges; longer prompts share the last bucket
MIN_SAMPLES = 16  # fewer samples than this under a key: fall back to the wider key


def prompt_bucket(prompt_len: int) -> int:
    """Index of the prompt-length bucket of ``prompt_len``."""
    return min(bisect.bisect_left(PROMPT_BUCKETS, prompt_len), len(PROMPT_BUCKETS) - 1)


class LengthPrior:
    """Recent output lengths per ``(objective kind, prompt bucket)``, in bounded windows.

    Args:
        window: lengths kept per key (the oldest drop out).
        cold_start_len: the one length assumed where nothing has been seen yet.
    """

    def __init__(self, window: int = 2000, cold_start_len: int = 512) -> None:
        if window < 1 or cold_start_len < 1:
            raise ValueError("window and cold_start_len must be >= 1")
        self.window = window
        self.cold_start_len = cold_start_len
        self._by_key: dict[tuple[str, int], deque[int]] = {}
        self._by_kind: dict[str, deque[int]] = {}
        self._all: deque[int] = deque(maxlen=window)
        self._sorted_cache: dict[object, tuple[int, ...]] = {}

    def observe(self, kind: str, prompt_len: int, output_len: int) -> None:
        """A request of objective ``kind`` ("none" for none) finished with ``output_len`` tokens."""
        if output_len < 1:
            return
        key = (kind, prompt_bucket(prompt_len))
        for store, k in ((self._by_key, key), (self._by_kind, kind)):
            q = store.get(k)  # type: ignore[call-overload]
            if q is None:
                q = store[k] = deque(maxlen=self.window)  # type: ignore[index]
            q.append(output_len)
        self._all.append(output_len)
        self._sorted_cache.clear()

    def lengths(self, kind: str, prompt_len: int) -> tuple[int, ...]:
        """The sorted lengths to estimate from: the key's, else the kind's, else all, else the cold start."""
        key = (kind, prompt_bucket(prompt_len))
        for cache_key, q in ((key, self._by_key.get(key)), (kind, self._by_kind.get(kind)), ("*", self._all)):
            if q is not None and len(q) >= MIN_SAMPLES:
                got = self._sorted_cache.get(cache_key)
                if got is None:
                    got = self._sorted_cache[cache_key] = tuple(sorted(q))
                return got
        return tuple(sorted(self._all)) if self._all else (self.cold_start_len,)

    def __len__(self) -> int:
        return len(self._all)


def quantile_bound(lengths: Sequence[int], generated: int, quantile: float) -> int:
    """Remaining tokens, at least 1, that a request longer than ``generated`` produces with
    probability at least ``quantile`` under the prior ``lengths`` (sorted ascending).

    When no prior length exceeds ``generated`` (the request outlived everything seen), the
    bound doubles what it has produced so far: conservative and still finite.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    start = bisect.bisect_right(lengths, generated)
    above = len(lengths) - start
    if above == 0:
        return max(1, generated)
    idx = start + min(above, max(1, math.ceil(quantile * above))) - 1
    return max(1, lengths[idx] - generated)


def oracle_bound(true_len: int, generated: int) -> int:
    """The true remaining length (experiments only: it needs the answer's length)."""
    return max(1, true_len - generated)


def remaining_bound(estimator: str, *, prior: Optional[Sequence[int]], generated: int, quantile: float,
                    true_len: Optional[int]) -> int:
    """Dispatch by estimator name (``quantile`` or ``oracle``); ``ValueError`` for any other."""
    if estimator == "quantile":
        return quantile_bound(prior or (), generated, quantile)
    if estimator == "oracle":
        if true_len is None:
            raise ValueError("the oracle estimator needs the true length")
        return oracle_bound(true_len, generated)
    raise ValueError(f"unknown length estimator {estimator!r}; known: ['oracle', 'quantile']")


ESTIMATORS = ("quantile", "oracle")
