"""The simulated engine's executor: cost-model durations and synthetic tokens.

``EngineCore`` plans a step exactly as it does for the real engine; this
executor only answers how long the step took (from a ``CostProfile``) and which
token each sequence sampled. Tokens are a pure function of the request's seed
(or, without one, a stable hash of its id) and the output index, so a request
produces the same tokens whatever it is batched with, and across preemption
and migration. The KV cache holds no data: ``read_blocks`` returns ``None``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

from llumnix_py.engines.executor import Executor, SeqWork
from llumnix_py.engines.seeding import MASK64, splitmix64
from llumnix_py.engines.seeding import request_seed as request_key
from llumnix_py.engines.sim.cost_model import CostProfile, causal_context

_MASK64 = MASK64


@lru_cache(maxsize=8192)
def _stream_key(request_id: str, seed: Optional[int]) -> int:
    """``splitmix64`` of the request's stream key, computed once per running request
    instead of once per token (the id hash is the executor's largest per-token cost)."""
    return splitmix64(request_key(request_id, seed))


class SimExecutor(Executor):
    """Executor for the simulated engine.

    Args:
        profile: the cost model that times each step.
        vocab_size: token ids are drawn from ``0 .. vocab_size-1``.
        eos_token_id: never sampled, so simulated requests finish by ``max_tokens``
            (a request's ``stop_token_ids`` are never sampled either).
    """

    def __init__(self, profile: CostProfile, vocab_size: int = 32000, eos_token_id: Optional[int] = None) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
        if eos_token_id is not None and not (0 <= eos_token_id < vocab_size):
            raise ValueError(f"eos_token_id must be in [0, {vocab_size}), got {eos_token_id!r}")
        self._profile = profile
        self._vocab_size = vocab_size
        self._eos_token_id = eos_token_id

    @property
    def profile(self) -> CostProfile:
        return self._profile

    @property
    def kv_block_bytes(self) -> int:
        return self._profile.kv_block_bytes

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_for(self, work: SeqWork) -> int:
        """The token ``work``'s request samples at ``work.output_index``."""
        key = _stream_key(work.request_id, work.sampling.seed)
        token = splitmix64(key ^ (work.output_index & _MASK64)) % self._vocab_size
        stops = work.sampling.stop_token_ids
        if token != self._eos_token_id and token not in stops:
            return token
        banned = set(stops)
        if self._eos_token_id is not None:
            banned.add(self._eos_token_id)
        for _ in range(self._vocab_size):
            token = (token + 1) % self._vocab_size
            if token not in banned:
                return token
        raise ValueError(f"request {work.request_id}: every token id is a stop token")

    def step_duration(self, work: Sequence[SeqWork]) -> float:
        """Cost-model duration of a step that runs ``work``."""
        prefill_tokens = prefill_pairs = decode_seqs = decode_context = 0
        for w in work:
            if w.is_prefill:
                prefill_tokens += len(w.token_ids)
                prefill_pairs += causal_context(w.num_cached, len(w.token_ids))
            else:
                decode_seqs += 1
                decode_context += w.num_cached + len(w.token_ids)
        return self._profile.step_time(prefill_tokens, decode_seqs, decode_context, prefill_pairs)

    def execute(self, work: Sequence[SeqWork]) -> tuple[list[Optional[int]], float]:
        tokens = [self.token_for(w) if w.sample else None for w in work]
        return tokens, self.step_duration(work)

    def read_blocks(self, block_ids: Sequence[int]) -> None:
        """Simulated blocks hold no data; the cost model times the transfer."""
        return None

    def write_blocks(self, block_ids: Sequence[int], data: object) -> None:
        """Accepts only ``None`` (what ``read_blocks`` of another ``SimExecutor`` returned)."""
        if data is not None:
            raise TypeError(f"SimExecutor holds no KV data; write_blocks expects None, got {type(data).__name__}")
