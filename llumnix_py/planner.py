"""Placement planner for prefill/decode disaggregation (DistServe's placement, by simulation).

Given a workload (a function from a request rate to the requests of one simulated run),
TTFT and TPOT objectives, a cost profile and a GPU budget, ``plan`` searches the
prefill:decode splits ``P:D`` and, where the profile allows it, the tensor-parallel degree
of each phase's instances (``degrees``; ``engines.sim.profiles.with_tensor_parallel``),
with ``(P * tp_prefill + D * tp_decode) * unit <= budget`` GPUs, where ``unit`` is the
profile's own GPUs an instance (``hw.num_gpus``: 1 for OPT-13B on an A100, 2 for OPT-66B,
whose weights need two). For each layout it finds the
goodput, the highest request rate at which at least 90% of requests meet both objectives
(``llumnix_py.slo.max_rate``: a bisection over simulated runs of the real scheduler,
llumlet core and migration code), and ranks the layouts by goodput per GPU.
``llumnix-py plan`` and ``experiments/pd_planner.py`` print the ranked table and the
chosen layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from llumnix_py.engines.sim.cost_model import CostProfile
from llumnix_py.llumlet_types import PREFILL_FIRST_STEPS
from llumnix_py.sim import SimCluster, SimConfig, SimResult
from llumnix_py.slo import SLO, max_rate
from policies.config import PolicyConfig
from policies.roles import RoleFlipConfig

Workload = Callable[[float], Sequence[Any]]  # rate -> requests (arrival_time, prompt_len, output_len)


def profile_gpus(profile: Union[str, CostProfile]) -> int:
    """GPUs of one instance of ``profile`` at degree 1 (the planner's unit of GPUs)."""
    from llumnix_py.engines.sim.profiles import PROFILES

    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; known: {sorted(PROFILES)}")
        profile = PROFILES[profile]
    return profile.hw.num_gpus


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a planning workload: when it arrives and how long it is."""

    arrival_time: float
    prompt_len: int
    output_len: int


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
    handoffs: int = 1  # migrations (hand-offs) in flight at once per instance, out and in
    unit: int = 1  # GPUs of the profile's instance at degree 1 (``CostProfile.hw.num_gpus``)
    batch_policy: str = "fcfs"  # each engine's batching (``SimConfig.batch_policy``: fcfs, edf, jit)
    prefill_first: int = PREFILL_FIRST_STEPS  # ``SimConfig.prefill_first_steps`` (prefill instances)
    engine_prefill_first: int = 0  # ``SimConfig.engine_prefill_first_steps`` (every instance; 1000: vLLM <= 0.3)

    def __post_init__(self) -> None:
        if self.handoffs < 1:
            raise ValueError(f"handoffs must be >= 1, got {self.handoffs}")
        if self.unit < 1:
            raise ValueError(f"unit must be >= 1, got {self.unit}")

    @property
    def name(self) -> str:
        if self.pd is not None:
            tp = f" TP {self.tp[0]}/{self.tp[1]}" if self.tp != (1, 1) else ""
            flip = " with role flips" if self.flip else ""
            concurrent = f", {self.handoffs} hand-offs at once" if self.handoffs != 1 else ""
            first = ", decodes every step" if self.prefill_first == 0 else ""
            return f"disaggregated {self.pd[0]}:{self.pd[1]}{tp}{flip}{concurrent}{first}"
        if self.dispatch == "round_robin":
            return "colocated round-robin"
        if self.dispatch == "freeness" and self.batch_policy == "fcfs":
            return "colocated llumnix"
        batching = f", {self.batch_policy} batching" if self.batch_policy != "fcfs" else ""
        return f"colocated llumnix, {self.dispatch} dispatch{batching}"

    @property
    def gpus(self) -> int:
        if self.pd is None:
            return self.instances * self.tp[0] * self.unit
        return (self.pd[0] * self.tp[0] + self.pd[1] * self.tp[1]) * self.unit

    def sim_config(self, profile: Union[str, CostProfile], seed: int) -> SimConfig:
        return SimConfig(num_instances=self.instances, profile=profile, policy=PolicyConfig(dispatch=self.dispatch),
                         enable_migration=self.migration, pd_ratio=self.pd, seed=seed, tp_prefill=self.tp[0],
                         tp_decode=self.tp[1], role_flip=RoleFlipConfig() if self.flip else None,
                         max_migrations_out=self.handoffs, max_migrations_in=self.handoffs,
                         batch_policy=self.batch_policy, prefill_first_steps=self.prefill_first,
                         engine_prefill_first_steps=self.engine_prefill_first)


def run(workload: Workload, layout: Layout, rate: float, profile: Union[str, CostProfile],
        seed: int = 0) -> SimResult:
    """One simulated run of ``workload`` at ``rate`` on ``layout``."""
    return SimCluster(layout.sim_config(profile, seed)).run(workload(rate), progress=False)


def kv_tokens(layout: Layout, profile: Union[str, CostProfile], role: str) -> int:
    """Tokens of KV one instance of ``role`` (``prefill``, ``decode``, ``both``) in ``layout`` holds."""
    return layout.sim_config(profile, 0).role_profile(role).kv_tokens


def infeasible(layout: Layout, profile: Union[str, CostProfile], requests: Sequence[Any]) -> Optional[str]:
    """Why ``layout`` cannot serve ``requests`` at all (None when it can): an instance whose
    KV pool cannot hold the longest sequence it may have to keep whole (the longest prompt on
    a prefill instance; prompt plus output on a decode or colocated one, which decodes it to
    the end). A real deployment would refuse those requests (a 400), so such a layout is not
    a candidate, whatever its goodput on the others."""
    if not requests:
        return None
    cfg = layout.sim_config(profile, 0)
    longest_prompt = max(r.prompt_len for r in requests)
    longest = max(r.prompt_len + r.output_len for r in requests)
    roles = [("prefill", longest_prompt), ("decode", longest)] if layout.pd is not None else [("both", longest)]
    for role, tokens in roles:
        held = kv_tokens(layout, profile, role)
        if held < tokens:
            return (f"a {'colocated' if role == 'both' else role} instance of {cfg.role_profile(role).hw.num_gpus} "
                    f"GPU(s) holds {held} tokens of KV, the longest {'prompt' if role == 'prefill' else 'request'} "
                    f"needs {tokens}")
    return None


def decode_reads(requests: Sequence[Any]) -> list[int]:
    """Context tokens each request's decode steps read in all, wherever they run:
    ``(o - 1) p + (o - 1) o / 2`` for ``p`` prompt and ``o`` output tokens (its ``k``-th decode
    step attends to its prompt and its first ``k`` outputs)."""
    return [(r.output_len - 1) * r.prompt_len + (r.output_len - 1) * r.output_len // 2 for r in requests]


def read_rate(layout: Layout, profile: Union[str, CostProfile], role: str) -> float:
    """Context tokens one instance of ``role`` in ``layout`` can read a second at most, however
    it batches (``CostProfile.decode_read_ceiling``)."""
    return layout.sim_config(profile, 0).role_profile(role).decode_read_ceiling


def memory_cap(layout: Layout, profile: Union[str, CostProfile], requests: Sequence[Any]) -> float:
    """The highest rate ``layout`` could sustain with requests like ``requests``: every
    instance reading context at its ``read_rate`` and nothing else, over the mean of
    ``decode_reads`` (``inf`` when nothing decodes). A goodput measured above it comes from a
    run too short to reach a steady state: the decode work left undone grows with the run."""
    reads = sum(decode_reads(requests)) / max(len(requests), 1)
    if reads <= 0:
        return math.inf
    roles = [("prefill", layout.pd[0]), ("decode", layout.pd[1])] if layout.pd is not None \
        else [("both", layout.instances)]
    return sum(count * read_rate(layout, profile, role) for role, count in roles) / reads


def work_cap(layout: Layout, profile: Union[str, CostProfile], requests: Sequence[Any]) -> float:
    """The highest rate ``layout`` could sustain with requests like ``requests``, counting what
    each request needs wherever it runs: its prompt's prefill work on an instance that
    prefills (``CostProfile.prefill_work_s``: colocated instances, or the prefill role) and its
    ``decode_reads`` at ``read_rate``. Where a step's prefill and decode times add
    (``CostProfile.prefill_and_decode_add``: serial mixed steps, as vLLM up to 0.3 and every
    profile of DistServe's models run them, and fitted steps) an instance's second holds both
    together; with fused steps each apart. With ``w`` the mean prefill work and ``c`` the read
    rate of a prefill-capable instance, ``N`` of them, and ``c_d`` of each of ``D`` decode
    instances (none when colocated), the reads split between them at best::

        r <= min(N / w, (c N + c_d D) / (R + c w))     adding   (colocated: c N / (R + c w))
        r <= min(N / w, (c N + c_d D) / R)             fused

    for ``R`` the mean reads. It is at most ``memory_cap``; ``inf`` when nothing is asked.
    A goodput above it comes from a run too short to reach a steady state."""
    if not requests:
        return math.inf
    cfg = layout.sim_config(profile, 0)
    reads = sum(decode_reads(requests)) / len(requests)
    role, n = ("both", layout.instances) if layout.pd is None else ("prefill", layout.pd[0])
    prof = cfg.role_profile(role)
    work = sum(prof.prefill_work_s(r.prompt_len) for r in requests) / len(requests)
    c = prof.decode_read_ceiling
    others = 0.0 if layout.pd is None else layout.pd[1] * read_rate(layout, profile, "decode")
    demand = reads + c * work if prof.prefill_and_decode_add else reads
    prefill = n / work if work > 0 else math.inf
    return min(prefill, (c * n + others) / demand if demand > 0 else math.inf)


# Doublings of the goodput range above ``max_per_gpu`` an instance. Until session 16 the range
# stopped there: colocated code completion on 4 x TP4 of OPT-66B (64 req/s, the top) was capped.
GOODPUT_GROW = 4


def goodput(workload: Workload, layout: Layout, slo: SLO, profile: Union[str, CostProfile], *, seed: int = 0,
            max_per_gpu: float = 16.0, iterations: int = 7, grow: int = GOODPUT_GROW) -> float:
    """The layout's goodput (req/s, whole layout): bisection over ``iterations`` runs between
    ``max_per_gpu * instances / 2 ** iterations`` and ``max_per_gpu * instances``; a layout
    that still meets the objectives at the top has the range doubled, up to ``grow`` times
    (``slo.max_rate``), so a fast layout is not capped at ``max_per_gpu`` an instance."""
    def attained(rate: float) -> float:
        return run(workload, layout, rate, profile, seed).slo_attainment(slo)

    hi = max_per_gpu * layout.instances
    return max_rate(attained, hi / 2 ** iterations, hi, iterations=iterations, grow=grow)


def parse_counts(text: str, flag: str) -> tuple[int, ...]:
    """A comma-separated list of counts of at least 1 (``--tp``, ``--handoffs``), sorted,
    without repeats.

    Raises:
        ValueError: an entry that is not an integer, or one below 1, naming ``flag``.
    """
    try:
        counts = tuple(sorted({int(x) for x in text.split(",")}))
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if counts[0] < 1:
        raise ValueError(f"{flag} must be >= 1, got {text!r}")
    return counts


def layouts(gpus: int, degrees: Sequence[int] = (1,), *, exact: bool = False,
            handoffs: Union[int, Sequence[int]] = 1, unit: int = 1,
            prefill_first: int = PREFILL_FIRST_STEPS) -> list[Layout]:
    """Every disaggregated layout: ``(P, D)`` and a degree from ``degrees`` per phase, with
    ``(P * tp_prefill + D * tp_decode) * unit <= gpus`` GPUs (``== gpus`` when ``exact``),
    and each count of migrations in flight at once per instance in ``handoffs``; prefill
    instances put prompts first for ``prefill_first`` steps (``Layout.prefill_first``)."""
    counts = sorted({handoffs} if isinstance(handoffs, int) else set(handoffs))
    if not counts or counts[0] < 1:
        raise ValueError(f"hand-offs at once must be >= 1, got {handoffs!r}")
    out = []
    units = gpus // unit
    for tp_p in degrees:
        for tp_d in degrees:
            for p in range(1, units // tp_p + 1):
                for d in range(1, (units - p * tp_p) // tp_d + 1):
                    for h in counts:
                        lay = Layout(p + d, (p, d), tp=(tp_p, tp_d), handoffs=h, unit=unit,
                                     prefill_first=prefill_first)
                        if not exact or lay.gpus == gpus:
                            out.append(lay)
    return sorted(out, key=lambda lay: (lay.gpus, lay.tp, lay.pd, lay.handoffs))


def colocated_layouts(gpus: int, degrees: Sequence[int] = (1,), *, dispatch: str = "freeness",
                      migration: bool = True, unit: int = 1, engine_prefill_first: int = 0) -> list[Layout]:
    """Every colocated layout using exactly ``gpus`` GPUs: ``gpus / (degree * unit)``
    instances of each degree in ``degrees`` that divides the budget; each engine puts prompts
    first for ``engine_prefill_first`` steps (``Layout.engine_prefill_first``)."""
    return [Layout(gpus // (d * unit), None, dispatch, migration, tp=(d, d), unit=unit,
                   engine_prefill_first=engine_prefill_first)
            for d in degrees if gpus % (d * unit) == 0]


def plan(workload: Workload, slo: SLO, gpus: int, profile: Union[str, CostProfile], *, seed: int = 0,
         exact: bool = False, iterations: int = 7, max_per_gpu: float = 16.0, degrees: Sequence[int] = (1,),
         progress: Optional[str] = None, handoffs: Union[int, Sequence[int]] = 1,
         prefill_first: int = PREFILL_FIRST_STEPS) -> list[dict[str, Any]]:
    """Every layout's goodput and goodput per GPU, best first (ties: fewer GPUs, then more
    prefill, then lower degrees, then fewer hand-offs at once). ``handoffs``: the count (or
    counts, searched like the degrees) of hand-offs in flight at once per instance.
    ``progress``: a label to show a progress bar under.

    Raises:
        ValueError: a degree the profile cannot express (``with_tensor_parallel``).
    """
    rows = []
    unit = profile_gpus(profile)
    candidates = layouts(gpus, degrees, exact=exact, handoffs=handoffs, unit=unit, prefill_first=prefill_first)
    for degree in degrees:  # a degree the profile cannot express fails before anything is simulated
        Layout(2, (1, 1), tp=(degree, degree)).sim_config(profile, seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(candidates), desc=f"plan {progress}", unit="layout", leave=False)
    sample = workload(1.0)  # the lengths (the same at every rate)
    for layout in candidates:
        (p, d), (tp_p, tp_d) = layout.pd, layout.tp
        why = infeasible(layout, profile, sample)
        g = 0.0 if why else goodput(workload, layout, slo, profile, seed=seed, iterations=iterations,
                                    max_per_gpu=max_per_gpu)
        cap, work = memory_cap(layout, profile, sample), work_cap(layout, profile, sample)
        rows.append({"prefill": p, "decode": d, "tp_prefill": tp_p, "tp_decode": tp_d, "unit": unit,
                     "infeasible": why, "gpus": layout.gpus,
                     "handoffs": layout.handoffs, "prefill_first": layout.prefill_first, "goodput_rps": g,
                     "goodput_per_gpu": g / layout.gpus, "memory_cap_rps": cap, "over_memory_cap": g > cap,
                     "work_cap_rps": work, "over_work_cap": g > work})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rows.sort(key=lambda r: (-r["goodput_per_gpu"], r["gpus"], -r["prefill"], r["tp_prefill"], r["tp_decode"],
                             r["handoffs"]))
    return rows


def print_plan(title: str, rows: Sequence[dict[str, Any]]) -> None:
    """The ranked table, then the chosen layout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("rank", "P:D", "TP prefill/decode", "hand-offs at once", "GPUs", "goodput (req/s)", "per GPU",
                "work cap (req/s)"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rows, 1):
        u = r.get("unit", 1)
        cap = r.get("work_cap_rps")
        scores = (["infeasible", r["infeasible"], ""] if r.get("infeasible")
                  else [f"{r['goodput_rps']:.2f}" + (" *" if r.get("over_work_cap") else ""),
                        f"{r['goodput_per_gpu']:.3f}", "" if cap is None else f"{cap:.2f}"])
        table.add_row(str(i), f"{r['prefill']}:{r['decode']}", f"{r['tp_prefill'] * u}/{r['tp_decode'] * u}",
                      str(r.get("handoffs", 1)), str(r["gpus"]), *scores)
    Console().print(table)
    if any(r.get("over_work_cap") and not r.get("infeasible") for r in rows):
        Console().print("* above the layout's work cap: the layout cannot sustain that rate (its instances cannot "
                        "prefill the prompts and read the KV of their decode steps fast enough), so the runs were "
                        "too short to reach a steady state; plan with more requests a run")
    Console().print(chosen_layout(rows[0]))


def chosen_layout(best: dict[str, Any]) -> str:
    """One line naming the best layout (and, without tensor parallelism, how to serve it)."""
    p, d, tp_p, tp_d, u = best["prefill"], best["decode"], best["tp_prefill"], best["tp_decode"], best.get("unit", 1)
    line = (f"chosen layout: {p} prefill instance(s) of {tp_p * u} GPU(s) + {d} decode instance(s) of "
            f"{tp_d * u} GPU(s), {best['gpus']} GPUs, {best['goodput_per_gpu']:.3f} req/s per GPU")
    h = best.get("handoffs", 1)
    if h != 1:
        line += f", {h} hand-offs at once per instance"
    if (tp_p, tp_d, u) == (1, 1, 1):
        line += f": llumnix-py serve --instances {p + d} --pd {p}:{d}"
        if h != 1:
            line += f" --max-migrations-out {h} --max-migrations-in {h}"
        first = best.get("prefill_first", PREFILL_FIRST_STEPS)
        if first != PREFILL_FIRST_STEPS:
            line += f" --prefill-first-steps {first}"
    return line
