"""Ownership of a migrating request survives any message loss (issue 13, item 4b), in one process.

Two in-process instances (runtime ``local``, float64 model, greedy and seeded
sampling). One request on instance-000 is migrated by hand to instance-001, and the
transport loses, for that migration only, the commit's reply, every abort and the
activation (the destination stays alive throughout). The scheduler's ownership arbiter
decides; the tests gate each side's way to it so the order of the claims is chosen,
never left to the wall clock. Every test checks: the tokens equal a run without
migration, no output position is produced twice, no block leaks, and both engines'
invariants hold.
"""

from __future__ import annotations

import threading

import pytest

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, LlumletConfig, SchedulerConfig
from migration.driver import MigrationResult, TransportPort
from migration.ownership import Owner
from migration.protocol import MigrationStatus
from migration.transports.base import TransportError
from tests.cluster_helpers import SMALL_MODEL as MODEL
from tests.cluster_helpers import HoldOutputs, assert_no_leak, prompts, reference, samplings, wait_all, wait_for
from tests.test_faults_local import Emissions, local, running

MID = "mig-lossy"
SRC, DST = "instance-000", "instance-001"


def config() -> ClusterConfig:
    engine = EngineSpec(engine=EngineConfig(num_blocks=128, max_batch_size=32), model=MODEL)
    return ClusterConfig(
        num_instances=2, runtime="local", engine=engine,
        scheduler=SchedulerConfig(poll_interval_s=0.01, migration_interval_s=0.02, enable_migration=False),
        llumlet=LlumletConfig(instance_id="template", transport="inproc", migration_timeout_s=0.5,
                              claim_retry_s=0.05))


@pytest.fixture
def lossy(monkeypatch):
    """Loses, for migration ``MID`` only, what ``lose`` names: the commit's reply, every
    abort, the activation. Returns the set to fill and the counts of what was lost."""
    lose: set[str] = set()
    lost = {"commit_reply": 0, "abort": 0, "activate": 0}
    commit, abort, activate = TransportPort.commit, TransportPort.abort, TransportPort.activate

    def lossy_commit(self, mid, state):
        ok, err = commit(self, mid, state)
        if mid == MID and "commit_reply" in lose:
            lost["commit_reply"] += 1
            raise TransportError("injected: commit reply lost")
        return ok, err

    def lossy_abort(self, mid, reason, attempts=TransportPort.ABORT_ATTEMPTS):
        if mid == MID and "abort" in lose:
            lost["abort"] += 1
            return None  # what an unanswered abort gives
        return abort(self, mid, reason, attempts)

    def lossy_activate(self, mid):
        if mid == MID and "activate" in lose:
            lost["activate"] += 1
            raise TransportError("injected: activate lost")
        return activate(self, mid)

    monkeypatch.setattr(TransportPort, "commit", lossy_commit)
    monkeypatch.setattr(TransportPort, "abort", lossy_abort)
    monkeypatch.setattr(TransportPort, "activate", lossy_activate)
    return lose, lost


class Gate:
    """An instance's way to the arbiter: unreachable (it raises) until ``open``; counts the tries."""

    def __init__(self, llumlet, is_open: bool = False) -> None:
        self.inner = llumlet.ownership
        self.open_ = threading.Event()
        if is_open:
            self.open_.set()
        self.tries = 0
        self.answers: list[Owner] = []
        llumlet.ownership = self

    def __call__(self, mid, side):
        self.tries += 1
        if not self.open_.is_set():
            raise ConnectionError("injected: the arbiter is unreachable")
        got = Owner(self.inner(mid, side))
        if mid == MID:
            self.answers.append(got)
        return got

    def open(self) -> None:
        self.open_.set()


def migrate_one(cluster, gate: HoldOutputs, handles) -> tuple[str, threading.Event, list[MigrationResult]]:
    """Start migrating one running request of the (held) source; its id, an event set when the
    migration ended, and its result."""
    on_src = [h for h in handles if h.instance_id == SRC]
    assert on_src, [h.instance_id for h in handles]
    gate.run_until(lambda: all(len(h.token_ids) >= 3 for h in on_src), "tokens on the source")
    rid = on_src[0].request_id
    src, dst = local(cluster, SRC).llumlet, local(cluster, DST).llumlet
    ended, results = threading.Event(), []

    def done(r):
        if r.migration_id == MID:
            results.append(r)
            ended.set()

    src.on_migration_done = done
    assert src.migrate_out(rid, dst.address, MID)
    return rid, ended, results


def check(cluster, emitted: Emissions, handles, expected, rid: str, served_by: str) -> None:
    assert wait_all(handles) == expected
    emitted.assert_served_once(set())
    with emitted.lock:
        after = {i for (r, _), who in emitted.by_position.items() if r == rid for i in who}
    assert served_by in after
    assert_no_leak(cluster)  # both instances empty, idle, invariants checked
    for iid in (SRC, DST):
        assert not local(cluster, iid).llumlet.dest.parked


def start(n: int = 6, max_tokens: int = 48):
    cfg = config()
    ps, sps = prompts(n), samplings(n, max_tokens)
    return cfg, ps, sps, reference(cfg.engine, ps, sps)


def test_source_claims_first_runs_on_and_the_parked_copy_is_dropped(lossy):
    lose, lost = lossy
    lose |= {"commit_reply", "abort", "activate"}
    cfg, ps, sps, expected = start()
    with running(cfg) as (cluster, emitted, _), HoldOutputs(cluster, SRC) as gate:
        gate.hold()
        src_arb = Gate(local(cluster, SRC).llumlet, is_open=True)
        dst_arb = Gate(local(cluster, DST).llumlet)  # the destination's claims wait for the source's
        handles = [cluster.submit(p, sp) for p, sp in zip(ps, sps)]
        rid, ended, results = migrate_one(cluster, gate, handles)
        assert ended.wait(60)
        (res,) = results
        assert res.status == MigrationStatus.ABORTED_DST and not res.unresolved
        assert src_arb.answers == [Owner.SOURCE] and lost["commit_reply"] == 1 and lost["abort"] >= 2
        dst = local(cluster, DST).llumlet
        assert dst.dest.parked and not dst.held([rid])  # parked there, not held, emitting nothing
        wait_for(lambda: dst_arb.tries > 0, what="the destination to claim its parked copy")
        dst_arb.open()
        wait_for(lambda: not dst.dest.parked, what="the destination to drop its parked copy")
        assert dst_arb.answers == [Owner.SOURCE] and dst.stats.migrations_in == 0
        gate.release()
        check(cluster, emitted, handles, expected, rid, SRC)


@pytest.mark.parametrize("loss", ["activate", "all"])
def test_destination_claims_first_activates_and_the_source_frees(lossy, loss):
    """The reverse race: the activation is lost (the source freed after the commit's ok reply),
    or everything is lost and the source's claim comes after the destination's."""
    lose, lost = lossy
    lose |= {"activate"} if loss == "activate" else {"commit_reply", "abort", "activate"}
    cfg, ps, sps, expected = start()
    with running(cfg) as (cluster, emitted, _), HoldOutputs(cluster, SRC) as gate:
        gate.hold()
        src_arb = Gate(local(cluster, SRC).llumlet)  # the source's claims wait for the destination's
        dst_arb = Gate(local(cluster, DST).llumlet, is_open=True)
        handles = [cluster.submit(p, sp) for p, sp in zip(ps, sps)]
        rid, ended, results = migrate_one(cluster, gate, handles)
        dst = local(cluster, DST).llumlet
        wait_for(lambda: dst_arb.answers, what="the destination to claim its parked copy")
        assert dst_arb.answers == [Owner.DESTINATION]
        wait_for(lambda: dst.held([rid]), what="the destination to activate its copy")
        gate.release()  # the source's engine loop also carries its claims after the driver gave up
        src_arb.open()
        assert ended.wait(60)
        (res,) = results
        src = local(cluster, SRC).llumlet
        if loss == "activate":
            assert res.status == MigrationStatus.FINISHED and src_arb.answers == [] and lost["activate"] >= 1
        else:  # the source's claim got through in its driver, or later from its engine loop
            wait_for(lambda: src_arb.answers, what="the source's claim")
            assert src_arb.answers == [Owner.DESTINATION]
        wait_for(lambda: not src.held([rid]), what="the source to free its copy")
        assert dst.stats.migrations_in == 1
        check(cluster, emitted, handles, expected, rid, DST)


def test_arbiter_unreachable_for_a_while_then_the_request_completes_exactly(lossy):
    lose, lost = lossy
    lose |= {"commit_reply", "abort", "activate"}
    cfg, ps, sps, expected = start()
    with running(cfg) as (cluster, emitted, _), HoldOutputs(cluster, SRC) as gate:
        gate.hold()
        src_arb = Gate(local(cluster, SRC).llumlet)
        dst_arb = Gate(local(cluster, DST).llumlet)
        handles = [cluster.submit(p, sp) for p, sp in zip(ps, sps)]
        rid, ended, results = migrate_one(cluster, gate, handles)
        assert ended.wait(60)  # the source gave up claiming in the driver: kept frozen, its loop claims on
        (res,) = results
        assert res.unresolved and res.status == MigrationStatus.ABORTED_DST
        src, dst = local(cluster, SRC).llumlet, local(cluster, DST).llumlet
        with emitted.lock:
            before = {k: list(v) for k, v in emitted.by_position.items() if k[0] == rid}
        gate.release()  # the other requests run on; the frozen one cannot
        tries = src_arb.tries
        wait_for(lambda: src_arb.tries > tries + 1 and dst_arb.tries > 1, what="both sides to claim in vain")
        assert src.held([rid]) and not dst.held([rid]) and dst.dest.parked
        assert src.engine.seqs[rid].status.value == "frozen"
        with emitted.lock:
            assert {k: v for k, v in emitted.by_position.items() if k[0] == rid} == before  # nothing emitted
        src_arb.open()
        dst_arb.open()
        wait_for(lambda: src_arb.answers or dst_arb.answers, what="a claim to get through")
        owner = (src_arb.answers + dst_arb.answers)[0]
        check(cluster, emitted, handles, expected, rid, SRC if owner == Owner.SOURCE else DST)
        assert set(src_arb.answers + dst_arb.answers) == {owner}
