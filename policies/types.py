"""The typed decisions policies return (their inputs are the snapshots of ``llumnix_py.load``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Dispatch:
    """Send a new request to ``instance_id``."""

    instance_id: str


@dataclass(frozen=True)
class MigrationPair:
    """Migrate one request from ``src`` to ``dst`` this round."""

    src: str
    dst: str


@dataclass(frozen=True)
class MigrateOut:
    """Which request the source should migrate; ``waiting`` if it is in the queue."""

    request_id: str
    waiting: bool = False


class ScaleAction(str, enum.Enum):
    NONE = "none"
    OUT = "out"  # launch one more instance
    IN = "in"  # mark ``instance_id`` terminating; it drains, then stops


@dataclass(frozen=True)
class ScaleDecision:
    action: ScaleAction
    instance_id: Optional[str] = None
    reason: str = ""


@dataclass(frozen=True)
class Handoff:
    """Hand ``request_id``, its prefill done, from prefill instance ``src`` to decode instance ``dst``."""

    request_id: str
    src: str
    dst: str


@dataclass(frozen=True)
class Redirect:
    """Move ``request_id``, queued and never prefilled, from ``src`` (an instance that no
    longer prefills) to the prefill-capable instance ``dst``."""

    request_id: str
    src: str
    dst: str
