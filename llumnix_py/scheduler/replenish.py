"""Holding the instance count: a dead instance is replaced, one launch at a time, with backoff.

The daemon *has* a ``Replenisher``. Each scheduler tick tells it how many instances
are live (``tick(now, live)``); when that is below the floor (the configured count,
or ``min_instances`` with auto-scaling) it launches one replacement, in its own
thread once started (an actor takes seconds to start; polls and migration rounds go
on meanwhile), inline when the daemon is stepped by hand. Whether a launch may start
is a ``RestartBudget``'s decision: immediate after a healthy life, exponential
backoff after failed launches or replacements that die within ``stable_s``, and a
reported stop after ``max_attempts`` consecutive failures.

A replacement is a new instance (a new id, so a new incarnation): the scheduler
dispatches to it once it has answered its first poll (``SchedulerDaemon.add_instance``).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

from llumnix_py.healing import Phase, RestartBudget, RestartPolicy

log = logging.getLogger(__name__)


class Replenisher:
    """Replaces dead instances to keep ``floor`` of them.

    Args:
        policy: backoff and bound of the replacement loop.
        launch: starts one instance and adds it to the scheduler; returns its id.

    Attributes:
        target: the configured instance count (None: not holding any count yet).
        budget: the ``RestartBudget`` of the instance pool.
        replaced: replacements launched successfully.
    """

    stop_timeout_s = 60.0  # ``stop`` waits this long for a launch in flight

    def __init__(self, policy: RestartPolicy, launch: Callable[[], Any]) -> None:
        self.budget = RestartBudget(policy)
        self.target: Optional[int] = None
        self.min_instances: Optional[int] = None  # with auto-scaling: the floor instead of ``target``
        self.replaced = 0
        self._launch = launch
        self._started: dict[str, float] = {}  # instance id -> when it was launched
        self._inflight: Optional[Future] = None
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def floor(self) -> Optional[int]:
        return self.min_instances if self.min_instances is not None else self.target

    def start(self) -> None:
        """Launch replacements in a thread of their own from now on."""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="scheduler-replenish")

    def stop(self) -> None:
        """Wait for a launch in flight (so its instance is stopped with the others), then stop."""
        fut, pool = self._inflight, self._pool
        self._pool = None
        if fut is not None:
            try:
                fut.result(timeout=self.stop_timeout_s)
            except Exception:
                pass
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # ----- what the daemon saw -------------------------------------------------------------
    def launched(self, instance_id: str, now: float) -> None:
        self._started[instance_id] = now

    def died(self, instance_id: str, now: float) -> None:
        """An instance was removed as dead: a replacement becomes due (a crash loop if it was young)."""
        up_since = self._started.pop(instance_id, None)
        if self.floor is not None:
            self.budget.down(now, up_since)

    def removed(self, instance_id: str) -> None:
        """An instance left on purpose (drained): nothing to replace."""
        self._started.pop(instance_id, None)

    def scaled_by_hand(self, delta: int) -> None:
        """The operator launched (+) or drained (-) instances: the configured count follows."""
        if self.target is not None:
            self.target = max(0, self.target + delta)

    # ----- the loop ------------------------------------------------------------------------
    def tick(self, now: float, live: int) -> None:
        """Collect a finished launch; start another if the count is short and the budget allows."""
        fut = self._inflight
        if fut is not None:
            if not fut.done():
                return
            self._inflight = None
            self._finish(fut, now)
        floor = self.floor
        if floor is None or live >= floor:
            self.budget.satisfied()
            return
        self.budget.down(now)  # short, whatever the reason (a death seen by a previous scheduler)
        if not self.budget.due(now):
            return
        self.budget.attempt(now)
        log.warning("%d of %d instances live: launching a replacement", live, floor)
        if self._pool is None:
            fut = Future()
            try:
                fut.set_result(self._launch())
            except Exception as exc:
                fut.set_exception(exc)
            self._finish(fut, now)
        else:
            self._inflight = self._pool.submit(self._launch)

    def _finish(self, fut: Future, now: float) -> None:
        exc = fut.exception()
        if exc is None:
            self.budget.succeeded(now)
            self.replaced += 1
            log.warning("replacement instance %s is up", fut.result())
            return
        self.budget.failed(now, f"{type(exc).__name__}: {exc}")
        if self.budget.phase is Phase.GAVE_UP:
            log.error("giving up replacing instances after %d failures in a row: %s", self.budget.streak, exc)
        else:
            log.warning("launching a replacement failed (next try in %.1f s): %s",
                        self.budget.not_before - now, exc)

    def report(self, now: float) -> dict[str, Any]:
        """For ``state()`` and ``membership()``: the floor, replacements, and the budget."""
        return {"target": self.floor, "replaced": self.replaced, **self.budget.report(now)}
