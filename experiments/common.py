"""Shared helpers of the experiment scripts: flags, output folder, policies, tables, plots.

Every script takes the same flags (``--out``, ``--quick``, ``--smoke``, ``--json``,
``--seed``, ``--no-progress``) and writes PNG plots and a Markdown table under
``experiments/out/<name>/`` (or ``--out``), prints a rich table, and optionally
writes its numbers as JSON. ``--quick`` runs in under a minute; ``--smoke`` is
smaller still (used by the test suite).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llumnix_py.engines.sim.profiles import LLAMA_7B_A10  # noqa: E402
from llumnix_py.sim import SimCluster, SimConfig, SimResult  # noqa: E402
from policies.config import PolicyConfig  # noqa: E402

OUT_ROOT = Path(__file__).resolve().parent / "out"
# vLLM <= 0.3 ran a prompt-only step whenever a waiting prompt could be admitted (no bound); DistServe's
# simulator models its vLLM baseline the same way (simdistserve/base/worker.py: prefill while any waits).
VLLM_PREFILL_FIRST = 1000

# name -> (dispatch policy, migration on); the paper's three systems (Section 6.2).
SYSTEMS: dict[str, tuple[str, bool]] = {
    "round_robin": ("round_robin", False),
    "infaas++": ("load", False),
    "llumnix": ("freeness", True),
    # Ablation, not run by default: Llumnix's migration behind INFaaS++'s dispatch rule,
    # which separates what migration buys from what the dispatch rule buys.
    "llumnix+load-dispatch": ("load", True),
    # Ablation: Llumnix's dispatch rule without migration, which separates what the
    # dispatch rule buys from what migration buys (issue 19, the S-L capacity loss).
    "llumnix-no-migration": ("freeness", False),
    # Issue 19: Llumnix with a per-request migration cooldown (policies/cooldown.py).
    "llumnix+cooldown-2": ("freeness", True),
    "llumnix+cooldown-10": ("freeness", True),
    "llumnix+cooldown-30": ("freeness", True),
    # Issue 19: Llumnix whose migration destinations keep room for arrivals (freeness
    # above 20, sources still below 3: ``PolicyConfig.migrate_in_threshold``).
    "llumnix+reserve-20": ("freeness", True),
    # The reserve on top of the servers' default 30 s cooldown (``llumnix-py serve``).
    "llumnix+reserve-20+cooldown-30": ("freeness", True),
    # Issue 19: a source moves its blocked queue head first where it fits
    # (``PolicyConfig.blocked_heads_first``).
    "llumnix+heads-first": ("freeness", True),
    # Issue 15: dispatch by the prompt tokens waiting to be prefilled, then freeness
    # (``policies.dispatch.by_prefill_queue``), with Llumnix's migration.
    "llumnix+prefill-queue": ("prefill_queue", True),
    # Issue 19, references for what memory is worth: INFaaS++ on instances with 10% / 25%
    # more KV blocks than the profile's (``SYSTEM_SIM``). Not systems to deploy: the
    # capacity extra memory buys is a generous reference for what rearranging the same
    # memory could buy (an estimate, not a bound: experiments/RESULTS.md).
    "infaas++@kv-x1.1": ("load", False),
    "infaas++@kv-x1.25": ("load", False),
}
# The paper's systems on engines that put prompts first, as vLLM <= 0.3 did (a prompt-only step
# whenever a waiting prompt can be admitted; ``SimConfig.engine_prefill_first_steps``), the engine
# the paper's Llumnix ran on: ``S@prompts-first`` is ``S`` with that engine setting (``SYSTEM_SIM``).
# The plain systems keep the serial mixed steps of Llumnix's own simulator.
PROMPTS_FIRST = ("round_robin", "infaas++", "llumnix")
SYSTEMS.update({f"{name}@prompts-first": SYSTEMS[name] for name in PROMPTS_FIRST})
# Policy settings a system adds to the defaults (a caller's own keywords win).
SYSTEM_POLICY: dict[str, dict[str, Any]] = {
    "llumnix+cooldown-2": {"migration_cooldown_s": 2.0},
    "llumnix+cooldown-10": {"migration_cooldown_s": 10.0},
    "llumnix+cooldown-30": {"migration_cooldown_s": 30.0},
    "llumnix+reserve-20": {"migrate_in_threshold": 20.0},
    "llumnix+reserve-20+cooldown-30": {"migrate_in_threshold": 20.0, "migration_cooldown_s": 30.0},
    "llumnix+heads-first": {"blocked_heads_first": True},
}
# Simulator settings a system adds (a caller's own keywords win): the memory references'
# KV pools, scaled from the default profile's (LLaMA-7B on an A10: 880 blocks).
SYSTEM_SIM: dict[str, dict[str, Any]] = {
    "infaas++@kv-x1.1": {"num_blocks": round(LLAMA_7B_A10.num_blocks * 1.1)},
    "infaas++@kv-x1.25": {"num_blocks": round(LLAMA_7B_A10.num_blocks * 1.25)},
    **{f"{name}@prompts-first": {"engine_prefill_first_steps": VLLM_PREFILL_FIRST} for name in PROMPTS_FIRST},
}


def parse_args(name: str, description: str, argv: Optional[Sequence[str]] = None,
               extra: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    """The common flags, plus the script's own (``extra``)."""
    ap = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=description)
    ap.add_argument("--out", type=Path, default=OUT_ROOT / name, help="output folder (PNG, Markdown)")
    ap.add_argument("--quick", action="store_true", help="a reduced run, under a minute")
    ap.add_argument("--smoke", action="store_true", help="a tiny run for the test suite (seconds)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--seed", type=int, default=0, help="workload and dispatcher seed")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.progress = not args.no_progress
    return args


def system_config(system: str, **policy_kw: Any) -> tuple[PolicyConfig, bool]:
    """``(PolicyConfig, enable_migration)`` of one of ``SYSTEMS``."""
    dispatch, migrate = SYSTEMS[system]
    return PolicyConfig(dispatch=dispatch, **{**SYSTEM_POLICY.get(system, {}), **policy_kw}), migrate


def simulate(workload: Sequence[Any], system: str, num_instances: int, *, seed: int = 0, progress: bool = False,
             policy_kw: Optional[dict] = None, **sim_kw: Any) -> SimResult:
    """One simulated run of ``system`` (a key of ``SYSTEMS``) over ``workload``."""
    policy, migrate = system_config(system, **(policy_kw or {}))
    sim_kw = {**SYSTEM_SIM.get(system, {}), **sim_kw}
    cfg = SimConfig(num_instances=num_instances, policy=policy, enable_migration=migrate, seed=seed, **sim_kw)
    return SimCluster(cfg).run(workload, progress=progress)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=200)
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*[fmt(v) for v in row])
    console.print(table)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, title: str, sections: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]],
                   notes: str = "") -> None:
    """A Markdown report: a title, optional notes, then one table per ``(heading, headers, rows)``."""
    parts = [f"# {title}\n"]
    if notes:
        parts.append(notes.strip() + "\n")
    for heading, headers, rows in sections:
        parts.append(f"## {heading}\n")
        parts.append(markdown_table(headers, rows))
    path.write_text("\n".join(parts))


def write_json(path: Optional[Path], data: Any) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def save_figure(fig: "plt.Figure", path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def subplots(nrows: int, ncols: int, width: float = 3.2, height: float = 2.6):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


LATENCY_KEYS = ("prefill_mean", "prefill_p99", "decode_mean", "decode_p99", "e2e_mean", "e2e_p99")


def pick(summary: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: summary[k] for k in keys}
