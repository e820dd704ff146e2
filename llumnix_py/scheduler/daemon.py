"""The global scheduler daemon: drives ``GlobalScheduler`` with a clock and real instances.

Each tick: poll every instance's load, collect finished migrations, run a
migration round (every ``migration_interval_s``), decide scaling, stop drained
instances and drop dead ones. ``tick`` is public so tests can step it by hand.

The load poll is the heartbeat. Polls run concurrently (once ``start``ed), so one
unresponsive instance never delays the others. An instance is dead when a call
says so (``InstanceDiedError``: its process is gone) or when it has not answered
for ``heartbeat_timeout_s``; it is then fenced (killed, in case it was only
stuck), removed, and listed in ``membership()["dead"]``, from which frontends
learn which requests to resume elsewhere.

The daemon holds the instance count: its ``Replenisher`` replaces a dead instance
with a new one (``keep(n)`` sets the count; with auto-scaling the floor is
``min_instances``), one launch at a time, with backoff (``llumnix_py.healing``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from llumnix_py.instance import InstanceDiedError, InstanceHandle, InstanceLauncher
from llumnix_py.scheduler.core import GlobalScheduler, MigrationOrder, SchedulerConfig
from llumnix_py.scheduler.frontends import FrontendRecord, FrontendTable
from llumnix_py.scheduler.replenish import Replenisher
from llumnix_py.scheduler.tick import SchedulerTick
from migration.driver import MigrationResult
from migration.ownership import Owner
from migration.protocol import MigrationStatus
from policies.types import ScaleAction, ScaleDecision
from policies.virtual_usage import freeness

if TYPE_CHECKING:
    from llumnix_py.load import InstanceLoad, RequestLoad

log = logging.getLogger(__name__)


def instance_name(n: int) -> str:
    return f"instance-{n:03d}"


class SchedulerDaemon:
    """Owns the scheduler core, the instance handles and the loop thread."""

    def __init__(self, config: SchedulerConfig, launcher: InstanceLauncher,
                 clock: Callable[[], float] = time.monotonic, seed: int = 0) -> None:
        self.config = config
        self.core = GlobalScheduler(config, seed)
        self.launcher = launcher
        self.clock = clock
        self.handles: dict[str, InstanceHandle] = {}
        self.results: deque[MigrationResult] = deque(maxlen=100_000)
        self.outcomes: Counter[str] = Counter()
        self.scale_events: list[tuple[float, str, str]] = []
        self.on_migration: Optional[Callable[[MigrationResult], None]] = None
        self._next_id = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.ticker = SchedulerTick(self.core, config.migration_interval_s)
        launcher.bind_ownership(self.claim_ownership)  # in-process llumlets call the arbiter directly
        self._routes: dict[str, tuple[str, str]] = {}  # in-flight migration id -> (src, dst)
        self.recent: deque[dict] = deque(maxlen=200)  # the latest migrations, for reports
        self.dead: deque[str] = deque(maxlen=10_000)  # instances removed as dead, oldest first
        self.dead_incarnations: deque[tuple[str, str]] = deque(maxlen=10_000)  # (id, incarnation) of each
        self.generation = 0  # bumped on every membership change
        self._pool: Optional[ThreadPoolExecutor] = None
        self._polls: dict[str, Future] = {}  # instance id -> its poll in flight
        self.frontends = FrontendTable(config.frontend_timeout_s)
        self.replenisher = Replenisher(config.instance_restart, lambda: self._launch(1)[0])

    # ----- lifecycle -----------------------------------------------------------------------
    def keep(self, n: int) -> None:
        """Hold ``n`` instances from now on: dead ones are replaced (with auto-scaling, the
        floor is ``min_instances`` instead)."""
        with self._lock:
            self.replenisher.target = n
            if self.config.enable_scaling:
                self.replenisher.min_instances = self.config.policy.min_instances

    def launch(self, n: int = 1) -> list[str]:
        """Scale out by hand: ``n`` more instances (the count held grows with them)."""
        ids = self._launch(n)
        if not self.config.enable_scaling:
            with self._lock:
                self.replenisher.scaled_by_hand(len(ids))
        return ids

    def _launch(self, n: int) -> list[str]:
        ids = []
        for _ in range(n):
            with self._lock:
                iid = instance_name(self._next_id)
                self._next_id += 1
            handle = self.launcher.launch(iid)
            self.add_instance(handle)
            with self._lock:
                self.replenisher.launched(iid, self.clock())
            ids.append(iid)
        return ids

    def add_instance(self, handle: InstanceHandle) -> None:
        load = handle.load()
        with self._lock:
            self.handles[handle.instance_id] = handle
            self.core.register(handle.instance_id, handle.address, self.clock())
            self.core.on_load(handle.instance_id, load, self.clock())
            self.generation += 1

    def start(self) -> None:
        """Start the loop. The heartbeat starts now: instances added before (a restarted
        scheduler attaches them one by one, which can take seconds) count as heard from now."""
        with self._lock:
            now = self.clock()
            for iid, handle in self.handles.items():
                self.core.register(iid, handle.address, now)
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="scheduler-poll")
        self.replenisher.start()
        self._thread = threading.Thread(target=self._run, name="scheduler-daemon", daemon=True)
        self._thread.start()

    def stop(self, terminate_instances: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.replenisher.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if terminate_instances:
            for h in list(self.handles.values()):
                try:
                    self.launcher.terminate(h)
                except Exception:
                    log.exception("stopping %s failed", h.instance_id)
            self.handles.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.tick()
            except Exception:
                log.exception("scheduler tick failed")
            self._stop.wait(max(0.0, self.config.poll_interval_s - (time.monotonic() - t0)))

    # ----- the loop body -------------------------------------------------------------------
    def tick(self, force_round: bool = False) -> None:
        with self._lock:
            handles = list(self.handles.values())
        loads, ended, died = self._poll(handles)
        with self._lock:
            actions = self.ticker.tick(self.clock(), loads, ended, died, force_round=force_round)
            for iid, why in actions.retired:
                self._retire(iid, why)
            self._start_migrations(actions.orders)
            self._scale(actions.scale)
            self._send("set_fair_offsets", {iid: dict(o) for iid, o in actions.fair_offsets.items()})
            self._send("set_role", actions.roles)
            if not self._stop.is_set():
                self.replenisher.tick(self.clock(), len(self.handles))  # a launch runs in its own thread

    def _poll(self, handles: list[InstanceHandle]) -> tuple[dict[str, InstanceLoad], list[str], list[str]]:
        """Poll loads and migration results (the heartbeat): the loads, the ids of the
        migrations that ended (recorded here), and the instances found dead."""
        if self._pool is None:  # not started: poll in this thread (tests step ``tick`` by hand)
            done = []
            for h in handles:
                fut: Future = Future()
                try:
                    fut.set_result(self._poll_one(h))
                except Exception as exc:
                    fut.set_exception(exc)
                done.append((h.instance_id, fut))
        else:
            for h in handles:
                if h.instance_id not in self._polls:  # at most one poll in flight per instance
                    self._polls[h.instance_id] = self._pool.submit(self._poll_one, h)
            wait_futures(list(self._polls.values()), timeout=self.config.heartbeat_timeout_s / 2)
            done = [(iid, f) for iid, f in self._polls.items() if f.done()]
            for iid, _ in done:
                del self._polls[iid]
        died, ended = [], []
        loads: dict[str, InstanceLoad] = {}
        for iid, fut in done:
            exc = fut.exception()
            if isinstance(exc, InstanceDiedError):
                log.warning("instance %s died: %s", iid, exc)
                died.append(iid)
            elif exc is not None:
                log.warning("instance %s did not answer: %s", iid, exc)
            else:
                loads[iid], results = fut.result()
                with self._lock:
                    now = self.clock()
                    for r in results:
                        self._record(r, now)
                        ended.append(r.migration_id)
        return loads, ended, died

    @staticmethod
    def _poll_one(h: InstanceHandle):
        return h.load(), h.pop_results()

    def _send(self, method: str, per_instance: Mapping[str, Any]) -> None:
        """Call the oneway ``method`` on each instance with its value: the global fairness
        view (``set_fair_offsets``; the next tick sends a fresh one) or a role the instance's
        load does not show yet (``set_role``; resent every tick until it does)."""
        for iid, value in per_instance.items():
            handle = self.handles.get(iid)
            if handle is None:
                continue
            try:
                getattr(handle, method)(value)
            except Exception as exc:
                log.warning("%s on %s failed: %s", method, iid, exc)

    def _start_migrations(self, orders: Sequence[MigrationOrder]) -> None:
        for order in orders:
            self._routes[order.migration_id] = (order.src, order.dst)
            handle = self.handles.get(order.src)
            ok = False
            if handle is not None:
                try:
                    ok = handle.migrate_out(order.request_id, order.dst_address, order.migration_id, order.waiting)
                except Exception as exc:
                    log.warning("migrate_out on %s failed: %s", order.src, exc)
            if not ok:  # refused before anything was copied: a hand-off is ordered again later
                self.core.on_migration_refused(order.migration_id, order.request_id, self.clock(),
                                               order.src, order.dst)
                self._routes.pop(order.migration_id, None)

    def _record(self, r: MigrationResult, now: float) -> None:
        self.results.append(r)
        self.outcomes[r.status.value] += 1
        src, dst = self._routes.pop(r.migration_id, ("?", "?"))
        self.core.on_migration_result(r.migration_id, r.request_id, r.status == MigrationStatus.FINISHED, r.blocks,
                                      now, src, dst)
        self.recent.append({"migration_id": r.migration_id, "request_id": r.request_id, "src": src, "dst": dst,
                            "status": r.status.value, "reason": r.reason, "stages": r.stages, "blocks": r.blocks,
                            "downtime_ms": r.downtime_s * 1e3, "total_ms": r.total_s * 1e3})
        if self.on_migration is not None:
            self.on_migration(r)

    def _scale(self, decision: ScaleDecision) -> None:
        if decision.action == ScaleAction.OUT:
            ids = self._launch(1)
            self.scale_events.append((self.clock(), "out", ids[0]))
        elif decision.action == ScaleAction.IN:
            self.scale_events.append((self.clock(), "in", decision.instance_id or ""))

    def _retire(self, iid: str, why: str) -> None:
        """Forget an instance the tick removed from the core; stop or fence it."""
        handle = self.handles.pop(iid, None)
        self._polls.pop(iid, None)
        self.generation += 1
        log.info("instance %s removed (%s)", iid, why)
        if handle is not None and why == "drained":
            self.launcher.terminate(handle)
        if why != "dead":
            self.replenisher.removed(iid)
        else:
            self.replenisher.died(iid, self.clock())
            self.dead.append(iid)
            self.dead_incarnations.append((iid, handle.incarnation if handle is not None else ""))
            if handle is not None:
                try:
                    self.launcher.fence(handle)
                except Exception:
                    log.exception("fencing %s failed", iid)

    # ----- API for frontends ---------------------------------------------------------------
    def dispatch(self, request: RequestLoad) -> Optional[str]:
        with self._lock:
            return self.core.dispatch(request)

    def handle(self, instance_id: str) -> Optional[InstanceHandle]:
        with self._lock:
            return self.handles.get(instance_id)

    def instance_ids(self) -> list[str]:
        with self._lock:
            return sorted(self.handles)

    def membership(self) -> dict[str, Any]:
        """What a frontend needs to survive faults: live instances with their load snapshots
        (for dispatching on its own while the scheduler is unreachable) and incarnations,
        instances removed as dead (their requests must be resumed elsewhere) with the
        incarnation that died (an id may come back as a new instance), and a generation counter."""
        with self._lock:
            return {"generation": self.generation, "instances": sorted(self.handles),
                    "incarnations": {iid: h.incarnation for iid, h in self.handles.items()},
                    "dead": list(self.dead), "dead_incarnations": [list(d) for d in self.dead_incarnations],
                    "loads": self.core.loads(), "healing": self.replenisher.report(self.clock())}

    def claim_ownership(self, migration_id: str, side: str) -> str:
        """The arbiter's answer to a llumlet's claim (see ``SchedulerAPI.claim_ownership``)."""
        with self._lock:
            return self.core.claim_ownership(migration_id, Owner(side), self.clock()).value

    def drain(self, instance_id: str) -> None:
        """Scale in by hand: the instance migrates everything away, then stops."""
        with self._lock:
            self.core.mark_terminating(instance_id)
            self.scale_events.append((self.clock(), "in", instance_id))
            if not self.config.enable_scaling:
                self.replenisher.scaled_by_hand(-1)

    def set_role(self, instance_id: str, role: str) -> None:
        """Flip an instance's role by hand (``GlobalScheduler.flip_role``): from the next
        tick on, the requests of the phase it no longer runs leave it by migration.
        ``UnknownRoleError`` / ``UnknownInstanceError`` (see ``SchedulerAPI.set_role``)."""
        with self._lock:
            self.core.flip_role(instance_id, role, self.clock())

    def frontend_heartbeat(self, frontend: FrontendRecord) -> None:
        if not isinstance(frontend, FrontendRecord):
            raise TypeError(f"a frontend heartbeat carries a FrontendRecord, not {type(frontend).__name__}")
        with self._lock:
            self.frontends.heard(frontend, self.clock())

    def frontend_left(self, frontend_id: str) -> None:
        with self._lock:
            self.frontends.left(frontend_id)

    def state(self) -> dict[str, Any]:
        with self._lock:
            cfg = self.config.policy
            instances = []
            for inst in self.core.loads():
                instances.append({
                    "instance_id": inst.instance_id,
                    "total_blocks": inst.total_blocks,
                    "used_blocks": inst.used_blocks,
                    "running": inst.num_running,
                    "waiting": len(inst.waiting),
                    "terminating": inst.terminating,
                    "role": inst.role,
                    "freeness": freeness(inst, cfg),
                    "kv_copy_stall_s": inst.kv_copy_stall_s,
                    "busy_s": inst.busy_s,
                    "preemptions": inst.preemptions,
                })
            # Downtime of running requests whose KV moved; a queued request was not decoding anyway.
            downtimes = [r.downtime_s for r in self.results if r.status == MigrationStatus.FINISHED and r.blocks]
            recent = list(self.recent)
            return {
                "instances": instances,
                "migrations": dict(self.outcomes),
                "migration_downtime_ms": [d * 1e3 for d in downtimes[-1000:]],
                "recent_migrations": recent,
                "migrations_total": len(self.results),
                "dispatched": self.core.num_dispatched,
                "handoffs": self.core.num_handoffs,
                "redirects": self.core.num_redirects,
                "role_flips": [list(f) for f in self.core.role_flips],
                "scale_events": list(self.scale_events),
                "dead_instances": list(self.dead),
                "frontends": self.frontends.listed(self.clock()),
                "instance_healing": self.replenisher.report(self.clock()),
                "payoff": self.core.payoff.stats(self.core.num_dispatched),
                # fair engines only: the cluster-wide VTC counters (idle clients at or below the floor
                # are forgotten: they would return at the floor), the floor, the largest gap between active clients
                "fairness": {"clients": dict(sorted(self.core.fair_book.counters.items())),
                             "floor": self.core.fair_book.floor,
                             "active": sorted(self.core.fair_book.active),
                             "gap": self.core.fair_book.gap()} if self.core.fair_book else None,
            }
