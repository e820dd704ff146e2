"""Checkpoint save/load in the Hugging Face Llama layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from llumnix_py.engines.torch_engine.loader import load_checkpoint, save_checkpoint
from llumnix_py.engines.torch_engine.model import (
    LlamaModel,
    ModelConfig,
    SeqBatchEntry,
    allocate_kv_cache,
)

SMALL = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_layers=2,
             num_heads=4, num_kv_heads=2)


def make_model(**kw) -> LlamaModel:
    return LlamaModel(ModelConfig(**{**SMALL, **kw}))


def logits(model: LlamaModel, n: int = 11) -> torch.Tensor:
    tokens = torch.randint(0, model.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(7))
    cache = allocate_kv_cache(model.cfg, 4, 4)
    return model(tokens, [SeqBatchEntry(0, n, 0, torch.tensor([3, 0, 2]))], cache, 4)


def hf_tensors(cfg: ModelConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """HF Llama tensor names and shapes, written by hand (not from the model)."""
    g = torch.Generator().manual_seed(seed)
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    out = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "model.norm.weight": 1 + rnd(h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        out |= {
            p + "self_attn.q_proj.weight": rnd(cfg.num_heads * d, h),
            p + "self_attn.k_proj.weight": rnd(cfg.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": rnd(cfg.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": rnd(h, cfg.num_heads * d),
            p + "mlp.gate_proj.weight": rnd(i, h),
            p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i),
            p + "input_layernorm.weight": 1 + rnd(h),
            p + "post_attention_layernorm.weight": 1 + rnd(h),
        }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = rnd(cfg.vocab_size, h)
    return out


def write_hf_checkpoint(path, cfg: ModelConfig, tensors: dict, extra_config: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "rope_theta": 500000.0, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, **(extra_config or {}),
    }
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))


def test_round_trip_gives_identical_logits(tmp_path):
    model = make_model()
    save_checkpoint(model, tmp_path / "ckpt")
    cfg, loaded = load_checkpoint(tmp_path / "ckpt")
    assert cfg == model.cfg
    for (na, a), (nb, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert na == nb and torch.equal(a, b)
    assert torch.equal(logits(model), logits(loaded))


def test_round_trip_tied_and_dtype_override(tmp_path):
    model = make_model(tie_word_embeddings=True, dtype="float64")
    save_checkpoint(model, str(tmp_path))
    cfg, loaded = load_checkpoint(str(tmp_path))
    assert cfg.tie_word_embeddings and loaded.lm_head is None
    assert torch.equal(logits(model), logits(loaded))
    cfg32, loaded32 = load_checkpoint(tmp_path, dtype="float32")
    assert cfg32.dtype == "float32" and loaded32.model.norm.weight.dtype == torch.float32
    torch.testing.assert_close(logits(loaded32), logits(model), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_hand_written_hf_checkpoint_loads(tmp_path, tied):
    cfg = ModelConfig(**SMALL, tie_word_embeddings=tied)
    tensors = hf_tensors(cfg)
    write_hf_checkpoint(tmp_path, cfg, tensors)
    loaded_cfg, model = load_checkpoint(tmp_path, dtype="float32")
    assert loaded_cfg.rope_theta == 500000.0 and loaded_cfg.rms_norm_eps == 1e-6
    assert loaded_cfg.max_position_embeddings == 2048
    params = dict(model.named_parameters())
    assert set(params) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(params[name], t), name
    assert (model.lm_head is None) == tied
    assert torch.isfinite(logits(model)).all()
    assert load_checkpoint(tmp_path)[0].dtype == "bfloat16"


def test_rotary_inv_freq_buffers_and_tied_lm_head_are_ignored(tmp_path):
    cfg = ModelConfig(**SMALL, tie_word_embeddings=True)
    tensors = hf_tensors(cfg)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    write_hf_checkpoint(tmp_path, cfg, tensors)
    _, model = load_checkpoint(tmp_path)
    assert model.lm_head is None


def test_missing_tensor_raises(tmp_path):
    cfg = ModelConfig(**SMALL)
    tensors = hf_tensors(cfg)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_hf_checkpoint(tmp_path, cfg, tensors)
    with pytest.raises(ValueError, match="missing tensors.*layers.1.mlp.up_proj"):
        load_checkpoint(tmp_path)


def test_unexpected_tensor_raises(tmp_path):
    cfg = ModelConfig(**SMALL)
    tensors = hf_tensors(cfg) | {"model.layers.2.mlp.up_proj.weight": torch.zeros(1)}
    write_hf_checkpoint(tmp_path, cfg, tensors)
    with pytest.raises(ValueError, match="unexpected tensors.*layers.2"):
        load_checkpoint(tmp_path)


def test_wrong_shape_raises(tmp_path):
    cfg = ModelConfig(**SMALL)
    tensors = hf_tensors(cfg)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, cfg.hidden_size)
    write_hf_checkpoint(tmp_path, cfg, tensors)
    with pytest.raises(ValueError, match="k_proj.*shape"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("extra", [{"architectures": ["GPT2LMHeadModel"]}, {"model_type": "qwen2"}])
def test_non_llama_config_raises(tmp_path, extra):
    cfg = ModelConfig(**SMALL)
    write_hf_checkpoint(tmp_path, cfg, hf_tensors(cfg), extra)
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path)


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig(**SMALL).to_hf_config()))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)


def test_sharded_index_loads(tmp_path):
    model = make_model()
    tensors = {n: t.contiguous() for n, t in model.state_dict().items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(tmp_path / file))
        weight_map |= {n: file for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(model.cfg.to_hf_config()))
    _, loaded = load_checkpoint(tmp_path)
    assert torch.equal(logits(model), logits(loaded))


def test_sharded_index_with_missing_shard_or_escape_raises(tmp_path):
    model = make_model()
    (tmp_path / "config.json").write_text(json.dumps(model.cfg.to_hf_config()))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "nope.safetensors"}}))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../x.safetensors"}}))
    with pytest.raises(ValueError, match="inside"):
        load_checkpoint(tmp_path)
