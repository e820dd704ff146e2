"""Helpers shared by the vLLM tests (importable: ``tests_vllm`` is on ``sys.path``, see conftest)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from typing import Iterator, Sequence

import httpx

from llumnix_py.engines.types import Request
from tests.cluster_helpers import wait_for


def solo_tokens(engine, request: Request) -> list[int]:
    """Tokens of ``request`` run alone, unmigrated, on ``engine`` (which must be idle)."""
    engine.add_request(request)
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step().outputs:
            out.extend(o.new_token_ids)
    assert out, "empty reference: the comparison would prove nothing"
    return out


@contextlib.contextmanager
def served(args: Sequence[str], start_timeout_s: float = 180.0) -> Iterator[str]:
    """``llumnix-py serve ARGS`` on 127.0.0.1 and a free port, as a subprocess; yields its URL
    once ``/health`` answers 200 (the timeout only bounds a start that never comes), and
    stops it (SIGINT, then SIGKILL) on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llumnix_py.cli", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    def healthy() -> bool:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]  # it died: fail now, with its output
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, start_timeout_s, "the server's /health")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
