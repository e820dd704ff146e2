"""Grouped migration copies (issue 17, item 2): the built-in engine reads a migration frame and
writes it back with one copy per contiguous run of blocks, not one per block, and the KV
that lands is exactly what a block-by-block gather would give."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.engines.block_manager import copy_runs
from llumnix_py.engines.sequence import cdiv
from llumnix_py.engines.torch_engine.executor import MIN_MEAN_RUN
from llumnix_py.engines.types import Request, SamplingParams
from tests.factories import make_engine

NUM_BLOCKS = 48


def copies(runs, n: int) -> int:
    """One copy per run where runs hold ``MIN_MEAN_RUN`` blocks on average, else one per block."""
    return len(runs) if len(runs) * MIN_MEAN_RUN <= n else n


def filled(engine) -> None:
    """Every block of the pool holds distinct values (its id, position by position)."""
    kv = engine.executor.kv
    kv.copy_(torch.arange(kv.numel(), dtype=kv.dtype).view_as(kv))


@settings(max_examples=60, deadline=None)
@given(starts=st.lists(st.tuples(st.integers(0, NUM_BLOCKS - 1), st.integers(1, 8)), min_size=1, max_size=5),
       data=st.data())
def test_read_and_write_move_exactly_the_named_blocks_one_copy_per_run(starts, data):
    a, b = make_engine(num_blocks=NUM_BLOCKS, block_size=4), make_engine(num_blocks=NUM_BLOCKS, block_size=4)
    filled(a)
    src = list(dict.fromkeys(x for s, n in starts for x in range(s, min(s + n, NUM_BLOCKS))))  # runs, overlaps merged
    dst = data.draw(st.one_of(st.just(list(range(NUM_BLOCKS - len(src), NUM_BLOCKS))),  # one group
                              st.permutations(range(NUM_BLOCKS)).map(lambda p: p[:len(src)])))
    before = b.executor.kv.clone()
    frame = a.read_blocks(src)
    assert torch.equal(frame, a.executor.kv[torch.tensor(src)])  # what a per-block gather gives
    assert a.executor.migration_copies == copies(copy_runs(src, range(len(src))), len(src))
    b.write_blocks(dst, frame)
    assert b.executor.migration_copies == copies(copy_runs(range(len(dst)), dst), len(dst))
    expected = before.clone()
    expected[torch.tensor(dst)] = frame
    assert torch.equal(b.executor.kv, expected)  # the named blocks, nothing else


def test_a_migrated_request_whose_blocks_form_one_group_moves_in_one_copy_a_side():
    """A request admitted alone gets one contiguous group: its migration is one read copy and one
    write copy (per-block copies: as many as its blocks), and its tokens continue exactly."""
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    req = Request("r", tuple(range(1, 30)), sp)
    ref = make_engine(dtype="float64", num_blocks=NUM_BLOCKS, block_size=4)
    ref.add_request(req)
    want = []
    while ref.has_unfinished():
        want += [t for o in ref.step().outputs for t in o.new_token_ids]
    src = make_engine(dtype="float64", num_blocks=NUM_BLOCKS, block_size=4)
    dst = make_engine(dtype="float64", num_blocks=NUM_BLOCKS, block_size=4)
    dst.add_request(Request("other", (5, 6, 7), SamplingParams(max_tokens=2, ignore_eos=True)))
    dst.step()  # the destination's pool is not empty: the reservation starts past its blocks
    src.add_request(req)
    got = []
    for _ in range(3):
        got += [t for o in src.step().outputs for t in o.new_token_ids]
    state = src.freeze("r")
    blocks = src.incremental_blocks("r", 0, include_last=True)
    assert len(blocks) >= 8 and src.blocks.runs_of(blocks) == [len(blocks)]  # one group
    ids = dst.pre_alloc("r", cdiv(state.num_computed_tokens, 4))
    assert dst.blocks.runs_of(ids) == [len(ids)]
    dst.write_blocks(ids, src.read_blocks(blocks))
    assert (src.executor.migration_copies, dst.executor.migration_copies) == (1, 1)  # was len(blocks) each
    dst.commit_dst(state)
    src.free_src("r")
    while dst.has_unfinished():
        got += [t for o in dst.step().outputs if o.request_id == "r" for t in o.new_token_ids]
        dst.check_invariants()
    assert got == want
