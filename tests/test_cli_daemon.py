"""The scheduler daemon's lifecycle through the command line, on a real Ray cluster.

One ``ray start --head`` (127.0.0.1, free ports, its own short temporary folder) for the
module; every ``llumnix-py`` command runs as a subprocess joined to it with
``--ray-address``. The cluster is stopped by ending the ``ray start --block`` process
that owns it (its processes share its fate), never with ``ray stop``, which would end
every Ray on the machine, this test session's own included.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import httpx
import pytest

from llumnix_py import __version__
from llumnix_py.cli import main
from tests.cluster_helpers import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAMESPACE = "llumnix-cli-test"
START_S = 240.0  # bounds a start that never comes (Ray, instances and torch load slowly on a busy machine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return dict(os.environ, RAY_AUTH_MODE="disabled")


def _processes_mentioning(text: str) -> list[int]:
    """Pids of the processes whose command line names ``text`` (this module's Ray folder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


# Ray's own wait for its raylet is fixed at 30 s (ray/_private/node.py); on a loaded machine a
# head can give up inside it. Such a start is tried again, within START_S.
RAY_GAVE_UP = "timed out during startup"
HEAD_TRIES = 3


def _stop_head(head: subprocess.Popen, temp: str) -> None:
    head.terminate()  # its shutdown hook ends the head's processes
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    for pid in _processes_mentioning(temp):  # a worker that outlived its raylet
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp, ignore_errors=True)


def _start_head(deadline: float) -> tuple[subprocess.Popen, str, int]:
    """A running ``ray start --head --block``, its folder and port; a start that Ray gave up on
    (``RAY_GAVE_UP``) is tried again, at most ``HEAD_TRIES`` times in all, before ``deadline``."""
    attempt = 0
    while True:
        attempt += 1
        temp = tempfile.mkdtemp(prefix="lxc", dir="/tmp")  # short: Ray's socket paths are length-limited
        port = free_port()
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
               "--node-ip-address", "127.0.0.1", "--temp-dir", temp, "--num-cpus", "2", "--include-dashboard",
               "false", "--dashboard-port", str(free_port()), "--dashboard-agent-listen-port", "0",
               "--disable-usage-stats"]
        with open(os.path.join(temp, "ray-start.log"), "wb") as log:
            head = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # `ray start` writes the cluster's address file once the head is up.
        wait_for(lambda: os.path.exists(os.path.join(temp, "ray_current_cluster")) or head.poll() is not None,
                 max(deadline - time.monotonic(), 1.0), "ray start --head")
        if head.poll() is None:
            return head, temp, port
        text = Path(temp, "ray-start.log").read_text(errors="replace")
        _stop_head(head, temp)
        if RAY_GAVE_UP not in text or attempt == HEAD_TRIES or time.monotonic() > deadline:
            raise AssertionError(f"ray start --head exited ({attempt} tries):\n{text[-3000:]}")


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A Ray head of its own on 127.0.0.1, stopped after the module."""
    head, temp, port = _start_head(time.monotonic() + START_S)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _stop_head(head, temp)


def scheduler_cmd(address: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "llumnix_py.cli", "scheduler", "--ray-address", address, "--namespace", NAMESPACE,
            *flags]


def run_scheduler(address: str, *flags: str) -> subprocess.CompletedProcess:
    """``llumnix-py scheduler ...`` to its exit."""
    return subprocess.run(scheduler_cmd(address, *flags), env=_env(), capture_output=True, text=True,
                          timeout=START_S)


class Background:
    """A long-running command; its output lines are read into a queue as they come."""

    def __init__(self, cmd: Sequence[str]) -> None:
        self.proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of output

    def wait_line(self, text: str) -> str:
        """The first output line containing ``text``; fails if the output ends without it."""
        while True:
            try:
                line = self.lines.get(timeout=START_S)
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {START_S} s: {''.join(self.seen)[-3000:]}")
            if not line:
                raise AssertionError(f"ended without {text!r}: {''.join(self.seen)[-3000:]}")
            self.seen.append(line)
            if text in line:
                return line

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"llumnix-py {__version__}"
    from importlib.metadata import version

    assert __version__ == version("llumnix-py")  # the package's own version, not a stale copy


def one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [text], result.stderr


def test_daemon_start_refuse_status_stop(ray_address):
    one_line_error(run_scheduler(ray_address, "--stop"), f"no scheduler is running in namespace {NAMESPACE!r}")
    one_line_error(run_scheduler(ray_address, "--status"), f"no scheduler is running in namespace {NAMESPACE!r}")

    # A generous heartbeat: on a busy test machine a live instance can miss polls for longer than
    # the default 1.5 s, and would be fenced and replaced (under another id) mid-test.
    daemon = Background(scheduler_cmd(ray_address, "--instances", "2", "--num-blocks", "64",
                                      "--heartbeat-timeout", "60"))
    frontend = None
    try:
        daemon.wait_line(f"scheduler daemon running in namespace {NAMESPACE!r} with instances "
                         f"['instance-000', 'instance-001']")
        one_line_error(run_scheduler(ray_address, "--instances", "1"),
                       f"a scheduler is already running in namespace {NAMESPACE!r}; "
                       f"use 'llumnix-py scheduler --stop' first")

        port = free_port()
        frontend = Background([sys.executable, "-m", "llumnix_py.cli", "frontend", "--ray-address", ray_address,
                               "--namespace", NAMESPACE, "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        frontend.wait_line("Uvicorn running")
        # Ready when its health says so (a readiness probe): it has heard the scheduler and sees
        # both instances. A request before that may find no instance known yet (a 503).
        wait_for(lambda: httpx.get(url + "/health", timeout=10).json()["status"] == "ok", 120,
                 "the frontend to see the scheduler and both instances")
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"model": "llumnix-tiny", "prompt": "hello", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text

        status = run_scheduler(ray_address, "--status")  # the frontend reported its URL before it served
        assert status.returncode == 0, status.stderr
        out = status.stdout.splitlines()
        assert out[0].startswith(f"scheduler daemon in namespace {NAMESPACE!r}: 2 instance(s), 1 frontend(s), "), out
        assert out[1].split() == ["instance", "role", "blocks", "used/total", "running", "waiting", "freeness", "state"]
        rows = {line.split()[0]: line.split() for line in out[2:4]}
        assert sorted(rows) == ["instance-000", "instance-001"], out
        assert all(row[1] == "both" and row[2].endswith("/64") and row[-1] == "serving" for row in rows.values()), out
        [fe] = [line.split() for line in out if url in line]
        assert fe[0].startswith("tcp://127.0.0.1:") and fe[1] == url and fe[3] == str(frontend.proc.pid), out

        stop = run_scheduler(ray_address, "--stop")
        assert stop.returncode == 0, stop.stderr
        assert stop.stdout.strip() == (f"the scheduler daemon in namespace {NAMESPACE!r} stopped, with instances "
                                       f"['instance-000', 'instance-001']")
        daemon.wait_line("has stopped")  # the watching command sees its daemon go, and exits
        assert daemon.proc.wait(timeout=60) == 0
        # Stopped means gone: nothing left to report or stop, and the frontend has no instance.
        one_line_error(run_scheduler(ray_address, "--status"), f"no scheduler is running in namespace {NAMESPACE!r}")
        one_line_error(run_scheduler(ray_address, "--stop"), f"no scheduler is running in namespace {NAMESPACE!r}")
        r = httpx.post(url + "/v1/completions", timeout=60, json={"model": "llumnix-tiny", "prompt": "hi",
                                                                  "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_instance", r.text
    finally:
        if frontend is not None:
            frontend.stop()
        daemon.stop()
        run_scheduler(ray_address, "--stop")  # whatever a failure left behind


def test_stop_kills_instances_a_dead_scheduler_left_behind(ray_session):
    from llumnix_py.config import ClusterConfig
    from llumnix_py.runtime import ray_lifecycle
    from llumnix_py.runtime.ray_runtime import INSTANCE_PREFIX, LlumletActor

    ray, namespace = ray_session, "llumnix-test-orphans"
    # An instance actor (not started: stopping goes by actor name) with no scheduler in its namespace.
    orphan = ray.remote(LlumletActor).options(name=INSTANCE_PREFIX + "instance-007", namespace=namespace,
                                              lifetime="detached", num_cpus=0).remote(ClusterConfig())
    assert ray.get(orphan.identity.remote(), timeout=START_S) == ("", "")
    assert ray_lifecycle.live_scheduler(namespace) is None
    report = ray_lifecycle.stop_daemon(namespace)
    assert report == ray_lifecycle.StopReport(scheduler=False, instances=("instance-007",))
    assert ray_lifecycle.instance_ids(namespace) == []  # stop_daemon returns once Ray lists none
    with pytest.raises(ray_lifecycle.NoSchedulerError, match="no scheduler is running in namespace"):
        ray_lifecycle.stop_daemon(namespace)
