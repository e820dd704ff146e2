"""Byte and Hugging Face tokenizers, and incremental detokenization."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.engines.torch_engine.model import ModelConfig
from llumnix_py.engines.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDecoder,
    load_tokenizer,
)

SENTENCES = [
    "Live migration moves a request's KV cache while it keeps decoding.",
    "The global scheduler pairs the least free instance with the freest one.",
    "Héllo wörld, naïve café — ünïcödé tëxt 日本語 テキスト 🙂 emoji too.",
    "Blocks of sixteen tokens each; the block table maps logical to physical.",
] * 4


def make_hf_tokenizer_dir(path, with_config: bool = True):
    """Trains a tiny byte-level BPE tokenizer and saves it like a HF checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if with_config:
        (path / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
                             "{{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}[assistant] {% endif %}",
        }))
    return path


@settings(derandomize=True)
@given(st.text(max_size=200))
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 256
    assert all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == ids[1:]


def test_byte_decode_skips_specials_and_replaces_invalid():
    tok = ByteTokenizer()
    assert tok.vocab_size == ModelConfig().vocab_size
    ids = [256, *b"ab", 257, 258, 300, 319, *"é".encode(), 257]
    assert tok.decode(ids) == "abé"
    assert tok.decode([0xFF, ord("x")]) == "\ufffdx"
    assert tok.eos_token_id == 257


def test_chat_template():
    tok = ByteTokenizer()
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "hi"}])
    assert text == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user"}])


def _chunks(ids: list[int], cuts: list[int]) -> list[list[int]]:
    bounds = sorted({c % (len(ids) + 1) for c in cuts} | {0, len(ids)})
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=200, derandomize=True)
@given(text=st.text(max_size=60), cuts=st.lists(st.integers(0, 1000), max_size=20))
def test_incremental_decoder_never_splits_a_character(text, cuts):
    tok = ByteTokenizer()
    ids = tok.encode(text) + [tok.eos_token_id]
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(chunk) for chunk in _chunks(ids, cuts)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text
    assert dec.flush() == ""


@settings(max_examples=200, derandomize=True)
@given(ids=st.lists(st.integers(0, 319), max_size=80), cuts=st.lists(st.integers(0, 1000), max_size=20))
def test_incremental_decoder_concatenation_equals_decode_for_any_bytes(ids, cuts):
    tok = ByteTokenizer()
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(chunk) for chunk in _chunks(ids, cuts)]
    assert "".join(pieces) + dec.flush() == tok.decode(ids)


def test_incremental_decoder_holds_back_partial_utf8():
    tok = ByteTokenizer()
    dec = IncrementalDecoder(tok)
    snake = list("🐍".encode())
    assert dec.push([ord("a")]) == "a"
    assert dec.push(snake[:1]) == ""
    assert dec.push(snake[1:3]) == ""
    assert dec.push(snake[3:]) == "🐍"
    assert dec.push([0xF0]) == ""
    assert dec.flush() == "\ufffd"


def test_hf_tokenizer_round_trip(tmp_path):
    tok = HFTokenizer(make_hf_tokenizer_dir(tmp_path))
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1 and tok.vocab_size == 400
    for text in SENTENCES[:4] + ["unseen wörds 🙂 still round-trip"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_token_id]) == text
        assert tok.encode(text, add_bos=False) == ids[1:]
    assert len(tok.encode(SENTENCES[0], add_bos=False)) < len(SENTENCES[0].encode()) // 2


def test_hf_incremental_decoder(tmp_path):
    tok = HFTokenizer(make_hf_tokenizer_dir(tmp_path))
    text = SENTENCES[2] + " " + SENTENCES[0]
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push([i]) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text


def test_hf_special_tokens_fallback_and_chat_template(tmp_path):
    tok = HFTokenizer(make_hf_tokenizer_dir(tmp_path / "plain", with_config=False))
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1          # found as <s>, </s>
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "<|user|>\nhi\n<|assistant|>\n"
    templated = HFTokenizer(make_hf_tokenizer_dir(tmp_path / "tmpl"))
    text = templated.apply_chat_template(msgs)
    assert text == "<s>[user] hi\n[assistant] "
    ids = templated.encode(text)
    assert ids.count(templated.bos_token_id) == 1                   # BOS not doubled


def test_load_tokenizer_picks_class(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)   # no tokenizer.json
    make_hf_tokenizer_dir(tmp_path / "hf")
    assert isinstance(load_tokenizer(tmp_path / "hf"), HFTokenizer)
    assert isinstance(load_tokenizer(str(tmp_path / "hf" / "tokenizer.json")), HFTokenizer)
    with pytest.raises(FileNotFoundError):
        HFTokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "typo")
