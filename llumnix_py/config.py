"""All of llumnix-py's configuration in one place: nested, validated dataclasses.

Built from CLI flags (``llumnix_py.cli``) or code; no module reads the environment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from llumnix_py.engines.core import EngineConfig
from llumnix_py.engines.registry import EngineSpec
from llumnix_py.healing import RestartPolicy
from llumnix_py.llumlet_types import LlumletConfig
from llumnix_py.scheduler.core import SchedulerConfig
from migration.protocol import MigrationConfig
from policies.config import PolicyConfig

__all__ = ["ClusterConfig", "EngineConfig", "EngineSpec", "LlumletConfig", "MigrationConfig", "PolicyConfig",
           "RestartPolicy", "SchedulerConfig"]


@dataclass(frozen=True)
class ClusterConfig:
    """A deployment: N instances of one engine, a scheduler, and how they run.

    Attributes:
        num_instances: instances at start.
        engine: what each instance runs.
        scheduler: policies and intervals of the global scheduler.
        llumlet: per-instance settings (``instance_id`` is set per instance). Its concurrent
            migrations (``max_outgoing``, ``max_incoming``) are raised to the scheduler's
            ``max_migrations_out`` / ``max_migrations_in`` where lower.
        runtime: ``ray`` (actors; one machine or a cluster) or ``local`` (one process).
        ray_address: an existing Ray cluster to join (None: start a local one).
        ray_namespace: Ray namespace of the named actors.
        detached: Ray actors outlive the driver (a scheduler restart finds its instances).
        model_name: the name the OpenAI API reports.
        host: address listeners bind (token receiver); loopback unless told otherwise.
        seed: seeds dispatch's random choices.
        secret: shared secret for the internal ZeroMQ sockets (migrations, tokens); required
            in practice when ``host`` is not loopback. Given to every llumlet.
        scheduler_restart: how a dead scheduler is restarted (Ray: by the watchdog of the
            frontend that started the deployment, or of ``llumnix-py scheduler``).
    """

    num_instances: int = 2
    engine: EngineSpec = field(default_factory=EngineSpec)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    llumlet: LlumletConfig = field(default_factory=lambda: LlumletConfig(instance_id="template"))
    runtime: str = "ray"
    ray_address: Optional[str] = None
    ray_namespace: str = "llumnix"
    detached: bool = False
    model_name: str = "llumnix-tiny"
    host: str = "127.0.0.1"
    seed: int = 0
    secret: Optional[str] = field(default=None, repr=False)
    scheduler_restart: RestartPolicy = field(default_factory=RestartPolicy)

    def __post_init__(self) -> None:
        if self.num_instances < 0:
            raise ValueError("num_instances must be >= 0")
        if self.runtime not in ("ray", "local"):
            raise ValueError(f"runtime must be 'ray' or 'local', got {self.runtime!r}")
        if not self.model_name:
            raise ValueError("model_name must be non-empty")
        ratio = self.scheduler.pd_ratio
        if ratio is not None and 0 < self.num_instances < sum(ratio):
            raise ValueError(f"a prefill:decode split of {ratio[0]}:{ratio[1]} needs at least {sum(ratio)} "
                             f"instances, got {self.num_instances}")
        roles = self.scheduler.roles
        if roles is not None and self.num_instances > 0 and self.num_instances != len(roles):
            raise ValueError(f"{len(roles)} roles listed ({','.join(r.value for r in roles)}) for "
                             f"{self.num_instances} instances: give one role per instance")
        sched, llumlet = self.scheduler, self.llumlet
        if llumlet.max_outgoing < sched.max_migrations_out or llumlet.max_incoming < sched.max_migrations_in:
            # a llumlet below the scheduler's limits would refuse the orders it is sent
            object.__setattr__(self, "llumlet", dataclasses.replace(
                llumlet, max_outgoing=max(llumlet.max_outgoing, sched.max_migrations_out),
                max_incoming=max(llumlet.max_incoming, sched.max_migrations_in)))
        if self.secret is not None and self.llumlet.secret is None:
            object.__setattr__(self, "llumlet", dataclasses.replace(self.llumlet, secret=self.secret))
