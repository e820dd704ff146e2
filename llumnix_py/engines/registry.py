"""Engines by name: a validating registry from ``EngineSpec.kind`` to a builder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from llumnix_py.engines.base import EngineAdapter
from llumnix_py.engines.core import EngineConfig
from llumnix_py.errors import UnknownPolicyError


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
        if self.kind not in _BUILDERS:
            raise UnknownPolicyError(f"unknown engine {self.kind!r}; known: {sorted(_BUILDERS)}")
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
        raise UnknownPolicyError(f"unknown sim profile {spec.sim_profile!r}; known: {sorted(PROFILES)}") from None
    return EngineCore(spec.engine, SimExecutor(profile))


def _build_vllm(spec: EngineSpec) -> EngineAdapter:
    # vLLM lives in its own environment (`make test-vllm` builds .venv-vllm); imported only when asked for.
    from llumnix_py.engines.vllm import build_vllm_engine

    return build_vllm_engine(spec)


_BUILDERS: dict[str, Callable[[EngineSpec], EngineAdapter]] = {
    "torch": _build_torch, "sim": _build_sim, "vllm": _build_vllm}


def register_engine(kind: str, builder: Callable[[EngineSpec], EngineAdapter]) -> None:
    """Plug in an engine adapter under a name (``EngineSpec(kind=name)`` then builds it)."""
    if kind in _BUILDERS:
        raise ValueError(f"engine {kind!r} is already registered")
    if not callable(builder):
        raise TypeError("builder must be callable")
    _BUILDERS[kind] = builder


def engine_kinds() -> list[str]:
    return sorted(_BUILDERS)


def build_engine(spec: EngineSpec) -> EngineAdapter:
    return _BUILDERS[spec.kind](spec)
