"""Asynchronous swapping: copies on a copier beside the steps, with an injected gated copier.

``GatedCopier`` holds every copy until the test releases it (or the engine waits on
it, which forces it: an engine that must wait for a copy blocks until it lands). So a
swap-in stays in flight for as many steps as the test likes, with no sleeps, and a
recording executor checks that no step ever touches a block whose copy is in flight.
"""

from __future__ import annotations

import pytest

from llumnix_py.engines.copier import Copier, CopyTicket, ThreadCopier, VirtualCopier
from llumnix_py.engines.core import EngineCore
from tests.factories import make_engine, make_requests, run_to_completion


class GatedTicket(CopyTicket):
    def __init__(self, copier: "GatedCopier", fn) -> None:
        self.copier, self.fn, self.landed, self._seconds = copier, fn, False, 0.0

    def run(self) -> None:
        self._seconds = self.fn()
        self.landed = True

    def done(self) -> bool:
        return self.landed

    def wait(self) -> float:
        while not self.landed:  # in FIFO order, as a copy link would
            self.copier.release()
        return 0.0

    @property
    def seconds(self) -> float:
        return self._seconds


class GatedCopier(Copier):
    def __init__(self) -> None:
        self.pending: list[GatedTicket] = []
        self.submitted = 0

    def submit(self, fn) -> CopyTicket:
        t = GatedTicket(self, fn)
        self.pending.append(t)
        self.submitted += 1
        return t

    def release(self) -> None:
        self.pending.pop(0).run()


def gated_engine(**kw):
    base = make_engine(dtype="float64", num_blocks=14, block_size=4, watermark=0.0, num_host_blocks=40,
                       preemption_mode="swap", async_swap=True, **kw)
    gate = GatedCopier()
    return EngineCore(base.config, base.executor, copier=gate), gate


def watch_blocks(engine: EngineCore, touched: list) -> None:
    """Record every step's block tables, and fail if one holds a block still being copied."""
    execute = engine.executor.execute_full

    def checked(work):
        in_flight = {b for ticket, runs in engine.swapper.landing.values() for _, d, n in runs
                     for b in range(d, d + n)}
        used = {b for w in work for b in w.block_table}
        assert not used & in_flight, f"the step reads blocks {sorted(used & in_flight)} still in flight"
        running = {w.request_id for w in work}
        assert not running & set(engine.swapper.landing), "a request ran before its swap-in landed"
        touched.append(used)
        return execute(work)

    engine.executor.execute_full = checked


def test_a_swapped_in_request_waits_for_its_copy_and_resumes_exactly():
    requests = make_requests(5, seed=23, max_tokens=20, prompt_len=(6, 14))
    engine, gate = gated_engine()
    touched: list = []
    watch_blocks(engine, touched)
    for r in requests:
        engine.add_request(r)
    tokens: dict[str, list[int]] = {}
    held_steps = 0
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        out = engine.step()
        engine.check_invariants()
        for o in out.outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        if engine.swapper.landing and engine.scheduler.running:
            held_steps += 1  # a step ran while a swap-in was in flight
            if held_steps % 3 == 0:
                gate.release()  # let one copy land every third such step
    assert not engine.has_unfinished()
    assert held_steps > 0, "no step ran beside a swap-in; the gate never held one"
    assert gate.submitted > 0 and touched
    large = run_to_completion(make_engine(dtype="float64", num_blocks=256, block_size=4), requests=requests)
    assert tokens == large


def test_abort_of_a_landing_request_lets_the_copy_land_then_frees_both_pools():
    requests = make_requests(5, seed=23, max_tokens=20, prompt_len=(6, 14))
    engine, gate = gated_engine()
    for r in requests:
        engine.add_request(r)
    for _ in range(500):
        engine.step()
        if engine.swapper.landing:
            break
    assert engine.swapper.landing, "no swap-in was ever in flight"
    rid = next(iter(engine.swapper.landing))
    assert engine.freeze(rid) is None  # cannot migrate while its blocks are being written
    engine.abort_request(rid)
    engine.check_invariants()
    assert rid not in engine.seqs and rid not in engine.swapper.landing
    while engine.has_unfinished():
        engine.step()
        engine.check_invariants()
    assert engine.blocks.num_used == 0 and engine.host.num_used == 0


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_thread_copier_gives_exact_tokens(sampling):
    requests = make_requests(5, seed=23, sampling=sampling, max_tokens=20, prompt_len=(6, 14))
    engine = make_engine(dtype="float64", num_blocks=14, block_size=4, watermark=0.0, num_host_blocks=40,
                         preemption_mode="swap", async_swap=True)
    assert isinstance(engine.swapper.copier, ThreadCopier)
    try:
        for r in requests:
            engine.add_request(r)
        got = {}
        while engine.has_unfinished():
            for o in engine.step().outputs:
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
            engine.check_invariants()
    finally:
        engine.close()
    assert engine.swapper.meter.copies > 0
    large = run_to_completion(make_engine(dtype="float64", num_blocks=256, block_size=4), requests=requests)
    assert got == large


def test_sim_async_swap_overlaps_copies_with_steps():
    """On the virtual clock, asynchronous swaps cost less step time than synchronous ones,
    and the sim engine's tokens do not depend on it."""
    requests = make_requests(8, seed=3, max_tokens=40, prompt_len=(30, 60))
    total, toks = {}, {}
    for asynchronous in (False, True):
        e = make_engine("sim", num_blocks=30, block_size=4, watermark=0.0, num_host_blocks=400,
                        preemption_mode="swap", async_swap=asynchronous)
        if asynchronous:
            assert isinstance(e.swapper.copier, VirtualCopier)
        for r in requests:
            e.add_request(r)
        total[asynchronous], toks[asynchronous] = 0.0, {}
        while e.has_unfinished():
            out = e.step()
            total[asynchronous] += out.duration_s
            for o in out.outputs:
                toks[asynchronous].setdefault(o.request_id, []).extend(o.new_token_ids)
            e.check_invariants()
        assert e.swapper.meter.copies > 0
    assert toks[True] == toks[False]
    assert all(len(t) == 40 for t in toks[True].values())
    assert total[True] < total[False]


def test_a_finished_request_never_waits():
    requests = make_requests(2, seed=1, max_tokens=3)
    engine, _ = gated_engine()
    res = run_to_completion(engine, requests=requests)
    assert set(res) == {"r0", "r1"}
