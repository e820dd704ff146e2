"""Instance roles for prefill/decode disaggregation (after DistServe), as pure functions.

An instance is ``prefill``, ``decode`` or ``both`` (the default: colocated, the
behaviour without roles). The role is scheduler state: the scheduler assigns one to
each instance it registers (``assign_role``, from a prefill:decode ratio), folds it
into the load snapshots (``InstanceLoad.role``), and the policies read it:

* dispatch sends new requests only to prefill-capable instances (``prefill``, ``both``);
* load-balancing pairs leave ``prefill`` instances out (their requests leave by hand-off);
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
from typing import Collection, Mapping, Optional, Sequence

from llumnix_py.load import InstanceLoad, RequestLoad
from policies.bandwidth import pick_by_link
from policies.config import PolicyConfig
from policies.types import Handoff
from policies.virtual_usage import freeness_after_addition, summarize


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
    """``Role`` named by ``text``; ``ValueError`` naming the valid roles otherwise."""
    if isinstance(text, Role):
        return text
    if isinstance(text, str) and text.strip().lower() in ROLES:
        return Role(text.strip().lower())
    raise ValueError(f"unknown instance role {text!r}; expected one of {', '.join(ROLES)}")


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


def roles_for(n: int, ratio: tuple[int, int]) -> list[Role]:
    """The roles of ``n`` instances registered one after another under ``ratio``
    (``assign_role`` applied in turn)."""
    roles: list[Role] = []
    for _ in range(n):
        roles.append(assign_role(roles, ratio))
    return roles


def assign_role(current: Sequence[Role], ratio: Optional[tuple[int, int]]) -> Role:
    """The role of one more instance, given the roles of those registered.

    Without a ratio every instance is ``both``. With ``(P, D)``, the role whose count
    is furthest below its share of the ratio (count / share smallest; prefill on a tie),
    so instances registered in turn follow the ratio and a replacement of a dead
    instance takes the role the cluster is short of.
    """
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
