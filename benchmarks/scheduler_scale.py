"""How the pure policies scale with the cluster size.

For 16, 64, 256 and 1024 instances (synthetic seeded snapshots: 8-64 running and
0-10 waiting requests each, 880 KV blocks), measures

- one migration-pairing round: freeness of every instance, pairing, and the request
  each source migrates (``plan_migrations``), median over repeats, in ms;
- dispatch decisions per second: ``dispatch()`` with ``on_dispatch`` after each
  decision and an ``on_poll`` of every instance every ``n`` decisions.

Usage::

    python benchmarks/scheduler_scale.py [--quick] [--json PATH] [--seed N]

Targets: a round at 1024 instances under 10 ms; over 10,000 dispatches/s at 64.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llumnix_py.load import InstanceLoad, RequestLoad  # noqa: E402
from policies.config import PolicyConfig  # noqa: E402
from policies.dispatch import DispatchState, dispatch  # noqa: E402
from policies.pairing import plan_migrations  # noqa: E402

SIZES = (16, 64, 256, 1024)
TOTAL_BLOCKS = 880
ROUND_TARGET_MS = 10.0  # at 1024 instances
DISPATCH_TARGET = 10_000.0  # decisions/s at 64 instances


def make_instance(rng: random.Random, iid: str) -> InstanceLoad:
    """A plausible snapshot: utilisation 30-105 % spread over 8-64 running requests."""
    n_running = rng.randint(8, 64)
    target = int(TOTAL_BLOCKS * rng.uniform(0.3, 1.05))
    cuts = sorted(rng.randint(0, target) for _ in range(n_running - 1))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, target])]
    running = tuple(
        RequestLoad(request_id=f"{iid}-r{k}", num_blocks=s, blocks_needed=s, priority=int(rng.random() < 0.1),
                    arrival_time=rng.uniform(0, 100))
        for k, s in enumerate(sizes)
    )
    waiting = tuple(
        RequestLoad(request_id=f"{iid}-w{k}", num_blocks=0, blocks_needed=rng.randint(1, 120), arrival_time=100 + k)
        for k in range(rng.randint(0, 10))
    )
    used = min(TOTAL_BLOCKS, sum(sizes))
    return InstanceLoad(instance_id=iid, total_blocks=TOTAL_BLOCKS, used_blocks=used, running=running, waiting=waiting)


def make_cluster(n: int, seed: int) -> list[InstanceLoad]:
    rng = random.Random(seed * 100_003 + n)
    return [make_instance(rng, f"inst-{k:05d}") for k in range(n)]


def time_round(cluster: list[InstanceLoad], cfg: PolicyConfig, repeats: int) -> tuple[float, int]:
    """Median ms of one pairing round, and the number of pairs it keeps."""
    samples = []
    pairs = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        pairs = len(plan_migrations(cluster, cfg))
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), pairs


def dispatch_rate(cluster: list[InstanceLoad], cfg: PolicyConfig, decisions: int, seed: int) -> float:
    """Dispatch decisions per second, polling every instance every ``len(cluster)`` decisions."""
    state = DispatchState(seed=seed)
    rng = random.Random(seed)
    requests = [RequestLoad(request_id=f"req-{k}", num_blocks=0, blocks_needed=rng.randint(1, 120),
                            priority=int(rng.random() < 0.1)) for k in range(512)]
    poll_every = len(cluster)
    ids = [inst.instance_id for inst in cluster]
    t0 = time.perf_counter()
    for k in range(decisions):
        req = requests[k % len(requests)]
        d = dispatch(cluster, req, cfg, state)
        assert d is not None
        state.on_dispatch(d.instance_id, req)
        if (k + 1) % poll_every == 0:
            for iid in ids:
                state.on_poll(iid)
    return decisions / (time.perf_counter() - t0)


def run(quick: bool, seed: int) -> dict[str, list]:
    cfg = PolicyConfig(headroom_blocks=((1, 100),))
    result: dict[str, list] = {"instances": [], "round_ms": [], "dispatch_per_s": [], "pairs": []}
    for n in SIZES:
        cluster = make_cluster(n, seed)
        plan_migrations(cluster, cfg)  # warm up
        repeats = (5 if quick else 30) if n >= 256 else (20 if quick else 200)
        round_ms, pairs = time_round(cluster, cfg, repeats)
        decisions = max(2_000, (40_000 if quick else 200_000) // max(1, n // 16))
        rate = dispatch_rate(cluster, cfg, decisions, seed)
        result["instances"].append(n)
        result["round_ms"].append(round(round_ms, 3))
        result["dispatch_per_s"].append(round(rate))
        result["pairs"].append(pairs)
    return result


def render(result: dict[str, list]) -> None:
    rows = list(zip(result["instances"], result["round_ms"], result["dispatch_per_s"], result["pairs"]))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        print(f"{'instances':>10} {'round ms':>10} {'dispatch/s':>12} {'pairs':>6}")
        for n, ms, rate, pairs in rows:
            print(f"{n:>10} {ms:>10.3f} {rate:>12,} {pairs:>6}")
    else:
        table = Table(title="llumnix-py policies: scheduler scale")
        for col in ("instances", "round ms (median)", "dispatch / s", "pairs kept"):
            table.add_column(col, justify="right")
        for n, ms, rate, pairs in rows:
            table.add_row(str(n), f"{ms:.3f}", f"{rate:,}", str(pairs))
        Console().print(table)
    by_n = {n: (ms, rate) for n, ms, rate, _ in rows}
    if 1024 in by_n:
        ok = by_n[1024][0] < ROUND_TARGET_MS
        verdict = "OK" if ok else "MISSED"
        print(f"round at 1024 instances: {by_n[1024][0]:.2f} ms (target < {ROUND_TARGET_MS} ms) {verdict}")
    if 64 in by_n:
        ok = by_n[64][1] > DISPATCH_TARGET
        verdict = "OK" if ok else "MISSED"
        print(f"dispatch at 64 instances: {by_n[64][1]:,}/s (target > {DISPATCH_TARGET:,.0f}/s) {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(args.quick, args.seed)
    render(result)
    if args.json:
        out = {k: result[k] for k in ("instances", "round_ms", "dispatch_per_s")}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
