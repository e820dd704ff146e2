"""Stable per-request random streams: a request's draws depend only on (seed, output position).

Shared by the built-in sampler and the simulated executor, so both engines make
outputs that survive batching, preemption and migration unchanged.
"""

from __future__ import annotations

import hashlib
from typing import Optional

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One round of the SplitMix64 mixer (Steele et al.), a bijection on 64-bit ints."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def request_seed(request_id: str, seed: Optional[int]) -> int:
    """The 64-bit stream key of a request: its seed if set, else a stable hash of its id
    (the same in every process, unlike ``hash``)."""
    if seed is not None:
        return seed & MASK64
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def step_seed(key: int, output_index: int) -> int:
    """Seed of the draw for output token ``output_index`` (63 bits, as torch generators want)."""
    return splitmix64(key ^ splitmix64(output_index)) & ((1 << 63) - 1)
