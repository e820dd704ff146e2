"""The demo (`make demo`) runs end to end: every stream completes, migrations happen, nothing leaks."""

from __future__ import annotations

import re

import pytest

from llumnix_py.demo import run_demo


@pytest.mark.slow
def test_demo_local_runtime(capsys):
    assert run_demo(instances=3, requests=12, runtime="local") == 0
    out = capsys.readouterr().out
    assert re.search(r"migration \S+: instance-000 -> instance-00[12] finished", out), out[-3000:]
    assert "all 12 streams complete: True; KV blocks still in use: 0" in out
