"""The frontends attached to the global scheduler, sans-IO: heartbeats in, a listing out.

A frontend (``Cluster``: the HTTP server or library code) reports itself about once
a second (``SchedulerAPI.frontend_heartbeat``) and says goodbye when it stops
(``frontend_left``). The scheduler lists a frontend until it has been silent for
``timeout_s``; nothing else depends on this table (requests and leases live on the
llumlets), so a restarted scheduler simply relearns it from the next heartbeats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class FrontendRecord:
    """What a frontend tells the scheduler about itself.

    Attributes:
        frontend_id: its token address (``Cluster.reply_to``): unique per frontend.
        api_url: where its OpenAI API listens ("" for a frontend with no HTTP server).
        host: the machine it runs on.
        pid: its process id there.
        active_requests: requests in flight through it when it reported.
    """

    frontend_id: str
    api_url: str = ""
    host: str = ""
    pid: int = 0
    active_requests: int = 0

    def __post_init__(self) -> None:
        if not self.frontend_id:
            raise ValueError("frontend_id must be non-empty")
        if self.active_requests < 0:
            raise ValueError("active_requests must be >= 0")


class FrontendTable:
    """The frontends heard from within ``timeout_s``; ``now`` is always passed in."""

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.timeout_s = timeout_s
        self._records: dict[str, tuple[FrontendRecord, float]] = {}  # id -> (latest record, heard at)

    def heard(self, record: FrontendRecord, now: float) -> None:
        """A heartbeat: ``record`` replaces what the frontend said before."""
        self._records[record.frontend_id] = (record, now)

    def left(self, frontend_id: str) -> bool:
        """The frontend stopped; False if it was not listed."""
        return self._records.pop(frontend_id, None) is not None

    def listed(self, now: float) -> list[dict]:
        """Live frontends, by id: each record's fields plus ``last_heard_s`` (seconds since its
        latest heartbeat). Frontends silent for longer than ``timeout_s`` are dropped."""
        for fid in [f for f, (_, t) in self._records.items() if now - t > self.timeout_s]:
            del self._records[fid]
        return [dict(asdict(rec), last_heard_s=max(0.0, now - t))
                for _, (rec, t) in sorted(self._records.items())]
