"""Multi-turn KV reuse: a finished turn's KV kept in the host pool for the next turn.

FastSwitch's third fix (Shen, Li and Gao, arXiv:2411.18424, Section 4.3, "KV cache
reuse"): a multi-turn conversation's next prompt starts with the previous turn's
prompt and answer, so the KV of that prefix need not be recomputed or swapped in
and out again. When a turn with a ``conversation_id`` finishes, its full blocks are
copied to the host pool under the owner ``("conv", conversation_id)``; the next turn
restores the blocks of the prefix its prompt shares with them and prefills only the
rest. The share is checked token by token, so an edited history reuses only the
blocks before the first changed token and never stale KV::

    stored   t0 .. t15 | t16 .. t31 | t32 .. t40      (two full blocks kept, 16 tokens each)
    prompt   t0 .. t15 | t16 .. X   | ...             -> block 0 restored, prefill from t16

Entries live under an LRU budget (``max_blocks``) and give way, oldest first, when a
swap-out needs the host pool.

A turn migrated while still waiting takes the prefix along: the source's ``freeze`` lends
the stored turn to the migration (``lend``: out of the LRU, so nothing evicts, restores or
replaces it meanwhile; its blocks stay counted), its blocks travel from the host pool as
the migration's stop-and-copy stage, and the destination keeps them in its own store when
the turn is activated there (its admission restores them, checked as above). The source
then frees the lent turn (``hand_over``); an aborted migration puts it back where it was
in the LRU order (``give_back``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

from llumnix_py.engines.block_manager import BlockManager


@dataclass(frozen=True)
class StoredTurn:
    """A finished turn's KV in the host pool: ``host_blocks[i]`` holds tokens
    ``tokens[i * block_size : (i + 1) * block_size]`` (full blocks only)."""

    tokens: tuple[int, ...]
    host_blocks: tuple[int, ...]


class ConversationStore:
    """Conversation id -> its last turn's KV in the host pool, least recently used first.

    Args:
        host: the host block pool (shared with swap preemption).
        block_size: tokens per block.
        max_blocks: host blocks the store may hold at most (0: the store keeps nothing).
    """

    def __init__(self, host: Optional[BlockManager], block_size: int, max_blocks: int) -> None:
        self.host = host
        self.block_size = block_size
        self.max_blocks = max_blocks if host is not None else 0
        self._turns: "OrderedDict[str, StoredTurn]" = OrderedDict()
        self._lent: dict[str, tuple[StoredTurn, int]] = {}  # out on a migration: (turn, its LRU position)
        self.num_blocks = 0
        self.hits = 0  # turns that restored at least one block
        self.restored_tokens = 0

    def __contains__(self, conversation_id: str) -> bool:
        return conversation_id in self._turns

    def entries(self) -> dict[str, StoredTurn]:
        return dict(self._turns)

    def reusable_blocks(self, conversation_id: str, prompt: Sequence[int]) -> int:
        """Full blocks of the stored turn whose tokens equal the prompt's, from the start;
        at least one prompt token is left to prefill (its logits give the first token)."""
        turn = self._turns.get(conversation_id)
        if turn is None:
            return 0
        limit = min(len(turn.tokens), len(prompt) - 1)
        same = 0
        while same < limit and turn.tokens[same] == prompt[same]:
            same += 1
        return same // self.block_size

    def room_for(self, n: int) -> bool:
        return 0 < n <= self.max_blocks

    def put(self, conversation_id: str, tokens: tuple[int, ...], num_blocks: int) -> Optional[list[int]]:
        """Allocate host blocks for a finished turn (the caller copies into them); evicts older
        turns to stay within the budget and the pool. ``None`` if it cannot be kept."""
        if self.host is None or not self.room_for(num_blocks):
            return None
        self.drop(conversation_id)
        while self._turns and (self.num_blocks + num_blocks > self.max_blocks or self.host.num_free < num_blocks):
            self.drop(next(iter(self._turns)))
        got = self.host.allocate(("conv", conversation_id), num_blocks)
        if got is None:
            return None
        self._turns[conversation_id] = StoredTurn(tokens[:num_blocks * self.block_size], tuple(got))
        self.num_blocks += num_blocks
        return got

    def take(self, conversation_id: str) -> StoredTurn:
        """Remove a turn that is being restored; the caller frees its host blocks (``release``)
        once the copy has landed."""
        turn = self._turns.pop(conversation_id)
        self.num_blocks -= len(turn.host_blocks)
        self.hits += 1
        return turn

    def release(self, conversation_id: str, turn: StoredTurn) -> None:
        assert self.host is not None
        self.host.free(("conv", conversation_id), turn.host_blocks)

    def drop(self, conversation_id: str) -> None:
        """Forget a turn and free its host blocks."""
        turn = self._turns.pop(conversation_id, None)
        if turn is not None:
            self.num_blocks -= len(turn.host_blocks)
            assert self.host is not None
            self.host.free(("conv", conversation_id), turn.host_blocks)

    def make_room(self, n: int) -> None:
        """Evict turns, oldest first, until the host pool has ``n`` free blocks (or none is left)."""
        while self._turns and self.host is not None and self.host.num_free < n:
            self.drop(next(iter(self._turns)))

    def lend(self, conversation_id: str) -> StoredTurn:
        """Take a turn out for a migration that carries it to another instance; its blocks
        stay allocated and counted until ``hand_over`` or ``give_back``."""
        position = list(self._turns).index(conversation_id)
        turn = self._turns.pop(conversation_id)
        self._lent[conversation_id] = (turn, position)
        return turn

    def lent(self, conversation_id: str) -> StoredTurn:
        return self._lent[conversation_id][0]

    def hand_over(self, conversation_id: str) -> None:
        """The migration went through: the turn lives on at the destination; free it here."""
        turn, _ = self._lent.pop(conversation_id)
        self.num_blocks -= len(turn.host_blocks)
        assert self.host is not None
        self.host.free(("conv", conversation_id), turn.host_blocks)

    def give_back(self, conversation_id: str) -> None:
        """The migration failed: the turn is back where it was in the LRU order (freed
        instead if a newer turn of the conversation was kept meanwhile)."""
        turn, position = self._lent.pop(conversation_id)
        if conversation_id in self._turns:
            self.num_blocks -= len(turn.host_blocks)
            assert self.host is not None
            self.host.free(("conv", conversation_id), turn.host_blocks)
            return
        items = list(self._turns.items())
        items.insert(position, (conversation_id, turn))
        self._turns = OrderedDict(items)

    def owners(self) -> dict:
        """The host-pool owners the store accounts for (for invariant checks), lent turns included."""
        out: dict = {}
        for c, t in list(self._turns.items()) + [(c, t) for c, (t, _) in self._lent.items()]:
            if t.host_blocks:
                out[("conv", c)] = out.get(("conv", c), 0) + len(t.host_blocks)
        return out
