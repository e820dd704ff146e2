"""Carrying out the KV copies a step plan names, and learning what they cost.

The batch scheduler plans swaps as block accounting (``StepPlan.swap_out`` /
``swap_in``); the ``Swapper`` moves the data through the executor before the step
runs, so the step never reads a block whose KV has not landed, and a device block
freed by a swap-out is copied before anything can overwrite it. Copies move
contiguous runs of blocks (``copy_runs``): one copy per block group rather than one
per block, FastSwitch's first fix (Shen, Li and Gao, arXiv:2411.18424, Section 4.1).

``SwitchMeter`` turns observed copies and prefills into the ``SwitchCosts`` the
preemption-mode policy reads: the host link's bandwidth as this instance measures
it on its own copies, never a constant (DESIGN.md, "link bandwidth").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING

from llumnix_py.engines.block_manager import CopyRun, copy_runs
from policies.switching import SwitchCosts

if TYPE_CHECKING:
    from llumnix_py.engines.batch_scheduler import StepPlan
    from llumnix_py.engines.executor import Executor

_EMA = 0.2  # weight of a new observation


class SwitchMeter:
    """Running estimates of the host link and the prefill rate, from a prior.

    Args:
        prior: the executor's figures before anything was observed.
    """

    def __init__(self, prior: SwitchCosts) -> None:
        self._costs = prior
        self.copies = 0  # copies issued, both directions
        self.blocks_copied = 0
        self.run_sizes: Counter[int] = Counter()  # blocks per copy -> copies of that size

    def costs(self) -> SwitchCosts:
        return self._costs

    def observe_copy(self, runs: list[CopyRun], seconds: float) -> None:
        blocks = sum(n for _, _, n in runs)
        self.copies += len(runs)
        self.blocks_copied += blocks
        self.run_sizes.update(n for _, _, n in runs)
        c = self._costs
        transfer_s = seconds - len(runs) * c.copy_overhead_s
        if blocks and c.block_bytes and transfer_s > 0:
            bw = blocks * c.block_bytes / transfer_s
            self._costs = replace(c, host_link_bytes_per_s=(1 - _EMA) * c.host_link_bytes_per_s + _EMA * bw)

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """A step that only prefilled ``num_tokens`` tokens took ``seconds``."""
        if num_tokens > 0 and seconds > 0:
            c = self._costs
            per = seconds / num_tokens
            self._costs = replace(c, recompute_s_per_token=(1 - _EMA) * c.recompute_s_per_token + _EMA * per)


class Swapper:
    """Runs a plan's swap copies on the executor, swap-outs first (their device blocks
    are already free in the books and may be handed to a swap-in of the same plan).

    Args:
        executor: owns the device and host KV pools.
        grouped: merge contiguous blocks into one copy (False: one copy per block).
    """

    def __init__(self, executor: "Executor", grouped: bool = True) -> None:
        self.executor = executor
        self.grouped = grouped
        self.meter = SwitchMeter(executor.switch_cost_prior())

    def run(self, plan: "StepPlan") -> float:
        """Copy everything ``plan`` swaps; the copies' time in seconds."""
        total = 0.0
        for dev, host in plan.swap_out:
            runs = copy_runs(dev, host, self.grouped)
            seconds = self.executor.swap_out(runs)
            self.meter.observe_copy(runs, seconds)
            total += seconds
        for host, dev in plan.swap_in:
            runs = copy_runs(host, dev, self.grouped)
            seconds = self.executor.swap_in(runs)
            self.meter.observe_copy(runs, seconds)
            total += seconds
        return total
