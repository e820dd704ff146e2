"""``SimConfig``: the parameters of one simulated cluster.

A ``SimConfig`` fixes everything a simulator run depends on besides the workload:
the number of instances at time 0, the cost profile (which sets the KV pool and
the step / copy costs), the scheduler's policies and periods, the migration
protocol's settings, and the virtual-time constants of the event model (instance
start-up, control round trips). It also derives the ``SchedulerConfig`` and the
``EngineConfig`` that the simulated cluster builds its scheduler and engines from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

from llumnix_py.engines.core import EngineConfig
from llumnix_py.engines.sim.cost_model import CostProfile
from llumnix_py.engines.sim.profiles import PROFILES, with_tensor_parallel
from llumnix_py.llumlet_types import PREFILL_FIRST_STEPS, check_prefill_first_steps
from llumnix_py.scheduler.core import SchedulerConfig
from migration import protocol as p
from policies.config import PolicyConfig
from policies.roles import RoleFlipConfig, migrations_at_once, parse_pd_ratio


BATCH_POLICIES = ("fcfs", "edf", "jit")


@dataclass(frozen=True)
class SimConfig:
    """A simulated cluster.

    Attributes:
        num_instances: instances at time 0.
        profile: cost profile name in ``PROFILES`` (or a ``CostProfile``).
        policy: dispatch / pairing / migrate-out / scaling policies and thresholds.
        enable_migration: run migration rounds (INFaaS++ and round-robin: False).
        enable_scaling: run scaling rounds.
        min_instances / max_instances: override the policy's bounds when set.
        poll_interval_s: load poll (scheduler tick) period, virtual seconds.
        migration_interval_s: migration round period, virtual seconds.
        migration: stages, last-stage threshold, mode of each migration.
        seed: seeds the dispatcher's random choices.
        instance_startup_s: scale-out decision -> instance registered.
        rpc_latency_s: one control round trip to a destination.
        num_blocks: KV blocks per instance (default: the profile's).
        max_batch_size / max_batched_tokens / watermark: engine limits.
        sample_interval_s: period of the usage / fragmentation time series.
        max_migrations_out / max_migrations_in: concurrent migrations per instance (None: as
            ``SchedulerConfig``: out 1, or ``PD_MIGRATIONS_AT_ONCE`` with ``pd_ratio``; in: as out).
        batch_policy: each engine's batching: ``fcfs`` (priorities, then arrival; the default),
            ``edf`` (earliest due time first) or ``jit`` (``policies.jit``, by margin).
        length_estimator: the JIT policy's length bound: ``quantile`` (from the instance's prior
            of recent lengths, refined as tokens come) or ``oracle`` (the true length).
        length_quantile: the quantile of the ``quantile`` estimator.
        jit_skip_slack: the JIT policy lets running requests with much slack sit out a step for an
            urgent request that would miss otherwise (``policies.jit.JitParams.skip_slack``).
        pd_ratio: ``(P, D)`` or ``"P:D"``: prefill/decode disaggregation (instances get
            roles in this ratio as they start; ``policies.roles``); None: colocated.
        role_flip: flip roles at run time (``policies.roles.plan_role_flip``); None: fixed.
        decode_hold_s: a ``decode`` instance holds a never-prefilled request queued on it this
            long for the scheduler to redirect (``llumnix_py.prefill_hold``); 0: no hold.
        prefill_first_steps: a ``prefill`` instance prefills waiting prompts alone for up to
            this many steps in a row before its running batch (requests waiting for their
            hand-off) decodes (``LlumletConfig.prefill_first_steps``); 0: every step decodes.
        engine_prefill_first_steps: every engine's own prompts-first count, whatever its role
            (``EngineConfig.prefill_first_steps``; 1000: vLLM <= 0.3's prompt-only steps);
            default 0: every step also decodes.
        conversation_blocks: host blocks per instance that keep finished turns of conversations
            and calls of compound jobs for their next turn or call (``engines/conversations.py``;
            0: none). The host pool has exactly these blocks, and preemption recomputes.
        instances_per_node: place instances on nodes, this many a node in the order they
            start (the k-th on node ``k // instances_per_node``): a migration between two
            nodes copies at the profile's ``cross_node_link_gbps``, within one node at its
            ``link_gbps``; None (default): one node, every copy at ``link_gbps``.
        tp_prefill / tp_decode: tensor-parallel degree of each instance that prefills
            (``prefill`` and ``both``) / of each ``decode`` instance: it runs on that many
            GPUs of the profile (``profiles.with_tensor_parallel``; only for profiles with
            an all-reduce link). Default 1: the profile as it is.
    """

    num_instances: int = 4
    profile: Union[str, CostProfile] = "llama-7b-a10"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    enable_migration: bool = True
    enable_scaling: bool = False
    min_instances: Optional[int] = None
    max_instances: Optional[int] = None
    poll_interval_s: float = 0.05
    migration_interval_s: float = 0.1
    migration: p.MigrationConfig = field(default_factory=p.MigrationConfig)
    seed: int = 0
    instance_startup_s: float = 10.0
    rpc_latency_s: float = 0.001
    num_blocks: Optional[int] = None
    max_batch_size: int = 256
    max_batched_tokens: int = 8192
    watermark: float = 0.01
    sample_interval_s: float = 1.0
    max_migrations_out: Optional[int] = None
    max_migrations_in: Optional[int] = None
    batch_policy: str = "fcfs"
    length_estimator: str = "quantile"
    length_quantile: float = 0.9
    jit_skip_slack: bool = False
    pd_ratio: Optional[tuple[int, int]] = None
    role_flip: Optional[RoleFlipConfig] = None
    decode_hold_s: float = 1.0
    prefill_first_steps: int = PREFILL_FIRST_STEPS
    engine_prefill_first_steps: int = 0
    conversation_blocks: int = 0
    instances_per_node: Optional[int] = None
    tp_prefill: int = 1
    tp_decode: int = 1

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError("num_instances must be >= 1")
        if isinstance(self.profile, str) and self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; known: {sorted(PROFILES)}")
        for name in ("poll_interval_s", "migration_interval_s", "sample_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.batch_policy not in BATCH_POLICIES:
            raise ValueError(f"unknown batch policy {self.batch_policy!r}; known: {list(BATCH_POLICIES)}")
        if self.length_estimator not in ("quantile", "oracle"):
            raise ValueError(f"unknown length estimator {self.length_estimator!r}; known: ['oracle', 'quantile']")
        if not 0 < self.length_quantile <= 1:
            raise ValueError("length_quantile must be in (0, 1]")
        if isinstance(self.conversation_blocks, bool) or not isinstance(self.conversation_blocks, int) \
                or self.conversation_blocks < 0:
            raise ValueError(f"conversation_blocks must be an integer >= 0, got {self.conversation_blocks!r}")
        if not 0 <= self.decode_hold_s <= 3600:
            raise ValueError(f"decode_hold_s must be in [0, 3600] seconds, got {self.decode_hold_s}")
        check_prefill_first_steps(self.prefill_first_steps)
        check_prefill_first_steps(self.engine_prefill_first_steps)
        if self.instance_startup_s < 0 or self.rpc_latency_s < 0:
            raise ValueError("instance_startup_s and rpc_latency_s must be >= 0")
        if self.pd_ratio is not None:
            object.__setattr__(self, "pd_ratio", parse_pd_ratio(self.pd_ratio))
            if self.num_instances < sum(self.pd_ratio):
                raise ValueError(f"a {self.pd_ratio[0]}:{self.pd_ratio[1]} split needs at least "
                                 f"{sum(self.pd_ratio)} instances, got {self.num_instances}")
        out, into = migrations_at_once(self.max_migrations_out, self.max_migrations_in, self.pd_ratio is not None)
        object.__setattr__(self, "max_migrations_out", out)
        object.__setattr__(self, "max_migrations_in", into)
        per_node = self.instances_per_node
        if per_node is not None and (isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 1):
            raise ValueError(f"instances_per_node must be an integer >= 1, got {per_node!r}")
        for degree in {self.tp_prefill, self.tp_decode}:
            with_tensor_parallel(self.cost_profile, degree)  # ValueError where the profile cannot
        bounds = {}
        if self.min_instances is not None:
            bounds["min_instances"] = self.min_instances
        if self.max_instances is not None:
            bounds["max_instances"] = self.max_instances
        if bounds:
            object.__setattr__(self, "policy", dataclasses.replace(self.policy, **bounds))

    @property
    def cost_profile(self) -> CostProfile:
        """The ``CostProfile`` named by ``profile`` (or ``profile`` itself)."""
        return PROFILES[self.profile] if isinstance(self.profile, str) else self.profile

    def scheduler_config(self) -> SchedulerConfig:
        """The ``GlobalScheduler`` config: this policy, periods and limits; orders never time out."""
        return SchedulerConfig(
            policy=self.policy, poll_interval_s=self.poll_interval_s, migration_interval_s=self.migration_interval_s,
            enable_migration=self.enable_migration, enable_scaling=self.enable_scaling,
            max_migrations_out=self.max_migrations_out, max_migrations_in=self.max_migrations_in,
            migration_order_timeout_s=1e9, pd_ratio=self.pd_ratio, role_flip=self.role_flip)

    def role_profile(self, role: str) -> CostProfile:
        """The hardware of an instance of ``role``: the profile at ``tp_decode`` GPUs for
        ``decode``, at ``tp_prefill`` for the others."""
        return with_tensor_parallel(self.cost_profile, self.tp_decode if role == "decode" else self.tp_prefill)

    def engine_config(self) -> EngineConfig:
        """Each instance's engine config: the profile's KV pool (or ``num_blocks``) and the engine
        limits (an instance re-sized by ``role_profile`` gets its own pool: ``SimCluster``)."""
        prof = self.cost_profile
        return EngineConfig(num_blocks=self.num_blocks or prof.num_blocks, block_size=prof.block_size,
                            watermark=self.watermark, max_batch_size=self.max_batch_size,
                            max_batched_tokens=self.max_batched_tokens, num_host_blocks=self.conversation_blocks,
                            conversation_host_blocks=self.conversation_blocks, preemption_mode="recompute",
                            prefill_first_steps=self.engine_prefill_first_steps)
