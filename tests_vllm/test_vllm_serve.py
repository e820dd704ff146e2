"""`llumnix-py serve --engine vllm` end to end: the real command, the OpenAI API, two vLLM instances."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from vllm_helpers import served


@pytest.mark.parametrize("runtime", ["local", "ray"])
def test_serve_command_answers_openai_requests(checkpoint, runtime):
    args = ["--engine", "vllm", "--model", checkpoint, "--instances", "2", "--runtime", runtime, "--num-blocks", "40",
            "--max-model-len", "512", "--max-batch-size", "8", "--model-name", "tiny"]
    with served(args) as url:
        models = httpx.get(url + "/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        # Non-streaming and streaming completions, through the scheduler to the vLLM instances.
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": list(range(5, 45)), "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 24 and len(body["choices"][0]["token_ids"]) == 24
        ids = []
        with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": list(range(5, 45)), "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, "stream": True, "return_token_ids": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    ids.extend(chunk["choices"][0].get("token_ids") or [] if chunk.get("choices") else [])
        assert ids == body["choices"][0]["token_ids"]  # greedy: the same tokens, streamed
        deadline = time.monotonic() + 60  # the state is the scheduler's last poll: it may trail by a moment
        while True:
            state = httpx.get(url + "/v1/cluster/state", timeout=10).json()
            assert len(state["instances"]) == 2
            if all(i["used_blocks"] == 0 for i in state["instances"]):
                break
            assert time.monotonic() < deadline, state["instances"]
            time.sleep(0.2)
        assert httpx.post(url + "/v1/completions", timeout=30, json={"model": "tiny"}).status_code == 400
