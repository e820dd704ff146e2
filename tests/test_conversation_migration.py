"""A conversation's KV follows it by migration (issue 17, item 4), over the real stack.

Two in-process instances of the built-in engine (float64, host pool, conversation reuse),
conversation-aware dispatch, migration rounds off (the test migrates by hand). Turn 1
runs on its home instance, which keeps its KV in the host pool. Turn 2 goes home and
restores that prefix (the stored copy is consumed: nothing stale stays behind); while it
decodes (its instance held), it is live-migrated to the other instance, where it ends and
its KV is kept. The scheduler then reports the conversation on its new home, turn 3 is
dispatched there and restores the prefix, and every turn's tokens equal a run without
reuse or migration. No device or host block leaks on either side. A turn migrated while
still queued takes its conversation's stored prefix along (over the instances' transport)
and restores it on the destination; its home keeps no stale copy. Each test runs twice: the
instances move KV in process (``inproc``) and over zmq on loopback (``zmq``: real frames,
the host-pool blocks of a carried prefix included, validated by the wire format on receipt).
"""

from __future__ import annotations

import pytest

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, LlumletConfig, SchedulerConfig
from llumnix_py.engines.types import SamplingParams
from llumnix_py.frontend.cluster import Cluster
from migration.protocol import MigrationStatus
from policies.config import PolicyConfig
from tests.cluster_helpers import SMALL_MODEL, HoldOutputs, assert_no_leak, reference, wait_for

BS = 8
SP = SamplingParams(max_tokens=16, ignore_eos=True)


def config(transport: str = "inproc") -> ClusterConfig:
    engine = EngineSpec(engine=EngineConfig(num_blocks=128, block_size=BS, max_batch_size=8, num_host_blocks=64,
                                            conversation_host_blocks=48), model=SMALL_MODEL)
    return ClusterConfig(
        num_instances=2, runtime="local", engine=engine,
        scheduler=SchedulerConfig(policy=PolicyConfig(dispatch="conversation"), poll_interval_s=0.01,
                                  migration_interval_s=0.02, enable_migration=False),
        llumlet=LlumletConfig(instance_id="template", transport=transport))


@pytest.fixture(params=["inproc", "zmq"])
def cluster(request):
    """The two instances, their KV moving in process or over zmq on loopback (real frames
    through the wire format, validated on receipt)."""
    c = Cluster.start(config(request.param))
    try:
        yield c
    finally:
        c.stop()


def engine(cluster: Cluster, iid: str):
    return cluster.control.instance(iid).llumlet.engine


def kept_by_scheduler(cluster: Cluster) -> dict[str, list[str]]:
    """Instance id -> the conversations its last polled load reports."""
    return {x.instance_id: [c for c, _ in x.conversations] for x in cluster.control.daemon.core.loads()}


def first_turn(cluster: Cluster, client: str, conversation: str, mul: int):
    """Turn 1 of ``conversation`` run to its end with exact tokens and its KV kept: (its prompt,
    its reference tokens, its home, the other instance, the home's engine, the other's engine)."""
    p1 = tuple((mul * j) % 300 + 1 for j in range(40))
    (t1_ref,) = reference(config().engine, [p1], [SP])
    h1 = cluster.submit(p1, SP, client_id=client, conversation_id=conversation)
    assert h1.result(timeout=120) == t1_ref
    home = h1.instance_id
    other = next(i for i in cluster.instance_ids() if i != home)
    return p1, t1_ref, home, other, engine(cluster, home), engine(cluster, other)


def test_a_migrated_turn_takes_its_conversations_kv_to_its_new_home(cluster):
    spec = config().engine
    p1, t1_ref, home, other, src, dst = first_turn(cluster, "alice", "c", 7)
    wait_for(lambda: "c" in src.conversations, what="turn 1's KV kept on its instance")
    wait_for(lambda: kept_by_scheduler(cluster)[home] == ["c"], what="the scheduler to see the conversation")

    p2 = p1 + tuple(t1_ref) + tuple(range(100, 110))
    (t2_ref,) = reference(spec, [p2], [SP])
    with HoldOutputs(cluster, home) as gate:
        gate.hold()
        h2 = cluster.submit(p2, SP, client_id="alice", conversation_id="c")
        assert h2.instance_id == home  # dispatched where the conversation's KV lives
        gate.run_until(lambda: len(h2.token_ids) >= 3, "turn 2 decoding on its home")
        assert src.conversations.hits == 1 and src.conversations.restored_tokens > 0
        assert "c" not in src.conversations  # the restored copy was consumed: nothing stale left behind
        res = cluster.control.instance(home).llumlet.migrate_now(
            h2.request_id, cluster.control.instance(other).llumlet.address, "mig-conv")
        assert res.status == MigrationStatus.FINISHED and res.blocks > 0
    assert h2.result(timeout=120) == t2_ref
    assert h2.instances_seen[-1] == other
    wait_for(lambda: "c" in dst.conversations, what="turn 2's KV kept on the destination")
    stored = dst.conversations.entries()["c"]
    assert stored.tokens == (p2 + tuple(t2_ref))[:len(stored.tokens)] and len(stored.tokens) >= len(p2)
    assert "c" not in src.conversations
    wait_for(lambda: kept_by_scheduler(cluster) == {home: [], other: ["c"]},
             what="the scheduler to see the conversation on its new home")

    p3 = p2 + tuple(t2_ref) + tuple(range(120, 126))
    (t3_ref,) = reference(spec, [p3], [SP])
    hits, restored = dst.conversations.hits, dst.conversations.restored_tokens
    h3 = cluster.submit(p3, SP, client_id="alice", conversation_id="c")
    assert h3.instance_id == other  # the next turn follows the KV to its new home
    assert h3.result(timeout=120) == t3_ref  # exact, with the prefix restored there
    assert dst.conversations.hits == hits + 1
    assert dst.conversations.restored_tokens - restored == len(stored.tokens)
    assert_no_leak(cluster)  # no device block used, invariants of both pools checked
    assert src.host.num_used == 0  # nothing of the conversation left on its old home
    wait_for(lambda: dst.host.num_used == dst.conversations.num_blocks > 0, what="only turn 3's KV kept")


def test_a_turn_migrated_while_waiting_takes_its_conversations_kv_along(cluster):
    """Turn 2 is still queued on its home (held) when it is migrated as a waiting request:
    the stored prefix of turn 1 travels in the migration (over the instances' transport),
    the destination prefills only the new tokens, and the home keeps no stale copy."""
    spec = config().engine
    p1, t1_ref, home, other, src, dst = first_turn(cluster, "bob", "w", 11)
    wait_for(lambda: kept_by_scheduler(cluster)[home] == ["w"], what="the scheduler to see the conversation")

    p2 = p1 + tuple(t1_ref) + tuple(range(100, 110))
    (t2_ref,) = reference(spec, [p2], [SP])
    k = src.conversations.reusable_blocks("w", p2)
    assert k > 0
    restored = dst.conversations.restored_tokens
    with HoldOutputs(cluster, home) as gate:
        gate.hold()
        h2 = cluster.submit(p2, SP, client_id="bob", conversation_id="w")
        assert h2.instance_id == home and not h2.token_ids
        res = cluster.control.instance(home).llumlet.migrate_now(
            h2.request_id, cluster.control.instance(other).llumlet.address, "mig-wait", waiting=True)
        assert res.status == MigrationStatus.FINISHED and res.blocks == k
        assert "w" not in src.conversations and src.host.num_used == 0
    assert h2.result(timeout=120) == t2_ref
    assert h2.instances_seen[-1] == other
    assert dst.conversations.restored_tokens - restored == k * BS  # restored there, not recomputed
    assert_no_leak(cluster)
    assert src.host.num_used == 0
