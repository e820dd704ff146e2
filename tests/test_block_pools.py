"""Two block pools (device and host swap pool) with block groups, swaps and frees.

A hypothesis state machine over two ``BlockManager``s driven the way the engine
drives them: requests grow their block table (group growth after their last block),
swap out (device blocks -> host blocks) and back in, and finish. Invariant on each
pool: every block is owned by exactly one request or free; a request's blocks live
on one pool at a time; with groups, an allocation that has a free run of its size
gets a run.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llumnix_py.engines.block_manager import BlockManager, copy_runs

REQUESTS = ["a", "b", "c", "d"]


def has_free_run(bm: BlockManager, n: int) -> bool:
    free = [bm.owner_of(b) is None for b in range(bm.num_blocks)]
    return any(all(free[i:i + n]) for i in range(bm.num_blocks - n + 1))


class TwoPoolMachine(RuleBasedStateMachine):
    @initialize(dev_blocks=st.integers(1, 24), host_blocks=st.integers(1, 24), groups=st.booleans())
    def setup(self, dev_blocks: int, host_blocks: int, groups: bool) -> None:
        self.dev = BlockManager(dev_blocks, groups=groups)
        self.host = BlockManager(host_blocks, groups=groups)
        self.groups = groups
        self.on_dev: dict[str, list[int]] = {}  # the model: request -> block table per pool
        self.on_host: dict[str, list[int]] = {}

    @rule(r=st.sampled_from(REQUESTS), n=st.integers(1, 8))
    def grow(self, r: str, n: int) -> None:
        if r in self.on_host:
            return  # a swapped request does not grow
        table = self.on_dev.get(r, [])
        last = table[-1] if table else None
        free_after = last is not None and all(
            last + k < self.dev.num_blocks and self.dev.owner_of(last + k) is None for k in range(1, n + 1))
        run_exists = has_free_run(self.dev, n)
        got = self.dev.allocate(("seq", r), n, after=last)
        if got is None:
            assert self.dev.num_free < n
            return
        assert len(got) == n and not set(got) & {b for t in self.on_dev.values() for b in t}
        if self.groups and free_after:
            assert got == list(range(last + 1, last + 1 + n)), "the group did not grow in place"
        elif self.groups and run_exists and n > 1:
            assert got == list(range(got[0], got[0] + n)), "a free run existed but blocks came scattered"
        self.on_dev[r] = table + got

    @precondition(lambda self: any(self.on_dev.values()))
    @rule(data=st.data())
    def swap_out(self, data) -> None:
        r = data.draw(st.sampled_from(sorted(k for k, v in self.on_dev.items() if v)))
        dev_ids = self.on_dev[r]
        host_ids = self.host.allocate(("swap", r), len(dev_ids))
        if host_ids is None:
            assert self.host.num_free < len(dev_ids)
            return
        runs = copy_runs(dev_ids, host_ids)
        assert sum(n for _, _, n in runs) == len(dev_ids)
        assert [s + k for s, _, n in runs for k in range(n)] == dev_ids
        assert [d + k for _, d, n in runs for k in range(n)] == host_ids
        self.dev.free(("seq", r), dev_ids)
        del self.on_dev[r]
        self.on_host[r] = host_ids

    @precondition(lambda self: any(self.on_host.values()))
    @rule(data=st.data())
    def swap_in(self, data) -> None:
        r = data.draw(st.sampled_from(sorted(self.on_host)))
        host_ids = self.on_host[r]
        dev_ids = self.dev.allocate(("seq", r), len(host_ids))
        if dev_ids is None:
            return
        self.host.free(("swap", r), host_ids)
        del self.on_host[r]
        self.on_dev[r] = dev_ids

    @rule(r=st.sampled_from(REQUESTS))
    def finish(self, r: str) -> None:
        if r in self.on_dev:
            self.dev.free(("seq", r), self.on_dev.pop(r))
        if r in self.on_host:
            self.host.free(("swap", r), self.on_host.pop(r))

    @invariant()
    def each_pool_balances(self) -> None:
        if not hasattr(self, "dev"):
            return
        for bm, model, kind in ((self.dev, self.on_dev, "seq"), (self.host, self.on_host, "swap")):
            bm.check_invariants()
            assert bm.owners() == {(kind, r): len(t) for r, t in model.items() if t}
            for r, t in model.items():
                assert all(bm.owner_of(b) == (kind, r) for b in t)
            assert bm.num_free == bm.num_blocks - sum(len(t) for t in model.values())
        assert not set(self.on_dev) & set(self.on_host), "a request holds blocks on both pools"


TestTwoPoolMachine = TwoPoolMachine.TestCase
TestTwoPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_groups_fall_back_to_single_blocks_when_fragmented():
    bm = BlockManager(8)
    assert bm.allocate("x", 8) == list(range(8))
    bm.free("x", [1, 3, 5, 7])
    got = bm.allocate("y", 3)
    assert got is not None and len(got) == 3 and set(got) <= {1, 3, 5, 7}
    assert bm.runs_of(got) == [1, 1, 1]
    bm.check_invariants()


def test_groups_take_a_free_run_and_grow_in_place():
    bm = BlockManager(10)
    bm.allocate("x", 3)  # 0 1 2
    bm.allocate("y", 1)  # off the stack: 3
    bm.free("x", [0, 1, 2])
    got = bm.allocate("z", 4)
    assert got == [4, 5, 6, 7]  # the first free run of 4
    assert bm.allocate("z", 2, after=7) == [8, 9]
    assert bm.runs_of([4, 5, 6, 7, 8, 9]) == [6]


def test_without_groups_blocks_come_off_the_stack():
    bm = BlockManager(6, groups=False)
    bm.allocate("x", 2)
    bm.free("x", [0])
    assert bm.allocate("y", 2) == [0, 2]
