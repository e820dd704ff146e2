"""Tokenizers for the engines, incremental detokenization, and what a frontend needs of an engine.

``ByteTokenizer`` needs no files and matches the default ``ModelConfig``
(vocab 320)::

    ids 0..255   the UTF-8 bytes of the text
    256 BOS, 257 EOS, 258 PAD
    259..319     unused (skipped by decode)

``HFTokenizer`` wraps a Hugging Face ``tokenizer.json`` (``tokenizers``
package). ``load_tokenizer`` picks one from a folder. ``IncrementalDecoder``
turns a stream of token ids into text pieces without ever emitting half of a
multi-byte character. ``FrontendInfo`` bundles the three things a frontend
takes from an engine kind (tokenizer, detokenizer, context limit); the engine
registry builds it per ``EngineSpec`` (``llumnix_py.engines.registry.frontend_info``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Protocol, Sequence, Union

if TYPE_CHECKING:
    from llumnix_py.engines.registry import EngineSpec

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
NO_CONTEXT_LIMIT = 1 << 20  # a frontend's max_model_len when neither the spec nor the model caps it
_REPLACEMENT = "\ufffd"
# Tried in order when tokenizer_config.json does not name the special tokens.
_COMMON_EOS = ("</s>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
_COMMON_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")


class Tokenizer(Protocol):
    """What the engine and the server need from a tokenizer."""

    vocab_size: int
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def apply_chat_template(self, messages: list[dict]) -> str: ...


def simple_chat_template(messages: Sequence[dict]) -> str:
    """Renders messages as ``<|role|>\\ncontent\\n`` each, then ``<|assistant|>\\n``.

    Example: ``[{"role": "user", "content": "hi"}]`` gives
    ``"<|user|>\\nhi\\n<|assistant|>\\n"``.

    Raises:
        ValueError: a message is not a dict with string ``role`` and ``content``.
    """
    parts = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs string 'role' and 'content', got {m!r}")
        parts.append(f"<|{m['role']}|>\n{m['content']}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus BOS/EOS/PAD; needs no files.

    Attributes:
        vocab_size: 320, the default ``ModelConfig.vocab_size``.
        bos_token_id: 256.
        eos_token_id: 257.
        pad_token_id: 258.
    """

    vocab_size = 320
    bos_token_id: Optional[int] = BOS_ID
    eos_token_id: Optional[int] = EOS_ID
    pad_token_id: Optional[int] = PAD_ID

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Returns the UTF-8 bytes of ``text``, after BOS if ``add_bos``."""
        ids = list(text.encode("utf-8"))
        return [BOS_ID] + ids if add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of the byte ids; specials and ids >= 259 are skipped,
        invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> str:
        """See ``simple_chat_template``."""
        return simple_chat_template(messages)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` behind the ``ByteTokenizer`` interface.

    BOS/EOS come from ``tokenizer_config.json`` (``bos_token``/``eos_token``)
    when present, else from the first common name found in the vocabulary
    (``</s>``, ``<|endoftext|>``, ``<|eot_id|>``, ...), else None. A Jinja
    ``chat_template`` in ``tokenizer_config.json`` is used when ``jinja2`` is
    installed; otherwise ``simple_chat_template``.

    Args:
        path: folder holding ``tokenizer.json``, or the file itself.

    Raises:
        FileNotFoundError: no ``tokenizer.json`` there.
    """

    def __init__(self, path: Union[str, Path]):
        from tokenizers import Tokenizer as _HFTok

        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {p}")
        self._tok = _HFTok.from_file(str(file))
        self._config = _read_json(file.parent / "tokenizer_config.json")
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token: Optional[str] = self._special("bos_token", _COMMON_BOS)
        self.eos_token: Optional[str] = self._special("eos_token", _COMMON_EOS)
        self.bos_token_id: Optional[int] = self._id(self.bos_token)
        self.eos_token_id: Optional[int] = self._id(self.eos_token)

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tok.token_to_id(token)

    def _special(self, key: str, common: Sequence[str]) -> Optional[str]:
        value = self._config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and self._tok.token_to_id(value) is not None:
            return value
        return next((t for t in common if self._tok.token_to_id(t) is not None), None)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (no post-processor specials); BOS prepended if
        ``add_bos``, the tokenizer has one, and the text does not already start with it."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` with special tokens skipped; ids outside the vocabulary are dropped."""
        valid = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(valid, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """Renders ``messages`` with the checkpoint's template, ending with the assistant's turn."""
        template = self._config.get("chat_template")
        if isinstance(template, str):
            try:
                import jinja2
            except ImportError:
                jinja2 = None
            if jinja2 is not None:
                env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = _raise_template_error
                return env.from_string(template).render(
                    messages=messages, add_generation_prompt=True,
                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        return simple_chat_template(messages)


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def load_tokenizer(path: Optional[Union[str, Path]]) -> Union[ByteTokenizer, HFTokenizer]:
    """Picks the tokenizer for a checkpoint folder.

    Args:
        path: None, a folder, or a ``tokenizer.json`` file.

    Returns:
        ``HFTokenizer`` if ``path`` is a folder with ``tokenizer.json`` (or that
        file itself), else ``ByteTokenizer``.

    Raises:
        FileNotFoundError: ``path`` is given but does not exist (likely a typo).
    """
    if path is None:
        return ByteTokenizer()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {p} does not exist")
    if (p.is_dir() and (p / "tokenizer.json").is_file()) or (p.is_file() and p.suffix == ".json"):
        return HFTokenizer(p)
    return ByteTokenizer()


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces for streaming.

    ``push`` returns only newly completed text: while the decoded tail ends in
    U+FFFD (an incomplete multi-byte character), it is held back until more
    tokens arrive or ``flush`` is called. The pieces of all pushes plus
    ``flush`` concatenate to ``tokenizer.decode(all ids)``.

    Decoding uses a window from the last emitted boundary (``prefix``) so that
    tokenizers whose pieces depend on their left neighbour (leading-space
    handling) decode the same as in one go::

        ids:   ... | prefix .. read | read .. end
                     already emitted   pending

    Args:
        tokenizer: anything with ``decode(ids) -> str``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_ids: Iterable[int]) -> str:
        """Adds tokens; returns the text they complete (may be "")."""
        self._ids.extend(int(t) for t in token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns any held-back text (with U+FFFD for bytes that never completed)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if not final and (text.endswith(_REPLACEMENT) or len(text) < len(prefix_text)):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text):]


@dataclass(frozen=True)
class FrontendInfo:
    """What a frontend takes from the engine kind behind it: how to read and write its tokens,
    and how long a request may be.

    Attributes:
        tokenizer: turns prompts and chat messages into the engine's token ids.
        max_model_len: cap on prompt + output tokens that the frontend validates requests against.
        decoder: builds one request's incremental detokenizer from ``tokenizer``.
    """

    tokenizer: Tokenizer
    max_model_len: int
    decoder: Callable[[Tokenizer], IncrementalDecoder] = IncrementalDecoder

    def detokenizer(self) -> IncrementalDecoder:
        """A new incremental decoder for one request's stream of token ids."""
        return self.decoder(self.tokenizer)


def context_limit(requested: Optional[int], positions: Optional[int]) -> int:
    """The smaller of a spec's ``max_model_len`` and the model's positions (either may be None)."""
    limit = min(requested or positions, positions) if positions else requested
    return limit or NO_CONTEXT_LIMIT


def checkpoint_config(path: Union[str, Path]) -> dict[str, Any]:
    """A checkpoint folder's ``config.json`` (raises ``FileNotFoundError`` if it has none)."""
    with open(Path(path) / "config.json", encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def default_frontend_info(spec: "EngineSpec") -> FrontendInfo:
    """For an engine kind that registers nothing of its own (``sim``, plugins): the checkpoint's
    tokenizer (bytes without one) and the spec's ``max_model_len``."""
    return FrontendInfo(load_tokenizer(spec.checkpoint), context_limit(spec.max_model_len, None))
