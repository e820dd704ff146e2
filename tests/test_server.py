"""The OpenAI-compatible server against a real in-process cluster and a real uvicorn socket."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec
from llumnix_py.engines.types import SamplingParams
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.frontend.handles import NoInstanceError
from llumnix_py.server import ServerThread, create_app
from tests.cluster_helpers import HoldOutputs, wait_for

MODEL = "llumnix-tiny"
API_KEY = "sk-test-key"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster.start(ClusterConfig(num_instances=2, runtime="local",
                                    engine=EngineSpec(engine=EngineConfig(num_blocks=128)), model_name=MODEL))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def server(cluster):
    srv = ServerThread(create_app(cluster)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def wait_idle(cluster: Cluster, timeout: float = 60.0) -> None:
    """Every instance has no used KV block and the frontend tracks no request (``timeout``
    bounds a condition that never comes; it is no pause)."""
    deadline = time.monotonic() + timeout
    while True:
        loads = {iid: cluster.control.instance(iid).load().used_blocks for iid in cluster.instance_ids()}
        active = cluster.active_requests()
        if not active and loads and all(v == 0 for v in loads.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"cluster not idle: used blocks {loads}, active {active}")
        time.sleep(0.02)


def reference(cluster: Cluster, prompt_ids: list[int], max_tokens: int, ignore_eos: bool = True) -> list[int]:
    """Greedy output of the library API, not through HTTP."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    return cluster.submit(prompt_ids, sp).result(timeout=30)


def sse_events(lines) -> list[dict]:
    events = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            events.append({"done": True})
        else:
            events.append(json.loads(data))
    return events


# ----- basics --------------------------------------------------------------------------------


def test_health_models_and_state(server, client, cluster):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["instances"] == 2
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == min(cluster.max_model_len, 127 * 16)
    state = httpx.get(server.url + "/v1/cluster/state").json()
    assert len(state["instances"]) == 2 and "migrations" in state


def test_completion_greedy_matches_library(client, cluster):
    prompt = "The quick brown fox"
    ids = cluster.tokenizer.encode(prompt)
    ref = reference(cluster, ids, 24)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = out.choices[0]
    assert choice.model_extra["token_ids"] == ref
    assert choice.text == cluster.tokenizer.decode(ref)
    assert choice.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (len(ids), 24, len(ids) + 24)
    # the same prompt as token ids, and as a one-element list
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == choice.text
    nested = client.completions.create(model=MODEL, prompt=[prompt], max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert nested.choices[0].text == choice.text
    wait_idle(cluster)


def test_completion_stream_with_usage(client, cluster):
    prompt = "Streaming, byte by byte"
    ids = cluster.tokenizer.encode(prompt)
    ref = reference(cluster, ids, 30)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = list(stream)
    assert chunks, "no chunks"
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    token_ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra.get("token_ids") or [])]
    assert token_ids == ref
    assert text == cluster.tokenizer.decode(ref)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 30
    assert chunks[-1].usage.prompt_tokens == len(ids)
    wait_idle(cluster)


def test_chat_completions_stream_and_not(client, cluster):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = cluster.tokenizer.encode(cluster.tokenizer.apply_chat_template(messages))
    ref = reference(cluster, ids, 20)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == cluster.tokenizer.decode(ref)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 20
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.total_tokens == len(ids) + 20
    wait_idle(cluster)


def test_chat_content_parts_priority_and_extras(server, cluster):
    url = server.url + "/v1/chat/completions"
    base = {"model": MODEL, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(url, json={**base, "messages": [{"role": "user", "content": "Hello there"}]}, timeout=30)
    parts = httpx.post(url, json={**base, "priority": 1, "user": "someone", "frequency_penalty": 0,
                                  "metadata": {"x": "1"}, "tools": [], "tool_choice": "none",
                                  "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                                            {"type": "text", "text": "there"}]}]},
                       timeout=30)
    assert plain.status_code == parts.status_code == 200, parts.text
    assert plain.json()["choices"][0]["message"] == parts.json()["choices"][0]["message"]
    wait_idle(cluster)


def test_seeded_sampling_is_reproducible(client, cluster):
    kw = dict(model=MODEL, prompt="seeded", max_tokens=16, temperature=0.9, seed=1234,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    wait_idle(cluster)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_truncates_and_frees(server, cluster, stream):
    prompt = "Once upon a time"
    ids = cluster.tokenizer.encode(prompt)
    full = cluster.tokenizer.decode(reference(cluster, ids, 60))
    # the latest-starting multi-character string whose first occurrence is inside the output
    start, stop = next((i, full[i:i + n]) for i in range(len(full) - 4, 0, -1) for n in (2, 3, 4)
                       if full.find(full[i:i + n]) == i)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 60, "temperature": 0, "ignore_eos": True,
            "stop": [stop, "\u2603never"], "stream": stream}
    if stream:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            events = sse_events(r.iter_lines())
        assert events[-1] == {"done": True}
        text = "".join(e["choices"][0]["text"] for e in events[:-1] if e.get("choices"))
        reasons = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    else:
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200
        text, reasons = r.json()["choices"][0]["text"], [r.json()["choices"][0]["finish_reason"]]
    assert text == full[:start]
    assert reasons == ["stop"]
    wait_idle(cluster)


# ----- migration, disconnects ------------------------------------------------------------------


def _holder(cluster: Cluster, rid: str):
    for iid in cluster.instance_ids():
        h = cluster.control.instance(iid)
        if h.llumlet.has_request(rid):
            return iid, h
    return None, None


def test_stream_exact_across_forced_migrations(server, cluster):
    prompt = "Move me between instances while I talk"
    ids = cluster.tokenizer.encode(prompt)
    ref = reference(cluster, ids, 160)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 160, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    results, errors = [], []
    # Every instance is held after each batch: the request moves four times, running five
    # batches between moves, whatever the speed of the engine (it has 160 tokens to go).
    gates = contextlib.ExitStack()
    held = {iid: gates.enter_context(HoldOutputs(cluster, iid)) for iid in cluster.instance_ids()}
    for gate in held.values():
        gate.hold()

    def migrate() -> None:
        try:
            wait_for(lambda: cluster.active_requests(), what="the request")
            (rid,) = cluster.active_requests()
            first, _ = _holder(cluster, rid)
            held[first].wait_held()  # its first batch ran
            for k in range(4):
                src, h = _holder(cluster, rid)
                if h is None:
                    return
                dst = next(i for i in cluster.instance_ids() if i != src)
                results.append(h.llumlet.migrate_now(rid, cluster.control.instance(dst).address, f"mig-test-{k}"))
                now_on, _ = _holder(cluster, rid)
                for _ in range(5):
                    held[now_on].step()
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            gates.close()

    events = []
    thread = threading.Thread(target=migrate)
    thread.start()
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                events.append({"done": True})
                break
            events.append(json.loads(line[6:]))
    thread.join(30)
    assert not errors, errors
    finished = [r for r in results if r.status.value == "finished"]
    assert len(finished) >= 2, [r.status for r in results]
    got = [t for e in events if e.get("choices") for t in e["choices"][0].get("token_ids", [])]
    assert got == ref
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    assert text == cluster.tokenizer.decode(ref)
    state = httpx.get(server.url + "/v1/cluster/state").json()
    assert state["migrations"].get("finished", 0) >= 1 or finished  # the daemon may not have polled yet
    wait_idle(cluster)


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"{name} {labels} not exported")


def test_stream_client_disconnect_frees_blocks(server, cluster):
    aborted_before = metric(server, "llumnix_requests_total", status="aborted")
    body = {"model": MODEL, "prompt": "A very long answer, please", "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 5:
                    # Checked while still connected: once the stream closes, the server may abort at once.
                    assert cluster.active_requests(), "the request should still be running when the client leaves"
                    break
    wait_idle(cluster, timeout=5)  # 1500 tokens take far longer: the server aborted it
    assert metric(server, "llumnix_requests_total", status="aborted") == aborted_before + 1


def test_non_stream_client_disconnect_frees_blocks(server, cluster):
    body = {"model": MODEL, "prompt": "Long and unread", "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    wait_idle(cluster, timeout=5)


# ----- bad input -----------------------------------------------------------------------------------

BAD_BODIES = [
    ("invalid json", b"{not json"),
    ("array body", b"[1, 2]"),
    ("empty body", b""),
    ("nan", b'{"prompt": "x", "temperature": NaN}'),
    ("huge float", b'{"prompt": "x", "temperature": 1e999}'),
    ("bad utf8", b'{"prompt": "\xff\xfe"}'),
    ("deeply nested", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("missing prompt", {"max_tokens": 3}),
    ("null prompt", {"prompt": None}),
    ("empty token list", {"prompt": []}),
    ("two prompts", {"prompt": ["a", "b"]}),
    ("mixed prompt", {"prompt": ["a", 1]}),
    ("token out of vocab", {"prompt": [1, 2, 100000]}),
    ("negative token", {"prompt": [-1]}),
    ("bool token", {"prompt": [True]}),
    ("max_tokens zero", {"prompt": "x", "max_tokens": 0}),
    ("max_tokens negative", {"prompt": "x", "max_tokens": -5}),
    ("max_tokens string", {"prompt": "x", "max_tokens": "16"}),
    ("max_tokens float", {"prompt": "x", "max_tokens": 1.5}),
    ("beyond context", {"prompt": "x", "max_tokens": 10_000_000}),
    ("prompt beyond context", {"prompt": [65] * 9000, "max_tokens": 1}),
    ("beyond one instance's KV pool", {"prompt": "x", "max_tokens": 128 * 16}),
    ("unknown model", {"model": "gpt-5", "prompt": "x"}),
    ("temperature negative", {"prompt": "x", "temperature": -1}),
    ("temperature string", {"prompt": "x", "temperature": "hot"}),
    ("top_p zero", {"prompt": "x", "top_p": 0}),
    ("seed too large", {"prompt": "x", "seed": 1 << 70}),
    ("stream string", {"prompt": "x", "stream": "yes"}),
    ("stop int", {"prompt": "x", "stop": 5}),
    ("stop empty", {"prompt": "x", "stop": [""]}),
    ("stream_options wrong", {"prompt": "x", "stream": True, "stream_options": "all"}),
    ("n zero", {"prompt": "x", "n": 0}),
    ("n too many", {"prompt": "x", "n": 17}),
    ("best_of below n", {"prompt": "x", "n": 3, "best_of": 2}),
    ("best_of streamed", {"prompt": "x", "best_of": 2, "stream": True}),
    ("logprobs above 5", {"prompt": "x", "logprobs": 6}),
    ("logprobs bool", {"prompt": "x", "logprobs": True}),
    ("unknown field", {"prompt": "x", "some_future_field": {"x": [1]}}),
    ("suffix", {"prompt": "x", "suffix": "end"}),
    ("stream_options without stream", {"prompt": "x", "stream_options": {"include_usage": True}}),
    ("priority negative", {"prompt": "x", "priority": -1}),
    ("priority string", {"prompt": "x", "priority": "high"}),
    ("ignore_eos int", {"prompt": "x", "ignore_eos": 1}),
]

BAD_CHAT = [
    ("missing messages", {"max_tokens": 3}),
    ("empty messages", {"messages": []}),
    ("message not object", {"messages": ["hi"]}),
    ("content int", {"messages": [{"role": "user", "content": 3}]}),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("chat max_tokens zero", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}),
    ("chat logprobs int", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 2}),
    ("chat top_logprobs alone", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
    ("chat top_logprobs 21", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}),
    ("chat tools", {"messages": [{"role": "user", "content": "hi"}],
                    "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("chat json mode", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}),
    ("chat echo", {"messages": [{"role": "user", "content": "hi"}], "echo": True}),
    ("chat best_of", {"messages": [{"role": "user", "content": "hi"}], "best_of": 2}),
]


def _post(url: str, body, **kw) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30, **kw)
    return httpx.post(url, json=body, timeout=30, **kw)


def assert_error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("name,body", BAD_BODIES, ids=[n for n, _ in BAD_BODIES])
def test_bad_completion_input_is_400(server, name, body):
    assert_error(_post(server.url + "/v1/completions", body))


@pytest.mark.parametrize("name,body", BAD_CHAT, ids=[n for n, _ in BAD_CHAT])
def test_bad_chat_input_is_400(server, name, body):
    assert_error(_post(server.url + "/v1/chat/completions", body))


def test_oversized_bodies_are_400(cluster):
    with ServerThread(create_app(cluster, max_body_bytes=2048)) as srv:
        big = {"prompt": "x" * 5000, "max_tokens": 1}
        err = assert_error(_post(srv.url + "/v1/completions", big))
        assert err["code"] == "body_too_large"

        def chunked():  # no Content-Length: the size is checked while reading
            payload = json.dumps(big).encode()
            for i in range(0, len(payload), 512):
                yield payload[i:i + 512]

        r = httpx.post(srv.url + "/v1/completions", content=chunked(), timeout=30)
        assert "content-length" not in r.request.headers
        assert assert_error(r)["code"] == "body_too_large"
        # just under the limit still works
        assert _post(srv.url + "/v1/completions", {"prompt": "x" * 100, "max_tokens": 1}).status_code == 200
    wait_idle(cluster)


def test_after_bad_inputs_no_block_is_used(server, cluster):
    for _, body in BAD_BODIES + BAD_CHAT:
        _post(server.url + "/v1/completions", body)
        _post(server.url + "/v1/chat/completions", body)
    wait_idle(cluster)


def test_no_instance_is_503():
    class NoCluster:  # the one Cluster method that matters here, failing as with no instance
        model_name, max_model_len = MODEL, 4096

        def __init__(self):
            from llumnix_py.engines.tokenizer import ByteTokenizer

            self.tokenizer = ByteTokenizer()

        def submit(self, *a, **kw):
            raise NoInstanceError("no instance can take requests")

        async def submit_async(self, *a, **kw):
            return self.submit(*a, **kw)

        def health(self):
            from llumnix_py.frontend.health import HealthView, assess

            return assess(HealthView(scheduler_up=True, live=0, configured=2))

        def state(self):  # a draining instance has freeness -inf, which JSON cannot carry
            return {"instances": [{"instance_id": "i0", "freeness": float("-inf")}], "migrations": {},
                    "migration_downtime_ms": []}

    with ServerThread(create_app(NoCluster())) as srv:  # type: ignore[arg-type]
        assert_error(_post(srv.url + "/v1/completions", {"prompt": "x"}), 503)
        assert httpx.get(srv.url + "/health").status_code == 503
        assert httpx.get(srv.url + "/metrics").status_code == 200
        assert httpx.get(srv.url + "/v1/cluster/state").json()["instances"][0]["freeness"] is None


# ----- auth, metrics -----------------------------------------------------------------------------


def test_auth(cluster):
    with ServerThread(create_app(cluster, api_key=API_KEY)) as srv:
        for path in ("/v1/models", "/v1/cluster/state"):
            assert_error(httpx.get(srv.url + path), 401)
            assert_error(httpx.get(srv.url + path, headers={"Authorization": "Bearer wrong"}), 401)
            assert httpx.get(srv.url + path, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        err = assert_error(_post(srv.url + "/v1/completions", {"prompt": "x", "max_tokens": 2}), 401)
        assert err["code"] == "invalid_api_key"
        assert_error(_post(srv.url + "/v1/chat/completions", {"messages": []}), 401)
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/metrics").status_code == 200
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="x", max_tokens=2)
    wait_idle(cluster)


def test_openai_client_sees_400_as_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=17)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="other-model", prompt="x", max_tokens=2)


def test_metrics(server, client, cluster):
    client.completions.create(model=MODEL, prompt="for the metrics", max_tokens=4)
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("llumnix_time_to_first_token_seconds", "llumnix_time_per_output_token_seconds",
                 "llumnix_e2e_request_latency_seconds", "llumnix_requests", "llumnix_prompt_tokens",
                 "llumnix_generation_tokens", "llumnix_migrations", "llumnix_migration_downtime_seconds",
                 "llumnix_instance_kv_blocks_used", "llumnix_instance_kv_blocks_total",
                 "llumnix_instance_freeness", "llumnix_instance_running_requests",
                 "llumnix_instance_waiting_requests", "llumnix_instance_kv_copy_stall_seconds"):
        assert name in families, name
    finished = [s.value for s in families["llumnix_requests"].samples
                if s.name == "llumnix_requests_total" and s.labels["status"] == "finished"]
    assert finished and finished[0] >= 1
    used = {s.labels["instance"] for s in families["llumnix_instance_kv_blocks_used"].samples}
    assert used == set(cluster.instance_ids())
    gen = [s.value for s in families["llumnix_generation_tokens"].samples
           if s.name == "llumnix_generation_tokens_total"]
    assert gen and gen[0] >= 4

    def busy() -> dict[str, float]:
        text = httpx.get(server.url + "/metrics").text
        return {s.labels["instance"]: s.value for f in text_string_to_metric_families(text)
                if f.name == "llumnix_instance_busy_seconds" for s in f.samples}

    # The engine that served the request reports its step time once the scheduler polls it again.
    wait_for(lambda: any(v > 0 for v in busy().values()), what="an instance's busy seconds")
    assert set(busy()) == set(cluster.instance_ids())
    assert "llumnix_instance_preemptions" in {f.name for f in text_string_to_metric_families(
        httpx.get(server.url + "/metrics").text)}


def test_metrics_count_each_migration_once():
    from llumnix_py.server import Metrics

    m = Metrics()

    def sample(text: str, name: str, **labels) -> float:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        raise AssertionError(f"{name} {labels} missing")

    inst = [{"instance_id": "i0", "total_blocks": 8, "used_blocks": 2, "running": 1, "waiting": 0,
             "freeness": float("-inf"), "kv_copy_stall_s": 1.25, "busy_s": 3.5, "preemptions": 7}]
    s1 = {"instances": inst, "migrations": {"finished": 2, "aborted_dst": 1}, "migration_downtime_ms": [10.0, 20.0]}
    text = m.scrape(s1).decode()
    assert sample(text, "llumnix_instance_kv_copy_stall_seconds", instance="i0") == 1.25
    assert sample(text, "llumnix_instance_busy_seconds", instance="i0") == 3.5
    assert sample(text, "llumnix_instance_preemptions", instance="i0") == 7
    assert sample(text, "llumnix_migrations_total", outcome="finished") == 2
    assert sample(text, "llumnix_migration_downtime_seconds_count") == 2
    text = m.scrape(s1).decode()  # nothing new
    assert sample(text, "llumnix_migrations_total", outcome="finished") == 2
    assert sample(text, "llumnix_migration_downtime_seconds_count") == 2
    s2 = {"instances": [], "migrations": {"finished": 3, "aborted_dst": 1},
          "migration_downtime_ms": [10.0, 20.0, 40.0]}
    text = m.scrape(s2).decode()
    assert sample(text, "llumnix_migrations_total", outcome="finished") == 3
    assert sample(text, "llumnix_migration_downtime_seconds_count") == 3
    assert abs(sample(text, "llumnix_migration_downtime_seconds_sum") - 0.07) < 1e-9
    assert "llumnix_instance_kv_blocks_used{" not in text  # the instance left
    assert "llumnix_instance_kv_copy_stall_seconds{" not in text
    assert "llumnix_instance_busy_seconds{" not in text and "llumnix_instance_preemptions{" not in text
