"""The frontend's fault supervision: dead instances, orphaned requests, leases.

``Cluster`` inherits ``FaultSupervision``; a supervisor thread (``start_supervisor``)
runs ``supervise_once`` every ``supervise_interval_s``:

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

The supervision state (``_dead``, ``_members``, ``_suspects``, ...) lives on the
``Cluster`` itself, so ``cluster._dead`` or ``cluster.supervise_once()`` work as
before the split.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Optional, Sequence

from llumnix_py.engines.types import FinishReason, MigrationRequestState, SeqStatus
from llumnix_py.handles import RequestHandle, TokenEvent
from llumnix_py.instance import InstanceDiedError
from llumnix_py.load import RequestLoad

if TYPE_CHECKING:
    from llumnix_py.config import ClusterConfig
    from llumnix_py.runtime.control import ControlPlane

# The cluster's logger: these records kept their logger name when this code moved out of cluster.py.
log = logging.getLogger(__name__)


class FaultSupervision:
    """Mixin for ``Cluster``: learns dead instances, resumes or fails their requests, renews leases.

    The host class provides ``config``, ``control``, ``reply_to``, ``_lock``,
    ``_handles``, ``resumed`` and ``failed``, and calls ``_init_supervision`` from
    its ``__init__``.
    """

    supervise_interval_s = 0.1  # membership checks (dead instances) and lease renewals
    census_window_s = 3.0  # after a death, look for requests no live instance holds for this long
    census_confirm_s = 0.3  # ... and resume one missing from two censuses this far apart

    # Provided by the host class (``Cluster``).
    config: "ClusterConfig"
    control: "ControlPlane"
    reply_to: str
    _lock: threading.Lock
    _handles: dict[str, RequestHandle]
    resumed: int
    failed: int

    def _init_supervision(self) -> None:
        self._dead: set[str] = set()  # instances known dead
        self._supervisor: Optional[threading.Thread] = None
        self._stop_supervisor = threading.Event()
        self._last_lease = float("-inf")
        self._dead_seen = 0
        self._members: set[str] = set()  # live instances in the last membership
        self._census_until = float("-inf")
        self._suspects: dict[str, float] = {}  # request id -> first census that missed it

    def start_supervisor(self) -> None:
        """Start watching for dead instances and renewing this frontend's leases."""
        if self._supervisor is not None:
            return
        self._stop_supervisor.clear()
        self._supervisor = threading.Thread(target=self._supervise, name="frontend-supervisor", daemon=True)
        self._supervisor.start()

    def stop_supervisor(self) -> None:
        """Stop it (``stop`` does; tests also use it to play a frontend that died)."""
        self._stop_supervisor.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)
        self._supervisor = None

    def _supervise(self) -> None:
        while not self._stop_supervisor.is_set():
            try:
                self.supervise_once()
            except Exception:
                log.exception("frontend supervision failed")
            self._stop_supervisor.wait(self.supervise_interval_s)

    def supervise_once(self) -> None:
        """One round: learn dead instances, resume their requests, renew leases."""
        m = self.control.membership()
        now = time.monotonic()
        members = set(m["instances"])
        # Dead, or gone without the scheduler saying so (it restarted meanwhile, or drained
        # it: then its requests are held elsewhere and nothing is resumed).
        for iid in set(m["dead"]) | (self._members - members):
            if iid not in self._dead:
                self._mark_dead(iid)
        self._members = members
        if len(self._dead) != self._dead_seen:  # someone died: look for its requests for a while
            self._dead_seen = len(self._dead)
            self._census_until = now + self.census_window_s
        live = [i for i in m["instances"] if i not in self._dead]
        census = now < self._census_until
        if not census:
            self._suspects.clear()
        self._resume_orphans(live, census, now)
        lease = self.config.llumlet.lease_timeout_s
        if self.reply_to and lease is not None and now - self._last_lease >= min(1.0, lease / 4):
            self._last_lease = now
            for iid in live:
                inst = self.control.instance(iid)
                try:
                    if inst is not None:
                        inst.renew_lease(self.reply_to)
                except InstanceDiedError:
                    self._mark_dead(iid)
                except Exception as exc:
                    log.warning("lease renewal on %s failed: %s", iid, exc)

    def _mark_dead(self, instance_id: str) -> None:
        with self._lock:
            self._dead.add(instance_id)
        self.control.forget(instance_id)

    def _resume_orphans(self, live: Sequence[str], census: bool, now: float) -> None:
        """Requests that no live instance holds continue elsewhere (or end with an error).

        Fast path: the request's owner (last sender, or dispatch target) died. Census
        (for ``census_window_s`` after a death): a request may have moved to the dead
        instance before sending anything from there (its owner is then a live former
        source), so every live instance is asked which requests it holds; a request
        missing from two censuses ``census_confirm_s`` apart (a migration between two
        live instances can hide it from one census) is resumed.
        """
        with self._lock:
            active = [h for h in self._handles.values() if h.placed and not h.finished]
        orphans = [h for h in active if h.stream.owner in self._dead]
        others = [h for h in active if h.stream.owner not in self._dead] if census else []
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
                self._mark_dead(iid)
            except Exception as exc:  # unknown whether it holds them: decide next round
                log.warning("asking %s for orphaned requests failed: %s", iid, exc)
                return
        for h in orphans:
            if h.request_id in holders:
                with self._lock:
                    h.stream.owner = holders[h.request_id]
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
        with self._lock:
            if handle.finished:
                return
            delivered = tuple(handle.token_ids)
            dead_owner = handle.stream.owner
        state = MigrationRequestState(req.request_id, req.prompt_token_ids, delivered, req.sampling, req.priority,
                                      req.arrival_time, 0, SeqStatus.WAITING, 0, req.reply_to)
        block = self.config.engine.engine.block_size
        view = RequestLoad.queued(req.request_id, prompt_len=len(req.prompt_token_ids), block_size=block,
                                  output_len=len(delivered), priority=req.priority, arrival_time=req.arrival_time)
        tried: set[str] = set(self._dead)
        while True:
            iid = self._pick_other(view, exclude=tried)
            if iid is None:
                break
            tried.add(iid)
            inst = self.control.instance(iid)
            if inst is None:
                continue
            try:
                inst.resume_request(state)
            except InstanceDiedError:
                self._mark_dead(iid)
                continue
            except Exception as exc:  # refused (aborted there, does not fit) or unreachable
                log.warning("resuming %s on %s failed: %s", req.request_id, iid, exc)
                continue
            with self._lock:
                if handle.stream.owner == dead_owner:
                    handle.stream.owner = iid
                handle.resumes += 1
                self.resumed += 1
            log.info("request %s resumed on %s after %d tokens (%s died)", req.request_id, iid, len(delivered),
                     dead_owner)
            return
        self._fail(handle, f"its instance died ({dead_owner} last sent its tokens) and no other instance "
                           f"could continue the request")

    def _pick_other(self, view: RequestLoad, exclude: set[str]) -> Optional[str]:
        """The dispatcher's choice if it is not excluded, else any other live instance."""
        try:
            iid = self.control.dispatch(view)
        except Exception as exc:
            log.warning("dispatch failed: %s", exc)
            iid = None
        if iid is not None and iid not in exclude:
            return iid
        try:
            ids = self.control.instance_ids()
        except Exception:
            ids = []
        others = [i for i in ids if i not in exclude]
        return others[0] if others else None

    def _fail(self, handle: RequestHandle, message: str) -> None:
        with self._lock:
            if handle.finished:
                return
            handle.finish_reason = FinishReason.ABORT
            handle.error = message
            handle.finished_at = time.monotonic()
            self._handles.pop(handle.request_id, None)
            self.failed += 1
            ev = TokenEvent(handle.request_id, (), handle.stream.next_index, handle.stream.owner,
                            FinishReason.ABORT, error=message)
        log.warning("request %s failed: %s", handle.request_id, message)
        handle._deliver(ev)
