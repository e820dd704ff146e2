"""Serving overhead: one built-in instance driven directly vs through the whole llumnix-py stack.

Both sides run the same engine (default ``ModelConfig``, float32, CPU, the same
torch thread count) on the same batch of ``--batch`` token-id prompts, greedy,
``ignore_eos``, ``--max-tokens`` each, all submitted at once:

- **direct**: ``make_torch_engine`` stepped in a loop by this script;
- **stack**: the OpenAI HTTP server (``create_app`` + ``ServerThread``) over a
  ``Cluster`` of one instance (``--runtime local|ray``); requests are sent
  concurrently by httpx as streaming ``/v1/completions`` calls.

Reported: output tokens/s (all tokens / wall time from the first submit to the
last token), mean time to first token, engine steps and engine busy time (the
summed model-forward time: it separates a slower engine from time lost between
steps). The HTTP client opens all its keep-alive connections in a warm-up burst before
timing (connection set-up is not serving overhead; left in, it staggered the arrivals by
up to 300 ms) and runs on uvloop, since it shares the 2 cores with the stack it
measures. One cluster serves every stack round; ``--repeats`` rounds alternate a
direct and a stack run, and the table gives the best round of each side and the
median of the per-round ratios. The target is that the stack keeps >= 90% of the
direct throughput. ``--profile`` samples every thread's Python
stack while the stack phase runs (a small built-in sampling profiler: py-spy and
yappi are not available) and prints where the time goes.

Usage::

    python benchmarks/serving_overhead.py [--quick | --smoke] [--runtime local|ray] [--json PATH] [--profile]

Results also go to ``--json``: ``direct_tokens_per_s``, ``stack_tokens_per_s``,
``direct_ttft_ms``, ``stack_ttft_ms``, ``ratio`` and the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec  # noqa: E402
from llumnix_py.engines.threads import apply_process_threads  # noqa: E402
from llumnix_py.engines.torch_engine.engine import make_torch_engine  # noqa: E402
from llumnix_py.engines.types import Request, SamplingParams  # noqa: E402
from llumnix_py.frontend.cluster import Cluster  # noqa: E402
from llumnix_py.server.app import ServerThread, create_app  # noqa: E402


def make_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 256) for _ in range(length)] for _ in range(n)]


def run_direct(prompts: list[list[int]], max_tokens: int, threads: int) -> dict[str, float]:
    apply_process_threads(threads)  # this script owns its process
    engine = make_torch_engine(EngineConfig())
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.add_request(Request("warmup", tuple(prompts[0]), SamplingParams(max_tokens=2, ignore_eos=True)))
    while engine.has_unfinished():
        engine.step()
    first: dict[str, float] = {}
    tokens = steps = 0
    busy = 0.0
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"d{i}", tuple(p), sp, arrival_time=float(i)))
    while engine.has_unfinished():
        out = engine.step()
        now = time.perf_counter()
        steps += 1
        busy += out.duration_s
        for o in out.outputs:
            tokens += len(o.new_token_ids)
            first.setdefault(o.request_id, now)
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "steps": steps, "busy_s": busy,
            "ttft_ms": statistics.mean(first[f"d{i}"] - t0 for i in range(len(prompts))) * 1e3}


async def _stream_one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int,
                      t0: float) -> tuple[float, int]:
    """One streamed completion; returns (TTFT, completion tokens from the final usage chunk).

    The client shares the 2 cores with the stack it measures, so it does little per chunk:
    it splits raw bytes into events and parses only the last one (the usage chunk). It runs
    on uvloop (``_run_client``): on the default loop this httpx client used 0.5-0.6 s of CPU
    per 4,096 streamed tokens, more than the server it measures (~0.35 s); on uvloop ~0.35 s.
    """
    body = {"model": "llumnix-tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            # One chunk per token, even while the detokenized text is still empty (the random-weight
            # model often emits ids that print nothing): TTFT is then the first token, as on the direct path.
            "return_token_ids": True}
    ttft: Optional[float] = None
    buf = b""
    last = b""
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for data in resp.aiter_raw():
            if ttft is None and data:
                ttft = time.perf_counter() - t0  # the first chunk carries the first token
            buf += data
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if ev.startswith(b"data: ") and ev != b"data: [DONE]":
                    last = ev
    usage = json.loads(last[6:]).get("usage") if last else None
    tokens = usage["completion_tokens"] if usage else 0
    if ttft is None or tokens != max_tokens:
        raise RuntimeError(f"stream ended with {tokens} tokens (expected {max_tokens})")
    return ttft, tokens


async def _drive_stack(url: str, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        # Warm-up with the full concurrency, so every keep-alive connection is open before timing:
        # the direct path has no connections to set up either.
        await asyncio.gather(*[_stream_one(client, url, p, 2, time.perf_counter()) for p in prompts])
        t0 = time.perf_counter()
        results = await asyncio.gather(*[_stream_one(client, url, p, max_tokens, t0) for p in prompts])
        wall = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_ms": statistics.mean(t for t, _ in results) * 1e3}


def _run_client(coro):
    """Run the load generator on uvloop where available: it shares the cores with the stack it measures."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


class StackSampler:
    """Samples every thread's Python stack every ``interval_s``; counts leaf functions per thread."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.samples: collections.Counter = collections.Counter()
        self.per_thread: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.is_set():
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = names.get(ident, "?").split("-")[0]
                # Attribute the sample to the innermost frame inside llumnix code, else the leaf.
                leaf, f = frame, frame
                while f is not None and not any(k in f.f_code.co_filename for k in ("llumnix_py", "migration")):
                    f = f.f_back
                where = f or leaf
                self.samples[(name, f"{Path(where.f_code.co_filename).name}:{where.f_code.co_name}")] += 1
                self.per_thread[name] += 1
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def table(self, top: int = 15) -> Table:
        t = Table(title="where the stack's threads spend time (samples; idle waits included)")
        for col in ("thread", "function", "share of thread"):
            t.add_column(col)
        for (thread, fn), n in self.samples.most_common(top):
            t.add_row(thread, fn, f"{100 * n / max(1, self.per_thread[thread]):.0f}%")
        return t


class Stack:
    """One cluster and HTTP server, started once and driven for every stack round."""

    def __init__(self, threads: int, runtime: str) -> None:
        config = ClusterConfig(num_instances=1, runtime=runtime, engine=EngineSpec(num_threads=threads))
        self.cluster = Cluster.start(config)
        self.server = ServerThread(create_app(self.cluster)).start()
        (iid,) = self.cluster.instance_ids()
        self.instance = self.cluster.control.instance(iid)

    def run(self, prompts: list[list[int]], max_tokens: int, sampler: Optional[StackSampler]) -> dict[str, float]:
        before = self.instance.stats()
        if sampler is not None:
            sampler.start()
        try:
            result = _run_client(_drive_stack(self.server.url, prompts, max_tokens))
        finally:
            if sampler is not None:
                sampler.stop()
        after = self.instance.stats()
        result["steps"] = after["steps"] - before["steps"]
        result["busy_s"] = after["busy_s"] - before["busy_s"]
        return result

    def stop(self) -> None:
        self.server.stop()
        self.cluster.stop()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", choices=("local", "ray"), default=None,
                   help="ray (default: the engine in its own process, as `llumnix-py serve` runs it); "
                        "local puts engine, server and client in one interpreter (default with --quick/--smoke)")
    p.add_argument("--quick", action="store_true", help="fewer tokens (under a minute)")
    p.add_argument("--smoke", action="store_true", help="tiny run that only checks the plumbing")
    p.add_argument("--batch", type=int, default=None, help="concurrent requests (default 16; smoke 2)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (256; quick 64; smoke 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the engine (both sides)")
    p.add_argument("--repeats", type=int, default=None,
                   help="alternating direct/stack rounds on one cluster (best and median of; 3, smoke 1)")
    p.add_argument("--profile", action="store_true", help="sample thread stacks during the stack phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.runtime is None:
        args.runtime = "local" if args.smoke or args.quick else "ray"
    if args.runtime == "ray":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    batch = args.batch or (2 if args.smoke else 16)
    max_tokens = args.max_tokens or (4 if args.smoke else 64 if args.quick else 256)
    repeats = args.repeats or (1 if args.smoke else 3)
    prompts = make_prompts(batch, args.prompt_len, args.seed)

    direct, stack = [], []
    sampler = StackSampler() if args.profile else None
    bench = Stack(args.threads, args.runtime)
    try:
        for r in tqdm(range(repeats), desc="direct/stack rounds", disable=repeats == 1):
            direct.append(run_direct(prompts, max_tokens, args.threads))
            stack.append(bench.run(prompts, max_tokens, sampler if r == repeats - 1 else None))
    finally:
        bench.stop()
    # Per-round ratios: both sides of a round ran back to back, so they saw the same machine.
    paired = sorted(s_["tokens_per_s"] / d["tokens_per_s"] for d, s_ in zip(direct, stack))
    best_d = max(direct, key=lambda x: x["tokens_per_s"])
    best_s = max(stack, key=lambda x: x["tokens_per_s"])
    result: dict[str, Any] = {
        "runtime": args.runtime, "batch": batch, "prompt_len": args.prompt_len, "max_tokens": max_tokens,
        "threads": args.threads, "repeats": repeats,
        "direct_tokens_per_s": round(best_d["tokens_per_s"], 1), "stack_tokens_per_s": round(best_s["tokens_per_s"], 1),
        "direct_ttft_ms": round(best_d["ttft_ms"], 1), "stack_ttft_ms": round(best_s["ttft_ms"], 1),
        "ratio": round(best_s["tokens_per_s"] / best_d["tokens_per_s"], 3),
        "median_round_ratio": round(statistics.median(paired), 3),
        "direct_steps": best_d["steps"], "stack_steps": best_s["steps"],
        "direct_busy_s": round(best_d["busy_s"], 3), "stack_busy_s": round(best_s["busy_s"], 3),
        "all_direct_tokens_per_s": [round(x["tokens_per_s"], 1) for x in direct],
        "all_stack_tokens_per_s": [round(x["tokens_per_s"], 1) for x in stack],
    }
    table = Table(title=f"serving overhead: batch {batch}, prompt {args.prompt_len}, {max_tokens} tokens each, "
                        f"runtime {args.runtime}, {args.threads} torch thread(s)")
    for col in ("path", "tokens/s", "mean TTFT ms", "wall s", "engine steps", "engine busy s"):
        table.add_column(col, justify="right")
    for name, r in (("direct (EngineCore loop)", best_d), ("stack (HTTP + cluster)", best_s)):
        table.add_row(name, f"{r['tokens_per_s']:.0f}", f"{r['ttft_ms']:.1f}", f"{r['wall_s']:.2f}",
                      str(r["steps"]), f"{r['busy_s']:.2f}")
    table.add_row("stack / direct (best rounds)", f"{100 * result['ratio']:.1f}%", "", "", "", "")
    table.add_row("stack / direct (median of rounds)", f"{100 * result['median_round_ratio']:.1f}%", "", "", "", "")
    console = Console(width=max(120, Console().width))
    console.print(table)
    if sampler is not None:
        console.print(sampler.table())
        result["profile"] = [{"thread": t, "function": f, "samples": n}
                             for (t, f), n in sampler.samples.most_common(30)]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
