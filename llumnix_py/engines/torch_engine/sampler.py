"""Greedy and seeded sampling whose result depends only on (logits, seed, output position).

Each sampled token draws from a generator seeded by ``mix(seed, output_index)``,
so a request's output is the same whatever else is in the batch, after a
preemption (recomputation) and after a migration: the "random-generator state"
that travels is just the seed and the output position. A request without a seed
gets one derived from its id (stable across processes).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from llumnix_py.engines.executor import SeqWork

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def request_seed(request_id: str, seed: int | None) -> int:
    """The seed a request samples with: its own, or a stable hash of its id."""
    if seed is not None:
        return seed & _MASK64
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def step_seed(seed: int, output_index: int) -> int:
    """Seed of the draw for output token ``output_index`` (63 bits, as torch wants)."""
    return splitmix64(seed ^ splitmix64(output_index)) & ((1 << 63) - 1)


def sample(logits: torch.Tensor, work: Sequence[SeqWork]) -> list[int]:
    """One token per row of ``logits`` (float32, shape ``(len(work), vocab)``)."""
    out = torch.argmax(logits, dim=-1).tolist()
    for row, w in enumerate(work):
        sp = w.sampling
        if sp.greedy:
            continue
        probs = torch.softmax(logits[row].float() / sp.temperature, dim=-1)
        if sp.top_p < 1.0:
            probs = _top_p_filter(probs, sp.top_p)
        gen = torch.Generator().manual_seed(step_seed(request_seed(w.request_id, sp.seed), w.output_index))
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) samples i with probability p_i.
        noise = torch.empty_like(probs).exponential_(1.0, generator=gen)
        out[row] = int(torch.argmax(probs / noise))
    return out


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_p, idx = torch.sort(probs, descending=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    keep = cum - sorted_p < top_p  # keep the smallest prefix whose mass reaches top_p
    keep[0] = True
    filtered = torch.zeros_like(probs)
    filtered[idx[keep]] = sorted_p[keep]
    return filtered / filtered.sum()
