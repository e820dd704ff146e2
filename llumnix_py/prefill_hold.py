"""A ``decode`` instance's hold on prefill work (prefill/decode disaggregation).

The scheduler sends new requests only to prefill-capable instances, and moves the
never-prefilled requests queued on a ``decode`` instance to one of those
(``policies.roles.plan_redirects``, every tick). Until that redirect comes, the engine
would prefill them itself: requests queued on an instance when it is flipped to
``decode``, or dispatched there while the flip was on its way. A prefill on a decode
instance stalls every decode in its batch, the interference disaggregation exists to
remove. So the llumlet holds them: its engine admits none of them
(``EngineAdapter.hold_waiting``) for at most ``LlumletConfig.decode_hold_s`` from the
moment the hold began, and then prefills them itself. A silent or slow scheduler costs
those requests that much latency, never the request::

    role -> decode                 hold every never-prefilled waiting request (since now)
    admitted while decode          held from its admission
    on_timer(now)                  released once held decode_hold_s; forgotten once gone
    role -> prefill / both         all released

``PrefillHold`` is the bookkeeping only; ``LlumletCore`` owns one and hands its ids to
the engine whenever they change.
"""

from __future__ import annotations

from typing import Callable, Iterable


class PrefillHold:
    """Request id -> when its hold began; see the module docstring.

    Args:
        hold_s: how long a request is held at most (0: nothing is ever held).
    """

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._since: dict[str, float] = {}
        self.expired = 0  # holds that ran out (the instance prefilled those requests itself)

    def __bool__(self) -> bool:
        return bool(self._since)

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(self._since)

    def begin(self, request_ids: Iterable[str], now: float) -> bool:
        """Hold these requests from ``now`` (one already held keeps its start). Whether the
        held set changed."""
        if self.hold_s <= 0:
            return False
        before = len(self._since)
        for rid in request_ids:
            self._since.setdefault(rid, now)
        return len(self._since) != before

    def release_all(self) -> bool:
        """Release every hold; whether any was held."""
        held = bool(self._since)
        self._since.clear()
        return held

    def expire(self, now: float, present: Callable[[str], bool]) -> bool:
        """Release the holds begun ``hold_s`` ago or more, and forget requests no longer
        ``present`` (finished, aborted, migrated away). Whether the held set changed."""
        gone = [rid for rid, t in self._since.items() if not present(rid) or now - t >= self.hold_s]
        for rid in gone:
            if present(rid):
                self.expired += 1
            del self._since[rid]
        return bool(gone)
