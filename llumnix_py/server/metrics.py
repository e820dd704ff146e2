"""Prometheus metrics of the frontend: per-request latencies, token counts, and the cluster's view.

Each ``Metrics`` owns its own ``CollectorRegistry`` (never the global one), so
several apps, or several tests, coexist in one process. Request metrics are
recorded as requests finish; cluster metrics (migrations, per-instance load)
are pulled from ``cluster.state()`` and ``cluster.health()`` at scrape time by
``scrape(state, health)``: ``llumnix_scheduler_up``, ``llumnix_instances{kind="live"|
"configured"}``, ``llumnix_restarts_total{component="scheduler"|"instance"}``.

With a server-wide latency SLO (``--slo-ttft-ms``/``--slo-tpot-ms``, DistServe's: TTFT and
mean TPOT), every finished request is judged against it (``llumnix_py.slo.meets``):
``llumnix_latency_slo_requests_total{met="true"|"false"}``, ``llumnix_latency_slo_attainment``
(the share met so far) and ``llumnix_latency_slo_objective_seconds{objective="ttft"|"tpot"}``.
Per-request objectives (``Objective``: per-token due times, deadlines, jobs; JITServe's) are
counted apart, by kind: ``llumnix_slo_*{kind}`` and ``llumnix_goodput_*``.

``cluster.state()`` reports migrations as cumulative counts per outcome and the
most recent downtimes as a bounded list; ``Metrics`` keeps a cursor (the counts
seen at the previous scrape) so each migration is counted, and its downtime
observed, exactly once::

    state["migrations"]["finished"]:  seen=5 ............ now=8   -> 3 new
    state["migration_downtime_ms"]:   [..., d4, d5, d6, d7, d8]   -> observe d6, d7, d8
"""

from __future__ import annotations

import math
import threading
from typing import Any, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llumnix_py.slo import SLO, meets

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_STATUSES = ("finished", "aborted", "error", "rejected")

MAX_CLIENT_LABELS = 256  # distinct client label values; later clients are counted as "other"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_MARGIN_BUCKETS = (-30.0, -10.0, -5.0, -2.5, -1.0, -0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)
OBJECTIVE_KINDS = ("stream", "deadline", "job")
_DOWNTIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The frontend's metrics, in a private registry.

    Args:
        slo: server-wide objectives finished requests are judged against (None: no SLO metrics).

    Attributes:
        registry: the ``CollectorRegistry`` holding every metric below.
    """

    def __init__(self, slo: Optional[SLO] = None) -> None:
        r = self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self.slo = slo
        self._slo_met = self._slo_judged = 0
        if slo is not None:
            self.latency_slo_requests = Counter(
                "llumnix_latency_slo_requests", "Finished requests judged against the server-wide latency SLO, "
                "by whether they met both TTFT and TPOT.", ["met"], registry=r)
            self.latency_slo_attainment = Gauge(
                "llumnix_latency_slo_attainment", "Share of finished requests that met both the TTFT and the "
                "TPOT objective.", registry=r)
            self.latency_slo_objective = Gauge("llumnix_latency_slo_objective_seconds",
                                               "The server-wide latency SLO.", ["objective"], registry=r)
            self.latency_slo_objective.labels(objective="ttft").set(slo.ttft_s)
            self.latency_slo_objective.labels(objective="tpot").set(slo.tpot_s)
            for met in ("true", "false"):
                self.latency_slo_requests.labels(met=met)
        self.ttft = Histogram("llumnix_time_to_first_token_seconds", "Time from submission to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("llumnix_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("llumnix_e2e_request_latency_seconds", "Time from submission to the last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("llumnix_requests", "Requests by outcome (finished, aborted, error, rejected).",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("llumnix_prompt_tokens", "Prompt tokens of submitted requests.", registry=r)
        self.generation_tokens = Counter("llumnix_generation_tokens", "Tokens generated.", registry=r)
        self.migrations = Counter("llumnix_migrations", "Live migrations by outcome.", ["outcome"], registry=r)
        self.downtime = Histogram("llumnix_migration_downtime_seconds",
                                  "Downtime (stop-and-copy stage) of finished migrations.",
                                  buckets=_DOWNTIME_BUCKETS, registry=r)
        self.client_requests = Counter("llumnix_client_requests", "Finished requests per client (OpenAI user).",
                                       ["client"], registry=r)
        self.client_tokens = Counter("llumnix_client_generation_tokens", "Tokens generated per client.",
                                     ["client"], registry=r)
        self._clients: set[str] = set()  # label values seen (bounded: MAX_CLIENT_LABELS)
        self.instances = Gauge("llumnix_instances", "Instances: live, and configured (the count held).",
                               ["kind"], registry=r)
        self.scheduler_up = Gauge("llumnix_scheduler_up", "1 while the global scheduler answers.", registry=r)
        self.restarts = Counter("llumnix_restarts", "Restarts by component (scheduler; instance: replacements).",
                                ["component"], registry=r)
        self.active = Gauge("llumnix_active_requests", "Requests in flight in this frontend's cluster.", registry=r)
        labels = ["instance"]
        self.kv_used = Gauge("llumnix_instance_kv_blocks_used", "KV blocks in use.", labels, registry=r)
        self.kv_total = Gauge("llumnix_instance_kv_blocks_total", "KV blocks in the pool.", labels, registry=r)
        self.freeness = Gauge("llumnix_instance_freeness",
                              "Freeness: decode steps the batch can take before memory runs out.", labels, registry=r)
        self.running = Gauge("llumnix_instance_running_requests", "Running requests.", labels, registry=r)
        self.waiting = Gauge("llumnix_instance_waiting_requests", "Waiting requests.", labels, registry=r)
        self.copy_stall = Gauge("llumnix_instance_kv_copy_stall_seconds",
                                "Seconds the instance's engine steps have waited on KV copies (swaps, a "
                                "conversation's store and restore) since the engine started.", labels, registry=r)
        self.busy = Gauge("llumnix_instance_busy_seconds", "Seconds the instance's engine has spent in steps since "
                          "it started (its rate is the engine's utilisation).", labels, registry=r)
        self.preemptions = Gauge("llumnix_instance_preemptions", "Requests the instance's engine has preempted "
                                 "since it started.", labels, registry=r)
        # each per-instance gauge and the key of ``state()["instances"][i]`` it exports
        self._per_instance = ((self.kv_used, "used_blocks"), (self.kv_total, "total_blocks"),
                              (self.freeness, "freeness"), (self.running, "running"), (self.waiting, "waiting"),
                              (self.copy_stall, "kv_copy_stall_s"), (self.busy, "busy_s"),
                              (self.preemptions, "preemptions"))
        self.migration_returns = Counter(
            "llumnix_migration_returns", "Finished migrations that took a request to an instance it had left.",
            registry=r)
        self.migration_caused_preemptions = Counter(
            "llumnix_migration_caused_preemptions",
            "Finished migrations whose destination preempted a request within one migration interval.", registry=r)
        self.migration_return_rate = Gauge("llumnix_migration_return_rate",
                                           "Share of finished migrations that returned a request.", registry=r)
        self.migrations_per_request_max = Gauge("llumnix_migrations_per_request_max",
                                                "Most finished migrations of one request.", registry=r)
        self.migrations_per_request_p99 = Gauge("llumnix_migrations_per_request_p99",
                                                "P99 of finished migrations per dispatched request.", registry=r)
        self.slo_requests = Counter("llumnix_slo_requests", "Finished requests with an objective, by kind and "
                                    "whether they met it.", ["kind", "met"], registry=r)
        self.goodput_tokens = Counter("llumnix_goodput_tokens", "Tokens of finished requests that met their "
                                      "objective (service goodput).", ["kind"], registry=r)
        self.goodput_requests = Counter("llumnix_goodput_requests", "Finished requests that met their objective.",
                                        ["kind"], registry=r)
        self.slo_attainment = Gauge("llumnix_slo_attainment", "Share of finished requests with an objective of "
                                    "this kind that met it.", ["kind"], registry=r)
        self.slo_margin = Histogram("llumnix_slo_margin_seconds", "Least slack of a finished request's tokens to "
                                    "their due times (negative: missed).", ["kind"], buckets=_MARGIN_BUCKETS,
                                    registry=r)
        self._slo_counts: dict[str, list[int]] = {k: [0, 0] for k in OBJECTIVE_KINDS}  # kind -> [met, total]
        for kind in OBJECTIVE_KINDS:
            for met in ("true", "false"):
                self.slo_requests.labels(kind=kind, met=met)
            self.goodput_tokens.labels(kind=kind)
            self.goodput_requests.labels(kind=kind)
        for status in REQUEST_STATUSES:
            self.requests.labels(status=status)  # export zeros from the start
        for component in ("scheduler", "instance"):
            self.restarts.labels(component=component)
        self._seen_migrations: dict[str, int] = {}
        self._seen_restarts: dict[str, int] = {}
        self._seen_payoff: dict[str, int] = {}

    # ----- per request -------------------------------------------------------------------
    def record_request(self, status: str, prompt_tokens: int, generation_tokens: int,
                       ttft_s: Optional[float] = None, tpot_s: Optional[float] = None,
                       e2e_s: Optional[float] = None, client: str = "") -> None:
        """A submitted request ended (``status`` is one of ``REQUEST_STATUSES``); ``client``: its
        client id (OpenAI ``user``; "" for none)."""
        self.requests.labels(status=status).inc()
        label = self._client_label(client)
        self.client_requests.labels(client=label).inc()
        self.client_tokens.labels(client=label).inc(max(0, generation_tokens))
        self.prompt_tokens.inc(max(0, prompt_tokens))
        self.generation_tokens.inc(max(0, generation_tokens))
        for hist, value in ((self.ttft, ttft_s), (self.tpot, tpot_s), (self.e2e, e2e_s)):
            if value is not None and math.isfinite(value) and value >= 0:
                hist.observe(value)
        if self.slo is not None and status == "finished" and ttft_s is not None:
            met = meets(ttft_s, tpot_s, self.slo.ttft_s, self.slo.tpot_s)
            with self._lock:
                self._slo_judged += 1
                self._slo_met += met
                self.latency_slo_requests.labels(met="true" if met else "false").inc()
                self.latency_slo_attainment.set(self._slo_met / self._slo_judged)

    def record_objective(self, kind: str, margin_s: float, generation_tokens: int) -> None:
        """A request with an objective of ``kind`` finished with this least margin (met iff >= 0)."""
        if kind not in self._slo_counts:
            raise ValueError(f"unknown objective kind {kind!r}")
        met = margin_s >= 0
        with self._lock:
            counts = self._slo_counts[kind]
            counts[0] += int(met)
            counts[1] += 1
            self.slo_attainment.labels(kind=kind).set(counts[0] / counts[1])
        self.slo_requests.labels(kind=kind, met="true" if met else "false").inc()
        if met:
            self.goodput_tokens.labels(kind=kind).inc(max(0, generation_tokens))
            self.goodput_requests.labels(kind=kind).inc()
        if math.isfinite(margin_s):
            self.slo_margin.labels(kind=kind).observe(margin_s)
    def _client_label(self, client: str) -> str:
        with self._lock:
            if client in self._clients:
                return client
            if len(self._clients) < MAX_CLIENT_LABELS:
                self._clients.add(client)
                return client
        return "other"

    def record_rejected(self) -> None:
        """A request was refused before it reached the cluster (bad input, no instance)."""
        self.requests.labels(status="rejected").inc()

    # ----- cluster view at scrape time -----------------------------------------------------
    def scrape(self, state: Optional[Mapping[str, Any]], health: Optional[Mapping[str, Any]] = None) -> bytes:
        """Update the cluster metrics from ``cluster.state()`` and ``cluster.health().to_dict()``
        (None: leave them) and render."""
        with self._lock:
            if state is not None:
                self._update(state)
            if health is not None:
                self._update_health(health)
            return generate_latest(self.registry)

    @staticmethod
    def _advance(seen: dict[str, int], key: str, total: int) -> int:
        """New events since the last scrape of a cumulative count (which a restarted scheduler resets)."""
        before = seen.get(key, 0)
        seen[key] = total
        return total - before if total >= before else total

    def _update_health(self, health: Mapping[str, Any]) -> None:
        self.scheduler_up.set(1 if health.get("scheduler_up") else 0)
        self.instances.labels(kind="live").set(int(health.get("instances", 0) or 0))
        self.instances.labels(kind="configured").set(int(health.get("configured_instances", 0) or 0))
        for component, total in (health.get("restarts") or {}).items():
            delta = self._advance(self._seen_restarts, str(component), int(total or 0))
            if delta > 0:
                self.restarts.labels(component=str(component)).inc(delta)

    def _update(self, state: Mapping[str, Any]) -> None:
        counts = state.get("migrations") or {}
        downtimes = list(state.get("migration_downtime_ms") or [])
        new_finished = 0
        for outcome, total in counts.items():
            delta = self._advance(self._seen_migrations, outcome, int(total))
            if delta > 0:
                self.migrations.labels(outcome=str(outcome)).inc(delta)
            if outcome == "finished":
                new_finished = delta
        if new_finished > 0:
            for ms in downtimes[-new_finished:]:
                self.downtime.observe(max(0.0, float(ms)) / 1e3)

        self._update_payoff(state.get("payoff") or {})

        instances = list(state.get("instances") or [])
        self.active.set(int(state.get("active_requests", 0) or 0))
        for gauge, _ in self._per_instance:
            gauge.clear()  # instances that left stop being exported
        for inst in instances:
            iid = str(inst.get("instance_id", ""))
            for gauge, key in self._per_instance:
                gauge.labels(instance=iid).set(float(inst.get(key, 0)))

    def _update_payoff(self, payoff: Mapping[str, Any]) -> None:
        """The scheduler's migration ledger (``MigrationLedger.stats``): counters by cursor."""
        for key, counter in (("migration_returns", self.migration_returns),
                             ("migration_caused_preemptions", self.migration_caused_preemptions)):
            if key not in payoff:
                continue
            total = int(payoff[key])
            seen = self._seen_payoff.get(key, 0)
            delta = total - seen if total >= seen else total  # a restarted scheduler starts again from 0
            if delta > 0:
                counter.inc(delta)
            self._seen_payoff[key] = total
        for key, gauge in (("migration_return_rate", self.migration_return_rate),
                           ("migrations_per_request_max", self.migrations_per_request_max),
                           ("migrations_per_request_p99", self.migrations_per_request_p99)):
            if key in payoff:
                gauge.set(float(payoff[key]))
