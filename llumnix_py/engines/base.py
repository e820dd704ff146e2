"""The one interface through which the llumlet, the scheduler and migration talk to an engine.

An adapter wraps one engine instance. It is not thread-safe: the llumlet that owns
it serializes every call (engine steps and migration primitives alike), except
``read_blocks`` on blocks that are full, which may run beside a step (full blocks
are never written again while their request lives).

Migration primitives (Llumnix's names), in the order a live migration uses them::

    source S                                   destination D
    --------                                   -------------
    incremental_blocks(r, sent) -> ids         pre_alloc(r, n) -> ids | None   (per stage)
    read_blocks(ids) -> data        ------->   write_blocks(dst_ids, data)
    ... repeated per pre-copy stage while r keeps decoding on S ...
    freeze(r) -> state | None                  (stop-and-copy: r leaves S's batch)
    read_blocks(last ids)           ------->   write_blocks(...)
                                               commit_dst(state)    r joins D's batch
    free_src(r)   (only after D committed)
    unfreeze(r)   (rollback instead, if D failed)   free_pre_alloc(r) (rollback on D)
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from llumnix_py.engines.types import MigrationRequestState, Request, StepOutput

if TYPE_CHECKING:
    from llumnix_py.load import InstanceLoad


class EngineAdapter(abc.ABC):
    """An engine instance under llumnix-py."""

    # ----- serving -------------------------------------------------------------------------
    @abc.abstractmethod
    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ``InvalidRequestError`` when it can never run
        (prompt longer than the model context, a token id outside the vocabulary...)."""

    def check_request(self, request: Request) -> None:
        """Raise ``InvalidRequestError`` if ``request`` can never run here. Must be safe to
        call from any thread, beside a running step (it reads only configuration)."""

    @abc.abstractmethod
    def abort_request(self, request_id: str) -> None:
        """Drop a request and free its blocks. Raises ``UnknownRequestError``."""

    @abc.abstractmethod
    def step(self) -> StepOutput:
        """Run one iteration: schedule, execute, apply. Returns the new tokens."""

    @abc.abstractmethod
    def has_unfinished(self) -> bool:
        """True while any request is waiting or running (frozen ones excluded)."""

    def runnable(self) -> bool:
        """True while a step has work: ``has_unfinished`` less the waiting requests held
        (``hold_waiting``)."""
        return self.has_unfinished()

    def hold_waiting(self, request_ids: frozenset[str]) -> bool:
        """Admit none of these waiting requests until a later call leaves them out (it
        replaces the set; ids not waiting here are ignored): a ``decode`` instance keeps
        prefill work for the scheduler to redirect. False: this engine cannot hold, and
        admits them as it would anyway."""
        return False

    def set_prefill_first(self, steps: Optional[int]) -> bool:
        """Give prompts priority over the running batch (a ``prefill`` instance, whose running
        requests wait for their hand-off): while requests wait to be admitted, up to ``steps``
        steps in a row admit them alone and the running batch sits out; 0 turns it off, None
        restores the engine's own setting. False: this engine schedules as it always does."""
        return False

    @abc.abstractmethod
    def load(self) -> InstanceLoad:
        """A snapshot of the instance's KV-cache use and its queues."""

    @property
    @abc.abstractmethod
    def block_size(self) -> int:
        """Tokens per KV block."""

    def set_fair_offsets(self, offsets: Mapping[str, float]) -> None:
        """The global scheduler's cluster-wide fairness view (per client: cluster counter minus
        this engine's, ``policies.fairness.cluster_offsets``). An engine that does not share
        fairly between clients has nothing to order by it and ignores it."""

    # ----- migration primitives ----------------------------------------------------------
    @property
    def supports_kv_migration(self) -> bool:
        """False for engines that cannot expose blocks: they migrate by recomputation."""
        return True

    @abc.abstractmethod
    def incremental_blocks(self, request_id: str, num_sent: int, include_last: bool) -> Optional[list[int]]:
        """Physical ids of the request's blocks from index ``num_sent`` on.

        Without ``include_last`` only full blocks are returned (a pre-copy stage);
        with it every block, the partial last one included (stop-and-copy).
        Returns ``None`` if the request is not running (finished, preempted, unknown).
        """

    @abc.abstractmethod
    def pre_alloc(self, request_id: str, num_blocks: int) -> Optional[list[int]]:
        """Reserve ``num_blocks`` more blocks for an incoming migration of ``request_id``.

        Returns their ids, or ``None`` if they would take the instance below its watermark.
        Reservations of one request accumulate across stages.
        """

    @abc.abstractmethod
    def free_pre_alloc(self, request_id: str) -> int:
        """Release every block reserved for ``request_id``; returns how many (0 if none)."""

    @abc.abstractmethod
    def read_blocks(self, block_ids: Sequence[int]) -> object:
        """Copy the KV data of these blocks out (a tensor; ``None`` for engines without data)."""

    @abc.abstractmethod
    def write_blocks(self, block_ids: Sequence[int], data: object) -> None:
        """Write KV data received from a source into reserved blocks."""

    @abc.abstractmethod
    def freeze(self, request_id: str) -> Optional[MigrationRequestState]:
        """Take the request out of the running batch (or the waiting queue) at an
        iteration boundary and return its state; ``None`` if it is not there any more."""

    @abc.abstractmethod
    def unfreeze(self, request_id: str) -> None:
        """Rollback of ``freeze``: the request rejoins the batch (or queue) unchanged."""

    @abc.abstractmethod
    def free_src(self, request_id: str) -> None:
        """Forget a frozen request whose migration committed, freeing its blocks."""

    @abc.abstractmethod
    def commit_dst(self, state: MigrationRequestState) -> None:
        """Adopt a migrated request: running ones take the reserved blocks as their
        block table and join the batch; waiting ones join the queue in arrival order."""

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of KV data per block (for cost models and bandwidth figures)."""
        return 0
