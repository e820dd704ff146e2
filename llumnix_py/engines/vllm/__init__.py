"""vLLM as a llumnix-py engine: ``EngineSpec(kind="vllm", checkpoint=PATH)``.

The engine registry names ``build_vllm_engine`` by import path; vLLM itself is
imported only when an instance is built, so this package imports where vLLM is not
installed (building then fails with vLLM's ImportError).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llumnix_py.engines.base import EngineAdapter
    from llumnix_py.engines.registry import EngineSpec


def build_vllm_engine(spec: EngineSpec) -> EngineAdapter:
    """Registry builder: an ``EngineSpec`` -> a started ``VLLMEngineAdapter`` (loads the model).

    ``spec.checkpoint`` is the model folder; ``spec.engine`` gives the block size (a multiple
    of 32 on CPU), usable blocks, batch and token limits and the watermark; ``spec.model``
    passes extra ``vllm.EngineArgs`` as (name, value) pairs.
    """
    from llumnix_py.engines.vllm.adapter import VLLMEngineAdapter
    from llumnix_py.engines.vllm.config import VLLMEngineConfig

    return VLLMEngineAdapter.start(VLLMEngineConfig.from_spec(spec))


__all__ = ["build_vllm_engine"]
