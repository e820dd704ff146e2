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
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from llumnix_py.engines.block_manager import CopyRun, copy_runs
from llumnix_py.engines.copier import Copier, CopyTicket
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
        # Seconds steps spent waiting on KV copies (synchronous copies and stores, and waits for
        # asynchronous ones): the context switches' cost to every request in those steps.
        self.stall_s = 0.0

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

    Synchronous (no ``copier``): ``run`` copies everything before the step. Asynchronous:
    ``submit`` queues the copies on the copier (FIFO) and returns at once.

    * A swap-out's device blocks are free in the books, so before a step reads or writes
      one of them its copy must have landed: ``wait_outs(blocks)`` before the step, and
      ``wait_all_outs()`` before the step returns, so no block of a finished step is
      still being read (a migration may write into a freed block next).
    * A swap-in's request is not runnable until its copy has landed (``landed``); its
      host blocks stay owned until then, and its device blocks are its own. A new turn's
      restored conversation prefix is a swap-in too: the turn prefills once it has landed.
    * A finished turn's store to the host pool is a swap-out: its device blocks are free in
      the books once it is queued. Its host blocks belong to the conversation store, and
      every later copy that writes or reads them runs after it on the same FIFO link; a
      synchronous read of them (a migration's) waits for the swap-outs first
      (``settle_outs``).

    Args:
        executor: owns the device and host KV pools.
        grouped: merge contiguous blocks into one copy (False: one copy per block).
        copier: where asynchronous copies run; ``None``: synchronous.
    """

    def __init__(self, executor: "Executor", grouped: bool = True, copier: Optional["Copier"] = None) -> None:
        self.executor = executor
        self.grouped = grouped
        self.copier = copier
        self.meter = SwitchMeter(executor.switch_cost_prior())
        self.landing: dict[str, tuple[CopyTicket, list[CopyRun]]] = {}  # swap-ins in flight, in order
        self._outs: list[tuple[set[int], CopyTicket, list[CopyRun]]] = []  # swap-outs in flight
        self._started = False

    def run(self, plan: "StepPlan") -> float:
        """Copy everything ``plan`` swaps or restores, now; the copies' time in seconds."""
        return (self._copy(plan.swap_out, self.executor.swap_out)
                + self._copy([(host, dev) for _, host, dev in plan.swap_in + plan.restore], self.executor.swap_in))

    def _copy(self, pairs: Sequence[tuple[list[int], list[int]]], copy: Callable[[list[CopyRun]], float]) -> float:
        """Copy each (source blocks, destination blocks) pair in runs with ``copy``; the total
        seconds, each copy's also fed to the meter."""
        total = 0.0
        for src, dst in pairs:
            runs = copy_runs(src, dst, self.grouped)
            seconds = copy(runs)
            self.meter.observe_copy(runs, seconds)
            total += seconds
        return total

    def store(self, dev: list[int], host: list[int]) -> float:
        """Copy a finished turn's blocks to the host pool: now (the seconds it took), or
        queued as a swap-out when asynchronous (0.0; it overlaps the next step)."""
        if self.copier is not None:
            self._start()
            self._queue_out(dev, host)
            return 0.0
        runs = copy_runs(dev, host, self.grouped)
        seconds = self.executor.swap_out(runs)
        self.meter.observe_copy(runs, seconds)
        return seconds

    # ----- asynchronous ------------------------------------------------------------------
    def submit(self, plan: "StepPlan") -> None:
        """Queue the plan's swap-outs, then its swap-ins and restores (each lands on its own)."""
        assert self.copier is not None
        self._start()
        for dev, host in plan.swap_out:
            self._queue_out(dev, host)
        ex = self.executor
        for rid, host, dev in plan.swap_in + plan.restore:
            runs = copy_runs(host, dev, self.grouped)
            self.landing[rid] = (self.copier.submit(lambda r=runs: ex.swap_in(r)), runs)

    def _queue_out(self, dev: list[int], host: list[int]) -> None:
        assert self.copier is not None
        runs = copy_runs(dev, host, self.grouped)
        ex = self.executor
        self._outs.append((set(dev), self.copier.submit(lambda: ex.swap_out(runs)), runs))

    def _start(self) -> None:
        """The copy thread starts with the first copy, not in a constructor."""
        assert self.copier is not None
        if not self._started:
            start = getattr(self.copier, "start", None)
            if start is not None:
                start()
            self._started = True

    def wait_outs(self, blocks: set[int]) -> float:
        """Wait for the swap-outs still reading any of ``blocks``; the seconds waited."""
        waited = 0.0
        for entry in list(self._outs):
            if entry[0] & blocks:
                waited += self._finish_out(entry)
        return waited

    def wait_all_outs(self) -> float:
        waited = 0.0
        for entry in list(self._outs):
            waited += self._finish_out(entry)
        return waited

    def device_blocks_in_flight(self) -> set[int]:
        """Device blocks a queued copy still reads (swap-outs, stores) or writes (swap-ins,
        restores): no step may touch them."""
        blocks = {b for dev, _, _ in self._outs for b in dev}
        blocks.update(b for _, runs in self.landing.values() for _, d, n in runs for b in range(d, d + n))
        return blocks

    def settle_outs(self) -> None:
        """Wait until every swap-out queued so far has landed, without touching the books
        (safe beside a step on another thread: a migration reading host blocks)."""
        for _, ticket, _ in list(self._outs):
            ticket.wait()

    def _finish_out(self, entry: tuple[set[int], CopyTicket, list[CopyRun]]) -> float:
        _, ticket, runs = entry
        waited = ticket.wait()
        self._outs.remove(entry)
        self.meter.observe_copy(runs, ticket.seconds)
        return waited

    def landed(self) -> list[str]:
        """Request ids whose swap-in has landed since the last call, in submission order."""
        out = [rid for rid, (ticket, _) in self.landing.items() if ticket.done()]
        for rid in out:
            ticket, runs = self.landing.pop(rid)
            self.meter.observe_copy(runs, ticket.seconds)
        return out

    def wait_landing(self, request_id: Optional[str] = None) -> float:
        """Wait for one swap-in (the oldest when ``request_id`` is None) to land; it is then
        reported by ``landed``. The seconds waited."""
        if not self.landing:
            return 0.0
        rid = request_id if request_id is not None else next(iter(self.landing))
        return self.landing[rid][0].wait()

    def close(self) -> None:
        if self.copier is not None:
            self.wait_all_outs()
            for ticket, _ in list(self.landing.values()):
                ticket.wait()
            self.copier.close()
