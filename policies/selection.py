"""Which request a migration source moves out (the ``migrate_out`` policies).

Every policy skips requests already migrating and breaks ties deterministically by
``(key, arrival_time, request_id)``; it returns ``None`` when nothing can move.

=================  ==========================================================
``shortest``       running request with the fewest blocks (default: moves fastest)
``longest``        running request with the most blocks
``last``           running request that arrived last
``lowest_priority`` running request with the lowest priority
``waiting_head``   first non-migrating request of the waiting queue
=================  ==========================================================

A terminating instance must drain completely, so ``select_migrate_out`` prefers its
running requests (the policy's pick if it is a running one, else ``shortest``) and
then its waiting ones, head first.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from llumnix_py.load import InstanceLoad, RequestLoad
from policies.registry import MIGRATE_OUT
from policies.types import MigrateOut

SelectFn = Callable[[InstanceLoad], Optional[MigrateOut]]


_INF = math.inf


def _pick_running(running: tuple[RequestLoad, ...], values: list, best: float) -> Optional[MigrateOut]:
    """The running request whose key in ``values`` is ``best``; ties by (arrival, id).

    ``values`` holds one key per running request, ``+-inf`` (never winning) for the
    migrating ones. ``count``/``index`` run in C; only ties are ordered in Python.
    """
    if best == _INF or best == -_INF:
        if all(r.migrating for r in running):
            return None
    n = values.count(best)
    i = values.index(best)
    if n == 1:
        pick = running[i]
    else:
        tied = [running[i]]
        for _ in range(n - 1):
            i = values.index(best, i + 1)
            tied.append(running[i])
        tied = [r for r in tied if not r.migrating]
        pick = min(tied, key=lambda r: (r.arrival_time, r.request_id))
    return MigrateOut(pick.request_id, waiting=False)


# Each selector builds its key list with an inlined comprehension (no per-request
# call): this runs for every migration source every round.


def select_shortest(inst: InstanceLoad) -> Optional[MigrateOut]:
    """Running request with the fewest blocks."""
    running = inst.running
    values = [_INF if r.migrating else r.num_blocks for r in running]
    return _pick_running(running, values, min(values, default=_INF))


def select_longest(inst: InstanceLoad) -> Optional[MigrateOut]:
    """Running request with the most blocks."""
    running = inst.running
    values = [-_INF if r.migrating else r.num_blocks for r in running]
    return _pick_running(running, values, max(values, default=-_INF))


def select_last(inst: InstanceLoad) -> Optional[MigrateOut]:
    """Running request that arrived last."""
    running = inst.running
    values = [-_INF if r.migrating else r.arrival_time for r in running]
    return _pick_running(running, values, max(values, default=-_INF))


def select_lowest_priority(inst: InstanceLoad) -> Optional[MigrateOut]:
    """Running request with the lowest priority."""
    running = inst.running
    values = [_INF if r.migrating else r.priority for r in running]
    return _pick_running(running, values, min(values, default=_INF))


def select_waiting_head(inst: InstanceLoad) -> Optional[MigrateOut]:
    """First request of the waiting queue that is not already migrating."""
    for r in inst.waiting:
        if not r.migrating:
            return MigrateOut(r.request_id, waiting=True)
    return None


def select_migrate_out(inst: InstanceLoad, policy: str = "shortest") -> Optional[MigrateOut]:
    """The request ``inst`` should migrate out under ``policy``, or ``None``.

    Raises:
        UnknownPolicyError: ``policy`` is not registered.
    """
    choice = MIGRATE_OUT.get(policy)(inst)
    if not inst.terminating:
        return choice
    if choice is not None and not choice.waiting:
        return choice
    return select_shortest(inst) or choice or select_waiting_head(inst)


def make_selector(policy: str) -> SelectFn:
    """``select_migrate_out`` bound to ``policy`` (checked now, not at first use)."""
    MIGRATE_OUT.get(policy)
    return lambda inst: select_migrate_out(inst, policy)


def find_request(inst: InstanceLoad, choice: MigrateOut) -> Optional[RequestLoad]:
    """The ``RequestLoad`` that ``choice`` names on ``inst`` (``None`` if absent)."""
    group = inst.waiting if choice.waiting else inst.running
    for r in group:
        if r.request_id == choice.request_id:
            return r
    return None
