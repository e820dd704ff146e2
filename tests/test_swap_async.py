"""Asynchronous swapping: copies on a copier beside the steps, with an injected gated copier.

``GatedCopier`` holds every copy until the test releases it (or the engine waits on
it, which forces it: an engine that must wait for a copy blocks until it lands). So a
swap-in stays in flight for as many steps as the test likes, with no sleeps, and a
recording executor checks that no step ever touches a block whose copy is in flight.
"""

from __future__ import annotations

from typing import Optional

import pytest

from llumnix_py.engines.copier import Copier, CopyTicket, ThreadCopier, VirtualCopier
from llumnix_py.engines.core import EngineCore
from llumnix_py.engines.types import Request, SamplingParams
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


def watch_blocks(engine: EngineCore, touched: list, flights: Optional[list] = None) -> None:
    """Record every step's block tables (and in ``flights`` the blocks copies held while it
    ran), and fail if one holds a block still being copied."""
    execute = engine.executor.execute_full

    def checked(work):
        in_flight = engine.swapper.device_blocks_in_flight()
        used = {b for w in work for b in w.block_table}
        assert not used & in_flight, f"the step reads blocks {sorted(used & in_flight)} still in flight"
        running = {w.request_id for w in work}
        assert not running & set(engine.swapper.landing), "a request ran before its swap-in landed"
        touched.append(used)
        if flights is not None:
            flights.append(in_flight)
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
    total, toks, stalls = {}, {}, {}
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
        stalls[asynchronous] = e.swapper.meter.stall_s
    assert toks[True] == toks[False]
    assert all(len(t) == 40 for t in toks[True].values())
    assert total[True] < total[False]
    assert 0 < stalls[True] < stalls[False]  # the overlap is time the steps no longer stall


def test_a_finished_request_never_waits():
    requests = make_requests(2, seed=1, max_tokens=3)
    engine, _ = gated_engine()
    res = run_to_completion(engine, requests=requests)
    assert set(res) == {"r0", "r1"}


# ----- a conversation's stored turn: the store and the restore are copies on the link too -------
def _conversation_engine():
    base = make_engine(dtype="float64", num_blocks=40, block_size=4, watermark=0.0, num_host_blocks=60,
                       conversation_host_blocks=40, async_swap=True)
    gate = GatedCopier()
    return EngineCore(base.config, base.executor, copier=gate), gate


def _turns():
    """A long request that decodes throughout, a first turn, and (from the first turn's
    tokens, once known) the second turn's prompt."""
    bg = Request("bg", tuple(range(3, 11)), SamplingParams(max_tokens=60, ignore_eos=True))
    t1 = Request("t1", tuple(range(40, 53)), SamplingParams(max_tokens=10, ignore_eos=True), conversation_id="c")
    return bg, t1, lambda out1: Request("t2", t1.prompt_token_ids + tuple(out1) + (7, 8, 9, 10, 11),
                                        SamplingParams(max_tokens=10, ignore_eos=True), conversation_id="c")


def test_a_turns_store_and_restore_overlap_steps_and_never_race_them():
    """The finished turn's store and the next turn's restore wait on the gated link while
    another request decodes: no step touches a block either copy holds, the new turn does not
    run before its prefix has landed, it prefills only its new tokens, and every token is
    the one a run without reuse gives."""
    bg, t1, second = _turns()
    ref = make_engine(dtype="float64", num_blocks=256, block_size=4)
    expected = run_to_completion(ref, requests=[bg, t1])
    t2 = second(expected["t1"])
    expected.update(run_to_completion(make_engine(dtype="float64", num_blocks=256, block_size=4), requests=[t2]))

    engine, gate = _conversation_engine()
    touched: list = []
    flights: list = []
    watch_blocks(engine, touched, flights)
    engine.add_request(bg)
    engine.add_request(t1)
    got: dict[str, list[int]] = {}
    fed: dict[str, int] = {}

    def step():
        out = engine.step()
        engine.check_invariants()
        for o in out.outputs:
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out

    while "t1" in engine.seqs:
        step()
    store_blocks = engine.swapper.device_blocks_in_flight()
    assert store_blocks, "the finished turn's store is not queued on the link"
    out = step()  # bg decodes beside the store (the watch fails the step if it touched a stored block)
    assert out.outputs and "bg" in engine.seqs and flights[-1] & store_blocks, "no step ran beside the store"
    assert not engine.swapper.device_blocks_in_flight(), "a step returned with a store still reading its blocks"
    engine.add_request(t2)
    out = step()
    assert "t2" in engine.swapper.landing and engine.seqs["t2"] in engine.scheduler.landing
    assert out.num_prefill_tokens == 0, "the new turn prefilled before its prefix landed"
    held = 0
    while engine.has_unfinished():
        if "t2" in engine.swapper.landing:
            held += 1
            if held % 2 == 0:
                gate.release()
        out = step()
        if out.num_prefill_tokens:
            fed["t2"] = out.num_prefill_tokens
    assert held >= 2, "the restore never waited on the link beside a step"
    kept = (len(t1.prompt_token_ids) + 10 - 1) // 4
    assert engine.conversations.restored_tokens == kept * 4
    assert fed["t2"] == len(t2.prompt_token_ids) - kept * 4, "the second turn prefilled more than its new tokens"
    assert got == expected
    assert engine.blocks.num_used == 0


def test_abort_of_a_restoring_turn_lets_its_copy_land_then_frees_its_blocks():
    bg, t1, second = _turns()
    engine, gate = _conversation_engine()
    engine.add_request(bg)
    engine.add_request(t1)
    got: dict[str, list[int]] = {}
    while "t1" in engine.seqs:
        for o in engine.step().outputs:
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    engine.add_request(second(got["t1"]))
    engine.step()
    assert "t2" in engine.swapper.landing
    assert engine.freeze("t2") is None  # its blocks are being written: it cannot migrate yet
    engine.abort_request("t2")
    engine.check_invariants()
    assert "t2" not in engine.seqs and "t2" not in engine.swapper.landing
    while engine.has_unfinished():
        engine.step()
        engine.check_invariants()
    engine.close()
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_thread_copier_reuses_a_conversation_with_exact_tokens(sampling):
    """The same turns on the real copy thread, against a run without reuse."""
    sp = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True) \
        if sampling == "seeded" else SamplingParams(max_tokens=10, ignore_eos=True)
    engine = make_engine(dtype="float64", num_blocks=40, block_size=4, watermark=0.0, num_host_blocks=60,
                         conversation_host_blocks=40, async_swap=True)
    fresh = make_engine(dtype="float64", num_blocks=256, block_size=4)
    assert isinstance(engine.swapper.copier, ThreadCopier)
    history: tuple[int, ...] = ()
    try:
        for turn in range(3):
            req = Request(f"t{turn}", history + tuple(range(20 + turn, 29 + turn)), sp, conversation_id="c")
            got = run_to_completion(engine, requests=[req])
            assert got == run_to_completion(fresh, requests=[req])
            engine.check_invariants()
            history = req.prompt_token_ids + tuple(got[req.request_id])
    finally:
        engine.close()
    assert engine.conversations.restored_tokens > 0


def test_sim_copies_go_on_while_the_engine_idles():
    """A finished turn's store queued on the virtual link lands while the engine sits idle
    (``EngineCore.idle``): the next turn's first step waits only for its own restore."""
    first = {}
    for idles in (False, True):
        e = make_engine("sim", num_blocks=64, block_size=4, watermark=0.0, num_host_blocks=200,
                        conversation_host_blocks=100, async_swap=True)
        t1 = Request("t1", tuple(range(5, 105)), SamplingParams(max_tokens=8, ignore_eos=True), conversation_id="c")
        out1 = run_to_completion(e, requests=[t1])["t1"]
        assert e.swapper.device_blocks_in_flight(), "the turn's store is not on the link"
        if idles:
            e.idle(30.0)
        e.add_request(Request("t2", t1.prompt_token_ids + tuple(out1) + (1, 2, 3),
                              SamplingParams(max_tokens=4, ignore_eos=True), conversation_id="c"))
        first[idles] = e.step().duration_s  # nothing runs: it waits for the link
        assert e.swapper.meter.stall_s == first[idles]  # that wait is the step's stall, all of it
        run_to_completion(e)
        e.check_invariants()
        assert e.conversations.restored_tokens > 0
    assert 0 < first[True] < first[False]


def test_aborting_a_landing_request_lands_the_copies_queued_before_it():
    """Waiting for an aborted request's copy lands every copy ahead of it on the link; those
    requests become runnable too (they were once lost: out of the link's books, never run)."""
    engine, gate = _conversation_engine()
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    firsts = [Request(f"{c}1", tuple(range(10 + i, 23 + i)), sp, conversation_id=c) for i, c in enumerate("ab")]
    got = run_to_completion(engine, requests=firsts)
    while gate.pending:
        gate.release()
    seconds = [Request(f"{r.conversation_id}2", r.prompt_token_ids + tuple(got[r.request_id]) + (5, 6), sp,
                       conversation_id=r.conversation_id) for r in firsts]
    engine.add_request(Request("bg", (1, 2, 3), SamplingParams(max_tokens=30, ignore_eos=True)))
    engine.step()  # bg runs, so the next steps need not wait for the link
    for r in seconds:
        engine.add_request(r)
    engine.step()
    assert {"a2", "b2"} <= set(engine.swapper.landing), "both restores should be on the link"
    engine.abort_request("b2")  # queued after a2's restore: waiting for it lands a2's too
    engine.check_invariants()
    done = run_to_completion(engine)
    assert done.get("a2") == run_to_completion(make_engine(dtype="float64", num_blocks=256, block_size=4),
                                               requests=[seconds[0]])["a2"]
    engine.check_invariants()
    assert engine.blocks.num_used == 0
