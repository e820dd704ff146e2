"""Chaos: steady load through the official ``openai`` client while processes are SIGKILLed.

A Ray cluster of ``--instances`` small-model instances serves the OpenAI API on
127.0.0.1 (a free port). Requests arrive at ``--rate`` per second (Poisson), half
greedy and half seeded sampling, each streamed through ``openai.OpenAI`` with the
prompt as token ids and ``return_token_ids``. Meanwhile, ``--kills`` times, after a
random pause of ``--gap`` seconds (from the previous recovery), the benchmark kills
with SIGKILL the process of the scheduler actor or of a random instance actor
(an even mix, in a seeded random order), and measures recovery: from the kill to
a restarted scheduler (the frontend watchdog's restart count grew) and the
configured instance count (the victim replaced), with ``/health`` back to ``ok``.

Verification, once the load stops and everything finished (pieces of
``benchmarks/soak.py``: the reference run, the idle-block check):

- ``served``: completed with exactly the tokens of a one-engine reference run;
  ``mismatched``: completed with other tokens; ``failed``: ended with an error;
- ``lost``: neither, within ``--drain-timeout``;
- ``duplicated_tokens``: tokens the frontend dropped as duplicates plus tokens
  delivered beyond the reference;
- ``leaked_blocks``: KV blocks still used on the instances once idle;
- ``recovery_s``: per kill; ``recovery_s_max`` (target: under 15 s).

Usage::

    python benchmarks/chaos.py [--quick] [--kills 20] [--json PATH]

``--quick``: 4 kills in about a minute. Exits non-zero if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.soak import MODEL, VOCAB, add_load_flags, reference, wait_idle_blocks  # noqa: E402
from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, SchedulerConfig  # noqa: E402
from llumnix_py.engines.types import Request, SamplingParams  # noqa: E402
from llumnix_py.frontend.cluster import Cluster  # noqa: E402

MODEL_NAME = "llumnix-chaos"
RECOVERY_TARGET_S = 15.0


@dataclass
class Outcome:
    """What the client saw of one request."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None


def make_config(args: argparse.Namespace) -> ClusterConfig:
    engine = EngineSpec(engine=EngineConfig(num_blocks=args.num_blocks, max_batch_size=16), model=MODEL)
    return ClusterConfig(num_instances=args.instances, runtime="ray", engine=engine, model_name=MODEL_NAME,
                         ray_namespace="llumnix-chaos", seed=args.seed,
                         scheduler=SchedulerConfig(poll_interval_s=0.02, migration_interval_s=0.05))


def stream_one(client, prompt: tuple[int, ...], sp: SamplingParams) -> Outcome:
    """One streamed completion through the openai client: the token ids it delivered."""
    out = Outcome()
    try:
        stream = client.completions.create(
            model=MODEL_NAME, prompt=list(prompt), max_tokens=sp.max_tokens, temperature=sp.temperature,
            seed=sp.seed, stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        for chunk in stream:
            for choice in chunk.choices:
                out.token_ids.extend((choice.model_extra or {}).get("token_ids") or [])
                out.finish_reason = choice.finish_reason or out.finish_reason
    except Exception as exc:  # an HTTP error, or an error event in the stream
        out.error = f"{type(exc).__name__}: {exc}"[:160]
    return out


def kill_actor_process(ray, actor) -> None:
    """SIGKILL an actor's worker process (a crash nobody asked Ray for)."""
    os.kill(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30), signal.SIGKILL)


class Load:
    """Poisson arrivals of streamed requests, each in a worker thread, until ``stop``."""

    def __init__(self, url: str, rate: float, max_prompt: int, max_tokens: int, seed: int) -> None:
        import openai

        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        self.rate, self.max_prompt, self.max_tokens = rate, max_prompt, max_tokens
        self.rng = random.Random(seed)
        self.requests: dict[str, Request] = {}
        self.futures: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(128, thread_name_prefix="chaos-client")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.rng.expovariate(self.rate)):
            n += 1
            prompt = tuple(self.rng.randrange(1, VOCAB) for _ in range(self.rng.randint(8, self.max_prompt)))
            greedy = n % 2 == 0
            sp = SamplingParams(max_tokens=self.rng.randint(16, self.max_tokens), ignore_eos=True,
                                temperature=0.0 if greedy else 0.8, seed=None if greedy else n)
            rid = f"chaos-{n}"
            self.requests[rid] = Request(rid, prompt, sp, arrival_time=float(n))
            self.futures[rid] = self._pool.submit(stream_one, self.client, prompt, sp)

    def outcomes(self, timeout: float) -> dict[str, Optional[Outcome]]:
        """Each request's outcome; None for one still running at the deadline (lost)."""
        deadline = time.monotonic() + timeout
        got: dict[str, Optional[Outcome]] = {}
        for rid, fut in list(self.futures.items()):
            try:
                got[rid] = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                got[rid] = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        return got


def recovered(cluster: Cluster, target: str, victim: str, restarts_before: int) -> bool:
    """The scheduler is back (a restart since the kill) and the configured count is live, victim gone
    (judged on one membership snapshot, taken after ``/health``'s verdict was ``ok``)."""
    if cluster.health().status != "ok":
        return False
    live = cluster.control.membership()["instances"]
    if victim in live or len(live) < cluster.config.num_instances or not cluster.control.scheduler_up:
        return False
    return target != "scheduler" or (cluster.control.healing() or {}).get("restarts", 0) > restarts_before


def chaos(cluster: Cluster, args: argparse.Namespace, rng: random.Random, progress: Progress) -> list[dict]:
    """Kill, wait for recovery, pause; ``args.kills`` times. One record per kill."""
    import ray

    from llumnix_py.runtime.ray_runtime import INSTANCE_PREFIX, SCHEDULER_NAME

    ns = cluster.config.ray_namespace
    targets = (["scheduler", "instance"] * math.ceil(args.kills / 2))[:args.kills]
    rng.shuffle(targets)
    task = progress.add_task("chaos", total=len(targets))
    log = []
    for k, target in enumerate(targets):
        time.sleep(rng.uniform(*args.gap))  # a random interval of steady load
        restarts_before = (cluster.control.healing() or {}).get("restarts", 0)
        victim = "scheduler" if target == "scheduler" else rng.choice(cluster.instance_ids())
        name = SCHEDULER_NAME if target == "scheduler" else INSTANCE_PREFIX + victim
        kill_actor_process(ray, ray.get_actor(name, namespace=ns))
        t_kill = time.monotonic()
        progress.update(task, description=f"chaos: killed {victim}, waiting for recovery")
        recovery: Optional[float] = None
        while time.monotonic() - t_kill < args.recovery_timeout:
            if recovered(cluster, target, victim, restarts_before):
                recovery = time.monotonic() - t_kill
                break
            time.sleep(0.05)
        log.append({"kill": k + 1, "target": target, "victim": victim, "t": round(t_kill, 2),
                    "recovery_s": None if recovery is None else round(recovery, 2)})
        progress.update(task, advance=1, description=f"chaos: {victim} back in {recovery}")
        if recovery is None:
            break  # it did not heal: the next kill would measure nothing (and the run has failed)
    return log


def run(args: argparse.Namespace) -> dict[str, Any]:
    from llumnix_py.server.app import ServerThread, create_app

    rng = random.Random(args.seed)
    cfg = make_config(args)
    cluster = Cluster.start(cfg)
    server = ServerThread(create_app(cluster)).start()
    load = Load(server.url, args.rate, args.max_prompt, args.max_tokens, args.seed)
    t0 = time.monotonic()
    try:
        load.start()
        with Progress(transient=True, disable=args.no_progress) as progress:
            kills = chaos(cluster, args, rng, progress)
        time.sleep(rng.uniform(*args.gap))  # load on the healed cluster before it stops
        load.stop()
        outcomes = load.outcomes(args.drain_timeout)
        used = wait_idle_blocks(cluster, timeout=30.0)
        duplicates_dropped = cluster.duplicates_dropped
        health = cluster.health().to_dict()
    finally:
        server.stop()
        cluster.stop()
    elapsed = time.monotonic() - t0

    expected = reference(cfg.engine, list(load.requests.values()))
    served = failed = lost = mismatched = extra_tokens = 0
    errors: dict[str, int] = {}
    for rid, out in outcomes.items():
        ref = expected[rid]
        if out is None:
            lost += 1
        elif out.error is not None or out.finish_reason not in ("length", "stop"):
            failed += 1
            why = out.error or f"finish reason {out.finish_reason}"
            errors[why] = errors.get(why, 0) + 1
        else:
            extra_tokens += max(0, len(out.token_ids) - len(ref))
            if out.token_ids == ref:
                served += 1
            else:
                mismatched += 1
    recovery = [k["recovery_s"] for k in kills]
    done = [r for r in recovery if r is not None]
    return {
        "instances": args.instances, "rate": args.rate, "elapsed_s": round(elapsed, 1),
        "kills": len(kills), "submitted": len(outcomes), "served": served, "failed": failed, "lost": lost,
        "mismatched": mismatched, "duplicated_tokens": duplicates_dropped + extra_tokens,
        "duplicates_dropped": duplicates_dropped, "leaked_blocks": sum(used.values()),
        "used_blocks_by_instance": used, "recovery_s": recovery,
        "recovery_s_max": max(done) if len(done) == len(recovery) and done else None,
        "kill_log": kills, "health_at_end": health, "errors": errors,
        "served_tokens": sum(len(o.token_ids) for o in outcomes.values() if o is not None),
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 kills (about a minute)")
    p.add_argument("--kills", type=int, default=None, help="processes to kill (default 20; --quick 4)")
    p.add_argument("--gap", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="seconds of steady load before each kill (default 6 12; --quick 3 6)")
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--num-blocks", type=int, default=256, help="KV blocks (of 16 tokens) per instance")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    p.add_argument("--recovery-timeout", type=float, default=120.0)
    add_load_flags(p, max_prompt=100, drain_timeout=180.0)
    args = p.parse_args(argv)
    if args.kills is None:
        args.kills = 4 if args.quick else 20
    if args.gap is None:
        args.gap = (3.0, 6.0) if args.quick else (6.0, 12.0)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    r = run(args)
    table = Table(title=f"chaos: {r['kills']} kills in {r['elapsed_s']:.0f} s, {r['instances']} instances, "
                        f"{r['rate']:g} req/s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("submitted", "served", "served_tokens", "failed", "lost", "mismatched", "duplicated_tokens",
                "leaked_blocks", "recovery_s_max"):
        table.add_row(key, str(r[key]))
    for k in r["kill_log"]:
        table.add_row(f"kill {k['kill']}: {k['target']} ({k['victim']})", f"back in {k['recovery_s']} s")
    for why, n in sorted(r["errors"].items(), key=lambda kv: -kv[1]):
        table.add_row(f"failed: {n}x", why)
    Console().print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2))
    slow = r["recovery_s_max"] is None or r["recovery_s_max"] >= RECOVERY_TARGET_S
    bad = r["lost"] or r["duplicated_tokens"] or r["leaked_blocks"] or r["mismatched"] or r["failed"] or slow
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
