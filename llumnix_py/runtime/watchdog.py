"""The scheduler watchdog: a thread that brings a dead global scheduler back.

Under ``llumnix-py serve`` (the frontend that started the deployment) and under the
standalone ``llumnix-py scheduler`` (its foreground process), a ``SchedulerWatchdog``
probes the named scheduler actor every ``interval_s``. When it is gone, the watchdog
restarts it (``ray_runtime.restart_scheduler``: a new actor under the same name that
attaches the running instances by name, rebuilds its load table from their polls,
and launches the missing ones), as a ``RestartBudget`` allows: at once after a healthy
life, with exponential backoff in a crash loop, and not at all after ``max_attempts``
consecutive failures (logged as an error, reported by ``/health`` and ``report``).

Why a supervisor in the serving process and not Ray's own actor restarts: a Ray
restart re-runs the actor's constructor only, while a scheduler must also attach
the instances and start its loop; the supervisor does both through the same path as
an operator's ``restart_scheduler``, and it is what counts restarts and gives up.

The watchdog itself is small: ``check_once`` is one probe and, if due, one restart;
the probe and the restart are injected (``for_ray`` wires the Ray ones), so tests
drive it with fakes and a manual clock.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from llumnix_py.healing import Phase, RestartBudget, RestartPolicy

log = logging.getLogger(__name__)


class SchedulerWatchdog:
    """Restarts the global scheduler when it dies.

    Args:
        policy: backoff and bound of the restart loop.
        probe: True while the scheduler is alive (a slow answer is alive, too).
        restart: starts a new scheduler (attaching the instances); returns its handle.
        on_restart: told the new handle (the control plane switches back to it).
        clock: seconds, monotonic.
    """

    interval_s = 0.2

    def __init__(self, policy: RestartPolicy, probe: Callable[[], bool], restart: Callable[[], Any],
                 on_restart: Optional[Callable[[Any], None]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = RestartBudget(policy)
        self._probe = probe
        self._restart = restart
        self._on_restart = on_restart
        self.clock = clock
        self.up_since = clock()
        self.down_since: Optional[float] = None
        self.downtimes: list[float] = []  # seconds from each death noticed to the scheduler back
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def for_ray(cls, config, on_restart: Optional[Callable[[Any], None]] = None) -> "SchedulerWatchdog":
        """The watchdog of the named scheduler actor of ``config.ray_namespace``."""
        from llumnix_py.runtime.ray_runtime import restart_scheduler, scheduler_alive, stopped_on_purpose

        ns = config.ray_namespace
        # A daemon stopped on purpose (``llumnix-py scheduler --stop``) stays stopped.
        return cls(config.scheduler_restart, lambda: scheduler_alive(ns) or stopped_on_purpose(ns),
                   lambda: restart_scheduler(config), on_restart)

    @property
    def up(self) -> bool:
        with self._lock:
            return self.budget.phase is Phase.UP

    def check_once(self) -> None:
        """One probe; if the scheduler is gone and a restart is due, one restart (blocking)."""
        with self._lock:
            phase = self.budget.phase
        if phase is Phase.UP:
            if self._probe():
                return
            now = self.clock()
            with self._lock:
                self.budget.down(now, self.up_since)
                self.down_since = now
                gave_up = self.budget.phase is Phase.GAVE_UP
            if gave_up:
                log.error("the scheduler died %d times in a row within %.0f s of a restart: not restarting it "
                          "again (restart it by hand)", self.budget.streak, self.budget.policy.stable_s)
            else:
                log.warning("the scheduler is gone: restarting it")
        now = self.clock()
        with self._lock:
            if not self.budget.due(now):
                return
            self.budget.attempt(now)
        try:
            handle = self._restart()
        except Exception as exc:
            now = self.clock()
            with self._lock:
                self.budget.failed(now, f"{type(exc).__name__}: {exc}")
                gave_up = self.budget.phase is Phase.GAVE_UP
            (log.error if gave_up else log.warning)("restarting the scheduler failed%s: %s",
                                                      " (giving up)" if gave_up else "", exc)
            return
        self.restarted(handle)

    def restarted(self, handle: Any) -> None:
        """The scheduler is back (by this watchdog, or by hand: a fresh budget)."""
        now = self.clock()
        with self._lock:
            if self.budget.phase is Phase.RESTARTING:
                self.budget.succeeded(now)
            else:
                self.budget.reset()
            if self.down_since is not None:
                self.downtimes.append(now - self.down_since)
            self.up_since, self.down_since = now, None
        log.warning("the scheduler is back (restart %d)", self.budget.restarts)
        if self._on_restart is not None:
            self._on_restart(handle)

    def report(self) -> dict[str, Any]:
        """The restart budget (phase, restarts, streak, next attempt) and the downtimes so far."""
        with self._lock:
            return {**self.budget.report(self.clock()), "downtimes_s": list(self.downtimes)}

    # ----- the thread ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="scheduler-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (before the scheduler is stopped on purpose); waits for a restart in flight."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception:
                log.exception("scheduler watchdog failed")
            self._stop.wait(self.interval_s)
