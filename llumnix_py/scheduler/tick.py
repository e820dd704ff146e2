"""One scheduler tick over ``GlobalScheduler``, sans-IO: the real daemon and the simulator call it.

A tick takes what the driver learned since the last one (load snapshots, the ends of
migrations, instances found dead) and returns what to do::

    loads, ended migrations ──► on_load / on_migration_done
    instances found dead     ──► removed                           ──► retire (dead)
    decode instances?        ──► redirect_round (every tick)       ──► queued requests back to prefill
    prefill instances?       ──► handoff_round (every tick)        ──► hand-off orders to start
    migration round due?     ──► migration_round                   ──► orders to start
    scaling allowed?         ──► scaling_round                     ──► scale decision
    global fairness?         ──► fair_offsets                      ──► each fair engine's cluster view
    a load with a stale role ──► roles_to_send                     ──► each such instance's role
    drained / silent         ──► removed                           ──► retire (drained / dead)

The driver starts the orders (and reports an order that could not start with
``GlobalScheduler.on_migration_done``), launches or drains instances for the scale
decision, and stops or fences retired instances. Nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

from policies.types import ScaleAction, ScaleDecision

if TYPE_CHECKING:
    from llumnix_py.scheduler.core import GlobalScheduler, MigrationOrder

_EPS = 1e-9  # a round due at exactly the interval is due despite float rounding (virtual clocks)


@dataclass(frozen=True)
class TickActions:
    """What the driver does after a tick.

    Attributes:
        orders: migrations to start, each from ``order.src`` to ``order.dst``.
        scale: the scaling decision (``ScaleAction.NONE`` when none was taken).
        retired: instances removed from the scheduler, with why (``dead`` or ``drained``),
            in the order they were removed: stop drained ones, fence dead ones.
        fair_offsets: per instance, the cluster-wide fairness view to hand its engine
            (``GlobalScheduler.fair_offsets``; empty unless ``global_fairness``).
        roles: per instance whose last load reports another role, the role to send it
            (``GlobalScheduler.roles_to_send``).
    """

    orders: tuple["MigrationOrder", ...] = ()
    scale: ScaleDecision = field(default_factory=lambda: ScaleDecision(ScaleAction.NONE))
    retired: tuple[tuple[str, str], ...] = ()
    fair_offsets: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    roles: Mapping[str, str] = field(default_factory=dict)


class SchedulerTick:
    """The daemon's loop body over one ``GlobalScheduler``; it keeps the round timer.

    Args:
        core: the scheduler core.
        migration_interval_s: a migration round runs when this long has passed since
            the last one (on the driver's clock).
    """

    def __init__(self, core: "GlobalScheduler", migration_interval_s: float) -> None:
        self.core = core
        self.migration_interval_s = migration_interval_s
        self._last_round = float("-inf")

    def round_due(self, now: float) -> bool:
        """Whether a tick at ``now`` runs a migration round."""
        return now - self._last_round >= self.migration_interval_s - _EPS

    def tick(self, now: float, loads: Mapping[str, Any] = {}, ended: Iterable[str] = (),
             died: Iterable[str] = (), migrate: bool = True, force_round: bool = False, scale: bool = True,
             removable: Optional[Callable[[str], bool]] = None, heartbeat: bool = True) -> TickActions:
        """One tick at ``now``.

        Args:
            loads: fresh load snapshots by instance id (the poll's answers).
            ended: ids of migrations whose end the sources reported.
            died: instances a call found dead.
            migrate: whether migration rounds run at all (a round due but skipped
                still restarts the interval).
            force_round: run a migration round even if the interval has not passed.
            scale: whether to take a scaling decision this tick.
            removable: a drained instance is retired only if this says so (the
                simulator checks its engine is empty); default: always.
            heartbeat: retire instances not heard from within the heartbeat timeout
                (a simulator that skips unread polls turns this off).
        """
        core = self.core
        for iid, load in loads.items():
            core.on_load(iid, load, now)
        for mid in ended:
            core.on_migration_done(mid)
        retired: list[tuple[str, str]] = []
        for iid in died:
            self._retire(iid, "dead", retired, now)
        orders: tuple["MigrationOrder", ...] = tuple(core.redirect_round(now)) + tuple(core.handoff_round(now))
        if force_round or self.round_due(now):
            self._last_round = now
            if migrate:
                orders += tuple(core.migration_round(now))
        decision = core.scaling_round() if scale else ScaleDecision(ScaleAction.NONE)
        for iid in core.drained():
            if removable is None or removable(iid):
                self._retire(iid, "drained", retired)
        if heartbeat:
            for iid in core.dead(now):
                self._retire(iid, "dead", retired, now)
        return TickActions(orders, decision, tuple(retired), core.fair_offsets(), core.roles_to_send())

    def _retire(self, iid: str, why: str, retired: list[tuple[str, str]], now: Optional[float] = None) -> None:
        if iid in self.core.instances:
            self.core.remove(iid, dead_at=now if why == "dead" else None)
            retired.append((iid, why))
