"""Runs planned steps on the Llama model over one paged KV-cache tensor."""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from llumnix_py.engines.block_manager import CopyRun, copy_runs
from llumnix_py.engines.executor import Executed, Executor, SeqWork
from llumnix_py.engines.torch_engine.model import LlamaModel, ModelConfig, SeqBatchEntry, allocate_kv_cache
from llumnix_py.engines.torch_engine.sampler import prompt_logprobs, sample, token_logprobs


class TorchExecutor(Executor):
    """The built-in engine's executor.

    The KV cache is one tensor, block-major, so one block of every layer is
    contiguous and a migration reads or writes whole blocks with one index op::

        kv[num_blocks, num_layers, 2 (K/V), block_size, num_kv_heads, head_dim]

    The host swap pool ``host_kv`` has the same layout, so a run of contiguous blocks
    is one contiguous slice on each side and moves in one copy. On CPU it is a
    separate tensor; beside a CUDA cache it is pinned memory (page-locked, so the
    copy is a DMA over the host link).
    """

    def __init__(self, model: LlamaModel, model_config: ModelConfig, num_blocks: int, block_size: int,
                 max_model_len: Optional[int] = None, num_host_blocks: int = 0) -> None:
        self.model = model
        self.model_config = model_config
        self.block_size = block_size
        self.kv = allocate_kv_cache(model_config, num_blocks, block_size)
        # Migration copies: one per contiguous run of blocks read into, or written from, a frame.
        self.migration_copies = 0
        self.host_kv = torch.empty((num_host_blocks,) + tuple(self.kv.shape[1:]), dtype=self.kv.dtype,
                                   pin_memory=self.kv.is_cuda)
        self._max_model_len = min(max_model_len or model_config.max_position_embeddings,
                                  model_config.max_position_embeddings)

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def kv_block_bytes(self) -> int:
        return self.kv[0].numel() * self.kv.element_size()

    supports_logprobs = True

    def execute(self, work: Sequence[SeqWork]) -> tuple[list[Optional[int]], float]:
        done = self.execute_full(work)
        return done.tokens, done.duration_s

    def execute_full(self, work: Sequence[SeqWork]) -> Executed:
        t0 = time.perf_counter()
        n = len(work)
        if not work:
            return Executed([], 0.0, [], [])
        ids: list[int] = []
        entries = []
        for w in work:
            entries.append(SeqBatchEntry(start=len(ids), num_new=len(w.token_ids), num_cached=w.num_cached,
                                         block_table=torch.tensor(w.block_table, dtype=torch.long)))
            ids.extend(w.token_ids)
        full = any(w.wants_prompt_logprobs for w in work)
        logits = self.model(torch.tensor(ids, dtype=torch.long), entries, self.kv, self.block_size,
                            all_positions=full)
        prompt_lps: list = [None] * n
        if full:  # every position's logits came back: the prompt's, then the last row of each entry
            for i, (w, e) in enumerate(zip(work, entries)):
                if w.wants_prompt_logprobs:
                    prompt_lps[i] = prompt_logprobs(logits[e.start:e.start + e.num_new], w.token_ids,
                                                    w.sampling.prompt_logprobs)
            logits = logits[[e.start + e.num_new - 1 for e in entries]]
        rows = [i for i, w in enumerate(work) if w.sample]
        tokens = sample(logits[rows], [work[i] for i in rows]) if rows else []
        out: list[Optional[int]] = [None] * n
        lps: list = [None] * n
        for i, tok in zip(rows, tokens):
            out[i] = tok
            k = work[i].sampling.logprobs
            if k is not None:
                lps[i] = token_logprobs(logits[i:i + 1], [tok], k)[0]
        return Executed(out, time.perf_counter() - t0, lps, prompt_lps)

    @property
    def num_host_blocks(self) -> int:
        return self.host_kv.shape[0]

    def swap_out(self, runs: Sequence[CopyRun]) -> float:
        return self._copy(self.kv, self.host_kv, runs)

    def swap_in(self, runs: Sequence[CopyRun]) -> float:
        return self._copy(self.host_kv, self.kv, runs)

    def _copy(self, src: torch.Tensor, dst: torch.Tensor, runs: Sequence[CopyRun]) -> float:
        t0 = time.perf_counter()
        _copy_runs(src, dst, runs)
        if self.kv.is_cuda:
            torch.cuda.synchronize(self.kv.device)
        return time.perf_counter() - t0

    def read_blocks(self, block_ids: Sequence[int], host: bool = False) -> torch.Tensor:
        """The blocks' KV packed into one tensor (a migration frame), one copy per contiguous
        run of ``block_ids`` (a block group moves in one copy, not one per block)::

            block_ids 7 8 9 3 4   ->  frame[0:3] = kv[7:10], frame[3:5] = kv[3:5]   (2 copies)

        A fragmented list (runs of fewer than ``MIN_MEAN_RUN`` blocks on average) is gathered
        row by row instead (one copy per block), which is cheaper than many small slices.
        ``host``: the blocks are in the host pool (``host_kv``); the frame is on the device."""
        pool = self.host_kv if host else self.kv
        ids = list(block_ids)
        runs = _grouped(copy_runs(ids, range(len(ids))), len(ids))
        if runs is None:
            self.migration_copies += len(ids)
            return pool.index_select(0, torch.as_tensor(ids, dtype=torch.long)).to(self.kv.device)
        out = torch.empty((len(ids),) + tuple(self.kv.shape[1:]), dtype=self.kv.dtype, device=self.kv.device)
        _copy_runs(pool, out, runs)
        self.migration_copies += len(runs)
        return out

    def write_blocks(self, block_ids: Sequence[int], data: object) -> None:
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"KV data must be a tensor, got {type(data).__name__}")
        expected = (len(block_ids),) + tuple(self.kv.shape[1:])
        if tuple(data.shape) != expected or data.dtype != self.kv.dtype:
            raise ValueError(f"KV data of shape {tuple(data.shape)} {data.dtype} does not match "
                             f"{expected} {self.kv.dtype}")
        runs = _grouped(copy_runs(range(len(block_ids)), block_ids), len(block_ids))  # frame offset -> pool run
        if runs is None:  # fragmented: scatter row by row
            self.kv.index_copy_(0, torch.as_tensor(list(block_ids), dtype=torch.long), data)
            self.migration_copies += len(block_ids)
            return
        _copy_runs(data, self.kv, runs)
        self.migration_copies += len(runs)


MIN_MEAN_RUN = 4  # blocks per run, on average, below which a migration copy gathers row by row


def _copy_runs(src: torch.Tensor, dst: torch.Tensor, runs: Sequence[CopyRun]) -> None:
    """One copy per run ``(src_start, dst_start, n)`` along the block dimension: swaps and
    migration frames alike."""
    for s, d, n in runs:
        dst[d:d + n].copy_(src[s:s + n])


def _grouped(runs: list[CopyRun], num_blocks: int) -> Optional[list[CopyRun]]:
    """``runs`` when grouping pays (long enough runs on average), else ``None``."""
    return runs if len(runs) * MIN_MEAN_RUN <= num_blocks else None
