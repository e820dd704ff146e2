"""Frozen snapshots that policies read, and the typed decisions they return."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class RequestView:
    """One request on an instance, as policies see it.

    Attributes:
        request_id: the request's id.
        num_blocks: physical KV blocks it holds now (0 while waiting).
        blocks_needed: blocks its (re-)prefill needs; the demand of a waiting request.
        priority: 0 normal, higher is more urgent.
        arrival_time: orders requests (earlier first).
        prompt_len / output_len: tokens so far.
        migrating: already being migrated (not a candidate for another migration).
    """

    request_id: str
    num_blocks: int
    blocks_needed: int
    priority: int = 0
    arrival_time: float = 0.0
    prompt_len: int = 0
    output_len: int = 0
    migrating: bool = False


@dataclass(frozen=True)
class InstanceLoad:
    """A load snapshot of one instance, as the global scheduler keeps it.

    Attributes:
        instance_id: the instance's id.
        total_blocks: ``M_i``, the instance's KV blocks.
        used_blocks: blocks owned by requests or reserved for incoming migrations.
        watermark_blocks: blocks the engine keeps free (admission stops above them).
        running: requests in the running batch.
        waiting: the waiting queue, head first.
        terminating: marked for scale-in; drains by migration, never a dispatch target.
        max_batch_size: the engine's batch limit (0: unlimited).
        migrating_out / migrating_in: migrations in flight with this instance as source / destination.
        pending_dispatch: requests dispatched since the last poll (counted into load).
    """

    instance_id: str
    total_blocks: int
    used_blocks: int
    watermark_blocks: int = 0
    running: tuple[RequestView, ...] = ()
    waiting: tuple[RequestView, ...] = ()
    terminating: bool = False
    max_batch_size: int = 0
    migrating_out: int = 0
    migrating_in: int = 0
    pending_dispatch: tuple[RequestView, ...] = ()

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.pending_dispatch)


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
