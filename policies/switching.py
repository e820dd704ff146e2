"""Context-switch policies: how a preempted request leaves the GPU (``preemption_mode``).

A preemption is a context switch, and its cost depends on how it is done
(FastSwitch, Shen, Li and Gao, arXiv:2411.18424, Section 2: "preemption-induced
context switching" is the overhead fair scheduling pays). Two engine-local modes:

* ``RECOMPUTE``: free the request's KV blocks; it re-prefills all its tokens when it
  resumes (vLLM's default). Cost: a prefill of ``num_tokens``.
* ``SWAP``: copy its KV blocks to the host block pool and back when it resumes. Cost:
  per copy a fixed overhead (a copy call, a DMA set-up) plus the bytes over the host
  link, twice (out and in). Block groups (contiguous runs) cut the number of copies,
  which is FastSwitch's first fix ("dynamic block group manager", Section 4.1).

The policies are pure functions of a ``SwitchView`` (what the victim holds) and a
``SwitchCosts`` (what copies and prefills cost on this instance, as the engine last
observed or modelled them); they never read a clock or an engine.

================  ==========================================================
``cost``          swap when the host pool has room and the predicted swap time
                  (out + in) is below the predicted recompute time (default)
``recompute``     always recompute (vLLM's recompute preemption)
``swap``          swap whenever the host pool has room, else recompute
================  ==========================================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable



class PreemptionMode(str, enum.Enum):
    RECOMPUTE = "recompute"
    SWAP = "swap"


@dataclass(frozen=True)
class SwitchCosts:
    """What a context switch costs on one instance.

    Attributes:
        copy_overhead_s: fixed cost of one host<->device copy, seconds.
        host_link_bytes_per_s: bandwidth of the host link, bytes per second.
        recompute_s_per_token: prefill time per token, seconds.
        block_bytes: KV bytes per block.
    """

    copy_overhead_s: float
    host_link_bytes_per_s: float
    recompute_s_per_token: float
    block_bytes: int

    def __post_init__(self) -> None:
        if self.copy_overhead_s < 0 or self.recompute_s_per_token < 0 or self.block_bytes < 0:
            raise ValueError(f"switch costs must be non-negative: {self}")
        if not self.host_link_bytes_per_s > 0:
            raise ValueError(f"host_link_bytes_per_s must be positive, got {self.host_link_bytes_per_s}")

    def copy_time(self, num_blocks: int, num_copies: int) -> float:
        """One direction: ``num_copies`` copies moving ``num_blocks`` blocks in all."""
        return num_copies * self.copy_overhead_s + num_blocks * self.block_bytes / self.host_link_bytes_per_s


@dataclass(frozen=True)
class SwitchView:
    """The victim of a preemption, as a switch policy sees it.

    Attributes:
        request_id: the victim.
        num_tokens: tokens a recompute would prefill again.
        num_blocks: KV blocks a swap would copy out (and later in).
        num_copies: copies that moves them (one per contiguous run of blocks).
        host_free_blocks: free blocks of the host pool.
    """

    request_id: str
    num_tokens: int
    num_blocks: int
    num_copies: int
    host_free_blocks: int


SwitchFn = Callable[[SwitchView, SwitchCosts], PreemptionMode]


def swap_time(view: SwitchView, costs: SwitchCosts) -> float:
    """Predicted time of a swap out and the later swap in."""
    return 2.0 * costs.copy_time(view.num_blocks, view.num_copies)


def recompute_time(view: SwitchView, costs: SwitchCosts) -> float:
    return view.num_tokens * costs.recompute_s_per_token


def _fits(view: SwitchView) -> bool:
    return 0 < view.num_blocks <= view.host_free_blocks


def by_cost(view: SwitchView, costs: SwitchCosts) -> PreemptionMode:
    """Swap when it fits and is predicted cheaper than recomputing; ties recompute."""
    if _fits(view) and swap_time(view, costs) < recompute_time(view, costs):
        return PreemptionMode.SWAP
    return PreemptionMode.RECOMPUTE


def always_recompute(view: SwitchView, costs: SwitchCosts) -> PreemptionMode:
    return PreemptionMode.RECOMPUTE


def always_swap(view: SwitchView, costs: SwitchCosts) -> PreemptionMode:
    """Swap whenever the host pool has room (vLLM's swap preemption)."""
    return PreemptionMode.SWAP if _fits(view) else PreemptionMode.RECOMPUTE

