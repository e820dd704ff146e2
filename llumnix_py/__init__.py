"""llumnix-py: run-time rescheduling of LLM requests across engine instances.

The public API, for code that embeds llumnix-py::

    from llumnix_py import Cluster, ClusterConfig, SamplingParams

Plug in your own engine by implementing ``EngineAdapter`` and registering a
builder with ``register_engine(name, builder)``; ``EngineSpec(kind=name)`` then
runs it under the scheduler (dispatch and scaling always; live migration when it
exposes its KV blocks, recomputation otherwise).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Cluster": "llumnix_py.frontend.cluster",
    "RequestHandle": "llumnix_py.frontend.handles",
    "TokenEvent": "llumnix_py.frontend.handles",
    "NoInstanceError": "llumnix_py.frontend.handles",
    "ClusterConfig": "llumnix_py.config",
    "EngineSpec": "llumnix_py.engines.registry",
    "register_engine": "llumnix_py.engines.registry",
    "EngineConfig": "llumnix_py.engines.core",
    "EngineCore": "llumnix_py.engines.core",
    "EngineAdapter": "llumnix_py.engines.base",
    "SamplingParams": "llumnix_py.engines.types",
    "Request": "llumnix_py.engines.types",
    "RequestOutput": "llumnix_py.engines.types",
    "FinishReason": "llumnix_py.engines.types",
    "InstanceLoad": "llumnix_py.load",
    "RequestLoad": "llumnix_py.load",
    "SchedulerConfig": "llumnix_py.scheduler.core",
    "LlumletConfig": "llumnix_py.llumlet",
    "PolicyConfig": "policies.config",
    "RestartPolicy": "llumnix_py.healing",
    "MigrationConfig": "migration.protocol",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llumnix_py' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
