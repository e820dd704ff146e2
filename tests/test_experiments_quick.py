"""Each experiment script runs end to end (``--smoke``) and writes its PNG, Markdown and JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments import autoscaling, churn, common, fairness, fragmentation, priorities, scheduler_overhead, serving
from experiments.workloads import make_workload

LATENCY = {"prefill_mean", "prefill_p99", "decode_mean", "decode_p99", "e2e_mean", "e2e_p99"}


def _run(module, tmp_path, name: str) -> dict:
    out = tmp_path / name
    js = tmp_path / f"{name}.json"
    returned = module.main(["--smoke", "--no-progress", "--out", str(out), "--json", str(js)])
    pngs = sorted(out.glob("*.png"))
    assert pngs, f"{name} wrote no plot"
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / f"{name}.md").read_text()
    assert md.startswith("# ") and "|---|" in md
    data = json.loads(js.read_text())
    assert data == json.loads(json.dumps(returned))
    assert data
    return data


def test_serving(tmp_path):
    data = _run(serving, tmp_path, "serving")
    points = [p for by_rate in data["fixed_rate"].values() for p in by_rate.values()]
    assert points
    for by_system in points:
        assert set(by_system) == {"round_robin", "infaas++", "llumnix"}
        for s in by_system.values():
            assert LATENCY | {"preemption_loss", "migrations", "wall_s"} | set(serving.CHURN_KEYS) <= set(s)
            assert s["prefill_p99"] >= s["prefill_mean"] >= 0
    # Capacity: per trace, system and objective, with every seed's value inside the spread.
    cap = data["capacity"]["L-L"]
    assert set(cap) == {"round_robin", "infaas++", "llumnix"}
    for by_obj in cap.values():
        assert set(by_obj) == {"2", "5", "10"}
        for entry in by_obj.values():
            assert entry["n"] == 2 and len(entry["per_seed"]) == 2
            assert entry["min"] <= entry["median"] <= entry["max"]
            assert all(entry["min"] <= v <= entry["max"] for v in entry["per_seed"].values())
    assert set(data["capacity_gain"]["L-L"]["llumnix"]) == {"round_robin", "infaas++"}
    # each capacity as a share of the work cap of its seed's requests (the rate no scheduler sustains)
    from experiments.workloads import make_workload
    from llumnix_py import planner

    caps = data["work_cap"]["L-L"]
    n, inst = max(data["setup"]["lengths"]), data["setup"]["instances"]
    for seed, c in caps.items():
        assert c == pytest.approx(planner.work_cap(planner.Layout(inst, None), "llama-7b-a10",
                                                   make_workload("L-L", n, 1.0, seed=int(seed))))
    shares = data["capacity_share"]["L-L"]
    assert set(shares) == set(cap)
    for system, by_obj in shares.items():
        for obj, entry in by_obj.items():
            expected = sorted(v / caps[s] for s, v in cap[system][obj]["per_seed"].items())
            assert [entry["min"], entry["max"]] == pytest.approx([expected[0], expected[-1]])
    knee = data["knee"]["points"]["L-L"]["llumnix"]
    assert len(knee) == 2  # two rates
    for by_seed in knee.values():
        assert len(by_seed) == 2 and all(set(by_len) == {"20", "40"} for by_len in by_seed.values())
    window = data["knee"]["analysis"]["L-L"]["largest_ratio"]["llumnix"]["infaas++"]
    assert {"rate", "ratio", "base_overloaded", "ours_overloaded"} <= set(window)
    md = (tmp_path / "serving" / "serving.md").read_text()
    assert "Capacity" in md and "a point in the window" in md and "work cap" in md
    assert (tmp_path / "serving" / "serving_capacity.png").exists()


def test_serving_rate_scale_and_systems(tmp_path):
    js = tmp_path / "scaled.json"
    data = serving.main(["--smoke", "--no-progress", "--out", str(tmp_path / "scaled"), "--json", str(js),
                         "--rate-scale", "1,2", "--systems", "infaas++,llumnix+load-dispatch", "--no-knee"])
    assert set(data) == {"fixed_rate"}
    data = data["fixed_rate"]
    assert list(data) == ["L-L"]
    assert sorted(data["L-L"], key=float) == ["0.6", "1.2"]  # the smoke rate, and twice it
    for by_system in data["L-L"].values():
        assert set(by_system) == {"infaas++", "llumnix+load-dispatch"}
    assert by_system["infaas++"]["migrations"] == 0  # no migration without Llumnix
    md = (tmp_path / "scaled" / "serving.md").read_text()
    assert "llumnix+load-dispatch" in md


@pytest.mark.parametrize("flag,value", [("--rate-scale", "0"), ("--rate-scale", "x"), ("--systems", "nope"),
                                        ("--knee-factors", "-1"), ("--objectives", "x"), ("--lengths", "0"),
                                        ("--traces", "L-L,nope")])
def test_serving_rejects_bad_sweep_options(tmp_path, flag, value):
    with pytest.raises(SystemExit, match=flag):
        serving.main(["--smoke", "--no-progress", "--out", str(tmp_path), flag, value])


def test_priorities(tmp_path):
    data = _run(priorities, tmp_path, "priorities")
    for by_system in data.values():
        assert set(by_system) == {"llumnix", "llumnix+priority"}
        for by_class in by_system.values():
            assert set(by_class) == {"high", "normal"}
            assert all(LATENCY <= set(s) for s in by_class.values())


def test_autoscaling(tmp_path):
    data = _run(autoscaling, tmp_path, "autoscaling")
    assert set(data) == {"poisson", "gamma", "threshold", "equal_p99"}
    assert data["poisson"] and data["threshold"]
    assert isinstance(data["equal_p99"], list)
    for part in (data["poisson"], data["gamma"], data["threshold"]):
        for by_system in part.values():
            assert set(by_system) == {"infaas++", "llumnix"}
            assert all({"prefill_p99", "avg_instances"} <= set(s) for s in by_system.values())
            assert all(1 <= s["avg_instances"] <= 16 for s in by_system.values())


def test_fragmentation(tmp_path):
    data = _run(fragmentation, tmp_path, "fragmentation")
    assert set(data) == {"infaas++", "llumnix"}
    for r in data.values():
        assert len(r["times"]) == len(r["fragmentation"]) > 0
        assert 0 <= r["fragmentation_mean"] <= 1


@pytest.mark.parametrize("module,name", [(scheduler_overhead, "scheduler_overhead")])
def test_scheduler_overhead(tmp_path, module, name):
    data = _run(module, tmp_path, name)
    for v in data.values():
        assert v["rounds"] > 0 and v["dispatches"] > 0
        assert v["migration_round_mean_ms"] > 0


def test_cost_curve_keeps_the_cheapest_point_for_each_p99():
    # (p99, instances): the 9-instance point at P99 20 is beaten by 7 instances at P99 10.
    curve = autoscaling.cost_curve([(20.0, 9.0), (10.0, 7.0), (40.0, 5.0), (5.0, 8.0), (float("inf"), 1.0)])
    assert curve == [(5.0, 8.0), (10.0, 7.0), (40.0, 5.0)]


def test_cost_at_interpolates_in_log_p99_and_never_extrapolates():
    curve = [(1.0, 10.0), (100.0, 4.0)]
    assert autoscaling.cost_at(curve, 10.0) == pytest.approx((10.0, 7.0))  # halfway in log space
    assert autoscaling.cost_at(curve, 1.0) == (1.0, 10.0) and autoscaling.cost_at(curve, 100.0) == (100.0, 4.0)
    assert autoscaling.cost_at(curve, 0.5) is None  # nothing on the curve is that good
    assert autoscaling.cost_at(curve, 200.0) == (100.0, 4.0)  # beyond: the cheapest point, at a better P99
    assert autoscaling.cost_at([(3.0, 6.0)], 3.0) == (3.0, 6.0)


def test_equal_p99_costs_reads_llumnix_cost_at_each_infaas_p99():
    def point(i_p99, i_cost, l_p99, l_cost):
        return {"infaas++": {"prefill_p99": i_p99, "avg_instances": i_cost},
                "llumnix": {"prefill_p99": l_p99, "avg_instances": l_cost}}
    threshold = {"5": point(2.0, 10.0, 1.0, 8.0), "20": point(8.0, 8.0, 4.0, 6.0), "40": point(50.0, 6.0, 16.0, 4.0),
                 "60": point(0.5, 12.0, 1.5, 9.0)}
    rows = autoscaling.equal_p99_costs(threshold)
    # INFaaS++'s P99 0.5 is better than anything Llumnix reached: no row. 2 and 8 interpolate; 50 is beyond
    # Llumnix's worst P99 (16), so it gets Llumnix's cheapest point, at that better P99.
    assert [r["p99"] for r in rows] == [2.0, 8.0, 50.0]
    assert rows[0]["llumnix_instances"] == pytest.approx(7.0) and rows[0]["saving"] == pytest.approx(0.3)
    assert rows[1]["llumnix_instances"] == pytest.approx(5.0) and rows[1]["saving"] == pytest.approx(0.375)
    assert rows[2]["llumnix_p99"] == 16.0 and rows[2]["llumnix_instances"] == 4.0
    assert rows[2]["saving"] == pytest.approx(1 - 4.0 / 6.0)


def test_churn(tmp_path):
    data = _run(churn, tmp_path, "churn")
    med = data["median"]["0.9"]
    assert set(med) == {"default", "cooldown-10", "infaas++"}
    for m in med.values():
        assert set(churn.KEYS) <= set(m) and m["prefill_p99"] >= m["prefill_mean"] >= 0
        assert 0 <= m["migration_return_rate"] <= 1 and 0 <= m["payoff_relieved"] <= 1
        assert 0 <= m["over_5s"] <= m["over_2s"] <= 1
    assert med["infaas++"]["migrations"] == 0


def test_churn_over_objective_counts_unserved_requests_as_late():
    assert churn.over_objective([0.5, 2.5, 6.0, float("inf")], 2.0) == 0.75
    assert churn.over_objective([0.5, 2.5, 6.0, float("inf")], 5.0) == 0.5
    assert churn.over_objective([1.0, 2.0], 2.0) == 0.0  # at the objective meets it
    assert churn.over_objective([], 5.0) == 0.0


def test_churn_dispatch_and_migration_ablations_differ_only_where_named(tmp_path):
    data = churn.main(["--smoke", "--no-progress", "--out", str(tmp_path),
                       "--rates", "1.2", "--requests", "200", "--variants", "default,no-migration,load-dispatch"])
    runs = data["runs"]["1.2"]
    assert runs["default"]["0"]["migrations"] > 0 and runs["load-dispatch"]["0"]["migrations"] > 0
    assert runs["no-migration"]["0"]["migrations"] == 0  # Llumnix's dispatch, no migration rounds
    policy, migrate = common.system_config(churn.VARIANTS["no-migration"][0])
    assert (policy.dispatch, migrate) == ("freeness", False)
    policy, migrate = common.system_config(churn.VARIANTS["load-dispatch"][0])
    assert (policy.dispatch, migrate) == ("load", True)


@pytest.mark.parametrize("name", sorted(churn.VARIANTS))
def test_churn_variant_names_say_what_they_set(name):
    """``reserve-N`` / ``cooldown-N`` / ``threshold-N`` / ``@kv-xF`` in a variant's name is the value it runs with."""
    from llumnix_py.engines.sim.profiles import LLAMA_7B_A10

    system, policy_kw, _ = churn.VARIANTS[name]
    policy, _ = common.system_config(system, **policy_kw)
    named = dict(part.lstrip("@").rsplit("-", 1) for part in name.replace("@", "+@").split("+")
                 if part[-1:].isdigit() and "-" in part)
    expect = {"reserve": policy.migrate_in_threshold, "cooldown": policy.migration_cooldown_s,
              "threshold": policy.migrate_out_threshold, "interval": None, "poll": None, "copy": None,
              "kv": common.SYSTEM_SIM.get(system, {}).get("num_blocks")}
    for knob, value in named.items():
        if knob == "kv":
            assert expect["kv"] == round(LLAMA_7B_A10.num_blocks * float(value.removeprefix("x"))), name
        elif expect[knob] is not None:
            assert expect[knob] == float(value), (name, knob)
    if "reserve" not in named:
        assert policy.migrate_in_threshold is None  # the paper's single threshold


@pytest.mark.parametrize("base", ["round_robin", "infaas++", "llumnix"])
def test_prompts_first_systems_change_only_the_engines_step_order(base):
    """``S@prompts-first`` is ``S`` on engines that run a prompt-only step whenever a waiting
    prompt can be admitted (vLLM <= 0.3): same policy and migration, the engine setting added,
    and prompts no longer wait for a decode pass (lower mean prefill latency, same requests)."""
    name = f"{base}@prompts-first"
    assert common.SYSTEMS[name] == common.SYSTEMS[base]
    assert common.system_config(name) == common.system_config(base)
    assert common.SYSTEM_SIM[name] == {"engine_prefill_first_steps": common.VLLM_PREFILL_FIRST}
    workload = make_workload("M-M", 120, 2.0, seed=0)
    serial, first = (common.simulate(workload, s, 4, seed=0).summary() for s in (base, name))
    assert serial["completed"] == first["completed"] == 120
    assert first["prefill_mean"] < serial["prefill_mean"]


def test_churn_fast_copy_variant_changes_only_the_migration_link():
    from llumnix_py.engines.sim.profiles import LLAMA_7B_A10

    _, _, sim_kw = churn.VARIANTS["copy-x100"]
    fast = sim_kw["profile"]
    assert dataclasses.replace(fast, hw=LLAMA_7B_A10.hw) == LLAMA_7B_A10
    base = LLAMA_7B_A10.migration_time(64) - LLAMA_7B_A10.hw.link_latency_s
    assert fast.migration_time(64) - fast.hw.link_latency_s == pytest.approx(base / 100)


@pytest.mark.parametrize("system", ["llumnix+reserve-20", "llumnix+reserve-20+cooldown-30", "llumnix+cooldown-30",
                                    "llumnix+heads-first"])
def test_llumnix_system_variants_keep_the_papers_dispatch_and_migration(system):
    policy, migrate = common.system_config(system)
    base, base_migrate = common.system_config("llumnix")
    assert (policy.dispatch, migrate) == (base.dispatch, base_migrate)
    assert policy.blocked_heads_first == ("heads-first" in system)
    assert policy.migrate_in_threshold == (20.0 if "reserve-20" in system else None)
    assert policy.migration_cooldown_s == (30.0 if "cooldown-30" in system else base.migration_cooldown_s)


def test_the_prefill_queue_system_changes_only_llumnixs_dispatch():
    policy, migrate = common.system_config("llumnix+prefill-queue")
    base, base_migrate = common.system_config("llumnix")
    assert policy.dispatch == "prefill_queue" and base.dispatch == "freeness"
    assert dataclasses.replace(policy, dispatch="freeness") == base and migrate == base_migrate


@pytest.mark.parametrize("system, factor", [("infaas++@kv-x1.1", 1.1), ("infaas++@kv-x1.25", 1.25)])
def test_memory_references_are_infaas_with_only_more_kv_blocks(system, factor, monkeypatch):
    from llumnix_py.engines.sim.profiles import LLAMA_7B_A10

    assert common.system_config(system) == common.system_config("infaas++")
    seen = {}

    class Spy:
        def __init__(self, cfg):
            seen["cfg"] = cfg

        def run(self, workload, progress=False):
            return "ran"

    monkeypatch.setattr(common, "SimCluster", Spy)
    assert common.simulate([], system, 4) == "ran"
    ref = seen["cfg"]
    assert ref.num_blocks == round(LLAMA_7B_A10.num_blocks * factor)
    assert ref.engine_config().num_blocks == ref.num_blocks
    common.simulate([], "infaas++", 4)
    assert dataclasses.replace(ref, num_blocks=None) == seen["cfg"]  # nothing else differs
    common.simulate([], system, 4, num_blocks=7)
    assert seen["cfg"].num_blocks == 7  # a caller's own setting wins


def test_churn_payoff_shares_on_hand_made_records():
    def rec(src_before, src_after, dst_after, finished=True):
        return {"finished": finished, "src_freeness_before": src_before, "src_freeness_after": src_after,
                "dst_freeness_after": dst_after}

    shares = churn.payoff_shares([rec(1.0, 5.0, 9.0), rec(1.0, 12.0, 4.0), rec(2.0, 1.0, 3.0),
                                  rec(0.0, 9.0, 1.0, finished=False), rec(None, 1.0, 1.0)])
    assert shares == {"relieved": 2 / 3, "overshot": 1 / 3, "judged": 3}
    assert churn.payoff_shares([]) == {"relieved": 0.0, "overshot": 0.0, "judged": 0}


def test_churn_tabulates_variants_run_apart_together(tmp_path):
    common_args = ["--smoke", "--no-progress", "--rates", "1.2", "--requests", "120"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    part_a = churn.main(common_args + ["--out", str(tmp_path / "a"), "--json", str(a), "--variants", "default"])
    part_b = churn.main(common_args + ["--out", str(tmp_path / "b"), "--json", str(b),
                                       "--variants", "reserve-20,infaas++"])
    merged = churn.main(["--no-progress", "--out", str(tmp_path / "m"), "--from-json", f"{a},{b}"])
    assert merged["setup"]["variants"] == ["default", "reserve-20", "infaas++"]
    assert list(merged["median"]["1.2"]) == merged["setup"]["variants"]  # rows in the order run
    assert merged["median"]["1.2"]["default"] == part_a["median"]["1.2"]["default"]
    assert merged["median"]["1.2"]["infaas++"] == part_b["median"]["1.2"]["infaas++"]
    assert (tmp_path / "m" / "churn.png").exists()
    # Another trace, or the same run with other figures, is refused rather than mixed in.
    other = json.loads(a.read_text())
    other["setup"]["trace"] = "S-S"
    (tmp_path / "c.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="S-S"):
        churn.main(["--no-progress", "--out", str(tmp_path / "x"), "--from-json", f"{a},{tmp_path / 'c.json'}"])
    forged = json.loads(a.read_text())
    forged["runs"]["1.2"]["default"]["0"]["migrations"] += 1
    (tmp_path / "d.json").write_text(json.dumps(forged))
    with pytest.raises(SystemExit, match="differs"):
        churn.main(["--no-progress", "--out", str(tmp_path / "x"), "--from-json", f"{a},{tmp_path / 'd.json'}"])
    (tmp_path / "e.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a churn.py"):
        churn.main(["--no-progress", "--out", str(tmp_path / "x"), "--from-json", str(tmp_path / "e.json")])


@pytest.mark.parametrize("flag,value", [("--rates", "0"), ("--variants", "nope"), ("--seeds", "0")])
def test_churn_rejects_bad_options(tmp_path, flag, value):
    with pytest.raises(SystemExit, match=flag):
        churn.main(["--smoke", "--no-progress", "--out", str(tmp_path), flag, value])


def test_serving_analyses_saved_knee_sweeps_together(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for system, js in (("infaas++", a), ("llumnix+cooldown-10", b)):
        serving.main(["--smoke", "--no-progress", "--no-fixed", "--out", str(tmp_path / system), "--json", str(js),
                      "--systems", system])
    merged = serving.main(["--smoke", "--no-progress", "--out", str(tmp_path / "merged"),
                           "--from-json", f"{a},{b}"])
    assert set(merged["capacity"]["L-L"]) == {"infaas++", "llumnix+cooldown-10"}
    single = json.loads(a.read_text())
    assert merged["capacity"]["L-L"]["infaas++"] == single["capacity"]["L-L"]["infaas++"]
    assert "fixed_rate" not in merged


def test_fairness(tmp_path):
    data = _run(fairness, tmp_path, "fairness")
    systems = data["systems"]
    assert set(systems) == set(fairness.SYSTEMS)
    for name, s in systems.items():
        assert s["requests"] == data["turns"] or s["requests"] > 0
        assert s["ttft_p99"] >= s["ttft_p95"] >= 0 and s["tbt_p99"] >= s["tbt_p95"] >= 0
    assert systems["recompute"]["copies"] == 0 and systems["recompute"]["preemptions"] > 0
    assert systems["vllm-swap"]["copies"] > 0, "the smoke run never swapped; shrink it"
    # Stalls: every synchronous swap stalls its step; recompute copies nothing, so never stalls.
    assert systems["recompute"]["stall_s"] == 0 and systems["recompute"]["busy_s"] > 0
    assert 0 < systems["vllm-swap"]["stall_share"] < 1
    assert all(s["stall_s"] <= s["busy_s"] for s in systems.values())
    assert systems["llumnix-py"]["reused_tokens"] > 0 and systems["-reuse"]["reused_tokens"] == 0
    for name in ("llumnix-py", "-groups"):
        sizes = systems[name]["group_sizes"]
        assert sizes and systems[name]["group_size_mean"] >= 1
    assert systems["llumnix-py"]["group_size_mean"] > systems["-groups"]["group_size_mean"]
    # The cluster rows replay every turn in the closed loop (a turn only after its predecessor
    # finished), swap to the host pool, reuse turns across dispatch, and only one row migrates.
    for name in ("cluster", "cluster+migration"):
        assert systems[name]["requests"] == systems["llumnix-py"]["requests"]
        assert systems[name]["copies"] > 0 and systems[name]["reused_tokens"] > 0
    assert systems["cluster"]["migrations"] == 0 and systems["cluster+migration"]["migrations"] > 0
    assert all(s["migrations"] == 0 for n, s in systems.items() if not n.startswith("cluster"))
    # global fairness rows replay every turn too; the cluster-wide gap is measured on every row
    for name in ("cluster+global", "cluster+migration+global"):
        assert systems[name]["requests"] == systems["llumnix-py"]["requests"]
    assert systems["cluster+global"]["migrations"] == 0
    # fair dispatch sends some under-served clients' turns to the freest instance, and only its rows do
    assert systems["cluster+global+steer"]["steered"] > 0
    assert all(s["steered"] == 0 for n, s in systems.items() if not n.endswith("+steer"))
    assert all(s["cluster_gap"] > 0 for s in systems.values())
