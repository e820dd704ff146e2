"""A request's mutable state inside an engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from llumnix_py.engines.types import (
    FinishReason,
    MigrationRequestState,
    Objective,
    Request,
    SamplingParams,
    SeqStatus,
)
from llumnix_py.load import RequestLoad


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class Sequence:
    """One request as an engine holds it.

    ``num_computed`` counts tokens whose K/V are in the cache. While decoding,
    it is ``num_tokens - 1``: the last sampled token is fed in the next step.

        tokens:   p0 p1 p2 p3 | o0 o1 o2
        computed: ^^^^^^^^^^^^^^^^^^        (o2 sampled, not yet fed)
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: int = 0
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    host_table: list[int] = field(default_factory=list)  # host-pool blocks while swapped out
    num_computed: int = 0
    num_preemptions: int = 0
    finish_reason: Optional[FinishReason] = None
    frozen_from: Optional[SeqStatus] = None  # status before ``freeze``
    reply_to: str = ""
    objective: Optional[Objective] = None
    client_id: str = ""
    conversation_id: str = ""

    @classmethod
    def from_request(cls, r: Request) -> "Sequence":
        return cls(r.request_id, r.prompt_token_ids, r.sampling, r.priority, r.arrival_time, reply_to=r.reply_to,
                   objective=r.objective, client_id=r.client_id, conversation_id=r.conversation_id)

    @classmethod
    def from_migration(cls, s: MigrationRequestState) -> "Sequence":
        return cls(
            request_id=s.request_id,
            prompt_token_ids=s.prompt_token_ids,
            sampling=s.sampling,
            priority=s.priority,
            arrival_time=s.arrival_time,
            output_token_ids=list(s.output_token_ids),
            status=s.status,
            num_computed=s.num_computed_tokens,
            num_preemptions=s.num_preemptions,
            reply_to=s.reply_to,
            objective=s.objective,
            client_id=s.client_id,
            conversation_id=s.conversation_id,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def all_token_ids(self) -> tuple[int, ...]:
        return self.prompt_token_ids + tuple(self.output_token_ids)

    def queue_key(self) -> tuple:
        """Waiting-queue order: higher priority first, then arrival, then id (total order)."""
        return (-self.priority, self.arrival_time, self.request_id)

    def blocks_for(self, num_tokens: int, block_size: int) -> int:
        return cdiv(num_tokens, block_size)

    def to_migration_state(self, status: SeqStatus) -> MigrationRequestState:
        return MigrationRequestState(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            output_token_ids=tuple(self.output_token_ids),
            sampling=self.sampling,
            priority=self.priority,
            arrival_time=self.arrival_time,
            num_preemptions=self.num_preemptions,
            status=status,
            num_computed_tokens=self.num_computed if status == SeqStatus.RUNNING else 0,
            reply_to=self.reply_to,
            objective=self.objective,
            client_id=self.client_id,
            conversation_id=self.conversation_id,
        )

    def to_load(self, block_size: int, migrating: bool = False) -> RequestLoad:
        return RequestLoad(
            request_id=self.request_id,
            num_blocks=len(self.block_table),
            blocks_needed=cdiv(self.num_tokens, block_size),
            prompt_len=len(self.prompt_token_ids),
            output_len=len(self.output_token_ids),
            priority=self.priority,
            arrival_time=self.arrival_time,
            num_preemptions=self.num_preemptions,
            migrating=migrating,
            conversation_id=self.conversation_id,
            client_id=self.client_id,
        )
