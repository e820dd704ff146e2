"""The policy registries, one per kind of decision, with the built-in policies by import path.

Each built-in is named here as ``"module:function"`` and imported on first ``get``,
so no policy module registers itself and importing this module imports no policy.
Plugins add theirs with ``register(name, fn)``.
"""

from __future__ import annotations

from typing import Callable

from llumnix_py.errors import UnknownPolicyError
from llumnix_py.lazy_registry import LazyRegistry, check_callable

PolicyFn = Callable[..., object]


def _policies(kind: str, builtins: dict[str, str]) -> LazyRegistry[PolicyFn]:
    return LazyRegistry(f"{kind} policy", UnknownPolicyError, builtins, check_callable)


DISPATCH = _policies("dispatch", {
    "freeness": "policies.dispatch:by_freeness",
    "load": "policies.dispatch:by_load",
    "queue": "policies.dispatch:by_queue",
    "prefill_queue": "policies.dispatch:by_prefill_queue",
    "round_robin": "policies.dispatch:by_round_robin",
    "random": "policies.dispatch:by_random",
    "slo": "policies.rescue:by_slo",
    "conversation": "policies.conversation:by_conversation",
    "jobs": "policies.jobs:by_job",
})
PAIRING = _policies("pairing", {
    "freeness": "policies.pairing:pair_by_freeness",
    "balanced": "policies.pairing:pair_by_freeness",
    "defrag": "policies.pairing:pair_by_defrag",
})
MIGRATE_OUT = _policies("migrate_out", {
    "shortest": "policies.selection:select_shortest",
    "longest": "policies.selection:select_longest",
    "last": "policies.selection:select_last",
    "lowest_priority": "policies.selection:select_lowest_priority",
    "waiting_head": "policies.selection:select_waiting_head",
    "most_served": "policies.fairness:select_most_served",
    "most_served_cluster": "policies.fairness:select_most_served_cluster",
})
PREEMPTION_MODE = _policies("preemption_mode", {
    "cost": "policies.switching:by_cost",
    "recompute": "policies.switching:always_recompute",
    "swap": "policies.switching:always_swap",
})
SCALING = _policies("scaling", {
    "freeness": "policies.scaling:scale_by_freeness",
    "none": "policies.scaling:scale_never",
})


def check_policy_names(*, dispatch: str, pairing: str, migrate_out: str, scaling: str) -> None:
    """Raise ``UnknownPolicyError`` if any name is not registered (imports no policy)."""
    DISPATCH.check_name(dispatch)
    PAIRING.check_name(pairing)
    MIGRATE_OUT.check_name(migrate_out)
    SCALING.check_name(scaling)
