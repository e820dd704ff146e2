"""Migrations in the simulator: the real migration protocol driven on the virtual clock.

Each migration (from a scheduler round, or by hand with
``SimCluster.schedule_migration``) is a real ``SourceMigration`` state machine whose
actions the real ``MigrationDriver`` carries out over a ``LocalPort`` to the
destination instance's ``DestinationMigrations``. ``MigrationsMixin`` adds to
``SimCluster`` what turns those actions into events:

* an action that takes no virtual time is followed at once by the next one;
* one that takes time schedules its reply as an event that much later:
  ``CopyBlocks`` takes ``profile.migration_time(blocks)``, a call to the
  destination (pre-allocate, commit, abort) ``rpc_latency_s``;
* ``Freeze`` waits for the source's iteration boundary: while the source has a step
  in flight it is parked in ``SimInstance.deferred`` and resumed at the step's end;
* when the machine is done, a ``MigrationResult`` (with the downtime, freeze to
  commit) is recorded and the request's record updated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from llumnix_py.scheduler.core import MigrationOrder
from migration import protocol as p
from migration.driver import LocalPort, MigrationDriver, MigrationResult

if TYPE_CHECKING:
    from llumnix_py.sim.cluster import SimInstance


@dataclass(eq=False)
class _MigrationRun:
    """One migration in flight: its order, state machine, driver, ends and timestamps."""

    order: MigrationOrder
    machine: p.SourceMigration
    driver: MigrationDriver
    src: SimInstance
    dst: SimInstance
    started_at: float
    frozen_at: Optional[float] = None
    committed_at: Optional[float] = None


class MigrationsMixin:
    """The migration events of ``SimCluster`` (mixed into it; not usable alone).

    It relies on the cluster's ``config``, ``profile``, ``scheduler``, ``instances``,
    ``records``, ``migrations`` (finished ``MigrationResult`` list), ``_runs``
    (migrations in flight by id), ``now``, and its ``_push`` / ``_clock`` / ``_wake``
    methods.
    """

    def _start_migration(self, order: MigrationOrder) -> None:
        src = self.instances.get(order.src)
        dst = self.instances.get(order.dst)
        if src is None or dst is None:
            self.scheduler.on_migration_done(order.migration_id)
            return
        machine = p.SourceMigration(order.migration_id, order.request_id, order.waiting, self.config.migration)
        driver = MigrationDriver(src.engine, LocalPort(dst.dest, src.engine, now=self._clock), clock=self._clock)
        run = _MigrationRun(order, machine, driver, src, dst, self.now)
        self._runs[order.migration_id] = run
        self._advance(run, machine.start())

    def _advance(self, run: _MigrationRun, action: p.Action) -> None:
        """Carry out actions until one takes virtual time (or the migration is done)."""
        machine = run.machine
        while not isinstance(action, p.Done):
            if isinstance(action, p.Freeze) and run.src.busy:
                run.src.deferred.append((run, action))  # at the iteration boundary
                return
            event = run.driver.execute(machine, action)
            delay = self._apply_effects(run, action, event)
            if delay > 0:
                self._push(self.now + delay, self._on_migration_reply, (run, event))
                return
            action = machine.on(event)
        self._finish_migration(run)

    def _on_migration_reply(self, arg: tuple[_MigrationRun, p.Event]) -> None:
        run, event = arg
        self._advance(run, run.machine.on(event))

    def _apply_effects(self, run: _MigrationRun, action: p.Action, event: p.Event) -> float:
        """Book-keeping after an action ran; returns the virtual time it takes."""
        src, dst = run.src, run.dst
        if isinstance(action, p.QueryBlocks):
            src.dirty = True
            return 0.0
        if isinstance(action, p.PreAllocate):
            dst.dirty = True
            return self.config.rpc_latency_s
        if isinstance(action, p.CopyBlocks):
            return self.profile.migration_time(len(action.src_block_ids))
        if isinstance(action, p.Freeze):
            src.dirty = True
            run.frozen_at = self.now
            return 0.0
        if isinstance(action, p.Commit):
            dst.dirty = True
            if isinstance(event, p.Committed) and event.ok:
                run.committed_at = self.now
                self._wake(dst)
            return self.config.rpc_latency_s
        if isinstance(action, p.FreeSrc):
            src.dirty = True
            self._wake(src)
            return 0.0
        if isinstance(action, p.Rollback):
            src.dirty = dst.dirty = True
            if isinstance(event, p.RolledBack) and event.committed_on_dst:
                run.committed_at = self.now
            self._wake(src)
            self._wake(dst)
            return self.config.rpc_latency_s if action.abort_dst else 0.0
        return 0.0

    def _finish_migration(self, run: _MigrationRun) -> None:
        m = run.machine
        del self._runs[m.migration_id]
        self.scheduler.on_migration_done(m.migration_id)
        downtime = 0.0
        if run.frozen_at is not None and run.committed_at is not None:
            downtime = run.committed_at - run.frozen_at
        result = MigrationResult(m.migration_id, m.request_id, m.status, m.reason, m.config.mode.value, m.stages,
                                 m.blocks_sent, self.now - run.started_at, downtime, run.committed_at or 0.0)
        self.migrations.append(result)
        if m.status == p.MigrationStatus.FINISHED:
            rec = self.records.get(m.request_id)
            if rec is not None:
                rec.migrations += 1
                rec.migration_downtime += downtime
        run.src.dirty = run.dst.dirty = True
        self._wake(run.src)
        self._wake(run.dst)

