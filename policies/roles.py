"""Instance roles for prefill/decode disaggregation (after DistServe), as pure functions.

An instance is ``prefill``, ``decode`` or ``both`` (the default: colocated, the
behaviour without roles). The role is scheduler state: the scheduler assigns one to
each instance it registers (``assign_role``, from a prefill:decode ratio or a list of
per-instance roles, ``parse_roles``), folds it
into the load snapshots (``InstanceLoad.role``), and the policies read it:

* dispatch sends new requests only to prefill-capable instances (``prefill``, ``both``);
* load-balancing pairs leave ``prefill`` instances out (their requests leave by hand-off);
* ``plan_role_flip``: at run time, a pure policy flips one instance's role when the
  prefill backlog and the decode instances' room drift apart (no restart);
* ``plan_redirects``: a ``decode`` instance prefills nothing: a request queued there
  that was never prefilled (an instance flipped from ``prefill`` still holds it, or a
  dispatch raced the flip) moves, as a waiting request (no KV), to a prefill-capable
  instance;
* ``plan_handoffs``: once a request on a ``prefill`` instance has its first token out
  (``output_len >= 1``), it is handed to the ``decode`` instance where it leaves the
  most freeness (the paper's freeness with the request added, and the hand-offs
  planned earlier in the same round counted in). The hand-off is a live migration:
  the request keeps decoding on its prefill instance while its KV is copied.

A hand-off that cannot start or fails leaves the request decoding where it is; the
scheduler does not try it again (``skip``), so a failing link never makes a request
bounce.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Collection, Mapping, Optional, Sequence

from llumnix_py.errors import UnknownRoleError
from llumnix_py.load import InstanceLoad, RequestLoad
from policies.bandwidth import pick_by_link
from policies.config import PolicyConfig
from policies.types import Handoff, Redirect
from policies.virtual_usage import freeness_after_addition, freeness_with_request, summarize


class Role(str, enum.Enum):
    """What an instance runs."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    @property
    def takes_new_requests(self) -> bool:
        return self is not Role.DECODE


ROLES: tuple[str, ...] = tuple(r.value for r in Role)


def parse_role(text: object) -> Role:
    """``Role`` named by ``text``; ``UnknownRoleError`` (a ``ValueError``) naming the valid
    roles otherwise."""
    if isinstance(text, Role):
        return text
    if isinstance(text, str) and text.strip().lower() in ROLES:
        return Role(text.strip().lower())
    raise UnknownRoleError(f"unknown instance role {repr(text)[:80]}; expected one of {', '.join(ROLES)}")


def parse_pd_ratio(text: object) -> tuple[int, int]:
    """``"P:D"`` (or a ``(P, D)`` pair) as ``(P, D)``; both must be positive integers.

    Raises:
        ValueError: malformed, or a ratio with no prefill or no decode instance.
    """
    if isinstance(text, str):
        parts = text.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"a prefill:decode ratio is two integers 'P:D' (e.g. 1:3), got {text!r}")
        p, d = (int(x) for x in parts)
    elif isinstance(text, (tuple, list)) and len(text) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in text):
        p, d = int(text[0]), int(text[1])
    else:
        raise ValueError(f"a prefill:decode ratio is 'P:D' or a (P, D) pair of integers, got {text!r}")
    if p < 1 or d < 1:
        raise ValueError(f"a prefill:decode ratio needs at least one prefill and one decode instance, got {p}:{d}")
    return p, d


def parse_roles(text: object) -> tuple[Role, ...]:
    """Per-instance roles, ``"prefill,decode,decode"`` (or a sequence of names), validated.

    Raises:
        ValueError: an unknown role (named), an empty list, no instance that takes new
            requests (``prefill`` or ``both``), or a ``prefill`` instance without a
            ``decode`` instance to hand its requests to, or the reverse (hand-offs go only
            from ``prefill`` to ``decode`` instances).
    """
    if isinstance(text, str):
        items: list[object] = [x for x in text.split(",")]
    elif isinstance(text, (tuple, list)):
        items = list(text)
    else:
        raise ValueError(f"roles are a comma-separated list such as 'prefill,decode,decode', got {text!r}")
    if not items or items == [""]:
        raise ValueError("roles: the list is empty; give one role per instance, e.g. 'prefill,decode,decode'")
    roles = tuple(parse_role(x) for x in items)
    if all(r == Role.DECODE for r in roles):
        raise ValueError("roles: no instance takes new requests; list at least one 'prefill' or 'both'")
    if Role.PREFILL in roles and Role.DECODE not in roles:
        raise ValueError("roles: a prefill instance hands its requests to decode instances; list at least one 'decode'")
    if Role.DECODE in roles and Role.PREFILL not in roles:
        raise ValueError("roles: decode instances take requests from prefill instances only; "
                         "list at least one 'prefill'")
    return roles


# Migrations (hand-offs) in flight at once per instance when instances have roles. Every request is
# handed off once; one at a time they queue at high rates: code completion on 16 simulated GPUs, 3:1,
# sustains 15.9 req/s with one at a time, 43.7 with four, 46.1 with eight (experiments/RESULTS.md,
# "Code completion on 16 GPUs over five seeds").
PD_MIGRATIONS_AT_ONCE = 4


def migrations_at_once(out: Optional[int], into: Optional[int], disaggregated: bool) -> tuple[int, int]:
    """Concurrent migrations per instance ``(out, in)``: ``out`` defaults to 1, or to
    ``PD_MIGRATIONS_AT_ONCE`` when the instances have roles; ``into`` defaults to ``out``.
    ``ValueError`` unless both end up integers >= 1."""
    out = (PD_MIGRATIONS_AT_ONCE if disaggregated else 1) if out is None else out
    into = out if into is None else into
    for name, n in (("max_migrations_out", out), ("max_migrations_in", into)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    return out, into


def roles_for(n: int, ratio: Optional[tuple[int, int]], roles: Optional[Sequence[Role]] = None) -> list[Role]:
    """The roles of ``n`` instances registered one after another under ``ratio`` or the
    per-instance ``roles`` (``assign_role`` applied in turn)."""
    out: list[Role] = []
    for _ in range(n):
        out.append(assign_role(out, ratio, roles))
    return out


def assign_role(current: Sequence[Role], ratio: Optional[tuple[int, int]],
                roles: Optional[Sequence[Role]] = None) -> Role:
    """The role of one more instance, given the roles of those registered.

    With per-instance ``roles``: the first listed role that the registered instances do
    not cover yet (walking the list, each registered instance covers one listed entry of
    its role), so instances registered in turn get the list in order and a replacement of
    a dead instance takes the role it had; beyond the list (a scale-out), the listed role
    furthest below its share of the list (``count / listed``; list order on a tie).
    Without a ratio every instance is ``both``. With ``(P, D)``, the role whose count
    is furthest below its share of the ratio (count / share smallest; prefill on a tie),
    so instances registered in turn follow the ratio and a replacement of a dead
    instance takes the role the cluster is short of.
    """
    if roles:
        left = {r: sum(1 for c in current if c == r) for r in Role}
        for r in roles:
            if left[r] == 0:
                return r
            left[r] -= 1
        listed = {r: sum(1 for x in roles if x == r) for r in roles}
        order = list(dict.fromkeys(roles))
        return min(order, key=lambda r: (sum(1 for c in current if c == r) / listed[r], order.index(r)))
    if ratio is None:
        return Role.BOTH
    p, d = ratio
    n_p = sum(1 for r in current if r == Role.PREFILL)
    n_d = sum(1 for r in current if r == Role.DECODE)
    return Role.PREFILL if n_p * d <= n_d * p else Role.DECODE


def takes_new_requests(inst: InstanceLoad) -> bool:
    """May new requests be dispatched to ``inst`` (by role; terminating is checked apart)?"""
    return inst.role != Role.DECODE.value


def handoff_ready(req: RequestLoad) -> bool:
    """A running request whose prefill is done and first token out, not migrating."""
    return req.output_len >= 1 and not req.migrating


def plan_handoffs(instances: Sequence[InstanceLoad], cfg: PolicyConfig, *, skip: Collection[str] = (),
                  slots_out: Mapping[str, int], slots_in: Mapping[str, int],
                  links: Mapping[tuple[str, str], float] = {}) -> list[Handoff]:
    """The hand-offs to start now, from ``prefill`` instances to ``decode`` instances.

    Args:
        instances: load snapshots (``role`` set by the scheduler).
        cfg: policy thresholds (headroom) for freeness.
        skip: request ids not to hand off (a hand-off of theirs was already tried).
        slots_out / slots_in: how many more migrations each instance may start as
            source / destination now (absent: none).
        links: measured GB/s by ``(src id, dst id)`` (``policies.bandwidth``).

    Each ready request (``handoff_ready``; per source in arrival order) goes to the
    decode instance with free slots where its migration freeness after the addition
    is highest, with this round's earlier hand-offs counted in; among those within
    ``cfg.link_tolerance`` of the highest, the fastest measured link from the source
    wins (``policies.bandwidth.pick_by_link``; ties: freeness, then lowest id); a
    request that would leave every decode instance with negative freeness (it does
    not fit) waits for a later round.
    """
    dsts = {inst.instance_id: inst for inst in instances
            if inst.role == Role.DECODE.value and not inst.terminating}
    if not dsts:
        return []
    out_left = dict(slots_out)
    in_left = {iid: slots_in.get(iid, 0) for iid in dsts}
    planned: list[Handoff] = []
    for src in sorted((i for i in instances if i.role == Role.PREFILL.value), key=lambda i: i.instance_id):
        ready = sorted((r for r in src.running if handoff_ready(r) and r.request_id not in skip),
                       key=lambda r: (r.arrival_time, r.request_id))
        for req in ready:
            if out_left.get(src.instance_id, 0) <= 0:
                break
            options = []
            for iid, dst in dsts.items():
                if in_left[iid] <= 0:
                    continue
                after = freeness_after_addition(dst, summarize(dst, cfg), cfg, req, waiting=False)
                if after >= 0:
                    options.append((iid, after, links.get((src.instance_id, iid))))
            dst_id = pick_by_link(options, cfg.link_tolerance)
            if dst_id is None:
                continue
            dst = dsts[dst_id]
            dsts[dst_id] = dataclasses.replace(dst, running=dst.running + (req,),
                                               used_blocks=dst.used_blocks + req.num_blocks)
            in_left[dst_id] -= 1
            out_left[src.instance_id] = out_left.get(src.instance_id, 0) - 1
            planned.append(Handoff(req.request_id, src.instance_id, dst_id))
    return planned


def never_prefilled(req: RequestLoad) -> bool:
    """A queued request with no token generated yet and not migrating: prefill-phase work."""
    return req.output_len == 0 and not req.migrating


def hold_prefill_work(instances: Sequence[InstanceLoad]) -> list[InstanceLoad]:
    """The snapshots with every never-prefilled queued request of a ``decode`` instance
    marked ``migrating`` (not a candidate), for the load-balancing round: such a request
    leaves by redirect to a prefill-capable instance (``plan_redirects``), never to another
    decode instance. It still counts in its instance's usage. A terminating instance is
    left as is (draining moves everything); other snapshots are returned unchanged."""
    out = []
    for inst in instances:
        if inst.role != Role.DECODE.value or inst.terminating or not any(map(never_prefilled, inst.waiting)):
            out.append(inst)
            continue
        waiting = tuple(dataclasses.replace(r, migrating=True) if never_prefilled(r) else r for r in inst.waiting)
        out.append(dataclasses.replace(inst, waiting=waiting))
    return out


def plan_redirects(instances: Sequence[InstanceLoad], cfg: PolicyConfig, *, slots_out: Mapping[str, int],
                   slots_in: Mapping[str, int]) -> list[Redirect]:
    """Queued prefill-phase requests on ``decode`` instances, back to prefill-capable ones.

    Args:
        instances: load snapshots (``role`` set by the scheduler).
        cfg: policy thresholds (headroom) for the dispatch freeness.
        slots_out / slots_in: how many more migrations each instance may start as
            source / destination now (absent: none).

    Each waiting request that was never prefilled (``never_prefilled``; per source in
    queue order) on a non-terminating ``decode`` instance goes to the ``prefill`` or
    ``both`` instance (not terminating, with a free slot) where the dispatcher would put
    it: the highest dispatch freeness with the request added
    (``virtual_usage.freeness_with_request``), this round's earlier redirects counted in
    as queued there; ties by lowest id. Where no such instance has a slot, the request
    waits for a later round (it is not lost: if its instance admits it first, it is
    prefilled and decodes there).
    """
    dsts = {inst.instance_id: inst for inst in instances
            if inst.role != Role.DECODE.value and not inst.terminating}
    if not dsts:
        return []
    out_left = dict(slots_out)
    in_left = {iid: slots_in.get(iid, 0) for iid in dsts}
    planned: list[Redirect] = []
    for src in sorted((i for i in instances if i.role == Role.DECODE.value and not i.terminating),
                      key=lambda i: i.instance_id):
        for req in (r for r in src.waiting if never_prefilled(r)):
            if out_left.get(src.instance_id, 0) <= 0:
                break
            options = [(-freeness_with_request(dst, cfg, req), iid) for iid, dst in dsts.items() if in_left[iid] > 0]
            if not options:
                return planned
            _, dst_id = min(options)
            dst = dsts[dst_id]
            dsts[dst_id] = dataclasses.replace(dst, waiting=dst.waiting + (req,))
            in_left[dst_id] -= 1
            out_left[src.instance_id] = out_left.get(src.instance_id, 0) - 1
            planned.append(Redirect(req.request_id, src.instance_id, dst_id))
    return planned


# ----- run-time role flipping -------------------------------------------------------------


@dataclass(frozen=True)
class RoleFlipConfig:
    """When the scheduler flips an instance's role (``plan_role_flip``).

    Attributes:
        backlog_blocks: prompt blocks waiting per prefill instance above which prefill is
            short of instances.
        decode_free_steps: mean freeness of the decode instances above which they can
            spare one (and below ``decode_tight_steps`` they need one more).
        decode_tight_steps: see ``decode_free_steps``.
        rounds: consecutive rounds a condition must hold before a flip, and rounds after
            a flip before the next may be considered.
    """

    backlog_blocks: float = 64.0
    decode_free_steps: float = 60.0
    decode_tight_steps: float = 10.0
    rounds: int = 10

    def __post_init__(self) -> None:
        for name in ("backlog_blocks", "decode_free_steps", "decode_tight_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.decode_tight_steps >= self.decode_free_steps:
            raise ValueError("decode_tight_steps must be below decode_free_steps: roles would flap")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")


@dataclass(frozen=True)
class RoleFlip:
    """Give ``instance_id`` the role ``role``."""

    instance_id: str
    role: Role


@dataclass
class FlipState:
    """Streaks and cooldown of ``plan_role_flip`` (the scheduler keeps one)."""

    to_prefill: int = 0
    to_decode: int = 0
    cooldown: int = 0


def plan_role_flip(instances: Sequence[InstanceLoad], cfg: PolicyConfig, flip: RoleFlipConfig,
                   state: FlipState) -> Optional[RoleFlip]:
    """One round of the role-flip policy: at most one flip.

    Signals: the prefill backlog (blocks needed by waiting requests, per prefill
    instance) and the decode instances' mean migration freeness. When the backlog is
    above ``backlog_blocks`` while decode has room (``decode_free_steps``) for ``rounds``
    rounds, the decode instance with the fewest running requests becomes ``prefill``;
    its decoding requests then leave by hand-off like any prefill instance's. When
    there is no backlog but decode is tight (``decode_tight_steps``) for ``rounds``
    rounds, the prefill instance with the least work becomes ``decode``: it takes no new
    request, its queued ones that were never prefilled leave for a prefill-capable
    instance (``plan_redirects``), and the ones already decoding stay. Each phase keeps
    at least one instance; terminating instances are neither counted nor flipped.
    """
    live = [i for i in instances if not i.terminating]
    pre = [i for i in live if i.role == Role.PREFILL.value]
    dec = [i for i in live if i.role == Role.DECODE.value]
    if state.cooldown > 0:
        state.cooldown -= 1
        return None
    if not pre or not dec:
        state.to_prefill = state.to_decode = 0
        return None
    backlog = sum(r.blocks_needed for i in pre for r in i.waiting) / len(pre)
    free = sum(summarize(i, cfg).freeness(cfg) for i in dec) / len(dec)
    state.to_prefill = state.to_prefill + 1 if backlog > flip.backlog_blocks and free > flip.decode_free_steps \
        and len(dec) >= 2 else 0
    state.to_decode = state.to_decode + 1 if backlog == 0 and free < flip.decode_tight_steps and len(pre) >= 2 else 0
    choice: Optional[RoleFlip] = None
    if state.to_prefill >= flip.rounds:
        pick = min(dec, key=lambda i: (len(i.running) + len(i.waiting), i.instance_id))
        choice = RoleFlip(pick.instance_id, Role.PREFILL)
    elif state.to_decode >= flip.rounds:
        pick = min(pre, key=lambda i: (len(i.running) + len(i.waiting), i.instance_id))
        choice = RoleFlip(pick.instance_id, Role.DECODE)
    if choice is not None:
        state.to_prefill = state.to_decode = 0
        state.cooldown = flip.rounds
    return choice
