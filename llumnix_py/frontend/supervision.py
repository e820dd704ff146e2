"""The frontend's fault supervision: dead instances, orphaned requests, leases.

A ``Supervisor`` belongs to one ``Cluster``; a thread (``start``) runs
``supervise_once`` every ``interval_s``:

- an instance dies: the scheduler removes it and lists it in ``membership()["dead"]``;
  each request whose owner (the last instance that sent it tokens, or its dispatch
  target) died is resumed on a live instance by recomputation from its prompt and
  the tokens already delivered, so its stream goes on with nothing lost or repeated.
  For ``census_window_s`` after a death, every live instance is also asked which
  requests it holds, to find requests that moved to the dead instance before it
  sent anything from there. With no instance left, the request ends with ``error``
  set (``RequestFailedError`` from ``result()``).
- the frontend dies: it renews a lease on every instance (``renew_lease``) about
  every second; llumlets abort the requests of a frontend whose lease lapsed.
- presence: about every second it tells the scheduler this frontend is attached
  (``frontend_heartbeat``), so ``llumnix-py scheduler --status`` lists it.

It sees the cluster through two narrow doors: the control plane (membership,
instances, dispatch) and the frontend's ``RequestTable`` (requests in flight, their
resume points, their end). Its own state is the set of dead instances, the last
membership, the census suspects and its counters.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

from llumnix_py.engines.jit_batch import with_objective
from llumnix_py.engines.types import FinishReason, MigrationRequestState, Request, SeqStatus
from llumnix_py.frontend.handles import RequestHandle
from llumnix_py.instance import InstanceDiedError
from llumnix_py.load import RequestLoad

if TYPE_CHECKING:
    from llumnix_py.frontend.requests import RequestTable
    from llumnix_py.runtime.control import ControlPlane
    from llumnix_py.scheduler.frontends import FrontendRecord

log = logging.getLogger(__name__)


class Supervisor:
    """Learns dead instances, resumes or fails their requests, renews this frontend's leases.

    Args:
        control: the scheduler (or the frontend's own dispatcher while it is away).
        requests: the frontend's active requests.
        reply_to: this frontend's token address, the lease's name ("": no leases).
        lease_timeout_s: the llumlets' lease (None: no leases).
        block_size: tokens per KV block, to size a resumed request for dispatch.
        presence: this frontend's record, reported to the scheduler every
            ``presence_interval_s`` (None: not reported).
        clock: the clock ``Request.arrival_time`` is on (the frontend stamps it with wall time);
            a resumed request's objective is placed by the time left to it.

    Attributes:
        resumed: requests resumed on another instance after theirs died.
    """

    interval_s = 0.1  # membership checks (dead instances) and lease renewals
    census_window_s = 3.0  # after a death, look for requests no live instance holds for this long
    census_confirm_s = 0.3  # ... and resume one missing from two censuses this far apart
    presence_interval_s = 1.0  # heartbeats to the scheduler (it lists frontends, nothing more)

    def __init__(self, control: "ControlPlane", requests: "RequestTable", *, reply_to: str,
                 lease_timeout_s: Optional[float], block_size: int,
                 presence: Optional[Callable[[], FrontendRecord]] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.control = control
        self.requests = requests
        self.reply_to = reply_to
        self.lease_timeout_s = lease_timeout_s
        self.block_size = block_size
        self.presence = presence
        self.clock = clock
        self._last_presence = float("-inf")
        self.resumed = 0
        self._lock = threading.Lock()
        # Fencing is by incarnation: an id can come back as a new instance (a replacement, a
        # restarted scheduler's launch), which must not inherit its predecessor's death.
        self._dead: dict[str, str] = {}  # instance id -> the incarnation that died ("" if unknown)
        self._incarnations: dict[str, str] = {}  # instance id -> its live incarnation, as last listed
        self._deaths = 0  # deaths learnt so far (a census window opens after each)
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._last_lease = float("-inf")
        self._deaths_seen = 0
        self._members: set[str] = set()  # live instances in the last membership
        self._census_until = float("-inf")
        self._suspects: dict[str, float] = {}  # request id -> first census that missed it

    def start(self) -> None:
        """Start watching for dead instances and renewing this frontend's leases."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="frontend-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop it (the cluster's ``stop`` does; tests also use it to play a frontend that died)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.supervise_once()
            except Exception:
                log.exception("frontend supervision failed")
            self._stop.wait(self.interval_s)

    def is_dead(self, instance_id: str) -> bool:
        with self._lock:
            return instance_id in self._dead

    @property
    def dead(self) -> frozenset[str]:
        """Instances this frontend knows are dead."""
        with self._lock:
            return frozenset(self._dead)

    def mark_dead(self, instance_id: str, incarnation: Optional[str] = None) -> None:
        """``instance_id`` (its ``incarnation``, default the last one listed) is gone: never
        choose it again while that incarnation is the one known, and let the control plane
        forget it."""
        with self._lock:
            inc = self._incarnations.get(instance_id, "") if incarnation is None else incarnation
            if self._dead.get(instance_id) != inc:
                self._deaths += 1
            self._dead[instance_id] = inc
        self.control.forget(instance_id)

    def _learn_incarnations(self, incarnations: dict[str, str]) -> None:
        """A listed instance whose incarnation differs from the one that died is a new
        instance with a reused id: it is alive."""
        with self._lock:
            for iid, inc in incarnations.items():
                died = self._dead.get(iid)
                if died is not None and inc and inc != died:
                    del self._dead[iid]
                    log.info("instance id %s is back as a new incarnation (%s)", iid, inc)
                self._incarnations[iid] = inc

    def supervise_once(self) -> None:
        """One round: learn dead instances, resume their requests, renew leases."""
        m = self.control.membership()
        now = time.monotonic()
        members = set(m["instances"])
        incarnations = m.get("incarnations") or {}
        # Dead incarnations; or gone without the scheduler saying so (it restarted meanwhile,
        # or drained it: then its requests are held elsewhere and nothing is resumed).
        died = {iid: inc for iid, inc in (m.get("dead_incarnations") or [(i, None) for i in m["dead"]])}
        for iid in self._members - members:
            died.setdefault(iid, None)
        for iid, inc in died.items():
            if iid in members:
                continue  # the id is listed alive: a newer incarnation, the death is old news
            if not self.is_dead(iid):
                self.mark_dead(iid, inc)
        self._learn_incarnations(incarnations)
        self._members = members
        dead = self.dead
        with self._lock:
            deaths = self._deaths
        if deaths != self._deaths_seen:  # someone died: look for its requests for a while
            self._deaths_seen = deaths
            self._census_until = now + self.census_window_s
        live = [i for i in m["instances"] if i not in dead]
        census = now < self._census_until
        if not census:
            self._suspects.clear()
        self._resume_orphans(live, census, now)
        if self.presence is not None and now - self._last_presence >= self.presence_interval_s:
            self._last_presence = now
            self.report_presence()
        lease = self.lease_timeout_s
        if self.reply_to and lease is not None and now - self._last_lease >= min(1.0, lease / 4):
            self._last_lease = now
            for iid in live:
                inst = self.control.instance(iid)
                try:
                    if inst is not None:
                        inst.renew_lease(self.reply_to)
                except InstanceDiedError:
                    self.mark_dead(iid)
                except Exception as exc:
                    log.warning("lease renewal on %s failed: %s", iid, exc)

    def report_presence(self) -> None:
        """Tell the scheduler this frontend is attached (a failure is retried next interval)."""
        if self.presence is None:
            return
        try:
            self.control.frontend_heartbeat(self.presence())
        except Exception as exc:
            log.debug("frontend heartbeat failed: %s", exc)

    def _resume_orphans(self, live: Sequence[str], census: bool, now: float) -> None:
        """Requests that no live instance holds continue elsewhere (or end with an error).

        Fast path: the request's owner (last sender, or dispatch target) died. Census
        (for ``census_window_s`` after a death): a request may have moved to the dead
        instance before sending anything from there (its owner is then a live former
        source), so every live instance is asked which requests it holds; a request
        missing from two censuses ``census_confirm_s`` apart (a migration between two
        live instances can hide it from one census) is resumed.
        """
        active = self.requests.in_flight()
        dead = self.dead
        orphans = [h for h in active if h.stream.owner in dead]
        others = [h for h in active if h.stream.owner not in dead] if census else []
        if not orphans and not others:
            return
        ids = [h.request_id for h in orphans + others]
        holders: dict[str, str] = {}
        for iid in live:
            inst = self.control.instance(iid)
            try:
                for rid in (inst.held(ids) if inst is not None else ()):
                    holders[rid] = iid
            except InstanceDiedError:
                self.mark_dead(iid)
            except Exception as exc:  # unknown whether it holds them: decide next round
                log.warning("asking %s for orphaned requests failed: %s", iid, exc)
                return
        for h in orphans:
            if h.request_id in holders:
                self.requests.set_owner(h, holders[h.request_id])
            else:
                self._resume(h)
        for h in others:
            rid = h.request_id
            if rid in holders:
                self._suspects.pop(rid, None)
            elif now - self._suspects.setdefault(rid, now) >= self.census_confirm_s:
                self._suspects.pop(rid, None)
                self._resume(h)

    def _resume(self, handle: RequestHandle) -> None:
        """Continue ``handle``'s request on a live instance by recomputation from its prompt
        and the tokens delivered so far; fail it if no instance can."""
        req = handle.request
        if req is None:
            self._fail(handle, "its instance died and the request cannot be resumed")
            return
        point = self.requests.resume_point(handle)
        if point is None:  # it finished meanwhile
            return
        delivered, dead_owner = point
        state = MigrationRequestState(req.request_id, req.prompt_token_ids, delivered, req.sampling, req.priority,
                                      req.arrival_time, 0, SeqStatus.WAITING, 0, req.reply_to, req.objective,
                                      client_id=req.client_id, conversation_id=req.conversation_id)
        view = resume_view(req, len(delivered), self.block_size, self.clock())
        tried: set[str] = set()
        while True:
            iid = self.pick_other(view, exclude=tried)
            if iid is None:
                break
            tried.add(iid)
            inst = self.control.instance(iid)
            if inst is None:
                continue
            try:
                inst.resume_request(state)
            except InstanceDiedError:
                self.mark_dead(iid)
                continue
            except Exception as exc:  # refused (aborted there, does not fit) or unreachable
                log.warning("resuming %s on %s failed: %s", req.request_id, iid, exc)
                continue
            self.requests.resumed(handle, dead_owner, iid)
            with self._lock:
                self.resumed += 1
            log.info("request %s resumed on %s after %d tokens (%s died)", req.request_id, iid, len(delivered),
                     dead_owner)
            return
        self._fail(handle, f"its instance died ({dead_owner} last sent its tokens) and no other instance "
                           f"could continue the request")

    def pick_other(self, view: RequestLoad, exclude: Iterable[str] = ()) -> Optional[str]:
        """The dispatcher's choice if it is neither dead nor excluded, else any other such instance."""
        skip = self.dead | set(exclude)
        try:
            iid = self.control.dispatch(view)
        except Exception as exc:
            log.warning("dispatch failed: %s", exc)
            iid = None
        if iid is not None and iid not in skip:
            return iid
        try:
            ids = self.control.instance_ids()
        except Exception:
            ids = []
        others = [i for i in ids if i not in skip]
        return others[0] if others else None

    def _fail(self, handle: RequestHandle, message: str) -> None:
        if self.requests.end(handle, FinishReason.ABORT, error=message):
            log.warning("request %s failed: %s", handle.request_id, message)


def resume_view(req: Request, delivered: int, block_size: int, now: float) -> RequestLoad:
    """The dispatch view of ``req`` resumed at ``now`` after ``delivered`` tokens: as at its submission
    (priority, client, conversation or job KV key, objective), with the delivered tokens to recompute
    and its objective judged by the time left to it (``with_objective``)."""
    view = RequestLoad.queued(req.request_id, prompt_len=len(req.prompt_token_ids), block_size=block_size,
                              output_len=delivered, priority=req.priority, arrival_time=req.arrival_time,
                              conversation_id=req.conversation_id, client_id=req.client_id)
    return with_objective(view, req.objective, max(0.0, now - req.arrival_time))
