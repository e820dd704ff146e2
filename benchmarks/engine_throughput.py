"""Throughput of the built-in engine (default ``ModelConfig``, float32, CPU).

For each batch size (1, 4, 16, 32) and context length (128, 512, 2048):

- prefill: ``batch_size`` seeded random prompts of ``context_len`` tokens are
  admitted and prefilled in one engine step; prefill tokens/s = prompt tokens /
  the step's wall time;
- decode: then ``--decode-steps`` engine steps, each decoding one token for every
  request; decode tokens/s = generated tokens / their wall time, and step_ms the
  mean decode step.

Times are wall time around ``EngineCore.step()`` (scheduling included).

Usage::

    python benchmarks/engine_throughput.py [--quick] [--json PATH] [--threads N] [--decode-steps N]

``--quick`` runs batch sizes (1, 4, 16) x context lengths (128, 512) with fewer
decode steps (under a minute). Results also go to ``--json`` (default
``benchmarks/results/engine_throughput.json``): ``rows`` is a list of
``{batch_size, context_len, decode_tokens_per_s, prefill_tokens_per_s, step_ms}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from llumnix_py.engines.core import EngineConfig  # noqa: E402
from llumnix_py.engines.torch_engine.engine import make_torch_engine  # noqa: E402
from llumnix_py.engines.torch_engine.model import ModelConfig  # noqa: E402
from llumnix_py.engines.types import Request, SamplingParams  # noqa: E402

BATCH_SIZES = (1, 4, 16, 32)
CONTEXT_LENS = (128, 512, 2048)
QUICK_BATCH_SIZES = (1, 4, 16)
QUICK_CONTEXT_LENS = (128, 512)
BLOCK_SIZE = 16
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "engine_throughput.json"


def measure(model: ModelConfig, batch_size: int, context_len: int, decode_steps: int, seed: int) -> dict:
    """Prefill ``batch_size`` prompts of ``context_len`` tokens in one step, then decode."""
    tokens_per_seq = context_len + decode_steps + 1
    num_blocks = batch_size * -(-tokens_per_seq // BLOCK_SIZE) + 2
    config = EngineConfig(num_blocks=num_blocks, block_size=BLOCK_SIZE, watermark=0.0, max_batch_size=batch_size,
                          max_batched_tokens=batch_size * context_len)
    engine = make_torch_engine(engine=config, model=model)
    rng = random.Random(seed * 1_000_003 + batch_size * 10_007 + context_len)
    sampling = SamplingParams(max_tokens=decode_steps + 1, ignore_eos=True)
    for i in range(batch_size):
        prompt = tuple(rng.randrange(model.vocab_size) for _ in range(context_len))
        engine.add_request(Request(f"b{i}", prompt, sampling, arrival_time=float(i)))

    t0 = time.perf_counter()
    out = engine.step()
    prefill_s = time.perf_counter() - t0
    assert out.num_prefill_tokens == batch_size * context_len and len(out.outputs) == batch_size

    step_s = []
    for _ in range(decode_steps):
        t0 = time.perf_counter()
        out = engine.step()
        step_s.append(time.perf_counter() - t0)
        assert out.num_decode_tokens == batch_size and not out.preempted
    assert not engine.has_unfinished()
    decode_s = sum(step_s)
    return {
        "batch_size": batch_size,
        "context_len": context_len,
        "decode_tokens_per_s": batch_size * decode_steps / decode_s,
        "prefill_tokens_per_s": batch_size * context_len / prefill_s,
        "step_ms": 1000.0 * statistics.fmean(step_s),
        "prefill_ms": 1000.0 * prefill_s,
        "decode_step_ms_median": 1000.0 * statistics.median(step_s),
    }


def warm_up(model: ModelConfig) -> None:
    """One small prefill and decode so one-time costs (kernels, allocator) are not timed."""
    measure(model, batch_size=2, context_len=32, decode_steps=2, seed=0)


def print_table(rows: list[dict], console: Console, title: str) -> None:
    table = Table(title=title)
    for col in ("batch", "context", "prefill tok/s", "prefill ms", "decode tok/s", "decode step ms"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["batch_size"]), str(r["context_len"]), f"{r['prefill_tokens_per_s']:,.0f}",
                      f"{r['prefill_ms']:,.1f}", f"{r['decode_tokens_per_s']:,.1f}", f"{r['step_ms']:,.2f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced grid (under a minute)")
    parser.add_argument("--json", metavar="PATH", default=str(DEFAULT_JSON),
                        help=f"where to write the results (default {DEFAULT_JSON})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--decode-steps", type=int, default=None, help="decode steps per cell (default 32, quick 8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    decode_steps = args.decode_steps or (8 if args.quick else 32)
    if decode_steps <= 0:
        parser.error("--decode-steps must be positive")
    grid = [(b, c) for c in (QUICK_CONTEXT_LENS if args.quick else CONTEXT_LENS)
            for b in (QUICK_BATCH_SIZES if args.quick else BATCH_SIZES)]
    model = ModelConfig()  # the default model, float32
    console = Console()
    torch.manual_seed(args.seed)

    rows = []
    with torch.inference_mode():
        warm_up(model)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("engine throughput", total=len(grid))
            for b, c in grid:
                progress.update(task, description=f"batch {b:>2}, context {c:>4}")
                rows.append(measure(model, b, c, decode_steps, args.seed))
                progress.advance(task)

    title = (f"Built-in engine, default ModelConfig float32, {torch.get_num_threads()} threads, "
             f"{decode_steps} decode steps{' (quick)' if args.quick else ''}")
    print_table(rows, console, title)
    out = {
        "benchmark": "engine_throughput",
        "quick": args.quick,
        "decode_steps": decode_steps,
        "block_size": BLOCK_SIZE,
        "model": {k: v for k, v in vars(model).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "rows": rows,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
