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

from llumnix_py.engines.types import SamplingParams


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
    """

    request_id: str
    token_ids: tuple[int, ...]
    num_cached: int
    block_table: tuple[int, ...]
    sampling: SamplingParams
    output_index: int
    is_prefill: bool
    sample: bool = True


class Executor(abc.ABC):
    """Runs planned steps and owns the KV data (if any)."""

    @abc.abstractmethod
    def execute(self, work: Sequence[SeqWork]) -> tuple[list[Optional[int]], float]:
        """One sampled token per ``SeqWork`` (``None`` where ``sample`` is False)
        and the step's duration in seconds."""

    @abc.abstractmethod
    def read_blocks(self, block_ids: Sequence[int]) -> object:
        """A copy of these blocks' KV data (``None`` for executors without data)."""

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

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) the model can hold."""
        return 1 << 30
