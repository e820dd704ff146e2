"""The global scheduler's decisions, sans-IO: loads in, decisions out.

It keeps an instance table (load snapshot, last heard from, terminating, the
migrations it ordered) and no per-request state, so a restarted scheduler loses
nothing: requests live on the llumlets. It also owns the ownership arbiter of
migrations (``migration.ownership``): the first claim for a migration whose commit
outcome is unknown wins, and an instance removed as dead settles its migrations for
the source side. A restarted scheduler starts with an empty arbiter (see the README). The daemon (``daemon.py``) feeds it
loads and timer ticks and carries out what it returns; the simulator does the
same on a virtual clock.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

from llumnix_py.errors import UnknownInstanceError
from llumnix_py.healing import RestartPolicy
from migration.ownership import Owner, OwnershipArbiter
from llumnix_py.scheduler.fair_book import ClusterFairBook
from llumnix_py.scheduler.payoff import MigrationLedger
from policies.config import PolicyConfig
from policies.cooldown import cooling, hold_cooling
from policies.dispatch import DispatchState, dispatch
from policies.fairness import cluster_offsets, under_served
from policies.bandwidth import migration_pays
from policies.pairing import PlannedMigration, plan_migrations
from policies.rescue import plan_rescues
from policies.roles import (FlipState, Role, RoleFlipConfig, assign_role, migrations_at_once, parse_pd_ratio,
                            parse_role, parse_roles, hold_prefill_work, plan_handoffs, plan_redirects, plan_role_flip)
from policies.virtual_usage import freeness
from policies.scaling import ScalingState, decide_scaling
from policies.types import ScaleAction, ScaleDecision

if TYPE_CHECKING:
    from llumnix_py.load import InstanceLoad, RequestLoad


@dataclass(frozen=True)
class SchedulerConfig:
    """How the global scheduler runs.

    Attributes:
        policy: dispatch, pairing, migrate-out and scaling policies and thresholds.
        poll_interval_s: how often loads are refreshed.
        migration_interval_s: how often a migration round runs (paper: 50-100 ms).
        enable_migration: run migration rounds at all (INFaaS++ baseline: False).
        enable_scaling: run scaling decisions (needs an instance launcher).
        max_migrations_out / max_migrations_in: concurrent migrations per instance (None:
            out 1, or ``policies.roles.PD_MIGRATIONS_AT_ONCE`` with ``pd_ratio`` or ``roles``,
            so hand-offs do not queue one at a time; in: as out).
        heartbeat_timeout_s: an instance not heard from for this long is dead (its
            requests are resumed elsewhere by recomputation, so keep it short).
        migration_order_timeout_s: forget an ordered migration never reported back.
        frontend_timeout_s: a frontend not heard from for this long is no longer listed
            (frontends report about once a second; listing them is all it is used for).
        instance_restart: how dead instances are replaced to keep the configured count
            (``llumnix_py.healing``; ``RestartPolicy(enabled=False)``: not replaced).
        pd_ratio: ``(P, D)``: prefill/decode disaggregation, instances get the roles
            ``prefill`` and ``decode`` in this ratio as they register (``policies.roles``);
            None (default): every instance is ``both`` (colocated). Also ``"P:D"``.
        roles: per-instance roles instead of a ratio, in registration order (``"prefill,
            decode,decode"`` or a sequence; ``policies.roles.parse_roles``); a replacement
            of a dead instance takes the role it had. Not together with ``pd_ratio``.
        role_flip: flip roles at run time when the phase loads drift apart
            (``policies.roles.plan_role_flip``, once per migration round); None: fixed roles.
    """

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    poll_interval_s: float = 0.05
    migration_interval_s: float = 0.1
    enable_migration: bool = True
    enable_scaling: bool = False
    max_migrations_out: Optional[int] = None
    max_migrations_in: Optional[int] = None
    heartbeat_timeout_s: float = 1.5
    migration_order_timeout_s: float = 30.0
    frontend_timeout_s: float = 10.0
    instance_restart: RestartPolicy = field(default_factory=RestartPolicy)
    pd_ratio: Optional[tuple[int, int]] = None
    role_flip: Optional[RoleFlipConfig] = None
    roles: Optional[tuple[Role, ...]] = None

    def __post_init__(self) -> None:
        if self.pd_ratio is not None:
            object.__setattr__(self, "pd_ratio", parse_pd_ratio(self.pd_ratio))
        if self.roles is not None:
            if self.pd_ratio is not None:
                raise ValueError("give per-instance roles or a prefill:decode ratio, not both")
            object.__setattr__(self, "roles", parse_roles(self.roles))
        for name in ("poll_interval_s", "migration_interval_s", "heartbeat_timeout_s", "migration_order_timeout_s",
                     "frontend_timeout_s"):
            if not getattr(self, name) > 0:  # NaN too
                raise ValueError(f"{name} must be positive")
        out, into = migrations_at_once(self.max_migrations_out, self.max_migrations_in,
                                       self.pd_ratio is not None or self.roles is not None)
        object.__setattr__(self, "max_migrations_out", out)
        object.__setattr__(self, "max_migrations_in", into)


@dataclass(frozen=True)
class MigrationOrder:
    """Tell ``src`` to migrate ``request_id`` to ``dst`` (at ``dst_address``)."""

    migration_id: str
    src: str
    dst: str
    dst_address: str
    request_id: str
    waiting: bool
    issued_at: float
    handoff: bool = False  # a prefill instance hands a request to a decode instance
    redirect: bool = False  # a queued, never prefilled request leaves a decode instance


@dataclass
class InstanceRecord:
    instance_id: str
    address: str  # where its migration server listens
    load: Optional[InstanceLoad] = None
    last_seen: float = 0.0
    terminating: bool = False
    orders_out: dict[str, MigrationOrder] = field(default_factory=dict)
    orders_in: dict[str, MigrationOrder] = field(default_factory=dict)
    role: Role = Role.BOTH
    handoffs_tried: set[str] = field(default_factory=set)  # requests here whose hand-off was ordered


def to_instance_load(instance_id: str, load: InstanceLoad, terminating: bool = False) -> InstanceLoad:
    """The scheduler's copy of an engine's snapshot: named, with its terminating flag."""
    return replace(load, instance_id=instance_id, terminating=terminating)


class GlobalScheduler:
    """Instance table + dispatch + migration rounds + scaling, with no I/O."""

    def __init__(self, config: Optional[SchedulerConfig] = None, seed: int = 0,
                 keep_migration_records: bool = False) -> None:
        self.config = config or SchedulerConfig()
        policy = self.config.policy
        self.payoff = MigrationLedger(self.config.migration_interval_s, lambda load: freeness(load, policy),
                                      keep_records=keep_migration_records)
        self.instances: dict[str, InstanceRecord] = {}
        self.dispatch_state = DispatchState(seed)
        self.scaling_state = ScalingState()
        self._seq = 0
        self.num_dispatched = 0
        self.num_fair_steered = 0  # dispatches sent to the freest instance for an under-served client
        self._steer_policy: Optional[tuple[PolicyConfig, PolicyConfig]] = None  # (policy, its freeness variant)
        self.num_orders = 0
        self.num_rescues = 0  # rescue migrations ordered (``PolicyConfig.rescue``)
        self.num_handoffs = 0
        self.num_redirects = 0  # queued requests moved off decode instances (``redirect_round``)
        self.num_declined = 0  # load-balancing migrations declined as slower than their benefit
        self.flip_state = FlipState()
        self.role_flips: list[tuple[float, str, str]] = []  # (when, instance, new role)
        self.ownership = OwnershipArbiter()
        self.fair_book = ClusterFairBook()  # cluster-wide VTC, fed by fair engines' loads

    # ----- membership --------------------------------------------------------------------
    def register(self, instance_id: str, address: str, now: float, role: Optional[str] = None) -> None:
        """Add an instance (or refresh a known one). ``role``: its role; default: the one
        ``config.pd_ratio`` calls for next (``policies.roles.assign_role``); a known
        instance keeps its role unless one is given."""
        rec = self.instances.get(instance_id)
        if rec is None:
            chosen = parse_role(role) if role is not None else \
                assign_role([r.role for r in self.instances.values()], self.config.pd_ratio, self.config.roles)
            self.instances[instance_id] = InstanceRecord(instance_id, address, last_seen=now, role=chosen)
        else:  # re-registration (the instance or the scheduler restarted)
            rec.address, rec.last_seen = address, now
            if role is not None:
                rec.role = parse_role(role)

    def role(self, instance_id: str) -> Role:
        rec = self.instances.get(instance_id)
        if rec is None:
            raise UnknownInstanceError(f"instance {instance_id!r} is not registered")
        return rec.role

    def set_role(self, instance_id: str, role: str) -> None:
        """Give a registered instance another role (``ValueError`` for an unknown role)."""
        rec = self.instances.get(instance_id)
        if rec is None:
            raise UnknownInstanceError(f"instance {instance_id!r} is not registered")
        rec.role = parse_role(role)

    def flip_role(self, instance_id: str, role: str, now: float) -> None:
        """Flip an instance's role at run time (the role-flip policy, or an operator) and
        record it in ``role_flips``. Nothing moves here: from the next tick on, a flipped
        ``decode`` instance's queued, never prefilled requests leave by ``redirect_round``
        and a flipped ``prefill`` instance's decoding requests by ``handoff_round``; the
        requests decoding on a new ``decode`` instance stay. Unchanged role: no flip."""
        new = parse_role(role)
        if self.role(instance_id) == new:
            return
        self.set_role(instance_id, new.value)
        self.role_flips.append((now, instance_id, new.value))

    def disaggregated(self) -> bool:
        """Whether any instance has the ``prefill`` role (hand-offs may be due)."""
        return any(r.role == Role.PREFILL for r in self.instances.values())

    def remove(self, instance_id: str, dead_at: Optional[float] = None) -> None:
        """Forget an instance; ``dead_at``: it died then, so its open migrations are settled
        for the source side (its parked copies, or those of its requests, never run)."""
        if dead_at is not None:
            self.ownership.settle_dead(instance_id, dead_at)
        rec = self.instances.pop(instance_id, None)
        self.fair_book.forget(instance_id)
        self.dispatch_state.forget(instance_id)
        self.payoff.on_remove(instance_id)
        if rec is None:
            return
        for order in list(rec.orders_out.values()) + list(rec.orders_in.values()):
            self._forget_order(order)

    def mark_terminating(self, instance_id: str) -> None:
        rec = self.instances.get(instance_id)
        if rec is None:
            raise UnknownInstanceError(f"instance {instance_id!r} is not registered")
        rec.terminating = True

    def on_load(self, instance_id: str, load: InstanceLoad, now: float) -> None:
        rec = self.instances.get(instance_id)
        if rec is None:
            return
        rec.load = to_instance_load(instance_id, load, rec.terminating)
        rec.last_seen = now
        if load.client_service or load.client_served:  # a fair engine: its service joins the cluster's book
            self.fair_book.observe(instance_id, dict(load.client_served),
                                   (r.client_id for r in load.running + load.waiting))
        if rec.handoffs_tried:  # forget requests that left or ended
            here = {r.request_id for r in load.running} | {r.request_id for r in load.waiting}
            rec.handoffs_tried &= here
        self.payoff.on_load(instance_id, rec.load, now)
        if self.dispatch_state.num_pending(instance_id):
            seen = {r.request_id for r in load.running} | {r.request_id for r in load.waiting}
            self.dispatch_state.on_poll(instance_id, seen)

    def loads(self) -> list[InstanceLoad]:
        """Current snapshots (terminating flag and in-flight migrations folded in), by id."""
        out = []
        for rid in sorted(self.instances):
            rec = self.instances[rid]
            if rec.load is None:
                continue
            out.append(replace(rec.load, terminating=rec.terminating, migrating_out=len(rec.orders_out),
                               migrating_in=len(rec.orders_in),
                               pending_dispatch=self.dispatch_state.pending(rid), role=rec.role.value,
                               cluster_service=self.fair_book.view(self.fair_book.clients_of(rid))))
        return out

    def roles_to_send(self) -> dict[str, str]:
        """Instances whose last load reports another role than the one they have here: the
        role to send each (the instance holds prefill work by it, ``InstanceHandle.set_role``).
        Sent again every tick until a load shows it arrived, so a lost message or a restarted
        llumlet catches up by itself."""
        return {iid: rec.role.value for iid, rec in sorted(self.instances.items())
                if rec.load is not None and rec.load.role != rec.role.value}

    def fair_offsets(self) -> dict[str, dict[str, float]]:
        """Global fairness (``PolicyConfig.global_fairness``): per fair instance, its clients'
        cluster counters (``ClusterFairBook.standing``: an idle client's is where it would
        return) less its engine's own as of its last poll; empty when off."""
        if not self.config.policy.global_fairness or not self.fair_book:
            return {}
        book = self.fair_book
        out = {}
        for iid, rec in sorted(self.instances.items()):
            if rec.load is not None and rec.load.client_service:
                local = dict(rec.load.client_service)
                out[iid] = cluster_offsets({c: book.standing(c) for c in local}, local)
        return out

    # ----- dispatch ----------------------------------------------------------------------
    def dispatch(self, request: RequestLoad) -> Optional[str]:
        """The instance a new request goes to, or ``None`` if there is none. With
        ``fair_dispatch``, a request of a client under its share cluster-wide goes to the
        freest instance (``freeness`` dispatch) instead."""
        policy = self.config.policy
        steer = bool(policy.fair_dispatch and self.fair_book and request.client_id
                     and self._under_served(request.client_id))
        if steer:
            if self._steer_policy is None or self._steer_policy[0] is not policy:
                self._steer_policy = (policy, replace(policy, dispatch="freeness"))
            policy = self._steer_policy[1]
        choice = dispatch(self.loads(), request, policy, self.dispatch_state)
        if choice is None:
            return None
        self.dispatch_state.on_dispatch(choice.instance_id, request)
        self.num_dispatched += 1
        self.num_fair_steered += steer
        return choice.instance_id

    def _under_served(self, client: str) -> bool:
        book = self.fair_book
        active = {c: book.counters.get(c, 0.0) for c in book.active if c != client}
        return under_served(book.standing(client), active, self.config.policy.fair_dispatch_margin)

    # ----- migration ---------------------------------------------------------------------
    def handoff_round(self, now: float) -> list[MigrationOrder]:
        """Hand-offs from prefill to decode instances (``policies.roles.plan_handoffs``):
        one order per request whose first token is out, within the migration limits.
        A request is ordered once: if its hand-off fails, it decodes where it is."""
        if not self.disaggregated():
            return []
        cfg = self.config
        slots_out = {i: cfg.max_migrations_out - len(r.orders_out) for i, r in self.instances.items()
                     if r.role == Role.PREFILL}
        slots_in = {i: cfg.max_migrations_in - len(r.orders_in) for i, r in self.instances.items()
                    if r.role == Role.DECODE}
        tried = set().union(*(r.handoffs_tried for r in self.instances.values() if r.role == Role.PREFILL))
        loads = self.loads()
        plans = plan_handoffs(loads, cfg.policy, skip=tried, slots_out=slots_out, slots_in=slots_in,
                              links=self.links(loads))
        orders = []
        for h in plans:
            self._seq += 1
            order = MigrationOrder(f"pd-{uuid.uuid4().hex[:12]}-{self._seq}", h.src, h.dst,
                                   self.instances[h.dst].address, h.request_id, False, now, handoff=True)
            self._open_order(order, now)
            self.instances[h.src].handoffs_tried.add(h.request_id)
            orders.append(order)
        self.num_orders += len(orders)
        self.num_handoffs += len(orders)
        return orders

    def redirect_round(self, now: float) -> list[MigrationOrder]:
        """Queued requests that were never prefilled, off ``decode`` instances
        (``policies.roles.plan_redirects``): one waiting-request migration each, within the
        migration limits. One that fails is planned again in a later round while it is
        still queued there (it has no KV, so a retry cannot make it bounce)."""
        if not any(r.role == Role.DECODE for r in self.instances.values()):
            return []
        cfg = self.config
        slots_out = {i: cfg.max_migrations_out - len(r.orders_out) for i, r in self.instances.items()
                     if r.role == Role.DECODE}
        slots_in = {i: cfg.max_migrations_in - len(r.orders_in) for i, r in self.instances.items()
                    if r.role != Role.DECODE}
        ordered = {o.request_id for r in self.instances.values() for o in r.orders_out.values()}
        loads = [replace(x, waiting=tuple(w for w in x.waiting if w.request_id not in ordered))
                 for x in self.loads()]
        orders = []
        for plan in plan_redirects(loads, cfg.policy, slots_out=slots_out, slots_in=slots_in):
            self._seq += 1
            order = MigrationOrder(f"rd-{uuid.uuid4().hex[:12]}-{self._seq}", plan.src, plan.dst,
                                   self.instances[plan.dst].address, plan.request_id, True, now, redirect=True)
            self._open_order(order, now)
            orders.append(order)
        self.num_orders += len(orders)
        self.num_redirects += len(orders)
        return orders

    def _flip_roles(self, now: float) -> None:
        """One round of the role-flip policy, if configured (``flip_role``)."""
        flip_cfg = self.config.role_flip
        if flip_cfg is None or not self.disaggregated():
            return
        decision = plan_role_flip(self.loads(), self.config.policy, flip_cfg, self.flip_state)
        if decision is not None and decision.instance_id in self.instances:
            self.flip_role(decision.instance_id, decision.role.value, now)

    def links(self, loads: list[InstanceLoad]) -> dict[tuple[str, str], float]:
        """Measured migration bandwidth (GB/s) by ``(src id, dst id)``, from the snapshots."""
        by_address = {r.address: i for i, r in self.instances.items()}
        return {(x.instance_id, by_address[peer]): gbps for x in loads for peer, gbps in x.links
                if peer in by_address}

    def _open_order(self, order: MigrationOrder, now: float) -> None:
        self.instances[order.src].orders_out[order.migration_id] = order
        self.instances[order.dst].orders_in[order.migration_id] = order
        self.ownership.open(order.migration_id, order.src, order.dst, now)
        self.payoff.on_order(order.migration_id, order.request_id, order.src, order.dst, now)

    def migration_round(self, now: float) -> list[MigrationOrder]:
        """Pair overloaded with underloaded instances; one order per kept pair."""
        self._expire_orders(now)
        self._flip_roles(now)
        if not self.config.enable_migration:
            return []
        cfg = self.config
        busy_src = {i for i, r in self.instances.items() if len(r.orders_out) >= cfg.max_migrations_out}
        busy_dst = {i for i, r in self.instances.items() if len(r.orders_in) >= cfg.max_migrations_in}
        # Leave instances at their migration limit out of the pairing: planned with the
        # rest, a busy source would take the freest destination (and a busy destination
        # a source) from a pair that could run. A planned source is below the threshold
        # and a planned destination above it, so a left-out instance could not have
        # taken the other role this round. Each pass leaves out at least one more.
        # Prefill instances are left out of load balancing: their requests leave by hand-off.
        # Queued prefill-phase work on decode instances leaves by redirect, not by balancing.
        loads = hold_prefill_work([x for x in self.loads() if x.role != Role.PREFILL.value])
        cooldown = cfg.policy.migration_cooldown_s
        if cooldown > 0:
            loads = hold_cooling(loads, cooling(self.payoff.moved_since(now - cooldown), now, cooldown))
        orders = []
        if cfg.policy.rescue:  # objectives first: rescue requests about to miss, then balance the rest
            for r in plan_rescues(loads, cfg.policy.rescue_copy_s_per_block, frozenset(busy_src | busy_dst),
                                  self.links(loads)):
                orders.append(self._order(r.src, r.dst, r.request_id, False, now))
                busy_src.add(r.src)
                busy_dst.add(r.dst)
            self.num_rescues += len(orders)
        left_out: set[str] = set()
        while True:
            plans = plan_migrations([x for x in loads if x.instance_id not in left_out], cfg.policy)
            blocked = {p.pair.src for p in plans if p.pair.src in busy_src}
            blocked |= {p.pair.dst for p in plans if p.pair.dst in busy_dst}
            if not blocked:
                break
            left_out |= blocked
        links = self.links(loads) if cfg.policy.decline_slow_migrations else {}
        by_id = {x.instance_id: x for x in loads}
        for plan in plans:
            src, dst = plan.pair.src, plan.pair.dst
            if src in busy_src or dst in busy_dst:
                continue
            if links and not self._pays(plan, by_id[src], links.get((src, dst))):
                self.num_declined += 1
                continue
            orders.append(self._order(src, dst, plan.request.request_id, plan.request.waiting, now))
            busy_src.add(src)
            busy_dst.add(dst)
        self.num_orders += len(orders)
        return orders

    def _order(self, src: str, dst: str, request_id: str, waiting: bool, now: float) -> MigrationOrder:
        """Record and open one migration order."""
        self._seq += 1
        order = MigrationOrder(f"mig-{uuid.uuid4().hex[:12]}-{self._seq}", src, dst,
                               self.instances[dst].address, request_id, waiting, now)
        self._open_order(order, now)
        return order

    @staticmethod
    def _pays(plan: PlannedMigration, src: InstanceLoad, gbps: Optional[float]) -> bool:
        """The decline rule (``policies.bandwidth.migration_pays``) for one planned move; a
        draining source's moves always pay (its freeness is -inf: it must empty)."""
        if plan.request.waiting or src.terminating:
            return True
        req = next((r for r in src.running if r.request_id == plan.request.request_id), None)
        if req is None:
            return True
        return migration_pays(req.num_blocks, src.kv_block_bytes, gbps, plan.src_after - plan.src_before,
                              src.step_s or None)

    def claim_ownership(self, migration_id: str, side: Owner, now: float) -> Owner:
        """Who runs a migrating request whose commit outcome one side cannot learn."""
        return self.ownership.claim(migration_id, side, now)

    def on_migration_done(self, migration_id: str) -> None:
        """A source reported the end of a migration (whatever its outcome)."""
        for rec in self.instances.values():
            order = rec.orders_out.get(migration_id)
            if order is not None:
                self._forget_order(order)
                return

    def on_migration_result(self, migration_id: str, request_id: str, finished: bool, blocks: int, now: float,
                            src: str = "", dst: str = "") -> None:
        """A source reported how a migration ended: record it in ``payoff`` (the ledger of
        whether migrations pay off), then forget the order. ``src``/``dst`` name the ends
        of an order this scheduler did not issue (a migration ordered by hand)."""
        self.payoff.on_end(migration_id, request_id, finished, blocks, now, src, dst)
        self.on_migration_done(migration_id)

    def on_migration_refused(self, migration_id: str, request_id: str, now: float, src: str = "",
                             dst: str = "") -> None:
        """The source refused an order before anything was copied (its llumlet's own limit on
        concurrent migrations, or the request not movable at that moment): recorded as a
        migration that did not finish, and a refused hand-off is ordered again in a later
        round. Only a hand-off that started and then failed leaves its request decoding on
        its prefill instance for good."""
        rec = self.instances.get(src)
        order = rec.orders_out.get(migration_id) if rec is not None else None
        self.on_migration_result(migration_id, request_id, False, 0, now, src, dst)
        if order is not None and order.handoff:
            rec.handoffs_tried.discard(request_id)

    def _forget_order(self, order: MigrationOrder) -> None:
        self.payoff.drop_order(order.migration_id)
        for iid, table in ((order.src, "orders_out"), (order.dst, "orders_in")):
            rec = self.instances.get(iid)
            if rec is not None:
                getattr(rec, table).pop(order.migration_id, None)

    def _expire_orders(self, now: float) -> None:
        stale = [o for r in self.instances.values() for o in r.orders_out.values()
                 if now - o.issued_at > self.config.migration_order_timeout_s]
        for o in stale:
            self._forget_order(o)

    # ----- scaling and health ------------------------------------------------------------
    def scaling_round(self) -> ScaleDecision:
        """Scale out / in decision; a scale-in also marks its instance terminating."""
        if not self.config.enable_scaling:
            return ScaleDecision(ScaleAction.NONE)
        decision = decide_scaling(self.loads(), self.config.policy, self.scaling_state)
        if decision.action == ScaleAction.IN and decision.instance_id in self.instances:
            self.mark_terminating(decision.instance_id)
        return decision

    def drained(self) -> list[str]:
        """Terminating instances with no request left and no migration in flight: stop them."""
        out = []
        for iid, rec in sorted(self.instances.items()):
            load = rec.load
            if rec.terminating and load is not None and not load.running and not load.waiting \
                    and not rec.orders_out and not rec.orders_in and not self.dispatch_state.pending(iid):
                out.append(iid)
        return out

    def dead(self, now: float) -> list[str]:
        """Instances not heard from within the heartbeat timeout."""
        limit = self.config.heartbeat_timeout_s
        return sorted(i for i, r in self.instances.items() if now - r.last_seen > limit)
