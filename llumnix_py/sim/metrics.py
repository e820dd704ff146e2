"""What a simulated run measures: per-request latencies, migrations, instance time series.

Definitions (all times in seconds of virtual time):

* **prefill latency**: arrival -> first output token delivered (queueing included).
* **decode latency**: mean time per output token after the first,
  ``(finish - first_token) / (output_len - 1)``; undefined (left out of the means)
  for one-token requests.
* **end-to-end latency**: arrival -> last token delivered.
* **preemption loss**: for each preemption, the time from the preemption (the step
  that evicted the request) to the first token the request delivers afterwards,
  i.e. the time spent back in the queue plus the recompute prefill; summed over the
  request's preemptions. A request never preempted loses 0.
* **migration downtime**: freeze on the source -> commit on the destination (the
  stop-and-copy stage), during which the request makes no progress.
* **fragmentation** of an instance at a sample: its free blocks when the head of
  its waiting queue cannot be admitted (``BatchScheduler.head_blocked``), else 0.
  The cluster value is their sum over the live instances divided by their total blocks.
* **stranded memory** at a sample where the queue head of at least one instance waits
  for blocks: the free blocks of the instances whose head does not wait, over the
  cluster's blocks (undefined at a sample where no head waits). It is the room that
  moving work (a queued request, or running ones to make room) could use at once: what
  rearranging the same memory has to work with; a head **fits elsewhere** when
  some instance whose head does not wait has the blocks it needs free.
* **average instances** (cost): the time-weighted number of instances held, from the
  scale-out decision (an instance is paid for while it starts) to its removal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from llumnix_py.engines.types import Objective
from llumnix_py.scheduler.payoff import per_request_stats
from llumnix_py.slo import DEFAULT_TARGET, SLO, attainment, slo_scale
from migration.driver import MigrationResult
from migration.protocol import MigrationStatus


@dataclass(eq=False)
class RequestRecord:
    """Everything measured about one request."""

    request_id: str
    arrival_time: float
    prompt_len: int
    output_len: int
    priority: int = 0
    dispatched_to: str = ""
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    num_tokens: int = 0
    preemptions: int = 0
    preemption_loss: float = 0.0
    migrations: int = 0
    migration_downtime: float = 0.0
    preempted_at: Optional[float] = None
    objective: Optional[Objective] = None
    stream_margin: float = math.inf  # a stream objective: least slack of its tokens so far

    def on_tokens(self, now: float, index: int, count: int) -> None:
        """Tokens ``index .. index+count-1`` were delivered at ``now``."""
        if index != self.num_tokens:
            raise AssertionError(f"{self.request_id}: token {index} delivered after {self.num_tokens} tokens")
        o = self.objective
        if o is not None and o.kind == "stream" and count:
            self.stream_margin = min(self.stream_margin, self.arrival_time + o.due_s(index, index + 1) - now)
        if self.first_token_time is None:
            self.first_token_time = now
        if self.preempted_at is not None:
            self.preemption_loss += now - self.preempted_at
            self.preempted_at = None
        self.num_tokens += count

    def on_preempted(self, now: float) -> None:
        self.preemptions += 1
        if self.preempted_at is None:
            self.preempted_at = now

    @property
    def done(self) -> bool:
        return self.finish_time is not None

    @property
    def slo_margin(self) -> Optional[float]:
        """Least slack to its objective's due times (met iff >= 0); None without an objective or unfinished.
        A stream's first token of a batch binds (later ones in it are due later)."""
        if self.objective is None or self.finish_time is None:
            return None
        if self.objective.kind == "stream":
            return self.stream_margin
        return self.arrival_time + self.objective.due_s(self.output_len - 1, self.output_len) - self.finish_time

    @property
    def prefill_latency(self) -> float:
        assert self.first_token_time is not None
        return self.first_token_time - self.arrival_time

    @property
    def decode_latency(self) -> Optional[float]:
        if self.output_len <= 1 or self.finish_time is None or self.first_token_time is None:
            return None
        return (self.finish_time - self.first_token_time) / (self.output_len - 1)

    @property
    def e2e_latency(self) -> float:
        assert self.finish_time is not None
        return self.finish_time - self.arrival_time


@dataclass
class Timeline:
    """Samples taken every ``SimConfig.sample_interval_s`` of virtual time.

    Attributes:
        times: sample times.
        usage: cluster KV usage (used / total blocks of live instances) per sample.
        fragmentation: cluster fragmentation (see the module docstring) per sample.
        instances: live instances per sample.
        per_instance: instance id -> list of (time, used blocks, fragmented blocks,
            running, waiting).
        stranded: stranded memory per sample (see the module docstring), None where no
            queue head waits for blocks.
        heads_waiting: queue heads waiting for blocks per sample; heads_fit_elsewhere:
            how many of them another instance, whose own head does not wait, has room for.
    """

    times: list[float] = field(default_factory=list)
    usage: list[float] = field(default_factory=list)
    fragmentation: list[float] = field(default_factory=list)
    instances: list[int] = field(default_factory=list)
    per_instance: dict[str, list[tuple[float, int, int, int, int]]] = field(default_factory=dict)
    stranded: list[Optional[float]] = field(default_factory=list)
    heads_waiting: list[int] = field(default_factory=list)
    heads_fit_elsewhere: list[int] = field(default_factory=list)


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(np.percentile(a, 99))


@dataclass
class SimResult:
    """The outcome of ``SimCluster.run``.

    Attributes:
        requests: one record per workload request, in workload order.
        migrations: every migration that ended, with its status, stages and downtime.
        timeline: periodic samples of usage and fragmentation.
        instance_changes: (time, instances held) at every change, from time 0.
        scale_events: (time, "out" | "in" | "removed", instance id).
        timings: wall-clock seconds of each scheduler call, by kind (``dispatch``,
            ``migration_round``, ``poll``, ``scaling``).
        virtual_s: virtual time at the end of the run.
        wall_s: wall time the run took.
        cpu_s: CPU time of this process during the run (robust to a busy machine).
        num_events: events processed.
        num_steps: engine steps taken (all instances).
        migration_records: one dict per ended migration (``MigrationRecord.as_dict`` of
            ``llumnix_py.scheduler.payoff``): ends, freeness of both before and one
            migration interval after, blocks copied, whether it returned the request to
            an instance it had left, whether the destination preempted within the interval.
        payoff: the scheduler's ``MigrationLedger.stats`` over every request.
    """

    requests: list[RequestRecord]
    migrations: list[MigrationResult]
    timeline: Timeline
    instance_changes: list[tuple[float, int]]
    scale_events: list[tuple[float, str, str]]
    timings: dict[str, list[float]]
    virtual_s: float
    wall_s: float
    cpu_s: float
    num_events: int
    num_steps: int
    migration_records: list[dict[str, Any]] = field(default_factory=list)
    payoff: dict[str, Any] = field(default_factory=dict)

    def average_instances(self) -> float:
        """Time-weighted instances held over ``[0, virtual_s]``."""
        if self.virtual_s <= 0 or not self.instance_changes:
            return float(self.instance_changes[-1][1]) if self.instance_changes else 0.0
        total = 0.0
        for (t0, n), (t1, _) in zip(self.instance_changes, self.instance_changes[1:] + [(self.virtual_s, 0)]):
            total += n * (min(t1, self.virtual_s) - t0)
        return total / self.virtual_s

    def latencies(self) -> tuple[list[float], list[Optional[float]]]:
        """Every request's (TTFT, TPOT) in seconds; a request that never finished counts as
        infinitely late, one with a single output token has no TPOT."""
        ttfts = [r.prefill_latency if r.done else math.inf for r in self.requests]
        tpots = [(r.decode_latency if r.done else math.inf) for r in self.requests]
        return ttfts, tpots

    def slo_attainment(self, slo: SLO) -> float:
        """Share of the requests meeting both objectives (``llumnix_py.slo.attainment``)."""
        ttfts, tpots = self.latencies()
        return attainment(ttfts, tpots, slo.ttft_s, slo.tpot_s)

    def slo_scale(self, slo: SLO, target: float = DEFAULT_TARGET) -> float:
        """The tightest scale of both objectives that ``target`` of requests meet (``llumnix_py.slo``)."""
        ttfts, tpots = self.latencies()
        return slo_scale(ttfts, tpots, slo.ttft_s, slo.tpot_s, target)

    def summary(self, priority: Optional[int] = None) -> dict[str, Any]:
        """Means and P99s (seconds) over completed requests, optionally of one priority.

        Keys: ``num_requests``, ``completed``, ``prefill_mean``, ``prefill_p99``,
        ``decode_mean``, ``decode_p99``, ``e2e_mean``, ``e2e_p99``,
        ``preemption_loss`` (mean per request), ``preemptions``, ``migrations``
        (finished), ``migrations_aborted``, ``downtime_mean_ms``, ``downtime_p99_ms``,
        ``avg_instances``, ``fragmentation_mean``, ``virtual_s``, ``wall_s``, ``cpu_s``;
        memory in the wrong place: ``head_waiting_share`` (share of samples where some queue
        head waits for blocks), ``stranded_mean`` (mean stranded memory over those samples,
        0 without any) and ``heads_fit_elsewhere`` (share of the waiting heads sampled that
        another instance had room for; 0 without any);
        churn: ``migrations_per_request_max`` / ``migrations_per_request_p99`` (finished
        migrations per request, over every request of the selection),
        ``migration_return_rate`` (share of finished migrations that took a request to
        an instance it had left earlier) and ``migration_caused_preemptions`` (finished
        migrations whose destination preempted a request within one migration interval);
        the last two count the selection's requests only.
        """
        reqs = [r for r in self.requests if priority is None or r.priority == priority]
        done = [r for r in reqs if r.done]
        prefill = _stats([r.prefill_latency for r in done])
        decode = _stats([d for d in (r.decode_latency for r in done) if d is not None])
        e2e = _stats([r.e2e_latency for r in done])
        finished = [m for m in self.migrations if m.status == MigrationStatus.FINISHED]
        downtime = _stats([m.downtime_s * 1e3 for m in finished])
        frag = self.timeline.fragmentation
        stranded = [x for x in self.timeline.stranded if x is not None]
        heads = sum(self.timeline.heads_waiting)
        per_max, per_p99 = per_request_stats([r.migrations for r in reqs if r.migrations], len(reqs))
        ids = {r.request_id for r in reqs}
        moved = [m for m in self.migration_records if m["finished"] and m["request_id"] in ids]
        returns = sum(1 for m in moved if m["returned"])
        return {
            "num_requests": len(reqs),
            "completed": len(done),
            "prefill_mean": prefill[0],
            "prefill_p99": prefill[1],
            "decode_mean": decode[0],
            "decode_p99": decode[1],
            "e2e_mean": e2e[0],
            "e2e_p99": e2e[1],
            "preemption_loss": float(np.mean([r.preemption_loss for r in done])) if done else 0.0,
            "preemptions": sum(r.preemptions for r in reqs),
            "migrations": len(finished),
            "migrations_aborted": len(self.migrations) - len(finished),
            "downtime_mean_ms": downtime[0],
            "downtime_p99_ms": downtime[1],
            "avg_instances": self.average_instances(),
            "fragmentation_mean": float(np.mean(frag)) if frag else 0.0,
            "head_waiting_share": len(stranded) / len(self.timeline.stranded) if self.timeline.stranded else 0.0,
            "stranded_mean": float(np.mean(stranded)) if stranded else 0.0,
            "heads_fit_elsewhere": sum(self.timeline.heads_fit_elsewhere) / heads if heads else 0.0,
            "virtual_s": self.virtual_s,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "migrations_per_request_max": per_max,
            "migrations_per_request_p99": per_p99,
            "migration_return_rate": returns / len(moved) if moved else 0.0,
            "migration_caused_preemptions": sum(1 for m in moved if m["caused_preemption"]),
        }
