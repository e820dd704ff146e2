"""Per-request migration cooldown: a request that just moved is not moved again soon.

Churn (a request migrated dozens of times, or sent back to an instance it left) comes
from pairing on snapshots that change between rounds. The cooldown rule takes the
requests that finished a migration within the last ``cooldown_s`` and marks them
``migrating`` in the snapshots the pairing sees, which every ``migrate_out`` policy
and the de-fragmentation move already skip. Nothing else changes: the marked requests
still count in their instance's virtual usage and freeness. A terminating (draining)
instance is left as it is, so scale-in never waits for a cooldown.

Pure functions over ``InstanceLoad``; the scheduler keeps the times of the last moves
(its migration ledger) and passes them in.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from llumnix_py.load import InstanceLoad, RequestLoad


def cooling(last_moved: Mapping[str, float], now: float, cooldown_s: float) -> frozenset[str]:
    """Requests whose last finished migration ended less than ``cooldown_s`` before ``now``."""
    if cooldown_s <= 0:
        return frozenset()
    return frozenset(rid for rid, t in last_moved.items() if now - t < cooldown_s)


def hold_cooling(instances: Sequence[InstanceLoad], cooling_ids: frozenset[str]) -> list[InstanceLoad]:
    """The snapshots with every cooling request marked ``migrating`` (not a candidate),
    except on terminating instances. Snapshots without such a request are returned as is."""
    if not cooling_ids:
        return list(instances)
    out = []
    for inst in instances:
        if inst.terminating or not _any_cooling(inst, cooling_ids):
            out.append(inst)
            continue
        out.append(dataclasses.replace(inst, running=_mark(inst.running, cooling_ids),
                                       waiting=_mark(inst.waiting, cooling_ids)))
    return out


def _any_cooling(inst: InstanceLoad, ids: frozenset[str]) -> bool:
    return any(r.request_id in ids and not r.migrating for r in inst.running + inst.waiting)


def _mark(reqs: tuple[RequestLoad, ...], ids: frozenset[str]) -> tuple[RequestLoad, ...]:
    return tuple(dataclasses.replace(r, migrating=True) if r.request_id in ids and not r.migrating else r
                 for r in reqs)
