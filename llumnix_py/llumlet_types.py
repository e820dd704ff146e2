"""The llumlet's settings, counters, and the interface its output tokens go through.

Kept apart from ``llumnix_py.llumlet`` so that configuration code can read them
without the engine loop and migration machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

from llumnix_py.engines.batch_scheduler import check_prefill_first_steps
from llumnix_py.engines.types import RequestOutput
from migration.protocol import MAX_HOLD_S, MigrationConfig
from migration.transports.registry import check_transport_name


# ``LlumletConfig.prefill_first_steps``'s default: +19-22% goodput for 16 simulated GPUs of code completion
# (experiments/RESULTS.md, "Prompts first, on prefill instances and in the vLLM baseline").
PREFILL_FIRST_STEPS = 16


class TokenSink(Protocol):
    """Where a llumlet sends the tokens of one step (grouped by ``reply_to``)."""

    def emit(self, instance_id: str, reply_to: str, outputs: Sequence[RequestOutput]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LlumletConfig:
    """Settings of one llumlet.

    Attributes:
        instance_id: the instance's id.
        transport: migration transport name (``zmq``, ``gloo``, ``nccl``, ``inproc``).
        host: address the migration server binds (loopback by default).
        migration: stages, last-stage threshold, mode.
        max_outgoing / max_incoming: concurrent migrations as source / destination.
        migration_timeout_s: transport timeout; a silent source's reservation is freed after it,
            a copy parked this long (never activated) is claimed from the ownership arbiter,
            and a source retries its own claim this long before it hands it to the engine loop.
        claim_retry_s: how often an unanswered ownership claim is repeated.
        chunk_blocks: blocks per KV message (pipelining granularity).
        idle_wait_s: engine loop sleep when there is nothing to run.
        max_step_hold_s: the longest this instance, as a migration's destination, holds its
            engine steps when the source announces its stop-and-copy (``wire.Hold``); the
            source asks for ``MigrationConfig.commit_hold_s``, the shorter one applies. 0
            refuses holds (each stop-and-copy message then may wait for a step here).
        hold_wait_fraction: as a destination, how long this instance may idle for a source's
            freeze before the stop-and-copy, as a fraction of its own latest step: a hold whose
            freeze (``wire.Hold.freeze_in_s``) comes later than that at this instance's step
            boundary is refused, and the instance runs one more step instead (the request then
            waits less than the rest of that step), rather than idling and lapsing anyway. With
            the default 0.5 neither side waits more than half a step for the other. Before the
            first step is measured, ``max_step_hold_s`` is the bound.
        gil_switch_interval_s: the Python thread switch interval a process running a
            llumlet should use (``sys.setswitchinterval``; Python's default is 5 ms). The
            runtime that owns the process applies it: a migration message waiting up to
            5 ms for the engine thread to yield the interpreter would otherwise dominate
            the stop-and-copy downtime.
        secret: shared secret that migration connections must present (CURVE or HMAC,
            ``migration.security``); needed when ``host`` is not loopback.
        decode_hold_s: as a ``decode`` instance (prefill/decode disaggregation), how long the
            engine holds a never-prefilled request for the scheduler to redirect to a prefill
            instance before prefilling it itself (``llumnix_py.prefill_hold``); 0 holds nothing.
        prefill_first_steps: as a ``prefill`` instance, the engine gives prompts priority over
            the requests waiting for their hand-off: while prompts wait, up to this many steps
            in a row prefill them alone (``EngineAdapter.set_prefill_first``); 0: every step
            also decodes the running batch.
        lease_timeout_s: abort the requests of a frontend (``reply_to``) that has not
            renewed its lease for this long (the first request of an address starts
            its lease); None never expires leases.
    """

    instance_id: str
    transport: str = "zmq"
    host: str = "127.0.0.1"
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    max_outgoing: int = 1
    max_incoming: int = 1
    migration_timeout_s: float = 10.0
    claim_retry_s: float = 0.2
    chunk_blocks: int = 256
    idle_wait_s: float = 0.01
    max_step_hold_s: float = 0.1
    hold_wait_fraction: float = 0.5
    decode_hold_s: float = 1.0
    prefill_first_steps: int = PREFILL_FIRST_STEPS
    lease_timeout_s: Optional[float] = 30.0
    gil_switch_interval_s: Optional[float] = 0.0005
    secret: Optional[str] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ValueError("instance_id must be non-empty")
        if self.lease_timeout_s is not None and self.lease_timeout_s <= 0:
            raise ValueError("lease_timeout_s must be positive (or None)")
        check_transport_name(self.transport)
        if self.claim_retry_s <= 0:
            raise ValueError("claim_retry_s must be positive")
        if not 0 <= self.max_step_hold_s <= MAX_HOLD_S:
            raise ValueError(f"max_step_hold_s must be in [0, {MAX_HOLD_S}] seconds, got {self.max_step_hold_s}")
        if not 0 <= self.hold_wait_fraction <= 1:
            raise ValueError(f"hold_wait_fraction must be in [0, 1], got {self.hold_wait_fraction}")
        if not 0 <= self.decode_hold_s <= 3600:
            raise ValueError(f"decode_hold_s must be in [0, 3600] seconds, got {self.decode_hold_s}")
        check_prefill_first_steps(self.prefill_first_steps)
        if self.max_outgoing < 1 or self.max_incoming < 1:
            raise ValueError("max_outgoing and max_incoming must be >= 1")


@dataclass
class LlumletStats:
    """Counters of one llumlet, updated under its engine lock.

    Attributes:
        steps: engine steps that produced output.
        tokens: output tokens emitted.
        preemptions: requests the engine preempted.
        migrations: outgoing migrations by final status (``MigrationStatus`` value -> count).
        migrations_in: incoming migrations committed here.
        resumed: requests continued here after their instance died.
        lease_aborts: requests aborted because their frontend's lease expired.
        last_step_ms: duration of the latest step.
        busy_s: engine step time, summed (``busy_s / uptime`` is the engine's utilisation).
        decode_prefill_tokens: prompt tokens prefilled while this instance had the ``decode``
            role (holds that ran out, re-prefills after a recompute preemption).
        decode_holds_expired: never-prefilled requests whose hold ran out (``decode_hold_s``).
    """

    steps: int = 0
    tokens: int = 0
    preemptions: int = 0
    migrations: dict[str, int] = field(default_factory=dict)
    migrations_in: int = 0
    resumed: int = 0
    lease_aborts: int = 0
    last_step_ms: float = 0.0
    busy_s: float = 0.0
    decode_prefill_tokens: int = 0
    decode_holds_expired: int = 0
