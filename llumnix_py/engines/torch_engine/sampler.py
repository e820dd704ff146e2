"""Sampling whose result depends only on (logits, the request's tokens so far, seed, output position).

Each sampled token draws from a generator seeded by ``mix(seed, output_index)``,
so a request's output is the same whatever else is in the batch, after a
preemption (recomputation) and after a migration: the "random-generator state"
that travels is just the seed and the output position. A request without a seed
gets one derived from its id (stable across processes). Penalties read the
request's prompt and output tokens, which travel with it too.

One row of logits goes through, in vLLM's order::

    raw logits --(logprobs are taken here, as vLLM's default "raw_logprobs")
      -> min_tokens: ban stop/end tokens   -> + logit_bias
      -> repetition, frequency, presence penalties
      -> greedy: argmax                    | sampled: / temperature -> min_p -> top_k -> top_p -> seeded draw
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from llumnix_py.engines.executor import SeqWork
from llumnix_py.engines.seeding import request_seed, step_seed
from llumnix_py.engines.types import SamplingParams, TokenLogprob


def sample(logits: torch.Tensor, work: Sequence[SeqWork]) -> list[int]:
    """One token per row of ``logits`` (float32, shape ``(len(work), vocab)``)."""
    out = torch.argmax(logits, dim=-1).tolist()
    for row, w in enumerate(work):
        sp = w.sampling
        if not _processes(sp, w):
            if sp.greedy:
                continue
            x = logits[row]
        else:
            x = process_logits(logits[row], w)
            if sp.greedy:
                out[row] = int(torch.argmax(x))
                continue
        out[row] = _draw(x, sp, request_seed(w.request_id, sp.seed), w.output_index)
    return out


def _processes(sp: SamplingParams, w: SeqWork) -> bool:
    return bool(w.banned_token_ids or sp.logit_bias or sp.penalized)


def process_logits(row: torch.Tensor, w: SeqWork) -> torch.Tensor:
    """``row`` (vocab,) after min_tokens, logit_bias and the penalties (a new tensor)."""
    sp = w.sampling
    x = row.clone()
    if w.banned_token_ids:
        x[torch.tensor(w.banned_token_ids, dtype=torch.long)] = float("-inf")
    if sp.logit_bias:
        ids = torch.tensor([t for t, _ in sp.logit_bias], dtype=torch.long)
        x[ids] += torch.tensor([b for _, b in sp.logit_bias], dtype=x.dtype)
    if sp.penalized:
        x = apply_penalties(x, sp, w.history[:w.prompt_len], w.history[w.prompt_len:])
    return x


def apply_penalties(x: torch.Tensor, sp: SamplingParams, prompt: Sequence[int],
                    output: Sequence[int]) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt + output, frequency and presence over the output."""
    vocab = x.shape[-1]
    counts = torch.bincount(torch.tensor(list(output), dtype=torch.long), minlength=vocab)[:vocab]
    if sp.repetition_penalty != 1.0:
        seen = counts > 0
        if prompt:
            seen[torch.tensor(list(prompt), dtype=torch.long)] = True
        r = sp.repetition_penalty
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    if sp.frequency_penalty:
        x = x - sp.frequency_penalty * counts.to(x.dtype)
    if sp.presence_penalty:
        x = x - sp.presence_penalty * (counts > 0).to(x.dtype)
    return x


def _draw(x: torch.Tensor, sp: SamplingParams, key: int, output_index: int) -> int:
    probs = torch.softmax(x.float() / sp.temperature, dim=-1)
    if sp.min_p > 0.0:
        probs = torch.where(probs < sp.min_p * probs.max(), torch.zeros_like(probs), probs)
    if 0 < sp.top_k < probs.numel():
        kth = torch.topk(probs, sp.top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)  # ties with the k-th stay, as vLLM
    if sp.min_p > 0.0 or sp.top_k:
        probs = probs / probs.sum()
    if sp.top_p < 1.0:
        probs = _top_p_filter(probs, sp.top_p)
    gen = torch.Generator().manual_seed(step_seed(key, output_index))
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) samples i with probability p_i.
    noise = torch.empty_like(probs).exponential_(1.0, generator=gen)
    return int(torch.argmax(probs / noise))


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_p, idx = torch.sort(probs, descending=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    keep = cum - sorted_p < top_p  # keep the smallest prefix whose mass reaches top_p
    keep[0] = True
    filtered = torch.zeros_like(probs)
    filtered[idx[keep]] = sorted_p[keep]
    return filtered / filtered.sum()


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """Log probability of ``token_ids[i]`` under row i of ``logits`` (raw), with the top ``k`` of each row."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    chosen = lp.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
    if k == 0:
        return [TokenLogprob(c) for c in chosen]
    vals, idx = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
    return [TokenLogprob(c, tuple(zip(i, v))) for c, i, v in zip(chosen, idx.tolist(), vals.tolist())]


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], k: int) -> tuple[Optional[TokenLogprob], ...]:
    """Prompt log-likelihoods from the logits at every prompt position ``(len(prompt), vocab)``:
    position i predicts token i + 1; the first token has none."""
    if len(prompt) < 2:
        return (None,)
    return (None, *token_logprobs(logits[:-1], prompt[1:], k))
