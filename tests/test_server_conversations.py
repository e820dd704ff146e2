"""The API's client and conversation ids: validated at the edge; a conversation's next turn,
sent through the official openai client, reuses the KV its instance kept, with exact tokens."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.server import ServerThread, create_app

MODEL = "llumnix-conv"


@pytest.fixture(scope="module")
def served():
    engine = EngineConfig(num_blocks=128, block_size=8, num_host_blocks=64, conversation_host_blocks=48)
    c = Cluster.start(ClusterConfig(num_instances=1, runtime="local", engine=EngineSpec(engine=engine),
                                    model_name=MODEL))
    srv = ServerThread(create_app(c)).start()
    yield c, srv
    srv.stop()
    c.stop()


def engine_of(cluster: Cluster):
    (iid,) = cluster.instance_ids()
    return cluster.control.instance(iid).llumlet.engine


def test_next_turn_reuses_the_conversation_kv_with_exact_tokens(served):
    cluster, srv = served
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    body = {"ignore_eos": True, "return_token_ids": True, "conversation_id": "conv-1"}
    p1 = list(range(10, 40))
    out1 = client.completions.create(model=MODEL, prompt=p1, max_tokens=12, temperature=0, user="alice",
                                     extra_body=body)
    t1 = out1.choices[0].model_extra["token_ids"]
    engine = engine_of(cluster)
    assert "conv-1" in engine.conversations
    p2 = p1 + t1 + list(range(50, 60))
    hits = engine.conversations.hits
    out2 = client.completions.create(model=MODEL, prompt=p2, max_tokens=12, temperature=0, user="alice",
                                     extra_body=body)
    assert engine.conversations.hits == hits + 1 and engine.conversations.restored_tokens > 0
    # the same prompt, no conversation: computed from scratch
    ref = client.completions.create(model=MODEL, prompt=p2, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    assert out2.choices[0].model_extra["token_ids"] == ref.choices[0].model_extra["token_ids"]
    # the client id appears in the metrics
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text)}
    by_client = {s.labels["client"]: s.value for s in families["llumnix_client_requests"].samples
                 if s.name.endswith("_total")}
    assert by_client.get("alice", 0) >= 2
    tokens = {s.labels["client"]: s.value for s in families["llumnix_client_generation_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens.get("alice", 0) >= 24


@pytest.mark.parametrize("extra", [{"user": 5}, {"user": "u" * 257}, {"conversation_id": ""},
                                   {"conversation_id": 3}, {"conversation_id": "c" * 257},
                                   {"conversation_id": ["a"]}])
def test_bad_ids_are_400(served, extra):
    _, srv = served
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] in extra or err["message"]


def test_user_and_conversation_are_accepted_in_chat(served):
    _, srv = served
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                         user="bob", extra_body={"conversation_id": "chat-1"})
    assert out.choices[0].message.content is not None
