"""Live migration between two built-in engine instances in separate processes.

Each process (``tests/migration_worker.py``, multiprocessing spawn) runs a ``Llumlet``
on a real transport; the test talks to it over a ``multiprocessing`` Pipe. A batch of
requests runs on A; some are migrated to B mid-decode (live mode). Every request's
tokens (A's and B's outputs merged by index) must equal a run without migration, and
both instances must end with every block free.
"""

from __future__ import annotations

import functools

import pytest

from llumnix_py.engines.types import Request, SamplingParams
from tests.factories import make_engine, run_engines
from tests.migration_worker import Worker, request_to_dict

SPEC = {"model": "tiny", "dtype": "float64", "num_blocks": 160, "block_size": 16, "max_model_len": 512,
        "max_batch_size": 16, "watermark": 0.0}
N_REQUESTS = 5
# Long enough that no request finishes on A while the four migrations run one after another,
# even on a loaded 2-core machine (with 100, the last one once finished first); prompt + output
# stays within max_model_len and the 5 requests within A's 160 blocks (5 x 31).
MAX_TOKENS = 360
MIGRATE = ["p0", "p1", "p3", "p4"]  # greedy and seeded (odd ids are seeded)


def make_batch() -> list[Request]:
    reqs = []
    for i in range(N_REQUESTS):
        prompt = tuple((i * 37 + j * 11) % 300 + 1 for j in range(40 + 23 * i))
        seeded = i % 2 == 1
        sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.8 if seeded else 0.0,
                            top_p=0.9 if seeded else 1.0, seed=1000 + i if seeded else None)
        reqs.append(Request(f"p{i}", prompt, sp, arrival_time=float(i)))
    return reqs


@functools.lru_cache(maxsize=1)
def reference() -> dict[str, list[int]]:
    reqs = make_batch()
    e = make_engine("torch", num_blocks=256, block_size=16, dtype="float64", max_model_len=512, watermark=0.0)
    return run_engines([e], requests=reqs, check=False).tokens


def merge(*output_lists) -> dict[str, list[int]]:
    """Tokens per request from the workers' outputs, by index; asserts no gap and no conflict."""
    by_index: dict[str, dict[int, int]] = {}
    for outs in output_lists:
        for rid, index, toks, _fin, _t in outs:
            slot = by_index.setdefault(rid, {})
            for k, tok in enumerate(toks):
                assert slot.setdefault(index + k, tok) == tok, f"{rid}: two different tokens at {index + k}"
    tokens = {}
    for rid, slot in by_index.items():
        assert sorted(slot) == list(range(len(slot))), f"{rid}: gap in output indices"
        tokens[rid] = [slot[i] for i in range(len(slot))]
    return tokens


@pytest.mark.parametrize("transport", ["zmq", "gloo"])
def test_live_migration_between_processes(transport):
    reqs = make_batch()
    ref = reference()
    a = b = None
    try:
        a = Worker("A", transport, SPEC, {"chunk_blocks": 2})
        b = Worker("B", transport, SPEC, {"chunk_blocks": 2})
        a.call("add", requests=[request_to_dict(r) for r in reqs])
        assert a.call("wait_tokens", ids=[r.request_id for r in reqs], n=3, timeout=60)["ok"]
        results = {}
        for rid in MIGRATE:
            results[rid] = a.call("migrate", request_id=rid, dst=b.address, migration_id=f"mig-{rid}",
                                  mode="live", last_stage_max_blocks=0)
        for rid, res in results.items():
            assert res["status"] == "finished", (rid, res)
            assert res["blocks"] > 0 and res["stages"] >= 1
            assert res["downtime_s"] <= res["total_s"]
        assert a.call("wait_idle", timeout=60)["ok"] and b.call("wait_idle", timeout=60)["ok"]
        outs_a, outs_b = a.call("outputs")["outputs"], b.call("outputs")["outputs"]
        # the migrated requests continued on B mid-decode, the others never left A
        on_b = {o[0] for o in outs_b}
        assert on_b == set(MIGRATE)
        for rid in MIGRATE:
            first_b = min(o[1] for o in outs_b if o[0] == rid)
            assert 0 < first_b < MAX_TOKENS, (rid, first_b)
        assert merge(outs_a, outs_b) == ref
        for w in (a, b):
            st = w.call("state")
            assert st["invariants"] == "" and st["requests"] == [] and st["incoming"] == []
            assert st["num_free"] == st["num_blocks"]
        assert b.call("state")["migrations_in"] == len(MIGRATE)
    finally:
        for w in (a, b):
            if w is not None:
                w.close()
