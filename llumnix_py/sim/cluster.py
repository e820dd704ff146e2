"""A discrete-event simulator of a llumnix-py cluster on a virtual clock.

It runs the code that serves real traffic: every instance is an ``EngineCore``
(block manager + batching scheduler) over a ``SimExecutor``; dispatch, migration
pairing and scaling are the real ``GlobalScheduler``; each migration is a real
``SourceMigration`` driven action by action by the real ``MigrationDriver`` over a
``LocalPort`` to the destination's ``DestinationMigrations``. Only the clock (a
heap of events, never a sleep) and the executor (a cost model) are swapped.

Events and what each does (all engine mutations happen at event times, single
threaded, so interleavings are exact and a run is deterministic for a seed)::

    arrival          dispatch (scheduler) -> engine.add_request -> wake the instance
    step end         deliver the step's tokens; run freezes deferred to this
                     iteration boundary; start the next step if there is work
    tick             (every poll_interval_s) poll changed instances' loads; every
                     migration_interval_s a migration round; a scaling round;
                     remove drained instances; sample the time series
    migration        an action's reply arrives; the machine picks the next action
    instance start   a scaled-out instance registers (instance_startup_s after the
                     decision)

Timing model:

* A step is planned and applied (``engine.step()``) when it starts; its tokens are
  delivered ``duration_s`` later, when the next step may start. So a request that
  finishes frees its blocks at the start of its last step (one step early).
* ``CopyBlocks`` takes ``profile.migration_time(blocks)``; a destination call
  (pre-allocate, commit, abort) ``rpc_latency_s``; engine-local calls (incremental
  blocks, free) no time. ``Freeze`` waits for the source's iteration boundary (the
  end of its running step). The source keeps stepping during pre-copy stages; from
  freeze to commit the request makes no progress (downtime).
* A scale-out decision launches an instance that registers ``instance_startup_s``
  later (default 10 s: loading LLaMA-7B weights onto a warm GPU); no further scaling
  decision is taken while a launch is in flight (as the daemon, whose launch blocks).
  Scale-in marks the instance terminating; it drains by migration and is removed
  once ``GlobalScheduler.drained`` lists it.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from llumnix_py.engines.core import EngineConfig, EngineCore
from llumnix_py.engines.sequence import cdiv
from llumnix_py.engines.sim.cost_model import CostProfile
from llumnix_py.engines.sim.executor import SimExecutor
from llumnix_py.engines.sim.profiles import PROFILES
from llumnix_py.engines.types import Request, SamplingParams, StepOutput
from llumnix_py.scheduler.core import GlobalScheduler, MigrationOrder, SchedulerConfig
from llumnix_py.sim.metrics import RequestRecord, SimResult, Timeline
from migration import protocol as p
from migration.destination import DestinationMigrations
from migration.driver import LocalPort, MigrationDriver, MigrationResult
from policies.config import PolicyConfig
from policies.types import RequestView, ScaleAction

_EPS = 1e-9


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
        max_migrations_out / max_migrations_in: concurrent migrations per instance.
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
    max_migrations_out: int = 1
    max_migrations_in: int = 1

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError("num_instances must be >= 1")
        if isinstance(self.profile, str) and self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; known: {sorted(PROFILES)}")
        for name in ("poll_interval_s", "migration_interval_s", "sample_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.instance_startup_s < 0 or self.rpc_latency_s < 0:
            raise ValueError("instance_startup_s and rpc_latency_s must be >= 0")
        bounds = {}
        if self.min_instances is not None:
            bounds["min_instances"] = self.min_instances
        if self.max_instances is not None:
            bounds["max_instances"] = self.max_instances
        if bounds:
            object.__setattr__(self, "policy", dataclasses.replace(self.policy, **bounds))

    @property
    def cost_profile(self) -> CostProfile:
        return PROFILES[self.profile] if isinstance(self.profile, str) else self.profile

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            policy=self.policy, poll_interval_s=self.poll_interval_s, migration_interval_s=self.migration_interval_s,
            enable_migration=self.enable_migration, enable_scaling=self.enable_scaling,
            max_migrations_out=self.max_migrations_out, max_migrations_in=self.max_migrations_in,
            migration_order_timeout_s=1e9)

    def engine_config(self) -> EngineConfig:
        prof = self.cost_profile
        return EngineConfig(num_blocks=self.num_blocks or prof.num_blocks, block_size=prof.block_size,
                            watermark=self.watermark, max_batch_size=self.max_batch_size,
                            max_batched_tokens=self.max_batched_tokens)


class SimInstance:
    """One simulated instance: an engine, its migration server, its stepping state."""

    def __init__(self, instance_id: str, engine: EngineCore) -> None:
        self.instance_id = instance_id
        self.engine = engine
        self.dest = DestinationMigrations(engine)
        self.busy = False  # a step is in flight
        self.dirty = True  # changed since the last load poll
        self.removed = False
        self.deferred: list[tuple["_MigrationRun", p.Action]] = []  # freezes waiting for the step's end


@dataclass(eq=False)
class _MigrationRun:
    order: MigrationOrder
    machine: p.SourceMigration
    driver: MigrationDriver
    src: SimInstance
    dst: SimInstance
    started_at: float
    frozen_at: Optional[float] = None
    committed_at: Optional[float] = None


class SimCluster:
    """The simulated cluster; ``run`` replays a workload and returns a ``SimResult``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.profile = config.cost_profile
        self.engine_config = config.engine_config()
        self.scheduler = GlobalScheduler(config.scheduler_config(), seed=config.seed)
        self.instances: dict[str, SimInstance] = {}
        self.retired: dict[str, SimInstance] = {}
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self._next_id = 0
        self._runs: dict[str, _MigrationRun] = {}
        self._manual = 0
        self.records: dict[str, RequestRecord] = {}
        self._undispatched: list[RequestRecord] = []
        self.migrations: list[MigrationResult] = []
        self.timeline = Timeline()
        self.instance_changes: list[tuple[float, int]] = []
        self.scale_events: list[tuple[float, str, str]] = []
        self.timings: dict[str, list[float]] = {"dispatch": [], "migration_round": [], "poll": [], "scaling": []}
        self._held = 0
        self._launching = 0
        self._completed = 0
        self._num_events = 0
        self._num_steps = 0
        self._tick_no = 0
        self._arrival_times: list[float] = []
        self._arrivals_done = 0
        self._progress = None
        for _ in range(config.num_instances):
            self._held_change(+1)
            self._start_instance(self._new_id())

    # ----- event queue -------------------------------------------------------------------
    def _push(self, at: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, fn, arg))

    def _clock(self) -> float:
        return self.now

    # ----- public API --------------------------------------------------------------------
    def run(self, workload: Sequence[Any], progress: bool = True) -> SimResult:
        """Replay ``workload`` (``WorkloadRequest``-like: arrival_time, prompt_len,
        output_len, priority) until every request has finished. A cluster runs one workload."""
        from tqdm import tqdm

        if self.records:
            raise RuntimeError("a SimCluster runs one workload; build a new one")

        t0 = time.perf_counter()
        c0 = time.process_time()
        self._arrival_times = sorted(float(w.arrival_time) for w in workload)
        for i, w in enumerate(workload):
            rid = f"req-{i:06d}"
            self.records[rid] = RequestRecord(rid, float(w.arrival_time), int(w.prompt_len), int(w.output_len),
                                              int(getattr(w, "priority", 0)))
            self._push(float(w.arrival_time), self._on_arrival, rid)
        self._push(0.0, self._on_tick, None)
        total = len(self.records)
        with tqdm(total=total, disable=not progress, unit="req", mininterval=0.5, leave=False) as bar:
            self._progress = bar
            heap = self._heap
            while heap and (self._completed < total or self._runs):
                at, _, fn, arg = heapq.heappop(heap)
                self.now = at
                self._num_events += 1
                fn(arg)
        self._progress = None
        return SimResult(
            requests=list(self.records.values()), migrations=self.migrations, timeline=self.timeline,
            instance_changes=self.instance_changes, scale_events=self.scale_events, timings=self.timings,
            virtual_s=self.now, wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, num_events=self._num_events,
            num_steps=self._num_steps)

    def schedule_migration(self, at: float, request_id: str, src: str, dst: str, waiting: bool = False) -> None:
        """Migrate ``request_id`` from ``src`` to ``dst`` at virtual time ``at``, by hand
        (outside the scheduler's rounds; tests and experiments use it)."""
        self._manual += 1
        order = MigrationOrder(f"manual-{self._manual}", src, dst, dst, request_id, waiting, at)
        self._push(at, self._start_migration, order)

    def engines(self) -> dict[str, EngineCore]:
        """Every engine that ever ran (live and retired), by instance id."""
        out = {i: inst.engine for i, inst in self.retired.items()}
        out.update({i: inst.engine for i, inst in self.instances.items()})
        return out

    # ----- instances -----------------------------------------------------------------------
    def _new_id(self) -> str:
        iid = f"instance-{self._next_id:03d}"
        self._next_id += 1
        return iid

    def _start_instance(self, iid: str) -> None:
        engine = EngineCore(self.engine_config, SimExecutor(self.profile))
        inst = SimInstance(iid, engine)
        self.instances[iid] = inst
        self.scheduler.register(iid, iid, self.now)
        self.scheduler.on_load(iid, engine.load(), self.now)
        inst.dirty = False

    def _on_instance_started(self, iid: str) -> None:
        self._launching -= 1
        self._start_instance(iid)
        self.scale_events.append((self.now, "started", iid))

    def _held_change(self, delta: int) -> None:
        self._held += delta
        if self.instance_changes and self.instance_changes[-1][0] == self.now:
            self.instance_changes[-1] = (self.now, self._held)
        else:
            self.instance_changes.append((self.now, self._held))

    def _remove_instance(self, iid: str) -> None:
        inst = self.instances.pop(iid)
        inst.removed = True
        self.scheduler.remove(iid)
        self.retired[iid] = inst
        self._held_change(-1)
        self.scale_events.append((self.now, "removed", iid))

    # ----- requests and steps --------------------------------------------------------------
    def _on_arrival(self, rid: str) -> None:
        self._arrivals_done += 1
        self._dispatch(self.records[rid])

    def _dispatch(self, rec: RequestRecord) -> None:
        rid = rec.request_id
        block = self.engine_config.block_size
        view = RequestView(rid, 0, cdiv(rec.prompt_len, block), rec.priority, rec.arrival_time, rec.prompt_len, 0)
        t0 = time.perf_counter()
        iid = self.scheduler.dispatch(view)
        self.timings["dispatch"].append(time.perf_counter() - t0)
        if iid is None:  # no eligible instance (all terminating): retry at the next tick
            self._undispatched.append(rec)
            return
        inst = self.instances[iid]
        rec.dispatched_to = iid
        inst.engine.add_request(Request(
            rid, (1,) * rec.prompt_len, SamplingParams(max_tokens=rec.output_len, ignore_eos=True),
            priority=rec.priority, arrival_time=rec.arrival_time))
        inst.dirty = True
        self._wake(inst)

    def _wake(self, inst: SimInstance) -> None:
        """Start a step on an idle instance that has work (no-op if busy or nothing runs)."""
        if inst.busy or inst.removed:
            return
        engine = inst.engine
        for _ in range(3):  # a step that only preempted is followed at once by one that admits
            if not engine.has_unfinished():
                return
            out = engine.step()
            inst.dirty = True
            if out.preempted:
                for rid in out.preempted:
                    self.records[rid].on_preempted(self.now)
            if out.outputs or out.duration_s > 0:
                self._num_steps += 1
                inst.busy = True
                self._push(self.now + out.duration_s, self._on_step_end, (inst, out))
                return
            if not out.preempted:
                return  # the head of the queue does not fit: idle until something changes

    def _on_step_end(self, arg: tuple[SimInstance, StepOutput]) -> None:
        inst, out = arg
        inst.busy = False
        now = self.now
        for o in out.outputs:
            rec = self.records[o.request_id]
            rec.on_tokens(now, o.index, len(o.new_token_ids))
            if o.finish_reason is not None:
                rec.finish_time = now
                self._completed += 1
                if self._progress is not None:
                    self._progress.update(1)
        if inst.deferred:
            deferred, inst.deferred = inst.deferred, []
            for run, action in deferred:
                self._advance(run, action)
        self._wake(inst)

    # ----- scheduler tick ------------------------------------------------------------------
    def _on_tick(self, _: Any) -> None:
        cfg = self.config
        now = self.now
        sched = self.scheduler
        every = max(1, round(cfg.migration_interval_s / cfg.poll_interval_s))
        round_now = cfg.enable_migration and self._tick_no % every == 0
        if self._loads_read_before_next_tick(round_now):
            t0 = time.perf_counter()
            for iid, inst in self.instances.items():
                if inst.dirty:
                    sched.on_load(iid, inst.engine.load(), now)
                    inst.dirty = False
            self.timings["poll"].append(time.perf_counter() - t0)
        if self._undispatched:
            pending, self._undispatched = self._undispatched, []
            for rec in pending:
                self._dispatch(rec)
        if round_now:
            t0 = time.perf_counter()
            orders = sched.migration_round(now)
            self.timings["migration_round"].append(time.perf_counter() - t0)
            for order in orders:
                self._start_migration(order)
        if cfg.enable_scaling and not self._launching:
            self._scale()
        for iid in sched.drained():
            inst = self.instances.get(iid)
            if inst is not None and not inst.engine.has_unfinished() and not inst.engine.seqs:
                self._remove_instance(iid)
        self._sample()
        self._tick_no += 1
        self._push(self._tick_no * cfg.poll_interval_s, self._on_tick, None)

    def _loads_read_before_next_tick(self, round_now: bool) -> bool:
        """Whether anything reads the polled loads before the next tick.

        Polls nobody reads are skipped (the instance stays marked changed, so the next
        poll catches up): the scheduler sees exactly what it would with every poll.
        Readers: this tick's migration, scaling and drain checks, and dispatches of
        arrivals up to the next tick (arrival events precede a tick at the same time).
        """
        if round_now or self.config.enable_scaling or self._undispatched:
            return True
        if any(rec.terminating for rec in self.scheduler.instances.values()):
            return True
        i = self._arrivals_done
        return i < len(self._arrival_times) and self._arrival_times[i] <= self.now + self.config.poll_interval_s

    def _scale(self) -> None:
        t0 = time.perf_counter()
        decision = self.scheduler.scaling_round()
        self.timings["scaling"].append(time.perf_counter() - t0)
        if decision.action == ScaleAction.OUT:
            iid = self._new_id()
            self._launching += 1
            self._held_change(+1)
            self.scale_events.append((self.now, "out", iid))
            self._push(self.now + self.config.instance_startup_s, self._on_instance_started, iid)
        elif decision.action == ScaleAction.IN and decision.instance_id is not None:
            self.scale_events.append((self.now, "in", decision.instance_id))
            inst = self.instances.get(decision.instance_id)
            if inst is not None:
                inst.dirty = True

    def _sample(self) -> None:
        tl = self.timeline
        if tl.times and self.now < tl.times[-1] + self.config.sample_interval_s - _EPS:
            return
        used = total = frag = 0
        for iid, inst in self.instances.items():
            e = inst.engine
            f = e.blocks.num_free if e.scheduler.head_blocked() else 0
            used += e.blocks.num_used
            total += e.config.num_blocks
            frag += f
            tl.per_instance.setdefault(iid, []).append(
                (self.now, e.blocks.num_used, f, len(e.scheduler.running), len(e.scheduler.waiting)))
        tl.times.append(self.now)
        tl.usage.append(used / total if total else 0.0)
        tl.fragmentation.append(frag / total if total else 0.0)
        tl.instances.append(len(self.instances))

    # ----- migrations ----------------------------------------------------------------------
    def _start_migration(self, order: MigrationOrder) -> None:
        src = self.instances.get(order.src)
        dst = self.instances.get(order.dst)
        if src is None or dst is None:
            self.scheduler.on_migration_done(order.migration_id)
            return
        machine = p.SourceMigration(order.migration_id, order.request_id, order.waiting, self.config.migration)
        driver = MigrationDriver(src.engine, LocalPort(dst.dest, src.engine, now=self._clock), clock=self._clock)
        run = _MigrationRun(order, machine, driver, src, dst, self.now)
        self._runs[order.migration_id] = run
        self._advance(run, machine.start())

    def _advance(self, run: _MigrationRun, action: p.Action) -> None:
        """Carry out actions until one takes virtual time (or the migration is done)."""
        machine = run.machine
        while not isinstance(action, p.Done):
            if isinstance(action, p.Freeze) and run.src.busy:
                run.src.deferred.append((run, action))  # at the iteration boundary
                return
            event = run.driver.execute(machine, action)
            delay = self._apply_effects(run, action, event)
            if delay > 0:
                self._push(self.now + delay, self._on_migration_reply, (run, event))
                return
            action = machine.on(event)
        self._finish_migration(run)

    def _on_migration_reply(self, arg: tuple[_MigrationRun, p.Event]) -> None:
        run, event = arg
        self._advance(run, run.machine.on(event))

    def _apply_effects(self, run: _MigrationRun, action: p.Action, event: p.Event) -> float:
        """Book-keeping after an action ran; returns the virtual time it takes."""
        src, dst = run.src, run.dst
        if isinstance(action, p.QueryBlocks):
            src.dirty = True
            return 0.0
        if isinstance(action, p.PreAllocate):
            dst.dirty = True
            return self.config.rpc_latency_s
        if isinstance(action, p.CopyBlocks):
            return self.profile.migration_time(len(action.src_block_ids))
        if isinstance(action, p.Freeze):
            src.dirty = True
            run.frozen_at = self.now
            return 0.0
        if isinstance(action, p.Commit):
            dst.dirty = True
            if isinstance(event, p.Committed) and event.ok:
                run.committed_at = self.now
                self._wake(dst)
            return self.config.rpc_latency_s
        if isinstance(action, p.FreeSrc):
            src.dirty = True
            self._wake(src)
            return 0.0
        if isinstance(action, p.Rollback):
            src.dirty = dst.dirty = True
            if isinstance(event, p.RolledBack) and event.committed_on_dst:
                run.committed_at = self.now
            self._wake(src)
            self._wake(dst)
            return self.config.rpc_latency_s if action.abort_dst else 0.0
        return 0.0

    def _finish_migration(self, run: _MigrationRun) -> None:
        m = run.machine
        del self._runs[m.migration_id]
        self.scheduler.on_migration_done(m.migration_id)
        downtime = 0.0
        if run.frozen_at is not None and run.committed_at is not None:
            downtime = run.committed_at - run.frozen_at
        result = MigrationResult(m.migration_id, m.request_id, m.status, m.reason, m.config.mode.value, m.stages,
                                 m.blocks_sent, self.now - run.started_at, downtime, run.committed_at or 0.0)
        self.migrations.append(result)
        if m.status == p.MigrationStatus.FINISHED:
            rec = self.records.get(m.request_id)
            if rec is not None:
                rec.migrations += 1
                rec.migration_downtime += downtime
        run.src.dirty = run.dst.dirty = True
        self._wake(run.src)
        self._wake(run.dst)
