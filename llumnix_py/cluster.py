"""The Python library API: start or attach to a cluster, submit, stream, abort, inspect.

    cluster = Cluster.start(ClusterConfig(num_instances=2, runtime="local"))
    handle = cluster.submit(cluster.tokenizer.encode("Hello"), SamplingParams(max_tokens=16))
    async for event in handle:          # or handle.result() from synchronous code
        print(event.token_ids, event.instance_id)
    cluster.stop()

A frontend (the HTTP server, or your code) owns a ``Cluster``: it dispatches each
request through the global scheduler, sends it to the chosen llumlet, and
reassembles the tokens that arrive from whichever instance holds the request,
dropping duplicates and reordering by position across migrations.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Sequence

from llumnix_py.config import ClusterConfig
from llumnix_py.engines.types import FinishReason, Request, RequestOutput, SamplingParams
from llumnix_py.errors import InvalidRequestError, LlumnixError, UnknownRequestError
from llumnix_py.runtime.base import InstanceHandle
from llumnix_py.tokens import CallbackSink, OrderedStream, TokenReceiver
from policies.types import RequestView


class NoInstanceError(LlumnixError):
    """No instance can take a request (none running, or all terminating)."""


@dataclass(frozen=True)
class TokenEvent:
    """Tokens of one request that became deliverable, in order."""

    request_id: str
    token_ids: tuple[int, ...]
    index: int  # output position of token_ids[0]
    instance_id: str  # the instance that sent them
    finish_reason: Optional[FinishReason] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class ControlPlane(abc.ABC):
    """The scheduler and the instances as a frontend sees them."""

    @abc.abstractmethod
    def dispatch(self, request: RequestView) -> Optional[str]: ...

    @abc.abstractmethod
    def instance(self, instance_id: str) -> Optional[InstanceHandle]: ...

    @abc.abstractmethod
    def instance_ids(self) -> list[str]: ...

    @abc.abstractmethod
    def state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def drain(self, instance_id: str) -> None: ...

    @abc.abstractmethod
    def launch(self, n: int) -> list[str]: ...

    @abc.abstractmethod
    def stop(self) -> None: ...


class RequestHandle:
    """One submitted request: iterate its ``TokenEvent``s (async) or wait for ``result``."""

    def __init__(self, cluster: "Cluster", request_id: str, instance_id: str) -> None:
        self.cluster = cluster
        self.request_id = request_id
        self.instance_id = instance_id  # where it was dispatched
        self.stream = OrderedStream(owner=instance_id)
        self.submitted_at = time.monotonic()
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.instances_seen: list[str] = [instance_id]
        self._q: "queue.SimpleQueue[TokenEvent]" = queue.SimpleQueue()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._aq: Optional[asyncio.Queue] = None
        self.token_ids: list[int] = []
        self.finish_reason: Optional[FinishReason] = None

    def _bind_loop(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._aq = asyncio.Queue()
        except RuntimeError:
            self._loop = None

    def _deliver(self, ev: TokenEvent) -> None:
        if self._loop is not None and self._aq is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, ev)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        else:
            self._q.put(ev)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[TokenEvent]:
        if self._aq is None:
            raise RuntimeError("submit() the request from a running event loop to iterate it asynchronously")
        while True:
            ev = await self._aq.get()
            yield ev
            if ev.finished:
                return

    def events(self, timeout: Optional[float] = None):
        """Synchronous iteration (for requests submitted outside an event loop)."""
        while True:
            ev = self._q.get(timeout=timeout)
            yield ev
            if ev.finished:
                return

    def result(self, timeout: Optional[float] = 60.0) -> list[int]:
        """Block until the request finishes; returns all its tokens."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self._q.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s") from None
        return list(self.token_ids)


class Cluster:
    """A running llumnix-py deployment, seen from a frontend."""

    def __init__(self, config: ClusterConfig, control: ControlPlane, tokenizer, max_model_len: int,
                 receiver: Optional[TokenReceiver] = None) -> None:
        self.config = config
        self.control = control
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.model_name = config.model_name
        self._receiver = receiver
        self.reply_to = receiver.address if receiver else ""
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.duplicates_dropped = 0
        self.misrouted = 0  # outputs an instance sent to another frontend address (in-process runtime)

    # ----- construction ----------------------------------------------------------------
    @classmethod
    def start(cls, config: ClusterConfig, **ray_init_kw: Any) -> "Cluster":
        """Start a deployment: the scheduler and ``config.num_instances`` instances."""
        tokenizer, max_len = _frontend_model_info(config)
        if config.runtime == "local":
            from llumnix_py.runtime.local import LocalLauncher
            from llumnix_py.scheduler.daemon import SchedulerDaemon

            holder: dict[str, Cluster] = {}
            address = f"local://frontend-{uuid.uuid4().hex[:8]}"

            def deliver(iid: str, reply_to: str, outs: Sequence[RequestOutput]) -> None:
                # Honour reply_to exactly as the ZeroMQ path does, so routing bugs show up in-process too.
                if reply_to == address:
                    holder["c"].on_outputs(iid, outs)
                else:
                    holder["c"].misrouted += len(outs)

            sink = lambda: CallbackSink(deliver)  # noqa: E731
            daemon = SchedulerDaemon(config.scheduler, LocalLauncher(config.engine, config.llumlet, sink),
                                     seed=config.seed)
            cluster = cls(config, LocalControlPlane(daemon), tokenizer, max_len)
            cluster.reply_to = address
            holder["c"] = cluster
            daemon.launch(config.num_instances)
            daemon.start()
            return cluster
        from llumnix_py.runtime import ray_runtime

        ray_runtime.init_ray(config.ray_address, config.ray_namespace, **ray_init_kw)
        actor = ray_runtime.start_scheduler(config)
        return cls._with_receiver(config, RayControlPlane(actor, config.ray_namespace), tokenizer, max_len)

    @classmethod
    def attach(cls, config: ClusterConfig, **ray_init_kw: Any) -> "Cluster":
        """A new frontend for a running Ray deployment (its scheduler actor by name)."""
        from llumnix_py.runtime import ray_runtime

        ray_runtime.init_ray(config.ray_address, config.ray_namespace, **ray_init_kw)
        actor = ray_runtime.get_scheduler(config.ray_namespace)
        tokenizer, max_len = _frontend_model_info(config)
        return cls._with_receiver(config, RayControlPlane(actor, config.ray_namespace, owner=False), tokenizer,
                                  max_len)

    @classmethod
    def _with_receiver(cls, config, control, tokenizer, max_len) -> "Cluster":
        holder: dict[str, Cluster] = {}
        receiver = TokenReceiver(lambda iid, outs: holder["c"].on_outputs(iid, outs), host=config.host)
        receiver.start()
        cluster = cls(config, control, tokenizer, max_len, receiver)
        holder["c"] = cluster
        return cluster

    def stop(self) -> None:
        """Stop the deployment (when this frontend started it) and the token receiver."""
        self.control.stop()
        if self._receiver is not None:
            self._receiver.stop()

    # ----- requests ----------------------------------------------------------------------
    def submit(self, prompt_token_ids: Sequence[int], sampling: Optional[SamplingParams] = None,
               priority: int = 0, request_id: Optional[str] = None) -> RequestHandle:
        """Dispatch a request; raises ``InvalidRequestError`` or ``NoInstanceError``."""
        sampling = sampling or SamplingParams()
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        prompt = tuple(prompt_token_ids)
        if len(prompt) + 1 > self.max_model_len:
            raise InvalidRequestError(f"prompt of {len(prompt)} tokens leaves no room for output "
                                      f"(max_model_len {self.max_model_len})")
        request = Request(rid, prompt, sampling, priority, time.time(), reply_to=self.reply_to)
        block = self.config.engine.engine.block_size
        view = RequestView(rid, 0, -(-len(prompt) // block), priority, request.arrival_time, len(prompt), 0)
        iid = self.control.dispatch(view)
        if iid is None:
            raise NoInstanceError("no instance can take requests")
        handle = RequestHandle(self, rid, iid)
        handle._bind_loop()
        with self._lock:
            if rid in self._handles:
                raise InvalidRequestError(f"request id {rid} is in use")
            self._handles[rid] = handle
        inst = self.control.instance(iid)
        try:
            if inst is None:
                raise NoInstanceError(f"instance {iid} is gone")
            inst.add_request(request)
        except Exception:
            with self._lock:
                self._handles.pop(rid, None)
            raise
        return handle

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is (broadcast: it may be migrating)."""
        with self._lock:
            handle = self._handles.pop(request_id, None)
        if handle is None:
            raise UnknownRequestError(f"request {request_id} is not active")
        for iid in self.control.instance_ids():
            inst = self.control.instance(iid)
            if inst is not None:
                try:
                    inst.abort(request_id)
                except Exception:
                    pass
        if not handle.finished:
            handle.finish_reason = FinishReason.ABORT
            handle._deliver(TokenEvent(request_id, (), handle.stream.next_index, handle.stream.owner,
                                       FinishReason.ABORT))

    def on_outputs(self, instance_id: str, outputs: Sequence[RequestOutput]) -> None:
        """Token batches from llumlets (any thread)."""
        now = time.monotonic()
        for out in outputs:
            with self._lock:
                handle = self._handles.get(out.request_id)
                if handle is None:
                    continue
                before = handle.stream.duplicates
                ready, done = handle.stream.push(instance_id, out)
                self.duplicates_dropped += handle.stream.duplicates - before
                if instance_id != handle.instances_seen[-1]:
                    handle.instances_seen.append(instance_id)
                if not ready and not done:
                    continue
                index = handle.stream.next_index - len(ready)
                handle.token_ids.extend(ready)
                if ready and handle.first_token_at is None:
                    handle.first_token_at = now
                reason = handle.stream.finish_reason if done else None
                if done:
                    handle.finish_reason = reason
                    handle.finished_at = now
                    self._handles.pop(out.request_id, None)
            handle._deliver(TokenEvent(out.request_id, tuple(ready), index, instance_id, reason))

    def active_requests(self) -> list[str]:
        with self._lock:
            return list(self._handles)

    # ----- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Instances (load, freeness), migrations by outcome, downtimes, scale events."""
        s = self.control.state()
        s["active_requests"] = len(self._handles)
        s["duplicates_dropped"] = self.duplicates_dropped
        s["misrouted_outputs"] = self.misrouted
        return s

    def instance_ids(self) -> list[str]:
        return self.control.instance_ids()

    def drain(self, instance_id: str) -> None:
        """Scale in one instance: it migrates its requests away, then stops."""
        self.control.drain(instance_id)

    def launch(self, n: int = 1) -> list[str]:
        """Scale out by hand: start ``n`` more instances; returns their ids."""
        return self.control.launch(n)


class LocalControlPlane(ControlPlane):
    def __init__(self, daemon) -> None:
        self.daemon = daemon

    def dispatch(self, request: RequestView) -> Optional[str]:
        return self.daemon.dispatch(request)

    def instance(self, instance_id: str) -> Optional[InstanceHandle]:
        return self.daemon.handle(instance_id)

    def instance_ids(self) -> list[str]:
        return self.daemon.instance_ids()

    def state(self) -> dict[str, Any]:
        return self.daemon.state()

    def drain(self, instance_id: str) -> None:
        self.daemon.drain(instance_id)

    def launch(self, n: int) -> list[str]:
        return self.daemon.launch(n)

    def stop(self) -> None:
        self.daemon.stop()


class RayControlPlane(ControlPlane):
    def __init__(self, actor, namespace: str, owner: bool = True) -> None:
        self.actor = actor
        self.namespace = namespace
        self.owner = owner
        self._instances: dict[str, InstanceHandle] = {}

    def _get(self, ref):
        import ray

        return ray.get(ref, timeout=30)

    def dispatch(self, request: RequestView) -> Optional[str]:
        return self._get(self.actor.dispatch.remote(request))

    def instance(self, instance_id: str) -> Optional[InstanceHandle]:
        handle = self._instances.get(instance_id)
        if handle is None:
            import ray

            from llumnix_py.runtime.ray_runtime import INSTANCE_PREFIX, RayInstance

            try:
                actor = ray.get_actor(INSTANCE_PREFIX + instance_id, namespace=self.namespace)
            except ValueError:
                return None
            handle = RayInstance(instance_id, "", actor)
            self._instances[instance_id] = handle
        return handle

    def instance_ids(self) -> list[str]:
        return self._get(self.actor.instance_ids.remote())

    def state(self) -> dict[str, Any]:
        return self._get(self.actor.state.remote())

    def drain(self, instance_id: str) -> None:
        self._get(self.actor.drain.remote(instance_id))

    def launch(self, n: int) -> list[str]:
        import ray

        return ray.get(self.actor.launch.remote(n), timeout=300)

    def stop(self) -> None:
        if not self.owner:
            return
        import ray

        try:
            self._get(self.actor.stop.remote(True))
        finally:
            ray.kill(self.actor)


def _frontend_model_info(config: ClusterConfig):
    """The tokenizer and the context limit a frontend validates requests against."""
    from llumnix_py.engines.torch_engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.engine.checkpoint)
    spec = config.engine
    limit = spec.max_model_len
    if spec.kind == "torch":
        if spec.checkpoint:
            import json
            from pathlib import Path

            positions = json.loads((Path(spec.checkpoint) / "config.json").read_text()).get(
                "max_position_embeddings", 2048)
        else:
            from llumnix_py.engines.torch_engine.model import ModelConfig

            positions = ModelConfig(**dict(spec.model)).max_position_embeddings
        limit = min(limit or positions, positions)
    return tokenizer, limit or 1 << 20
