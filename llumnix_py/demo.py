"""``make demo`` / ``llumnix-py demo``: a local cluster of built-in engines serving real traffic.

1. Start a local Ray cluster with the global scheduler and one built-in engine
   instance, and the OpenAI-compatible API server on a free loopback port.
2. Send a burst with the official ``openai`` client (streaming): it lands on the one
   instance, which fills its KV cache and queues the rest.
3. Scale out to N instances. The global scheduler sees one overloaded instance
   and N-1 idle ones and moves running and queued requests by live migration
   while they keep streaming; each migration is printed as it happens.
4. Print per-instance load before and after, the migrations and their downtime,
   and the latency table. Every request's stream must come back complete.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import threading
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, SchedulerConfig

console = Console()


def _load_table(title: str, state: dict[str, Any]) -> Table:
    t = Table(title=title)
    for col in ("instance", "KV blocks used", "running", "waiting", "freeness"):
        t.add_column(col, justify="right" if col != "instance" else "left")
    for inst in state["instances"]:
        t.add_row(inst["instance_id"], f"{inst['used_blocks']}/{inst['total_blocks']}", str(inst["running"]),
                  str(inst["waiting"]), f"{inst['freeness']:.1f}")
    return t


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def _burst(url: str, model: str, n: int, seed: int) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    rng = random.Random(seed)
    words = ["migration", "cache", "token", "instance", "scheduler", "latency", "block", "prefill", "decode"]

    async def one(i: int) -> dict:
        prompt = f"Request {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        max_tokens = rng.randint(96, 320)
        t0 = time.perf_counter()
        ttft = None
        text = []
        usage = None
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(chunk.choices[0].text)
            if chunk.usage:
                usage = chunk.usage
        e2e = time.perf_counter() - t0
        tokens = usage.completion_tokens if usage else 0
        return {"i": i, "max_tokens": max_tokens, "tokens": tokens, "ttft": ttft or e2e, "e2e": e2e,
                "tpot": (e2e - (ttft or e2e)) / max(1, tokens - 1)}

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


def run_demo(instances: int = 4, requests: int = 32, runtime: str = "ray", seed: int = 0) -> int:
    from llumnix_py.frontend.cluster import Cluster
    from llumnix_py.server.app import ServerThread, create_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    config = ClusterConfig(
        num_instances=1, runtime=runtime,
        # A small KV pool per instance (80 blocks x 16 tokens) so one instance cannot hold the burst.
        engine=EngineSpec(engine=EngineConfig(num_blocks=80, max_batch_size=32)),
        scheduler=SchedulerConfig(poll_interval_s=0.05, migration_interval_s=0.1),
    )
    console.rule("[bold]llumnix-py demo")
    where = "Ray cluster" if runtime == "ray" else "in-process cluster"
    console.print(f"starting a local {where} with 1 built-in engine instance ...")
    kw = {"_temp_dir": tempfile.mkdtemp(prefix="llumnix-ray-")} if runtime == "ray" else {}
    t0 = time.perf_counter()
    cluster = Cluster.start(config, **kw)
    server = ServerThread(create_app(cluster), host="127.0.0.1", port=0)
    server.start()
    console.print(f"cluster up in {time.perf_counter() - t0:.1f} s; OpenAI API at {server.url}/v1")
    printed: set[str] = set()
    stop = threading.Event()

    def watch() -> None:  # print each migration as it completes
        while not stop.is_set():
            for m in cluster.state().get("recent_migrations", []):
                if m["migration_id"] not in printed:
                    printed.add(m["migration_id"])
                    colour = "green" if m["status"] == "finished" else "yellow"
                    what = (f"{m['stages']} stages, {m['blocks']} KV blocks, downtime {m['downtime_ms']:.2f} ms"
                            if m["blocks"] else "queued request (no KV)")
                    console.print(f"  [{colour}]migration[/] {m['request_id']}: {m['src']} -> {m['dst']} "
                                  f"{m['status']}, {what} (total {m['total_ms']:.1f} ms)", soft_wrap=True)
            stop.wait(0.2)

    results: list[dict] = []
    try:
        console.print(f"sending a burst of {requests} streaming requests with the openai client ...")
        box: dict[str, Any] = {}
        burst = threading.Thread(target=lambda: box.setdefault("r", asyncio.run(
            _burst(server.url, config.model_name, requests, seed))))
        burst.start()
        time.sleep(2.0)
        before = cluster.state()
        console.print(_load_table("load before scale-out (the burst sits on one instance)", before))
        console.print(f"scaling out to {instances} instances; the scheduler now migrates requests live:")
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        cluster.launch(instances - 1)
        time.sleep(1.5)
        after = cluster.state()
        console.print(_load_table("load after scale-out (requests spread by migration)", after))
        burst.join()
        results = box["r"]
        time.sleep(0.5)
        stop.set()
        watcher.join()
        final = cluster.state()
        _summary(results, final)
        complete = all(r["tokens"] == r["max_tokens"] for r in results)
        leaked = sum(i["used_blocks"] for i in final["instances"])
        console.print(f"all {len(results)} streams complete: {complete}; KV blocks still in use: {leaked}",
                      soft_wrap=True)
        return 0 if complete and leaked == 0 else 1
    finally:
        stop.set()
        server.stop()
        cluster.stop()


def _summary(results: list[dict], state: dict[str, Any]) -> None:
    migs = state.get("migrations", {})
    down = state.get("migration_downtime_ms", [])
    t = Table(title="migrations")
    t.add_column("outcome")
    t.add_column("count", justify="right")
    for k, v in sorted(migs.items()):
        t.add_row(k, str(v))
    console.print(t)
    if down:
        console.print(f"live-migration downtime: mean {sum(down) / len(down):.2f} ms, "
                      f"P99 {_pct(down, 99):.2f} ms, max {max(down):.2f} ms over {len(down)} migrations")
    t = Table(title=f"latency of {len(results)} requests")
    t.add_column("metric")
    t.add_column("mean", justify="right")
    t.add_column("P99", justify="right")
    for key, name in (("ttft", "time to first token (ms)"), ("tpot", "time per output token (ms)"),
                      ("e2e", "end-to-end (ms)")):
        vals = [r[key] * 1e3 for r in results]
        t.add_row(name, f"{sum(vals) / max(1, len(vals)):.1f}", f"{_pct(vals, 99):.1f}")
    console.print(t)
