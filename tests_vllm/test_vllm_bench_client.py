"""vLLM's own serving benchmark client (``vllm.benchmarks.serve``, as a library) against `llumnix-py serve`.

The server runs the built-in torch engine (two instances, in one process) on the tiny
Llama checkpoint this session writes, with its Hugging Face tokenizer; the client is
exactly what ``vllm bench serve`` runs: streamed completions with
``stream_options.include_usage``, random prompts from that tokenizer, output lengths
drawn per request, EOS ignored. Every request must succeed and come back with the
length it asked for.
"""

from __future__ import annotations

import asyncio

import pytest
from vllm_helpers import served

NUM_PROMPTS = 16
MODEL_NAME = "tiny"


@pytest.fixture
def torch_engine_server(checkpoint):
    """`llumnix-py serve` (built-in engine, local runtime) on 127.0.0.1; its URL."""
    with served(["--runtime", "local", "--engine", "torch", "--model", checkpoint, "--model-name", MODEL_NAME,
                 "--instances", "2", "--num-blocks", "128", "--max-model-len", "512"]) as url:
        yield url


def bench_args(url: str, checkpoint: str):
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return parser.parse_args([
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", checkpoint, "--served-model-name", MODEL_NAME, "--tokenizer", checkpoint,
        "--dataset-name", "random", "--random-input-len", "48", "--random-output-len", "24",
        "--random-range-ratio", "0.5", "--num-prompts", str(NUM_PROMPTS), "--request-rate", "inf",
        "--max-concurrency", "8", "--temperature", "0", "--ignore-eos", "--seed", "7", "--disable-tqdm",
        "--ready-check-timeout-sec", "60", "--save-detailed",  # per-request results (no file without --save-result)
    ])


def test_vllm_benchmark_client_gets_every_request_at_its_length(torch_engine_server, checkpoint):
    from vllm.benchmarks.datasets import get_samples
    from vllm.benchmarks.serve import main_async
    from vllm.tokenizers import get_tokenizer

    args = bench_args(torch_engine_server, checkpoint)
    # The requests the client sends: the dataset is seeded, so sampling it again gives the same ones.
    requested = [r.expected_output_len for r in get_samples(args, get_tokenizer(checkpoint))]
    assert len(requested) == NUM_PROMPTS and len(set(requested)) > 1  # lengths differ between requests
    result = asyncio.run(main_async(args))
    assert result["completed"] == NUM_PROMPTS and result["failed"] == 0, result["errors"]
    assert result["errors"] == [""] * NUM_PROMPTS
    # Output lengths are the server's usage counts (streamed because the client asks for usage).
    assert result["output_lens"] == requested
    assert result["total_output_tokens"] == sum(requested)
    assert all(text for text in result["generated_texts"])
