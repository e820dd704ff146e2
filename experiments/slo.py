"""SLO-aware scheduling (issue 16, after JITServe): service goodput against request rate.

Workloads like JITServe's, on 16 simulated LLaMA-7B/A10 instances:

* ``chat``: streams with a TTFT and a TBT objective (ShareGPT-like lengths);
* ``deadline``: deep-research-like calls, the whole response by a deadline (BurstGPT-like lengths);
* ``agentic``: compound jobs of 2-4 calls with one job deadline (BurstGPT-like lengths). The
  simulator replays calls open loop: call i of a job arrives ``AGENT_GAP_S`` after call i-1
  whatever happened to it (dependencies between calls are *not* simulated), carrying the job's
  time left and its calls left;
* ``mixture``: each request drawn from the three (50% chat, 30% deadline, 20% agentic calls);
* ``agentic-loop``: compound jobs in a closed loop (``experiments/jobs_loop.py``): a job's next
  call is submitted when its previous call has finished (plus a tool time), its prompt the
  previous prompt and output plus the tool's result; jobs start at the rate.

The objectives are ours, fixed before any run (the JITServe text we could read gives no numbers):
chat TTFT 2 s and TBT 100 ms; deadlines uniform in 20-60 s; a job's deadline 20 s per call.

Systems: ``fcfs+rr`` (vLLM-like: round-robin dispatch, FCFS, no migration), ``llumnix``
(today: freeness dispatch, load-balancing migration, FCFS), ``edf`` (earliest due time first in
each engine, Llumnix dispatch and migration), ``jit`` (``policies.jit`` batching with the
quantile length estimator, ``slo`` dispatch, rescue migration, then Llumnix balancing),
``jit+oracle`` (the same with the true lengths), ``jit-no-rescue`` (the ablation), ``jit+skip``
(``jit`` with slack requests sitting out steps for urgent ones, ``JitParams.skip_slack``; not in
the default sweep: ``--systems jit,jit+skip``), ``jit+rr`` and ``jit+rr-no-rescue`` (``jit`` and
its ablation behind round-robin dispatch; not in the default sweep); and for compound
jobs ``jit+kv`` (``jit`` with each instance keeping finished calls' KV in a host pool of
``KV_BLOCKS`` blocks, so a later call reuses it when it happens to land there) and ``jit+jobs``
(the same with ``jobs`` dispatch, ``policies/jobs.py``: a job's later call goes to the instance
keeping its KV while that keeps the job's deadline).

Job placement (JSON key ``job_placement``: ``{rate: {system: {...}}}``): ``agentic-loop`` with
``jit``, ``jit+kv`` and ``jit+jobs`` side by side on the same jobs and seed: per-call goodput and
attainment, job attainment, prefill tokens saved by reused KV, later calls placed on their
job's KV.

Goodput: output tokens of requests that met their objective per second of the arrival span
(so every system divides by the same time); attainment: share of requests that met theirs.
Offered: output tokens of all requests per second of the same span (the goodput of a run in which
every request met its objective).
JSON: ``{workload: {system: {rate: {"goodput": ..., "attainment": ..., "offered": ..., "by_kind":
{...}}}}}`` plus ``rate_at_90`` per workload and system, and ``target`` per workload: the issue's
target comparison (JIT over the best baseline at the rate where that baseline first falls below 90%
attainment, and the bound on any scheduler's ratio there; ``experiments/slo_target.py`` states the
reading). ``--sweep-only`` runs the rate sweep alone.

Resources: for one workload at one fixed rate (``--search-rate``), the smallest number of
simulated instances at which each system keeps attainment >= 90%, found by bisection over
``1..--search-max`` (attainment is assumed not to fall when instances are added; every count the
search ran is kept in the JSON). JSON key ``instances_for_90``: ``{workload: {"rate": ...,
"requests": ..., "max": ..., "systems": {system: {"instances": n or None, "tried": {count:
{"attainment", "goodput"}}}}, "jit_saving": {baseline: 1 - n_jit / n_baseline or None}}}``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # noqa: E402
from experiments.jobs_loop import JobCluster, JobWorkload, job_results, make_job_workload  # noqa: E402
from experiments.slo_target import target_rows, target_summary  # noqa: E402
from experiments.workloads import WorkloadRequest, burstgpt_like, poisson_arrivals, sharegpt_like  # noqa: E402
from llumnix_py.engines.types import Objective  # noqa: E402
from llumnix_py.sim.cluster import SimCluster  # noqa: E402
from llumnix_py.sim.config import SimConfig  # noqa: E402
from policies.config import PolicyConfig  # noqa: E402

CHAT = Objective(ttft_ms=2000.0, tbt_ms=100.0)
DEADLINE_S = (20.0, 60.0)
AGENT_CALLS = (2, 4)
AGENT_GAP_S = 3.0
AGENT_DEADLINE_PER_CALL_S = 20.0
MIX = {"chat": 0.5, "deadline": 0.3, "agentic": 0.2}
WORKLOADS = ("chat", "deadline", "agentic", "mixture", "agentic-loop")
KV_BLOCKS = 2048  # host blocks per instance keeping finished calls' KV (jit+kv, jit+jobs): 16 GiB of LLaMA-7B KV

SYSTEMS = {
    "fcfs+rr": dict(policy=dict(dispatch="round_robin"), migrate=False, batch="fcfs"),
    "llumnix": dict(policy=dict(dispatch="freeness"), migrate=True, batch="fcfs"),
    "edf": dict(policy=dict(dispatch="freeness"), migrate=True, batch="edf"),
    "jit": dict(policy=dict(dispatch="slo", rescue=True), migrate=True, batch="jit"),
    "jit+oracle": dict(policy=dict(dispatch="slo", rescue=True), migrate=True, batch="jit", estimator="oracle"),
    "jit-no-rescue": dict(policy=dict(dispatch="slo"), migrate=True, batch="jit"),
    # Rescue behind a dispatcher blind to load and objectives (round-robin, as an external load
    # balancer in front of the instances would be), and its ablation: what rescue adds where
    # dispatch leaves some instances slower than others.
    "jit+rr": dict(policy=dict(dispatch="round_robin", rescue=True), migrate=True, batch="jit"),
    "jit+rr-no-rescue": dict(policy=dict(dispatch="round_robin"), migrate=True, batch="jit"),
    "jit+skip": dict(policy=dict(dispatch="slo", rescue=True), migrate=True, batch="jit", skip=True),
    "jit+kv": dict(policy=dict(dispatch="slo", rescue=True), migrate=True, batch="jit", kv=True),
    "jit+jobs": dict(policy=dict(dispatch="jobs", rescue=True), migrate=True, batch="jit", kv=True),
}
BASELINES = ("fcfs+rr", "llumnix", "edf")
MAIN_SYSTEMS = ("fcfs+rr", "llumnix", "edf", "jit", "jit+oracle", "jit-no-rescue")  # the default sweep
JOB_SYSTEMS = ("jit", "jit+kv", "jit+jobs")
QUICK_SEARCH = (2.0, 80, 4)
JOB_RATES = (2.0, 4.0, 6.0)  # job starts per second of the full job-placement comparison (16 instances)  # (rate, requests, most instances) of --quick's instance search


def _lengths(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return sharegpt_like(n, rng) if kind == "chat" else burstgpt_like(n, rng)


def make_slo_workload(kind: str, n: int, rate: float, seed: int) -> Union[list[WorkloadRequest], JobWorkload]:
    """``n`` requests (calls) of workload ``kind`` arriving at ``rate`` per second (Poisson);
    ``agentic-loop``: jobs starting at ``rate`` per second, at least ``n`` calls in all."""
    if kind == "agentic-loop":
        return make_job_workload(n, rate, seed)
    rng = np.random.default_rng(seed)
    starts = poisson_arrivals(n, rate, rng)
    kinds = [kind] * n if kind != "mixture" else list(rng.choice(list(MIX), size=n, p=list(MIX.values())))
    out: list[WorkloadRequest] = []
    i = 0
    while len(out) < n:
        k, t = kinds[i], float(starts[i])
        i += 1
        if k == "agentic":
            calls = int(rng.integers(AGENT_CALLS[0], AGENT_CALLS[1] + 1))
            deadline = AGENT_DEADLINE_PER_CALL_S * calls
            p, o = _lengths(k, calls, rng)
            job = f"job-{i}"
            for c in range(calls):
                if len(out) >= n:
                    break
                at = t + c * AGENT_GAP_S
                obj = Objective(job_id=job, job_deadline_ms=(deadline - c * AGENT_GAP_S) * 1e3,
                                job_calls_left=calls - c)
                out.append(WorkloadRequest(at, int(p[c]), int(o[c]), objective=obj))
            continue
        p, o = _lengths(k, 1, rng)
        obj = CHAT if k == "chat" else Objective(deadline_ms=float(rng.uniform(*DEADLINE_S)) * 1e3)
        out.append(WorkloadRequest(t, int(p[0]), int(o[0]), objective=obj))
    out.sort(key=lambda w: w.arrival_time)
    return out


def simulate(workload: Union[Sequence[WorkloadRequest], JobWorkload], system: str, instances: int, seed: int,
             progress: bool) -> dict:
    spec = SYSTEMS[system]
    cfg = SimConfig(num_instances=instances, policy=PolicyConfig(**spec["policy"]), enable_migration=spec["migrate"],
                    seed=seed, batch_policy=spec["batch"], length_estimator=spec.get("estimator", "quantile"),
                    conversation_blocks=KV_BLOCKS if spec.get("kv") else 0, jit_skip_slack=spec.get("skip", False))
    jobs: Optional[JobCluster] = None
    if isinstance(workload, JobWorkload):  # closed loop: later calls arrive when released
        cluster = jobs = JobCluster(cfg, workload)
        res = cluster.run(jobs.requests(), progress=progress)
        span = workload.span_s  # the jobs' starts: the same for every system
    else:
        cluster = SimCluster(cfg)
        res = cluster.run(workload, progress=progress)
        span = max(w.arrival_time for w in workload) - min(w.arrival_time for w in workload)
    recs = list(cluster.records.values())
    by_kind: dict[str, dict] = {}
    met_tokens = 0
    met = 0
    for r in recs:
        m = r.slo_margin
        ok = m is not None and m >= 0
        k = by_kind.setdefault(r.objective.kind, {"n": 0, "met": 0})
        k["n"] += 1
        k["met"] += int(ok)
        if ok:
            met += 1
            met_tokens += r.output_len
    for k in by_kind.values():
        k["attainment"] = k["met"] / k["n"]
    out = {"goodput": met_tokens / max(span, 1e-9), "attainment": met / len(recs), "by_kind": by_kind,
           "offered": sum(r.output_len for r in recs) / max(span, 1e-9),
           "migrations": len(res.migrations) if hasattr(res, "migrations") else None,
           "rescues": cluster.scheduler.num_rescues}
    if jobs is not None:
        out.update(job_results(jobs))
    for e in cluster.engines().values():
        e.close()
    return out


def rate_at_90(by_rate: dict[str, dict]) -> Optional[float]:
    """The highest rate of the sweep at which attainment is still >= 90% (None: none)."""
    ok = [float(r) for r, v in by_rate.items() if v["attainment"] >= 0.9]
    return max(ok) if ok else None


def smallest_instances(meets: Callable[[int], bool], lo: int, hi: int) -> Optional[int]:
    """The smallest count in ``lo..hi`` for which ``meets(count)``, by bisection (None: not even ``hi``).

    Assumes ``meets`` is monotone (more instances never hurt). When the answer ``n > lo``, the
    search has run ``n - 1`` and seen it fail.
    """
    if lo < 1 or hi < lo:
        raise ValueError(f"bad instance range {lo}..{hi}")
    if not meets(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def instances_for_90(workload: Sequence[WorkloadRequest], system: str, max_instances: int, seed: int) -> dict:
    """The fewest simulated instances (``1..max_instances``) at which ``system`` keeps 90% attainment."""
    tried: dict[int, dict] = {}

    def meets(count: int) -> bool:
        v = simulate(workload, system, count, seed, False)
        tried[count] = {"attainment": v["attainment"], "goodput": v["goodput"]}
        return v["attainment"] >= 0.9

    n = smallest_instances(meets, 1, max_instances)
    return {"instances": n, "tried": {str(c): tried[c] for c in sorted(tried)}}


def jit_saving(by_sys: dict[str, dict]) -> dict[str, Optional[float]]:
    """Per baseline, the share of its instances JIT does without (None: a count is unknown)."""
    jit = by_sys.get("jit", {}).get("instances")
    out: dict[str, Optional[float]] = {}
    for b in BASELINES:
        nb = by_sys.get(b, {}).get("instances")
        out[b] = 1 - jit / nb if jit is not None and nb is not None else None
    return out


def _extra(ap) -> None:
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--rates", default=None, help="comma-separated request rates (req/s)")
    ap.add_argument("--workloads", default=None, help=f"comma-separated, of {','.join(WORKLOADS)}")
    ap.add_argument("--systems", default=None, help=f"comma-separated, of {','.join(SYSTEMS)}")
    ap.add_argument("--search-rate", type=float, default=None, help="rate of the instance search (req/s)")
    ap.add_argument("--search-max", type=int, default=None, help="most instances the search tries")
    ap.add_argument("--search-requests", type=int, default=None, help="requests of the instance search")
    ap.add_argument("--job-rates", default=None, help="comma-separated job start rates (jobs/s) of the "
                                                      "job-placement comparison")
    ap.add_argument("--job-calls", type=int, default=None, help="calls (at least) of the job-placement comparison")
    ap.add_argument("--job-instances", type=int, default=None, help="instances of the job-placement comparison")
    ap.add_argument("--jobs-only", action="store_true", help="run only the job-placement comparison")
    ap.add_argument("--sweep-only", action="store_true", help="only the rate sweep (no search, no job placement)")


def run(args) -> dict:
    # (search rate, search requests, most instances) of the resource search
    # (rates, calls, instances) of the job-placement comparison
    if args.smoke:
        workloads, rates, n, inst = ("mixture",), (2.0,), 60, 2
        search = (2.0, 40, 3)
        placement = (1.0,), 30, 2
    elif args.quick:
        workloads, rates, n, inst = ("mixture",), (4.0, 7.0), 160, 4  # 4 instances: loaded
        search = QUICK_SEARCH
        placement = (1.0,), 60, 2
    else:
        workloads, rates, n, inst = WORKLOADS, (8.0, 14.0, 20.0, 26.0, 32.0), 1000, args.instances
        search = (20.0, 600, 32)
        placement = JOB_RATES, 600, args.instances
    search = (args.search_rate or search[0], args.search_requests or search[1], args.search_max or search[2])
    if args.workloads:
        workloads = tuple(args.workloads.split(","))
    if args.rates:
        rates = tuple(float(r) for r in args.rates.split(","))
    systems = tuple(args.systems.split(",")) if args.systems else MAIN_SYSTEMS
    placement = (tuple(float(r) for r in args.job_rates.split(",")) if args.job_rates else placement[0],
                 args.job_calls or placement[1], args.job_instances or placement[2])
    if args.jobs_only:
        workloads = ()
    if args.sweep_only:
        placement = (), placement[1], placement[2]
    n = args.requests or n
    out: dict = {"results": {}, "rate_at_90": {}, "target": {}, "instances_for_90": {},
                 "config": {"instances": inst, "requests": n, "rates": list(rates)}}
    from tqdm import tqdm

    jobs = [(w, s, r) for w in workloads for r in rates for s in systems]
    for w, s, r in tqdm(jobs, disable=not args.progress, unit="run"):
        wl = make_slo_workload(w, n, r, args.seed)
        out["results"].setdefault(w, {}).setdefault(s, {})[str(r)] = simulate(wl, s, inst, args.seed, False)
    for w, by_sys in out["results"].items():
        out["rate_at_90"][w] = {s: rate_at_90(v) for s, v in by_sys.items()}
        if any(b in by_sys for b in BASELINES):
            out["target"][w] = target_summary(by_sys, BASELINES)
    rate, sn, hi = search
    searched = () if args.sweep_only else workloads
    for w in tqdm(searched, disable=not args.progress, unit="workload", desc="instance search"):
        wl = make_slo_workload(w, sn, rate, args.seed)
        by_sys = {s: instances_for_90(wl, s, hi, args.seed) for s in systems}
        out["instances_for_90"][w] = {"rate": rate, "requests": sn, "max": hi, "systems": by_sys,
                                      "jit_saving": jit_saving(by_sys)}
    job_rates, job_calls, job_inst = placement
    out["job_placement"] = {"instances": job_inst, "calls": job_calls, "rates": {}}
    runs = [(r, s) for r in job_rates for s in JOB_SYSTEMS]
    for r, s in tqdm(runs, disable=not args.progress, unit="run", desc="job placement"):
        wl = make_slo_workload("agentic-loop", job_calls, r, args.seed)
        out["job_placement"]["rates"].setdefault(str(r), {})[s] = simulate(wl, s, job_inst, args.seed, False)
    return out


def _resource_rows(found: dict) -> tuple[list[str], list[list]]:
    headers = ["workload", "rate", "requests", "system", "instances", "attainment there", "goodput there",
               "JIT saves"]
    rows = []
    for w, f in found.items():
        for s, v in f["systems"].items():
            n = v["instances"]
            there = v["tried"][str(n)] if n is not None else {}
            saves = f["jit_saving"].get(s) if s in BASELINES else None
            rows.append([w, f["rate"], f["requests"], s, n if n is not None else f"> {f['max']}",
                         there.get("attainment", ""), there.get("goodput", ""),
                         f"{100 * saves:.0f}%" if saves is not None else ""])
    return headers, rows


def _job_rows(placement: dict) -> tuple[list[str], list[list]]:
    headers = ["jobs/s", "system", "jobs", "job attainment", "call attainment", "goodput (tok/s)",
               "prefill saved", "later calls on their KV", "x jit goodput"]
    rows = []
    for r, by_sys in placement["rates"].items():
        base = by_sys.get("jit", {}).get("goodput", 0.0)
        for s, v in by_sys.items():
            rows.append([float(r), s, v["jobs"], v["job_attainment"], v["attainment"], v["goodput"],
                         f"{100 * v['prefill_saved_share']:.1f}% ({v['prefill_saved_tokens']})",
                         f"{v['later_calls_home']}/{v['later_calls']}",
                         v["goodput"] / base if base else float("nan")])
    return headers, rows


def _plot_jobs(placement: dict, path: Path) -> None:
    """Job attainment, goodput and prefill saved against the job start rate, per system."""
    fig, axes = common.subplots(1, 3)
    rates = sorted(placement["rates"], key=float)
    for s in JOB_SYSTEMS:
        xs = [float(r) for r in rates if s in placement["rates"][r]]
        vs = [placement["rates"][r][s] for r in rates if s in placement["rates"][r]]
        for ax, key in zip(axes[0], ("job_attainment", "goodput", "prefill_saved_share")):
            ax.plot(xs, [v[key] for v in vs], "-o", label=s)
            ax.set_ylabel(key.replace("_", " "))
            ax.set_xlabel("jobs/s")
    axes[0][0].set_title(f"agentic-loop, {placement['instances']} instances")
    axes[0][0].legend(fontsize=6)
    common.save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = common.parse_args("slo", __doc__.splitlines()[0], argv, _extra)
    data = run(args)
    res = data["results"]
    headers = ["workload", "rate", "system", "goodput (tok/s)", "attainment", "stream", "deadline", "job",
               "rescues", "x best baseline"]
    rows = []
    for w, by_sys in res.items():
        rates = sorted({r for v in by_sys.values() for r in v}, key=float)
        for r in rates:
            base = max((by_sys[b][r]["goodput"] for b in BASELINES if b in by_sys), default=0.0)
            for s, by_rate in by_sys.items():
                v = by_rate[r]
                att = {k: v["by_kind"].get(k, {}).get("attainment", "") for k in ("stream", "deadline", "job")}
                rows.append([w, float(r), s, v["goodput"], v["attainment"], att["stream"], att["deadline"],
                             att["job"], v["rescues"], v["goodput"] / base if base else float("nan")])
    r90 = [[w, s, v if v is not None else "below sweep"] for w, by in data["rate_at_90"].items()
           for s, v in by.items()]
    th, trows = target_rows(data["target"])
    rh, rrows = _resource_rows(data["instances_for_90"])
    jh, jrows = _job_rows(data["job_placement"])
    tables = [("SLO goodput (16 simulated LLaMA-7B/A10 instances unless --instances)", headers, rows),
              ("Highest swept rate with attainment >= 90%", ["workload", "system", "rate"], r90),
              ("Target: JIT over the best baseline where it first falls below 90% (best: the baseline "
               "keeping 90% to the highest rate; bound: offered tokens/s over its goodput)", th, trows),
              ("Fewest instances with attainment >= 90% at a fixed rate", rh, rrows),
              (f"Job placement: agentic-loop on {data['job_placement']['instances']} instances", jh, jrows)]
    tables = [t for t in tables if t[2]]  # --jobs-only runs the last one alone
    for title, h, r in tables:
        common.print_table(title, h, r)
    common.write_markdown(args.out / "slo.md", "SLO-aware scheduling (issue 16)", tables,
                          notes=f"{data['config']}, seed {args.seed}. Command: python experiments/slo.py "
                                f"{'--quick' if args.quick else ''}")
    if data["job_placement"]["rates"]:
        _plot_jobs(data["job_placement"], args.out / "slo_jobs.png")
    if not res:  # --jobs-only
        common.write_json(args.json, data)
        return data
    fig, axes = common.subplots(2, len(res))
    for j, (w, by_sys) in enumerate(res.items()):
        for s, by_rate in by_sys.items():
            rates = sorted(by_rate, key=float)
            axes[0][j].plot([float(r) for r in rates], [by_rate[r]["goodput"] for r in rates], "-o", label=s)
            axes[1][j].plot([float(r) for r in rates], [by_rate[r]["attainment"] for r in rates], "-o", label=s)
        axes[0][j].set_title(w)
        axes[0][j].set_ylabel("goodput (tokens/s)")
        axes[1][j].set_ylabel("attainment")
        axes[1][j].axhline(0.9, color="grey", lw=0.5)
        axes[1][j].set_xlabel("rate (req/s)")
    axes[0][0].legend(fontsize=6)
    common.save_figure(fig, args.out / "slo.png")
    common.write_json(args.json, data)
    return data


if __name__ == "__main__":
    main()
