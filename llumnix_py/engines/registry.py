"""Engines by name: validating registries from ``EngineSpec.kind`` to a builder and to
what a frontend needs of that kind (``FrontendInfo``: tokenizer, detokenizer, context limit).

``torch`` and ``sim`` are built here; ``vllm`` is an import path, loaded only when a
vLLM instance is built (vLLM lives in its own environment, ``make test-vllm``). Frontend
infos are import paths too, so a frontend loads only the kind it serves, and no frontend
module names an engine kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from llumnix_py.engines.base import EngineAdapter
from llumnix_py.engines.core import EngineConfig
from llumnix_py.engines.tokenizer import FrontendInfo, default_frontend_info
from llumnix_py.errors import UnknownEngineError
from llumnix_py.lazy_registry import LazyRegistry, check_callable


@dataclass(frozen=True)
class EngineSpec:
    """What engine an instance runs; plain data, so it can be shipped to a Ray actor.

    Attributes:
        kind: ``torch`` (built-in, default), ``sim`` (cost model), ``vllm`` (vLLM v1 engine,
            needs vLLM installed), or a registered adapter.
        engine: block pool and batching limits.
        model: built-in engine model shape (``ModelConfig`` kwargs) for seeded random weights.
        checkpoint: a Llama-layout checkpoint folder (built-in engine).
        max_model_len: cap on prompt + output tokens.
        num_threads: torch threads per instance. Applied by the runtime, not the builder: per
            worker process on Ray; on the local runtime one value for the whole process,
            claimed by the cluster (``llumnix_py.engines.threads``).
        sim_profile: cost profile name for the simulated engine.
    """

    kind: str = "torch"
    engine: EngineConfig = field(default_factory=EngineConfig)
    model: tuple[tuple[str, object], ...] = ()
    checkpoint: Optional[str] = None
    max_model_len: Optional[int] = None
    num_threads: Optional[int] = 1
    sim_profile: str = "llama-7b-a10"

    def __post_init__(self) -> None:
        ENGINES.check_name(self.kind)
        object.__setattr__(self, "model", tuple(sorted(dict(self.model).items())))


def _build_torch(spec: EngineSpec) -> EngineAdapter:
    from llumnix_py.engines.torch_engine.engine import make_torch_engine
    from llumnix_py.engines.torch_engine.model import ModelConfig

    model = ModelConfig(**dict(spec.model)) if spec.model else None
    return make_torch_engine(spec.engine, model, spec.checkpoint, spec.max_model_len)


def _build_sim(spec: EngineSpec) -> EngineAdapter:
    from llumnix_py.engines.core import EngineCore
    from llumnix_py.engines.sim.executor import SimExecutor
    from llumnix_py.engines.sim.profiles import PROFILES

    try:
        profile = PROFILES[spec.sim_profile]
    except KeyError:
        raise UnknownEngineError(f"unknown sim profile {spec.sim_profile!r}; known: {sorted(PROFILES)}") from None
    return EngineCore(spec.engine, SimExecutor(profile, num_host_blocks=spec.engine.num_host_blocks))


EngineBuilder = Callable[[EngineSpec], EngineAdapter]
FrontendInfoLoader = Callable[[EngineSpec], FrontendInfo]

ENGINES: LazyRegistry[EngineBuilder] = LazyRegistry(
    "engine", UnknownEngineError, {"vllm": "llumnix_py.engines.vllm:build_vllm_engine"}, check_callable)
ENGINES.register("torch", _build_torch)
ENGINES.register("sim", _build_sim)

FRONTEND_INFO: LazyRegistry[FrontendInfoLoader] = LazyRegistry(
    "engine frontend info", UnknownEngineError,
    {"torch": "llumnix_py.engines.torch_engine.engine:torch_frontend_info",
     "vllm": "llumnix_py.engines.vllm.config:vllm_frontend_info"}, check_callable)
FRONTEND_INFO.register("sim", default_frontend_info)

# Tokens per KV block when the user gives none: vLLM's CPU attention kernels need a multiple of 32.
_DEFAULT_BLOCK_SIZES = {"vllm": 32}


def register_engine(kind: str, builder: EngineBuilder, frontend_info: Optional[FrontendInfoLoader] = None) -> None:
    """Plug in an engine adapter under a name (``EngineSpec(kind=name)`` then builds it).

    ``frontend_info`` gives a frontend the engine's tokenizer and context limit; without it,
    frontends use ``default_frontend_info`` (the checkpoint's tokenizer, ``spec.max_model_len``).

    Raises:
        ValueError: ``kind`` is empty or names another builder.
        TypeError: ``builder`` (or ``frontend_info``) is not callable.
    """
    if frontend_info is not None:
        check_callable(kind, frontend_info)
    ENGINES.register(kind, builder)
    if frontend_info is not None:
        FRONTEND_INFO.register(kind, frontend_info)


def engine_kinds() -> list[str]:
    return ENGINES.names()


def build_engine(spec: EngineSpec) -> EngineAdapter:
    return ENGINES.get(spec.kind)(spec)


def frontend_info(spec: EngineSpec) -> FrontendInfo:
    """The tokenizer, detokenizer and context limit a frontend serving ``spec`` uses."""
    loader = FRONTEND_INFO.get(spec.kind) if spec.kind in FRONTEND_INFO else default_frontend_info
    return loader(spec)


def default_block_size(kind: str) -> int:
    """Tokens per KV block an engine kind runs with when none is asked for."""
    return _DEFAULT_BLOCK_SIZES.get(kind, EngineConfig.block_size)
