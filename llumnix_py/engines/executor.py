"""The part of an engine that turns a planned batch into tokens.

``EngineCore`` (block manager + batching scheduler) plans a step; an ``Executor``
runs it: the built-in engine's executor runs the Llama model over the paged KV
cache, the simulated engine's executor returns cost-model time and synthetic
tokens. Everything else (admission, preemption, migration bookkeeping) is shared.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional, Sequence

from llumnix_py.engines.block_manager import CopyRun
from llumnix_py.engines.copier import Copier, ThreadCopier
from llumnix_py.engines.types import SamplingParams, TokenLogprob
from policies.switching import SwitchCosts


@dataclass(frozen=True)
class SeqWork:
    """One sequence's share of a step.

    Attributes:
        request_id: the request.
        token_ids: new tokens fed this step (a prefill chunk, or the last token for decode).
        num_cached: tokens of the sequence already in the KV cache.
        block_table: physical blocks covering at least ``num_cached + len(token_ids)`` tokens.
        sampling: the request's sampling parameters.
        output_index: index (in the request's output) of the token this step samples.
        is_prefill: the step (re)computes a prompt (or, after preemption, prompt + outputs).
        sample: False for a non-final prefill chunk (no token is sampled).
        history: the sequence's tokens so far (prompt, then outputs) when a penalty needs them, else ().
        prompt_len: how many of ``history`` are the prompt.
        banned_token_ids: tokens that may not be sampled this step (stop and end-of-sequence
            tokens while fewer than ``min_tokens`` outputs exist).
    """

    request_id: str
    token_ids: tuple[int, ...]
    num_cached: int
    block_table: tuple[int, ...]
    sampling: SamplingParams
    output_index: int
    is_prefill: bool
    sample: bool = True
    history: tuple[int, ...] = ()
    prompt_len: int = 0
    banned_token_ids: tuple[int, ...] = ()

    @property
    def wants_prompt_logprobs(self) -> bool:
        """The step computes the prompt for the first time and the request asked for its logprobs."""
        return self.is_prefill and self.output_index == 0 and self.sampling.prompt_logprobs is not None


@dataclass(frozen=True)
class Executed:
    """What one step produced.

    Attributes:
        tokens: one sampled token per ``SeqWork`` (``None`` where ``sample`` is False).
        duration_s: the step's duration in seconds.
        logprobs: per ``SeqWork``, the sampled token's ``TokenLogprob`` when its request asked for
            logprobs (else ``None``).
        prompt_logprobs: per ``SeqWork``, its prompt's log-likelihoods when
            ``wants_prompt_logprobs`` (else ``None``).
    """

    tokens: list[Optional[int]]
    duration_s: float
    logprobs: list[Optional[TokenLogprob]]
    prompt_logprobs: list[Optional[tuple[Optional[TokenLogprob], ...]]]


class Executor(abc.ABC):
    """Runs planned steps and owns the KV data (if any)."""

    @abc.abstractmethod
    def execute(self, work: Sequence[SeqWork]) -> tuple[list[Optional[int]], float]:
        """One sampled token per ``SeqWork`` (``None`` where ``sample`` is False)
        and the step's duration in seconds."""

    supports_logprobs = False  # whether ``execute_full`` computes log probabilities

    def execute_full(self, work: Sequence[SeqWork]) -> Executed:
        """``execute`` with log probabilities where the work asks for them (executors that
        compute them override this; the default has none, see ``supports_logprobs``)."""
        tokens, duration = self.execute(work)
        return Executed(tokens, duration, [None] * len(work), [None] * len(work))

    @abc.abstractmethod
    def read_blocks(self, block_ids: Sequence[int], host: bool = False) -> object:
        """A copy of these blocks' KV data (``None`` for executors without data); ``host``:
        blocks of the host pool (a conversation's stored turn that migrates)."""

    @abc.abstractmethod
    def write_blocks(self, block_ids: Sequence[int], data: object) -> None:
        """Write KV data into these blocks."""

    @property
    @abc.abstractmethod
    def kv_block_bytes(self) -> int:
        """Bytes of KV data per block."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Token ids accepted are ``0 .. vocab_size-1``."""

    # ----- the host swap pool (none by default) ------------------------------------------
    num_host_blocks = 0  # blocks of the host pool

    def swap_out(self, runs: Sequence[CopyRun]) -> float:
        """Copy device blocks to host blocks, one copy per run ``(device, host, n)``;
        the seconds it took."""
        raise NotImplementedError(f"{type(self).__name__} has no host swap pool")

    def swap_in(self, runs: Sequence[CopyRun]) -> float:
        """Copy host blocks to device blocks, one copy per run ``(host, device, n)``."""
        raise NotImplementedError(f"{type(self).__name__} has no host swap pool")

    def make_copier(self) -> Copier:
        """Where this executor's asynchronous swap copies run (a copy thread by default)."""
        return ThreadCopier()

    def switch_cost_prior(self) -> SwitchCosts:
        """What a swap and a recompute cost before any was observed (``SwitchMeter``)."""
        return SwitchCosts(copy_overhead_s=2e-5, host_link_bytes_per_s=5e9, recompute_s_per_token=1e-4,
                           block_bytes=self.kv_block_bytes)

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) the model can hold."""
        return 1 << 30
