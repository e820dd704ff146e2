"""Live-migration primitives of ``VLLMEngineAdapter``: source and destination side.

A mixin, split out of ``adapter.py`` by a pure move: the methods read the adapter's
``core``, ``vllm`` (``VLLMInternals``), ``_tracked``, ``_prealloc``, ``_status``,
``_watermark``, ``block_size``, ``_validate_tokens``, ``_validate_sampling`` and ``_vllm_request``. How a
migrated request continues on the destination is described in ``adapter.py``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from llumnix_py.engines.sequence import cdiv
from llumnix_py.engines.types import MigrationRequestState, Request, SeqStatus
from llumnix_py.errors import MigrationError

# vLLM's CPU kernels keep process-wide scratch state: two engine cores of one process must
# not run model code (a step, a KV read or write) at the same time. One lock per process.
_PROCESS_LOCK = threading.Lock()


@dataclass
class _Tracked:
    """What the adapter knows of one request beside vLLM's own record.

    For a migrated-in request, vLLM's prompt is ``request.prompt_token_ids`` followed by
    the outputs generated before this instance adopted it; ``num_outputs`` counts those too.
    """

    request: Request
    num_outputs: int = 0  # outputs so far (all instances): the next output's index
    base_preemptions: int = 0
    frozen_from: Optional[SeqStatus] = None
    holds_kv: bool = False  # frozen while waiting with KV blocks (migrated in, not scheduled here yet)
    mig_epoch: Optional[int] = None  # vLLM preemption count when a pre-copy began
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprob per prompt position so far (prefill chunks)


class VLLMMigration:
    """The ``EngineAdapter`` migration primitives over a vLLM v1 engine core."""

    # ----- migration primitives: source side ------------------------------------------------------
    def incremental_blocks(self, request_id: str, num_sent: int, include_last: bool) -> Optional[list[int]]:
        rec, r = self._tracked.get(request_id), self.vllm.request(request_id)
        if rec is None or r is None:
            return None
        if rec.frozen_from is None:
            if r.status != self._status.RUNNING:
                return None
            if num_sent == 0:
                rec.mig_epoch = r.num_preemptions
            elif rec.mig_epoch != r.num_preemptions:
                return None  # preempted (blocks recycled) since the migration began
        elif rec.frozen_from != SeqStatus.RUNNING:
            return None
        computed = self.vllm.num_computed_tokens(r)
        end = cdiv(computed, self.block_size) if include_last else computed // self.block_size
        return self.vllm.block_ids(request_id)[num_sent:end]

    def freeze(self, request_id: str) -> Optional[MigrationRequestState]:
        rec, r = self._tracked.get(request_id), self.vllm.request(request_id)
        if rec is None or r is None or rec.frozen_from is not None:
            return None
        if r.status == self._status.RUNNING:
            if rec.mig_epoch is not None and rec.mig_epoch != r.num_preemptions:
                return None
            if not self.vllm.leave_running(r):
                return None
            frozen_from = SeqStatus.RUNNING
        elif r.status in (self._status.WAITING, self._status.PREEMPTED):
            # Waiting, or migrated in and not scheduled here yet (it holds its KV blocks: the
            # destination parks a committed request this way until the source activates it).
            if not self.vllm.leave_waiting(r):
                return None
            rec.mig_epoch = None
            rec.holds_kv = r.num_computed_tokens > 0
            frozen_from = SeqStatus.WAITING
        else:
            return None
        rec.frozen_from = frozen_from
        req = rec.request
        outputs = tuple(r.all_token_ids[len(req.prompt_token_ids):])
        return MigrationRequestState(
            request_id=request_id, prompt_token_ids=req.prompt_token_ids, output_token_ids=outputs,
            sampling=req.sampling, priority=req.priority, arrival_time=req.arrival_time,
            num_preemptions=rec.base_preemptions + r.num_preemptions, status=frozen_from,
            num_computed_tokens=self.vllm.num_computed_tokens(r) if frozen_from == SeqStatus.RUNNING else 0,
            reply_to=req.reply_to, objective=req.objective,
        )

    def unfreeze(self, request_id: str) -> None:
        """Undo ``freeze``; on a request that is not frozen, end its outgoing pre-copy.
        ``MigrationError`` if neither applies."""
        rec = self._tracked.get(request_id)
        if rec is not None and rec.frozen_from is None and rec.mig_epoch is not None:
            rec.mig_epoch = None
            return
        rec = self._frozen(request_id)
        r = self.vllm.request(request_id)
        if rec.frozen_from == SeqStatus.RUNNING:
            self.vllm.rejoin_running(r)
        elif rec.holds_kv:
            self.vllm.rejoin_holding(r)
        else:
            self.vllm.rejoin_waiting(r)
        rec.frozen_from = None
        rec.holds_kv = False
        rec.mig_epoch = None

    def free_src(self, request_id: str) -> None:
        self._frozen(request_id)
        self.core.abort_requests([request_id])  # frees its blocks; the worker drops it next step
        del self._tracked[request_id]

    def _frozen(self, request_id: str) -> _Tracked:
        rec = self._tracked.get(request_id)
        if rec is None or rec.frozen_from is None:
            raise MigrationError(f"request {request_id} is not frozen on this instance")
        return rec

    def read_blocks(self, block_ids: Sequence[int]) -> object:
        with _PROCESS_LOCK:
            return self.vllm.read_kv(block_ids)

    # ----- migration primitives: destination side -------------------------------------------------
    def pre_alloc(self, request_id: str, num_blocks: int) -> Optional[list[int]]:
        if request_id in self._tracked or self.vllm.request(request_id) is not None:
            raise MigrationError(f"request {request_id} already runs on this instance")
        if num_blocks < 0:
            raise MigrationError(f"cannot reserve {num_blocks} blocks")
        if request_id not in self._prealloc and self._batch_full():
            return None
        if self.vllm.num_free_blocks() - num_blocks < self._watermark:
            return None
        got = self.vllm.new_blocks(num_blocks)
        self._prealloc.setdefault(request_id, []).extend(got)
        return [b.block_id for b in got]

    def _batch_full(self) -> bool:
        holding = sum(1 for r in self.vllm.waiting() if r.num_computed_tokens > 0)
        return len(self.vllm.running()) + holding + len(self._prealloc) >= self.vllm.max_num_seqs()

    def free_pre_alloc(self, request_id: str) -> int:
        blocks = self._prealloc.pop(request_id, [])
        self.vllm.free_blocks(blocks)
        return len(blocks)

    def reserved_blocks(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._prealloc.get(request_id, ())]

    def write_blocks(self, block_ids: Sequence[int], data: object) -> None:
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"KV data must be a tensor, got {type(data).__name__}")
        expected = (len(block_ids),) + self.vllm.block_shape
        if tuple(data.shape) != expected or str(data.dtype) != self.vllm.kv_dtype:
            raise ValueError(f"KV data of shape {tuple(data.shape)} {data.dtype} does not match "
                             f"{expected} {self.vllm.kv_dtype}")
        with _PROCESS_LOCK:
            self.vllm.write_kv(block_ids, data)

    def commit_dst(self, state: MigrationRequestState) -> None:
        rid = state.request_id
        if rid in self._tracked or self.vllm.request(rid) is not None:
            raise MigrationError(f"request {rid} already exists on this instance")
        tokens = state.prompt_token_ids + state.output_token_ids
        self._validate_tokens(tokens, len(state.prompt_token_ids), rid, ints_checked=True)
        request = Request(rid, state.prompt_token_ids, state.sampling, state.priority, state.arrival_time,
                          state.reply_to, state.objective)
        self._validate_sampling(request)
        vreq = self._vllm_request(request, prior=state.output_token_ids)
        if state.status == SeqStatus.RUNNING:
            reserved = self._prealloc.get(rid, [])
            need = cdiv(state.num_computed_tokens, self.block_size)
            if not 0 < state.num_computed_tokens < len(tokens) or len(reserved) != need:
                raise MigrationError(
                    f"request {rid}: {len(reserved)} reserved blocks for {state.num_computed_tokens} "
                    f"computed tokens of {len(tokens)} (need {need} blocks and at most all but the last token)")
            self.vllm.adopt(vreq, reserved, state.num_computed_tokens)
            del self._prealloc[rid]
        else:
            self.free_pre_alloc(rid)
        self.core.add_request(vreq)  # holding KV: vLLM schedules it ahead of the waiting queue
        self._tracked[rid] = _Tracked(request, num_outputs=len(state.output_token_ids),
                                      base_preemptions=state.num_preemptions)
