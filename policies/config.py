"""Configuration of the scheduling policies, validated once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

from policies.registry import check_policy_names


@dataclass(frozen=True)
class PolicyConfig:
    """Which policies run and their thresholds (Llumnix paper defaults).

    Policy names are checked against the registries in ``policies.registry`` when the
    config is built: an unknown name raises ``UnknownPolicyError``; a malformed value
    raises ``ValueError``.

    Attributes:
        dispatch: dispatch policy (``freeness``, ``load``, ``queue``, ``round_robin``,
            ``random``).
        dispatch_top_k: the ``freeness`` dispatcher picks at random (seeded) among the
            ``k`` freest instances, so dispatches between two load polls do not herd.
        pairing: migration pairing policy (``freeness``, ``balanced``, ``defrag``).
        migrate_out: which request a source migrates (``shortest``, ``last``,
            ``longest``, ``lowest_priority``, ``waiting_head``).
        migrate_out_threshold: freeness (decode steps) below which an instance is a
            migration source and, unless ``migrate_in_threshold`` is set, above which it
            is a destination.
        migrate_in_threshold: freeness above which an instance is a migration
            destination of the ``freeness`` pairing (``defrag`` ranks by free blocks and
            does not read it); None (default): ``migrate_out_threshold``, the paper's one
            threshold. Set higher, a destination keeps that much room for the new requests
            dispatched to it (issue 19: on S-L, migrating into instances just above the
            source threshold spends the room arrivals need); it may not be lower than
            ``migrate_out_threshold``, so no instance is on both sides. A draining
            instance's moves ignore it: draining must finish.
        blocked_heads_first: in the ``freeness`` pairing, a source whose queue head waits for
            blocks moves that head (a waiting request: no KV to copy) to its destination
            whenever it fits there behind the destination's own head, before choosing a
            request for balance (rule 5a first instead of last). Off by default (the paper's
            order); issue 19: Llumnix left about half of its waiting heads where they were
            while another instance had room for them.
        migration_cooldown_s: a request that finished a migration less than this long
            ago is not migrated again, unless its instance is draining
            (``policies.cooldown``); 0 (default) turns the rule off.
        headroom_blocks: ``((priority, blocks), ...)``: blocks of headroom reserved on
            each instance for requests of that priority (priority > 0).
        scaling: scaling policy (``freeness``: the paper's average freeness; ``none``).
        scale_out_threshold: scale out when the average freeness stays below this.
        scale_in_threshold: scale in when the average freeness stays above this.
        scale_period_rounds: consecutive scheduling rounds a scaling condition must hold.
        min_instances / max_instances: bounds on the number of instances.
        rescue: each migration round, first migrate requests whose objective's margin is
            negative on their instance to one where it is predicted non-negative
            (``policies.rescue``; needs engines that publish margins: a JIT batch policy).
        rescue_copy_s_per_block: the rescue's predicted migration cost per KV block where the
            source has not measured its link to the destination yet (``policies.bandwidth``).
        slo_expected_len: output tokens the ``slo`` dispatcher assumes for a new request.
        conversation_slack: the ``conversation`` dispatcher sends a conversation's turn to the
            instance holding its KV while that instance's freeness (decode steps) is at most
            this much below the best, scaled by the share of the prompt the KV covers.
        link_tolerance: decode instances within this fraction of the best freeness compete
            for a hand-off on measured link speed (``policies.bandwidth.pick_by_link``).
        decline_slow_migrations: decline a load-balancing migration whose predicted copy
            time exceeds its benefit (``policies.bandwidth.migration_pays``); off by
            default, so the paper's Llumnix (which never declines) is what runs.
        global_fairness: fair engines order their clients by cluster-wide service: the
            scheduler sends each instance, every tick, its clients' cluster counters less the
            engine's own (``policies.fairness.cluster_offsets``); off: each engine by its own.
        fair_dispatch: a new request of a client under its share cluster-wide (more than
            ``fair_dispatch_margin`` weighted tokens below the mean of the active clients'
            cluster counters, ``policies.fairness.under_served``) goes to the freest instance
            (``freeness`` dispatch); other requests follow ``dispatch``. Needs fair engines.
        fair_dispatch_margin: see ``fair_dispatch``.
    """

    dispatch: str = "freeness"
    dispatch_top_k: int = 1
    pairing: str = "freeness"
    migrate_out: str = "shortest"
    migrate_out_threshold: float = 3.0
    migrate_in_threshold: Optional[float] = None
    migration_cooldown_s: float = 0.0
    blocked_heads_first: bool = False
    headroom_blocks: tuple[tuple[int, int], ...] = ()
    scaling: str = "freeness"
    scale_out_threshold: float = 10.0
    scale_in_threshold: float = 60.0
    scale_period_rounds: int = 10
    min_instances: int = 1
    max_instances: int = 64
    rescue: bool = False
    rescue_copy_s_per_block: float = 1e-3
    slo_expected_len: int = 256
    conversation_slack: float = 8.0
    link_tolerance: float = 0.1
    decline_slow_migrations: bool = False
    global_fairness: bool = False
    fair_dispatch: bool = False
    fair_dispatch_margin: float = 64.0
    # Read-only ``priority -> headroom blocks`` (priorities with headroom only),
    # derived from ``headroom_blocks``; a plain attribute for the hot paths.
    headroom_map: Mapping[int, int] = field(init=False, repr=False, compare=False, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        pairs = _normalize_headroom(self.headroom_blocks)
        object.__setattr__(self, "headroom_blocks", pairs)
        object.__setattr__(self, "headroom_map", MappingProxyType(dict(pairs)))
        _check_int("dispatch_top_k", self.dispatch_top_k, minimum=1)
        _check_int("scale_period_rounds", self.scale_period_rounds, minimum=1)
        _check_int("min_instances", self.min_instances, minimum=1)
        _check_int("max_instances", self.max_instances, minimum=self.min_instances)
        if isinstance(self.conversation_slack, bool) or not isinstance(self.conversation_slack, (int, float)) \
                or not (0 <= self.conversation_slack < math.inf):
            raise ValueError(f"conversation_slack must be a finite number >= 0, got {self.conversation_slack!r}")
        for name in ("migrate_out_threshold", "scale_out_threshold", "scale_in_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        mi = self.migrate_in_threshold
        if mi is not None:
            if isinstance(mi, bool) or not isinstance(mi, (int, float)) or not math.isfinite(mi):
                raise ValueError(f"migrate_in_threshold must be a finite number or None, got {mi!r}")
            if mi < self.migrate_out_threshold:
                raise ValueError(f"migrate_in_threshold ({mi}) must be at least migrate_out_threshold "
                                 f"({self.migrate_out_threshold}): an instance would be both a source and a "
                                 "destination")
        fm = self.fair_dispatch_margin
        if isinstance(fm, bool) or not isinstance(fm, (int, float)) or not math.isfinite(fm) or fm < 0:
            raise ValueError(f"fair_dispatch_margin must be a finite number >= 0, got {fm!r}")
        for name in ("rescue", "global_fairness", "fair_dispatch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        c = self.rescue_copy_s_per_block
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(f"rescue_copy_s_per_block must be a finite number >= 0, got {c!r}")
        _check_int("slo_expected_len", self.slo_expected_len, minimum=1)
        tol = self.link_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise ValueError(f"link_tolerance must be a finite number >= 0, got {tol!r}")
        cd = self.migration_cooldown_s
        if isinstance(cd, bool) or not isinstance(cd, (int, float)) or not math.isfinite(cd) or cd < 0:
            raise ValueError(f"migration_cooldown_s must be a finite number >= 0, got {cd!r}")
        if self.scale_out_threshold >= self.scale_in_threshold:
            raise ValueError(
                "scale_out_threshold must be below scale_in_threshold "
                f"({self.scale_out_threshold} >= {self.scale_in_threshold}): the cluster would flap"
            )
        for name in ("dispatch", "pairing", "migrate_out", "scaling"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty policy name, got {value!r}")
        check_policy_names(
            dispatch=self.dispatch, pairing=self.pairing, migrate_out=self.migrate_out, scaling=self.scaling
        )

    @property
    def destination_threshold(self) -> float:
        """Freeness above which an instance takes migrations (``migrate_in_threshold`` or
        ``migrate_out_threshold``)."""
        mi = self.migrate_in_threshold
        return self.migrate_out_threshold if mi is None else mi

    def headroom(self, priority: int) -> int:
        """Blocks of headroom reserved for ``priority`` on each instance (0 if none)."""
        return self.headroom_map.get(priority, 0)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _normalize_headroom(raw: object) -> tuple[tuple[int, int], ...]:
    try:
        items = [tuple(item) for item in raw]  # type: ignore[union-attr]
    except TypeError:
        raise ValueError(f"headroom_blocks must be a sequence of (priority, blocks) pairs, got {raw!r}") from None
    seen: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for item in items:
        if len(item) != 2:
            raise ValueError(f"headroom_blocks entries must be (priority, blocks) pairs, got {item!r}")
        priority, blocks = item
        _check_int("headroom priority", priority, minimum=1)
        _check_int(f"headroom blocks of priority {priority}", blocks, minimum=0)
        if priority in seen:
            raise ValueError(f"headroom_blocks lists priority {priority} twice")
        seen.add(priority)
        if blocks > 0:
            pairs.append((priority, blocks))
    return tuple(sorted(pairs))
