"""The P:D planner (``experiments/pd_planner.py``) and the disaggregation experiment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import disaggregation
from experiments.pd_planner import APPLICATIONS, Application, make_requests, plan
from llumnix_py.planner import Layout, chosen_layout, layouts
from llumnix_py.sim import SimCluster
from llumnix_py.slo import SLO

# Known by hand on opt-13b-a100 (3 GPUs, every GPU used):
# - 2,000-token prompts, 2 output tokens, loose objectives: a prompt costs ~0.32 s of prefill
#   (2 * 12.9e9 * 2000 / (312e12 * 0.51)) and decoding is nearly free, so goodput follows
#   the prefill instances: 2:1 beats 1:2.
# - 16-token prompts, 200 output tokens, a 25 ms TPOT: a decode step is ~20 ms of weights
#   plus ~0.2 ms per sequence of this length, so each decode instance holds ~20 requests
#   within the objective and prefill is nearly free: 1:2 beats 2:1.
PREFILL_HEAVY = Application("prefill-heavy", SLO(1.0, 1.0), (2000.0, 2001.0), (2.0, 2.01))
DECODE_HEAVY = Application("decode-heavy", SLO(1.0, 0.025), (16.0, 16.01), (200.0, 200.5))


@pytest.mark.parametrize("app,best", [(PREFILL_HEAVY, (2, 1)), (DECODE_HEAVY, (1, 2))], ids=["prefill", "decode"])
def test_the_planner_picks_the_split_known_by_hand(app, best):
    ranked = plan(app, 3, 80, "opt-13b-a100", exact=True, iterations=6)
    assert [(r["prefill"], r["decode"]) for r in ranked][0] == best
    assert len(ranked) == 2
    first, second = ranked
    assert first["goodput_per_gpu"] >= 1.5 * second["goodput_per_gpu"] > 0


# Known by hand for tensor parallelism (opt-13b-a100, 3 GPUs, every GPU used): 16-token
# prompts, 100 output tokens, TPOT 15 ms. One GPU's decode step streams 25.8 GB of weights at
# 0.8 * 2039 GB/s (16 ms) plus 4 ms fixed: ~20 ms, above the objective at any load, so every
# layout whose decode instances have one GPU has goodput 0. On two GPUs (TP 2) the weights take
# 8 ms, plus 4 ms and 80 all-reduces of ~10 us: ~13 ms, within it. The only layout of 3 GPUs
# with TP-2 decode is 1 prefill instance of 1 GPU + 1 decode instance of 2 GPUs.
TIGHT_TPOT = Application("tight-tpot", SLO(1.0, 0.015), (16.0, 16.01), (100.0, 100.5))


def test_the_planner_searches_the_tensor_parallel_degree_per_phase():
    ranked = plan(TIGHT_TPOT, 3, 60, "opt-13b-a100", exact=True, iterations=5, degrees=(1, 2))
    assert len(ranked) == 4
    best = ranked[0]
    assert (best["prefill"], best["decode"], best["tp_prefill"], best["tp_decode"]) == (1, 1, 1, 2)
    assert best["gpus"] == 3 and best["goodput_per_gpu"] > 0
    assert all(r["goodput_rps"] == 0 for r in ranked[1:]), ranked
    with pytest.raises(ValueError, match="no all-reduce link"):
        plan(TIGHT_TPOT, 3, 10, "llama-7b-a10", exact=True, degrees=(1, 2))
    # the simulated decode instance runs on the re-sized profile (its KV pool, its steps)
    from llumnix_py.engines.sim.profiles import OPT_13B_A100, with_tensor_parallel
    from llumnix_py.sim import SimCluster, SimConfig

    cluster = SimCluster(SimConfig(num_instances=2, pd_ratio=(1, 1), profile="opt-13b-a100", tp_decode=2))
    cluster.run(make_requests(TIGHT_TPOT, 4, 1.0), progress=False)
    blocks = {i: inst.engine.load().total_blocks for i, inst in cluster.instances.items()}
    assert blocks == {"instance-000": OPT_13B_A100.num_blocks,
                      "instance-001": with_tensor_parallel(OPT_13B_A100, 2).num_blocks}


def test_splits_and_workloads():
    assert [lay.pd for lay in layouts(3)] == [(1, 1), (1, 2), (2, 1)]
    assert [lay.pd for lay in layouts(4, exact=True)] == [(1, 3), (2, 2), (3, 1)]
    assert [(lay.pd, lay.tp) for lay in layouts(3, (1, 2), exact=True)] == [
        ((1, 2), (1, 1)), ((2, 1), (1, 1)), ((1, 1), (1, 2)), ((1, 1), (2, 1))]
    assert all(lay.gpus <= 4 for lay in layouts(4, (1, 2, 4)))
    a = make_requests(APPLICATIONS["summarization"], 50, 2.0, seed=3)
    b = make_requests(APPLICATIONS["summarization"], 50, 4.0, seed=3)
    assert [r.prompt_len for r in a] == [r.prompt_len for r in b]  # a rate sweep keeps the lengths
    assert a[-1].arrival_time > b[-1].arrival_time
    assert all(1 <= r.prompt_len <= 4096 and r.output_len >= 1 for r in a)


def test_the_disaggregation_experiment_writes_its_table_plot_and_json(tmp_path):
    out, js = tmp_path / "out", tmp_path / "d.json"
    data = disaggregation.main(["--smoke", "--no-progress", "--app", "code", "--out", str(out), "--json", str(js)])
    assert json.loads(js.read_text()) == json.loads(json.dumps(data))
    r = data["results"]["code"]
    assert set(r["goodput_rps"]) == {"colocated round-robin", "colocated llumnix", "disaggregated"}
    assert r["split"] == [r["plan"][0]["prefill"], r["plan"][0]["decode"]]
    assert all(0 <= a <= 1 for c in r["curves"].values() for a in c["attainment"] + c["attainment_by_scale"])
    assert set(r["memory_cap_rps"]) == set(r["goodput_rps"]) and all(c > 0 for c in r["memory_cap_rps"].values())
    assert r["over_memory_cap"] == {k: g > r["memory_cap_rps"][k] for k, g in r["goodput_rps"].items()}
    assert set(r["work_cap_rps"]) == set(r["goodput_rps"])
    assert all(0 < r["work_cap_rps"][k] <= c for k, c in r["memory_cap_rps"].items())
    assert r["over_work_cap"] == {k: g > r["work_cap_rps"][k] for k, g in r["goodput_rps"].items()}
    assert (out / "disaggregation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "disaggregation.md").read_text()
    assert "work cap" in md
    assert md.startswith("# ") and "|---|" in md and "DistServe" in md and "Shifting mix" in md
    # the shifting mix: fixed roles and role flips over the same requests, nothing dropped
    shift = data["shift"]
    assert set(shift["systems"]) == {"disaggregated 1:3", "disaggregated 1:3 with role flips"}
    rows = [r for rs in shift["systems"].values() for r in rs]
    assert rows and all(r["completed"] == r["requests"] == 40 and 0 <= r["attainment"] <= 1 for r in rows)
    assert not any(r["flips"] for r in shift["systems"]["disaggregated 1:3"])
    assert all(r["flips"] for r in shift["systems"]["disaggregated 1:3 with role flips"])
    assert (out / "disaggregation_shift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_disaggregation_experiment_takes_concurrent_hand_offs_and_can_skip_the_shift(tmp_path):
    out, js = tmp_path / "out", tmp_path / "d.json"
    data = disaggregation.main(["--smoke", "--no-progress", "--app", "code", "--handoffs", "2", "--no-shift",
                                "--requests", "24", "--out", str(out), "--json", str(js)])
    assert list(data["settings"]["handoffs"]) == [2] and data["shift"]["systems"] == {}
    assert data["settings"]["n"] == 24 and "24 requests a run" in (out / "disaggregation.md").read_text()
    assert all(row["handoffs"] == 2 for row in data["results"]["code"]["plan"])
    assert "Shifting mix" not in (out / "disaggregation.md").read_text()
    assert not (out / "disaggregation_shift.png").exists()
    with pytest.raises(SystemExit):
        disaggregation.main(["--smoke", "--no-progress", "--handoffs", "0", "--out", str(out)])
    with pytest.raises(SystemExit):
        disaggregation.main(["--smoke", "--no-progress", "--handoffs", "2,x", "--out", str(out)])
    with pytest.raises(SystemExit):
        disaggregation.main(["--smoke", "--no-progress", "--requests", "0", "--out", str(out)])


def test_requests_carry_the_applications_slo_only_when_asked():
    app = APPLICATIONS["code"]
    assert all(r.objective is None for r in make_requests(app, 20, 5.0, seed=3))
    carried = make_requests(app, 20, 5.0, seed=3, objectives=True)
    assert {(r.objective.ttft_ms, r.objective.tbt_ms, r.objective.kind) for r in carried} == {(125.0, 200.0, "stream")}
    # the same requests otherwise
    assert [(r.arrival_time, r.prompt_len, r.output_len) for r in carried] == \
        [(r.arrival_time, r.prompt_len, r.output_len) for r in make_requests(app, 20, 5.0, seed=3)]


def test_the_disaggregation_experiment_adds_colocated_systems_on_the_round_robins_layout(tmp_path):
    out = tmp_path / "out"
    data = disaggregation.main(["--smoke", "--no-progress", "--app", "code", "--no-shift", "--colocated",
                                "prefill_queue,slo", "--out", str(out)])
    r = data["results"]["code"]
    queue, slo = "colocated llumnix, prefill_queue dispatch", "colocated llumnix, slo dispatch, jit batching"
    assert list(r["goodput_rps"]) == ["colocated round-robin", "colocated llumnix", queue, slo, "disaggregated"]
    assert set(r["curves"]) == set(r["goodput_rps"])
    assert r["gpus_per_instance"][queue] == r["gpus_per_instance"][slo] == r["gpus_per_instance"]["colocated round-robin"]
    assert all(g >= 0 for g in r["goodput_rps"].values())
    assert queue in (out / "disaggregation.md").read_text()
    with pytest.raises(SystemExit):
        disaggregation.main(["--smoke", "--no-progress", "--colocated", "fastest", "--out", str(out)])


def test_a_colocated_layout_passes_its_batching_to_the_simulator():
    lay = Layout(2, None, dispatch="slo", batch_policy="jit")
    assert lay.name == "colocated llumnix, slo dispatch, jit batching"
    cfg = lay.sim_config("opt-13b-a100", 0)
    assert cfg.batch_policy == "jit" and cfg.policy.dispatch == "slo"
    assert Layout(2, None).name == "colocated llumnix" and Layout(2, None).sim_config("opt-13b-a100", 0).batch_policy == "fcfs"


def test_llumnix_py_plan_prints_the_ranked_table_and_the_layout_known_by_hand(tmp_path, capsys):
    """The CLI over the library planner: the prefill-heavy case above, with fixed lengths."""
    from llumnix_py.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "--prompt-len", "2000", "--output-len", "2", "--slo-ttft-ms", "1000", "--slo-tpot-ms",
                 "1000", "--gpus", "3", "--exact", "--requests", "80", "--iterations", "6", "--no-progress",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "P:D layouts" in printed and "chosen layout: 2 prefill instance(s) of 1 GPU(s) + 1 decode" in printed
    ranked = json.loads(out.read_text())["ranked"]
    assert [(r["prefill"], r["decode"]) for r in ranked] == [(2, 1), (1, 2)]
    assert ranked[0]["goodput_per_gpu"] >= 1.5 * ranked[1]["goodput_per_gpu"] > 0
    for flags, message in ((["--tp", "1,2", "--profile", "llama-7b-a10"], "no all-reduce link"),
                           (["--slo-ttft-ms", "-1"], "must be positive"), (["--prompt-len", "zipf:0"], "zipf mean"),
                           (["--tp", "x"], "comma-separated integers"),
                           (["--handoffs", "1,x"], "--handoffs takes comma-separated integers"),
                           (["--handoffs", "0,4"], "--handoffs must be >= 1")):
        with pytest.raises(SystemExit) as info:
            main(["plan", "--gpus", "2", "--requests", "4", "--iterations", "1", "--no-progress", *flags])
        assert info.value.code == 2 and message in capsys.readouterr().err


def _most_hand_offs_at_once(handoffs: int) -> tuple[int, int]:
    """(hand-offs finished, the most in flight at once) for a burst of code-completion
    requests on one prefill and two decode instances."""
    layout = Layout(3, (1, 2), handoffs=handoffs)
    result = SimCluster(layout.sim_config("opt-13b-a100", 0)).run(
        make_requests(APPLICATIONS["code"], 40, 50.0, seed=0), progress=False)
    spans = [(m.committed_at - m.total_s, m.committed_at) for m in result.migrations if m.status.value == "finished"]
    now = most = 0
    for _, step in sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans]):
        now += step
        most = max(most, now)
    return len(spans), most


def test_a_layout_runs_as_many_hand_offs_at_once_as_it_allows():
    assert Layout(3, (1, 2), handoffs=3).sim_config("opt-13b-a100", 0).max_migrations_out == 3
    assert "3 hand-offs at once" in Layout(3, (1, 2), handoffs=3).name
    with pytest.raises(ValueError, match="handoffs"):
        Layout(3, (1, 2), handoffs=0)
    one, three = _most_hand_offs_at_once(1), _most_hand_offs_at_once(3)
    assert one[0] > 0 and three[0] > 0
    assert one[1] == 1 and three[1] == 3


def test_the_planner_searches_hand_offs_at_once_and_says_how_to_serve_them():
    assert [(lay.pd, lay.handoffs) for lay in layouts(3, exact=True, handoffs=(4, 1))] == \
        [((1, 2), 1), ((1, 2), 4), ((2, 1), 1), ((2, 1), 4)]
    for bad in ((), (0, 2)):
        with pytest.raises(ValueError, match="hand-offs at once"):
            layouts(3, handoffs=bad)
    # Code completion on 3 GPUs: two prefill instances hand a request off every ~20 ms at the
    # top rates; one hand-off at a time per instance queues them (the test above shows three
    # at once), so every split gains from three at once and 2:1 with three ranks first.
    rows = plan(APPLICATIONS["code"], 3, 60, "opt-13b-a100", exact=True, iterations=5, handoffs=(1, 3))
    assert sorted((r["prefill"], r["decode"], r["handoffs"]) for r in rows) == \
        [(1, 2, 1), (1, 2, 3), (2, 1, 1), (2, 1, 3)]
    assert (rows[0]["prefill"], rows[0]["handoffs"]) == (2, 3)
    by = {(r["prefill"], r["handoffs"]): r["goodput_rps"] for r in rows}
    assert by[(2, 3)] > by[(2, 1)] and by[(1, 3)] >= by[(1, 1)]
    line = chosen_layout(rows[0])
    assert "3 hand-offs at once" in line
    assert line.endswith("llumnix-py serve --instances 3 --pd 2:1 --max-migrations-out 3 --max-migrations-in 3")
    assert chosen_layout({**rows[0], "prefill_first": 0}).endswith("--max-migrations-in 3 --prefill-first-steps 0")


def test_a_profile_of_several_gpus_counts_them_in_every_layout():
    """OPT-66B needs two A100s an instance: the planner's GPUs are the profile's GPUs times
    the degree, and a budget the instances cannot fill exactly is not planned."""
    from llumnix_py.planner import colocated_layouts, profile_gpus

    assert profile_gpus("opt-66b-2xa100") == 2 and profile_gpus("opt-13b-a100") == 1
    with pytest.raises(ValueError, match="unknown profile"):
        profile_gpus("opt-1t")
    assert [(lay.pd, lay.gpus) for lay in layouts(8, exact=True, unit=2)] == [((1, 3), 8), ((2, 2), 8), ((3, 1), 8)]
    assert [(lay.pd, lay.tp) for lay in layouts(8, (1, 2), exact=True, unit=2)] == [
        ((1, 3), (1, 1)), ((2, 2), (1, 1)), ((3, 1), (1, 1)), ((2, 1), (1, 2)), ((1, 2), (2, 1)), ((1, 1), (2, 2))]
    assert [(lay.instances, lay.tp, lay.gpus) for lay in colocated_layouts(8, (1, 2, 3), unit=2)] == [
        (4, (1, 1), 8), (2, (2, 2), 8)]
    ranked = plan(DECODE_HEAVY, 4, 20, "opt-66b-2xa100", exact=True, iterations=2)
    assert [(r["prefill"], r["decode"], r["gpus"], r["unit"]) for r in ranked] == [(1, 1, 4, 2)]


def test_the_disaggregation_experiment_runs_each_application_on_its_model_and_searches_degrees(tmp_path):
    out, js = tmp_path / "out", tmp_path / "d.json"
    data = disaggregation.main(["--smoke", "--no-progress", "--app", "code", "--tp", "1,2", "--no-shift",
                                "--out", str(out), "--json", str(js)])
    r = data["results"]["code"]
    assert r["profile"] == APPLICATIONS["code"].model == "opt-66b-2xa100" and r["gpus"] == 4
    for name in ("colocated round-robin", "colocated llumnix"):
        tried = r["colocated_by_degree"][name]
        assert set(map(int, tried)) == {1, 2}
        assert r["goodput_rps"][name] == max(tried.values())  # each colocated system at its best degree
        assert r["gpus_per_instance"][name] in (2, 4)
    assert r["gpus_per_instance"]["disaggregated"] == [2, 2]  # 4 GPUs hold one split only: 1:1 of two each
    assert "opt-66b-2xa100, 4 GPUs" in (out / "disaggregation.md").read_text()
    for bad in ("0", "x", "1,-2"):
        with pytest.raises(SystemExit):
            disaggregation.main(["--smoke", "--no-progress", "--app", "code", "--tp", bad, "--out", str(out)])


def test_a_layout_whose_instances_cannot_hold_the_longest_request_is_not_a_candidate():
    """OPT-66B on two A100s keeps 173 blocks (2,768 tokens) of KV: 3,000-token prompts do not
    fit a two-GPU instance of either phase, so every layout with one is infeasible (goodput 0,
    and the reason), while four-GPU instances serve them."""
    from llumnix_py.planner import colocated_layouts, infeasible

    long_prompts = Application("long", SLO(10.0, 1.0), (3000.0, 3001.0), (4.0, 4.01))
    sample = make_requests(long_prompts, 10, 1.0)
    small, large = colocated_layouts(8, (1, 2), unit=2)
    assert "holds 2768 tokens" in infeasible(small, "opt-66b-2xa100", sample)
    assert infeasible(large, "opt-66b-2xa100", sample) is None
    ranked = plan(long_prompts, 8, 10, "opt-66b-2xa100", exact=True, iterations=2, degrees=(1, 2))
    for r in ranked:
        assert (r["infeasible"] is not None) == (1 in (r["tp_prefill"], r["tp_decode"])), r
        assert r["infeasible"] is None or r["goodput_rps"] == 0
    assert ranked[0]["infeasible"] is None and (ranked[0]["tp_prefill"], ranked[0]["tp_decode"]) == (2, 2)


def test_distserve_s_chatbot_on_the_larger_models_has_its_artifact_s_objectives():
    """DistServe's artifact (01-run_abalation.sh) runs the chatbot on OPT-66B at 400/100 ms on 8
    GPUs and on OPT-175B at 4000/200 ms on 32: the same ShareGPT requests, on those models'
    profiles; a run without ``--app`` leaves them out (minutes a run)."""
    from experiments.pd_planner import DEFAULT_APPLICATIONS

    for name, (ttft, tpot), model in (("chatbot-66b", (0.4, 0.1), "opt-66b-2xa100"),
                                      ("chatbot-175b", (4.0, 0.2), "opt-175b-8xa100")):
        app = APPLICATIONS[name]
        assert (app.slo.ttft_s, app.slo.tpot_s) == pytest.approx((ttft, tpot)) and app.model == model
        assert app.pairs == APPLICATIONS["chatbot-distserve"].pairs
        assert name not in DEFAULT_APPLICATIONS
    assert set(DEFAULT_APPLICATIONS) < set(APPLICATIONS)


def test_chatbot_distserve_resamples_distserve_s_own_requests():
    """``chatbot-distserve``: every request is one of DistServe's published (prompt, output) pairs,
    the same ones at every rate of a seed, and the application describes them (mean, P99)."""
    app = APPLICATIONS["chatbot-distserve"]
    data = json.loads((Path(__file__).resolve().parents[1] / "experiments" / "data" /
                       "distserve_opt13b_vllm.json").read_text())
    measured = {(r["prompt_len"], r["output_len"]) for r in data["traces"]["vllm-300-3"]}
    assert set(app.pairs) == measured and len(app.pairs) == 300
    a = make_requests(app, 400, 2.0, seed=5)
    b = make_requests(app, 400, 8.0, seed=5)
    assert {(r.prompt_len, r.output_len) for r in a} <= measured
    assert len({(r.prompt_len, r.output_len) for r in a}) > 150  # resampled, not one pair repeated
    assert [(r.prompt_len, r.output_len) for r in a] == [(r.prompt_len, r.output_len) for r in b]
    assert [(r.prompt_len, r.output_len) for r in a] != [(r.prompt_len, r.output_len)
                                                          for r in make_requests(app, 400, 2.0, seed=6)]
    prompts = [p for p, _ in app.pairs]
    assert app.prompt[0] == pytest.approx(sum(prompts) / len(prompts))
    assert app.prompt[1] == pytest.approx(float(np.percentile(prompts, 99)))


def test_profile_check_replays_distserve_s_measured_runs(tmp_path):
    """``experiments/profile_check.py``: the measured side is the data's own (its medians), the
    simulated side a replay of the same requests on opt-13b-a100 (every request finished)."""
    from experiments import profile_check

    js = tmp_path / "pc.json"
    out = profile_check.main(["--smoke", "--no-progress", "--out", str(tmp_path / "out"), "--json", str(js)])
    assert json.loads(js.read_text()) == json.loads(json.dumps(out))
    (name,) = out["traces"]
    records = profile_check.load()["traces"][name]
    r = out["traces"][name]
    assert r["requests"] == len(records) == 100
    assert r["ttft_ms"]["measured_p50"] == pytest.approx(float(np.median([x["ttft_ms"] for x in records])))
    assert 0 < r["ttft_ms"]["simulated_p50"] < 10_000 and 0 < r["tpot_ms"]["simulated_p50"] < 1_000
    assert 0 <= r["attainment"]["measured"] <= 1 and 0 <= r["attainment"]["simulated"] <= 1
    assert sum(b["requests"] for b in r["ttft_by_prompt"]) == 100
    assert (tmp_path / "out" / "profile_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "out" / "profile_check.md").read_text()
    assert md.startswith("# ") and "|---|" in md
    ttft, tpot = profile_check.replay(records)
    assert all(t < float("inf") for t in ttft)  # every request of the trace finished in the replay
    assert sum(p is None for p in tpot) == sum(x["output_len"] == 1 for x in records)
    assert out["prefill_first"] == 1000  # vLLM 0.3's prompt-only steps; 0 replays on serial mixed steps
    serial, _ = profile_check.replay(records, prefill_first=0)
    assert np.median(ttft) < np.median(serial)  # a prompt no longer waits for a decode pass in its step
    with pytest.raises(SystemExit, match="prefill_first_steps"):
        profile_check.main(["--smoke", "--no-progress", "--prefill-first", "-1", "--out", str(tmp_path / "x")])


def test_profile_check_refuses_bad_lengths(tmp_path):
    from experiments import profile_check

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"source": {}, "traces": {"t": [{"prompt_len": 0, "output_len": 3, "issue_time": 0.0,
                                                              "ttft_ms": 1.0, "tpot_ms": 1.0}]}}))
    with pytest.raises(ValueError, match="bad lengths"):
        profile_check.load(bad)


def test_an_application_no_layout_can_hold_is_reported_and_the_run_goes_on(tmp_path):
    """4 GPUs of OPT-66B are two-GPU instances: summarization's longest prompts do not fit one,
    so it is reported as not run, code completion is served, and naming only summarization is
    an error."""
    js = tmp_path / "d.json"
    data = disaggregation.main(["--smoke", "--no-progress", "--app", "summarization", "--app", "code", "--no-shift",
                                "--out", str(tmp_path / "out"), "--json", str(js)])
    assert list(data["results"]) == ["code"]
    assert "summarization" in data["unservable"] and "holds 2768 tokens" in data["unservable"]["summarization"]
    assert "not run" in (tmp_path / "out" / "disaggregation.md").read_text()
    with pytest.raises(SystemExit, match="no application could be served"):
        disaggregation.main(["--smoke", "--no-progress", "--app", "summarization", "--no-shift",
                             "--out", str(tmp_path / "out2")])


# Long outputs and loose objectives: 40 requests fit in three A100s' pools at once, so a short run
# meets the objectives at rates no layout sustains (each request reads ~1.5M context tokens; an
# instance reads at most ~1M a second).
LONG_DECODE = Application("long-decode", SLO(5.0, 1.0), (1000.0, 1001.0), (1000.0, 1001.0))


def test_the_memory_cap_by_hand_and_a_plan_marks_goodput_above_it(capsys):
    from llumnix_py import planner
    from llumnix_py.engines.sim.profiles import OPT_13B_A100, with_tensor_parallel

    requests = make_requests(LONG_DECODE, 40, 1.0)
    reads = [(r.output_len - 1) * r.prompt_len + (r.output_len - 1) * r.output_len // 2 for r in requests]
    assert planner.decode_reads(requests) == reads
    one, two = OPT_13B_A100, with_tensor_parallel(OPT_13B_A100, 2)
    k1, k2 = one.num_blocks * one.block_size, two.num_blocks * two.block_size
    by_hand = (k1 / one.decode_step_floor_s(k1) + k2 / two.decode_step_floor_s(k2)) / (sum(reads) / len(reads))
    lay = Layout(2, (1, 1), tp=(1, 2))
    assert planner.memory_cap(lay, "opt-13b-a100", requests) == pytest.approx(by_hand, rel=1e-12)
    # a colocated layout counts every instance; a workload with no decode step has no cap
    assert planner.memory_cap(Layout(3, None), "opt-13b-a100", requests) == pytest.approx(
        3 * k1 / one.decode_step_floor_s(k1) / (sum(reads) / len(reads)), rel=1e-12)
    assert planner.memory_cap(lay, "opt-13b-a100", make_requests(PREFILL_HEAVY, 5, 1.0)[:0]) == float("inf")

    ranked = plan(LONG_DECODE, 3, 40, "opt-13b-a100", exact=True, iterations=4)
    for r in ranked:
        assert r["over_memory_cap"] == (r["goodput_rps"] > r["memory_cap_rps"])
        assert r["over_work_cap"] == (r["goodput_rps"] > r["work_cap_rps"])
        assert r["work_cap_rps"] <= r["memory_cap_rps"] and (r["over_work_cap"] or not r["over_memory_cap"])
    assert any(r["over_work_cap"] for r in ranked), ranked
    planner.print_plan("long decode", ranked)
    out = capsys.readouterr().out
    assert "above the layout's work cap" in out and " *" in out and "work" in out.split("┃")[8]


def test_the_work_cap_by_hand():
    import dataclasses

    from llumnix_py import planner
    from llumnix_py.engines.sim.profiles import OPT_13B_A100, with_tensor_parallel

    requests = make_requests(LONG_DECODE, 40, 1.0)
    reads = sum(planner.decode_reads(requests)) / len(requests)
    one, two = OPT_13B_A100, with_tensor_parallel(OPT_13B_A100, 2)
    w1 = sum(one.prefill_work_s(r.prompt_len) for r in requests) / len(requests)
    c1, c2 = one.decode_read_ceiling, two.decode_read_ceiling
    # colocated, serial steps: each of 3 instances spends r (w + R / c) <= 1 of a second
    assert planner.work_cap(Layout(3, None), "opt-13b-a100", requests) == pytest.approx(
        3 / (w1 + reads / c1), rel=1e-12)
    # P:D 1:1, TP1 prefill and TP2 decode: the prefill instance prefills and reads what is left,
    # the decode instance reads; and the prefill instance alone bounds the rate by its work
    lay = Layout(2, (1, 1), tp=(1, 2))
    both = (c1 + c2) / (reads + c1 * w1)
    assert planner.work_cap(lay, "opt-13b-a100", requests) == pytest.approx(min(1 / w1, both), rel=1e-12)
    heavy = make_requests(PREFILL_HEAVY, 40, 1.0)
    wh = sum(one.prefill_work_s(r.prompt_len) for r in heavy) / len(heavy)
    assert planner.work_cap(Layout(2, (1, 1)), "opt-13b-a100", heavy) == pytest.approx(1 / wh, rel=1e-12)
    # fused steps keep prefill and reads apart: the cap is the reads' or the work's alone
    fused = dataclasses.replace(one, fused_mixed_steps=True)
    assert planner.work_cap(Layout(3, None), fused, requests) == pytest.approx(
        min(3 / w1, 3 * c1 / reads), rel=1e-12)
    assert planner.work_cap(Layout(3, None), fused, requests) == pytest.approx(
        planner.memory_cap(Layout(3, None), fused, requests), rel=1e-12)
    # always at most the memory cap; nothing asked, no cap
    for lay in (Layout(3, None), Layout(2, (1, 1), tp=(1, 2)), Layout(3, (1, 2))):
        assert planner.work_cap(lay, "opt-13b-a100", requests) <= planner.memory_cap(lay, "opt-13b-a100", requests)
    assert planner.work_cap(lay, "opt-13b-a100", []) == float("inf")
