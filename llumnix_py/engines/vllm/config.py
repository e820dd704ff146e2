"""Settings of one vLLM instance under llumnix-py, and the process environment vLLM needs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from llumnix_py.engines.tokenizer import FrontendInfo, checkpoint_config, context_limit, load_tokenizer

if TYPE_CHECKING:
    from llumnix_py.engines.registry import EngineSpec


@dataclass(frozen=True)
class VLLMEngineConfig:
    """How to start one vLLM engine core (single process, eager mode).

    Attributes:
        checkpoint: a Hugging Face model folder (config.json, safetensors, tokenizer).
        block_size: tokens per KV block (vLLM's CPU attention needs a multiple of 32).
        num_blocks: usable KV blocks (vLLM adds its null block); None lets vLLM size
            the pool from ``VLLM_CPU_KVCACHE_SPACE`` / free GPU memory.
        max_model_len: context limit; None: the model's.
        max_num_seqs: running requests at most.
        max_num_batched_tokens: tokens per step at most; None: vLLM's default.
        dtype: weights and KV dtype (``bfloat16``, ``float32``, ``auto``...).
        watermark: fraction of blocks an incoming migration must leave free.
        num_threads: torch/OpenMP threads of this instance; None leaves them alone.
        extra: more ``vllm.EngineArgs`` keyword arguments (e.g. ``{"seed": 1}``).
    """

    checkpoint: str
    block_size: int = 32
    num_blocks: Optional[int] = 512
    max_model_len: Optional[int] = None
    max_num_seqs: int = 64
    max_num_batched_tokens: Optional[int] = None
    dtype: str = "bfloat16"
    watermark: float = 0.01
    num_threads: Optional[int] = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("the vllm engine needs a model folder (EngineSpec.checkpoint, --model)")
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError("num_blocks must be >= 2")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if not 0.0 <= self.watermark < 0.5:
            raise ValueError("watermark must be in [0, 0.5)")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError("num_threads must be positive")
        reserved = {"model", "enable_prefix_caching", "distributed_executor_backend", "enforce_eager",
                    "async_scheduling"}
        clash = reserved & set(self.extra)
        if clash:
            raise ValueError(f"extra vLLM arguments may not set {sorted(clash)} (the adapter fixes them)")

    @classmethod
    def from_spec(cls, spec) -> "VLLMEngineConfig":
        """From an ``EngineSpec``: limits from ``spec.engine``, the model from ``spec.checkpoint``,
        extra ``vllm.EngineArgs`` from ``spec.model`` (a tuple of (name, value) pairs)."""
        e = spec.engine
        return cls(checkpoint=spec.checkpoint or "", block_size=e.block_size, num_blocks=e.num_blocks,
                   max_model_len=spec.max_model_len, max_num_seqs=e.max_batch_size,
                   max_num_batched_tokens=e.max_batched_tokens, watermark=e.watermark,
                   num_threads=spec.num_threads, extra=dict(spec.model))

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.EngineArgs``.

        Fixed choices: one process (``uni`` executor, eager), synchronous scheduling (a step
        returns its own tokens), no prefix caching (a migrated request's blocks are private).
        """
        args: dict[str, Any] = dict(
            model=self.checkpoint, dtype=self.dtype, block_size=self.block_size,
            max_num_seqs=self.max_num_seqs, enforce_eager=True, distributed_executor_backend="uni",
            enable_prefix_caching=False, async_scheduling=False, disable_log_stats=True,
        )
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        if self.max_num_batched_tokens is not None:
            args["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.num_blocks is not None:
            args["num_gpu_blocks_override"] = self.num_blocks + 1  # + vLLM's null block
        args.update(self.extra)
        return args


def prepare_environment(num_threads: Optional[int]) -> None:
    """Set the variables vLLM reads (some at import) for a single-process CPU instance.

    Call before the first ``import vllm`` in the process. Values already set win,
    so an operator can override any of them.
    """
    defaults = {
        "VLLM_HOST_IP": "127.0.0.1",  # the one-rank process group binds here
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # instances share the machine's cores
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the pool is sized by num_blocks anyway
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    if num_threads is not None:
        defaults["OMP_NUM_THREADS"] = str(num_threads)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def vllm_frontend_info(spec: "EngineSpec") -> FrontendInfo:
    """A vLLM model's tokenizer (``tokenizer.json``) and context limit (its ``config.json``'s
    ``max_position_embeddings``, capped by ``spec.max_model_len``); imports no vLLM."""
    positions = checkpoint_config(spec.checkpoint).get("max_position_embeddings") if spec.checkpoint else None
    return FrontendInfo(load_tokenizer(spec.checkpoint), context_limit(spec.max_model_len, positions))
