"""Migrations in the simulator: the real protocol and llumlet cores on the virtual clock.

A migration (from a scheduler round, or by hand with ``SimCluster.schedule_migration``)
starts only if the source's ``LlumletCore`` admits it (``begin_migration``: the request
is there, not already migrating, fewer than ``max_outgoing`` in flight), exactly as a
real llumlet's ``migrate_out``. It is then a real ``SourceMigration`` whose actions the
real ``MigrationDriver`` carries out over a ``LocalPort`` to the destination's core
(``LlumletCore.handle``: tombstones, ``max_incoming``, tracking of committed requests).
``SimMigrations`` turns those actions into events:

* an action that takes no virtual time is followed at once by the next one;
* one that takes time schedules its reply as an event that much later:
  ``CopyBlocks`` takes ``profile.migration_time(blocks, cross_node)`` (the pair's link:
  same node or across nodes), a call to the
  destination (pre-allocate, commit, activate, abort) ``rpc_latency_s``;
* the destination parks a committed request and runs it from ``Activate`` on, which
  the source sends once the commit's reply came back and it freed its copy (no
  message is lost here, so the ownership arbiter is never asked);
* ``Freeze`` waits for the source's iteration boundary: while the source has a step
  in flight it is parked on the instance and resumed at the step's end (``resume``);
* when the machine is done, the source core learns the result (``end_migration``)
  and a ``MigrationResult`` (with the downtime, freeze to activation) goes to ``on_done``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from migration import protocol as p
from migration.driver import LocalPort, MigrationDriver, MigrationResult

if TYPE_CHECKING:
    from llumnix_py.scheduler.core import MigrationOrder
    from llumnix_py.sim.cluster import SimInstance
    from llumnix_py.sim.config import SimConfig

_REFUSED = "refused by the source (request not there, already migrating, or max_outgoing reached)"


@dataclass(eq=False)
class MigrationRun:
    """One migration in flight: its order, state machine, driver, ends and timestamps."""

    order: "MigrationOrder"
    machine: p.SourceMigration
    driver: MigrationDriver
    src: "SimInstance"
    dst: "SimInstance"
    started_at: float
    frozen_at: Optional[float] = None
    committed_at: Optional[float] = None


class SimMigrations:
    """The migrations in flight in one simulated cluster.

    Args:
        config: the simulation's settings (migration config, rpc latency, cost profile).
        now: the virtual clock.
        push: schedules ``fn(arg)`` at a virtual time (the event heap).
        wake: starts a step on an instance if it is idle and has work.
        on_done: called with each result and its run when a migration ends.
    """

    def __init__(self, config: "SimConfig", now: Callable[[], float],
                 push: Callable[[float, Callable[[Any], None], Any], None],
                 wake: Callable[["SimInstance"], None],
                 on_done: Callable[[MigrationResult, MigrationRun], None]) -> None:
        self.config = config
        self.profile = config.cost_profile
        self._now = now
        self._push = push
        self._wake = wake
        self._on_done = on_done
        self.runs: dict[str, MigrationRun] = {}

    def start(self, order: "MigrationOrder", src: "SimInstance", dst: "SimInstance") -> None:
        """Start ``order`` now, if the source's core admits it (else it ends at once, refused)."""
        now = self._now()
        machine = p.SourceMigration(order.migration_id, order.request_id, order.waiting, self.config.migration)
        driver = MigrationDriver(src.engine, LocalPort(dst.core, src.engine, now=self._now), clock=self._now)
        run = MigrationRun(order, machine, driver, src, dst, now)
        if not src.core.begin_migration(order.request_id, order.migration_id, now=now):
            result = MigrationResult(order.migration_id, order.request_id, p.MigrationStatus.ABORTED_SRC, _REFUSED,
                                     machine.config.mode.value, 0, 0, 0.0, 0.0)
            self._on_done(result, run)
            return
        self.runs[order.migration_id] = run
        self._advance(run, machine.start())

    def resume(self, deferred: list[tuple[MigrationRun, p.Action]]) -> None:
        """Carry on with freezes that waited for an iteration boundary."""
        for run, action in deferred:
            self._advance(run, action)

    def _advance(self, run: MigrationRun, action: p.Action) -> None:
        """Carry out actions until one takes virtual time (or the migration is done)."""
        machine = run.machine
        while not isinstance(action, p.Done):
            if isinstance(action, p.Freeze) and run.src.busy:
                run.src.deferred.append((run, action))  # at the iteration boundary
                return
            event = run.driver.execute(machine, action)
            delay = self._apply_effects(run, action, event)
            if delay > 0:
                self._push(self._now() + delay, self._on_reply, (run, event))
                return
            action = machine.on(event)
        self._finish(run)

    def _on_reply(self, arg: tuple[MigrationRun, p.Event]) -> None:
        run, event = arg
        self._advance(run, run.machine.on(event))

    def _apply_effects(self, run: MigrationRun, action: p.Action, event: p.Event) -> float:
        """Book-keeping after an action ran; returns the virtual time it takes."""
        src, dst = run.src, run.dst
        if isinstance(action, p.QueryBlocks):
            src.dirty = True
            return 0.0
        if isinstance(action, p.PreAllocate):
            dst.dirty = True
            return self.config.rpc_latency_s
        if isinstance(action, p.CopyBlocks):
            profile = src.profile or self.profile  # the source's GPUs send their shards
            return profile.migration_time(len(action.src_block_ids), cross_node=src.node != dst.node)
        if isinstance(action, p.Freeze):
            src.dirty = True
            run.frozen_at = self._now()
            return 0.0
        if isinstance(action, p.Commit):
            dst.dirty = True  # parked there: nothing to run until Activate
            return self.config.rpc_latency_s
        if isinstance(action, p.Activate):
            dst.dirty = True
            run.committed_at = self._now()
            self._wake(dst)
            return self.config.rpc_latency_s
        if isinstance(action, p.FreeSrc):
            src.dirty = True
            self._wake(src)
            return 0.0
        if isinstance(action, p.Rollback):
            src.dirty = dst.dirty = True
            if isinstance(event, p.RolledBack) and event.committed_on_dst:
                run.committed_at = self._now()
            self._wake(src)
            self._wake(dst)
            return self.config.rpc_latency_s if action.abort_dst else 0.0
        return 0.0

    def _finish(self, run: MigrationRun) -> None:
        m = run.machine
        del self.runs[m.migration_id]
        downtime = 0.0
        if run.frozen_at is not None and run.committed_at is not None:
            downtime = run.committed_at - run.frozen_at
        result = MigrationResult(m.migration_id, m.request_id, m.status, m.reason, m.config.mode.value, m.stages,
                                 m.blocks_sent, self._now() - run.started_at, downtime, run.committed_at or 0.0)
        run.src.core.end_migration(result, run.order.dst_address)
        run.src.dirty = run.dst.dirty = True
        self._on_done(result, run)
        self._wake(run.src)
        self._wake(run.dst)
