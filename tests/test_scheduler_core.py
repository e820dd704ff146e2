"""The sans-IO ``GlobalScheduler`` with hand-made ``InstanceLoad`` snapshots (no threads, no clock)."""

from __future__ import annotations

import pytest

from llumnix_py.load import InstanceLoad, RequestLoad
from llumnix_py.scheduler.core import GlobalScheduler, SchedulerConfig

TOTAL = 100


def req(rid: str, blocks: int, *, priority: int = 0, arrival: float = 0.0, migrating: bool = False) -> RequestLoad:
    return RequestLoad(request_id=rid, num_blocks=blocks, blocks_needed=blocks, prompt_len=blocks * 16, output_len=0,
                       priority=priority, arrival_time=arrival, num_preemptions=0, migrating=migrating)


def load(*running: RequestLoad, total: int = TOTAL, waiting: tuple[RequestLoad, ...] = ()) -> InstanceLoad:
    used = sum(r.num_blocks for r in running)
    return InstanceLoad(total_blocks=total, used_blocks=used, watermark_blocks=0, block_size=16,
                        running=tuple(running), waiting=waiting, max_batch_size=64)


def overloaded(prefix: str, n: int = 10, blocks: int = 9) -> InstanceLoad:
    """``n`` running requests of ``blocks`` each: freeness (100 - 90) / 10 = 1 < 3 (a source)."""
    return load(*(req(f"{prefix}{i}", blocks + (i % 3), arrival=float(i)) for i in range(n)))


def new_request(rid: str = "new", blocks: int = 2, priority: int = 0) -> RequestLoad:
    return RequestLoad(request_id=rid, num_blocks=0, blocks_needed=blocks, priority=priority)


def make(ids=("a", "b", "c"), now: float = 0.0, **cfg) -> GlobalScheduler:
    s = GlobalScheduler(SchedulerConfig(**cfg))
    for iid in ids:
        s.register(iid, f"tcp://{iid}", now)
        s.on_load(iid, load(), now)
    return s


# ----- dispatch ------------------------------------------------------------------------------


def test_dispatch_never_chooses_a_terminating_instance():
    s = make()
    s.on_load("a", load(req("x", 30)), 0.0)
    s.on_load("b", load(req("y", 20)), 0.0)
    s.mark_terminating("c")  # the emptiest instance: the freest, but draining
    chosen = [s.dispatch(new_request(f"r{i}", blocks=1 + i % 4)) for i in range(40)]
    assert chosen
    assert "c" not in chosen
    assert set(chosen) <= {"a", "b"}
    # Still never chosen after fresh polls (which clear the pending counts).
    for iid in ("a", "b", "c"):
        s.on_load(iid, load(), 1.0)
    assert all(s.dispatch(new_request(f"q{i}")) != "c" for i in range(20))


def test_dispatch_returns_none_when_every_instance_is_terminating():
    s = make()
    for iid in ("a", "b", "c"):
        s.mark_terminating(iid)
    assert s.dispatch(new_request()) is None
    assert s.num_dispatched == 0
    assert GlobalScheduler().dispatch(new_request()) is None  # no instance at all


def test_dispatch_counts_pending_requests_until_the_next_poll():
    s = make(ids=("a", "b"))
    first = s.dispatch(new_request("r0", blocks=10))
    second = s.dispatch(new_request("r1", blocks=10))
    assert {first, second} == {"a", "b"}  # the first one counts into its instance's load
    assert s.num_dispatched == 2


def test_a_burst_spreads_over_instances_whose_polls_lag_behind():
    # "a" polls empty; "b" and "c" show one small running request each. Then "a"'s
    # next poll shows what it got so far as *waiting* (not yet admitted). Every
    # request, running, waiting or only dispatched, counts in its instance's batch, so
    # the burst spreads: requests end up within one of each other on every instance.
    s = make()
    s.on_load("b", load(req("b0", 2)), 0.0)
    s.on_load("c", load(req("c0", 2)), 0.0)
    held = {"a": [], "b": ["b0"], "c": ["c0"]}
    for i in range(12):
        rid = f"r{i}"
        iid = s.dispatch(new_request(rid, blocks=2))
        held[iid].append(rid)
        if i == 5:  # a poll of "a" mid-burst: its requests are queued, not running yet
            s.on_load("a", load(waiting=tuple(req(r, 2) for r in held["a"])), 0.01)
    sizes = sorted(len(v) for v in held.values())
    assert sizes[-1] - sizes[0] <= 1, held


# ----- migration rounds ----------------------------------------------------------------------


def test_migration_round_pairs_an_overloaded_instance_with_the_freest():
    s = make()
    s.on_load("a", overloaded("a"), 0.0)
    s.on_load("b", load(req("b0", 5)), 0.0)
    orders = s.migration_round(0.0)
    assert len(orders) == 1
    o = orders[0]
    assert (o.src, o.dst, o.dst_address) == ("a", "c", "tcp://c")
    assert o.request_id == "a0"  # ``shortest``: the fewest blocks (9), earliest arrival
    assert not o.waiting
    assert s.instances["a"].orders_out == {o.migration_id: o}
    assert s.instances["c"].orders_in == {o.migration_id: o}


def test_an_instance_with_an_order_in_flight_gets_no_new_one_until_it_is_done():
    s = make()  # max_migrations_out = max_migrations_in = 1
    s.on_load("a", overloaded("a"), 0.0)
    (first,) = s.migration_round(0.0)
    assert first.src == "a"
    # Same loads, later rounds: "a" is busy as a source, "c" as a destination.
    for t in (0.1, 0.2, 0.3):
        orders = s.migration_round(t)
        assert all(o.src != "a" for o in orders)
        assert all(o.dst != first.dst for o in orders)
    assert len(s.instances["a"].orders_out) == 1
    s.on_migration_done(first.migration_id)
    assert not s.instances["a"].orders_out and not s.instances[first.dst].orders_in
    (again,) = s.migration_round(0.4)
    assert again.src == "a" and again.migration_id != first.migration_id


def test_an_order_never_reported_back_expires_after_the_timeout():
    s = make(migration_order_timeout_s=5.0)
    s.on_load("a", overloaded("a"), 0.0)
    (first,) = s.migration_round(0.0)
    assert [o for o in s.migration_round(4.9) if o.src == "a"] == []
    orders = s.migration_round(5.5)
    assert first.migration_id not in s.instances["a"].orders_out
    assert [o.src for o in orders] == ["a"]
    # A late report of the expired order changes nothing.
    s.on_migration_done(first.migration_id)
    assert len(s.instances["a"].orders_out) == 1


def _reflect(s: GlobalScheduler, loads: dict, order, t: float) -> None:
    """Polls after ``order`` started: the request is migrating on its source and the
    destination holds a reservation of its blocks."""
    src = loads[order.src]
    running = tuple(RequestLoad(**{**r.__dict__, "migrating": True}) if r.request_id == order.request_id else r
                    for r in src.running)
    loads[order.src] = load(*running)
    moved = next(r for r in src.running if r.request_id == order.request_id)
    dst = loads[order.dst]
    loads[order.dst] = InstanceLoad(total_blocks=TOTAL, used_blocks=dst.used_blocks + moved.num_blocks,
                                    watermark_blocks=0, block_size=16, running=dst.running, waiting=dst.waiting,
                                    reserved_blocks=dst.reserved_blocks + moved.num_blocks)
    for iid in (order.src, order.dst):
        s.on_load(iid, loads[iid], t)


@pytest.mark.parametrize("max_out", [1, 2, 3])
def test_max_migrations_out_bounds_orders_in_flight_per_source(max_out):
    ids = ("a", "d1", "d2", "d3", "d4")
    s = make(ids=ids, max_migrations_out=max_out)
    loads = {iid: load() for iid in ids}
    loads["a"] = overloaded("a", n=12, blocks=8)  # (100 - 108) / 12 < 0
    s.on_load("a", loads["a"], 0.0)
    in_flight = []
    for t in range(8):
        orders = s.migration_round(float(t) * 0.1)
        for o in orders:
            _reflect(s, loads, o, float(t) * 0.1)
        in_flight += orders
        assert len(s.instances["a"].orders_out) <= max_out
    assert len(in_flight) == max_out
    assert all(o.src == "a" for o in in_flight)
    assert len({o.request_id for o in in_flight}) == max_out
    # Each destination takes at most one (max_migrations_in = 1).
    assert len({o.dst for o in in_flight}) == max_out


def test_max_migrations_in_bounds_orders_in_flight_per_destination():
    s = make(ids=("a", "b", "c"), max_migrations_out=1, max_migrations_in=1)
    s.on_load("a", overloaded("a"), 0.0)
    s.on_load("b", overloaded("b", blocks=8), 0.0)
    s.on_load("c", load(), 0.0)  # the only destination
    orders = []
    for t in range(6):
        orders += s.migration_round(float(t) * 0.1)
        assert len(s.instances["c"].orders_in) <= 1
    assert len(orders) == 1 and orders[0].dst == "c"


def test_a_busy_instance_does_not_block_a_pair_of_idle_ones():
    """An instance at its migration limit is left out of the pairing, not just skipped.

    "a" (the most overloaded) has an order in flight to "d1"; "d1" now looks less free
    than "d2" (it holds the reservation). Pairing the whole cluster would plan a->d2
    and b->d1, both blocked by a busy end; "b" and "d2" must still be paired.
    """
    ids = ("a", "b", "d1", "d2")
    s = make(ids=ids)
    loads = {iid: load() for iid in ids}
    loads["a"] = overloaded("a", n=12, blocks=8)  # freeness < 0
    loads["b"] = load(req("b-0", 40))  # not a source yet
    loads["d2"] = load(req("d2-0", 1))
    for iid in ids:
        s.on_load(iid, loads[iid], 0.0)
    (first,) = s.migration_round(0.0)
    assert (first.src, first.dst) == ("a", "d1")
    _reflect(s, loads, first, 0.05)
    s.on_load("b", overloaded("b", n=10, blocks=9), 0.05)  # b becomes a source: freeness 1 > a's
    orders = s.migration_round(0.1)
    assert [(o.src, o.dst) for o in orders] == [("b", "d2")]


def test_migration_rounds_can_be_turned_off():
    s = make(enable_migration=False)
    s.on_load("a", overloaded("a"), 0.0)
    assert s.migration_round(0.0) == []


def test_a_terminating_instance_drains_first_one_request_at_a_time():
    s = make()
    s.on_load("a", overloaded("a"), 0.0)
    s.on_load("b", load(req("b0", 3), req("b1", 4)), 0.0)  # not overloaded, but terminating
    s.mark_terminating("b")
    orders = s.migration_round(0.0)
    srcs = [o.src for o in orders]
    assert srcs and srcs[0] == "b"  # freeness -inf: always the first source
    assert orders[0].request_id == "b0"


# ----- drained, dead ------------------------------------------------------------------------


def test_drained_lists_only_empty_terminating_instances_without_migrations_in_flight():
    s = make(ids=("a", "b", "c", "d"))
    s.on_load("a", load(req("a0", 4)), 0.0)
    s.mark_terminating("a")  # terminating, still holds a request
    s.mark_terminating("b")  # terminating and empty
    s.on_load("d", load(), 0.0)  # empty, not terminating
    assert s.drained() == ["b"]
    # "a" migrates its request to "c"; it is not drained while the order is in flight,
    # even once its load shows it empty.
    (o,) = s.migration_round(0.0)
    assert (o.src, o.request_id) == ("a", "a0")
    s.on_load("a", load(), 0.1)
    assert s.drained() == ["b"]
    s.on_migration_done(o.migration_id)
    assert s.drained() == ["a", "b"]


def test_a_terminating_destination_with_a_migration_in_flight_is_not_drained():
    s = make(ids=("a", "c"))
    s.on_load("a", overloaded("a"), 0.0)
    (o,) = s.migration_round(0.0)
    assert o.dst == "c"
    s.mark_terminating("c")
    assert "c" not in s.drained()
    s.on_migration_done(o.migration_id)
    assert s.drained() == ["c"]


def test_drained_needs_a_load_and_an_empty_waiting_queue():
    s = GlobalScheduler()
    s.register("a", "tcp://a", 0.0)
    s.mark_terminating("a")
    assert s.drained() == []  # never polled: unknown whether it is empty
    s.on_load("a", load(waiting=(req("w", 0),)), 0.0)
    assert s.drained() == []
    s.on_load("a", load(), 0.1)
    assert s.drained() == ["a"]


def test_dead_after_the_heartbeat_timeout():
    s = make(ids=("a", "b"), heartbeat_timeout_s=2.0)
    assert s.dead(1.9) == []
    s.on_load("a", load(), 1.5)  # "a" answered at 1.5, "b" was last seen at 0
    assert s.dead(2.1) == ["b"]
    assert s.dead(3.6) == ["a", "b"]
    s.register("b", "tcp://b2", 3.0)  # re-registration counts as a sign of life
    assert s.dead(3.6) == ["a"]
    # Loads for unknown instances are ignored (no resurrection of a removed instance).
    s.remove("a")
    s.on_load("a", load(), 4.0)
    assert "a" not in s.instances


# ----- membership ---------------------------------------------------------------------------


def test_register_twice_is_idempotent():
    s = make()
    s.on_load("a", overloaded("a"), 0.0)
    (o,) = s.migration_round(0.0)
    before_load = s.instances["a"].load
    s.register("a", "tcp://a-restarted", 1.0)
    s.register("a", "tcp://a-restarted", 1.0)
    assert sorted(s.instances) == ["a", "b", "c"]
    rec = s.instances["a"]
    assert rec.address == "tcp://a-restarted"
    assert rec.load is before_load
    assert rec.orders_out == {o.migration_id: o}
    assert rec.last_seen == 1.0
    assert not rec.terminating


def test_register_keeps_the_terminating_mark():
    s = make()
    s.mark_terminating("a")
    s.register("a", "tcp://a", 1.0)
    assert s.instances["a"].terminating
    assert all(s.dispatch(new_request(f"r{i}")) != "a" for i in range(5))


def test_remove_forgets_the_instance_and_its_orders():
    s = make()
    s.on_load("a", overloaded("a"), 0.0)
    s.on_load("b", load(req("b0", 5)), 0.0)
    (o,) = s.migration_round(0.0)
    assert o.dst == "c"
    s.dispatch(new_request("pending"))
    s.remove("a")
    assert "a" not in s.instances
    assert s.instances["c"].orders_in == {}
    s.on_migration_done(o.migration_id)  # a late report: nothing to do, no error
    s.remove("a")  # twice: nothing to do
    assert [i.instance_id for i in s.loads()] == ["b", "c"]
    # The destination can take new orders at once.
    s.on_load("b", overloaded("b"), 1.0)
    (o2,) = s.migration_round(1.0)
    assert (o2.src, o2.dst) == ("b", "c")


def test_remove_a_destination_frees_its_source_for_new_orders():
    s = make(ids=("a", "b", "c"))
    s.on_load("a", overloaded("a"), 0.0)
    (o,) = s.migration_round(0.0)
    s.remove(o.dst)
    assert s.instances["a"].orders_out == {}
    (o2,) = s.migration_round(0.1)
    assert o2.src == "a" and o2.dst != o.dst


def test_loads_fold_in_terminating_migrations_and_pending_dispatches():
    s = make(ids=("a", "b"))
    s.on_load("a", overloaded("a"), 0.0)
    (o,) = s.migration_round(0.0)
    s.mark_terminating("a")
    s.dispatch(new_request("p"))
    by_id = {i.instance_id: i for i in s.loads()}
    assert by_id["a"].terminating and by_id["a"].migrating_out == 1 and by_id["a"].migrating_in == 0
    assert by_id["b"].migrating_in == 1
    assert [r.request_id for r in by_id["b"].pending_dispatch] == ["p"]
    s.on_load("b", load(), 0.1)  # a poll that does not show it yet (it is on its way) keeps it pending
    assert [r.request_id for r in {i.instance_id: i for i in s.loads()}["b"].pending_dispatch] == ["p"]
    s.on_load("b", load(waiting=(req("p", 0),)), 0.2)  # a poll that shows it clears it
    assert {i.instance_id: i for i in s.loads()}["b"].pending_dispatch == ()
