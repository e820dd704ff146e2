"""Load snapshots: one request's load and one instance's load, as frozen plain data.

Engines build them (``EngineAdapter.load()``), the llumlet adds the requests it has
accepted but not yet admitted, the global scheduler adds its own bookkeeping (instance
id, terminating, pending dispatches, migrations in flight) with ``dataclasses.replace``,
and policies read them. This module sits below ``engines/``, ``scheduler/`` and
``policies/`` and imports none of them. Every field is keyword-only, so a snapshot is
never built by position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class RequestLoad:
    """One request on an instance, as load-aware policies see it (no token ids).

    Attributes:
        request_id: the request's id.
        num_blocks: physical KV blocks it holds now (0 while waiting).
        blocks_needed: blocks its next (re-)prefill needs (prompt plus outputs so far);
            the demand of a waiting request.
        prompt_len: tokens in its prompt.
        output_len: tokens it has generated so far.
        priority: 0 is normal; higher is more urgent.
        arrival_time: seconds on the runtime's clock; orders requests (earlier first).
        num_preemptions: times the engine preempted it.
        migrating: frozen or being migrated out (not a candidate for another migration).
        slo_margin_next_s / slo_margin_end_s: its objective's margins on its instance now, as
            the engine's JIT policy predicts them (``policies.jit``): the part a faster batch
            does not change (a stream's next token) and the part that scales with the step
            time (the last token); ``inf`` without an objective or a JIT policy.
        slo_remaining: the length estimator's bound on its tokens still to come (0: unknown).
        ttft_s / tbt_s / deadline_s: a request being dispatched: its objective, relative to
            its arrival (``inf`` / 0 where it has none); a job call's share counts as a deadline.
        job_deadline_s: a job call being dispatched: the time left to its job's deadline, relative
            to its arrival (``inf`` for a request that is no job call).
        conversation_id: the conversation it belongs to ("" for none).
        client_id: the client that sent it ("" for none).
    """

    request_id: str
    num_blocks: int
    blocks_needed: int
    prompt_len: int = 0
    output_len: int = 0
    priority: int = 0
    arrival_time: float = 0.0
    num_preemptions: int = 0
    migrating: bool = False
    slo_margin_next_s: float = math.inf
    slo_margin_end_s: float = math.inf
    slo_remaining: int = 0
    ttft_s: float = math.inf
    tbt_s: float = 0.0
    deadline_s: float = math.inf
    job_deadline_s: float = math.inf

    @property
    def slo_margin_s(self) -> float:
        """Its objective's margin on its instance now (``inf``: none known)."""
        return min(self.slo_margin_next_s, self.slo_margin_end_s)
    conversation_id: str = ""
    client_id: str = ""

    @classmethod
    def queued(cls, request_id: str, *, prompt_len: int, block_size: int, output_len: int = 0,
               priority: int = 0, arrival_time: float = 0.0, conversation_id: str = "",
               client_id: str = "") -> "RequestLoad":
        """A request no engine has admitted yet: it holds no blocks and needs enough for
        its prompt plus the ``output_len`` tokens already generated (a resumed request).

        Args:
            request_id: the request's id.
            prompt_len: tokens in its prompt.
            block_size: tokens per KV block of the instances it may go to.
            output_len: tokens generated before (0 for a new request).
            priority: its priority.
            arrival_time: when it arrived.
            conversation_id: its conversation ("" for none).
            client_id: the client that sent it ("" for none).
        """
        return cls(request_id=request_id, num_blocks=0, blocks_needed=-(-(prompt_len + output_len) // block_size),
                   prompt_len=prompt_len, output_len=output_len, priority=priority, arrival_time=arrival_time,
                   conversation_id=conversation_id, client_id=client_id)


@dataclass(frozen=True, kw_only=True)
class InstanceLoad:
    """A load snapshot of one instance.

    The engine fills the memory and request fields; the global scheduler sets
    ``instance_id``, ``terminating``, ``migrating_out``/``migrating_in``,
    ``pending_dispatch``, ``role`` and ``cluster_service`` on its copy.

    Attributes:
        instance_id: the instance's id ("" in an engine's own snapshot, which does not
            know it; the scheduler sets it).
        total_blocks: ``M_i``, the instance's KV blocks.
        used_blocks: blocks owned by requests (running, frozen) or reserved for
            incoming migrations.
        watermark_blocks: blocks the engine keeps free (admission stops above them).
        block_size: tokens per KV block (0 where the builder does not know it, as in
            hand-made snapshots for policies).
        reserved_blocks: blocks pre-allocated for incoming migrations (part of ``used_blocks``).
        max_batch_size: the engine's batch limit (0: unlimited).
        running: requests in the running batch, in batch order (frozen ones included).
        waiting: the waiting queue, head first.
        terminating: marked for scale-in; drains by migration, never a dispatch target.
        migrating_out: migrations in flight with this instance as source.
        migrating_in: migrations in flight with this instance as destination.
        pending_dispatch: requests dispatched to it since its last poll (counted into its load).
        step_s / step_s_next: decode step time at its batch now, and with one more request:
            an SLO-aware batch policy's prediction (``engines.jit_batch``); else ``step_s`` is
            the latest measured step (the llumlet sets it) and ``step_s_next`` 0 (0: unknown).
        queue_s: predicted time until a request dispatched now would be prefilled (its queue).
        prefill_s_per_token: predicted prefill seconds per prompt token.
        conversations: ``((conversation_id, tokens), ...)``: conversations whose last turn's KV
            the instance keeps in its host pool, and how many tokens it covers.
        job_len_bounds: per prompt-length bucket (``policies.length.PROMPT_BUCKETS``), the
            conservative output length of a new job call from the instance's length prior (an
            SLO-aware batch policy publishes it; empty: unknown).
        client_service: ``((client_id, service), ...)``: the engine's virtual token counters
            (weighted tokens served per client, with VTC's lifts) when it shares fairly, else empty.
        client_served: ``((client_id, service), ...)``: the weighted tokens this instance served
            each client, charges only (no lifts), so sums over instances count every token once;
            empty when it does not share fairly.
        cluster_service: ``((client_id, service), ...)``: the cluster-wide counters (the global
            scheduler's VTC over every instance's service, ``policies.fairness``) of the clients
            with requests here; scheduler state, set on its copy (empty in an engine's snapshot).
        role: ``prefill``, ``decode`` or ``both`` (``policies.roles``); scheduler state,
            set on its copy (an engine's own snapshot says ``both``).
        links: ``(peer migration address, GB/s)``: the smoothed bandwidth this instance's
            finished migrations to each peer achieved (the llumlet measures it).
        kv_block_bytes: bytes of one KV block (0: unknown); with ``links``, predicts copy time.
        kv_copy_stall_s: seconds the engine's steps have waited on KV copies since it started
            (swaps between the pools, a finished turn's store and the next turn's restore; an
            engine that does not measure it reports 0): the context switches' cost.
        busy_s: seconds the engine has spent in steps since it started (its rate over time is
            the engine's utilisation; the llumlet sets it, 0 in an engine's own snapshot).
        preemptions: requests the engine has preempted since it started (the llumlet sets it).
        prefill_in_flight: prompt tokens the engine step in progress is prefilling, where the
            snapshot already shows that step's effect (the simulator's: it applies a step when
            the step starts), so they are in no queue of it; 0 where the snapshot predates the
            step (the runtime's) or no step runs. ``policies.dispatch.prefill_backlog`` counts them.
    """

    instance_id: str = ""
    total_blocks: int
    used_blocks: int
    watermark_blocks: int = 0
    block_size: int = 0
    reserved_blocks: int = 0
    max_batch_size: int = 0
    running: tuple[RequestLoad, ...] = ()
    waiting: tuple[RequestLoad, ...] = ()
    terminating: bool = False
    migrating_out: int = 0
    migrating_in: int = 0
    pending_dispatch: tuple[RequestLoad, ...] = ()
    step_s: float = 0.0
    step_s_next: float = 0.0
    queue_s: float = 0.0
    prefill_s_per_token: float = 0.0
    conversations: tuple[tuple[str, int], ...] = ()
    job_len_bounds: tuple[int, ...] = ()
    client_service: tuple[tuple[str, float], ...] = ()
    client_served: tuple[tuple[str, float], ...] = ()
    cluster_service: tuple[tuple[str, float], ...] = ()
    role: str = "both"
    links: tuple[tuple[str, float], ...] = ()
    kv_block_bytes: int = 0
    kv_copy_stall_s: float = 0.0
    busy_s: float = 0.0
    preemptions: int = 0
    prefill_in_flight: int = 0

    @property
    def free_blocks(self) -> int:
        """Blocks neither owned nor reserved."""
        return self.total_blocks - self.used_blocks

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Queued requests, those dispatched since the last poll included."""
        return len(self.waiting) + len(self.pending_dispatch)
