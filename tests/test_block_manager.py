"""BlockManager: a hypothesis state machine against a model of who owns what."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llumnix_py.engines.block_manager import BlockManager
from llumnix_py.errors import BlockManagerError

OWNERS = [("seq", "a"), ("seq", "b"), ("pre", "a"), ("pre", "c")]


class BlockManagerMachine(RuleBasedStateMachine):
    """Model: owner -> set of block ids. Every misuse must raise and change nothing."""

    @initialize(num_blocks=st.integers(1, 24), data=st.data())
    def setup(self, num_blocks: int, data) -> None:
        watermark = data.draw(st.integers(0, num_blocks - 1), label="watermark")
        self.bm = BlockManager(num_blocks, watermark)
        self.model: dict = {}

    # ----- helpers ---------------------------------------------------------------------
    def snapshot(self):
        bm = self.bm
        return (bm.num_free, bm.owners(), [bm.owner_of(b) for b in range(bm.num_blocks)])

    def owned(self, owner) -> list[int]:
        return sorted(self.model.get(owner, set()))

    def expect_error(self, fn, *args) -> None:
        before = self.snapshot()
        with pytest.raises(BlockManagerError):
            fn(*args)
        assert self.snapshot() == before, "a failed call changed the state"

    def num_model_free(self) -> int:
        return self.bm.num_blocks - sum(len(s) for s in self.model.values())

    # ----- rules -----------------------------------------------------------------------
    @rule(owner=st.sampled_from(OWNERS), n=st.integers(0, 26), respect=st.booleans())
    def allocate(self, owner, n: int, respect: bool) -> None:
        reserve = self.bm.watermark_blocks if respect else 0
        fits = self.num_model_free() - n >= reserve
        assert self.bm.can_allocate(n, respect_watermark=respect) == fits
        before = self.snapshot()
        got = self.bm.allocate(owner, n, respect_watermark=respect)
        if not fits:
            assert got is None
            assert self.snapshot() == before, "a refused allocation changed the state"
            return
        assert got is not None and len(got) == n and len(set(got)) == n
        for b in got:
            assert all(b not in s for s in self.model.values()), f"block {b} handed out twice"
        if n:
            self.model.setdefault(owner, set()).update(got)

    @rule(n=st.integers(-5, -1))
    def allocate_negative(self, n: int) -> None:
        self.expect_error(self.bm.allocate, OWNERS[0], n)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def free_own(self, data) -> None:
        owner = data.draw(st.sampled_from(sorted(o for o, s in self.model.items() if s)), label="owner")
        ids = data.draw(st.lists(st.sampled_from(self.owned(owner)), unique=True), label="ids")
        self.bm.free(owner, ids)
        self.model[owner] -= set(ids)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def double_free(self, data) -> None:
        """Free a block twice in one call, or free a block that is already free."""
        owner = data.draw(st.sampled_from(sorted(o for o, s in self.model.items() if s)), label="owner")
        b = data.draw(st.sampled_from(self.owned(owner)), label="block")
        self.expect_error(self.bm.free, owner, [b, b])
        self.bm.free(owner, [b])
        self.model[owner].discard(b)
        self.expect_error(self.bm.free, owner, [b])

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data(), thief=st.sampled_from(OWNERS))
    def free_someone_elses(self, data, thief) -> None:
        candidates = [(o, b) for o, s in self.model.items() if o != thief for b in s]
        if not candidates:
            return
        _, b = data.draw(st.sampled_from(sorted(candidates)), label="victim block")
        mine = self.owned(thief)
        # A mix of own and foreign blocks: nothing at all may be freed.
        self.expect_error(self.bm.free, thief, mine + [b])

    @rule(owner=st.sampled_from(OWNERS), b=st.integers(-3, 30))
    def free_out_of_range_or_free(self, owner, b: int) -> None:
        if 0 <= b < self.bm.num_blocks and b in self.model.get(owner, set()):
            return  # a legal free; covered by free_own
        self.expect_error(self.bm.free, owner, [b])

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data(), dst=st.sampled_from(OWNERS))
    def transfer(self, data, dst) -> None:
        src = data.draw(st.sampled_from(sorted(o for o, s in self.model.items() if s)), label="src")
        ids = data.draw(st.lists(st.sampled_from(self.owned(src)), unique=True), label="ids")
        self.bm.transfer(ids, src, dst)
        self.model[src] -= set(ids)
        self.model.setdefault(dst, set()).update(ids)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data(), src=st.sampled_from(OWNERS), dst=st.sampled_from(OWNERS))
    def transfer_not_owned(self, data, src, dst) -> None:
        foreign = sorted(b for o, s in self.model.items() if o != src for b in s)
        if not foreign:
            return
        b = data.draw(st.sampled_from(foreign), label="block")
        self.expect_error(self.bm.transfer, self.owned(src) + [b], src, dst)

    # ----- invariants --------------------------------------------------------------------
    @invariant()
    def books_balance(self) -> None:
        bm = self.bm
        bm.check_invariants()
        assert bm.num_free + bm.num_used == bm.num_blocks
        assert bm.owners() == {o: len(s) for o, s in self.model.items() if s}
        for o, s in self.model.items():
            assert bm.num_owned(o) == len(s)
            for b in s:
                assert bm.owner_of(b) == o
        assert bm.num_free == self.num_model_free()


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_block_zero_is_handed_out_first_and_free_is_lifo():
    bm = BlockManager(4)
    assert bm.allocate("x", 2) == [0, 1]
    bm.free("x", [1])
    assert bm.allocate("y", 1) == [1]
    bm.check_invariants()


def test_watermark_only_binds_admissions():
    bm = BlockManager(10, watermark_blocks=3)
    assert bm.allocate("x", 8) is None
    assert bm.num_free == 10
    assert bm.allocate("x", 7) is not None
    assert bm.allocate("y", 1) is None
    got = bm.allocate("y", 3, respect_watermark=False)
    assert got is not None and len(got) == 3
    assert bm.num_free == 0
    assert bm.allocate("y", 1, respect_watermark=False) is None
    bm.check_invariants()


@pytest.mark.parametrize("num_blocks, watermark", [(0, 0), (-1, 0), (4, 4), (4, -1)])
def test_bad_construction(num_blocks, watermark):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, watermark)
