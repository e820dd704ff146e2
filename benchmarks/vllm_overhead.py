"""Overhead of llumnix-py's vLLM adapter, and live-migration downtime between vLLM instances.

1. Throughput: the same greedy workload (``batch`` requests of ``--prompt-len`` tokens,
   ``--max-tokens`` outputs each) run on one vLLM engine core

   - directly: ``EngineCore.add_request`` + ``EngineCore.step()`` until done;
   - under the adapter: ``VLLMEngineAdapter.add_request`` + ``step()`` (which also maps
     outputs to ``RequestOutput`` with indices and reports token counts and preemptions).

   Output tokens/s = generated tokens / wall time of the loop (prefill included); the
   adapter's own cost per step (loop time outside ``EngineCore.step``) is measured too. The two
   runs alternate (order swapped every repeat) on the same core; the median is reported.
2. Downtime: a request of each length is live-migrated (``MigrationDriver`` over a
   ``LocalPort``) between two instances in this process; downtime = freeze to commit.

Needs ``.venv-vllm`` (``make test-vllm`` builds it). Without ``--model`` a tiny random
Llama (2 layers, hidden 128) is written to a temporary folder.

Usage::

    .venv-vllm/bin/python benchmarks/vllm_overhead.py [--model PATH] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests_vllm"))


def _direct(core, batch: int, prompt_len: int, max_tokens: int, tag: str) -> tuple[int, float]:
    from vllm import SamplingParams as VSamplingParams
    from vllm.v1.engine import EngineCoreRequest

    for i in range(batch):
        sp = VSamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        prompt = [5 + (i + j) % 200 for j in range(prompt_len)]
        ecr = EngineCoreRequest(request_id=f"{tag}-{i}", prompt_token_ids=prompt,
                                mm_features=None, sampling_params=sp, pooling_params=None, arrival_time=0.0,
                                lora_request=None, cache_salt=None, data_parallel_rank=None)
        core.add_request(core.preprocess_add_request(ecr)[0])
    tokens = 0
    t0 = time.perf_counter()
    while core.scheduler.has_requests():
        outputs, _ = core.step()
        tokens += sum(len(o.new_token_ids) for eco in outputs.values() for o in eco.outputs)
    return tokens, time.perf_counter() - t0


_BOOKKEEPING: list[float] = []  # seconds per step spent outside EngineCore.step, adapter runs


def _adapted(adapter, batch: int, prompt_len: int, max_tokens: int, tag: str) -> tuple[int, float]:
    from llumnix_py.engines.types import Request, SamplingParams

    for i in range(batch):
        adapter.add_request(Request(f"{tag}-{i}", tuple(5 + (i + j) % 200 for j in range(prompt_len)),
                                    SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    tokens = steps = 0
    inner = [0.0]
    core_step = adapter.core.step

    def timed_step():  # time inside vLLM's own step, to isolate the adapter's bookkeeping
        t = time.perf_counter()
        try:
            return core_step()
        finally:
            inner[0] += time.perf_counter() - t

    adapter.core.step = timed_step
    try:
        t0 = time.perf_counter()
        while adapter.has_unfinished():
            tokens += sum(len(o.new_token_ids) for o in adapter.step().outputs)
            steps += 1
        total = time.perf_counter() - t0
    finally:
        del adapter.core.step
    _BOOKKEEPING.append((total - inner[0]) / max(steps, 1))
    return tokens, total


def throughput(adapter, batches, prompt_len: int, max_tokens: int, repeats: int) -> list[dict]:
    rows = []
    for batch in batches:
        direct, adapted = [], []
        for rep in range(repeats):
            runs = [(direct, _direct, adapter.core), (adapted, _adapted, adapter)]
            for out, run, engine in (runs if rep % 2 == 0 else runs[::-1]):  # alternate the order
                n, s = run(engine, batch, prompt_len, max_tokens, f"{run.__name__}{batch}-{rep}")
                out.append(n / s)
        d, a = statistics.median(direct), statistics.median(adapted)
        extra_us = statistics.median(_BOOKKEEPING[-repeats:]) * 1e6
        rows.append({"batch": batch, "direct_tokens_per_s": round(d, 1), "adapter_tokens_per_s": round(a, 1),
                     "overhead_pct": round(100.0 * (d - a) / d, 2), "adapter_us_per_step": round(extra_us, 1)})
        print(f"batch {batch:3d}: direct {d:9.1f} tok/s   adapter {a:9.1f} tok/s   "
              f"difference {rows[-1]['overhead_pct']:+.2f}%   adapter bookkeeping {extra_us:.1f} us/step")
    return rows


def downtime(src, dst, lengths, repeats: int) -> list[dict]:
    from llumnix_py.engines.types import Request, SamplingParams
    from migration.destination import DestinationMigrations
    from migration.driver import LocalPort, MigrationDriver
    from migration.protocol import MigrationStatus, SourceMigration

    rows = []
    for length in lengths:
        times, total = [], []
        for rep in range(repeats):
            rid = f"mig-{length}-{rep}"
            src.add_request(Request(rid, tuple(5 + j % 200 for j in range(length)),
                                    SamplingParams(max_tokens=8, ignore_eos=True)))
            src.step()  # prefill: the request is running
            result = MigrationDriver(src, LocalPort(DestinationMigrations(dst), src)).run(SourceMigration(rid, rid))
            assert result.status == MigrationStatus.FINISHED, result
            times.append(result.downtime_s * 1e3)
            total.append(result.total_s * 1e3)
            dst.abort_request(rid)
            src.step()
            dst.step()
        rows.append({"tokens": length, "downtime_ms": round(statistics.median(times), 3),
                     "total_ms": round(statistics.median(total), 3)})
        print(f"{length:5d} tokens: downtime {rows[-1]['downtime_ms']:.3f} ms, migration {rows[-1]['total_ms']:.3f} ms")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: a tiny random Llama)")
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes and repeats")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "vllm_overhead.json"))
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="llumnix-vllm-bench-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp / "vllm-cache"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp / "inductor"))
    model = args.model
    if model is None:
        from tiny_checkpoint import make_tiny_llama

        model = str(make_tiny_llama(tmp / "tiny-llama"))

    from llumnix_py.engines.vllm.adapter import VLLMEngineAdapter
    from llumnix_py.engines.vllm.config import VLLMEngineConfig

    config = VLLMEngineConfig(checkpoint=model, num_blocks=512, max_model_len=512, num_threads=args.threads)
    src, dst = VLLMEngineAdapter.start(config), VLLMEngineAdapter.start(config)
    batches = (1, 8) if args.quick else (1, 8, 32)
    repeats = 2 if args.quick else 6
    # Warm-up (first steps allocate buffers), not measured.
    _adapted(src, 2, args.prompt_len, 8, "warm")
    _direct(src.core, 2, args.prompt_len, 8, "warmd")
    rows = throughput(src, batches, args.prompt_len, args.max_tokens, repeats)
    mig = downtime(src, dst, (64, 192, 448) if args.quick else (64, 128, 256, 448), 3)
    import vllm

    out = {"vllm": vllm.__version__, "model": model if args.model else "tiny random Llama (2 layers, hidden 128)",
           "machine": platform.processor() or platform.machine(), "threads": args.threads,
           "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "throughput": rows, "downtime": mig}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    src.close()
    dst.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
