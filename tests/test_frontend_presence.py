"""Frontends report themselves to the scheduler, which lists them (``llumnix-py scheduler --status``)."""

from __future__ import annotations

import os

import pytest

from llumnix_py.config import ClusterConfig, SchedulerConfig
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.frontend.requests import RequestTable
from llumnix_py.frontend.supervision import Supervisor
from llumnix_py.llumlet import LlumletConfig
from llumnix_py.runtime.local import LocalLauncher
from llumnix_py.scheduler.daemon import SchedulerDaemon
from llumnix_py.scheduler.frontends import FrontendRecord, FrontendTable
from tests.cluster_helpers import ManualClock, small_spec
from tests.test_frontend_parts import FakeControl


def test_the_table_lists_frontends_by_id_until_they_leave_or_go_silent():
    table = FrontendTable(timeout_s=5.0)
    table.heard(FrontendRecord("fe-b", api_url="http://127.0.0.1:2"), now=10.0)
    table.heard(FrontendRecord("fe-a", active_requests=3), now=11.0)
    table.heard(FrontendRecord("fe-b", api_url="http://127.0.0.1:2", active_requests=1), now=12.0)  # replaces
    listed = table.listed(now=13.0)
    assert [(f["frontend_id"], f["active_requests"], f["last_heard_s"]) for f in listed] == [("fe-a", 3, 2.0),
                                                                                            ("fe-b", 1, 1.0)]
    assert [f["frontend_id"] for f in table.listed(now=16.5)] == ["fe-b"]  # fe-a silent for 5.5 s > 5 s
    assert table.left("fe-b") and not table.left("fe-b")
    assert table.listed(now=16.5) == []


@pytest.mark.parametrize("bad", [dict(frontend_id=""), dict(frontend_id="fe", active_requests=-1)])
def test_a_record_is_validated(bad):
    with pytest.raises(ValueError):
        FrontendRecord(**bad)


def test_the_daemon_lists_frontends_on_its_clock():
    clock = ManualClock(100.0)
    cfg = SchedulerConfig(frontend_timeout_s=5.0)
    daemon = SchedulerDaemon(cfg, LocalLauncher(small_spec(), LlumletConfig(instance_id="t"), lambda: None),
                             clock=clock)
    daemon.frontend_heartbeat(FrontendRecord("fe", api_url="http://127.0.0.1:9", pid=7))
    clock.advance(4.0)
    [fe] = daemon.state()["frontends"]
    assert (fe["frontend_id"], fe["api_url"], fe["pid"], fe["last_heard_s"]) == ("fe", "http://127.0.0.1:9", 7, 4.0)
    clock.advance(1.5)
    assert daemon.state()["frontends"] == []  # silent past the timeout
    daemon.frontend_heartbeat(FrontendRecord("fe"))
    assert len(daemon.state()["frontends"]) == 1
    daemon.frontend_left("fe")
    assert daemon.state()["frontends"] == []
    with pytest.raises(TypeError):
        daemon.frontend_heartbeat({"frontend_id": "fe"})  # type: ignore[arg-type]


class PresenceControl(FakeControl):
    def __init__(self, fail: bool = False) -> None:
        super().__init__(live=[], dead=[])
        self.heartbeats: list[FrontendRecord] = []
        self.fail = fail

    def frontend_heartbeat(self, record: FrontendRecord) -> None:
        if self.fail:
            raise ConnectionError("scheduler away")
        self.heartbeats.append(record)


def test_the_supervisor_reports_presence_and_survives_an_absent_scheduler():
    control = PresenceControl()
    sup = Supervisor(control, RequestTable(), reply_to="fe", lease_timeout_s=30.0, block_size=16,  # type: ignore[arg-type]
                     presence=lambda: FrontendRecord("fe", api_url="http://127.0.0.1:5"))
    sup.supervise_once()  # the first round reports at once
    assert [r.api_url for r in control.heartbeats] == ["http://127.0.0.1:5"]
    sup.report_presence()
    assert len(control.heartbeats) == 2
    control.fail = True
    sup.supervise_once()  # nothing raised: the next interval retries
    sup.report_presence()
    assert len(control.heartbeats) == 2


def test_a_cluster_advertises_its_api_url_to_the_scheduler():
    cluster = Cluster.start(ClusterConfig(num_instances=1, runtime="local", engine=small_spec(num_blocks=32)))
    try:
        cluster.advertise("http://127.0.0.1:8123")
        [fe] = cluster.state()["frontends"]
        assert fe["frontend_id"] == cluster.reply_to and fe["api_url"] == "http://127.0.0.1:8123"
        assert fe["pid"] == os.getpid() and fe["active_requests"] == 0 and fe["host"]
    finally:
        cluster.stop()
