"""The paged Llama model against a dense, cache-free reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llumnix_py.engines.torch_engine.model import (
    LlamaModel,
    ModelConfig,
    SeqBatchEntry,
    allocate_kv_cache,
    dense_reference_forward,
)

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_layers=2,
             num_heads=4, num_kv_heads=2)
_MODELS: dict[tuple, LlamaModel] = {}


def make_model(**kw) -> LlamaModel:
    """A small seeded model, cached per config (weights are never mutated)."""
    cfg = ModelConfig(**{**SMALL, **kw})
    key = tuple(sorted(kw.items()))
    if key not in _MODELS:
        _MODELS[key] = LlamaModel(cfg)
    return _MODELS[key]


def make_tokens(n: int, seed: int, vocab: int = 320) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def shuffled_table(num_blocks: int, needed: int, seed: int) -> torch.Tensor:
    """`needed` distinct physical blocks in a random, non-contiguous order."""
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    return perm[:needed]


def run_sequence(model, tokens, prompt_len, block_size, table, cache, chunks=(None,)):
    """Prefills tokens[:prompt_len] (in the given chunk sizes), then decodes the rest
    one token at a time; returns the logits after each step (prefill counts once)."""
    outs, done = [], 0
    for size in chunks:
        n = prompt_len - done if size is None else size
        out = model(tokens[done:done + n], [SeqBatchEntry(0, n, done, table)], cache, block_size)
        done += n
    outs.append(out[0])
    for p in range(prompt_len, tokens.numel()):
        out = model(tokens[p:p + 1], [SeqBatchEntry(0, 1, p, table)], cache, block_size)
        outs.append(out[0])
    return outs


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(prompt_len=st.integers(1, 40), num_decode=st.integers(1, 4),
       block_size=st.sampled_from([1, 3, 4, 16]), kv_heads=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 2**16))
def test_paged_prefill_and_decode_match_dense(prompt_len, num_decode, block_size, kv_heads, seed):
    model = make_model(num_kv_heads=kv_heads)
    tokens = make_tokens(prompt_len + num_decode, seed)
    needed = math.ceil(tokens.numel() / block_size)
    cache = allocate_kv_cache(model.cfg, needed + 7, block_size)
    table = shuffled_table(needed + 7, needed, seed)
    outs = run_sequence(model, tokens, prompt_len, block_size, table, cache)
    ref = dense_reference_forward(model, tokens)
    assert len(outs) == num_decode + 1
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, ref[prompt_len - 1 + i], atol=1e-4, rtol=1e-4)


def test_float64_matches_dense_tightly():
    model = make_model(dtype="float64")
    tokens = make_tokens(37, seed=3)
    cache = allocate_kv_cache(model.cfg, 20, 4)
    table = shuffled_table(20, 10, seed=3)
    outs = run_sequence(model, tokens, 30, 4, table, cache)
    ref = dense_reference_forward(model, tokens)
    assert len(outs) == 8
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, ref[29 + i], atol=1e-9, rtol=1e-9)


def test_default_config_matches_dense():
    model = LlamaModel(ModelConfig())
    tokens = make_tokens(70, seed=5)
    cache = allocate_kv_cache(model.cfg, 12, 16)
    table = shuffled_table(12, 5, seed=5)
    outs = run_sequence(model, tokens, 66, 16, table, cache)
    ref = dense_reference_forward(model, tokens)
    assert len(outs) == 5
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, ref[65 + i], atol=1e-4, rtol=1e-4)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(prompt_len=st.integers(2, 48), split=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_chunked_prefill_equals_one_shot(prompt_len, split, seed):
    model = make_model(dtype="float64")
    first = min(prompt_len - 1, max(1, int(prompt_len * split)))
    tokens = make_tokens(prompt_len + 2, seed)
    results, caches = [], []
    for chunks in ((None,), (first, None)):
        cache = allocate_kv_cache(model.cfg, 16, 4)
        table = shuffled_table(16, 13, seed)
        results.append(run_sequence(model, tokens, prompt_len, 4, table, cache, chunks))
        caches.append(cache)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(caches[0], caches[1], atol=1e-12, rtol=0)


def test_batch_equals_each_sequence_alone():
    """Prefills, a chunk after a cached prefix and decodes, mixed in one step."""
    model = make_model(dtype="float64")
    block_size, num_blocks = 4, 60
    cached = [0, 0, 9, 17, 30]        # tokens already in the cache per sequence
    new = [5, 23, 1, 6, 1]            # tokens this step
    tables = shuffled_table(num_blocks, num_blocks, seed=11).view(len(cached), -1)[:, :12]
    seqs = [make_tokens(c + n, seed=100 + i) for i, (c, n) in enumerate(zip(cached, new))]

    def prime(cache):
        for i, c in enumerate(cached):
            if c:
                model(seqs[i][:c], [SeqBatchEntry(0, c, 0, tables[i])], cache, block_size)

    alone = []
    for i, (c, n) in enumerate(zip(cached, new)):
        cache = allocate_kv_cache(model.cfg, num_blocks, block_size)
        prime(cache)
        alone.append(model(seqs[i][c:], [SeqBatchEntry(0, n, c, tables[i])], cache, block_size)[0])

    cache = allocate_kv_cache(model.cfg, num_blocks, block_size)
    prime(cache)
    starts = [sum(new[:i]) for i in range(len(new))]
    flat = torch.cat([s[c:] for s, c in zip(seqs, cached)])
    entries = [SeqBatchEntry(starts[i], new[i], cached[i], tables[i]) for i in range(len(new))]
    batched = model(flat, entries, cache, block_size)
    assert batched.shape == (len(new), model.cfg.vocab_size)
    assert batched.dtype == torch.float32
    for i in range(len(new)):
        torch.testing.assert_close(batched[i], alone[i], atol=1e-6, rtol=1e-6)
        ref = dense_reference_forward(model, seqs[i])[-1]
        torch.testing.assert_close(batched[i], ref, atol=1e-6, rtol=1e-6)


def test_kv_written_to_block_table_slots():
    model = make_model()
    table = torch.tensor([5, 1, 3])
    cache = allocate_kv_cache(model.cfg, 6, 4)
    model(make_tokens(10, 0), [SeqBatchEntry(0, 10, 0, table)], cache, 4)
    written = cache.abs().sum(dim=(1, 2, 4, 5)) > 0          # (block, slot)
    expected = torch.zeros(6, 4, dtype=torch.bool)
    expected[5] = expected[1] = True
    expected[3, :2] = True
    assert torch.equal(written, expected)


def test_rope_uses_rotate_half_convention():
    model = make_model(hidden_size=16, num_heads=4, num_kv_heads=2, rope_theta=100.0)
    cos, sin = model.rope_tables(8)
    p, d = 5, model.cfg.head_dim                               # head_dim 4
    inv0 = 1.0                                                 # theta ** (0 / d)
    inv1 = 1.0 / 100.0 ** (2 / d)
    expected_cos = torch.tensor([math.cos(p * inv0), math.cos(p * inv1)] * 2)
    expected_sin = torch.tensor([math.sin(p * inv0), math.sin(p * inv1)] * 2)
    torch.testing.assert_close(cos[p], expected_cos)
    torch.testing.assert_close(sin[p], expected_sin)


def test_reduced_precision_runs():
    for dtype in ("bfloat16", "float16"):
        model = make_model(dtype=dtype)
        cache = allocate_kv_cache(model.cfg, 4, 8)
        assert cache.dtype == model.cfg.torch_dtype
        out = model(make_tokens(9, 1), [SeqBatchEntry(0, 9, 0, torch.tensor([2, 0]))], cache, 8)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_seeded_init_is_deterministic_and_seed_dependent():
    a, b = LlamaModel(ModelConfig(**SMALL)), LlamaModel(ModelConfig(**SMALL))
    c = LlamaModel(ModelConfig(**SMALL, seed=1))
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert torch.equal(a.model.norm.weight, torch.ones(SMALL["hidden_size"]))
    assert 0.01 < wa.std().item() < 0.03


def test_parameter_names_follow_hf_layout():
    names = set(dict(make_model().named_parameters()))
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight"} <= names
    tied = set(dict(make_model(tie_word_embeddings=True).named_parameters()))
    assert "lm_head.weight" not in tied and len(tied) == len(names) - 1


def test_empty_batch_and_errors():
    model = make_model()
    cache = allocate_kv_cache(model.cfg, 4, 4)
    assert model(torch.empty(0, dtype=torch.long), [], cache, 4).shape == (0, 320)
    with pytest.raises(ValueError, match="block table"):
        model(make_tokens(9, 0), [SeqBatchEntry(0, 9, 0, torch.tensor([0, 1]))], cache, 4)
    with pytest.raises(ValueError, match="kv_cache shape"):
        model(make_tokens(4, 0), [SeqBatchEntry(0, 4, 0, torch.tensor([0]))], cache, 8)
    small = make_model(max_position_embeddings=8)
    cache = allocate_kv_cache(small.cfg, 4, 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        small(make_tokens(9, 0), [SeqBatchEntry(0, 9, 0, torch.tensor([0, 1, 2]))], cache, 4)


@pytest.mark.parametrize("kw", [
    dict(hidden_size=0), dict(vocab_size=-1), dict(num_layers=0), dict(intermediate_size=1.5),
    dict(num_heads=4, num_kv_heads=3), dict(dtype="int8"), dict(rope_theta=0.0),
    dict(rms_norm_eps=-1e-5), dict(hidden_size=250, num_heads=4), dict(head_dim=3),
    dict(num_heads=True), dict(max_position_embeddings=0),
])
def test_config_validation(kw):
    with pytest.raises(ValueError):
        ModelConfig(**kw)


def test_config_defaults_and_hf_round_trip():
    cfg = ModelConfig()
    assert cfg.head_dim == 64 and cfg.torch_dtype == torch.float32
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    assert allocate_kv_cache(cfg, 3, 16).shape == (3, 4, 2, 16, 2, 64)
    with pytest.raises(ValueError):
        allocate_kv_cache(cfg, 0, 16)


@pytest.mark.parametrize("patch", [
    {"architectures": ["MistralForCausalLM"]}, {"model_type": "gpt2"},
    {"hidden_act": "gelu"}, {"attention_bias": True}, {"torch_dtype": "int4"},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
])
def test_from_hf_config_rejects_non_llama(patch):
    d = {**ModelConfig().to_hf_config(), **patch}
    with pytest.raises(ValueError):
        ModelConfig.from_hf_config(d)


def test_from_hf_config_missing_key():
    d = ModelConfig().to_hf_config()
    del d["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf_config(d)
