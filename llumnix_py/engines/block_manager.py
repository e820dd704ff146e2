"""Paged KV-cache block accounting: which block belongs to whom.

Every block is either free or owned by exactly one owner. Owners are
``("seq", request_id)`` for a request's block table and ``("pre", request_id)``
for blocks pre-allocated on a migration destination. All operations are O(1)
per block: the free list is a stack and ownership an array.

Block groups (FastSwitch, Shen, Li and Gao, arXiv:2411.18424, Section 4.1, the
"dynamic block group manager"): with ``groups=True`` an allocation of ``n`` blocks
takes ``n`` contiguous free blocks when such a run exists (first fit, found in C by
``bytearray.find`` over a free map), and a request that grows takes the blocks right
after its last one when they are free; only when memory is too fragmented does it
fall back to single blocks off the free stack. Contiguous blocks are contiguous
memory in the block-major KV tensor, so a group moves in one copy::

    free map  1 1 0 0 1 1 1 1 0 1      allocate(4) -> blocks 4 5 6 7 (one group)
    grow after 7: block 8 is taken, so the next block comes off the stack

Taking a given free block out of the stack is O(1) too: each free block knows its
position in the stack, and the last entry fills its slot.

Shortage is a value (``allocate`` returns ``None``); misuse raises
``BlockManagerError`` (freeing a free block, or a block owned by someone else).
"""

from __future__ import annotations

from typing import Hashable, Iterable, Optional

from llumnix_py.errors import BlockManagerError

Owner = Hashable


class BlockManager:
    """Tracks ownership of ``num_blocks`` KV blocks.

    Args:
        num_blocks: blocks in the pool.
        watermark_blocks: blocks that admissions (new prefills, migration
            pre-allocations) must leave free, so running requests can keep
            decoding; decode appends may dip into them.
    """

    def __init__(self, num_blocks: int, watermark_blocks: int = 0, groups: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if not 0 <= watermark_blocks < num_blocks:
            raise ValueError(f"watermark_blocks must be in [0, {num_blocks}), got {watermark_blocks}")
        self.num_blocks = num_blocks
        self.watermark_blocks = watermark_blocks
        self.groups = groups
        # Stack of free ids; pop from the end. Reversed so block 0 is handed out first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._pos: list[int] = list(range(num_blocks - 1, -1, -1))  # block -> index in _free (if free)
        self._free_map = bytearray(b"\x01") * num_blocks  # 1 where free
        self._owner: list[Optional[Owner]] = [None] * num_blocks
        self._owned_count: dict[Owner, int] = {}

    # ----- queries -----------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def owner_of(self, block_id: int) -> Optional[Owner]:
        return self._owner[block_id]

    def num_owned(self, owner: Owner) -> int:
        return self._owned_count.get(owner, 0)

    def owners(self) -> dict[Owner, int]:
        """Owner -> number of blocks it holds (a copy)."""
        return dict(self._owned_count)

    def can_allocate(self, n: int, *, respect_watermark: bool = True) -> bool:
        reserve = self.watermark_blocks if respect_watermark else 0
        return n >= 0 and self.num_free - n >= reserve

    # ----- actions -----------------------------------------------------------------------
    def allocate(self, owner: Owner, n: int, *, respect_watermark: bool = True,
                 after: Optional[int] = None) -> Optional[list[int]]:
        """Hand ``n`` free blocks to ``owner``; ``None`` (and no change) if they are not there.

        With groups, the blocks are one contiguous run when one is free: the run right
        after block ``after`` (the owner's last block, so its group grows) if free, else
        the first free run of ``n``; else single blocks off the free stack.
        """
        if n < 0:
            raise BlockManagerError(f"cannot allocate {n} blocks")
        if not self.can_allocate(n, respect_watermark=respect_watermark):
            return None
        start = self._find_run(n, after) if self.groups else -1
        if start >= 0:
            ids = list(range(start, start + n))
            for b in ids:
                self._take(b)
        else:
            ids = [self._pop() for _ in range(n)]
        for b in ids:
            self._owner[b] = owner
        if n:
            self._owned_count[owner] = self._owned_count.get(owner, 0) + n
        return ids

    def _find_run(self, n: int, after: Optional[int]) -> int:
        """First block of ``n`` contiguous free blocks (right after ``after`` preferred); -1 if none."""
        if n == 0:
            return -1
        run = b"\x01" * n
        if after is not None and 0 <= after and after + n < self.num_blocks \
                and self._free_map[after + 1:after + 1 + n] == run:
            return after + 1
        if n == 1:
            return -1  # a single block comes off the stack (O(1))
        return self._free_map.find(run)

    def _pop(self) -> int:
        b = self._free.pop()
        self._free_map[b] = 0
        return b

    def _take(self, b: int) -> None:
        """Take free block ``b`` out of the stack in O(1): the last entry fills its slot."""
        i, last = self._pos[b], self._free.pop()
        if last != b:
            self._free[i] = last
            self._pos[last] = i
        self._free_map[b] = 0

    def _push(self, b: int) -> None:
        self._pos[b] = len(self._free)
        self._free.append(b)
        self._free_map[b] = 1

    def runs_of(self, block_ids: Iterable[int]) -> list[int]:
        """Lengths of the contiguous runs (groups) in a block table, in order."""
        ids = list(block_ids)
        return [n for _, _, n in copy_runs(ids, ids)]

    def free(self, owner: Owner, block_ids: Iterable[int]) -> None:
        """Return blocks to the pool. Raises if any is not owned by ``owner``;
        in that case nothing is freed."""
        ids = list(block_ids)
        self._check_owned(owner, ids)
        for b in ids:
            self._owner[b] = None
            self._push(b)
        self._drop_count(owner, len(ids))

    def transfer(self, block_ids: Iterable[int], src: Owner, dst: Owner) -> None:
        """Change the owner of blocks (a pre-allocation becomes a block table)."""
        ids = list(block_ids)
        self._check_owned(src, ids)
        for b in ids:
            self._owner[b] = dst
        self._drop_count(src, len(ids))
        if ids:
            self._owned_count[dst] = self._owned_count.get(dst, 0) + len(ids)

    # ----- helpers -----------------------------------------------------------------------
    def _check_owned(self, owner: Owner, ids: list[int]) -> None:
        if len(set(ids)) != len(ids):
            raise BlockManagerError(f"duplicate block ids in {ids}")
        for b in ids:
            if not isinstance(b, int) or not 0 <= b < self.num_blocks:
                raise BlockManagerError(f"block id {b!r} out of range")
            if self._owner[b] != owner:
                state = "free" if self._owner[b] is None else f"owned by {self._owner[b]!r}"
                raise BlockManagerError(f"block {b} is {state}, not owned by {owner!r}")

    def _drop_count(self, owner: Owner, n: int) -> None:
        if not n:
            return
        left = self._owned_count[owner] - n
        if left:
            self._owned_count[owner] = left
        else:
            del self._owned_count[owner]

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the books do not balance (used by tests)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b in range(self.num_blocks):
            assert (b in free) == (self._owner[b] is None), f"block {b}: free list and owner disagree"
            assert (self._free_map[b] == 1) == (b in free), f"block {b}: free map and free list disagree"
        for i, b in enumerate(self._free):
            assert self._pos[b] == i, f"block {b}: stack position {self._pos[b]}, found at {i}"
        counts: dict[Owner, int] = {}
        for o in self._owner:
            if o is not None:
                counts[o] = counts.get(o, 0) + 1
        assert counts == self._owned_count, "per-owner counts disagree"
        assert self.num_free + sum(counts.values()) == self.num_blocks


CopyRun = tuple[int, int, int]  # (first source block, first destination block, number of blocks)


def copy_runs(src_ids: Iterable[int], dst_ids: Iterable[int], grouped: bool = True) -> list[CopyRun]:
    """Split a block-to-block copy into runs that are contiguous on both sides.

    ``grouped=False`` gives one run per block (a copy per block, as vLLM's ``swap_blocks``
    issues); ``grouped=True`` merges neighbours, so a block group moves in one copy::

        src 4 5 6 9 10   dst 0 1 2 3 4   ->  (4, 0, 3), (9, 3, 2)
    """
    src, dst = list(src_ids), list(dst_ids)
    if len(src) != len(dst):
        raise BlockManagerError(f"copy of {len(src)} blocks into {len(dst)}")
    runs: list[CopyRun] = []
    for s, d in zip(src, dst):
        if grouped and runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs
