"""SLO attainment, goodput and SLO scale (``llumnix_py.slo``), and where they are reported:
the simulator's results, the server's Prometheus metrics and ``llumnix-py bench``."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from llumnix_py.bench import BenchConfig, run_sweep
from llumnix_py.cli import main
from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.server import ServerThread, create_app
from llumnix_py.server.metrics import Metrics
from llumnix_py.sim.cluster import SimCluster
from llumnix_py.sim.config import SimConfig
from llumnix_py.slo import SLO, attainment, goodput, max_rate, meets, slo_scale

# ----- the math -------------------------------------------------------------------------------


def test_meets_needs_both_objectives_and_judges_a_single_token_on_ttft():
    assert meets(0.1, 0.01, 0.1, 0.01)
    assert not meets(0.11, 0.01, 0.1, 0.01)
    assert not meets(0.1, 0.02, 0.1, 0.01)
    assert meets(0.1, None, 0.1, 1e-9)


def test_attainment_with_one_objective_for_all_or_one_per_request():
    ttfts, tpots = [0.1, 0.2, 0.3, 0.4], [0.01, None, 0.05, 0.01]
    assert attainment(ttfts, tpots, 0.25, 0.02) == 0.5
    assert attainment(ttfts, tpots, [0.1, 0.1, 0.3, 0.4], [0.01, 0.01, 0.05, 0.001]) == 0.5
    assert math.isnan(attainment([], [], 1.0, 1.0))
    with pytest.raises(ValueError, match="3 objectives for 4 requests"):
        attainment(ttfts, tpots, [1.0, 1.0, 1.0], 1.0)


def test_goodput_is_the_highest_rate_of_the_passing_prefix():
    assert goodput([1, 2, 3, 4], [1.0, 0.95, 0.9, 0.5]) == 3
    assert goodput([4, 1, 3, 2], [0.5, 1.0, 0.9, 0.95]) == 3  # any order
    assert goodput([1, 2, 3, 4], [1.0, 0.8, 0.95, 0.95]) == 1  # a lucky point past the knee does not count
    assert goodput([1, 2], [0.5, 1.0]) == 0.0
    assert goodput([1, 2], [1.0, math.nan]) == 1
    with pytest.raises(ValueError):
        goodput([], [])


@pytest.mark.parametrize("ttft,tpot", [(0, 1), (1, -1), (math.inf, 1), (1, math.nan), ("1", 1), (True, 1)])
def test_bad_objectives_are_errors(ttft, tpot):
    with pytest.raises(ValueError, match="positive"):
        SLO(ttft, tpot)
    with pytest.raises(ValueError, match="positive number of milliseconds"):
        SLO.from_ms(ttft, tpot)


lat = st.floats(min_value=1e-4, max_value=100.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(lat, st.one_of(st.none(), lat)), min_size=1, max_size=40), lat, lat,
       st.sampled_from([0.5, 0.9, 1.0]))
def test_slo_scale_is_the_tightest_scale_that_reaches_the_target(samples, ttft_slo, tpot_slo, target):
    ttfts = [t for t, _ in samples]
    tpots = [p for _, p in samples]
    s = slo_scale(ttfts, tpots, ttft_slo, tpot_slo, target)
    assert attainment(ttfts, tpots, s * ttft_slo * (1 + 1e-9), s * tpot_slo * (1 + 1e-9)) >= target
    tighter = s * (1 - 1e-6)
    assert attainment(ttfts, tpots, tighter * ttft_slo, tighter * tpot_slo) < target


# ----- the simulator ------------------------------------------------------------------------


def test_the_simulator_reports_attainment_and_scale_from_the_same_math():
    from experiments.workloads import WorkloadRequest

    work = [WorkloadRequest(0.1 * i, 200, 20) for i in range(30)]
    result = SimCluster(SimConfig(num_instances=2)).run(work, progress=False)
    ttfts, tpots = result.latencies()
    assert len(ttfts) == 30 and all(r.done for r in result.requests)
    slo = SLO(ttft_s=sorted(ttfts)[14], tpot_s=max(t for t in tpots if t is not None))
    assert result.slo_attainment(slo) == attainment(ttfts, tpots, slo.ttft_s, slo.tpot_s) >= 0.5
    assert result.slo_scale(slo) == slo_scale(ttfts, tpots, slo.ttft_s, slo.tpot_s)
    assert result.slo_attainment(SLO(1e-9, 1e-9)) == 0.0 and result.slo_attainment(SLO(1e9, 1e9)) == 1.0


# ----- the server's metrics -------------------------------------------------------------------


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict, family: str, name: str, **labels) -> float:
    values = [s.value for s in fams[family].samples if s.name == name and all(s.labels.get(k) == v
                                                                              for k, v in labels.items())]
    assert len(values) == 1, (family, name, labels)
    return values[0]


def test_metrics_judge_finished_requests_against_the_server_wide_objectives():
    m = Metrics(SLO.from_ms(100, 10))
    m.record_request("finished", 4, 8, ttft_s=0.05, tpot_s=0.005, e2e_s=0.1)
    m.record_request("finished", 4, 8, ttft_s=0.5, tpot_s=0.005, e2e_s=0.6)
    m.record_request("finished", 4, 1, ttft_s=0.05, tpot_s=None, e2e_s=0.05)
    m.record_request("aborted", 4, 2, ttft_s=0.01, tpot_s=0.001, e2e_s=0.02)  # not judged
    fams = families(m.scrape(None).decode())
    assert sample(fams, "llumnix_latency_slo_attainment", "llumnix_latency_slo_attainment") == pytest.approx(2 / 3)
    assert sample(fams, "llumnix_latency_slo_requests", "llumnix_latency_slo_requests_total", met="true") == 2
    assert sample(fams, "llumnix_latency_slo_requests", "llumnix_latency_slo_requests_total", met="false") == 1
    assert sample(fams, "llumnix_latency_slo_objective_seconds", "llumnix_latency_slo_objective_seconds", objective="ttft") == 0.1
    assert "llumnix_latency_slo_attainment" not in families(Metrics().scrape(None).decode())


@pytest.fixture(scope="module")
def cluster():
    c = Cluster.start(ClusterConfig(num_instances=2, runtime="local",
                                    engine=EngineSpec(engine=EngineConfig(num_blocks=128))))
    yield c
    c.stop()


@pytest.mark.parametrize("slo,expected", [(SLO.from_ms(1e9, 1e9), 1.0), (SLO.from_ms(1e-6, 1e-6), 0.0)])
def test_the_server_exports_slo_attainment(cluster, slo, expected):
    """Objectives no request can miss (1e9 ms) or meet (1 ns): attainment 1 and 0."""
    srv = ServerThread(create_app(cluster, slo=slo)).start()
    try:
        for _ in range(2):
            r = httpx.post(srv.url + "/v1/completions", json={"model": "llumnix-tiny", "prompt": "slo", "max_tokens": 4,
                                                              "ignore_eos": True}, timeout=60)
            assert r.status_code == 200
        fams = families(httpx.get(srv.url + "/metrics").text)
    finally:
        srv.stop()
    assert sample(fams, "llumnix_latency_slo_attainment", "llumnix_latency_slo_attainment") == expected
    assert sample(fams, "llumnix_latency_slo_requests", "llumnix_latency_slo_requests_total", met="true") == 2 * expected


def test_bench_sweep_reports_goodput_per_instance(cluster):
    srv = ServerThread(create_app(cluster)).start()
    try:
        cfg = BenchConfig(url=srv.url, num_requests=3, prompt_len="8", output_len="3", slo_ttft_ms=1e9,
                          slo_tpot_ms=1e9)
        sweep = asyncio.run(run_sweep(cfg, [50.0, 25.0], progress=False))
    finally:
        srv.stop()
    assert sweep["rates"] == [25.0, 50.0] and sweep["attainment"] == [1.0, 1.0]
    assert sweep["goodput_rps"] == 50.0
    assert sweep["instances"] == 2 and sweep["goodput_per_instance_rps"] == 25.0
    assert all(s["slo_scale"] > 0 and s["succeeded"] == 3 for s in sweep["summaries"])


@pytest.mark.parametrize("flags,message", [(["--slo-ttft-ms", "100"], "give both"),
                                           (["--slo-ttft-ms", "-1", "--slo-tpot-ms", "10"], "TTFT objective"),
                                           (["--slo-ttft-ms", "100", "--slo-tpot-ms", "0"], "TPOT objective")])
def test_bad_server_objectives_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--runtime", "local", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_max_rate_bisects_to_the_knee_of_a_monotone_attainment():
    knee = 3.7
    calls = []

    def att(rate):
        calls.append(rate)
        return 1.0 if rate <= knee else 0.5

    got = max_rate(att, 0.5, 10.0, iterations=12)
    assert knee - 9.5 / 2 ** 12 <= got <= knee
    assert len(calls) == 14
    assert max_rate(lambda r: 0.0, 1.0, 2.0) == 0.0
    assert max_rate(lambda r: 1.0, 1.0, 2.0) == 2.0
    with pytest.raises(ValueError):
        max_rate(att, 2.0, 1.0)


def test_max_rate_grows_its_range_while_the_top_still_meets():
    knee = 37.0

    def att(rate):
        return 1.0 if rate <= knee else 0.5

    assert max_rate(att, 1.0, 10.0) == 10.0  # without growing, the top is all it can say
    got = max_rate(att, 1.0, 10.0, grow=3, iterations=10)  # [10, 20], [20, 40]: the knee is in there
    assert knee - 20 / 2 ** 10 <= got <= knee
    assert max_rate(att, 1.0, 2.0, grow=2) == 8.0  # still met at the last top: a bound, not a knee
    with pytest.raises(ValueError, match="grow"):
        max_rate(att, 1.0, 2.0, grow=-1)
