"""What a frontend takes from an engine kind: tokenizer, detokenizer, context limit, default block size."""

from __future__ import annotations

import json

import pytest

from llumnix_py.engines.core import EngineConfig, EngineCore
from llumnix_py.engines.registry import (FRONTEND_INFO, EngineSpec, default_block_size, frontend_info,
                                         register_engine)
from llumnix_py.engines.tokenizer import NO_CONTEXT_LIMIT, ByteTokenizer, FrontendInfo, IncrementalDecoder
from llumnix_py.engines.torch_engine.model import ModelConfig


def write_config(folder, **fields) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(fields))
    return str(folder)


def test_torch_without_checkpoint_is_capped_by_the_model_shape():
    positions = ModelConfig().max_position_embeddings
    info = frontend_info(EngineSpec(kind="torch"))
    assert isinstance(info.tokenizer, ByteTokenizer) and info.max_model_len == positions
    assert frontend_info(EngineSpec(kind="torch", max_model_len=100)).max_model_len == 100
    assert frontend_info(EngineSpec(kind="torch", max_model_len=positions * 2)).max_model_len == positions
    small = EngineSpec(kind="torch", model=(("max_position_embeddings", 512),))
    assert frontend_info(small).max_model_len == 512


def test_torch_checkpoint_limit_comes_from_its_config(tmp_path):
    ckpt = write_config(tmp_path / "ckpt", max_position_embeddings=300)
    assert frontend_info(EngineSpec(kind="torch", checkpoint=ckpt)).max_model_len == 300
    bare = write_config(tmp_path / "bare")
    assert frontend_info(EngineSpec(kind="torch", checkpoint=bare)).max_model_len == 2048


def test_vllm_limit_is_read_from_the_checkpoint_without_vllm(tmp_path):
    ckpt = write_config(tmp_path / "ckpt", max_position_embeddings=1024)
    assert frontend_info(EngineSpec(kind="vllm", checkpoint=ckpt)).max_model_len == 1024
    assert frontend_info(EngineSpec(kind="vllm", checkpoint=ckpt, max_model_len=64)).max_model_len == 64
    unnamed = write_config(tmp_path / "unnamed")
    assert frontend_info(EngineSpec(kind="vllm", checkpoint=unnamed, max_model_len=64)).max_model_len == 64
    assert frontend_info(EngineSpec(kind="vllm", checkpoint=unnamed)).max_model_len == NO_CONTEXT_LIMIT


def test_sim_and_unregistered_kinds_get_the_default():
    assert frontend_info(EngineSpec(kind="sim")).max_model_len == NO_CONTEXT_LIMIT
    assert frontend_info(EngineSpec(kind="sim", max_model_len=77)).max_model_len == 77
    register_engine("test-frontend-info-plain", lambda spec: EngineCore(spec.engine, None))
    info = frontend_info(EngineSpec(kind="test-frontend-info-plain"))
    assert isinstance(info.tokenizer, ByteTokenizer) and info.max_model_len == NO_CONTEXT_LIMIT


def test_a_plugin_registers_its_own_frontend_info():
    class Upper(IncrementalDecoder):
        def push(self, token_ids):
            return super().push(token_ids).upper()

    def info(spec: EngineSpec) -> FrontendInfo:
        return FrontendInfo(ByteTokenizer(), 42, decoder=Upper)

    register_engine("test-frontend-info-own", lambda spec: EngineCore(spec.engine, None), frontend_info=info)
    got = frontend_info(EngineSpec(kind="test-frontend-info-own"))
    assert got.max_model_len == 42 and got.detokenizer().push(ByteTokenizer().encode("ab", add_bos=False)) == "AB"
    assert "test-frontend-info-own" in FRONTEND_INFO
    with pytest.raises(TypeError):
        register_engine("test-frontend-info-bad", lambda spec: None, frontend_info="not callable")  # type: ignore


def test_detokenizer_is_new_per_request():
    info = frontend_info(EngineSpec(kind="sim"))
    a, b = info.detokenizer(), info.detokenizer()
    assert a is not b and a.push([104, 105]) == "hi" and b.push([]) == ""


def test_default_block_size_per_kind():
    assert default_block_size("torch") == default_block_size("sim") == EngineConfig().block_size
    assert default_block_size("vllm") == 32
