"""vLLM as a llumnix-py engine: ``EngineSpec(kind="vllm", checkpoint=PATH)``.

Importing this package registers the ``vllm`` engine kind; vLLM itself is imported
only when an instance is built (``build_vllm_engine``), so the registration is cheap
and works where vLLM is not installed (building then fails with vLLM's ImportError).
"""

from __future__ import annotations

from llumnix_py.engines.registry import engine_kinds, register_engine


def build_vllm_engine(spec):
    """Registry builder: an ``EngineSpec`` -> a started ``VLLMEngineAdapter`` (loads the model).

    ``spec.checkpoint`` is the model folder; ``spec.engine`` gives the block size (a multiple
    of 32 on CPU), usable blocks, batch and token limits and the watermark; ``spec.model``
    passes extra ``vllm.EngineArgs`` as (name, value) pairs.
    """
    from llumnix_py.engines.vllm.adapter import VLLMEngineAdapter
    from llumnix_py.engines.vllm.config import VLLMEngineConfig

    return VLLMEngineAdapter.start(VLLMEngineConfig.from_spec(spec))


if "vllm" not in engine_kinds():  # the main registry may already name us (lazily)
    register_engine("vllm", build_vllm_engine)

__all__ = ["build_vllm_engine"]
