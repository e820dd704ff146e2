"""Swap preemption: KV to the host pool and back, exact tokens, both pools' books."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.engines.block_manager import copy_runs
from llumnix_py.engines.core import EngineConfig
from llumnix_py.engines.sim.profiles import LLAMA_7B_A10
from llumnix_py.errors import BlockManagerError, UnknownPolicyError
from policies.registry import PREEMPTION_MODE
from policies.switching import PreemptionMode, SwitchCosts, SwitchView, by_cost, recompute_time, swap_time
from tests.factories import make_engine, make_requests, run_engine, run_to_completion


def swaps(res) -> int:
    return sum(len(s.preempted) for s in res.steps)


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
@pytest.mark.parametrize("grouped", [True, False])
def test_swapped_requests_resume_with_the_tokens_of_an_unpreempted_run(sampling, grouped):
    requests = make_requests(5, seed=23, sampling=sampling, max_tokens=20, prompt_len=(6, 14))
    small = make_engine(dtype="float64", num_blocks=14, block_size=4, watermark=0.0, num_host_blocks=40,
                        preemption_mode="swap", group_copies=grouped)
    res = run_engine(small, requests=requests)  # checks both pools' invariants after every step
    assert swaps(res) > 0, "the small engine never preempted; shrink it"
    meter = small.swapper.meter
    assert meter.copies > 0 and meter.blocks_copied > 0, "preemptions recomputed instead of swapping"
    if not grouped:
        assert set(meter.run_sizes) == {1}
    assert small.host is not None and small.host.num_free == small.host.num_blocks
    large = run_to_completion(make_engine(dtype="float64", num_blocks=256, block_size=4), requests=requests)
    assert res.tokens == large
    assert all(len(t) == 20 for t in large.values())


def test_a_swapped_request_prefills_nothing_when_it_resumes():
    """The swap-in is a decode: no prompt token is fed again (a recompute feeds them all)."""
    requests = make_requests(4, seed=5, max_tokens=24, prompt_len=(10, 12))
    fed = {}
    for mode in ("swap", "recompute"):
        e = make_engine(dtype="float64", num_blocks=12, block_size=4, watermark=0.0, num_host_blocks=40,
                        preemption_mode=mode)
        res = run_engine(e, requests=requests)
        assert swaps(res) > 0
        fed[mode] = sum(s.num_prefill_tokens for s in res.steps)
    prompts = sum(len(r.prompt_token_ids) for r in requests)
    assert fed["swap"] == prompts
    assert fed["recompute"] > prompts


def test_full_host_pool_falls_back_to_recompute_with_exact_tokens():
    requests = make_requests(5, seed=23, max_tokens=20, prompt_len=(6, 14))
    e = make_engine(dtype="float64", num_blocks=14, block_size=4, watermark=0.0, num_host_blocks=2,
                    preemption_mode="swap")
    res = run_engine(e, requests=requests)
    assert swaps(res) > 0
    large = run_to_completion(make_engine(dtype="float64", num_blocks=256, block_size=4), requests=requests)
    assert res.tokens == large


def test_abort_of_a_swapped_request_frees_its_host_blocks():
    requests = make_requests(5, seed=23, max_tokens=20, prompt_len=(6, 14))
    e = make_engine(num_blocks=14, block_size=4, watermark=0.0, num_host_blocks=40, preemption_mode="swap")
    for r in requests:
        e.add_request(r)
    for _ in range(200):
        e.step()
        swapped = [s for s in e.seqs.values() if s.host_table]
        if swapped:
            break
    assert swapped, "nothing was swapped out"
    assert e.host.num_used == len(swapped[0].host_table) + sum(len(s.host_table) for s in swapped[1:])
    for s in swapped:
        e.abort_request(s.request_id)
    e.check_invariants()
    assert e.host.num_used == 0


def test_sim_engine_charges_swap_copies_to_the_step():
    """A step's duration is its model time plus the cost-model time of its copies."""
    requests = make_requests(5, seed=23, max_tokens=20, prompt_len=(6, 14))
    e = make_engine("sim", num_blocks=14, block_size=4, watermark=0.0, num_host_blocks=40, preemption_mode="swap")
    ex = e.executor
    times: list[float] = []
    model_time, copy_out, copy_in = ex.execute, ex.swap_out, ex.swap_in

    def execute(work):
        tokens, d = model_time(work)
        times.append(d)
        return tokens, d

    def timed(copy):
        def run(runs):
            d = copy(runs)
            times.append(d)
            return d
        return run

    ex.execute, ex.swap_out, ex.swap_in = execute, timed(copy_out), timed(copy_in)
    for r in requests:
        e.add_request(r)
    swapped_steps, copy_s = 0, 0.0
    while e.has_unfinished():
        times.clear()
        out = e.step()
        assert out.duration_s == pytest.approx(sum(times))
        swapped_steps += len(times) > 1
        copy_s += out.duration_s - (times[-1] if out.num_prefill_tokens or out.num_decode_tokens else 0.0)
    assert swapped_steps > 0 and e.swapper.meter.copies > 0
    # The stall meter: the steps' time spent on copies, every copy's and nothing else; the
    # engine's load reports it (the scheduler's state and /metrics carry it on).
    assert e.swapper.meter.stall_s == pytest.approx(copy_s) and copy_s > 0
    assert e.load().kv_copy_stall_s == e.swapper.meter.stall_s


def test_host_copy_time_is_overhead_per_copy_plus_bytes_over_the_link():
    p = LLAMA_7B_A10
    one = p.host_copy_time(16, 1)
    many = p.host_copy_time(16, 16)
    assert many - one == pytest.approx(15 * p.hw.host_copy_overhead_s)
    assert p.host_copy_time(32, 1) - one == pytest.approx(16 * p.kv_block_bytes / (p.hw.host_link_gbps * 1e9))


def test_copy_runs_merge_contiguous_blocks_only_when_grouped():
    assert copy_runs([4, 5, 6, 9, 10], [0, 1, 2, 3, 4]) == [(4, 0, 3), (9, 3, 2)]
    assert copy_runs([4, 5, 6], [0, 1, 2], grouped=False) == [(4, 0, 1), (5, 1, 1), (6, 2, 1)]
    assert copy_runs([1, 2], [5, 4]) == [(1, 5, 1), (2, 4, 1)]
    with pytest.raises(BlockManagerError):
        copy_runs([1, 2], [3])


def test_config_rejects_unknown_mode_and_negative_host_pool():
    with pytest.raises(UnknownPolicyError):
        EngineConfig(preemption_mode="teleport")
    with pytest.raises(ValueError):
        EngineConfig(num_host_blocks=-1)


# ----- the mode policies, as pure functions -----------------------------------------------------
costs_st = st.builds(SwitchCosts, copy_overhead_s=st.floats(0, 1e-3), host_link_bytes_per_s=st.floats(1e6, 1e11),
                     recompute_s_per_token=st.floats(0, 1e-2), block_bytes=st.integers(0, 1 << 24))


@st.composite
def views(draw):
    blocks = draw(st.integers(0, 64))
    return SwitchView(request_id="r", num_tokens=draw(st.integers(blocks, blocks * 16 + 1)), num_blocks=blocks,
                      num_copies=draw(st.integers(min(blocks, 1), max(blocks, 1))),
                      host_free_blocks=draw(st.integers(0, 128)))


@settings(max_examples=200, deadline=None)
@given(view=views(), costs=costs_st)
def test_cost_policy_swaps_exactly_when_it_fits_and_is_cheaper(view, costs):
    mode = by_cost(view, costs)
    fits = 0 < view.num_blocks <= view.host_free_blocks
    cheaper = swap_time(view, costs) < recompute_time(view, costs)
    assert (mode == PreemptionMode.SWAP) == (fits and cheaper)
    assert PREEMPTION_MODE.get("recompute")(view, costs) == PreemptionMode.RECOMPUTE
    assert (PREEMPTION_MODE.get("swap")(view, costs) == PreemptionMode.SWAP) == fits


@settings(max_examples=100, deadline=None)
@given(view=views(), costs=costs_st)
def test_fewer_copies_never_make_a_swap_dearer(view, costs):
    """Grouping (fewer, larger copies) can only move the decision towards swapping."""
    grouped = SwitchView(view.request_id, view.num_tokens, view.num_blocks, min(view.num_copies, 1),
                         view.host_free_blocks)
    assert swap_time(grouped, costs) <= swap_time(view, costs)
    if by_cost(view, costs) == PreemptionMode.SWAP:
        assert by_cost(grouped, costs) == PreemptionMode.SWAP


def test_block_groups_cut_the_copies_of_the_same_swaps():
    """The same workload swaps the same blocks; with groups they move in fewer, larger copies."""
    requests = make_requests(6, seed=8, max_tokens=30, prompt_len=(20, 40))
    meters, sizes = {}, {}
    for groups in (True, False):
        e = make_engine("sim", num_blocks=40, block_size=4, watermark=0.0, num_host_blocks=200,
                        preemption_mode="swap", block_groups=groups, group_copies=groups)
        seen: dict[int, int] = {}
        for r in requests:
            e.add_request(r)
        while e.has_unfinished():
            e.step()
            e.check_invariants()
            for n, c in e.group_sizes().items():
                seen[n] = seen.get(n, 0) + c
        meters[groups], sizes[groups] = e.swapper.meter, seen
    assert meters[True].blocks_copied > 0 and meters[False].blocks_copied > 0
    assert meters[False].copies == meters[False].blocks_copied  # one copy per block
    assert meters[True].copies < meters[False].copies
    assert max(sizes[True]) > 1 and max(sizes[False]) >= 1
