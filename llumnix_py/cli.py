"""``llumnix-py``: serve, scheduler, frontend, bench, demo.

    llumnix-py serve --instances 4            # all in one: scheduler, 4 instances, OpenAI API
    llumnix-py scheduler --instances 4        # the daemon alone, on a Ray cluster (detached actors)
    llumnix-py scheduler --status             # its instances, their loads, the attached frontends
    llumnix-py scheduler --stop               # stop the daemon and its instances
    llumnix-py frontend --port 8001           # another API server on the same daemon
    llumnix-py bench --url http://127.0.0.1:8000 --rate 4 --num-requests 100
    llumnix-py demo                           # a local cluster serving a burst, migrations shown
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
from typing import Optional, Sequence

from llumnix_py import __version__
from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, LlumletConfig, MigrationConfig, PolicyConfig, \
    SchedulerConfig
from llumnix_py.engines.registry import default_block_size, engine_kinds
from llumnix_py.errors import InvalidRequestError, UnknownNameError
from llumnix_py.llumlet_types import PREFILL_FIRST_STEPS, check_prefill_first_steps
from policies.roles import PD_MIGRATIONS_AT_ONCE, migrations_at_once


# The servers' per-request migration cooldown (``--migration-cooldown``). On L-L, 16 simulated
# instances, 10,000 requests, 5 seeds (experiments/RESULTS.md, "The cooldown at 10,000
# requests"), 30 s kept returns under 2% and at most 4 migrations per request up to
# capacity, with capacity unchanged (+1% [-1% to +3%]). PolicyConfig keeps 0, the paper's
# policy, so the experiments reproduce it.
SERVE_MIGRATION_COOLDOWN_S = 30.0


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--instances", type=int, default=None,
                   help="instances at start (default: one per --roles entry, else 2)")
    g.add_argument("--runtime", choices=["ray", "local"], default="ray")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    g.add_argument("--namespace", default="llumnix", help="Ray namespace of the named actors")
    g.add_argument("--engine", default=EngineSpec.kind,
                   help=f"engine adapter: {', '.join(engine_kinds())} (default %(default)s)")
    g.add_argument("--model", default=None, help="Llama-layout checkpoint folder (default: seeded random weights)")
    g.add_argument("--model-name", default="llumnix-tiny", help="model name the API reports")
    g.add_argument("--num-blocks", type=int, default=512, help="KV blocks per instance")
    g.add_argument("--host-blocks", type=int, default=0,
                   help="host swap-pool blocks per instance (0: preemption recomputes)")
    g.add_argument("--conversation-blocks", type=int, default=0,
                   help="host blocks per instance that finished turns of conversations keep for the next turn")
    g.add_argument("--preemption-mode", default="cost", help="cost, swap or recompute (with --host-blocks)")
    g.add_argument("--fairness", action="store_true", help="per-client fair sharing (VTC) in each engine")
    g.add_argument("--global-fairness", action="store_true",
                   help="with --fairness: engines order clients by their service over the whole cluster "
                        "(the scheduler's cluster-wide counters)")
    g.add_argument("--fair-dispatch", action="store_true",
                   help="with --fairness: a request of a client under its share cluster-wide goes to the freest "
                        "instance; others follow --dispatch")
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV block (default: the engine's, 16; 32 for vLLM, "
                        "whose CPU kernels need a multiple of 32)")
    g.add_argument("--max-batch-size", type=int, default=64)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--threads", type=int, default=1, help="torch threads per instance")
    g.add_argument("--batch-policy", default="fcfs", choices=["fcfs", "edf", "jit"],
                   help="each engine's batching: fcfs (priorities), edf (earliest due), jit (by objective margin)")
    g.add_argument("--length-estimator", default="quantile", choices=["quantile", "oracle"],
                   help="the jit policy's output-length bound")
    g.add_argument("--jit-skip-slack", action="store_true",
                   help="the jit policy lets running requests with much slack sit out a step for an urgent "
                        "request that would miss otherwise (policies/jit.py)")
    g.add_argument("--pd", type=_pd_ratio, default=None, metavar="P:D",
                   help="prefill/decode disaggregation: instances get the roles prefill and decode in this "
                        "ratio (e.g. 1:3 with --instances 4); new requests go to prefill instances and move to a "
                        "decode instance by live migration once their first token is out (default: colocated)")
    g.add_argument("--roles", type=_roles, default=None, metavar="ROLE,...",
                   help="per-instance roles instead of --pd, in instance order: prefill, decode or both, "
                        "e.g. prefill,decode,decode (one per instance)")
    g.add_argument("--decode-hold-ms", type=float, default=LlumletConfig(instance_id="x").decode_hold_s * 1e3,
                   metavar="MS", help="a decode instance holds a never-prefilled request queued on it this long "
                                      "for the scheduler to move it to a prefill instance, then prefills it "
                                      "itself (0: no hold; default %(default)g)")
    g.add_argument("--prefill-first-steps", type=int, default=LlumletConfig(instance_id="x").prefill_first_steps,
                   metavar="N", help="a prefill instance prefills waiting prompts alone for up to N steps in a row "
                                     "before the requests waiting for their hand-off decode a token (0: every step "
                                     "decodes them; default %(default)s)")
    g = p.add_argument_group("policies")
    g.add_argument("--dispatch", default="freeness", help="freeness, load, queue, prefill_queue, round_robin, random, slo, conversation, "
                   "jobs (a job call goes to its job's KV while that keeps the job's deadline)")
    g.add_argument("--pairing", default="freeness", help="freeness, defrag")
    g.add_argument("--migrate-out", default="shortest",
                   help="shortest, last, longest, lowest_priority, waiting_head, most_served, most_served_cluster")
    g.add_argument("--migrate-out-threshold", type=float, default=3.0,
                   help="freeness below which an instance migrates requests out (default 3, the paper's)")
    g.add_argument("--migrate-in-threshold", type=float, default=None, metavar="FREENESS",
                   help="freeness above which an instance takes migrations (default: the out threshold, the "
                        "paper's); higher keeps room on destinations for new requests (policies/pairing.py)")
    g.add_argument("--blocked-heads-first", action="store_true",
                   help="a migration source whose queue head waits for blocks moves that head (no KV to copy) "
                        "wherever it fits before moving a running request for balance (policies/pairing.py)")
    g.add_argument("--migration-cooldown", type=float, default=SERVE_MIGRATION_COOLDOWN_S, metavar="SECONDS",
                   help="a request that finished a migration is not moved again for this long, unless its "
                        f"instance drains (policies/cooldown.py; cuts ping-pong; default {SERVE_MIGRATION_COOLDOWN_S:g}; "
                        "0: off, the paper's policy)")
    g.add_argument("--no-migration", action="store_true", help="dispatch only (INFaaS++-style)")
    g.add_argument("--heartbeat-timeout", type=float, default=SchedulerConfig.heartbeat_timeout_s, metavar="SECONDS",
                   help="an instance that has not answered the scheduler's poll for this long is taken as dead, "
                        "fenced and replaced (default %(default)s; raise it on a host so busy that a live "
                        "instance can miss its polls for longer)")
    g.add_argument("--max-migrations-out", type=int, default=None, metavar="N",
                   help="migrations (and prefill-to-decode hand-offs) in flight at once with an instance as source "
                        f"(default 1, or {PD_MIGRATIONS_AT_ONCE} with --pd or --roles, so hand-offs do not queue one "
                        "at a time; `llumnix-py plan --handoffs` searches it)")
    g.add_argument("--max-migrations-in", type=int, default=None, metavar="N",
                   help="migrations in flight at once with an instance as destination (default as --max-migrations-out)")
    g.add_argument("--rescue", action="store_true",
                   help="migrate requests about to miss their objective where they are predicted to meet it "
                        "(needs --batch-policy jit)")
    g.add_argument("--headroom", default="", help="priority headroom, e.g. '1:64' (priority:blocks, comma separated)")
    g.add_argument("--scaling", action="store_true", help="enable auto-scaling")
    g.add_argument("--min-instances", type=int, default=1)
    g.add_argument("--max-instances", type=int, default=16)
    g.add_argument("--scale-out-threshold", type=float, default=10.0)
    g.add_argument("--scale-in-threshold", type=float, default=60.0)
    g = p.add_argument_group("migration")
    g.add_argument("--transport", default="zmq", help="zmq, gloo, nccl")
    g.add_argument("--migration-stages", type=int, default=3)
    g.add_argument("--last-stage-blocks", type=int, default=16)
    g.add_argument("--migration-mode", default="live", choices=["live", "blocking", "recompute"])
    g.add_argument("--commit-hold-ms", type=float, default=MigrationConfig().commit_hold_s * 1e3, metavar="MS",
                   help="as a live migration's source: how long the destination is asked to start no step for "
                        "the stop-and-copy, and this instance starts none while its request is frozen "
                        "(0: no holds; default %(default)g)")
    g.add_argument("--max-step-hold-ms", type=float, default=LlumletConfig(instance_id="x").max_step_hold_s * 1e3,
                   metavar="MS", help="as a destination: the longest this instance holds its steps for an incoming "
                                      "stop-and-copy, whatever the source asks (0: refuse; default %(default)g)")
    g.add_argument("--hold-wait-fraction", type=float, default=LlumletConfig(instance_id="x").hold_wait_fraction,
                   metavar="F", help="as a destination: idle for a source's freeze at most this fraction of this "
                                     "instance's latest step, else step on (default %(default)g)")
    g.add_argument("--secret-file", default=None,
                   help="file holding a shared secret for internal ZeroMQ sockets (needed off loopback)")


def _pd_ratio(text: str) -> tuple[int, int]:
    from policies.roles import parse_pd_ratio

    try:
        return parse_pd_ratio(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _roles(text: str):
    from policies.roles import parse_roles

    try:
        return parse_roles(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _migrations_at_once(args: argparse.Namespace) -> tuple[int, int]:
    """``--max-migrations-out/-in``, defaulting to 1, or ``PD_MIGRATIONS_AT_ONCE`` when the
    instances have roles (every request is then handed off once)."""
    return migrations_at_once(args.max_migrations_out, args.max_migrations_in, bool(args.pd or args.roles))


def cluster_config(args: argparse.Namespace, detached: bool = False) -> ClusterConfig:
    headroom = tuple(tuple(int(x) for x in item.split(":")) for item in args.headroom.split(",") if item)
    policy = PolicyConfig(dispatch=args.dispatch, pairing=args.pairing, migrate_out=args.migrate_out,
                          migrate_out_threshold=args.migrate_out_threshold,
                          migrate_in_threshold=args.migrate_in_threshold, headroom_blocks=headroom,
                          scale_out_threshold=args.scale_out_threshold, scale_in_threshold=args.scale_in_threshold,
                          min_instances=args.min_instances, max_instances=args.max_instances, rescue=args.rescue,
                          global_fairness=args.global_fairness, fair_dispatch=args.fair_dispatch,
                          migration_cooldown_s=args.migration_cooldown, blocked_heads_first=args.blocked_heads_first)
    out, into = _migrations_at_once(args)
    return ClusterConfig(
        num_instances=args.instances if args.instances is not None else len(args.roles or ()) or 2,
        engine=EngineSpec(kind=args.engine,
                          engine=EngineConfig(num_blocks=args.num_blocks,
                                              block_size=args.block_size or default_block_size(args.engine),
                                              max_batch_size=args.max_batch_size, batch_policy=args.batch_policy,
                                              length_estimator=args.length_estimator,
                                              jit_skip_slack=args.jit_skip_slack,
                                              num_host_blocks=args.host_blocks,
                                              conversation_host_blocks=args.conversation_blocks,
                                              preemption_mode=args.preemption_mode, fairness=args.fairness),
                          checkpoint=args.model, max_model_len=args.max_model_len, num_threads=args.threads),
        scheduler=SchedulerConfig(policy=policy, enable_migration=not args.no_migration, enable_scaling=args.scaling,
                                  pd_ratio=args.pd, roles=args.roles, max_migrations_out=out,
                                  max_migrations_in=into, heartbeat_timeout_s=args.heartbeat_timeout),
        llumlet=LlumletConfig(instance_id="template", transport=args.transport,
                              max_outgoing=out, max_incoming=into,
                              max_step_hold_s=args.max_step_hold_ms / 1e3, hold_wait_fraction=args.hold_wait_fraction,
                              decode_hold_s=args.decode_hold_ms / 1e3,
                              prefill_first_steps=args.prefill_first_steps,
                              migration=MigrationConfig(max_stages=args.migration_stages,
                                                        last_stage_max_blocks=args.last_stage_blocks,
                                                        mode=args.migration_mode,
                                                        commit_hold_s=args.commit_hold_ms / 1e3)),
        runtime=args.runtime, ray_address=args.ray_address, ray_namespace=args.namespace, detached=detached,
        model_name=args.model_name, host=args.host if hasattr(args, "host") else "127.0.0.1",
        secret=_read_secret(args.secret_file))


def _read_secret(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    with open(path) as f:
        secret = f.read().strip()
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return secret


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="server-wide time-to-first-token objective (with --slo-tpot-ms): /metrics reports the "
                        "share of finished requests meeting both (llumnix_latency_slo_attainment)")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="server-wide time-per-output-token objective")
    g = p.add_argument_group("objectives (the default of requests that name none)")
    g.add_argument("--default-ttft-ms", type=float, default=None, help="stream objective: time to first token")
    g.add_argument("--default-tbt-ms", type=float, default=None, help="stream objective: time between tokens")
    g.add_argument("--default-deadline-ms", type=float, default=None, help="whole-response deadline")


def default_objective(args: argparse.Namespace):
    """The server-wide default ``Objective`` from the flags (None: none); ``InvalidRequestError``
    (a ``ValueError``-like ``LlumnixError``) names a bad combination."""
    from llumnix_py.engines.types import Objective

    given = {k: getattr(args, f"default_{k}") for k in ("ttft_ms", "tbt_ms", "deadline_ms")
             if getattr(args, f"default_{k}", None) is not None}
    return Objective(**given) if given else None


def server_slo(args: argparse.Namespace):
    """The server-wide ``SLO`` of ``--slo-ttft-ms``/``--slo-tpot-ms`` (None without them);
    ``ValueError`` when only one is given or one is not positive."""
    from llumnix_py.slo import SLO

    ttft, tpot = getattr(args, "slo_ttft_ms", None), getattr(args, "slo_tpot_ms", None)
    if ttft is None and tpot is None:
        return None
    if ttft is None or tpot is None:
        raise ValueError("give both --slo-ttft-ms and --slo-tpot-ms (a request meets its SLO when it meets both)")
    return SLO.from_ms(ttft, tpot)


def _serve_api(cluster, args: argparse.Namespace, slo=None) -> int:
    from llumnix_py.server.app import create_app, serve

    try:
        cluster.advertise(f"http://{args.host}:{args.port}")
        serve(create_app(cluster, api_key=args.api_key, default_objective=default_objective(args), slo=slo),
              host=args.host, port=args.port)
    finally:
        cluster.stop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from llumnix_py.frontend.cluster import Cluster

    slo = server_slo(args)  # validated before anything starts
    return _serve_api(Cluster.start(cluster_config(args)), args, slo)


def cmd_scheduler(args: argparse.Namespace) -> int:
    from llumnix_py.runtime import ray_lifecycle, ray_runtime

    namespace = args.namespace
    if args.stop or args.status:
        address = args.ray_address or "auto"  # the Ray cluster already running here, as `ray status` finds it
        try:
            ray_runtime.init_ray(address, namespace, logging_level=logging.WARNING)
        except ConnectionError as exc:
            print(f"no Ray cluster at {address!r} ({exc}); pass --ray-address", file=sys.stderr)
            return 1
        try:
            if args.stop:
                report = ray_lifecycle.stop_daemon(namespace)
                if report.scheduler:
                    print(f"the scheduler daemon in namespace {namespace!r} stopped, with instances "
                          f"{list(report.instances)}")
                else:
                    print(f"no scheduler was running in namespace {namespace!r}; stopped the instances it left "
                          f"behind: {list(report.instances)}")
            else:
                print(format_status(namespace, ray_lifecycle.daemon_state(namespace)))
        except ray_lifecycle.NoSchedulerError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    cfg = cluster_config(args, detached=True)
    ray_runtime.init_ray(cfg.ray_address, cfg.ray_namespace, logging_level=logging.WARNING)
    try:
        _, ids = ray_lifecycle.start_daemon(cfg)
    except ray_lifecycle.SchedulerRunningError as exc:
        print(f"{exc}; use 'llumnix-py scheduler --stop' first", file=sys.stderr)
        return 1
    print(f"scheduler daemon running in namespace {namespace!r} with instances {ids}; "
          f"frontends attach with 'llumnix-py frontend'. While this runs, a dead daemon is restarted; Ctrl-C "
          f"stops watching (the daemon keeps running; 'llumnix-py scheduler --stop' ends it).", flush=True)
    from llumnix_py.runtime.watchdog import SchedulerWatchdog

    watchdog = SchedulerWatchdog.for_ray(cfg)  # restarts the daemon if it dies, while this process runs
    watchdog.start()
    try:
        return _watch_daemon(namespace)
    finally:
        watchdog.stop()


def _watch_daemon(namespace: str, interval_s: float = 1.0) -> int:
    """Wait for Ctrl-C or SIGTERM, or for the daemon to be stopped on purpose (``--stop`` from
    elsewhere); a daemon that died is the watchdog's to restart, so watching goes on."""
    from llumnix_py.runtime import ray_lifecycle

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(interval_s):
        if ray_lifecycle.stopped_on_purpose(namespace) and ray_lifecycle.live_scheduler(namespace) is None:
            print(f"the scheduler daemon in namespace {namespace!r} has stopped", flush=True)
            break
    return 0


def format_status(namespace: str, state: dict) -> str:
    """``llumnix-py scheduler --status``: the instances with their loads, the attached frontends."""
    instances, frontends = state["instances"], state.get("frontends", [])
    lines = [f"scheduler daemon in namespace {namespace!r}: {len(instances)} instance(s), "
             f"{len(frontends)} frontend(s), {state['dispatched']} request(s) dispatched"]
    rows = [("instance", "role", "blocks used/total", "running", "waiting", "freeness", "state")]
    rows += [(i["instance_id"], i.get("role", "both"), f"{i['used_blocks']}/{i['total_blocks']}", str(i["running"]),
              str(i["waiting"]), f"{i['freeness']:.1f}", "draining" if i["terminating"] else "serving")
             for i in instances]
    lines += _table(rows)
    if frontends:
        rows = [("frontend", "api", "host", "pid", "requests", "last heard")]
        rows += [(f["frontend_id"], f["api_url"] or "-", f["host"], str(f["pid"]), str(f["active_requests"]),
                  f"{f['last_heard_s']:.1f} s ago") for f in frontends]
        lines += [""] + _table(rows)
    else:
        lines.append("no frontend attached")
    if state["migrations"]:
        done = ", ".join(f"{k} {v}" for k, v in sorted(state["migrations"].items()))
        lines.append(f"migrations: {done}")
    return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def cmd_frontend(args: argparse.Namespace) -> int:
    from llumnix_py.frontend.cluster import Cluster

    slo = server_slo(args)
    return _serve_api(Cluster.attach(cluster_config(args)), args, slo)


def cmd_bench(args: argparse.Namespace) -> int:
    from llumnix_py.bench import BenchConfig, config_dict, print_summary, print_sweep, run_bench, run_sweep

    cfg = BenchConfig(url=args.url, model=args.model_name, num_requests=args.num_requests, rate=args.rate,
                      arrival=args.arrival, cv=args.cv, prompt_len=args.prompt_len, output_len=args.output_len,
                      api_key=args.api_key, seed=args.seed, ttft_ms=args.ttft_ms, tbt_ms=args.tbt_ms,
                      deadline_ms=args.deadline_ms, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)
    if args.rates:
        sweep = asyncio.run(run_sweep(cfg, [float(r) for r in args.rates.split(",") if r.strip()]))
        print_sweep(sweep)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": config_dict(cfg), "sweep": sweep}, f, indent=2)
        return 0 if all(s["failed"] == 0 for s in sweep["summaries"]) else 1
    result = asyncio.run(run_bench(cfg))
    summary = result.summary()
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config_dict(cfg), "summary": summary}, f, indent=2)
    return 0 if summary["failed"] == 0 else 1


def cmd_plan(args: argparse.Namespace) -> int:
    """The prefill:decode layout (and tensor-parallel degrees) with the best goodput per GPU,
    by simulation (``llumnix_py.planner``): prints the ranked table and the chosen layout."""
    import numpy as np

    from llumnix_py import planner
    from llumnix_py.bench import sample_lengths
    from llumnix_py.slo import SLO

    if args.slo_ttft_ms <= 0 or args.slo_tpot_ms <= 0:
        raise ValueError("--slo-ttft-ms and --slo-tpot-ms must be positive")
    if args.gpus < 2 or args.requests < 1 or args.iterations < 1:
        raise ValueError("--gpus must be >= 2 (one prefill and one decode instance), --requests and --iterations >= 1")
    degrees = planner.parse_counts(args.tp, "--tp")
    handoffs = planner.parse_counts(args.handoffs, "--handoffs")
    check_prefill_first_steps(args.prefill_first_steps)
    rng = np.random.default_rng(args.seed)
    prompts = sample_lengths(args.prompt_len, args.requests, rng)
    outputs = sample_lengths(args.output_len, args.requests, rng)
    gaps = rng.exponential(1.0, args.requests)  # a Poisson process at rate 1, scaled per rate

    def workload(rate: float) -> list[planner.PlannedRequest]:
        times = np.cumsum(gaps) / rate
        return [planner.PlannedRequest(float(t), int(p), int(o)) for t, p, o in zip(times, prompts, outputs)]

    slo = SLO.from_ms(args.slo_ttft_ms, args.slo_tpot_ms)
    rows = planner.plan(workload, slo, args.gpus, args.profile, seed=args.seed, exact=args.exact,
                        iterations=args.iterations, max_per_gpu=args.max_rate_per_gpu, degrees=degrees,
                        progress="layouts" if args.progress else None, handoffs=handoffs,
                        prefill_first=args.prefill_first_steps)
    planner.print_plan(f"P:D layouts, prompts {args.prompt_len}, outputs {args.output_len}, TTFT {args.slo_ttft_ms:g} ms, "
                       f"TPOT {args.slo_tpot_ms:g} ms, {args.gpus} GPUs of {args.profile}, best goodput per GPU first",
                       rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "fn"}, "ranked": rows,
                       "chosen": planner.chosen_layout(rows[0])}, f, indent=2)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from llumnix_py.demo import run_demo

    return run_demo(instances=args.instances, requests=args.requests, runtime=args.runtime)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llumnix-py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="scheduler + instances + OpenAI API server, all in one")
    _add_cluster_flags(p)
    _add_server_flags(p)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("scheduler", help="start the global scheduler daemon and its instances on Ray")
    _add_cluster_flags(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stop", action="store_true", help="stop the running daemon and its instances")
    g.add_argument("--status", action="store_true", help="print the instances, their loads and the frontends")
    p.set_defaults(fn=cmd_scheduler)
    p = sub.add_parser("frontend", help="an OpenAI API server attached to a running daemon")
    _add_cluster_flags(p)
    _add_server_flags(p)
    p.set_defaults(fn=cmd_frontend)
    p = sub.add_parser("bench", help="load generator for an OpenAI-compatible endpoint")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model-name", default="llumnix-tiny")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--prompt-len", default="128", help="N or zipf:MEAN")
    p.add_argument("--output-len", default="64", help="N or zipf:MEAN")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT objective: report SLO attainment and scale")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT objective (with --slo-ttft-ms)")
    p.add_argument("--rates", default=None,
                   help="comma-separated rates to sweep (needs the SLOs): reports goodput, the highest rate at which "
                        ">= 90%% of requests meet both objectives, also per instance")
    p.add_argument("--json", default=None)
    p.add_argument("--ttft-ms", type=float, default=None, help="objective of every request: time to first token")
    p.add_argument("--tbt-ms", type=float, default=None, help="objective: time between tokens (with --ttft-ms)")
    p.add_argument("--deadline-ms", type=float, default=None, help="objective: the whole response's deadline")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("plan", help="the prefill:decode layout with the best goodput per GPU, by simulation")
    p.add_argument("--prompt-len", default="zipf:306", help="prompt lengths: zipf:MEAN or N (default zipf:306)")
    p.add_argument("--output-len", default="zipf:500", help="output lengths: zipf:MEAN or N (default zipf:500)")
    p.add_argument("--slo-ttft-ms", type=float, default=200.0, help="time-to-first-token objective (default 200)")
    p.add_argument("--slo-tpot-ms", type=float, default=100.0, help="time-per-output-token objective (default 100)")
    p.add_argument("--gpus", type=int, default=4, help="GPU budget")
    p.add_argument("--exact", action="store_true", help="only layouts that use every GPU")
    p.add_argument("--profile", default="opt-13b-a100",
                   help="cost profile of one instance at degree 1 (opt-13b-a100: one A100; opt-66b-2xa100: two)")
    p.add_argument("--tp", default="1", help="tensor-parallel degrees to search per phase, e.g. 1,2 (default 1)")
    p.add_argument("--handoffs", default="1",
                   help="hand-offs in flight at once per instance to search, e.g. 1,4,8 (default 1; serve it with "
                        "--max-migrations-out/-in)")
    p.add_argument("--prefill-first-steps", type=int, default=PREFILL_FIRST_STEPS, metavar="N",
                   help="prefill instances prefill waiting prompts alone for up to N steps in a row (as "
                        "serve's flag; default %(default)s)")
    p.add_argument("--requests", type=int, default=300, help="requests per simulated run")
    p.add_argument("--iterations", type=int, default=7, help="bisection steps of each goodput")
    p.add_argument("--max-rate-per-gpu", type=float, default=16.0, help="top of the goodput bisection, req/s per GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("demo", help="a local cluster of built-in engines serving a burst, with live migrations")
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--runtime", choices=["ray", "local"], default="ray")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if hasattr(args, "default_ttft_ms"):  # a server: check its default objective before starting anything
        try:
            default_objective(args)
        except InvalidRequestError as exc:
            parser.error(f"default objective: {exc}")
    try:
        return args.fn(args)
    except UnknownNameError as exc:  # a policy, engine or transport flag names nothing registered
        parser.error(str(exc))
    except ValueError as exc:  # flags that build an invalid config (e.g. --pd 1:3 with --instances 2)
        if args.command not in ("serve", "scheduler", "frontend", "bench", "plan"):
            raise
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
