"""The llumlet's decisions, sans-IO: events in (with ``now`` passed in), actions out.

``LlumletCore`` owns one instance's request bookkeeping and decides:

* admission: requests wait in an inbox (validated at once) until the driver's next
  iteration admits them into the engine (``submit``, ``admit``);
* steps: ``step_due`` tells the driver a step is due, ``step`` runs one engine step
  and groups its outputs by the frontend (``reply_to``) they go to;
* leases: a frontend that does not renew its lease for ``lease_timeout_s`` is
  presumed gone, and its requests are aborted (``on_timer``);
* aborts, remembered for a while (tombstones): a migration that would bring an
  aborted request in is refused, and a request aborted while it migrates out is
  aborted once that migration ends;
* migrations: as source, which may start (``begin_migration``: one per request,
  ``max_outgoing`` at most) and what their end changes (``end_migration``); as
  destination, every message from a source (``handle``; ``max_incoming`` at most,
  silent sources expire in ``on_timer``);
* step holds: a source about to stop-and-copy into this instance asks it to start no
  step until that migration activates or aborts (``hold``); as a source, the instance
  starts none while one of its requests is frozen for its stop-and-copy (``hold_out``),
  so the migration's messages never queue behind a step here either. Both last
  ``max_step_hold_s`` at most; the driver asks ``holding`` before each step. The
  simulator's messages never wait for a step, so its driver does not hold;
* ownership: a committed request is parked until the source activates it; a copy
  parked too long, or a request the source kept frozen because the arbiter did not
  answer, is due for a claim (``claims_due``); the driver asks the arbiter and hands
  the answer back (``on_owner``). A parked copy is not held (``held``): it never
  emits, and the arbiter gives it to the source side once that side died;
* death: a crashed core (``crash``) serves, publishes and sends nothing more;
* role: the instance's role in prefill/decode disaggregation, as the scheduler sends it
  (``set_role``). A ``decode`` instance holds its never-prefilled requests for the
  scheduler to redirect, at most ``decode_hold_s`` (``llumnix_py.prefill_hold``);
* output lengths: each request that finishes here (stop or length) feeds the instance's
  ``LengthPrior`` (``policies.length``) by its objective kind and prompt length, the prior
  JITServe-style estimators bound remaining lengths from (``length_prior``).

It owns no threads, sockets, sleeps or clocks. Two drivers run it: the threaded
``llumnix_py.llumlet.Llumlet`` (real instances, local and Ray) and the simulator's
event loop (``llumnix_py.sim.cluster``). The core is not thread-safe: a threaded
driver calls it under its engine lock, except ``submit`` and the inbox reads, which
take the ``inbox_lock`` it hands in (so a request never waits for a step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections import OrderedDict, deque
from typing import Any, ContextManager, Optional, Sequence

from llumnix_py.engines.base import EngineAdapter
from llumnix_py.engines.types import (FinishReason, MigrationRequestState, Request, RequestOutput, SeqStatus,
                                      StepOutput)
from llumnix_py.errors import InvalidRequestError, LlumnixError, UnknownRequestError
from llumnix_py.llumlet_types import LlumletConfig, LlumletStats
from llumnix_py.load import InstanceLoad, RequestLoad
from llumnix_py.prefill_hold import PrefillHold
from migration import wire
from migration.destination import DestinationMigrations
from migration.driver import MigrationResult
from migration.ownership import Owner
from migration.protocol import MigrationStatus
from policies.length import LengthPrior
from policies.bandwidth import smooth
from policies.roles import Role, never_prefilled, parse_role

log = logging.getLogger(__name__)

TOMBSTONE_TTL_S = 300.0
TOMBSTONE_MAX = 100_000

Emits = dict[str, list[RequestOutput]]
"""Outputs to send, grouped by the frontend (``reply_to``) they go to."""


class LlumletCore:
    """One instance's decisions over its engine; see the module docstring.

    Args:
        config: the llumlet's settings (lease timeout, migration limits and timeout).
        engine: the engine adapter; the core calls it, never in the background.
        inbox_lock: guards the inbox, for a driver whose callers run on other threads.
        length_prior: the output-length prior this core feeds (shared with the engine's batch
            policy when it estimates lengths); a new one when None.
    """

    def __init__(self, config: LlumletConfig, engine: EngineAdapter,
                 inbox_lock: Optional[ContextManager[Any]] = None,
                 length_prior: Optional[LengthPrior] = None) -> None:
        self.config = config
        self.engine = engine
        self.instance_id = config.instance_id
        self.stats = LlumletStats()
        self.dest = DestinationMigrations(engine, config.max_incoming, config.migration_timeout_s)
        self._inbox: deque[Request] = deque()
        self._inbox_lock = inbox_lock if inbox_lock is not None else contextlib.nullcontext()
        self._reply_to: dict[str, str] = {}  # every request here (engine or migrating out) -> its frontend
        self._leases: dict[str, float] = {}  # reply_to -> last renewal (or first request)
        self._tombstones: "OrderedDict[str, float]" = OrderedDict()  # aborted request id -> when
        self._outgoing: dict[str, str] = {}  # request id -> migration id
        self._unresolved: dict[str, tuple[str, float]] = {}  # migration id -> (frozen request id, next claim)
        self.links: dict[str, float] = {}  # peer migration address -> smoothed GB/s of finished migrations
        self._hold: Optional[tuple[str, float]] = None  # (migration id, until): see ``hold``
        self._step_started: Optional[float] = None  # when the step in progress began (``step``'s ``now``)
        self._holds_out: dict[str, float] = {}  # request id -> until: see ``hold_out``
        self._dead = False
        if length_prior is None:  # the engine's batch policy's, when it estimates lengths
            length_prior = getattr(engine, "length_prior", None)
        self.length_prior = length_prior if length_prior is not None else LengthPrior()
        self._length_keys: dict[str, tuple[str, int]] = {}  # request id -> (objective kind, prompt length)
        self.role = Role.BOTH
        self._prefill_hold = PrefillHold(config.decode_hold_s)

    # ----- admission -----------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request for the next ``admit``. Raises ``InvalidRequestError`` for a
        request the engine can never run or an id already in use here."""
        self.engine.check_request(request)
        with self._inbox_lock:
            rid = request.request_id
            if rid in self._reply_to or any(r.request_id == rid for r in self._inbox):
                raise InvalidRequestError(f"request {rid} already exists on this instance")
            self._inbox.append(request)

    def has_inbox(self) -> bool:
        return bool(self._inbox)

    def admit(self, now: float) -> Emits:
        """Move queued requests into the engine; abort outputs for any it refuses after
        all (a race with a migration bringing the same id in)."""
        with self._inbox_lock:
            batch = list(self._inbox)
            self._inbox.clear()
        refused: Emits = {}
        for request in batch:
            try:
                self.engine.add_request(request)
            except LlumnixError as exc:
                log.warning("request %s refused: %s", request.request_id, exc)
                refused.setdefault(request.reply_to, []).append(
                    RequestOutput(request.request_id, (), 0, FinishReason.ABORT))
                continue
            self._track(request.request_id, request.reply_to, now)
            self._note_length_key(request.request_id, request.objective, len(request.prompt_token_ids))
            if self.role is Role.DECODE and self._prefill_hold.begin((request.request_id,), now):
                self._hand_hold_to_engine()
        return refused

    def _admit_one(self, request_id: str, now: float) -> bool:
        """Move one request from the inbox into the engine (as ``admit`` does); False if
        it is not in the inbox or the engine refuses it (then ``admit`` refuses it later)."""
        with self._inbox_lock:
            request = next((r for r in self._inbox if r.request_id == request_id), None)
            if request is None:
                return False
            try:
                self.engine.add_request(request)
            except LlumnixError:
                return False
            self._inbox.remove(request)
        self._track(request.request_id, request.reply_to, now)
        self._note_length_key(request.request_id, request.objective, len(request.prompt_token_ids))
        return True

    def _in_inbox(self, request_id: str) -> bool:
        with self._inbox_lock:
            return any(r.request_id == request_id for r in self._inbox)

    def _drop_from_inbox(self, request_id: str) -> bool:
        with self._inbox_lock:
            for r in self._inbox:
                if r.request_id == request_id:
                    self._inbox.remove(r)
                    return True
        return False

    def resume(self, state: MigrationRequestState, now: float) -> bool:
        """Continue a request whose instance died, by recomputation (``state.status``
        WAITING, nothing computed). False if it is already here (a migration brought it
        in); ``InvalidRequestError`` if it was aborted here or does not fit."""
        if state.status != SeqStatus.WAITING or state.num_computed_tokens != 0:
            raise InvalidRequestError("a resumed request is recomputed: status WAITING, no computed tokens")
        rid = state.request_id
        if rid in self._reply_to:
            return False
        if rid in self._tombstones:
            raise InvalidRequestError(f"request {rid} was aborted")
        # A half-done migration of this request from the dead instance: its reservation (or
        # its parked copy, which the arbiter gives to the source side now) goes now.
        for mid, rec in list(self.dest.incoming.items()):
            if rec.request_id == rid:
                self.dest.handle(wire.Abort(mid, "request resumed by recomputation"), None, now)
        for mid in self.dest.parked_for(rid):
            self.dest.drop_parked(mid)
        self.engine.commit_dst(state)
        self._track(rid, state.reply_to, now)
        self._note_length_key(rid, state.objective, len(state.prompt_token_ids))
        self.stats.resumed += 1
        return True

    def held(self, request_ids: Sequence[str]) -> list[str]:
        """Those of ``request_ids`` that are here (running, waiting, queued or migrating out;
        not a parked copy, which runs only if the arbiter gives it to this side)."""
        return [r for r in request_ids if self.has_request(r)]

    def has_request(self, request_id: str) -> bool:
        return request_id in self._reply_to or self._in_inbox(request_id)

    def _track(self, request_id: str, reply_to: str, now: float) -> None:
        """Remember where a request's tokens go; a first request starts its frontend's lease."""
        self._reply_to[request_id] = reply_to
        if reply_to and reply_to not in self._leases:
            self._leases[reply_to] = now

    def _note_length_key(self, request_id: str, objective: Any, prompt_len: int) -> None:
        """Remember what a request's output length will count under in the prior. Keys of
        requests that left without finishing here are pruned once they outnumber the rest."""
        keys = self._length_keys
        keys[request_id] = (objective.kind if objective is not None else "none", prompt_len)
        if len(keys) > 2 * len(self._reply_to) + 1024:
            for rid in [r for r in keys if r not in self._reply_to and not self.dest.parked_for(r)]:
                del keys[rid]

    def _observe_finish(self, o: RequestOutput) -> None:
        key = self._length_keys.pop(o.request_id, None)
        if key is not None and o.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.length_prior.observe(key[0], key[1], o.index + len(o.new_token_ids))

    # ----- leases and aborts ---------------------------------------------------------------
    def renew_lease(self, reply_to: str, now: float) -> None:
        """The frontend at ``reply_to`` is alive; its requests keep running."""
        if reply_to:
            self._leases[reply_to] = now

    def abort(self, request_id: str, now: float) -> bool:
        """Abort wherever the request is here; True if it was here. Remembered for a while."""
        self._remember_abort(request_id, now)
        parked = self.dest.parked_for(request_id)
        for mid in parked:
            self.dest.drop_parked(mid)
        if parked:
            return True
        if self._drop_from_inbox(request_id):
            return True
        if request_id in self._outgoing:
            return True  # aborted when its migration ends (see end_migration)
        try:
            self.engine.abort_request(request_id)
        except UnknownRequestError:
            return False
        self._reply_to.pop(request_id, None)
        return True

    def _remember_abort(self, request_id: str, now: float) -> None:
        self._tombstones[request_id] = now
        self._tombstones.move_to_end(request_id)
        while self._tombstones and (len(self._tombstones) > TOMBSTONE_MAX or
                                    now - next(iter(self._tombstones.values())) > TOMBSTONE_TTL_S):
            self._tombstones.popitem(last=False)

    # ----- role ---------------------------------------------------------------------------
    def set_role(self, role: str, now: float) -> None:
        """The scheduler's role for this instance (``UnknownRoleError`` for an unknown one).
        Becoming ``decode`` holds the never-prefilled requests waiting here; any other role
        releases every hold."""
        new = parse_role(role)
        if new is self.role:
            return
        self.role = new
        self.engine.set_prefill_first(self.config.prefill_first_steps if new is Role.PREFILL else None)
        if new is Role.DECODE:
            waiting = [r.request_id for r in self.engine.load().waiting if never_prefilled(r)]
            changed = self._prefill_hold.begin(waiting, now)
        else:
            changed = self._prefill_hold.release_all()
        if changed:
            self._hand_hold_to_engine()

    def _hand_hold_to_engine(self) -> None:
        if not self.engine.hold_waiting(self._prefill_hold.ids):
            self._prefill_hold.release_all()  # this engine cannot hold: it prefills as before

    def on_timer(self, now: float) -> Emits:
        """Time passed: release prefill holds that ran out, expire silent incoming migrations
        and lapsed leases; returns the abort outputs for the requests of lapsed frontends (in
        case one is only slow)."""
        if self._prefill_hold and self._prefill_hold.expire(now, self._reply_to.__contains__):
            self.stats.decode_holds_expired = self._prefill_hold.expired
            self._hand_hold_to_engine()
        if self.dest.incoming:
            self.dest.expire(now)
        timeout = self.config.lease_timeout_s
        if timeout is None or not self._leases:
            return {}
        expired = {rt for rt, t in self._leases.items() if now - t > timeout}
        if not expired:
            return {}
        outputs: Emits = {}
        load = self.engine.load()
        position = {r.request_id: r.output_len for r in load.running + load.waiting}
        for rid, rt in list(self._reply_to.items()):
            if rt not in expired:
                continue
            log.warning("lease of %s expired: aborting request %s", rt, rid)
            self._remember_abort(rid, now)
            self.stats.lease_aborts += 1
            outputs.setdefault(rt, []).append(RequestOutput(rid, (), position.get(rid, 0), FinishReason.ABORT))
            if rid in self._outgoing:
                continue  # aborted when its migration ends (see end_migration)
            try:
                self.engine.abort_request(rid)
            except UnknownRequestError:
                pass
            self._reply_to.pop(rid, None)
        for rt in expired:
            del self._leases[rt]
        return outputs

    # ----- steps ---------------------------------------------------------------------------
    def step_due(self) -> bool:
        """Whether the engine has work a step can do (held requests are no such work): the
        driver should ``step``."""
        return self.engine.runnable()

    def held_prefills(self) -> frozenset[str]:
        """The requests held now (``on_timer`` releases them when their time is up)."""
        return self._prefill_hold.ids

    def step(self, route: bool = True, now: Optional[float] = None) -> tuple[StepOutput, Emits]:
        """Run one engine step; its outputs grouped by destination (none when not
        ``route``: a driver that delivers by request id, the simulator). Routing happens
        with the step, so a migration committing right after cannot lose a step's tokens.
        ``now``: when the step begins, for ``freeze_in`` while it runs (a threaded driver)."""
        self._step_started = now
        try:
            out = self.engine.step()
        finally:
            self._step_started = None
        groups: Emits = {}
        reply_to = self._reply_to
        if not route:
            for o in out.outputs:
                if o.finish_reason is not None:
                    reply_to.pop(o.request_id, None)
                    self._observe_finish(o)
            return out, groups
        for o in out.outputs:
            target = reply_to.get(o.request_id, "")
            group = groups.get(target)
            if group is None:
                groups[target] = [o]
            else:
                group.append(o)
            if o.finish_reason is not None:
                reply_to.pop(o.request_id, None)
                self._observe_finish(o)
        return out, groups

    def on_published(self, out: StepOutput) -> None:
        """A step's outputs went out: count them."""
        self.stats.steps += 1
        self.stats.tokens += len(out.outputs)
        self.stats.preemptions += len(out.preempted)
        self.stats.last_step_ms = out.duration_s * 1e3
        self.stats.busy_s += out.duration_s
        if self.role is Role.DECODE:
            self.stats.decode_prefill_tokens += out.num_prefill_tokens

    def load(self, engine_load: InstanceLoad) -> InstanceLoad:
        """``engine_load`` with the requests accepted but not yet admitted counted as
        waiting (the dispatcher's view), the measured links, block size in bytes and
        latest step time (``policies.bandwidth``), and the engine's busy seconds and
        preemptions so far (``stats``)."""
        with self._inbox_lock:
            queued = list(self._inbox)
        if engine_load.role != self.role.value:
            engine_load = dataclasses.replace(engine_load, role=self.role.value)
        if self.links or self.stats.steps:  # a policy's predicted step time wins over the last one
            engine_load = dataclasses.replace(engine_load, links=tuple(sorted(self.links.items())),
                                              kv_block_bytes=self.engine.kv_block_bytes,
                                              step_s=engine_load.step_s or self.stats.last_step_ms / 1e3,
                                              busy_s=self.stats.busy_s, preemptions=self.stats.preemptions)
        if not queued:
            return engine_load
        bs = engine_load.block_size
        extra = tuple(RequestLoad.queued(r.request_id, prompt_len=len(r.prompt_token_ids), block_size=bs,
                                         priority=r.priority, arrival_time=r.arrival_time,
                                         conversation_id=r.conversation_id, client_id=r.client_id) for r in queued)
        return dataclasses.replace(engine_load, waiting=engine_load.waiting + extra)

    def is_idle(self) -> bool:
        return (not self.engine.has_unfinished() and not self._outgoing and not self.dest.incoming
                and not self.dest.parked and not self._unresolved)

    # ----- migration: source side ----------------------------------------------------------
    def begin_migration(self, request_id: str, migration_id: str, bounded: bool = True,
                        now: Optional[float] = None) -> bool:
        """May ``request_id`` start migrating out? False if it is not here or already
        migrating, or (``bounded``) ``max_outgoing`` migrations are in flight. Given ``now``,
        a request still in the inbox (accepted, not yet admitted: its engine is mid-step or
        held) is admitted into the engine's queue first, so it leaves as a waiting request."""
        if request_id not in self._reply_to and (now is None or not self._admit_one(request_id, now)):
            return False
        if request_id in self._outgoing:
            return False
        if bounded and len(self._outgoing) >= self.config.max_outgoing:
            return False
        self._outgoing[request_id] = migration_id
        return True

    def migrating_out(self, request_id: str) -> bool:
        return request_id in self._outgoing

    def end_migration(self, result: MigrationResult, peer: str = "") -> None:
        """A migration out ended: forget a request that left, abort one aborted meanwhile.
        A finished one to ``peer`` (its destination's address) updates the measured
        bandwidth to it: blocks times block bytes over the migration's whole time."""
        rid = result.request_id
        if peer and result.status == MigrationStatus.FINISHED and result.blocks > 0 and result.total_s > 0:
            sample = result.blocks * self.engine.kv_block_bytes / result.total_s / 1e9
            if sample > 0:
                self.links[peer] = smooth(self.links.get(peer), sample)
        self._outgoing.pop(rid, None)
        if result.unresolved:  # still frozen here and held: claimed again from ``claims_due``
            self._unresolved[result.migration_id] = (rid, float("-inf"))
        elif result.status == MigrationStatus.FINISHED:
            self._reply_to.pop(rid, None)
        elif rid in self._tombstones:
            try:
                self.engine.abort_request(rid)
            except UnknownRequestError:
                pass
            self._reply_to.pop(rid, None)
        key = result.status.value
        self.stats.migrations[key] = self.stats.migrations.get(key, 0) + 1

    # ----- migration: destination side -----------------------------------------------------
    def hold(self, msg: wire.Hold, now: float, boundary: bool = True,
             arrived: Optional[float] = None) -> wire.Reply:
        """A source is about to stop-and-copy ``msg.migration_id`` into this instance: start no
        step until that migration activates or aborts (``holding``), at most until the
        source's expected freeze (``msg.freeze_in_s`` after the message ``arrived``, default
        ``now``; past it, the source's next step boundary after ``now``, ``msg.source_step_s``
        apart) plus ``min(msg.hold_s, max_step_hold_s)``. Refused for a migration this
        instance holds no reservation for, or when holds are off here (``max_step_hold_s``
        0); a later hold replaces one.

        ``boundary``: this instance is between steps (the simulator's messages always find it
        so). A threaded driver first calls with ``boundary=False`` as the message arrives,
        without its engine lock (the hold must not wait for the step it is meant to be the
        last before the commit; it only reads the record table and replaces one attribute):
        that keeps the next step from starting. It calls again under its lock once its step in
        progress ended (with ``arrived``), and only then is the hold decided: the source's
        freeze still ``remaining`` away, it holds if that is at most ``hold_wait_fraction`` of
        this instance's latest step, else refuses and steps on (the request then joins the
        step after, waiting less than the rest of that step; idling longer would cost this
        instance's other requests more than it saves the migrating one).
        """
        if self._dead:
            return wire.Reply(ok=False, error=f"instance {self.instance_id} crashed")
        cap = self.config.max_step_hold_s
        if cap <= 0:
            return wire.Reply(ok=False, error="this instance does not hold its steps")
        if msg.migration_id not in self.dest.incoming:
            return wire.Reply(ok=False, error=f"no incoming migration {msg.migration_id!r} to hold for")
        due = (now if arrived is None else arrived) + msg.freeze_in_s
        if now > due and msg.source_step_s > 0:
            # Answered after the source's predicted freeze: the source, stepping on while it waits
            # for this answer, freezes at its first step boundary after it.
            due += math.ceil((now - due) / msg.source_step_s) * msg.source_step_s
        remaining = max(0.0, due - now)
        step_s = self.stats.last_step_ms / 1e3
        may_wait = self.config.hold_wait_fraction * step_s if step_s > 0 else cap
        if not boundary:  # keep the next step from starting until the decision at the boundary
            self._hold = (msg.migration_id, now + remaining + may_wait + min(msg.hold_s, cap))
            return wire.Reply(ok=True)
        if remaining > may_wait:
            self._hold = None
            return wire.Reply(ok=False, error=f"the source freezes in {remaining * 1e3:.1f} ms, more than this "
                                              f"instance idles for it ({may_wait * 1e3:.1f} ms): it steps on")
        self._hold = (msg.migration_id, now + remaining + min(msg.hold_s, cap))
        return wire.Reply(ok=True)

    def freeze_in(self, now: float) -> float:
        """How soon a request could be frozen here (seconds): the rest of the step in progress,
        predicted from the latest step's duration; 0 between steps (or when the driver does not
        say when its steps begin). A live migration's source tells its destination
        (``wire.Hold.freeze_in_s``); may be read without the engine lock."""
        started = self._step_started
        if started is None:
            return 0.0
        return max(0.0, started + self.stats.last_step_ms / 1e3 - now)

    def hold_out(self, request_id: str, hold_s: float, now: float) -> None:
        """``request_id`` was frozen here for its stop-and-copy: start no step until it is
        freed or unfrozen (``release_out``), ``min(hold_s, max_step_hold_s)`` at most. The
        migration's worker then does not share the interpreter with a step for the few
        messages of the downtime; the other requests here wait that long, once."""
        hold_s = min(hold_s, self.config.max_step_hold_s)
        if hold_s > 0 and request_id in self._outgoing:
            self._holds_out[request_id] = now + hold_s

    def held_out(self, now: float) -> bool:
        """Whether a request frozen here for its stop-and-copy holds this engine's steps now
        (``hold_out``): the engine starts no step until it is freed or unfrozen. May be read
        without the engine lock."""
        return any(end > now and rid in self._outgoing for rid, end in list(self._holds_out.items()))

    def release_out(self, request_id: str) -> None:
        self._holds_out.pop(request_id, None)

    def holding(self, now: float) -> Optional[float]:
        """Until when the driver should start no step (a hold in force), else None. An
        incoming migration's hold ends at its deadline or as soon as its migration is neither
        incoming nor parked here (activated, aborted, expired or refused); an outgoing one at
        its deadline, on ``release_out``, or when its migration ended."""
        until: Optional[float] = None
        hold = self._hold
        if hold is not None:
            mid, end = hold
            if now >= end or (mid not in self.dest.incoming and mid not in self.dest.parked):
                self._hold = None
            else:
                until = end
        for rid, end in list(self._holds_out.items()):
            if now >= end or rid not in self._outgoing:
                del self._holds_out[rid]
            elif until is None or end > until:
                until = end
        return until

    def handle(self, msg: wire.Message, payload: object, now: float) -> wire.Reply:
        """Serve one message from a migration source; the reply.

        Refuses everything once crashed, and any message but ``Abort`` for a request
        aborted here (its reservation is freed); a committed request is tracked here.
        """
        if self._dead:
            return wire.Reply(ok=False, error=f"instance {self.instance_id} crashed")
        rid = getattr(msg, "request_id", None) or getattr(getattr(msg, "state", None), "request_id", None)
        if rid is not None and rid in self._tombstones and not isinstance(msg, wire.Abort):
            self.dest.handle(wire.Abort(getattr(msg, "migration_id", ""), "aborted"), None, now)
            return wire.Reply(ok=False, error=f"request {rid} was aborted")
        if isinstance(msg, wire.Hold):
            return self.hold(msg, now)
        parked = self.dest.parked.get(msg.migration_id) if isinstance(msg, wire.Activate) else None
        reply = self.dest.handle(msg, payload, now)
        state = getattr(msg, "state", None)
        if reply.ok and isinstance(state, MigrationRequestState):  # a commit: the request may finish here
            self._note_length_key(state.request_id, state.objective, len(state.prompt_token_ids))
        if reply.ok and parked is not None:
            self._track(parked.request_id, parked.reply_to, now)
            self.stats.migrations_in += 1
        return reply

    # ----- ownership of migrating requests (``migration.ownership``) -------------------------
    def claims_due(self, now: float) -> list[tuple[str, Owner]]:
        """``(migration id, side)`` to claim from the arbiter now: copies parked here past
        the migration timeout, and requests kept frozen after their arbiter went silent.
        Each is listed again only after ``claim_retry_s`` (a claim in flight)."""
        if self._dead:
            return []
        retry = self.config.claim_retry_s
        due = [(m, Owner.DESTINATION) for m, _ in self.dest.claims_due(now, retry)] if self.dest.parked else []
        for mid, (rid, at) in list(self._unresolved.items()):
            if now >= at:
                self._unresolved[mid] = (rid, now + retry)
                due.append((mid, Owner.SOURCE))
        return due

    def has_unresolved(self) -> bool:
        return bool(self._unresolved)

    def on_owner(self, migration_id: str, side: Owner, owner: Optional[Owner], now: float) -> bool:
        """The arbiter's answer to a claim of ``side`` (None: no answer, claim again later).
        True when a request was activated or unfrozen here (the engine has work)."""
        if owner is None or self._dead:
            return False
        if side == Owner.DESTINATION:
            parked = self.dest.settle(migration_id, owner)
            if parked is None:
                return False
            self._track(parked.request_id, parked.reply_to, now)
            self.stats.migrations_in += 1
            return True
        got = self._unresolved.pop(migration_id, None)
        if got is None:
            return False
        rid = got[0]
        try:
            if owner == Owner.SOURCE:
                self.engine.unfreeze(rid)
                return True
            self.engine.free_src(rid)  # the destination won: it runs the request
        except LlumnixError:
            pass  # aborted meanwhile
        self._reply_to.pop(rid, None)
        return False

    # ----- death ---------------------------------------------------------------------------
    def crash(self) -> None:
        """Die as if the process were killed: nothing more is served or published."""
        self._dead = True

    @property
    def dead(self) -> bool:
        return self._dead
