"""vLLM as a llumnix-py engine: ``EngineSpec(kind="vllm", checkpoint=PATH)``.

Importing this package registers the ``vllm`` engine kind; vLLM itself is imported
only when an instance is built (``build_vllm_engine``), so the registration is cheap
and works where vLLM is not installed (building then fails with vLLM's ImportError).
"""

from __future__ import annotations

from llumnix_py.engines.registry import engine_kinds, register_engine


def build_vllm_engine(spec):
    """Registry builder: see ``llumnix_py.engines.vllm.adapter.build_vllm_engine``."""
    from llumnix_py.engines.vllm.adapter import build_vllm_engine as build

    return build(spec)


if "vllm" not in engine_kinds():  # the main registry may already name us (lazily)
    register_engine("vllm", build_vllm_engine)

__all__ = ["build_vllm_engine"]
