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

from llumnix_py.engines.block_manager import CopyRun
from llumnix_py.engines.copier import VirtualCopier
from llumnix_py.engines.executor import Executor, SeqWork
from llumnix_py.engines.seeding import MASK64, splitmix64
from llumnix_py.engines.seeding import request_seed as request_key
from llumnix_py.engines.sim.cost_model import CostProfile, causal_context
from policies.switching import SwitchCosts

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
        num_host_blocks: blocks of the simulated host swap pool.
        copy_segments: separate memory regions one run of blocks spans, so copies issued per
            run: 1 for a block-major KV layout (the built-in engine's: a block of every layer
            is contiguous), ``2 * num_layers`` for per-layer K and V tensors (vLLM's layout,
            whose swap issues one copy per block per layer per K/V).
    """

    def __init__(self, profile: CostProfile, vocab_size: int = 32000, eos_token_id: Optional[int] = None,
                 num_host_blocks: int = 0, copy_segments: int = 1) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
        if eos_token_id is not None and not (0 <= eos_token_id < vocab_size):
            raise ValueError(f"eos_token_id must be in [0, {vocab_size}), got {eos_token_id!r}")
        self._profile = profile
        self._vocab_size = vocab_size
        self._eos_token_id = eos_token_id
        if isinstance(num_host_blocks, bool) or not isinstance(num_host_blocks, int) or num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be an integer >= 0, got {num_host_blocks!r}")
        self.num_host_blocks = num_host_blocks
        if isinstance(copy_segments, bool) or not isinstance(copy_segments, int) or copy_segments < 1:
            raise ValueError(f"copy_segments must be an integer >= 1, got {copy_segments!r}")
        self.copy_segments = copy_segments

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

    def swap_out(self, runs: Sequence[CopyRun]) -> float:
        """Cost-model time of the copies (the simulated pools hold no data)."""
        return self._profile.host_copy_time(sum(n for _, _, n in runs), len(runs) * self.copy_segments)

    def swap_in(self, runs: Sequence[CopyRun]) -> float:
        return self._profile.host_copy_time(sum(n for _, _, n in runs), len(runs) * self.copy_segments)

    def make_copier(self) -> VirtualCopier:
        """Copies take their cost-model time on a virtual clock, beside the steps."""
        return VirtualCopier()

    def switch_cost_prior(self) -> SwitchCosts:
        """The cost model's own figures (prefill per token from a 1,024-token re-prefill)."""
        hw = self._profile.hw
        return SwitchCosts(copy_overhead_s=hw.host_copy_overhead_s * self.copy_segments,
                           host_link_bytes_per_s=hw.host_link_gbps * 1e9 * hw.num_gpus,
                           recompute_s_per_token=self._profile.recompute_time(1024) / 1024,
                           block_bytes=self._profile.kv_block_bytes)

    def read_blocks(self, block_ids: Sequence[int], host: bool = False) -> None:
        """Simulated blocks hold no data; the cost model times the transfer."""
        return None

    def write_blocks(self, block_ids: Sequence[int], data: object) -> None:
        """Accepts only ``None`` (what ``read_blocks`` of another ``SimExecutor`` returned)."""
        if data is not None:
            raise TypeError(f"SimExecutor holds no KV data; write_blocks expects None, got {type(data).__name__}")
