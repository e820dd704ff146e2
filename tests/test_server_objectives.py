"""Objectives over the OpenAI API: the extension fields (sent by the official client in
``extra_body``), their validation (400), the server-wide default, and the goodput metrics."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec
from llumnix_py.engines.types import Objective
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.server import ServerThread, create_app

MODEL = "llumnix-tiny"
WEEK_MS = 7 * 24 * 3600 * 1000.0


@pytest.fixture(scope="module")
def cluster():
    c = Cluster.start(ClusterConfig(num_instances=1, runtime="local",
                                    engine=EngineSpec(engine=EngineConfig(num_blocks=64)), model_name=MODEL))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def server(cluster):
    srv = ServerThread(create_app(cluster, default_objective=Objective(deadline_ms=WEEK_MS))).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def samples(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def slo(server, name: str, **labels) -> float:
    return samples(server).get((name, tuple(sorted(labels.items()))), 0.0)


def test_openai_client_sends_objectives_and_goodput_is_exported(client, server):
    before_met = slo(server, "llumnix_slo_requests_total", kind="stream", met="true")
    before_missed = slo(server, "llumnix_slo_requests_total", kind="stream", met="false")
    before_tokens = slo(server, "llumnix_goodput_tokens_total", kind="stream")
    met = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True, "ttft_ms": WEEK_MS, "tbt_ms": 1000.0})
    assert met.usage.completion_tokens == 3
    # a microsecond to the first token cannot be met by any machine: a miss, counted with no goodput
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                   extra_body={"ignore_eos": True, "ttft_ms": 0.001, "tbt_ms": 0.001})
    assert slo(server, "llumnix_slo_requests_total", kind="stream", met="true") == before_met + 1
    assert slo(server, "llumnix_slo_requests_total", kind="stream", met="false") == before_missed + 1
    assert slo(server, "llumnix_goodput_tokens_total", kind="stream") == before_tokens + 3
    att = slo(server, "llumnix_slo_attainment", kind="stream")
    assert 0 < att < 1
    assert slo(server, "llumnix_slo_margin_seconds_count", kind="stream") >= 2


def test_job_calls_and_the_default_objective(client, server):
    before_job = slo(server, "llumnix_goodput_requests_total", kind="job")
    before_default = slo(server, "llumnix_goodput_requests_total", kind="deadline")
    client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2, temperature=0,
                              extra_body={"job_id": "agent-7", "job_deadline_ms": WEEK_MS, "job_calls_left": 3})
    client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2, temperature=0)  # the server's default
    assert slo(server, "llumnix_goodput_requests_total", kind="job") == before_job + 1
    assert slo(server, "llumnix_goodput_requests_total", kind="deadline") == before_default + 1


def test_objective_reaches_the_engine(cluster, client, monkeypatch):
    engine = cluster.control.instance(cluster.instance_ids()[0]).llumlet.engine
    seen = []
    add = engine.add_request

    def spy(request):
        seen.append(request.objective)
        add(request)

    monkeypatch.setattr(engine, "add_request", spy)
    client.completions.create(model=MODEL, prompt=[9, 9, 9], max_tokens=2, temperature=0,
                              extra_body={"deadline_ms": 4321.0})
    assert seen == [Objective(deadline_ms=4321.0)]


BAD = [
    ({"ttft_ms": 100}, "ttft_ms"),
    ({"tbt_ms": 10}, "tbt_ms"),
    ({"ttft_ms": -1, "tbt_ms": 10}, "ttft_ms"),
    ({"ttft_ms": 0, "tbt_ms": 10}, "ttft_ms"),
    ({"ttft_ms": "100", "tbt_ms": 10}, "ttft_ms"),
    ({"deadline_ms": 0}, "deadline_ms"),
    ({"deadline_ms": -5}, "deadline_ms"),
    ({"deadline_ms": True}, "deadline_ms"),
    ({"deadline_ms": 1e15}, "deadline_ms"),
    ({"deadline_ms": 100, "ttft_ms": 10, "tbt_ms": 1}, None),
    ({"job_id": "j"}, "job_id"),
    ({"job_id": "", "job_deadline_ms": 5}, "job_id"),
    ({"job_id": 5, "job_deadline_ms": 5}, "job_id"),
    ({"job_id": "j" * 200, "job_deadline_ms": 5}, "job_id"),
    ({"job_deadline_ms": 5}, "job_deadline_ms"),
    ({"job_id": "j", "job_deadline_ms": -1}, "job_deadline_ms"),
    ({"job_id": "j", "job_deadline_ms": 5, "job_calls_left": 0}, "job_calls_left"),
    ({"job_id": "j", "job_deadline_ms": 5, "job_calls_left": 2.5}, "job_calls_left"),
    ({"job_id": "j", "job_deadline_ms": 5, "deadline_ms": 9}, None),
    ({"conversation_id": "job:j"}, "conversation_id"),  # the job key prefix is reserved
    ({"conversation_id": "job:k", "job_id": "j", "job_deadline_ms": 5}, "conversation_id"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("fields,param", BAD)
def test_bad_objective_fields_get_a_400(server, path, fields, param):
    body = {"model": MODEL, "max_tokens": 2, **fields}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert param in (err.get("param") or "") + err["message"]


@pytest.mark.parametrize("flags", [["--default-ttft-ms", "5"], ["--default-deadline-ms", "-1"],
                                   ["--default-deadline-ms", "5", "--default-tbt-ms", "1", "--default-ttft-ms", "1"]])
def test_a_bad_default_objective_is_a_usage_error_before_anything_starts(flags, capsys):
    from llumnix_py.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "--runtime", "local", *flags])
    assert info.value.code == 2 and "default objective" in capsys.readouterr().err


def test_default_objective_from_flags():
    from llumnix_py.cli import build_parser, default_objective

    args = build_parser().parse_args(["serve", "--default-ttft-ms", "300", "--default-tbt-ms", "40"])
    assert default_objective(args) == Objective(ttft_ms=300, tbt_ms=40)
    assert default_objective(build_parser().parse_args(["serve"])) is None
