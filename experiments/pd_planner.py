"""Placement planner for prefill/decode disaggregation (DistServe's placement, by simulation).

Given an application (prompt and output length distributions, TTFT and TPOT objectives),
a cost profile and a GPU budget, it searches the prefill:decode splits ``P:D`` and, with
``--tp`` (profiles with an all-reduce link only: ``opt-13b-a100``), the tensor-parallel
degree of each phase's instances, with ``P * tp_prefill + D * tp_decode <= budget`` GPUs,
and for each layout the goodput: the highest request rate at which at least 90% of
requests meet both objectives (``llumnix_py.slo.max_rate``, a bisection over simulated
runs of the real scheduler, llumlet core and migration code). It ranks the layouts by
goodput per GPU and prints the table and the chosen layout. A tensor-parallel instance
is the profile re-sized by ``profiles.with_tensor_parallel`` (FLOP/s, memory bandwidth
and memory times the degree, plus two ring all-reduces a layer over NVLink; see there).

The applications are DistServe's (OSDI 2024) three: chatbot (ShareGPT), code completion
(HumanEval) and summarization (LongBench), with the SLOs its artifact uses for them
(LLMServe/DistServe, ``simdistserve/benchmarks/figure11-abalation/01-run_abalation.sh``,
which cites the paper's Table 1: prefill/decode targets in ms, chatbot on OPT-13B 200/100,
code completion on OPT-66B 125/200, summarization on OPT-66B 1500/150). Their length
distributions are NOT from DistServe: chatbot uses the ShareGPT statistics the Llumnix
paper publishes (Table 1: mean/P99 input 306/3388, output 500/1234); code completion
and summarization use log-normal lengths assumed here (stated in ``APPLICATIONS``).

    python experiments/pd_planner.py --app chatbot --gpus 4
    python experiments/pd_planner.py --app chatbot --gpus 4 --tp 1,2
    python experiments/pd_planner.py --quick --json plan.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence, Union

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments.workloads import SHAREGPT_STATS, WorkloadRequest, fit_lognormal, poisson_arrivals  # noqa: E402
from llumnix_py.engines.sim.cost_model import CostProfile  # noqa: E402
from llumnix_py.sim import SimCluster, SimConfig, SimResult  # noqa: E402
from llumnix_py.slo import SLO, max_rate  # noqa: E402
from policies.config import PolicyConfig  # noqa: E402
from policies.roles import RoleFlipConfig  # noqa: E402


@dataclass(frozen=True)
class Application:
    """A workload class and its objectives.

    Attributes:
        name: short name.
        slo: TTFT and TPOT objectives.
        prompt: (mean, P99) prompt tokens (log-normal fitted to them, capped at ``cap``).
        output: (mean, P99) output tokens.
        cap: longest prompt or output.
        source: where the SLOs and lengths come from.
    """

    name: str
    slo: SLO
    prompt: tuple[float, float]
    output: tuple[float, float]
    cap: int = 4096
    source: str = ""


_DISTSERVE_SLO = "SLOs: DistServe artifact (01-run_abalation.sh, paper Table 1)"
APPLICATIONS: dict[str, Application] = {
    "chatbot": Application("chatbot", SLO.from_ms(200, 100), SHAREGPT_STATS["input"], SHAREGPT_STATS["output"],
                           source=f"{_DISTSERVE_SLO}, OPT-13B; lengths: ShareGPT as in Llumnix Table 1"),
    "code": Application("code", SLO.from_ms(125, 200), (150.0, 450.0), (120.0, 400.0),
                        source=f"{_DISTSERVE_SLO}, OPT-66B; lengths: assumed here (short prompts, short outputs)"),
    "summarization": Application("summarization", SLO.from_ms(1500, 150), (1500.0, 3500.0), (100.0, 400.0),
                                 source=f"{_DISTSERVE_SLO}, OPT-66B; lengths: assumed here (long prompts)"),
}


def _lognormal(n: int, mean: float, p99: float, cap: int, rng: np.random.Generator) -> np.ndarray:
    mu, sigma = fit_lognormal(mean, p99, cap)
    return np.clip(np.round(rng.lognormal(mu, sigma, n)), 1, cap).astype(int)


def make_requests(app: Application, n: int, rate: float, seed: int = 0) -> list[WorkloadRequest]:
    """``n`` requests of ``app`` arriving as a Poisson process at ``rate`` (same lengths for
    every rate of one seed)."""
    length_rng, arrival_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    prompts = _lognormal(n, *app.prompt, app.cap, length_rng)
    outputs = _lognormal(n, *app.output, app.cap, length_rng)
    arrivals = poisson_arrivals(n, rate, arrival_rng)
    return [WorkloadRequest(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs)]


@dataclass(frozen=True)
class Layout:
    """How the GPUs serve: ``pd`` = (P, D) disaggregated, or None colocated with
    ``dispatch`` (``round_robin``: vLLM-like, no migration; ``freeness``: llumnix-py)."""

    instances: int
    pd: Optional[tuple[int, int]] = None
    dispatch: str = "freeness"
    migration: bool = True
    tp: tuple[int, int] = (1, 1)  # tensor-parallel degree of the prefill (and colocated) / decode instances
    flip: bool = False  # roles flip at run time (``policies.roles.plan_role_flip``, default thresholds)

    @property
    def name(self) -> str:
        if self.pd is not None:
            tp = f" TP {self.tp[0]}/{self.tp[1]}" if self.tp != (1, 1) else ""
            flip = " with role flips" if self.flip else ""
            return f"disaggregated {self.pd[0]}:{self.pd[1]}{tp}{flip}"
        return "colocated round-robin" if self.dispatch == "round_robin" else "colocated llumnix"

    @property
    def gpus(self) -> int:
        if self.pd is None:
            return self.instances * self.tp[0]
        return self.pd[0] * self.tp[0] + self.pd[1] * self.tp[1]

    def sim_config(self, profile: Union[str, CostProfile], seed: int) -> SimConfig:
        return SimConfig(num_instances=self.instances, profile=profile, policy=PolicyConfig(dispatch=self.dispatch),
                         enable_migration=self.migration, pd_ratio=self.pd, seed=seed, tp_prefill=self.tp[0],
                         tp_decode=self.tp[1], role_flip=RoleFlipConfig() if self.flip else None)


def run(app: Application, layout: Layout, rate: float, n: int, profile: Union[str, CostProfile],
        seed: int = 0) -> SimResult:
    return SimCluster(layout.sim_config(profile, seed)).run(make_requests(app, n, rate, seed), progress=False)


def goodput(app: Application, layout: Layout, n: int, profile: Union[str, CostProfile], *, seed: int = 0,
            max_per_gpu: float = 16.0, iterations: int = 7, slo: Optional[SLO] = None) -> float:
    """The layout's goodput (req/s, whole layout) for ``app``'s objectives (or ``slo``)."""
    objective = slo or app.slo

    def attained(rate: float) -> float:
        return run(app, layout, rate, n, profile, seed).slo_attainment(objective)

    hi = max_per_gpu * layout.instances
    return max_rate(attained, hi / 2 ** iterations, hi, iterations=iterations)


def layouts(gpus: int, degrees: Sequence[int] = (1,), *, exact: bool = False) -> list[Layout]:
    """Every disaggregated layout: ``(P, D)`` and a degree from ``degrees`` per phase, with
    ``P * tp_prefill + D * tp_decode <= gpus`` GPUs (``== gpus`` when ``exact``)."""
    out = []
    for tp_p in degrees:
        for tp_d in degrees:
            for p in range(1, gpus // tp_p + 1):
                for d in range(1, (gpus - p * tp_p) // tp_d + 1):
                    used = p * tp_p + d * tp_d
                    if not exact or used == gpus:
                        out.append(Layout(p + d, (p, d), tp=(tp_p, tp_d)))
    return sorted(out, key=lambda lay: (lay.gpus, lay.tp, lay.pd))


def plan(app: Application, gpus: int, n: int, profile: Union[str, CostProfile], *, seed: int = 0,
         exact: bool = False, iterations: int = 7, max_per_gpu: float = 16.0, progress: bool = False,
         degrees: Sequence[int] = (1,)) -> list[dict[str, Any]]:
    """Every layout's goodput and goodput per GPU, best first (ties: fewer GPUs, then more
    prefill, then lower degrees). ``degrees``: the tensor-parallel degrees to try per phase."""
    rows = []
    candidates = layouts(gpus, degrees, exact=exact)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(candidates), desc=f"plan {app.name}", unit="split", leave=False)
    for layout in candidates:
        (p, d), (tp_p, tp_d) = layout.pd, layout.tp
        g = goodput(app, layout, n, profile, seed=seed, iterations=iterations, max_per_gpu=max_per_gpu)
        rows.append({"prefill": p, "decode": d, "tp_prefill": tp_p, "tp_decode": tp_d, "gpus": layout.gpus,
                     "goodput_rps": g, "goodput_per_gpu": g / layout.gpus})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rows.sort(key=lambda r: (-r["goodput_per_gpu"], r["gpus"], -r["prefill"], r["tp_prefill"], r["tp_decode"]))
    return rows


def print_plan(app: Application, rows: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"P:D layouts for {app.name} (TTFT {app.slo.ttft_s * 1e3:g} ms, "
                        f"TPOT {app.slo.tpot_s * 1e3:g} ms), best goodput per GPU first")
    for col in ("rank", "P:D", "TP prefill/decode", "GPUs", "goodput (req/s)", "per GPU"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rows, 1):
        table.add_row(str(i), f"{r['prefill']}:{r['decode']}", f"{r['tp_prefill']}/{r['tp_decode']}", str(r["gpus"]),
                      f"{r['goodput_rps']:.2f}", f"{r['goodput_per_gpu']:.3f}")
    Console().print(table)
    Console().print(chosen_layout(rows[0]))


def chosen_layout(best: dict[str, Any]) -> str:
    """One line naming the best layout (and, without tensor parallelism, how to serve it)."""
    p, d, tp_p, tp_d = best["prefill"], best["decode"], best["tp_prefill"], best["tp_decode"]
    line = (f"chosen layout: {p} prefill instance(s) of {tp_p} GPU(s) + {d} decode instance(s) of {tp_d} GPU(s), "
            f"{best['gpus']} GPUs, {best['goodput_per_gpu']:.3f} req/s per GPU")
    if (tp_p, tp_d) == (1, 1):
        line += f": llumnix-py serve --instances {p + d} --pd {p}:{d}"
    return line


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--app", choices=sorted(APPLICATIONS), action="append", help="application(s) (default: all)")
    ap.add_argument("--gpus", type=int, default=None, help="GPU budget (default 8, --quick 4)")
    ap.add_argument("--profile", default="opt-13b-a100")
    ap.add_argument("--requests", type=int, default=None, help="requests per simulated run (default 600, --quick 150)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tp", default="1", help="tensor-parallel degrees to search per phase, e.g. 1,2 (default 1)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        degrees = sorted({int(x) for x in args.tp.split(",")})
    except ValueError:
        ap.error(f"--tp takes comma-separated integers, got {args.tp!r}")
    gpus = args.gpus or (4 if args.quick else 8)
    n = args.requests or (150 if args.quick else 600)
    out = {}
    for name in args.app or sorted(APPLICATIONS):
        app = APPLICATIONS[name]
        try:
            rows = plan(app, gpus, n, args.profile, seed=args.seed, iterations=6 if args.quick else 8, progress=True,
                        degrees=degrees)
        except ValueError as exc:  # a degree the profile cannot express
            ap.error(str(exc))
        print_plan(app, rows)
        out[name] = {"application": {**asdict(app), "slo": asdict(app.slo)}, "gpus": gpus, "requests": n,
                     "profile": args.profile, "tp_degrees": degrees, "ranked": rows,
                     "chosen": chosen_layout(rows[0])}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    return 0


if __name__ == "__main__":
    sys.exit(main())
