"""The command line: `llumnix-py serve` end to end, and `llumnix-py bench` against it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from llumnix_py.cli import PD_MIGRATIONS_AT_ONCE, build_parser, cluster_config, main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flags_build_a_validated_config():
    args = build_parser().parse_args(["serve", "--instances", "3", "--runtime", "local", "--dispatch", "load",
                                      "--no-migration", "--headroom", "1:64", "--transport", "gloo",
                                      "--migration-mode", "blocking", "--num-blocks", "128"])
    cfg = cluster_config(args)
    assert cfg.num_instances == 3 and cfg.runtime == "local"
    assert cfg.scheduler.policy.dispatch == "load" and not cfg.scheduler.enable_migration
    assert cfg.scheduler.policy.headroom_blocks == ((1, 64),)
    assert cfg.llumlet.transport == "gloo" and cfg.llumlet.migration.mode.value == "blocking"
    assert cfg.engine.engine.num_blocks == 128


def test_migration_cooldown_flag_reaches_the_policy_and_a_negative_one_is_a_usage_error(capsys):
    cfg = cluster_config(build_parser().parse_args(["serve", "--runtime", "local", "--migration-cooldown", "10"]))
    assert cfg.scheduler.policy.migration_cooldown_s == 10.0
    assert cluster_config(build_parser().parse_args(["serve"])).scheduler.policy.migration_cooldown_s == 30.0
    assert cluster_config(build_parser().parse_args(["serve", "--migration-cooldown", "0"])
                          ).scheduler.policy.migration_cooldown_s == 0.0
    with pytest.raises(SystemExit) as info:
        main(["serve", "--runtime", "local", "--migration-cooldown", "-1"])
    assert info.value.code == 2 and "migration_cooldown_s must be a finite number >= 0" in capsys.readouterr().err


def test_heartbeat_timeout_flag_reaches_the_scheduler_and_a_bad_one_is_a_usage_error(capsys):
    assert cluster_config(build_parser().parse_args(["serve"])).scheduler.heartbeat_timeout_s == 1.5
    for cmd in ("serve", "scheduler"):
        cfg = cluster_config(build_parser().parse_args([cmd, "--heartbeat-timeout", "30"]))
        assert cfg.scheduler.heartbeat_timeout_s == 30.0
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit) as info:
            main(["serve", "--runtime", "local", "--heartbeat-timeout", bad])
        assert info.value.code == 2 and "heartbeat_timeout_s must be positive" in capsys.readouterr().err


def test_blocked_heads_first_flag_reaches_the_policy_and_is_off_by_default():
    assert cluster_config(build_parser().parse_args(["serve"])).scheduler.policy.blocked_heads_first is False
    cfg = cluster_config(build_parser().parse_args(["serve", "--blocked-heads-first"]))
    assert cfg.scheduler.policy.blocked_heads_first is True


def test_migrate_in_threshold_flag_reaches_the_policy_and_one_below_the_out_threshold_is_a_usage_error(capsys):
    assert cluster_config(build_parser().parse_args(["serve"])).scheduler.policy.destination_threshold == 3.0
    cfg = cluster_config(build_parser().parse_args(["serve", "--migrate-in-threshold", "20"]))
    assert cfg.scheduler.policy.migrate_in_threshold == 20.0 and cfg.scheduler.policy.destination_threshold == 20.0
    with pytest.raises(SystemExit) as info:
        main(["serve", "--runtime", "local", "--migrate-in-threshold", "1"])
    assert info.value.code == 2 and "migrate_in_threshold (1.0) must be at least" in capsys.readouterr().err


def test_step_hold_flags_reach_the_llumlet_and_out_of_range_ones_are_usage_errors(capsys):
    cfg = cluster_config(build_parser().parse_args(["serve"]))
    assert (cfg.llumlet.migration.commit_hold_s, cfg.llumlet.max_step_hold_s) == (0.05, 0.1)  # the configs' defaults
    assert cfg.llumlet.hold_wait_fraction == 0.5
    cfg = cluster_config(build_parser().parse_args(["serve", "--commit-hold-ms", "0", "--max-step-hold-ms", "250",
                                                    "--hold-wait-fraction", "0.25"]))
    assert (cfg.llumlet.migration.commit_hold_s, cfg.llumlet.max_step_hold_s) == (0.0, 0.25)
    assert cfg.llumlet.hold_wait_fraction == 0.25
    for flag, field in (("--commit-hold-ms", "commit_hold_s"), ("--max-step-hold-ms", "max_step_hold_s"),
                        ("--hold-wait-fraction", "hold_wait_fraction")):
        for bad in ("-1", "5000"):
            with pytest.raises(SystemExit) as info:
                main(["serve", "--runtime", "local", flag, bad])
            assert info.value.code == 2 and f"{field} must be in [0, 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag, field, default, value, parsed, bad, error", [
    ("--decode-hold-ms", "decode_hold_s", 1.0, "250", 0.25, "-1", "decode_hold_s must be in [0, 3600]"),
    ("--prefill-first-steps", "prefill_first_steps", 16, "0", 0, "-3",
     "prefill_first_steps must be an integer in [0, 1000]"),
], ids=["decode-hold", "prefill-first"])
def test_a_disaggregation_flag_reaches_the_llumlet_and_a_bad_value_is_a_usage_error(
        capsys, flag, field, default, value, parsed, bad, error):
    assert getattr(cluster_config(build_parser().parse_args(["serve"])).llumlet, field) == default
    cfg = cluster_config(build_parser().parse_args(["serve", "--pd", "1:1", "--instances", "2", flag, value]))
    assert getattr(cfg.llumlet, field) == parsed
    with pytest.raises(SystemExit) as info:
        main(["serve", "--runtime", "local", flag, bad])
    assert info.value.code == 2 and error in capsys.readouterr().err


def test_migration_concurrency_flags_reach_the_scheduler_and_the_llumlets(capsys):
    default = cluster_config(build_parser().parse_args(["serve"]))
    assert (default.scheduler.max_migrations_out, default.scheduler.max_migrations_in) == (1, 1)
    assert (default.llumlet.max_outgoing, default.llumlet.max_incoming) == (1, 1)
    cfg = cluster_config(build_parser().parse_args(["serve", "--pd", "3:1", "--instances", "4",
                                                    "--max-migrations-out", "2", "--max-migrations-in", "6"]))
    assert (cfg.scheduler.max_migrations_out, cfg.scheduler.max_migrations_in) == (2, 6)
    assert (cfg.llumlet.max_outgoing, cfg.llumlet.max_incoming) == (2, 6)
    # with roles, every request is handed off once: several at once by default
    for roles in (["--pd", "1:3", "--instances", "4"], ["--roles", "prefill,decode"]):
        cfg = cluster_config(build_parser().parse_args(["serve", *roles]))
        assert (cfg.scheduler.max_migrations_out, cfg.llumlet.max_incoming) == (PD_MIGRATIONS_AT_ONCE,) * 2
    cfg = cluster_config(build_parser().parse_args(["serve", "--pd", "1:1", "--max-migrations-out", "3"]))
    assert (cfg.scheduler.max_migrations_in, cfg.llumlet.max_outgoing) == (3, 3)
    with pytest.raises(SystemExit) as info:
        main(["serve", "--runtime", "local", "--max-migrations-in", "0"])
    assert info.value.code == 2 and "max_migrations_in must be an integer >= 1" in capsys.readouterr().err


def test_prefill_queue_dispatch_is_a_known_policy():
    cfg = cluster_config(build_parser().parse_args(["serve", "--dispatch", "prefill_queue"]))
    assert cfg.scheduler.policy.dispatch == "prefill_queue"


def test_unknown_policy_name_is_an_error():
    args = build_parser().parse_args(["serve", "--dispatch", "nope"])
    with pytest.raises(KeyError):
        cluster_config(args)


@pytest.mark.parametrize("flags,message", [(["--dispatch", "nope"], "unknown dispatch policy 'nope' (known: "),
                                           (["--engine", "nope"], "unknown engine 'nope' (known: "),
                                           (["--transport", "nope"], "unknown transport 'nope' (known: ")])
def test_unknown_names_are_usage_errors_naming_the_known_ones(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--runtime", "local", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llumnix_py.cli", "serve", "--runtime", "local", "--instances", "2",
         "--num-blocks", "128", "--port", str(port), "--api-key", "sekret", "--batch-policy", "jit", "--rescue",
         "--dispatch", "slo", "--default-deadline-ms", "604800000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        raise AssertionError("server did not come up")
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_serve_answers_the_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="sekret", max_retries=0)
    out = client.completions.create(model="llumnix-tiny", prompt="hello", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 8
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()


def test_bench_against_serve(server, tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "llumnix_py.cli", "bench", "--url", server, "--num-requests", "6", "--rate", "20",
         "--prompt-len", "zipf:16", "--output-len", "8", "--api-key", "sekret", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads(out.read_text())["summary"]
    assert summary["succeeded"] == 6 and summary["failed"] == 0
    for key in ("ttft_mean_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p99_ms", "e2e_mean_ms", "e2e_p99_ms"):
        assert summary[key] >= 0
    assert "TTFT" in res.stdout


@pytest.mark.parametrize("objective,attained", [(["--deadline-ms", "604800000"], 1.0),  # a week: always met
                                                 (["--ttft-ms", "0.001", "--tbt-ms", "0.001"], 0.0)])  # never
def test_bench_reports_attainment_against_serve(server, tmp_path, objective, attained):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "llumnix_py.cli", "bench", "--url", server, "--num-requests", "4", "--rate", "20",
         "--prompt-len", "8", "--output-len", "6", "--api-key", "sekret", "--json", str(out), *objective],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads(out.read_text())["summary"]
    assert summary["succeeded"] == 4
    assert summary["attainment"] == attained
    assert (summary["goodput_tokens_per_s"] > 0) == (attained > 0)
    assert "objective attainment" in res.stdout
    metrics = httpx.get(server + "/metrics", timeout=30).text
    assert 'llumnix_goodput_tokens_total{kind="deadline"}' in metrics


def test_bench_refuses_a_half_objective():
    from llumnix_py.bench import BenchConfig
    from llumnix_py.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        BenchConfig(url="http://127.0.0.1:1", ttft_ms=5.0)


def test_bench_splits_sse_lines_on_newline_only():
    """JSON text may carry U+2028 or U+0085 unescaped (vLLM's server does); they are not line breaks."""
    import asyncio

    from llumnix_py.bench import _sse_lines

    body = 'data: {"t": "a\u2028b\x85c"}\n\ndata: [DONE]\n\n'.encode()

    async def lines():
        return [line async for line in _sse_lines(httpx.Response(200, content=body))]

    got = asyncio.run(lines())
    assert got[0] == 'data: {"t": "a\u2028b\x85c"}' and json.loads(got[0][6:])["t"] == "a\u2028b\x85c"
    assert "data: [DONE]" in got
