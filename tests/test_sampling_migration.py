"""Sampling with penalties, seeds, logprobs and ``n`` > 1 stays exact across live migration, end to end.

An ``n=3`` request with penalties, a seed and logprobs goes through the HTTP API to one
held instance; once each of its choices (a request of its own in the cluster) has a few
tokens, a second instance joins and the first is drained, so every choice migrates
mid-decode. The response (tokens, text and log probabilities of every choice) must equal
the same request's response from an undisturbed instance. The float64 test model makes
tokens and log probabilities independent of the batch.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from llumnix_py.config import ClusterConfig, SchedulerConfig
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.server import ServerThread, create_app
from tests.cluster_helpers import HoldOutputs, assert_no_leak, small_spec, wait_for

MODEL = "llumnix-tiny"
VICTIM = "instance-000"
BODY = {"model": MODEL, "prompt": [5, 17, 200, 3, 64, 9, 41, 88], "max_tokens": 12, "n": 3, "temperature": 0.9,
        "seed": 100, "repetition_penalty": 0.5, "frequency_penalty": 1.5, "presence_penalty": 0.5, "top_k": 50,
        "logprobs": 2, "ignore_eos": True, "return_token_ids": True}


def answer(url: str, stream: bool) -> list[dict]:
    """The choices of BODY's response, by index (a stream's chunks merged per choice)."""
    if not stream:
        r = httpx.post(url + "/v1/completions", json=BODY, timeout=120)
        assert r.status_code == 200, r.text
        return [{k: c[k] for k in ("index", "text", "token_ids", "logprobs", "finish_reason")}
                for c in r.json()["choices"]]
    merged: dict[int, dict] = {}
    with httpx.stream("POST", url + "/v1/completions", json={**BODY, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[len("data: "):])["choices"]:
                m = merged.setdefault(c["index"], {"index": c["index"], "text": "", "token_ids": [],
                                                   "logprobs": {"tokens": [], "token_logprobs": [],
                                                                "top_logprobs": [], "text_offset": []},
                                                   "finish_reason": None})
                m["text"] += c["text"]
                m["token_ids"] += c["token_ids"]
                for key, vals in (c["logprobs"] or {}).items():
                    m["logprobs"][key] += vals
                m["finish_reason"] = c["finish_reason"] or m["finish_reason"]
    return [merged[i] for i in sorted(merged)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_n_choices_with_penalties_and_logprobs_migrate_exactly(stream):
    cluster = Cluster.start(ClusterConfig(num_instances=1, runtime="local", engine=small_spec(num_blocks=64),
                                          model_name=MODEL,
                                          scheduler=SchedulerConfig(poll_interval_s=0.01, migration_interval_s=0.02)))
    srv = ServerThread(create_app(cluster)).start()
    try:
        victim = cluster.control.instance(VICTIM)
        got: list = []
        with HoldOutputs(cluster, VICTIM) as gate:
            gate.hold()
            client = threading.Thread(target=lambda: got.append(answer(srv.url, stream)), daemon=True)
            client.start()
            # every choice runs on the only instance and has a few tokens (penalties have history)
            gate.run_until(lambda: len(victim.load().running) == 3 and all(
                r.output_len >= 3 for r in victim.load().running), "three choices with three tokens each")
            [new] = cluster.control.daemon.launch(1)
            cluster.drain(VICTIM)
            wait_for(lambda: not victim.load().running, what="the drain to migrate every choice")
        client.join(timeout=120)
        assert got, "the request did not complete"
        assert cluster.state()["migrations"].get("finished", 0) >= 3
        wait_for(lambda: cluster.instance_ids() == [new], what="the drained instance to stop")
        undisturbed = answer(srv.url, stream)  # the same request, on the one instance left, no migration
        assert [c["index"] for c in got[0]] == [0, 1, 2]
        assert all(len(c["token_ids"]) == 12 and len(c["logprobs"]["token_logprobs"]) == 12 for c in got[0])
        assert got[0] == undisturbed
        assert len({tuple(c["token_ids"]) for c in got[0]}) > 1  # each choice has its own seed
        assert_no_leak(cluster)
    finally:
        srv.stop()
        cluster.stop()
