"""A tiny random Llama checkpoint that vLLM can load offline.

Nothing is downloaded: the weights are seeded random (``transformers.LlamaConfig``,
hidden 128, 2 layers) and the tokenizer is a byte-level BPE trained here on a few
lines of text. Weights are drawn with a large standard deviation so that logits
are decisive (greedy decoding does not hinge on rounding-level ties) yet the
generated text is not a single repeated token.
"""

from __future__ import annotations

import json
from pathlib import Path

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Live migration moves the KV cache of a running request between instances.",
    "Llumnix keeps deciding: it reschedules requests while they generate tokens.",
    "A block manager hands out fixed-size blocks of key and value vectors.",
    "Hello world! Numbers 0123456789 and punctuation ,.;:?!'\"()[]{}",
] * 20

VOCAB_SIZE = 512
BOS, EOS = "<s>", "</s>"


def make_tokenizer(folder: Path) -> int:
    """Train and save a byte-level BPE tokenizer; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "model_max_length": 512, "add_bos_token": False, "clean_up_tokenization_spaces": False,
    }))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    return tok.get_vocab_size()


def make_tiny_llama(folder: Path, seed: int = 0, std: float = 0.3) -> Path:
    """Write a 2-layer Llama (random weights) and its tokenizer into ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, torch_dtype="bfloat16",
        initializer_range=std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
    return folder


if __name__ == "__main__":  # python tests_vllm/tiny_checkpoint.py OUT_DIR
    import sys

    print(make_tiny_llama(Path(sys.argv[1])))
