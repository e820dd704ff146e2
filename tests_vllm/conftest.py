"""Fixtures for the vLLM adapter tests (run with ``make test-vllm``, in ``.venv-vllm``).

Everything vLLM writes (compile caches, temporary files) goes under one session
temporary folder, set here before vLLM is imported. Two engine instances are
built once per session and shared: each costs seconds and about 1.7 GB; a test
leaves them empty (checked after every test).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

_TMP = Path(tempfile.mkdtemp(prefix="llumnix-vllm-"))
os.environ.update(
    HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CACHE_ROOT=str(_TMP / "vllm-cache"),
    TORCHINDUCTOR_CACHE_DIR=str(_TMP / "inductor"), TMPDIR=str(_TMP / "tmp"), VLLM_NO_USAGE_STATS="1",
    VLLM_HOST_IP="127.0.0.1", VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1",
    VLLM_ENABLE_V1_MULTIPROCESSING="0", RAY_AUTH_MODE="disabled",
)
(_TMP / "tmp").mkdir()
tempfile.tempdir = None  # re-read TMPDIR

NUM_BLOCKS = 40
MAX_MODEL_LEN = 512


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def checkpoint() -> str:
    from tiny_checkpoint import make_tiny_llama

    return str(make_tiny_llama(_TMP / "tiny-llama"))


def make_adapter(checkpoint: str, **kw):
    from llumnix_py.engines.vllm.adapter import VLLMEngineAdapter
    from llumnix_py.engines.vllm.config import VLLMEngineConfig

    kw.setdefault("num_blocks", NUM_BLOCKS)
    kw.setdefault("max_model_len", MAX_MODEL_LEN)
    return VLLMEngineAdapter.start(VLLMEngineConfig(checkpoint=checkpoint, **kw))


@pytest.fixture(scope="session")
def engine_pair(checkpoint):
    """Two vLLM instances in this process: (source, destination)."""
    a = make_adapter(checkpoint)
    b = make_adapter(checkpoint)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def engines(engine_pair):
    """The shared pair, checked empty (no request, every block free) before and after the test."""
    for e in engine_pair:
        _assert_idle(e)
    yield engine_pair
    for e in engine_pair:
        for rid in list(e.request_ids()):  # a failed test must not poison the next one
            e.abort_request(rid)
        for rid in list(e._prealloc):
            e.free_pre_alloc(rid)
    for e in engine_pair:
        _assert_idle(e)


def _assert_idle(e) -> None:
    e.check_invariants()
    load = e.load()
    assert load.free_blocks == load.total_blocks == NUM_BLOCKS, load
    assert not load.running and not load.waiting and load.reserved_blocks == 0, load
    assert not e.has_unfinished()
