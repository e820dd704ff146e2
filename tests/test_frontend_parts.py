"""The frontend's parts on their own: the request table and the supervisor, with no cluster around them."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from llumnix_py.engines.types import FinishReason, Request, RequestOutput, SamplingParams
from llumnix_py.errors import InvalidRequestError
from llumnix_py.frontend.handles import RequestFailedError, RequestHandle
from llumnix_py.frontend.requests import RequestTable
from llumnix_py.frontend.supervision import Supervisor


class FakeInstance:
    def __init__(self, iid: str, holds: tuple[str, ...] = ()) -> None:
        self.iid, self.holds = iid, set(holds)
        self.resumed: list[Any] = []
        self.leases: list[str] = []

    def held(self, ids):
        return [r for r in ids if r in self.holds]

    def resume_request(self, state) -> bool:
        self.resumed.append(state)
        self.holds.add(state.request_id)
        return True

    def renew_lease(self, frontend: str) -> None:
        self.leases.append(frontend)


class FakeControl:
    """The control-plane calls a supervisor makes, over a fixed membership."""

    def __init__(self, live: list[str], dead: list[str]) -> None:
        self.instances = {i: FakeInstance(i) for i in live}
        self.dead = dead
        self.forgotten: list[str] = []

    def membership(self) -> dict[str, Any]:
        return {"instances": list(self.instances), "dead": list(self.dead)}

    def instance(self, iid: str) -> Optional[FakeInstance]:
        return self.instances.get(iid)

    def forget(self, iid: str) -> None:
        self.forgotten.append(iid)

    def dispatch(self, view) -> Optional[str]:
        return next(iter(self.instances), None)

    def instance_ids(self) -> list[str]:
        return list(self.instances)


def placed(table: RequestTable, rid: str, iid: str) -> RequestHandle:
    handle = RequestHandle(rid, iid, Request(rid, (1, 2, 3), SamplingParams(max_tokens=8), 0, 0.0, reply_to="fe"))
    table.add(handle)
    table.placed(handle)
    return handle


def supervisor(control: FakeControl, table: RequestTable) -> Supervisor:
    return Supervisor(control, table, reply_to="fe", lease_timeout_s=30.0, block_size=16)  # type: ignore[arg-type]


def test_table_reorders_drops_duplicates_and_rejects_reused_ids():
    table = RequestTable()
    h = placed(table, "r", "a")
    with pytest.raises(InvalidRequestError):
        table.add(RequestHandle("r", "a"))
    table.on_outputs("b", [RequestOutput("r", (12,), 2)])
    table.on_outputs("a", [RequestOutput("r", (10, 11), 0), RequestOutput("r", (11,), 1)])
    assert h.token_ids == [10, 11, 12] and table.duplicates_dropped == 1 and h.instances_seen == ["a", "b", "a"]
    table.on_outputs("c", [RequestOutput("r", (13,), 3, FinishReason.STOP)], sender_dead=True)
    assert h.stream.owner == "a"  # late tokens of a dead instance make it no owner
    assert h.result(timeout=1) == [10, 11, 12, 13] and len(table) == 0


def test_supervisor_resumes_an_orphan_with_its_delivered_tokens_and_renews_leases():
    control, table = FakeControl(live=["b"], dead=["a"]), RequestTable()
    h = placed(table, "r", "a")
    table.on_outputs("a", [RequestOutput("r", (10, 11), 0)])
    sup = supervisor(control, table)
    sup.supervise_once()
    assert sup.dead == {"a"} and control.forgotten == ["a"]
    [state] = control.instances["b"].resumed
    assert state.output_token_ids == (10, 11) and h.stream.owner == "b" and h.resumes == 1 and sup.resumed == 1
    assert control.instances["b"].leases == ["fe"]
    assert sup.pick_other(object()) == "b" and sup.pick_other(object(), exclude=["b"]) is None  # type: ignore[arg-type]


def test_supervisor_fails_an_orphan_no_instance_can_take():
    control, table = FakeControl(live=[], dead=["a"]), RequestTable()
    h = placed(table, "r", "a")
    supervisor(control, table).supervise_once()
    assert table.failed == 1 and len(table) == 0 and h.finish_reason is FinishReason.ABORT
    with pytest.raises(RequestFailedError, match="its instance died"):
        h.result(timeout=1)
