"""Soak test: a small cluster under sustained load, migrating, scaling and aborting, checked exactly.

A local (or Ray) cluster of ``--instances`` small-model instances, each with a
small KV pool, takes Poisson arrivals (``--rate`` requests/s) of random prompt
and output lengths, half greedy and half seeded sampling. Dispatch is random
and the migrate-out threshold high, so instances keep migrating requests to one
another. Every ``--scale-every`` seconds the cluster alternately drains one
instance (scale in) and launches one (scale out). A fraction (``--abort-frac``)
of the requests is aborted by the client after a random delay.

Verification, at the end:

- every completed request's tokens equal a reference computed by one engine,
  without migration (the float64 model makes greedy and seeded sampling
  independent of batch composition); aborted requests must have received a
  prefix of their reference;
- ``lost``: requests neither finished nor aborted within ``--drain-timeout``;
- ``duplicated_tokens``: duplicates the frontend dropped
  (``cluster.duplicates_dropped``) plus tokens delivered beyond the reference;
- ``leaked_blocks``: KV blocks still used on the instances once idle;
- resident memory of this process (and of Ray workers) at start and end.

Usage::

    python benchmarks/soak.py [--duration 600] [--quick] [--runtime local|ray] [--json PATH]

``--quick`` = 30 s. Exits non-zero if anything was lost, duplicated, mismatched or leaked.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, PolicyConfig, SchedulerConfig  # noqa: E402
from llumnix_py.engines.registry import build_engine  # noqa: E402
from llumnix_py.engines.threads import claim_process_threads  # noqa: E402
from llumnix_py.engines.types import FinishReason, Request, SamplingParams  # noqa: E402
from llumnix_py.frontend.cluster import Cluster  # noqa: E402
from llumnix_py.frontend.handles import RequestHandle  # noqa: E402

MODEL = (("num_layers", 2), ("hidden_size", 64), ("intermediate_size", 128), ("num_heads", 4),
         ("num_kv_heads", 2), ("dtype", "float64"), ("max_position_embeddings", 512))
VOCAB = 300  # prompt tokens are drawn from 1..VOCAB-1


def rss_mb(pid: str = "self") -> float:
    """VmRSS of a process in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def ray_workers_rss_mb() -> float:
    """Summed RSS of this machine's Ray worker processes (``ray::`` in their command line)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::"):
            total += rss_mb(proc.name)
    return total


def make_config(args: argparse.Namespace) -> ClusterConfig:
    engine = EngineSpec(engine=EngineConfig(num_blocks=args.num_blocks, max_batch_size=16), model=MODEL)
    policy = PolicyConfig(dispatch="random", migrate_out_threshold=args.migrate_threshold, scaling="none",
                          min_instances=1, max_instances=16)
    sched = SchedulerConfig(policy=policy, poll_interval_s=0.02, migration_interval_s=0.05,
                            max_migrations_out=1, max_migrations_in=2)
    return ClusterConfig(num_instances=args.instances, runtime=args.runtime, engine=engine, scheduler=sched,
                         seed=args.seed)


def reference(spec: EngineSpec, reqs: list[Request]) -> dict[str, list[int]]:
    """Each request's tokens from one engine, no migration (large pool: no preemption needed),
    run with the instances' torch threads (the cluster gave the process's value back when it
    stopped; torch's default of one thread per core made this ~8x slower beside one other
    busy process on a two-core machine)."""
    engine = build_engine(EngineSpec(kind=spec.kind, engine=EngineConfig(num_blocks=4096, max_batch_size=64),
                                     model=spec.model, num_threads=spec.num_threads))
    tokens: dict[str, dict[int, int]] = {r.request_id: {} for r in reqs}
    claim = claim_process_threads(spec.num_threads, "the soak's reference engine")
    try:
        for i in range(0, len(reqs), 64):
            for r in reqs[i:i + 64]:
                engine.add_request(r)
            while engine.has_unfinished():
                for o in engine.step().outputs:
                    for k, t in enumerate(o.new_token_ids):
                        tokens[o.request_id][o.index + k] = t
    finally:
        claim.release()
    return {rid: [d[i] for i in sorted(d)] for rid, d in tokens.items()}


def wait_idle_blocks(cluster: Cluster, timeout: float) -> dict[str, int]:
    """Used blocks per live instance once the cluster has nothing to do (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        used = {}
        for iid in cluster.instance_ids():
            inst = cluster.control.instance(iid)
            if inst is not None:
                try:
                    used[iid] = inst.load().used_blocks
                except Exception:  # an instance that just stopped (drained)
                    pass
        if not any(used.values()) or time.monotonic() > deadline:
            return used
        time.sleep(0.1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    rss_start = rss_mb()
    cluster = Cluster.start(make_config(args))
    ray_rss_start = ray_workers_rss_mb() if args.runtime == "ray" else 0.0
    handles: dict[str, RequestHandle] = {}
    requests: dict[str, Request] = {}
    aborted: set[str] = set()
    pending_aborts: list[tuple[float, str]] = []
    scale_events: list[dict[str, Any]] = []
    submit_errors = 0
    t0 = time.monotonic()
    next_arrival = t0
    next_scale = t0 + args.scale_every
    scale_in_next = True
    n = 0
    try:
        with Progress(transient=True, disable=args.no_progress) as progress:
            task = progress.add_task("soak", total=args.duration)
            while (now := time.monotonic()) - t0 < args.duration:
                progress.update(task, completed=now - t0,
                                description=f"soak: {len(handles)} sent, {len(cluster.active_requests())} active")
                if now >= next_arrival:
                    next_arrival += rng.expovariate(args.rate)
                    n += 1
                    prompt = tuple(rng.randrange(1, VOCAB) for _ in range(rng.randint(8, args.max_prompt)))
                    greedy = n % 2 == 0
                    sp = SamplingParams(max_tokens=rng.randint(4, args.max_tokens), ignore_eos=True,
                                        temperature=0.0 if greedy else 0.8, seed=None if greedy else n)
                    rid = f"soak-{n}"
                    try:
                        handles[rid] = cluster.submit(prompt, sp, request_id=rid)
                        requests[rid] = Request(rid, prompt, sp, arrival_time=float(n))
                    except Exception:
                        submit_errors += 1
                    if rng.random() < args.abort_frac:
                        pending_aborts.append((now + rng.uniform(0.0, 1.0), rid))
                for due, rid in [p for p in pending_aborts if p[0] <= now]:
                    pending_aborts.remove((due, rid))
                    h = handles.get(rid)
                    if h is not None and not h.finished:
                        try:
                            cluster.abort(rid)
                            aborted.add(rid)
                        except Exception:  # finished meanwhile
                            pass
                if now >= next_scale:
                    next_scale += args.scale_every
                    ids = cluster.instance_ids()
                    if scale_in_next and len(ids) > 2:
                        victim = rng.choice(sorted(ids))
                        cluster.drain(victim)
                        scale_events.append({"t": round(now - t0, 2), "event": "drain", "instance": victim})
                    else:
                        new = cluster.launch(1)
                        scale_events.append({"t": round(now - t0, 2), "event": "launch", "instance": new})
                    scale_in_next = not scale_in_next
                time.sleep(max(0.0, min(next_arrival, next_scale) - time.monotonic()) if not pending_aborts
                           else min(0.01, max(0.0, next_arrival - time.monotonic())))
        # No more load: everything not aborted must finish.
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline and any(not h.finished for rid, h in handles.items() if rid not in aborted):
            time.sleep(0.05)
        used = wait_idle_blocks(cluster, timeout=30.0)
        state = cluster.state()
        duplicates_dropped = cluster.duplicates_dropped
    finally:
        cluster.stop()
    rss_end = rss_mb()
    ray_rss_end = ray_workers_rss_mb() if args.runtime == "ray" else 0.0

    expected = reference(make_config(args).engine, [r for rid, r in requests.items()])
    served = failed = lost = mismatched = extra_tokens = aborted_ok = 0
    failure_reasons: Counter[str] = Counter()  # why requests ended with an error, for the report
    for rid, h in handles.items():
        ref, got = expected[rid], list(h.token_ids)
        if rid in aborted:
            aborted_ok += 1
            if got != ref[:len(got)]:
                mismatched += 1
            extra_tokens += max(0, len(got) - len(ref))
            continue
        if not h.finished:
            lost += 1
        elif h.finish_reason not in (FinishReason.LENGTH, FinishReason.STOP):
            failed += 1
            failure_reasons[(h.error or f"finish reason {h.finish_reason}")[:120]] += 1
        else:
            served += 1
            extra_tokens += max(0, len(got) - len(ref))
            if got != ref:
                mismatched += 1
    return {
        "runtime": args.runtime, "duration_s": args.duration, "instances_at_start": args.instances,
        "submitted": len(handles), "submit_errors": submit_errors,
        "served": served, "failed": failed, "lost": lost, "aborted": aborted_ok, "mismatched": mismatched,
        "duplicated_tokens": duplicates_dropped + extra_tokens, "duplicates_dropped": duplicates_dropped,
        "leaked_blocks": sum(used.values()), "used_blocks_by_instance": used,
        "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1),
        "ray_workers_rss_start_mb": round(ray_rss_start, 1), "ray_workers_rss_end_mb": round(ray_rss_end, 1),
        "migrations": state.get("migrations", {}), "migrations_total": state.get("migrations_total", 0),
        "scale_events": scale_events,
        "dead_instances": state.get("dead_instances", []), "failure_reasons": dict(failure_reasons),
        "served_tokens": sum(len(h.token_ids) for rid, h in handles.items() if rid not in aborted),
    }


def add_load_flags(p: argparse.ArgumentParser, *, max_prompt: int, drain_timeout: float) -> None:
    """Flags every load benchmark here shares: request sizes, the drain, the seed, the output."""
    p.add_argument("--max-prompt", type=int, default=max_prompt)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--drain-timeout", type=float, default=drain_timeout)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=None, help="seconds of load (default 600; --quick 30)")
    p.add_argument("--quick", action="store_true", help="30 s (unless --duration is given)")
    p.add_argument("--runtime", choices=("local", "ray"), default="local")
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--num-blocks", type=int, default=40, help="KV blocks (of 16 tokens) per instance")
    p.add_argument("--rate", type=float, default=10.0, help="Poisson arrivals per second")
    p.add_argument("--abort-frac", type=float, default=0.1)
    p.add_argument("--scale-every", type=float, default=None, help="seconds between scale events")
    p.add_argument("--migrate-threshold", type=float, default=30.0)
    add_load_flags(p, max_prompt=120, drain_timeout=120.0)
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 30.0 if args.quick else 600.0
    if args.scale_every is None:
        args.scale_every = max(2.0, min(20.0, args.duration / 6))
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    r = run(args)
    table = Table(title=f"soak: {r['duration_s']:.0f} s, runtime {r['runtime']}, {r['instances_at_start']} instances")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("submitted", "served", "served_tokens", "aborted", "failed", "lost", "mismatched",
                "duplicated_tokens", "leaked_blocks", "submit_errors", "migrations_total", "rss_start_mb",
                "rss_end_mb"):
        table.add_row(key, str(r[key]))
    if r["runtime"] == "ray":
        table.add_row("ray_workers_rss_mb", f"{r['ray_workers_rss_start_mb']} -> {r['ray_workers_rss_end_mb']}")
    table.add_row("migrations", ", ".join(f"{k}={v}" for k, v in sorted(r["migrations"].items())) or "-")
    table.add_row("scale events", ", ".join(e["event"] for e in r["scale_events"]) or "-")
    table.add_row("dead instances", ", ".join(r["dead_instances"]) or "-")
    for reason, n in sorted(r["failure_reasons"].items(), key=lambda kv: -kv[1]):
        table.add_row(f"failed: {n}x", reason)
    Console().print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2))
    bad = r["lost"] or r["duplicated_tokens"] or r["leaked_blocks"] or r["mismatched"] or r["failed"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
