"""The migration ledger (``llumnix_py.scheduler.payoff``): every counter on hand-built scenarios,
in the ledger alone, through the simulator, through the daemon and as Prometheus metrics."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from experiments.workloads import WorkloadRequest
from llumnix_py.instance import InstanceHandle, InstanceLauncher
from llumnix_py.load import InstanceLoad, RequestLoad
from llumnix_py.scheduler.core import SchedulerConfig
from llumnix_py.scheduler.daemon import SchedulerDaemon
from llumnix_py.scheduler.payoff import MigrationLedger, per_request_stats
from llumnix_py.sim import SimCluster, SimConfig
from migration.driver import MigrationResult
from migration.protocol import MigrationStatus
from policies.config import PolicyConfig
from tests.cluster_helpers import ManualClock


def req(rid: str, blocks: int = 4, preemptions: int = 0) -> RequestLoad:
    return RequestLoad(request_id=rid, num_blocks=blocks, blocks_needed=0, num_preemptions=preemptions)


def inst(used: int, *running: RequestLoad, total: int = 100) -> InstanceLoad:
    return InstanceLoad(total_blocks=total, used_blocks=used, running=tuple(running))


def free_blocks(load: InstanceLoad) -> float:  # a freeness stand-in that is easy to read
    return float(load.total_blocks - load.used_blocks)


def make_ledger(**kw) -> MigrationLedger:
    return MigrationLedger(1.0, free_blocks, keep_records=True, **kw)


# ----- the ledger alone ----------------------------------------------------------------------------

def test_a_request_sent_back_to_an_instance_it_left_is_a_return():
    led = make_ledger()
    led.on_order("m1", "r", "A", "B", 0.0)
    led.on_end("m1", "r", True, 10, 0.5)
    led.on_order("m2", "r", "B", "C", 1.0)
    led.on_end("m2", "r", True, 11, 1.5)
    led.on_order("m3", "r", "C", "A", 2.0)
    led.on_end("m3", "r", True, 12, 2.5)
    m1, m2, m3 = led.records
    assert [m1.returned, m2.returned, m3.returned] == [False, False, True]
    assert [m1.returned_later, m2.returned_later, m3.returned_later] == [True, False, False]
    s = led.stats(num_requests=1)
    assert s["migration_returns"] == 1 and s["migration_return_rate"] == pytest.approx(1 / 3)
    assert s["migrations_per_request_max"] == 3 and s["migration_blocks_copied"] == 33
    assert led.migrations_of("r") == 3


def test_aborted_migrations_count_neither_as_moves_nor_as_returns():
    led = make_ledger()
    led.on_order("m1", "r", "A", "B", 0.0)
    led.on_end("m1", "r", True, 10, 0.5)
    led.on_order("m2", "r", "B", "A", 1.0)
    led.on_end("m2", "r", False, 0, 1.2)  # refused: the request stays on B
    s = led.stats()
    assert (s["migrations_finished"], s["migrations_aborted"], s["migration_returns"]) == (1, 1, 0)
    assert s["migrations_per_request_max"] == 1
    assert [r.finished for r in led.records] == [True, False]


def test_freeness_before_is_taken_at_the_order_and_after_one_interval_past_the_end():
    led = make_ledger()
    led.on_load("A", inst(90), 0.0)
    led.on_load("B", inst(20), 0.0)
    led.on_order("m1", "r", "A", "B", 0.0)
    led.on_end("m1", "r", True, 10, 0.5)
    led.on_load("A", inst(80), 1.0)  # inside the window (ends at 1.5): not yet "after"
    led.on_load("B", inst(30), 1.4)
    (rec,) = led.records
    assert (rec.src_freeness_before, rec.dst_freeness_before) == (10.0, 80.0)
    assert rec.src_freeness_after is None and rec.dst_freeness_after is None and not rec.closed
    led.on_load("A", inst(75), 1.5)
    led.on_load("B", inst(35), 1.6)
    led.on_load("A", inst(50), 2.0)  # the first snapshot past the window is the one kept
    assert (rec.src_freeness_after, rec.dst_freeness_after) == (25.0, 65.0)
    assert rec.closed and not led.watching


def test_a_preemption_on_the_destination_within_the_interval_is_counted_once():
    led = make_ledger()
    led.on_load("B", inst(20, req("x")), 0.0)
    led.on_order("m1", "r", "A", "B", 0.0)
    led.on_end("m1", "r", True, 10, 0.5)
    led.on_load("B", inst(30, req("x"), req("r", preemptions=2)), 0.7)  # r arrives with 2 earlier preemptions
    assert led.stats()["migration_caused_preemptions"] == 0
    led.on_load("B", inst(30, req("x", preemptions=1), req("r", preemptions=2)), 0.9)
    led.on_load("B", inst(30, req("x", preemptions=2), req("r", preemptions=3)), 1.0)
    assert led.stats()["migration_caused_preemptions"] == 1
    assert led.records[0].caused_preemption


def test_a_preemption_after_the_interval_or_on_the_source_is_not_counted():
    led = make_ledger()
    led.on_load("A", inst(90, req("y")), 0.0)
    led.on_load("B", inst(20, req("x")), 0.0)
    led.on_order("m1", "r", "A", "B", 0.0)
    led.on_end("m1", "r", True, 10, 0.5)
    led.on_load("A", inst(90, req("y", preemptions=1)), 0.6)  # the source preempted: not the move's doing
    led.on_load("A", inst(90, req("y", preemptions=1)), 1.5)
    led.on_load("B", inst(20, req("x")), 1.5)  # closes the window: nothing grew
    led.on_load("B", inst(20, req("x", preemptions=1)), 1.7)
    assert led.records[0].closed
    assert led.stats()["migration_caused_preemptions"] == 0


def test_a_removed_instance_closes_the_windows_that_need_it():
    led = make_ledger()
    led.on_order("m1", "r", "A", "B", 0.0)
    led.on_end("m1", "r", True, 10, 0.5)
    assert led.watching
    led.on_remove("A")
    assert not led.watching and led.records[0].closed


def test_per_request_state_is_bounded_and_forgets_the_oldest():
    led = make_ledger(max_requests=2)
    for i, rid in enumerate(("a", "b", "c")):
        led.on_order(f"m{i}", rid, "A", "B", float(i))
        led.on_end(f"m{i}", rid, True, 1, float(i))
    assert (led.migrations_of("a"), led.migrations_of("b"), led.migrations_of("c")) == (0, 1, 1)
    led.on_order("m9", "a", "B", "A", 5.0)
    led.on_end("m9", "a", True, 1, 5.0)
    assert led.stats()["migration_returns"] == 0  # "a" was forgotten: its path too


def test_migrations_per_request_counts_the_requests_that_never_moved():
    assert per_request_stats([], 0) == (0, 0.0)
    assert per_request_stats([], 50) == (0, 0.0)
    mx, p99 = per_request_stats([5], 100)  # one of 100 requests moved 5 times
    assert mx == 5 and 0 < p99 < 5
    assert per_request_stats([3, 3], 2) == (3, 3.0)


# ----- the simulator --------------------------------------------------------------------------------

def test_sim_records_a_ping_pong_with_freeness_and_blocks():
    cluster = SimCluster(SimConfig(num_instances=2, enable_migration=False))
    cluster.schedule_migration(1.0, "req-000000", "instance-000", "instance-001")
    cluster.schedule_migration(3.0, "req-000000", "instance-001", "instance-000")
    result = cluster.run([WorkloadRequest(0.0, 800, 400)], progress=False)
    assert [m.status for m in result.migrations] == [MigrationStatus.FINISHED] * 2
    s = result.summary()
    assert s["migrations_per_request_max"] == 2 and s["migrations_per_request_p99"] == pytest.approx(2.0)
    assert s["migration_return_rate"] == 0.5 and s["migration_caused_preemptions"] == 0
    first, second = result.migration_records
    assert (first["src"], first["dst"], second["dst"]) == ("instance-000", "instance-001", "instance-000")
    assert first["returned_later"] and second["returned"]
    assert first["blocks"] >= 800 // 16
    for rec in (first, second):
        assert rec["closed"]
        for key in ("src_freeness_before", "dst_freeness_before", "src_freeness_after", "dst_freeness_after"):
            assert rec[key] is not None, (key, rec)
    # The source had the only request: it is the less free end before, the freer one after.
    assert first["src_freeness_before"] < first["dst_freeness_before"]
    assert first["src_freeness_after"] > first["dst_freeness_after"]
    assert result.payoff["migration_returns"] == 1


def test_sim_counts_a_migration_whose_destination_then_preempts():
    # Round-robin: req 0 (40 blocks) on instance-000, req 1 (150 blocks, long output) on
    # instance-001 of 200 blocks. Moving req 0 in leaves the destination too little room
    # for both to grow over the (long) window, so it preempts.
    wl = [WorkloadRequest(0.0, 640, 600), WorkloadRequest(0.001, 2400, 600)]
    cfg = SimConfig(num_instances=2, num_blocks=200, enable_migration=False, migration_interval_s=20.0,
                    policy=PolicyConfig(dispatch="round_robin"))
    cluster = SimCluster(cfg)
    cluster.schedule_migration(0.5, "req-000000", "instance-000", "instance-001")
    result = cluster.run(wl, progress=False)
    assert [m.status for m in result.migrations] == [MigrationStatus.FINISHED]
    assert sum(r.preemptions for r in result.requests) > 0
    assert result.summary()["migration_caused_preemptions"] == 1
    assert result.migration_records[0]["caused_preemption"]


def test_sim_without_migrations_reports_zero_churn():
    result = SimCluster(SimConfig(num_instances=2, enable_migration=False)).run(
        [WorkloadRequest(0.0, 100, 10), WorkloadRequest(0.1, 100, 10)], progress=False)
    s = result.summary()
    assert (s["migrations_per_request_max"], s["migrations_per_request_p99"]) == (0, 0.0)
    assert (s["migration_return_rate"], s["migration_caused_preemptions"]) == (0.0, 0)


# ----- the daemon and Prometheus ------------------------------------------------------------------

class ScriptedInstance(InstanceHandle):
    """An instance whose load and migration results the test sets; it accepts every order."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.address = instance_id
        self.incarnation = instance_id
        self.snapshot = inst(0)
        self.results: list[MigrationResult] = []
        self.orders: list[tuple[str, str]] = []
        self.fair_offsets: list[dict[str, float]] = []  # what the scheduler sent (global fairness)
        self.roles: list[str] = []  # roles the scheduler sent

    def load(self) -> InstanceLoad:
        return self.snapshot

    def pop_results(self) -> list[MigrationResult]:
        out, self.results = self.results, []
        return out

    def migrate_out(self, request_id: str, dst_address: str, migration_id: str, waiting: bool) -> bool:
        self.orders.append((migration_id, request_id))
        return True

    def add_request(self, request: Any) -> None: ...
    def resume_request(self, state: Any) -> bool: return False
    def held(self, request_ids: Any) -> list[str]: return []
    def renew_lease(self, reply_to: str) -> None: ...
    def set_fair_offsets(self, offsets: dict[str, float]) -> None: self.fair_offsets.append(offsets)
    def set_role(self, role: str) -> None: self.roles.append(role)
    def abort(self, request_id: str) -> bool: return False
    def stats(self) -> dict[str, Any]: return {}
    def stop(self) -> None: ...


class ScriptedLauncher(InstanceLauncher):
    def launch(self, instance_id: str) -> InstanceHandle:
        return ScriptedInstance(instance_id)

    def terminate(self, handle: InstanceHandle) -> None: ...


def finished(migration_id: str, request_id: str, blocks: int) -> MigrationResult:
    return MigrationResult(migration_id, request_id, MigrationStatus.FINISHED, "", "live", 2, blocks, 0.1, 0.01, 0.0)


def test_daemon_records_returns_and_caused_preemptions_and_prometheus_exports_them():
    from llumnix_py.server import Metrics

    clock = ManualClock(0.0)
    cfg = SchedulerConfig(policy=PolicyConfig(), migration_interval_s=0.5)
    daemon = SchedulerDaemon(cfg, ScriptedLauncher(), clock=clock)
    a, b = (daemon.handles[i] for i in daemon.launch(2))
    a.snapshot = inst(98, req("r", blocks=10), total=100)  # overloaded source
    b.snapshot = inst(0, total=100)
    daemon.tick()
    assert len(a.orders) == 1
    mid, rid = a.orders[0]
    assert rid == "r"
    # The move lands; then b preempts something within the interval.
    a.results.append(finished(mid, rid, 10))
    a.snapshot = inst(88, total=100)
    b.snapshot = inst(10, req("r", blocks=10), total=100)
    clock.advance(0.1)
    daemon.tick()
    b.snapshot = inst(10, req("r", blocks=10, preemptions=1), total=100)
    clock.advance(0.1)
    daemon.tick()
    # Now r is on b, which is overloaded: it moves back to a (a return).
    b.snapshot = inst(98, req("r", blocks=10, preemptions=1), total=100)
    a.snapshot = inst(0, total=100)
    clock.advance(0.5)
    daemon.tick()
    assert len(b.orders) == 1
    a_mid, _ = b.orders[0]
    b.results.append(finished(a_mid, rid, 10))
    clock.advance(0.1)
    daemon.tick()
    payoff = daemon.state()["payoff"]
    assert payoff["migrations_finished"] == 2
    assert payoff["migration_returns"] == 1 and payoff["migration_return_rate"] == 0.5
    assert payoff["migration_caused_preemptions"] == 1
    assert payoff["migrations_per_request_max"] == 2

    m = Metrics()
    text = m.scrape(daemon.state()).decode()
    text = m.scrape(daemon.state()).decode()  # a second scrape counts nothing twice

    def sample(name: str) -> float:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name:
                    return s.value
        raise AssertionError(f"{name} missing")

    assert sample("llumnix_migration_returns_total") == 1
    assert sample("llumnix_migration_caused_preemptions_total") == 1
    assert sample("llumnix_migration_return_rate") == 0.5
    assert sample("llumnix_migrations_per_request_max") == 2
