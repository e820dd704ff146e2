"""Bounded fairness books: an engine's VTC counters and the global scheduler's book forget idle
clients without changing a decision.

- the pure rule: an idle client at or below the floor returns where a forgotten one would;
- the engine: the schedule (every step's tokens and preemptions, for a seeded workload of
  many clients arriving and leaving) with forgetting equals the schedule of a book that keeps
  every client, and the books stay bounded under many distinct clients (exact forgetting,
  and the LRU cap beyond it);
- a client returning to an empty engine is lifted to the floor (the lift point never falls);
- the cluster book stays bounded under many distinct clients.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.engines.core import EngineConfig
from llumnix_py.engines.fair_share import FairShare
from llumnix_py.engines.types import Request, SamplingParams
from llumnix_py.scheduler.fair_book import ClusterFairBook
from policies.fairness import forgettable, lift, lift_migrated, lift_point
from tests.factories import make_engine

CLIENTS = [f"c{i}" for i in range(8)]


# ----- the rule ---------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(floor=st.floats(0, 1e4, allow_nan=False), below=st.floats(0, 1, allow_nan=False),
       active=st.dictionaries(st.sampled_from(CLIENTS[1:]), st.floats(0, 1e4, allow_nan=False), max_size=5),
       lead_=st.floats(0, 100, allow_nan=False))
def test_an_idle_client_at_or_below_the_floor_returns_where_a_forgotten_one_would(floor, below, active, lead_):
    """Active counters are at least the floor (the book's invariant); the idle client ``c0``
    stands at or below it: kept or forgotten, it returns to the same counter."""
    active = {c: floor + v for c, v in active.items()}
    x = floor * below
    assert forgettable({**active, "c0": x}, {"c0"}, floor) == ["c0"]
    kept, dropped = {**active, "c0": x}, dict(active)
    assert lift(kept, "c0", active, floor)["c0"] == lift(dropped, "c0", active, floor)["c0"] \
        == lift_point(active, "c0", active, floor)
    assert lift_migrated(kept, "c0", active, lead_, floor)["c0"] == \
        lift_migrated(dropped, "c0", active, lead_, floor)["c0"]
    if x < floor:  # above the floor it would not be forgettable
        assert forgettable({**active, "c0": floor + 1.0}, {"c0"}, floor) == []


# ----- the engine -------------------------------------------------------------------------------
workload_st = st.lists(
    st.tuples(st.sampled_from(CLIENTS), st.integers(0, 30), st.integers(2, 14), st.integers(1, 8)),
    min_size=1, max_size=24)


def run_schedule(engine, workload) -> tuple[list, list[int]]:
    """Feed ``(client, arrival step, prompt length, max tokens)`` requests in; every step's
    outputs and preemptions, and the book's size after each step."""
    by_step: dict[int, list[Request]] = {}
    for i, (client, at, plen, mt) in enumerate(workload):
        by_step.setdefault(at, []).append(Request(
            f"r{i}", tuple(range(3 + i, 3 + i + plen)), SamplingParams(max_tokens=mt, ignore_eos=True),
            arrival_time=float(at), client_id=client))
    trace, sizes, step = [], [], 0
    while step <= max(by_step) or engine.has_unfinished():
        for r in by_step.get(step, []):
            engine.add_request(r)
        out = engine.step()
        trace.append((tuple((o.request_id, tuple(o.new_token_ids)) for o in out.outputs), out.preempted))
        sizes.append(engine.fair.size())
        engine.check_invariants()
        step += 1
        assert step < 2000
    return trace, sizes


def fair_engine(keep_all: bool):
    e = make_engine("sim", num_blocks=20, block_size=4, max_batch_size=3, watermark=0.0, fairness=True,
                    fairness_margin=4.0, num_host_blocks=32)
    if keep_all:  # the reference: a book that never forgets anything
        e.fair = e.scheduler.fair = FairShare(margin=4.0, max_idle_clients=None, forget_at_floor=False)
    return e


@settings(max_examples=40, deadline=None)
@given(workload=workload_st)
def test_forgetting_idle_clients_at_the_floor_leaves_the_schedule_unchanged(workload):
    bounded, full = fair_engine(False), fair_engine(True)
    trace, sizes = run_schedule(bounded, workload)
    ref, ref_sizes = run_schedule(full, workload)
    assert trace == ref
    assert all(s <= r for s, r in zip(sizes, ref_sizes))
    assert bounded.fair.served == full.fair.served  # the scheduler's book: nothing lost (no cap reached)


def test_a_workload_where_clients_are_forgotten_keeps_its_schedule():
    """Not left to chance: light clients come and go while a heavy one keeps the engine busy, so
    idle clients fall below the floor and are forgotten, and the schedule is unchanged."""
    workload = [("c0", 0, 12, 8), ("c0", 0, 12, 8), ("c0", 0, 12, 8), ("c0", 4, 12, 8), ("c0", 8, 12, 8)]
    workload += [(f"c{1 + i % 7}", 2 * i, 3, 2) for i in range(12)]
    bounded, full = fair_engine(False), fair_engine(True)
    trace, _ = run_schedule(bounded, workload)
    assert trace == run_schedule(full, workload)[0]
    assert len(bounded.fair.counters) < len(full.fair.counters) == 8  # some were forgotten
    assert any(o for o, _ in trace)


def test_a_client_returning_to_an_empty_engine_is_lifted_to_the_floor():
    """The lift point never falls: once everybody has left, it stays where the least-served
    active client stood, so idling never earns credit, even on an empty engine."""
    f = FairShare()
    f.on_arrival("a", set())
    f.on_step({"a": 10}, {})
    f.on_arrival("b", {"a"})
    assert f.counters["b"] == 10.0
    f.on_step({"a": 5, "b": 1}, {})
    f.settle(set())  # both leave: the floor is the smaller of their counters
    assert f.floor == 11.0 and f.counters == {"a": 15.0}  # b (11) is at the floor: forgotten
    f.on_arrival("c", set())
    assert f.counters["c"] == 11.0  # a newcomer to the empty engine starts at the floor, not 0
    f.on_arrival("a", {"c"})
    assert f.counters["a"] == 15.0  # over the floor: its lead is remembered


def test_engine_books_stay_bounded_under_many_distinct_clients():
    """300 clients, each with one request, on a sim engine with a cap of 8 idle clients: the
    books never hold more than the active clients plus 8; without the cap, exact forgetting
    alone keeps ``counters`` to the active clients plus those above the floor."""
    sp = SamplingParams(max_tokens=2, ignore_eos=True)
    for cap in (8, 4096):
        e = make_engine("sim", num_blocks=64, block_size=4, max_batch_size=4, fairness=True,
                        fairness_max_idle_clients=cap)
        largest = 0
        for i in range(300):
            e.add_request(Request(f"r{i}", (5, 6, 7), sp, arrival_time=float(i), client_id=f"u{i}"))
            e.step()
            active = {s.client_id for s in e.seqs.values()}
            assert e.fair.size() <= len(active) + 1 + cap
            largest = max(largest, len(e.fair.counters))
        while e.has_unfinished():
            e.step()
        assert largest <= 8, largest  # each client is served as much as the next: idle ones sit at the floor
        if cap == 8:
            assert e.fair.size() <= 8 + 1
        else:
            assert len(e.fair.served) == 300  # kept until the cap: the scheduler polls them


def test_config_validates_the_idle_cap():
    with pytest.raises(ValueError):
        EngineConfig(fairness_max_idle_clients=-1)
    with pytest.raises(ValueError):
        FairShare(max_idle_clients=-1)
    with pytest.raises(ValueError):
        ClusterFairBook(max_idle_clients=-1)


# ----- the cluster book -------------------------------------------------------------------------
def test_cluster_book_stays_bounded_under_many_distinct_clients():
    """Clients come and go across three instances, each with service of its own size: the book
    forgets those at or below the floor at once and, with a cap of 16, the longest idle of the
    rest; it never holds more than the active clients plus 16, and agrees with a book that
    keeps everything on every active client."""
    book, full = ClusterFairBook(max_idle_clients=16), ClusterFairBook(max_idle_clients=None, forget_at_floor=False)
    served: dict[str, dict[str, float]] = {f"i{k}": {} for k in range(3)}
    for n in range(3000):
        iid = f"i{n % 3}"
        clients = {f"u{n}", f"u{n + 1}"}  # a client stays for two polls of one instance
        for c in clients:
            served[iid][c] = served[iid].get(c, 0.0) + 1.0 + (n * 7919 % 13)
        book.observe(iid, served[iid], clients)
        full.observe(iid, served[iid], clients)
        assert len(book.counters) <= len(book.active) + 16
        assert all(book.counters.get(c, 0.0) == full.counters.get(c, 0.0) for c in book.active)
        served[iid] = {c: v for c, v in served[iid].items() if c in clients}  # the engine's book forgets too
    assert len(full.counters) > 2900 and len(book.counters) <= len(book.active) + 16


# ----- the server: client ids as Prometheus labels -----------------------------------------------
def test_prometheus_client_labels_are_capped():
    """Each client id is a label value: past ``MAX_CLIENT_LABELS`` distinct ones, later clients
    are counted under ``other``, so a server with many clients exports a bounded series set."""
    from prometheus_client.parser import text_string_to_metric_families

    from llumnix_py.server.metrics import MAX_CLIENT_LABELS, Metrics

    m = Metrics()
    for i in range(MAX_CLIENT_LABELS + 50):
        m.record_request("finished", 3, 2, client=f"u{i}")
    m.record_request("finished", 3, 2, client="u0")  # a known client keeps its own label
    samples = [s for f in text_string_to_metric_families(generate(m)) if f.name == "llumnix_client_requests"
               for s in f.samples if s.name.endswith("_total")]
    labels = {s.labels["client"]: s.value for s in samples}
    assert len(labels) == MAX_CLIENT_LABELS + 1
    assert labels["other"] == 50 and labels["u0"] == 2


def generate(m) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()
