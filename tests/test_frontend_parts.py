"""The frontend's parts on their own: the request table and the supervisor, with no cluster around them."""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import pytest

from llumnix_py.engines.types import FinishReason, Objective, Request, RequestOutput, SamplingParams
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
        self.views: list[Any] = []  # what each dispatch was asked to place

    def membership(self) -> dict[str, Any]:
        return {"instances": list(self.instances), "dead": list(self.dead)}

    def instance(self, iid: str) -> Optional[FakeInstance]:
        return self.instances.get(iid)

    def forget(self, iid: str) -> None:
        self.forgotten.append(iid)

    def dispatch(self, view) -> Optional[str]:
        self.views.append(view)
        return next(iter(self.instances), None)

    def instance_ids(self) -> list[str]:
        return list(self.instances)


def placed(table: RequestTable, rid: str, iid: str) -> RequestHandle:
    handle = RequestHandle(rid, iid, Request(rid, (1, 2, 3), SamplingParams(max_tokens=8), 0, 0.0, reply_to="fe"))
    table.add(handle)
    table.placed(handle)
    return handle


def supervisor(control: FakeControl, table: RequestTable, clock=time.time) -> Supervisor:
    return Supervisor(control, table, reply_to="fe", lease_timeout_s=30.0, block_size=16,  # type: ignore[arg-type]
                      clock=clock)


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


@pytest.mark.parametrize("objective, expect", [
    # a stream: its next token (index 3) was due 0.5 + 3 * 0.1 s after arrival, 1.2 s have passed
    (Objective(ttft_ms=500, tbt_ms=100), dict(ttft_s=-0.4, tbt_s=0.1, deadline_s=math.inf, job_deadline_s=math.inf)),
    (Objective(deadline_ms=5000), dict(ttft_s=math.inf, deadline_s=3.8, job_deadline_s=math.inf)),
    # a job call: its share (half of the job's 9 s, two calls left) and the job's whole time, both from now
    (Objective(job_id="agent", job_deadline_ms=9000, job_calls_left=2),
     dict(ttft_s=math.inf, deadline_s=3.3, job_deadline_s=7.8, conversation_id="job:agent")),
])
def test_a_resumed_request_is_placed_by_its_objective_priority_and_job_kv_key(objective, expect):
    """The dispatcher places a resumed request as the one submitted (its objective for ``slo``
    and ``jobs`` dispatch, its job's KV key, its priority and client), judged by the time left."""
    control, table = FakeControl(live=["b"], dead=["a"]), RequestTable()
    req = Request("r", (1, 2, 3), SamplingParams(max_tokens=8), 2, 100.0, reply_to="fe", objective=objective,
                  client_id="alice")
    h = RequestHandle("r", "a", req)
    table.add(h)
    table.placed(h)
    table.on_outputs("a", [RequestOutput("r", (10, 11, 12), 0)])
    supervisor(control, table, clock=lambda: 101.2).supervise_once()
    [state] = control.instances["b"].resumed
    assert (state.objective, state.priority, state.client_id) == (objective, 2, "alice")
    assert state.conversation_id == expect.get("conversation_id", "")
    [view] = control.views
    assert (view.priority, view.client_id, view.output_len, view.prompt_len) == (2, "alice", 3, 3)
    assert view.conversation_id == expect.pop("conversation_id", "")
    assert view.blocks_needed == 1  # prompt and delivered tokens, recomputed
    for name, want in expect.items():
        assert getattr(view, name) == pytest.approx(want), name
