"""The built-in engine: ``EngineCore`` over the Llama model and a paged KV cache."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

from llumnix_py.engines.core import EngineConfig, EngineCore
from llumnix_py.engines.torch_engine.executor import TorchExecutor
from llumnix_py.engines.torch_engine.loader import load_checkpoint
from llumnix_py.engines.torch_engine.model import LlamaModel, ModelConfig
from llumnix_py.engines.tokenizer import FrontendInfo, checkpoint_config, context_limit, load_tokenizer

if TYPE_CHECKING:
    from llumnix_py.engines.registry import EngineSpec


class TorchEngine(EngineCore):
    """A built-in engine instance; ``tokenizer`` turns text into the model's token ids."""

    def __init__(self, config: EngineConfig, executor: TorchExecutor, tokenizer) -> None:
        super().__init__(config, executor)
        self.tokenizer = tokenizer


def make_torch_engine(
    engine: Optional[EngineConfig] = None,
    model: Optional[ModelConfig] = None,
    checkpoint: Optional[str] = None,
    max_model_len: Optional[int] = None,
) -> TorchEngine:
    """Build the built-in engine.

    Args:
        engine: block pool and batching limits; its ``eos_token_id`` defaults to the tokenizer's.
        model: model shape for seeded random weights (ignored with ``checkpoint``).
        checkpoint: a folder with ``config.json`` + ``model.safetensors`` (HF Llama layout)
            and optionally ``tokenizer.json``.
        max_model_len: cap on prompt + output tokens (default: the model's positions).

    Torch's thread count is left alone: it is per process, and the runtime that owns the
    process sets it (``llumnix_py.engines.threads``).
    """
    engine = engine or EngineConfig()
    if checkpoint:
        model_cfg, net = load_checkpoint(checkpoint, dtype=model.dtype if model else None)
    else:
        model_cfg = model or ModelConfig()
        net = LlamaModel(model_cfg)
    net.eval()
    tokenizer = load_tokenizer(checkpoint)
    if engine.eos_token_id is None and tokenizer.eos_token_id is not None:
        engine = dataclasses.replace(engine, eos_token_id=tokenizer.eos_token_id)
    executor = TorchExecutor(net, model_cfg, engine.num_blocks, engine.block_size, max_model_len,
                            num_host_blocks=engine.num_host_blocks)
    return TorchEngine(engine, executor, tokenizer)


def torch_frontend_info(spec: "EngineSpec") -> FrontendInfo:
    """The built-in engine's tokenizer and context limit: the checkpoint's (``config.json``,
    2048 positions when it names none) or the seeded model shape's."""
    if spec.checkpoint:
        positions = checkpoint_config(spec.checkpoint).get("max_position_embeddings", 2048)
    else:
        positions = ModelConfig(**dict(spec.model)).max_position_embeddings
    return FrontendInfo(load_tokenizer(spec.checkpoint), context_limit(spec.max_model_len, positions))
