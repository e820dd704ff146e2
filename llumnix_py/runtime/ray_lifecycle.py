"""The scheduler daemon's lifecycle on a Ray cluster: start it once, inspect it, stop it.

What ``llumnix-py scheduler`` (start), ``--status`` and ``--stop`` do, as functions
over one Ray namespace; the caller has joined the cluster (``init_ray``). The daemon
is the named scheduler actor plus the detached instance actors it launched (see
``ray_runtime``); a namespace holds at most one daemon.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import ray

from llumnix_py.errors import LlumnixError
from llumnix_py.runtime import ray_runtime


class SchedulerRunningError(LlumnixError):
    """A scheduler is already running in the namespace (a second one is refused)."""


class NoSchedulerError(LlumnixError):
    """No scheduler (and, for ``stop_daemon``, no instance) is running in the namespace."""


@dataclass(frozen=True)
class StopReport:
    """What ``stop_daemon`` stopped.

    Attributes:
        scheduler: a live scheduler was stopped (False: only orphaned instances were).
        instances: the instance actors that were running, by id.
    """

    scheduler: bool
    instances: tuple[str, ...]


def live_scheduler(namespace: str, timeout_s: float = 10.0) -> Optional[Any]:
    """The named scheduler actor of ``namespace`` if it exists and answers, else None."""
    try:
        actor = ray_runtime.get_scheduler(namespace)
    except ValueError:  # no actor of that name
        return None
    try:
        ray.get(actor.ping.remote(), timeout=timeout_s)
    except ray.exceptions.RayActorError:  # dead, its name not released yet
        return None
    except ray.exceptions.GetTimeoutError:  # alive but slow to answer: still the running scheduler
        pass
    return actor


def instance_ids(namespace: str) -> list[str]:
    """Ids of the instance actors running in ``namespace`` (with or without a scheduler)."""
    return [name[len(ray_runtime.INSTANCE_PREFIX):] for name in ray_runtime.instance_actor_names(namespace)]


def _named_actors(namespace: str) -> list[str]:
    """The daemon's actors (scheduler, instances) that Ray still lists in ``namespace``."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == namespace and (a["name"] == ray_runtime.SCHEDULER_NAME
                                                         or a["name"].startswith(ray_runtime.INSTANCE_PREFIX)))


def stopped_on_purpose(namespace: str) -> bool:
    """The daemon of ``namespace`` was stopped by ``stop_daemon`` (and not started since)."""
    return ray_runtime.stopped_on_purpose(namespace)


def start_daemon(config) -> tuple[Any, list[str]]:
    """Start the scheduler and ``config.num_instances`` instances (attaching orphaned ones);
    returns the actor and the instance ids. ``SchedulerRunningError`` if one runs already."""
    if live_scheduler(config.ray_namespace) is not None:
        raise SchedulerRunningError(f"a scheduler is already running in namespace {config.ray_namespace!r}")
    try:
        actor = ray_runtime.start_scheduler(config)
    except ray.exceptions.ActorAlreadyExistsError:  # another start won the race for the name
        raise SchedulerRunningError(f"a scheduler is already running in namespace {config.ray_namespace!r}") \
            from None
    return actor, ray.get(actor.call.remote("instance_ids"), timeout=ray_runtime.CALL_TIMEOUT_S)


def daemon_state(namespace: str) -> dict[str, Any]:
    """The running scheduler's ``state()`` (instances and their loads, migrations, frontends)."""
    actor = live_scheduler(namespace)
    if actor is None:
        raise NoSchedulerError(f"no scheduler is running in namespace {namespace!r}")
    return ray.get(actor.call.remote("state"), timeout=ray_runtime.CALL_TIMEOUT_S)


def stop_daemon(namespace: str, timeout_s: float = 60.0) -> StopReport:
    """Stop the scheduler and every instance of ``namespace``; returns once none is listed.

    The scheduler stops its instances; instances it could not stop, or that outlived a
    dead scheduler (they are detached), are killed. ``NoSchedulerError`` if neither a
    scheduler nor an instance is running.
    """
    actor = live_scheduler(namespace)
    running = tuple(instance_ids(namespace))
    if actor is None and not running:
        raise NoSchedulerError(f"no scheduler is running in namespace {namespace!r}")
    ray_runtime.mark_stopped(namespace)  # first: a watchdog must not bring it back
    if actor is not None:
        try:
            ray.get(actor.call.remote("stop", (True,)), timeout=timeout_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            pass  # it died or hung while stopping: killed below, with whatever instances are left
        ray.kill(actor, no_restart=True)
    ray_runtime.kill_instances(namespace)
    deadline = time.monotonic() + timeout_s
    while _named_actors(namespace):
        if time.monotonic() > deadline:
            raise LlumnixError(f"the daemon in namespace {namespace!r} is still listed {timeout_s} s after stopping")
        time.sleep(0.1)  # Ray releases a killed actor's name asynchronously
    return StopReport(scheduler=actor is not None, instances=running)
