"""Shared fixtures. One Ray session per test session (started lazily by the tests that need it)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray session for the whole test run: no token auth, a temporary folder."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    temp = tempfile.mkdtemp(prefix="llumnix-ray-")
    ray.init(namespace="llumnix-test", include_dashboard=False, log_to_driver=False, num_cpus=8,
             _temp_dir=temp, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
