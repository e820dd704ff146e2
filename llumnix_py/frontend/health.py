"""What ``/health`` says: a pure judgement over what the frontend knows of the cluster.

``assess(HealthView)`` returns a ``Health``: ``ok``; ``degraded`` (HTTP 200, with the
reasons) while the scheduler is down or fewer instances are live than configured;
``unavailable`` (HTTP 503) when no instance is live. ``Cluster.health`` gathers the
view (the control plane's scheduler state, the last membership, the restart budgets);
this module only judges it, so every case is a one-line test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class HealthView:
    """What the frontend knows, at one moment.

    Attributes:
        scheduler_up: the scheduler answered the frontend's last call.
        live: instances live in the last membership (the scheduler's, or the frontend's own probe).
        configured: the instance count the deployment holds (``min_instances`` with auto-scaling).
        scheduler_restart: the watchdog's budget phase (``llumnix_py.healing.Phase`` value),
            None where no watchdog runs in this process (an attached frontend, the local runtime).
        instance_restart: the scheduler's replacement budget phase, None if unknown.
        restarts: restarts so far by component (``scheduler``, ``instance``).
    """

    scheduler_up: bool
    live: int
    configured: int
    scheduler_restart: Optional[str] = None
    instance_restart: Optional[str] = None
    restarts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Health:
    """The verdict: ``status`` (ok, degraded, unavailable), why, and the view it judged."""

    status: str
    reasons: tuple[str, ...]
    view: HealthView

    @property
    def http_status(self) -> int:
        return 503 if self.status == "unavailable" else 200

    def to_dict(self) -> dict[str, Any]:
        v = self.view
        return {"status": self.status, "reasons": list(self.reasons), "scheduler_up": v.scheduler_up,
                "instances": v.live, "configured_instances": v.configured,
                "restarting": {"scheduler": v.scheduler_restart, "instance": v.instance_restart},
                "restarts": dict(v.restarts)}


def _scheduler_reason(phase: Optional[str]) -> str:
    if phase == "gave_up":
        return "the scheduler is down and its restarts gave up (restart it by hand)"
    if phase in ("down", "restarting"):
        return "the scheduler is down and being restarted; the frontend dispatches by last-known loads"
    return "the scheduler is unreachable; the frontend dispatches by last-known loads"


def assess(view: HealthView) -> Health:
    """Judge ``view``: unavailable without a live instance, degraded when anything is missing."""
    reasons = []
    if view.live == 0:
        reasons.append("no instance is live")
    if not view.scheduler_up:
        reasons.append(_scheduler_reason(view.scheduler_restart))
    if 0 < view.live < view.configured:
        why = {"gave_up": "; replacing them gave up", "down": "; replacing them",
               "restarting": "; replacing them"}.get(view.instance_restart or "", "")
        reasons.append(f"{view.live} of {view.configured} configured instances are live{why}")
    if view.live == 0:
        return Health("unavailable", tuple(reasons), view)
    return Health("degraded" if reasons else "ok", tuple(reasons), view)
