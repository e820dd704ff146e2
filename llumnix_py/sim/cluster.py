"""A discrete-event simulator of a llumnix-py cluster on a virtual clock.

It runs the code that serves real traffic: every instance is a ``LlumletCore`` (the
llumlet's decisions: admission, routing, migration limits, destination handling)
over an ``EngineCore`` (block manager + batching scheduler) with a ``SimExecutor``;
each scheduler tick is the daemon's ``SchedulerTick`` over the real
``GlobalScheduler``; each migration is a real ``SourceMigration`` driven action by
action by the real ``MigrationDriver`` over a ``LocalPort`` to the destination's
core. Only the clock (a heap of events, never a sleep) and the executor (a cost
model) are swapped.

Events and what each does (all engine mutations happen at event times, single
threaded, so interleavings are exact and a run is deterministic for a seed)::

    arrival          dispatch (scheduler) -> core.submit + admit -> wake the instance
    step end         deliver the step's tokens; the core's timers; run freezes
                     deferred to this iteration boundary; start the next step
    tick             (every poll_interval_s) poll changed instances' loads, then
                     SchedulerTick: every migration_interval_s a migration round,
                     a scaling round, drained instances; sample the time series
    migration        an action's reply arrives; the machine picks the next action
    instance start   a scaled-out instance registers (instance_startup_s after the
                     decision)

Timing model:

* A step is planned and applied (``engine.step()``) when it starts; its tokens are
  delivered ``duration_s`` later, when the next step may start. So a request that
  finishes frees its blocks at the start of its last step (one step early).
* ``CopyBlocks`` takes ``profile.migration_time(blocks, cross_node)`` (the pair's link:
  same node or not, ``SimConfig.instances_per_node``); a destination call
  (pre-allocate, commit, abort) ``rpc_latency_s``; engine-local calls (incremental
  blocks, free) no time. ``Freeze`` waits for the source's iteration boundary (the
  end of its running step). The source keeps stepping during pre-copy stages; from
  freeze to commit the request makes no progress (downtime).
* A scale-out decision launches an instance that registers ``instance_startup_s``
  later (default 10 s: loading LLaMA-7B weights onto a warm GPU); no further scaling
  decision is taken while a launch is in flight (as the daemon, whose launch blocks).
  Scale-in marks the instance terminating; it drains by migration and is removed
  once ``GlobalScheduler.drained`` lists it.

Layout: ``SimConfig`` lives in ``llumnix_py.sim.config``; the migration events in
``llumnix_py.sim.migrations`` (``SimMigrations``, which the cluster has).
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from typing import Any, Callable, Optional, Sequence

from llumnix_py.engines.core import EngineCore
from llumnix_py.engines.sim.cost_model import CostProfile
from llumnix_py.engines.jit_batch import EdfBatchPolicy, JitBatchPolicy, with_objective
from llumnix_py.engines.sim.executor import SimExecutor
from llumnix_py.engines.types import Request, SamplingParams, StepOutput, job_kv_key
from llumnix_py.llumlet_core import LlumletCore
from llumnix_py.llumlet_types import LlumletConfig
from llumnix_py.load import InstanceLoad, RequestLoad
from llumnix_py.scheduler.core import GlobalScheduler, MigrationOrder
from llumnix_py.scheduler.tick import SchedulerTick
from llumnix_py.sim.config import SimConfig
from llumnix_py.sim.metrics import RequestRecord, SimResult, Timeline
from llumnix_py.sim.migrations import MigrationRun, SimMigrations
from migration import protocol as p
from migration.driver import MigrationResult
from policies.jit import JitParams
from policies.length import LengthPrior
from policies.types import ScaleAction, ScaleDecision

_EPS = 1e-9


class SimInstance:
    """One simulated instance: a llumlet core over its engine, and its stepping state."""

    def __init__(self, core: LlumletCore, engine: EngineCore, node: int = 0,
                 profile: Optional[CostProfile] = None) -> None:
        self.instance_id = core.instance_id
        self.node = node  # its node (``SimConfig.instances_per_node``): copies across nodes are slower
        self.profile = profile  # its hardware (``SimConfig.role_profile``); None: the config's
        self.core = core
        self.engine = engine
        self.busy = False  # a step is in flight
        self.idle_since = 0.0  # when its last step ended (its copies went on while it idled)
        self.dirty = True  # changed since the last load poll
        self.removed = False
        self.deferred: list[tuple[MigrationRun, p.Action]] = []  # freezes waiting for the step's end
        self.prefill_in_flight = 0  # prompt tokens the step in flight prefills (applied at its start)
        self.reported_in_flight = False  # a poll during the step in flight reported them

    def load(self) -> InstanceLoad:
        """The load a poll reads: the llumlet's view of the engine, which already shows the step
        in flight applied, so that step's prompt tokens are reported beside it (``prefill_in_flight``)."""
        load = self.core.load(self.engine.load())
        if self.busy and self.prefill_in_flight:
            load = dataclasses.replace(load, prefill_in_flight=self.prefill_in_flight)
            self.reported_in_flight = True
        return load


class SimCluster:
    """The simulated cluster; ``run`` replays a workload and returns a ``SimResult``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.profile = config.cost_profile
        self.engine_config = config.engine_config()
        self.scheduler = GlobalScheduler(config.scheduler_config(), seed=config.seed, keep_migration_records=True)
        self.ticker = SchedulerTick(self.scheduler, config.migration_interval_s)
        self.mig = SimMigrations(config, self._clock, self._push, self._wake, self._on_migration_done)
        self.instances: dict[str, SimInstance] = {}
        self.retired: dict[str, SimInstance] = {}
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self._next_id = 0
        self._started = 0  # instances started so far (they fill nodes in this order)
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
                                              int(getattr(w, "priority", 0)), objective=getattr(w, "objective", None))
            self._push(float(w.arrival_time), self._on_arrival, rid)
        self._push(0.0, self._on_tick, None)
        total = len(self.records)
        with tqdm(total=total, disable=not progress, unit="req", mininterval=0.5, leave=False) as bar:
            self._progress = bar
            heap = self._heap
            while heap and (self._completed < total or self.mig.runs):
                at, _, fn, arg = heapq.heappop(heap)
                self.now = at
                self._num_events += 1
                fn(arg)
        self._progress = None
        return SimResult(
            requests=list(self.records.values()), migrations=self.migrations, timeline=self.timeline,
            instance_changes=self.instance_changes, scale_events=self.scale_events, timings=self.timings,
            virtual_s=self.now, wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
            num_events=self._num_events, num_steps=self._num_steps,
            migration_records=[r.as_dict() for r in self.scheduler.payoff.records],
            payoff=self.scheduler.payoff.stats(len(self.records)))

    def schedule_migration(self, at: float, request_id: str, src: str, dst: str, waiting: bool = False) -> None:
        """Migrate ``request_id`` from ``src`` to ``dst`` at virtual time ``at``, by hand
        (outside the scheduler's rounds; tests and experiments use it)."""
        self._manual += 1
        order = MigrationOrder(f"manual-{self._manual}", src, dst, dst, request_id, waiting, at)
        self._push(at, self._start_manual, order)

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
        cfg = self.config
        self.scheduler.register(iid, iid, self.now)  # its role picks its hardware (``SimConfig.role_profile``)
        profile = cfg.role_profile(self.scheduler.role(iid).value)
        engine_config = self.engine_config
        if profile is not cfg.cost_profile and cfg.num_blocks is None:  # re-sized: its own KV pool
            engine_config = dataclasses.replace(engine_config, num_blocks=profile.num_blocks)
        prior = LengthPrior()
        policy = None
        if cfg.batch_policy == "jit":
            policy = JitBatchPolicy(self._clock, profile.step_time, prior, cfg.length_estimator,
                                    cfg.length_quantile, JitParams(skip_slack=cfg.jit_skip_slack))
        elif cfg.batch_policy == "edf":
            policy = EdfBatchPolicy(self._clock, profile.step_time, prior)
        executor = SimExecutor(profile, num_host_blocks=engine_config.num_host_blocks)
        engine = EngineCore(engine_config, executor, batch_policy=policy)
        core = LlumletCore(LlumletConfig(iid, transport="inproc", max_outgoing=cfg.max_migrations_out,
                                         max_incoming=cfg.max_migrations_in, lease_timeout_s=None,
                                         decode_hold_s=cfg.decode_hold_s,
                                         prefill_first_steps=cfg.prefill_first_steps), engine,
                           length_prior=prior)
        per_node = cfg.instances_per_node
        inst = SimInstance(core, engine, node=self._started // per_node if per_node else 0, profile=profile)
        self._started += 1
        self.instances[iid] = inst
        self.scheduler.on_load(iid, inst.load(), self.now)
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
        view = RequestLoad.queued(rid, prompt_len=rec.prompt_len, block_size=block, priority=rec.priority,
                                  arrival_time=rec.arrival_time, conversation_id=job_kv_key(rec.objective))
        if rec.objective is not None:
            view = with_objective(view, rec.objective)
        t0 = time.perf_counter()
        iid = self.scheduler.dispatch(view)
        self.timings["dispatch"].append(time.perf_counter() - t0)
        if iid is None:  # no eligible instance (all terminating): retry at the next tick
            self._undispatched.append(rec)
            return
        inst = self.instances[iid]
        rec.dispatched_to = iid
        inst.core.submit(Request(
            rid, (1,) * rec.prompt_len, SamplingParams(max_tokens=rec.output_len, ignore_eos=True),
            priority=rec.priority, arrival_time=rec.arrival_time, objective=rec.objective))
        inst.core.admit(self.now)  # into the engine now, even under a step in flight (as the engine queues it)
        inst.dirty = True
        self._wake(inst)

    def _wake(self, inst: SimInstance) -> None:
        """Start a step on an idle instance that has work (no-op if busy or nothing runs)."""
        if inst.busy or inst.removed:
            return
        core = inst.core
        for _ in range(3):  # a step that only preempted is followed at once by one that admits
            if not core.step_due():
                return
            if self.now > inst.idle_since:
                inst.engine.idle(self.now - inst.idle_since)
                inst.idle_since = self.now
            out, _ = core.step(route=False)  # tokens go to the records, by request id (_on_step_end)
            inst.dirty = True
            if out.preempted:
                for rid in out.preempted:
                    self.records[rid].on_preempted(self.now)
            if out.outputs or out.duration_s > 0:
                self._num_steps += 1
                inst.busy = True
                inst.prefill_in_flight = out.num_prefill_tokens
                self._push(self.now + out.duration_s, self._on_step_end, (inst, out))
                return
            if not out.preempted:
                return  # the head of the queue does not fit: idle until something changes

    def _on_step_end(self, arg: tuple[SimInstance, StepOutput]) -> None:
        inst, out = arg
        inst.busy = False
        inst.prefill_in_flight = 0
        if inst.reported_in_flight:  # a poll during the step reported its prompts: the next shows them done
            inst.reported_in_flight = False
            inst.dirty = True
        inst.idle_since = self.now
        now = self.now
        inst.core.on_published(out)
        inst.core.on_timer(now)
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
            self.mig.resume(deferred)
        self._wake(inst)

    # ----- scheduler tick ------------------------------------------------------------------
    def _on_tick(self, _: Any) -> None:
        cfg = self.config
        now = self.now
        round_now = cfg.enable_migration and self.ticker.round_due(now)
        if self._loads_read_before_next_tick(round_now):
            t0 = time.perf_counter()
            due = self.scheduler.payoff.due(now) if self.scheduler.payoff.watching else ()
            for iid, inst in self.instances.items():
                if inst.dirty:
                    self.scheduler.on_load(iid, inst.load(), now)
                    inst.dirty = False
                elif iid in due:  # unchanged since its last poll: the ledger's window closes on it
                    self.scheduler.payoff.on_load(iid, self.scheduler.instances[iid].load, now)
            self.timings["poll"].append(time.perf_counter() - t0)
        scale = cfg.enable_scaling and not self._launching
        t0 = time.perf_counter()
        actions = self.ticker.tick(now, migrate=cfg.enable_migration, scale=scale, removable=self._is_empty,
                                   heartbeat=False)  # idle instances are not polled (above): no heartbeat
        if round_now or scale:  # the tick's time: a migration round (with any scaling), else scaling alone
            self.timings["migration_round" if round_now else "scaling"].append(time.perf_counter() - t0)
        for order in actions.orders:
            self._start_migration(order)
        for iid, offsets in actions.fair_offsets.items():  # global fairness: each engine's cluster view
            if iid in self.instances:
                self.instances[iid].engine.set_fair_offsets(offsets)
        for iid, role in actions.roles.items():  # a role the llumlet does not have yet
            if iid in self.instances:
                self.instances[iid].core.set_role(role, now)
                self.instances[iid].dirty = True  # its next poll shows the role
        for inst in self.instances.values():
            if inst.core.held_prefills():  # a decode instance's held prefill work: released in time
                inst.core.on_timer(now)
                self._wake(inst)
        self._scale(actions.scale)
        for iid, _why in actions.retired:
            self._remove_instance(iid)
        if self._undispatched:
            pending, self._undispatched = self._undispatched, []
            for rec in pending:
                self._dispatch(rec)
        self._sample()
        self._tick_no += 1
        self._push(self._tick_no * cfg.poll_interval_s, self._on_tick, None)

    def _is_empty(self, iid: str) -> bool:
        inst = self.instances.get(iid)
        return inst is not None and not inst.engine.has_unfinished() and not inst.engine.seqs

    def _loads_read_before_next_tick(self, round_now: bool) -> bool:
        """Whether anything reads the polled loads before the next tick.

        Polls nobody reads are skipped (the instance stays marked changed, so the next
        poll catches up): the scheduler sees exactly what it would with every poll.
        Readers: this tick's migration, scaling and drain checks, dispatches of
        arrivals up to the next tick (arrival events precede a tick at the same time),
        and the migration ledger while a migration is in flight or in its window, and
        the hand-off planner of a disaggregated cluster (every tick).
        """
        if round_now or self.config.enable_scaling or self._undispatched or self.scheduler.payoff.watching \
                or self.scheduler.disaggregated():  # hand-offs are planned every tick
            return True
        if any(rec.terminating for rec in self.scheduler.instances.values()):
            return True
        i = self._arrivals_done
        return i < len(self._arrival_times) and self._arrival_times[i] <= self.now + self.config.poll_interval_s

    def _scale(self, decision: ScaleDecision) -> None:
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

    # ----- migrations -----------------------------------------------------------------------
    def _start_manual(self, order: MigrationOrder) -> None:
        for iid in (order.src, order.dst):  # the ledger's "before" is the ends' state now, as in a round
            inst = self.instances.get(iid)
            if inst is not None and inst.dirty:
                self.scheduler.on_load(iid, inst.load(), self.now)
                inst.dirty = False
        self.scheduler.payoff.on_order(order.migration_id, order.request_id, order.src, order.dst, self.now)
        self._start_migration(order)

    def _start_migration(self, order: MigrationOrder) -> None:
        src = self.instances.get(order.src)
        dst = self.instances.get(order.dst)
        if src is None or dst is None:
            self.scheduler.on_migration_result(order.migration_id, order.request_id, False, 0, self.now,
                                               order.src, order.dst)
            return
        self.mig.start(order, src, dst)

    def _on_migration_done(self, result: MigrationResult, run: MigrationRun) -> None:
        finished = result.status == p.MigrationStatus.FINISHED
        self.scheduler.on_migration_result(result.migration_id, result.request_id, finished, result.blocks,
                                           self.now, run.order.src, run.order.dst)
        self.migrations.append(result)
        if result.status == p.MigrationStatus.FINISHED:
            rec = self.records.get(result.request_id)
            if rec is not None:
                rec.migrations += 1
                rec.migration_downtime += result.downtime_s

    def _sample(self) -> None:
        tl = self.timeline
        if tl.times and self.now < tl.times[-1] + self.config.sample_interval_s - _EPS:
            return
        used = total = frag = 0
        needs: list[int] = []  # blocks each waiting head needs
        open_pools = []  # the block pools of the instances whose head does not wait
        for iid, inst in self.instances.items():
            e = inst.engine
            blocked = e.scheduler.head_blocked()
            f = e.blocks.num_free if blocked else 0
            used += e.blocks.num_used
            total += e.config.num_blocks
            frag += f
            if blocked:
                needs.append(e.scheduler.admit_blocks(e.scheduler.head()))
            else:
                open_pools.append(e.blocks)
            tl.per_instance.setdefault(iid, []).append(
                (self.now, e.blocks.num_used, f, len(e.scheduler.running), len(e.scheduler.waiting)))
        tl.times.append(self.now)
        tl.usage.append(used / total if total else 0.0)
        tl.fragmentation.append(frag / total if total else 0.0)
        tl.instances.append(len(self.instances))
        tl.stranded.append(sum(b.num_free for b in open_pools) / total if needs and total else None)
        tl.heads_waiting.append(len(needs))
        tl.heads_fit_elsewhere.append(sum(1 for n in needs if any(b.can_allocate(n) for b in open_pools)))
