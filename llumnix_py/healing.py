"""Self-healing policy: when to restart a dead component, and when to stop trying.

A ``RestartBudget`` is a small sans-IO state machine: its driver tells it what it saw
(``down``: the component, or one instance of it, is missing; ``attempt``/``succeeded``/
``failed``: how a restart went), always with ``now``, and asks ``due(now)`` whether a
restart may start. It never reads a clock, sleeps or starts anything itself; the
scheduler watchdog (``llumnix_py.runtime.watchdog``) and the daemon's instance
replenishment drive it with the wall clock, tests with a number.

::

            down                attempt              succeeded
     UP ----------> DOWN -------------> RESTARTING ------------> UP
                     ^  (due: now >= not_before)  |
                     +----------------------------+ failed: streak += 1, back off
                     streak >= max_attempts: GAVE_UP (until ``reset``)

Backoff: the first restart after a healthy life is immediate; after ``streak``
consecutive failures (a restart that raised, or a restarted component that died
within ``stable_s``: a crash loop) the next one waits
``min(backoff_max_s, backoff_initial_s * 2 ** (streak - 1))``. A component that stayed
up ``stable_s`` starts a fresh streak when it dies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class RestartPolicy:
    """How a dead component is brought back.

    Attributes:
        enabled: restart at all (False: a death is only reported).
        max_attempts: consecutive failures (failed restarts, crash loops) before giving up.
        backoff_initial_s: the wait before the second consecutive attempt; doubles after.
        backoff_max_s: the longest wait between attempts.
        stable_s: a restarted component that lives this long is healthy again (its
            next death starts a fresh streak); one that dies sooner counts as a failure.
    """

    enabled: bool = True
    max_attempts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    stable_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("need 0 <= backoff_initial_s <= backoff_max_s")
        if self.stable_s < 0:
            raise ValueError("stable_s must be >= 0")

    def backoff(self, streak: int) -> float:
        """Seconds to wait before an attempt after ``streak`` consecutive failures."""
        if streak <= 0:
            return 0.0
        return min(self.backoff_max_s, self.backoff_initial_s * 2.0 ** (streak - 1))


class Phase(enum.Enum):
    UP = "up"
    DOWN = "down"  # missing; a restart is due at ``not_before``
    RESTARTING = "restarting"
    GAVE_UP = "gave_up"  # the budget is spent: reported, no more attempts until ``reset``


class RestartBudget:
    """The restart state of one component kind (the scheduler, or the instance pool).

    Attributes:
        phase: where the component stands (``Phase``).
        restarts: successful restarts so far.
        streak: consecutive failures (failed attempts, crash loops).
        not_before: the earliest time of the next attempt (while ``DOWN``).
        last_error: why the last attempt failed ("" if it did not).
    """

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.phase = Phase.UP
        self.restarts = 0
        self.streak = 0
        self.not_before = float("-inf")
        self.last_error = ""

    def down(self, now: float, up_since: Optional[float] = None) -> None:
        """The component (or one instance of the pool) is missing.

        Args:
            now: the driver's clock.
            up_since: when the one that died was started (None: unknown); dying sooner
                than ``stable_s`` after it counts as a failure (a crash loop).
        """
        if self.phase is Phase.GAVE_UP:
            return
        crash_loop = up_since is not None and now - up_since < self.policy.stable_s
        if crash_loop:
            self.streak += 1
        elif up_since is not None:
            self.streak = 0  # it had been healthy: a fresh failure
        if self.phase is Phase.RESTARTING:
            return  # the attempt in flight decides; the streak counts on its next ``down``
        if self.streak >= self.policy.max_attempts:
            self.phase = Phase.GAVE_UP
            return
        not_before = now + self.policy.backoff(self.streak)
        if self.phase is Phase.UP:
            self.phase, self.not_before = Phase.DOWN, not_before
        elif self.phase is Phase.DOWN and crash_loop:  # a repeated report of the same loss waits no longer
            self.not_before = max(self.not_before, not_before)

    def due(self, now: float) -> bool:
        """A restart may start now."""
        return self.policy.enabled and self.phase is Phase.DOWN and now >= self.not_before

    def attempt(self, now: float) -> None:
        """A restart starts (only when ``due``)."""
        if not self.due(now):
            raise RuntimeError(f"no restart is due ({self.phase.value}, not before {self.not_before})")
        self.phase = Phase.RESTARTING

    def succeeded(self, now: float) -> None:
        """The restart brought the component back (it answered)."""
        if self.phase is not Phase.RESTARTING:
            raise RuntimeError(f"no restart in progress ({self.phase.value})")
        self.phase = Phase.UP
        self.restarts += 1
        self.last_error = ""

    def failed(self, now: float, error: str = "") -> None:
        """The restart did not bring it back: back off, or give up."""
        if self.phase is not Phase.RESTARTING:
            raise RuntimeError(f"no restart in progress ({self.phase.value})")
        self.streak += 1
        self.last_error = error
        if self.streak >= self.policy.max_attempts:
            self.phase = Phase.GAVE_UP
        else:
            self.phase, self.not_before = Phase.DOWN, now + self.policy.backoff(self.streak)

    def satisfied(self) -> None:
        """Nothing is missing any more (another path brought it back): no attempt is due;
        the streak is kept, so a crash loop still counts."""
        if self.phase is Phase.DOWN:
            self.phase = Phase.UP

    def reset(self) -> None:
        """An operator brought it back by hand: a fresh budget (restart count kept)."""
        self.phase, self.streak, self.not_before, self.last_error = Phase.UP, 0, float("-inf"), ""

    def report(self, now: float) -> dict[str, Any]:
        """The budget for ``/health`` and ``state()``: phase, restarts, streak, next attempt."""
        wait = max(0.0, self.not_before - now) if self.phase is Phase.DOWN else None
        return {"phase": self.phase.value, "restarts": self.restarts, "streak": self.streak,
                "next_attempt_in_s": wait, "last_error": self.last_error}
