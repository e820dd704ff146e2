"""Placement planner for prefill/decode disaggregation (DistServe's placement, by simulation).

Given an application (prompt and output length distributions, TTFT and TPOT objectives),
a cost profile and a GPU budget, it searches the prefill:decode splits ``P:D`` and, with
``--tp`` (profiles with an all-reduce link only: ``opt-13b-a100``), the tensor-parallel
degree of each phase's instances, with ``P * tp_prefill + D * tp_decode <= budget`` GPUs,
and for each layout the goodput: the highest request rate at which at least 90% of
requests meet both objectives (the search is ``llumnix_py.planner``, which ``llumnix-py
plan`` runs on length specs of its own). It ranks the layouts by goodput per GPU and
prints the table and the chosen layout. A tensor-parallel instance is the profile
re-sized by ``profiles.with_tensor_parallel`` (FLOP/s, memory bandwidth and memory times
the degree, plus two ring all-reduces a layer over NVLink; see there).

The applications are DistServe's (OSDI 2024) three: chatbot (ShareGPT), code completion
(HumanEval) and summarization (LongBench), with the SLOs its artifact uses for them
(LLMServe/DistServe, ``simdistserve/benchmarks/figure11-abalation/01-run_abalation.sh``,
which cites the paper's Table 1: prefill/decode targets in ms, chatbot on OPT-13B 200/100,
on OPT-66B 400/100 and on OPT-175B 4000/200, code completion on OPT-66B 125/200,
summarization on OPT-66B 1500/150). ``chatbot-66b`` and ``chatbot-175b`` are the chatbot on
the larger models, on DistServe's own ShareGPT lengths (below), as the artifact runs them. Their length
distributions are NOT from DistServe, except ``chatbot-distserve``: chatbot uses the
ShareGPT statistics the Llumnix paper publishes (Table 1: mean/P99 input 306/3388, output
500/1234); ``chatbot-distserve`` resamples the (prompt, output) lengths of DistServe's own
ShareGPT requests (the 300 of its published vLLM run, ``experiments/data/
distserve_opt13b_vllm.json``: mean/P99 input 780/1904, output 176/834; see
``experiments/profile_check.py``); code completion and summarization use log-normal
lengths assumed here (stated in ``APPLICATIONS``).

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
from pathlib import Path
from typing import Any, Optional, Sequence, Union

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments.workloads import SHAREGPT_STATS, WorkloadRequest, fit_lognormal, poisson_arrivals  # noqa: E402
from llumnix_py import planner  # noqa: E402
from llumnix_py.engines.sim.cost_model import CostProfile  # noqa: E402
from llumnix_py.engines.types import Objective  # noqa: E402
from llumnix_py.llumlet_types import PREFILL_FIRST_STEPS  # noqa: E402
from llumnix_py.planner import Layout, chosen_layout  # noqa: E402
from llumnix_py.sim import SimResult  # noqa: E402
from llumnix_py.slo import SLO  # noqa: E402


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
        model: the cost profile of the model DistServe judged these SLOs on (Table 1).
        pairs: measured (prompt, output) lengths to resample instead of the log-normals
            (``prompt`` and ``output`` then only describe them).
    """

    name: str
    slo: SLO
    prompt: tuple[float, float]
    output: tuple[float, float]
    cap: int = 4096
    source: str = ""
    model: str = "opt-13b-a100"
    pairs: tuple[tuple[int, int], ...] = ()


DISTSERVE_TRACE = Path(__file__).resolve().parent / "data" / "distserve_opt13b_vllm.json"


def distserve_chatbot_pairs(path: Path = DISTSERVE_TRACE) -> tuple[tuple[int, int], ...]:
    """(prompt, output) lengths of DistServe's ShareGPT requests: its published 300-request vLLM run
    (the 100-request run's requests are among them)."""
    with open(path) as f:
        records = json.load(f)["traces"]["vllm-300-3"]
    return tuple((int(r["prompt_len"]), int(r["output_len"])) for r in records)


def _described(pairs: Sequence[tuple[int, int]]) -> tuple[tuple[float, float], tuple[float, float]]:
    p, o = np.array([x[0] for x in pairs]), np.array([x[1] for x in pairs])
    return (float(p.mean()), float(np.percentile(p, 99))), (float(o.mean()), float(np.percentile(o, 99)))


_DISTSERVE_SLO = "SLOs: DistServe artifact (01-run_abalation.sh, paper Table 1)"
APPLICATIONS: dict[str, Application] = {
    "chatbot": Application("chatbot", SLO.from_ms(200, 100), SHAREGPT_STATS["input"], SHAREGPT_STATS["output"],
                           source=f"{_DISTSERVE_SLO}, OPT-13B; lengths: ShareGPT as in Llumnix Table 1"),
    "chatbot-distserve": Application("chatbot-distserve", SLO.from_ms(200, 100),
                                     *_described(distserve_chatbot_pairs()), pairs=distserve_chatbot_pairs(),
                                     source=f"{_DISTSERVE_SLO}, OPT-13B; lengths: DistServe's ShareGPT requests "
                                            "(its artifact's vLLM run of 300)"),
    "chatbot-66b": Application("chatbot-66b", SLO.from_ms(400, 100), *_described(distserve_chatbot_pairs()),
                               pairs=distserve_chatbot_pairs(), model="opt-66b-2xa100",
                               source=f"{_DISTSERVE_SLO}, OPT-66B (opt_66b_sharegpt: 8 GPUs); lengths: DistServe's "
                                      "ShareGPT requests (its artifact's vLLM run of 300)"),
    "chatbot-175b": Application("chatbot-175b", SLO.from_ms(4000, 200), *_described(distserve_chatbot_pairs()),
                                pairs=distserve_chatbot_pairs(), model="opt-175b-8xa100",
                                source=f"{_DISTSERVE_SLO}, OPT-175B (opt_175b_sharegpt: 32 GPUs); lengths: "
                                       "DistServe's ShareGPT requests (its artifact's vLLM run of 300)"),
    "code": Application("code", SLO.from_ms(125, 200), (150.0, 450.0), (120.0, 400.0),
                        source=f"{_DISTSERVE_SLO}, OPT-66B; lengths: assumed here (short prompts, short outputs)",
                        model="opt-66b-2xa100"),
    "summarization": Application("summarization", SLO.from_ms(1500, 150), (1500.0, 3500.0), (100.0, 400.0),
                                 source=f"{_DISTSERVE_SLO}, OPT-66B; lengths: assumed here (long prompts)",
                                 model="opt-66b-2xa100"),
}


# What a run without ``--app`` covers. The chatbot on OPT-66B and OPT-175B (8 and 32 GPUs of the
# big models, several minutes a run here) runs when named.
DEFAULT_APPLICATIONS = ("chatbot", "chatbot-distserve", "code", "summarization")


def _lognormal(n: int, mean: float, p99: float, cap: int, rng: np.random.Generator) -> np.ndarray:
    mu, sigma = fit_lognormal(mean, p99, cap)
    return np.clip(np.round(rng.lognormal(mu, sigma, n)), 1, cap).astype(int)


def make_requests(app: Application, n: int, rate: float, seed: int = 0, *,
                  objectives: bool = False) -> list[WorkloadRequest]:
    """``n`` requests of ``app`` arriving as a Poisson process at ``rate`` (same lengths for
    every rate of one seed). With ``objectives`` each request carries the application's SLO
    as its objective (TTFT, and TPOT as the time between tokens), for systems that schedule
    by it; attainment is judged the same way either way."""
    length_rng, arrival_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    if app.pairs:
        picks = length_rng.integers(0, len(app.pairs), n)
        prompts = [min(app.pairs[i][0], app.cap) for i in picks]
        outputs = [min(app.pairs[i][1], app.cap) for i in picks]
    else:
        prompts = _lognormal(n, *app.prompt, app.cap, length_rng)
        outputs = _lognormal(n, *app.output, app.cap, length_rng)
    arrivals = poisson_arrivals(n, rate, arrival_rng)
    objective = Objective(ttft_ms=app.slo.ttft_s * 1e3, tbt_ms=app.slo.tpot_s * 1e3) if objectives else None
    return [WorkloadRequest(float(a), int(p), int(o), objective=objective) for a, p, o in zip(arrivals, prompts, outputs)]


def workload(app: Application, n: int, seed: int = 0, *, objectives: bool = False):
    """``app``'s requests as a function of the rate (the planner's ``Workload``)."""
    return lambda rate: make_requests(app, n, rate, seed, objectives=objectives)


def run(app: Application, layout: Layout, rate: float, n: int, profile: Union[str, CostProfile],
        seed: int = 0, *, objectives: bool = False) -> SimResult:
    return planner.run(workload(app, n, seed, objectives=objectives), layout, rate, profile, seed)


def goodput(app: Application, layout: Layout, n: int, profile: Union[str, CostProfile], *, seed: int = 0,
            max_per_gpu: float = 16.0, iterations: int = 7, slo: Optional[SLO] = None,
            objectives: bool = False) -> float:
    """The layout's goodput (req/s, whole layout) for ``app``'s objectives (or ``slo``)."""
    return planner.goodput(workload(app, n, seed, objectives=objectives), layout, slo or app.slo, profile,
                           seed=seed, max_per_gpu=max_per_gpu, iterations=iterations)


def colocated_goodputs(app: Application, gpus: int, n: int, profile: Union[str, CostProfile], *, seed: int = 0,
                       iterations: int = 7, degrees: Sequence[int] = (1,), dispatch: str = "round_robin",
                       migration: bool = False, engine_prefill_first: int = 0) -> list[tuple[float, Layout]]:
    """``(goodput, layout)`` of every colocated layout of ``gpus`` (one per degree in ``degrees``
    that divides the budget) whose instances hold ``app``'s longest request, best first (ties:
    the smaller degree); empty when none does."""
    unit = planner.profile_gpus(profile)
    sample = make_requests(app, n, 1.0, seed)  # the lengths (the same at every rate)
    tried = [(goodput(app, lay, n, profile, seed=seed, iterations=iterations), lay)
             for lay in planner.colocated_layouts(gpus, degrees, dispatch=dispatch, migration=migration, unit=unit,
                                                  engine_prefill_first=engine_prefill_first)
             if planner.infeasible(lay, profile, sample) is None]
    return sorted(tried, key=lambda t: (-t[0], t[1].tp[0]))


def plan(app: Application, gpus: int, n: int, profile: Union[str, CostProfile], *, seed: int = 0,
         exact: bool = False, iterations: int = 7, max_per_gpu: float = 16.0, progress: bool = False,
         degrees: Sequence[int] = (1,), handoffs: Union[int, Sequence[int]] = 1,
         prefill_first: int = PREFILL_FIRST_STEPS) -> list[dict[str, Any]]:
    """``llumnix_py.planner.plan`` for ``app`` (``n`` requests a run)."""
    return planner.plan(workload(app, n, seed), app.slo, gpus, profile, seed=seed, exact=exact,
                        iterations=iterations, max_per_gpu=max_per_gpu, degrees=degrees,
                        progress=app.name if progress else None, handoffs=handoffs, prefill_first=prefill_first)


def print_plan(app: Application, rows: Sequence[dict[str, Any]]) -> None:
    planner.print_plan(f"P:D layouts for {app.name} (TTFT {app.slo.ttft_s * 1e3:g} ms, "
                       f"TPOT {app.slo.tpot_s * 1e3:g} ms), best goodput per GPU first", rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--app", choices=sorted(APPLICATIONS), action="append",
                    help=f"application(s) (default: {', '.join(DEFAULT_APPLICATIONS)})")
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
    for name in args.app or DEFAULT_APPLICATIONS:
        app = APPLICATIONS[name]
        try:
            rows = plan(app, gpus, n, args.profile, seed=args.seed, iterations=6 if args.quick else 8, progress=True,
                        degrees=degrees)
        except ValueError as exc:  # a degree the profile cannot express
            ap.error(str(exc))
        print_plan(app, rows)
        described = {k: v for k, v in asdict(app).items() if k != "pairs"}  # the lengths: mean and P99 only
        out[name] = {"application": {**described, "slo": asdict(app.slo)}, "gpus": gpus, "requests": n,
                     "profile": args.profile, "tp_degrees": degrees, "ranked": rows,
                     "chosen": chosen_layout(rows[0])}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    return 0


if __name__ == "__main__":
    sys.exit(main())
