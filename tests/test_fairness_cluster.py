"""Fairness across the cluster: the global scheduler's VTC over every instance's service.

Properties of the pure rules (``served_delta``, ``cluster_lift``), a hypothesis state
machine over ``ClusterFairBook`` (polls of instances whose served books grow, requests
moving between instances, instances removed), and the scheduler core: its snapshots carry
the cluster-wide counters, and ``most_served_cluster`` moves out the request of the client
most over its share of the cluster where ``most_served`` sees only the instance.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llumnix_py.load import InstanceLoad, RequestLoad
from llumnix_py.scheduler.core import GlobalScheduler, SchedulerConfig
from llumnix_py.scheduler.fair_book import ClusterFairBook
from policies.config import PolicyConfig
from policies.fairness import cluster_lift, cluster_offsets, in_cluster_frame, served_delta, under_served
from policies.selection import select_migrate_out

CLIENTS = ["a", "b", "c", "d"]
INSTANCES = ["i0", "i1", "i2"]
book_st = st.dictionaries(st.sampled_from(CLIENTS), st.floats(0, 1e6, allow_nan=False), max_size=4)


# ----- the pure rules ---------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(before=book_st, grow=book_st)
def test_served_delta_is_what_a_book_grew_by(before, grow):
    after = {c: before.get(c, 0.0) + grow.get(c, 0.0) for c in set(before) | set(grow)}
    delta = served_delta(before, after)
    assert all(d > 0 for d in delta.values())
    for c in after:
        assert delta.get(c, 0.0) == pytest.approx(after[c] - before.get(c, 0.0), abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(before=book_st)
def test_a_book_that_fell_restarted_and_counts_from_zero(before):
    after = {c: v / 2 for c, v in before.items()}  # below the last poll: a new engine's book
    delta = served_delta(before, after)
    assert delta == {c: v for c, v in after.items() if v > 0}  # each fallen book counts whole


@settings(max_examples=200, deadline=None)
@given(counters=book_st, arriving=st.sets(st.sampled_from(CLIENTS)), active=st.sets(st.sampled_from(CLIENTS)))
def test_cluster_lift_raises_arrivals_to_the_floor_of_those_active_before(counters, arriving, active):
    out = cluster_lift(counters, arriving, active)
    before = active - arriving
    for c in set(out) | set(counters):
        assert out.get(c, 0.0) >= counters.get(c, 0.0)  # nothing falls
        if c not in arriving:
            assert out.get(c, 0.0) == counters.get(c, 0.0)  # only arrivals move
    if before:
        floor = min(counters.get(a, 0.0) for a in before)
        assert all(out[c] == max(counters.get(c, 0.0), floor) for c in arriving)
    else:
        assert out == dict(counters)  # nobody was active: no credit to take away


# ----- the book, as a state machine -------------------------------------------------------------
class BookMachine(RuleBasedStateMachine):
    """Instances serve clients (their books only grow), requests come, move and go, instances
    are removed. Two books see the same polls: ``full`` keeps every client, ``book`` forgets
    idle clients at or below the floor (its default). Checks on ``full``: counters never fall,
    each client's counter is at least all the service given to it (every poll counted, nothing
    lost when an instance goes), and with one client ever there is no lift, so the counter is
    that service exactly. Checks on ``book``: it is ``full`` for every active client, and for
    an idle one where it would return to (``max(counter, floor)``); it keeps no idle client at
    or below the floor."""

    def __init__(self) -> None:
        super().__init__()
        self.book = ClusterFairBook()
        self.full = ClusterFairBook(max_idle_clients=None, forget_at_floor=False)
        self.books: dict[str, dict[str, float]] = {}  # what each instance reported last
        self.clients: dict[str, set[str]] = {}
        self.given: dict[str, float] = {}  # service observed by polls, per client
        self.before: dict[str, float] = {}
        self.seen: set[str] = set()

    @rule(iid=st.sampled_from(INSTANCES), grow=book_st, clients=st.sets(st.sampled_from(CLIENTS), max_size=3))
    def poll(self, iid, grow, clients):
        self.before = dict(self.full.counters)
        served = self.books.setdefault(iid, {})
        for c, g in grow.items():
            served[c] = served.get(c, 0.0) + g
            self.given[c] = self.given.get(c, 0.0) + g
        self.clients[iid] = set(clients)
        self.seen |= set(clients) | set(grow)
        self.book.observe(iid, dict(served), clients)
        self.full.observe(iid, dict(served), clients)
        assert self.book.active == self.full.active == set().union(*self.clients.values())

    @precondition(lambda self: self.books)
    @rule(data=st.data())
    def remove(self, data):
        iid = data.draw(st.sampled_from(sorted(self.books)))
        self.before = dict(self.full.counters)
        self.book.forget(iid)
        self.full.forget(iid)
        del self.books[iid]
        self.clients.pop(iid, None)
        assert self.book.active == self.full.active == set().union(set(), *self.clients.values())

    @invariant()
    def counters_never_fall_and_hold_all_service(self):
        for c, v in self.before.items():
            assert self.full.counters.get(c, 0.0) >= v - 1e-6
        for c, g in self.given.items():
            assert self.full.counters.get(c, 0.0) >= g - 1e-6 * max(1.0, g)
        if len(self.seen) == 1:
            (c,) = self.seen
            assert self.full.counters.get(c, 0.0) == pytest.approx(self.given.get(c, 0.0))

    @invariant()
    def forgetting_changes_nothing_a_decision_reads(self):
        assert self.book.floor == self.full.floor
        for c in self.seen:
            if c in self.full.active:
                assert self.book.counters.get(c, 0.0) == self.full.counters.get(c, 0.0)
            else:
                assert max(self.book.counters.get(c, 0.0), self.book.floor) == \
                    max(self.full.counters.get(c, 0.0), self.full.floor)
                assert c not in self.book.counters or self.book.counters[c] > self.book.floor
        assert self.book.gap() == self.full.gap()


TestBookMachine = BookMachine.TestCase
TestBookMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


def test_a_client_active_elsewhere_is_not_lifted_and_a_returning_one_is():
    book = ClusterFairBook()
    book.observe("i0", {"a": 100.0}, {"a"})
    book.observe("i1", {"b": 10.0}, {"b"})  # b arrives while a is active: lifted to a's 100, then served 10
    assert book.counters == {"a": 100.0, "b": 110.0}
    book.observe("i1", {"b": 10.0, "a": 5.0}, {"a"})  # a's request moved to i1 (b left): a is not lifted
    assert book.counters == {"a": 105.0, "b": 110.0}
    book.observe("i0", {"a": 100.0}, set())
    book.observe("i2", {"c": 1.0}, {"c"})  # c arrives: the floor is a's 105
    assert book.counters["c"] == 106.0 and book.gap() == 1.0
    full = ClusterFairBook(max_idle_clients=None, forget_at_floor=False)
    for iid, served, clients in (("i0", {"a": 100.0}, {"a"}), ("i1", {"b": 10.0}, {"b"}),
                                 ("i1", {"b": 10.0, "a": 5.0}, {"a"}), ("i0", {"a": 100.0}, set()),
                                 ("i2", {"c": 1.0}, {"c"})):
        full.observe(iid, served, clients)
    book.forget("i1")  # a's last instance goes: its service stays, it is no longer active
    full.forget("i1")
    assert full.counters["a"] == 105.0 and book.active == full.active == {"c"}
    assert "a" not in book.counters and book.floor == 105.0  # a left at the floor: would return lifted to it
    assert book.counters["b"] == full.counters["b"] == 110.0  # above it: kept


# ----- in the scheduler core ------------------------------------------------------------------
def req(rid: str, client: str, blocks: int) -> RequestLoad:
    return RequestLoad(request_id=rid, num_blocks=blocks, blocks_needed=blocks, prompt_len=blocks * 16,
                       client_id=client)


def fair_load(running, served, service=None) -> InstanceLoad:
    return InstanceLoad(total_blocks=100, used_blocks=sum(r.num_blocks for r in running), block_size=16,
                        running=tuple(running), max_batch_size=64, client_served=tuple(sorted(served.items())),
                        client_service=tuple(sorted((service or served).items())))


@pytest.mark.parametrize("policy, leaves", [("most_served", "light"), ("most_served_cluster", "heavy")])
def test_the_globally_most_served_client_migrates_out(policy, leaves):
    """Instance i0 is overloaded (10 requests of 9 blocks, freeness 1); there the light client
    was served more than the heavy one, but the heavy client was served far more on i1.
    Locally the light client looks over its share; cluster-wide the heavy one is."""
    s = GlobalScheduler(SchedulerConfig(policy=PolicyConfig(migrate_out=policy)))
    for iid in ("i0", "i1"):
        s.register(iid, f"tcp://{iid}", 0.0)
    running = [req(f"h{k}", "heavy", 9) for k in range(5)] + [req(f"l{k}", "light", 9) for k in range(5)]
    s.on_load("i0", fair_load(running, {"heavy": 0.0, "light": 0.0}), 0.0)  # both arrive at once: no lift
    s.on_load("i1", fair_load([req("h9", "heavy", 2)], {"heavy": 5000.0}), 0.0)
    s.on_load("i0", fair_load(running, {"heavy": 300.0, "light": 900.0}), 0.0)
    by_id = {x.instance_id: x for x in s.loads()}
    assert dict(by_id["i0"].cluster_service) == {"heavy": 5300.0, "light": 900.0}
    assert by_id["i1"].cluster_service == (("heavy", 5300.0),)
    (order,) = s.migration_round(0.0)
    assert (order.src, order.dst) == ("i0", "i1")
    assert order.request_id.startswith(leaves[0])
    inst0 = by_id["i0"]
    assert select_migrate_out(inst0, policy).request_id == order.request_id
    s.remove("i1")
    assert dict(s.loads()[0].cluster_service) == {"heavy": 5300.0, "light": 900.0}  # i1's service stays counted


def test_an_unfair_cluster_has_no_book():
    s = GlobalScheduler(SchedulerConfig())
    s.register("i0", "tcp://i0", 0.0)
    s.on_load("i0", InstanceLoad(total_blocks=10, used_blocks=1, running=(req("x", "a", 1),)), 0.0)
    assert s.loads()[0].cluster_service == () and not s.fair_book
    assert select_migrate_out(s.loads()[0], "most_served_cluster").request_id == "x"  # all at 0: the fewest blocks


# ----- global fairness: engines order clients by cluster-wide service -----------------------------
@settings(max_examples=200, deadline=None)
@given(cluster=book_st, local=book_st, since=book_st)
def test_an_engine_sees_the_cluster_counters_plus_its_own_service_since(cluster, local, since):
    offsets = cluster_offsets(cluster, local)
    assert set(offsets) == set(local)
    at_poll = in_cluster_frame(local, offsets)
    for c in local:
        assert at_poll[c] == pytest.approx(cluster.get(c, 0.0), abs=1e-6)  # at the poll: the cluster's counters
    later = {c: v + since.get(c, 0.0) for c, v in local.items()}  # service given here since the poll
    frame = in_cluster_frame(later, offsets)
    for c in local:
        assert frame[c] == pytest.approx(cluster.get(c, 0.0) + since.get(c, 0.0), abs=1e-6)
    if offsets:  # a client that arrived after the poll counts as the least-offset one does
        assert in_cluster_frame({**later, "new": 5.0}, offsets)["new"] == 5.0 + min(offsets.values())
    assert in_cluster_frame(later, {}) == later


def first_token_order(offsets) -> list[str]:
    """Two waiting requests, one per client, equal on the engine's own counters; one slot."""
    from llumnix_py.engines.types import Request, SamplingParams
    from tests.factories import make_engine

    e = make_engine("sim", num_blocks=32, block_size=4, max_batch_size=1, fairness=True)
    e.set_fair_offsets(offsets)
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    e.add_request(Request("a1", tuple(range(1, 9)), sp, arrival_time=0.0, client_id="a"))
    e.add_request(Request("b1", tuple(range(1, 9)), sp, arrival_time=1.0, client_id="b"))
    order: list[str] = []
    while e.has_unfinished():
        for o in e.step().outputs:
            if o.index == 0:
                order.append(o.request_id)
        e.check_invariants()
    return order


def test_an_engine_serves_first_the_client_least_served_cluster_wide():
    assert first_token_order({}) == ["a1", "b1"]  # equal here: arrival order
    assert first_token_order({"a": 500.0, "b": 0.0}) == ["b1", "a1"]  # a was served more elsewhere
    assert first_token_order({"a": 0.0, "b": 500.0}) == ["a1", "b1"]


@pytest.mark.parametrize("bad", [{"a": float("nan")}, {"a": "1"}, {3: 1.0}, {"a": True}, [("a", 1.0)]])
def test_bad_offsets_are_refused(bad):
    from tests.factories import make_engine

    e = make_engine("sim", fairness=True)
    with pytest.raises(ValueError):
        e.set_fair_offsets(bad)
    assert e.fair.offsets == {}


def test_the_scheduler_hands_each_fair_instance_its_offsets_every_tick():
    from llumnix_py.scheduler.daemon import SchedulerDaemon
    from tests.cluster_helpers import ManualClock
    from tests.test_payoff import ScriptedLauncher

    for on in (False, True):
        daemon = SchedulerDaemon(SchedulerConfig(policy=PolicyConfig(global_fairness=on)), ScriptedLauncher(),
                                 clock=ManualClock(0.0))
        a, b = (daemon.handles[i] for i in daemon.launch(2))
        a.snapshot = fair_load([req("x", "u", 2), req("y", "v", 2)], {"u": 0.0, "v": 0.0})
        b.snapshot = fair_load([req("z", "u", 2)], {"u": 0.0})
        daemon.tick()
        a.snapshot = fair_load([req("x", "u", 2), req("y", "v", 2)], {"u": 10.0, "v": 30.0})
        b.snapshot = fair_load([req("z", "u", 2)], {"u": 50.0})
        daemon.tick()
        if not on:
            assert a.fair_offsets == [] and b.fair_offsets == [] and daemon.core.fair_offsets() == {}
            continue
        # cluster: u 60, v 30; a's engine counts u 10, v 30; b's counts u 50
        assert a.fair_offsets[-1] == {"u": 50.0, "v": 0.0}
        assert b.fair_offsets[-1] == {"u": 10.0}
        assert len(a.fair_offsets) == 2  # every tick


def test_global_fairness_reaches_the_engines_of_a_running_cluster():
    """Over the real daemon and the local runtime: once clients have been served, every fair
    engine holds offsets that put its counters in the cluster's frame."""
    from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, LlumletConfig
    from llumnix_py.engines.types import SamplingParams
    from llumnix_py.frontend.cluster import Cluster
    from tests.cluster_helpers import SMALL_MODEL, wait_all, wait_for

    cfg = ClusterConfig(
        num_instances=2, runtime="local",
        engine=EngineSpec(engine=EngineConfig(num_blocks=64, max_batch_size=8, fairness=True), model=SMALL_MODEL),
        scheduler=SchedulerConfig(policy=PolicyConfig(global_fairness=True), poll_interval_s=0.01,
                                  enable_migration=False),
        llumlet=LlumletConfig(instance_id="template", transport="inproc"))
    cluster = Cluster.start(cfg)
    try:
        sp = SamplingParams(max_tokens=4, ignore_eos=True)
        handles = [cluster.submit(tuple(range(1 + i, 20 + i)), sp, client_id=c) for i, c in enumerate("uvuv")]
        wait_all(handles)
        engines = {i: cluster.control.instance(i).llumlet.engine for i in cluster.instance_ids()}
        served = [e for e in engines.values() if e.fair.served]
        assert served

        def in_frame() -> bool:
            book = cluster.control.daemon.core.fair_book
            return all(e.fair.offsets and all(v == pytest.approx(book.standing(c)) for c, v in e.fair.view().items())
                       for e in served)

        wait_for(in_frame, what="each fair engine to see the cluster's counters")
        fairness = cluster.state()["fairness"]  # /v1/cluster/state shows the cluster-wide book
        # everything finished: a client at or below the floor is forgotten, one above it kept
        assert set(fairness["clients"]) <= {"u", "v"} and fairness["floor"] > 0
        assert all(v > fairness["floor"] for v in fairness["clients"].values())
        assert fairness["gap"] >= 0 and fairness["active"] == []
    finally:
        cluster.stop()


# ----- fair dispatch ----------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(standing=st.floats(0, 1e4, allow_nan=False), active=book_st, margin=st.floats(0, 100, allow_nan=False))
def test_under_served_is_below_the_active_mean_by_more_than_the_margin(standing, active, margin):
    got = under_served(standing, active, margin)
    if not active:
        assert not got
    else:
        assert got == (standing + margin < sum(active.values()) / len(active))
        if got:  # some active client stands above it by more than the margin
            assert max(active.values()) > standing + margin


def dispatch_cluster(fair_dispatch: bool) -> GlobalScheduler:
    """i0 keeps conversation c's KV and is within the slack of i1, the freest; client a (on i0)
    is served 100, b (on i1) 2,000: the floor is 100 and the mean 1,050."""
    s = GlobalScheduler(SchedulerConfig(policy=PolicyConfig(dispatch="conversation", conversation_slack=8.0,
                                                            global_fairness=True, fair_dispatch=fair_dispatch)))
    for iid in ("i0", "i1"):
        s.register(iid, f"tcp://{iid}", 0.0)
    i0 = dataclasses.replace(fair_load([req("a1", "a", 48)], {"a": 100.0}), conversations=(("c", 320),))
    s.on_load("i0", i0, 0.0)
    s.on_load("i1", fair_load([req("b1", "b", 40)], {"b": 2000.0}), 0.0)
    return s


def turn_of(client: str, rid: str = "t") -> RequestLoad:
    return RequestLoad.queued(rid, prompt_len=320, block_size=16, conversation_id="c", client_id=client)


def test_fair_dispatch_sends_an_under_served_clients_turn_to_the_freest_instance():
    assert dispatch_cluster(False).dispatch(turn_of("u")) == "i0"  # conversation dispatch: the KV's home
    s = dispatch_cluster(True)
    assert s.dispatch(turn_of("u")) == "i1" and s.num_fair_steered == 1  # u returns at 100, far below 1,050
    s = dispatch_cluster(True)
    assert s.dispatch(turn_of("b")) == "i0" and s.num_fair_steered == 0  # over its share: the usual policy
    s = dispatch_cluster(True)
    assert s.dispatch(turn_of("")) == "i0" and s.num_fair_steered == 0  # no client: the usual policy


def test_fair_dispatch_margin_is_validated():
    with pytest.raises(ValueError):
        PolicyConfig(fair_dispatch_margin=-1.0)
    with pytest.raises(ValueError):
        PolicyConfig(fair_dispatch=1)


def test_the_cli_turns_fair_dispatch_on():
    from llumnix_py.cli import build_parser, cluster_config

    args = build_parser().parse_args(["serve", "--runtime", "local", "--fairness", "--global-fairness",
                                      "--fair-dispatch"])
    policy = cluster_config(args).scheduler.policy
    assert policy.fair_dispatch and policy.global_fairness
    assert not cluster_config(build_parser().parse_args(["serve"])).scheduler.policy.fair_dispatch
