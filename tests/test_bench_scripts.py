"""The soak, chaos and serving-overhead benchmarks run end to end (tiny settings) and report what they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_soak_quick_finds_nothing_lost_duplicated_or_leaked(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    # A request that never finishes is reported as lost after the drain timeout, well inside the
    # subprocess's limit, so a failure says what went wrong instead of timing out.
    proc = _run(["benchmarks/soak.py", "--quick", "--duration", "8", "--rate", "8", "--scale-every", "3",
                 "--drain-timeout", "60", "--json", str(out), "--no-progress"], timeout=240)
    assert out.exists(), proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    for key in ("served", "failed", "lost", "duplicated_tokens", "leaked_blocks", "rss_start_mb", "rss_end_mb",
                "migrations", "scale_events"):
        assert key in r, key
    assert r["served"] > 0
    assert r["scale_events"], "no scale event ran"
    assert (r["lost"], r["duplicated_tokens"], r["leaked_blocks"], r["mismatched"], r["failed"]) == (0, 0, 0, 0, 0), r
    assert r["rss_start_mb"] > 0 and r["rss_end_mb"] > 0
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_serving_overhead_smoke(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = _run(["benchmarks/serving_overhead.py", "--smoke", "--json", str(out)], timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    for key in ("direct_tokens_per_s", "stack_tokens_per_s", "direct_ttft_ms", "stack_ttft_ms"):
        assert isinstance(r[key], (int, float)) and r[key] > 0, key
    # The engine's own counters, read from the instance: every stack token came from a step it timed.
    assert r["stack_steps"] >= r["max_tokens"] and r["direct_steps"] >= r["max_tokens"]
    assert 0 < r["stack_busy_s"] and 0 < r["direct_busy_s"]
    assert 0 < r["median_round_ratio"]


@pytest.mark.ray
@pytest.mark.slow
def test_chaos_smoke_heals_every_kill_and_loses_nothing(ray_session) -> None:
    """In this process, on the session's Ray: one scheduler and one instance SIGKILLed under
    load through the openai client; each kill is followed by recovery (the loop waits for it)."""
    from benchmarks import chaos

    args = chaos.parse_args(["--kills", "2", "--gap", "0.5", "1", "--instances", "2", "--rate", "3",
                             "--max-tokens", "32", "--no-progress"])
    r = chaos.run(args)
    assert r["kills"] == 2 and sorted(k["target"] for k in r["kill_log"]) == ["instance", "scheduler"]
    assert all(s is not None for s in r["recovery_s"]) and r["recovery_s_max"] == max(r["recovery_s"])
    assert r["submitted"] > 0 and r["served"] == r["submitted"], r
    assert (r["lost"], r["duplicated_tokens"], r["leaked_blocks"], r["mismatched"], r["failed"]) == (0, 0, 0, 0, 0), r
    assert r["health_at_end"]["status"] == "ok" and r["health_at_end"]["restarts"]["scheduler"] == 1
    left = [a for a in ray_session.util.list_named_actors(all_namespaces=True) if a.get("namespace") == "llumnix-chaos"]
    assert left == []


def test_context_switch_benchmark_reports_its_keys(tmp_path: Path) -> None:
    """The context-switch benchmark measures real copies and steps (tiny settings, in process)."""
    from benchmarks import context_switch

    r = context_switch.run(blocks=16, repeats=2, steps=2, batch=2, context=16)
    for key in ("blocks", "swap_out_ms_per_block_copy", "swap_out_ms_grouped", "swap_in_ms_per_block_copy",
                "swap_in_ms_grouped", "step_ms_idle", "step_ms_swapping", "migrate_read_ms_indexed",
                "migrate_read_ms_grouped", "migrate_write_ms_indexed", "migrate_write_ms_grouped"):
        assert isinstance(r[key], (int, float)) and r[key] > 0, key
    assert r["blocks"] == 16
    assert r["migrate_copies_grouped"] == 1  # 16 blocks of one group: one copy, not 16
def test_pd_handoff_reports_its_keys_with_every_position_once(tmp_path: Path) -> None:
    """One short prompt, no background batch: the hand-off runs between two processes; the
    script itself fails if a position is missing or emitted by both instances."""
    out = tmp_path / "pd.json"
    proc = _run(["benchmarks/pd_handoff.py", "--lengths", "64", "--batch", "0", "--repeats", "1", "--json", str(out)],
                timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["prompt_lengths"] == [64]
    for key in ("handoff_ms", "decode_gap_ms", "step_ms"):
        assert len(r[key]) == 1 and r[key][0] > 0, key
    (row,) = r["rows"]
    assert row["tokens_on_prefill_instance"] >= 1 and row["stages"] >= 1
    assert isinstance(r["target_met"], bool)
