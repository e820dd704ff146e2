"""The OpenAI API's sampling fields, log probabilities, echo, n and best_of, over a real socket.

One in-process cluster (two instances of the float64 test model, so log probabilities
do not depend on the batch) behind a uvicorn server on 127.0.0.1.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest

from llumnix_py.config import ClusterConfig
from llumnix_py.engines.types import SamplingParams
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.server import ServerThread, create_app
from tests.cluster_helpers import assert_no_leak, small_spec

MODEL = "llumnix-tiny"
PROMPT = [5, 17, 200, 3, 64, 9, 41]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster.start(ClusterConfig(num_instances=2, runtime="local", engine=small_spec(num_blocks=96),
                                    model_name=MODEL))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def url(cluster):
    srv = ServerThread(create_app(cluster)).start()
    yield srv.url
    srv.stop()


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def completion(url: str, **body) -> dict:
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream(url: str, path: str, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    assert events
    return events


def library_logprobs(cluster: Cluster, sp: SamplingParams) -> tuple[list[int], list]:
    """Tokens and per-token logprobs of ``PROMPT`` through the library API (no HTTP)."""
    handle = cluster.submit(PROMPT, sp)
    tokens, lps = [], []
    for ev in handle.events(timeout=60):
        tokens += ev.token_ids
        lps += ev.logprobs or ()
    return tokens, lps


# ----- validation: every new field -------------------------------------------------------------

BAD = [
    ("top_k", {"top_k": -2}), ("top_k", {"top_k": 1.5}), ("min_p", {"min_p": 1.5}),
    ("presence_penalty", {"presence_penalty": 2.5}), ("frequency_penalty", {"frequency_penalty": -3}),
    ("repetition_penalty", {"repetition_penalty": 0}), ("logit_bias", {"logit_bias": {"abc": 1}}),
    ("logit_bias", {"logit_bias": {"5": 101}}), ("logit_bias", {"logit_bias": {"99999": 1}}),
    ("logit_bias", {"logit_bias": [1, 2]}), ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 9, "max_tokens": 4}), ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("stop_token_ids", {"stop_token_ids": [99999]}), ("n", {"n": 17}), ("best_of", {"best_of": 17}),
    ("best_of", {"n": 2, "best_of": 1}), ("best_of", {"best_of": 2, "stream": True}),
    ("logprobs", {"logprobs": 6}), ("logprobs", {"logprobs": -1}), ("echo", {"echo": "yes"}),
    ("max_tokens", {"max_tokens": 0}), ("suffix", {"suffix": "x"}), ("mirostat_tau", {"mirostat_tau": 5.0}),
    ("stream_options", {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    ("seed", {"seed": 1.5}),
]


@pytest.mark.parametrize("param,body", BAD, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD)])
def test_each_sampling_field_is_validated_and_named(url, param, body):
    r = post(url, "/v1/completions", {"prompt": "x", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err


BAD_CHAT = [
    ("top_logprobs", {"logprobs": True, "top_logprobs": 21}), ("top_logprobs", {"top_logprobs": 3}),
    ("logprobs", {"logprobs": 3}), ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("response_format", {"response_format": {"type": "json_object"}}), ("echo", {"echo": True}),
    ("best_of", {"best_of": 2}), ("n", {"n": 0}),
]


@pytest.mark.parametrize("param,body", BAD_CHAT, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD_CHAT)])
def test_each_chat_field_is_validated_and_named(url, param, body):
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_fields_that_change_nothing_are_accepted(url, cluster):
    base = completion(url, max_tokens=3, temperature=0)["choices"][0]["text"]
    extra = completion(url, max_tokens=3, temperature=0, user="u", metadata={"k": "v"}, store=False,
                       stream_options=None)["choices"][0]["text"]
    assert extra == base
    assert_no_leak(cluster)


# ----- sampling fields reach the engine ------------------------------------------------------------


def test_penalties_and_bias_change_the_output_as_the_library_does(url, cluster):
    body = dict(max_tokens=8, temperature=0, repetition_penalty=0.5, frequency_penalty=1.5, presence_penalty=0.5,
                logit_bias={"65": 3.0}, return_token_ids=True)
    got = completion(url, **body)["choices"][0]["token_ids"]
    plain = completion(url, max_tokens=8, temperature=0, return_token_ids=True)["choices"][0]["token_ids"]
    sp = SamplingParams(max_tokens=8, repetition_penalty=0.5, frequency_penalty=1.5, presence_penalty=0.5,
                        logit_bias={65: 3.0}, ignore_eos=True)
    assert got == cluster.submit(PROMPT, sp).result(timeout=60)
    assert got != plain
    seeded = dict(max_tokens=8, temperature=1.0, seed=3, top_k=5, min_p=0.05, return_token_ids=True)
    assert completion(url, **seeded)["choices"][0]["token_ids"] == cluster.submit(
        PROMPT, SamplingParams(max_tokens=8, temperature=1.0, seed=3, top_k=5, min_p=0.05, ignore_eos=True)
    ).result(timeout=60)
    assert_no_leak(cluster)


def test_min_tokens_and_stop_token_ids(url, cluster):
    first = completion(url, max_tokens=6, temperature=0, return_token_ids=True)["choices"][0]["token_ids"]
    stopped = completion(url, max_tokens=6, temperature=0, stop_token_ids=[first[1]], return_token_ids=True)
    assert stopped["choices"][0]["token_ids"] == first[:2] and stopped["choices"][0]["finish_reason"] == "stop"
    held = completion(url, max_tokens=6, temperature=0, stop_token_ids=[first[0]], min_tokens=6,
                      return_token_ids=True)["choices"][0]
    assert len(held["token_ids"]) == 6 and first[0] not in held["token_ids"]
    assert_no_leak(cluster)


# ----- log probabilities --------------------------------------------------------------------------


def check_completion_logprobs(lp: dict, n_tokens: int, k: int) -> None:
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert all(len(lp[key]) == n_tokens for key in lp)
    for i in range(n_tokens - 1):
        assert lp["text_offset"][i + 1] == lp["text_offset"][i] + len(lp["tokens"][i])
    for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        if v is None:
            assert top is None
            continue
        assert v <= 0 and tok in top and top[tok] == v
        # k alternatives plus the sampled token; fewer where two tokens decode to the same string
        assert 1 <= len(top) <= k + 1 and all(x <= 0 for x in top.values())


def test_completion_logprobs_match_the_engine_streamed_or_not(url, cluster):
    res = completion(url, max_tokens=5, temperature=0, logprobs=3, return_token_ids=True)
    choice = res["choices"][0]
    lp = choice["logprobs"]
    check_completion_logprobs(lp, 5, 3)
    tokens, engine_lps = library_logprobs(cluster, SamplingParams(max_tokens=5, logprobs=3, ignore_eos=True))
    assert choice["token_ids"] == tokens
    assert lp["token_logprobs"] == [x.logprob for x in engine_lps]
    assert [max(t.values()) for t in lp["top_logprobs"]] == [x.top[0][1] for x in engine_lps]
    chunks = stream(url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                             "logprobs": 3, "ignore_eos": True})
    merged = {key: [v for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                    for v in c["choices"][0]["logprobs"][key]] for key in lp}
    assert merged == lp
    assert_no_leak(cluster)


def test_chat_logprobs_shape_streamed_or_not(url, cluster):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    r = post(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"} and e["logprob"] <= 0
        assert e["bytes"] == list(e["token"].encode("utf-8")) and len(e["top_logprobs"]) == 2
        assert all(set(t) == {"token", "logprob", "bytes"} for t in e["top_logprobs"])
        assert e["top_logprobs"][0]["logprob"] == e["logprob"]  # greedy: the chosen token is the likeliest
    chunks = stream(url, "/v1/chat/completions", body)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    plain = post(url, "/v1/chat/completions", {**body, "top_logprobs": None})
    assert all(e["top_logprobs"] == [] for e in plain.json()["choices"][0]["logprobs"]["content"])
    no = post(url, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None}).json()
    assert no["choices"][0]["logprobs"] is None
    assert_no_leak(cluster)


def test_echo_with_max_tokens_zero_scores_the_prompt(url, cluster):
    res = completion(url, max_tokens=0, echo=True, logprobs=1)
    choice = res["choices"][0]
    assert choice["text"] == cluster.tokenizer.decode(PROMPT)
    lp = choice["logprobs"]
    check_completion_logprobs(lp, len(PROMPT), 1)
    assert lp["token_logprobs"][0] is None and all(v is not None for v in lp["token_logprobs"][1:])
    assert res["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 0, "total_tokens": len(PROMPT)}
    # echo with generation: the prompt's part is the same, then the generated tokens
    more = completion(url, max_tokens=3, temperature=0, echo=True, logprobs=1)["choices"][0]
    assert more["text"].startswith(choice["text"]) and len(more["logprobs"]["tokens"]) == len(PROMPT) + 3
    assert more["logprobs"]["token_logprobs"][:len(PROMPT)] == lp["token_logprobs"]
    sum_lp = sum(lp["token_logprobs"][1:])
    assert math.isfinite(sum_lp) and sum_lp < 0
    streamed = stream(url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 0, "echo": True,
                                                "logprobs": 1})
    assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"]) == choice["text"]
    assert [v for c in streamed if c["choices"] and c["choices"][0]["logprobs"]
            for v in c["choices"][0]["logprobs"]["token_logprobs"]] == lp["token_logprobs"]
    assert_no_leak(cluster)


# ----- n and best_of --------------------------------------------------------------------------------


def test_n_choices_have_their_own_seeds_and_join_in_index_order(url, cluster):
    body = dict(max_tokens=6, temperature=1.0, seed=41, return_token_ids=True)
    res = completion(url, n=3, **body)
    assert [c["index"] for c in res["choices"]] == [0, 1, 2]
    singles = [completion(url, **{**body, "seed": 41 + i})["choices"][0]["token_ids"] for i in range(3)]
    assert [c["token_ids"] for c in res["choices"]] == singles
    assert len({tuple(s) for s in singles}) > 1
    assert res["usage"]["completion_tokens"] == 18 and res["usage"]["prompt_tokens"] == len(PROMPT)
    chunks = stream(url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "n": 3, "ignore_eos": True,
                                             "stream_options": {"include_usage": True}, **body})
    per_index: dict = {}
    for c in chunks:
        for ch in c["choices"]:
            per_index.setdefault(ch["index"], []).extend(ch["token_ids"])
    assert [per_index[i] for i in range(3)] == singles
    assert chunks[-1]["usage"]["completion_tokens"] == 18
    chat = stream(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                "n": 2, "ignore_eos": True, **body})
    assert {ch["index"] for c in chat for ch in c["choices"]} == {0, 1}
    assert_no_leak(cluster)


def test_best_of_returns_the_most_likely_candidates(url, cluster):
    body = dict(max_tokens=5, temperature=1.2, seed=7, return_token_ids=True)
    candidates = completion(url, n=4, logprobs=0, **body)["choices"]
    scores = [sum(c["logprobs"]["token_logprobs"]) for c in candidates]
    order = sorted(range(4), key=lambda i: (-scores[i], i))
    best = completion(url, n=2, best_of=4, **body)
    assert [c["token_ids"] for c in best["choices"]] == [candidates[i]["token_ids"] for i in order[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in best["choices"])  # not asked for: ranked, not returned
    assert best["usage"]["completion_tokens"] == 20  # every candidate was generated
    assert_no_leak(cluster)
