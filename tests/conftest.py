"""Shared fixtures. One Ray session per test process (started lazily by the tests that need it).

Options:
    --torch-threads N: pin this test process to N torch threads for the whole run (each
        test starts from it). ``--torch-threads 1`` makes the tiny test model decode as
        fast as it can, the setting that shows a test racing the wall clock.

``make test`` runs the suite on two worker processes, whole files apiece (``-n 2 --dist
loadfile``; ``make test TEST_WORKERS=0`` runs it in one process). The order is fixed
(``--randomly-dont-reorganize``: pytest-randomly still reseeds ``random`` per test).
``make test TEST_ARGS=`` shuffles it; ``make test TEST_ARGS=--randomly-seed=N`` replays
order N (the seed is printed at the top of each run).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--torch-threads", type=int, default=1,
                     help="torch threads for this test process (default 1; 0: leave torch's own choice)")


def pytest_configure(config):
    """One torch thread by default: the tiny test models gain nothing from intra-op threads,
    and on a busy machine their spinning pool is what slows a test down (a 64-wide linear
    layer took 290 us with two threads beside two other busy processes on this two-core
    machine, 43 us with one; the hypothesis machine of ``test_async_copies_machine`` took
    264 s instead of 8 s, near its hang guard). A test that needs more threads sets them
    itself (``_torch_threads_restored`` puts the value back)."""
    n = config.getoption("--torch-threads")
    if n:
        torch.set_num_threads(n)


RAY_HANG_GUARD_S = 900


# The files that take longest (about 45-130 s each on a two-core machine, ``--durations``), run
# first: ``make test`` spreads whole files over two workers (pytest-xdist, ``--dist loadfile``),
# in collection order, so the long ones start early and the short ones fill in behind them
# instead of one worker finishing a long file alone at the end.
LONG_FILES = ("test_experiments_quick.py", "test_faults_ray.py", "test_cluster_ray.py", "test_cli_daemon.py",
              "test_bench_scripts.py", "test_pd_planner.py", "test_experiments_slo.py", "test_faults_local.py")


def pytest_collection_modifyitems(config, items):
    """Long files first (``LONG_FILES``; otherwise the order is kept). A Ray test's hang guard
    is longer than the suite's 300 s: on a busy machine each actor takes many seconds to
    start, and the guard is there to catch a hang, not to time a test (a test with its own
    ``timeout`` mark keeps it)."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
    for item in items:
        uses_ray = item.get_closest_marker("ray") is not None or "ray_session" in getattr(item, "fixturenames", ())
        if uses_ray and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(RAY_HANG_GUARD_S))


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """``torch.set_num_threads`` is process-wide: whatever a test (or code it ran) set, the
    next test starts from the same value."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray session for the whole test run: no token auth, a temporary folder."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    # Under /tmp whatever TMPDIR says: Ray's socket paths live below this folder and must stay
    # under 108 bytes (a long TMPDIR, e.g. one another tool set for its own files, breaks ray.init).
    # Ray's own wait for its raylet is fixed at 30 s (ray/_private/node.py): on a loaded machine a
    # start can give up inside it, and is tried again (three tries in all).
    for attempt in range(3):
        temp = tempfile.mkdtemp(prefix="llumnix-ray-", dir="/tmp")
        try:
            ray.init(namespace="llumnix-test", include_dashboard=False, log_to_driver=False, num_cpus=8,
                     _temp_dir=temp, ignore_reinit_error=True)
            break
        except Exception as exc:  # Ray raises a bare Exception for it
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
