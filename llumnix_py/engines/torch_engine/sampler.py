"""Greedy and seeded sampling whose result depends only on (logits, seed, output position).

Each sampled token draws from a generator seeded by ``mix(seed, output_index)``,
so a request's output is the same whatever else is in the batch, after a
preemption (recomputation) and after a migration: the "random-generator state"
that travels is just the seed and the output position. A request without a seed
gets one derived from its id (stable across processes).
"""

from __future__ import annotations

from typing import Sequence

import torch

from llumnix_py.engines.executor import SeqWork
from llumnix_py.engines.seeding import request_seed, step_seed

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
