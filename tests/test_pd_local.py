"""Prefill/decode disaggregation on the built-in engine, in one process (runtime ``local``).

A ``prefill`` instance takes every new request; once a request's first token is out,
the scheduler orders its hand-off to a ``decode`` instance, a live migration (the
request keeps decoding on the prefill instance while its KV is copied). The promises:
exactly the tokens of a colocated run, each output position produced once, and a
hand-off that fails at any stage leaves the request decoding on its prefill instance.
"""

from __future__ import annotations

import threading

import pytest

from llumnix_py.config import ClusterConfig, LlumletConfig, SchedulerConfig
from llumnix_py.errors import UnknownInstanceError, UnknownRoleError
from llumnix_py.llumlet import Llumlet
from migration import wire
from tests.cluster_helpers import HoldOutputs, assert_no_leak, prompts, reference, samplings, small_spec, wait_all, \
    wait_for
from tests.test_faults_local import Emissions, running

PREFILL, DECODE = "instance-000", "instance-001"


def pd_config(num_instances: int = 2, ratio: str = "1:1", migrations: int = 1, **sched) -> ClusterConfig:
    """``migrations``: concurrent migrations per instance, each way (scheduler and llumlets)."""
    return ClusterConfig(
        num_instances=num_instances, runtime="local", engine=small_spec(num_blocks=256),
        scheduler=SchedulerConfig(poll_interval_s=0.01, migration_interval_s=0.02, pd_ratio=ratio,
                                  max_migrations_out=migrations, max_migrations_in=migrations, **sched),
        llumlet=LlumletConfig(instance_id="template", transport="inproc", migration_timeout_s=2.0,
                              max_outgoing=migrations, max_incoming=migrations))


def positions_by_instance(emitted: Emissions, request_id: str) -> dict[int, list[str]]:
    with emitted.lock:
        return {i: v for (rid, i), v in emitted.by_position.items() if rid == request_id}


def test_roles_follow_the_ratio_and_show_in_the_cluster_state_and_on_each_llumlet():
    with running(pd_config(4, "1:3")) as (cluster, _, _):
        roles = {i["instance_id"]: i["role"] for i in cluster.state()["instances"]}

        def llumlet_roles() -> dict[str, str]:  # what each llumlet holds by (llumnix_py.prefill_hold)
            return {iid: cluster.control.instance(iid).load().role for iid in roles}

        wait_for(lambda: llumlet_roles() == roles, what="the scheduler to send each llumlet its role")
        cluster.set_role("instance-001", "both")
        wait_for(lambda: llumlet_roles()["instance-001"] == "both", what="the flip to reach the llumlet")
    assert roles == {"instance-000": "prefill", "instance-001": "decode", "instance-002": "decode",
                     "instance-003": "decode"}


@pytest.mark.parametrize("migrations", [1, 4], ids=["one-at-a-time", "four-at-once"])
def test_a_disaggregated_request_produces_the_colocated_tokens_and_each_position_once(migrations):
    """Requests enter on the prefill instance only; each is handed off once its first token
    is out (the prefill instance is held after that batch, so none can finish there first)
    and ends on the decode instance with exactly the tokens of a run on one engine, with
    hand-offs one at a time or up to four at once (``serve --max-migrations-out/-in``)."""
    n, max_tokens = 4, 24
    ps, sps = prompts(n), samplings(n, max_tokens)
    expected = reference(small_spec(num_blocks=256), ps, sps)
    with running(pd_config(migrations=migrations)) as (cluster, emitted, _):
        with HoldOutputs(cluster, PREFILL) as gate:
            gate.hold()
            handles = [cluster.submit(p, sp) for p, sp in zip(ps, sps)]
            gate.wait_held()
            gate.run_until(lambda: all(h.token_ids for h in handles), "every first token")
            wait_for(lambda: cluster.state()["migrations"].get("finished", 0) == n, what="every hand-off")
        got = wait_all(handles)
        state = cluster.state()
        assert state["handoffs"] == n
        assert_no_leak(cluster)
    assert got == expected
    emitted.assert_served_once(set())
    for h in handles:
        by_pos = positions_by_instance(emitted, h.request_id)
        assert by_pos[0] == [PREFILL]
        assert by_pos[max_tokens - 1] == [DECODE]
        assert sorted(by_pos) == list(range(max_tokens))


STAGES = {"prealloc": wire.PreAlloc, "blocks": wire.Blocks, "commit": wire.Commit}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_hand_off_failing_at_any_stage_leaves_the_request_decoding_on_its_prefill_instance(monkeypatch, stage):
    """The decode instance refuses the hand-off's ``stage`` message: the migration aborts,
    the request decodes on, to the end, on the prefill instance (no retry), with the tokens
    of a colocated run; nothing leaks on either instance."""
    max_tokens = 24
    ps, sps = prompts(1), samplings(1, max_tokens)
    expected = reference(small_spec(num_blocks=256), ps, sps)
    refused = threading.Event()
    original = Llumlet._handle_migration_message

    def refusing(self, msg, payload):
        if isinstance(msg, STAGES[stage]) and not refused.is_set():
            refused.set()
            reply = wire.Reply(ok=False, error=f"injected failure at {stage}")
            self.core.handle(wire.Abort(msg.migration_id, "injected"), None, 0.0)  # as a failing side frees
            return reply.to_header()
        return original(self, msg, payload)

    monkeypatch.setattr(Llumlet, "_handle_migration_message", refusing)
    with running(pd_config()) as (cluster, emitted, _):
        with HoldOutputs(cluster, PREFILL) as gate:
            gate.hold()
            (handle,) = [cluster.submit(p, sp) for p, sp in zip(ps, sps)]
            gate.wait_held()
            wait_for(lambda: sum(cluster.state()["migrations"].values()) == 1, what="the hand-off to end")
        got = wait_all([handle])
        state = cluster.state()
        assert refused.is_set()
        assert state["handoffs"] == 1  # tried once, not again
        assert state["migrations"].get("finished", 0) == 0
        assert_no_leak(cluster)
    assert got == expected
    by_pos = positions_by_instance(emitted, handle.request_id)
    assert sorted(by_pos) == list(range(max_tokens))
    assert all(v == [PREFILL] for v in by_pos.values())


def test_a_role_flip_through_the_library_checks_the_role_and_the_instance():
    with running(pd_config(2, "1:1")) as (cluster, _, _):
        with pytest.raises(UnknownRoleError, match="prefill, decode, both"):
            cluster.set_role(DECODE, "prefil")
        with pytest.raises(UnknownInstanceError, match="instance-007"):
            cluster.set_role("instance-007", "decode")
        cluster.set_role(DECODE, " DECODE ")  # the same role: nothing flips
        assert cluster.state()["role_flips"] == []
        cluster.set_role(DECODE, "both")
        roles = {i["instance_id"]: i["role"] for i in cluster.state()["instances"]}
        assert roles == {PREFILL: "prefill", DECODE: "both"}
        assert [f[1:] for f in cluster.state()["role_flips"]] == [[DECODE, "both"]]


def test_role_flips_under_load_lose_nothing():
    """Flips both ways while every instance holds requests mid-stream. Requests enter on the
    one prefill instance (002); once they decode on 000 and 001, more arrive and queue on 002
    (held, so none of them is prefilled yet). Then 001 flips to prefill and 002 to decode:
    002's queued requests leave it by waiting-request migration and are prefilled on 001,
    never on 002; the requests decoding on 001 leave it by hand-off. Every request ends with
    exactly the tokens of a run on one engine, each position produced once, no block leaks."""
    n_a, n_b, max_tokens = 4, 3, 24
    ps, sps = prompts(n_a + n_b), samplings(n_a + n_b, max_tokens)
    expected = reference(small_spec(num_blocks=256), ps, sps)
    i0, i1, i2 = "instance-000", "instance-001", "instance-002"
    with running(pd_config(3, "2:1", migrations=4)) as (cluster, emitted, _):
        instance = cluster.control.instance

        def ids(iid: str, queue: str) -> set[str]:
            return {r.request_id for r in getattr(instance(iid).load(), queue)}

        cluster.set_role(i0, "decode")  # 000 and 001 decode, 002 prefills every request
        with HoldOutputs(cluster, i0) as g0, HoldOutputs(cluster, i1) as g1, HoldOutputs(cluster, i2) as g2:
            for g in (g0, g1, g2):
                g.hold()
            first = [cluster.submit(p, sp) for p, sp in zip(ps[:n_a], sps[:n_a])]
            assert {h.instance_id for h in first} == {i2}
            g2.run_until(lambda: all(h.token_ids for h in first), "every first token")
            wait_for(lambda: cluster.state()["migrations"].get("finished", 0) == n_a, what="the hand-offs")
            assert not ids(i2, "running")
            second = [cluster.submit(p, sp) for p, sp in zip(ps[n_a:], sps[n_a:])]
            queued = {h.request_id for h in second}
            assert {h.instance_id for h in second} == {i2} and ids(i2, "waiting") == queued
            decoding_on_1 = ids(i1, "running")
            cluster.set_role(i1, "prefill")
            cluster.set_role(i2, "decode")
            wait_for(lambda: not (ids(i2, "waiting") & queued) and not (ids(i1, "running") & decoding_on_1),
                     what="the flipped instances to drain")
            assert ids(i1, "waiting") == queued  # queued again on the new prefill instance, still held
            moved = n_a + n_b + len(decoding_on_1)  # the results reach the scheduler at its next poll
            wait_for(lambda: cluster.state()["migrations"].get("finished", 0) >= moved, what="their results")
            assert cluster.state()["redirects"] >= n_b
        got = wait_all(first + second)
        roles = {i["instance_id"]: i["role"] for i in cluster.state()["instances"]}
        assert_no_leak(cluster)
    assert got == expected
    assert roles == {i0: "decode", i1: "prefill", i2: "decode"}
    emitted.assert_served_once(set())
    for h in second:  # prefilled on the prefill instance it was redirected to, never on 002
        by_pos = positions_by_instance(emitted, h.request_id)
        assert by_pos[0] == [i1] and sorted(by_pos) == list(range(max_tokens))
    assert decoding_on_1, "001 decoded nothing when it flipped: the test would show no hand-off"
    for h in first:
        by_pos = positions_by_instance(emitted, h.request_id)
        assert sorted(by_pos) == list(range(max_tokens))
        if h.request_id in decoding_on_1:
            assert by_pos[max_tokens - 1] != [i1]  # it left 001 by hand-off
