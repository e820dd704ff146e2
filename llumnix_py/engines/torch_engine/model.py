"""A Llama-architecture decoder that reads and writes a paged KV cache.

The whole instance shares ONE cache tensor, block-major, so that a block's data
for every layer is contiguous (one slice to copy when a block migrates)::

    kv_cache[block, layer, kv, slot, kv_head, dim]      kv: 0 = K, 1 = V
    shape (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)

A sequence's token at position ``p`` lives in physical block
``block_table[p // block_size]`` at slot ``p % block_size``::

    positions   0 1 2 3 | 4 5 6 7 | 8 9          (block_size = 4)
    block_table [   7   ,    2    ,  5  ]        logical block -> physical block
    kv_cache    block 7 holds 0..3, block 2 holds 4..7, block 5 holds 8, 9

``forward`` takes a flat batch (every sequence's new tokens concatenated), runs
the linear layers over all of it at once, and attends per sequence over the
blocks gathered from its block table. Parameter names follow Hugging Face's
``LlamaForCausalLM`` so checkpoints load one-to-one (see ``loader.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_DTYPES = {"float32": torch.float32, "float64": torch.float64,
           "bfloat16": torch.bfloat16, "float16": torch.float16}
_LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
# ModelConfig field -> Hugging Face LlamaConfig key (dtype is torch_dtype, handled apart).
_HF_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size":
    "intermediate_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "rope_theta": "rope_theta",
    "max_position_embeddings": "max_position_embeddings", "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings"}
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-architecture model.

    The defaults describe a small model (about 3M parameters) whose vocabulary
    fits ``ByteTokenizer``. ``head_dim`` left as None resolves to
    ``hidden_size // num_heads`` at construction, so ``cfg.head_dim`` is always
    an int afterwards (note: ``dataclasses.replace`` keeps the resolved value).
    Raises ``ValueError`` for a size that is not a positive int, ``num_heads``
    not a multiple of ``num_kv_heads``, or an unknown ``dtype``.
    """

    vocab_size: int = 320
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "max_position_embeddings"):
            _check_positive(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                                 f"num_heads ({self.num_heads}) when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _check_positive("head_dim", self.head_dim)
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            _check_positive(name, getattr(self, name), integer=False)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` named by ``dtype``."""
        return _DTYPES[self.dtype]

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "ModelConfig":
        """Builds a config from a Hugging Face ``LlamaConfig`` dict (``config.json``).

        Raises:
            ValueError: the config is not a plain Llama (other architecture or
                model type, biases, a non-SiLU activation, RoPE scaling), a
                required key is missing, or a value is invalid.
        """
        archs = d.get("architectures") or []
        if archs and not any(a in _LLAMA_ARCHITECTURES for a in archs):
            raise ValueError(f"unsupported architectures {archs}; expected LlamaForCausalLM")
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"unsupported model_type {d.get('model_type')!r}; expected 'llama'")
        for key, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False,)),
                             ("mlp_bias", (False,)), ("rope_scaling", ({},))):
            if d.get(key) is not None and d[key] not in allowed:
                raise ValueError(f"unsupported {key} {d[key]!r}; this model supports {allowed}")
        missing = [k for k in _HF_REQUIRED if k not in d]
        if missing:
            raise ValueError(f"config is missing required keys {missing}")
        kw = {ours: d[theirs] for ours, theirs in _HF_KEYS.items() if d.get(theirs) is not None}
        kw.setdefault("num_kv_heads", kw["num_heads"])
        kw["dtype"] = d.get("torch_dtype") or d.get("dtype") or "float32"
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """Returns the Hugging Face ``config.json`` dict for this config (no seed)."""
        out = {"architectures": list(_LLAMA_ARCHITECTURES), "model_type": "llama",
               "hidden_act": "silu", "torch_dtype": self.dtype}
        return out | {theirs: getattr(self, ours) for ours, theirs in _HF_KEYS.items()}


def _check_positive(name: str, value: Any, integer: bool = True) -> None:
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive {'int' if integer else 'number'}, got {value!r}")


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int) -> torch.Tensor:
    """Returns a zeroed cache of shape
    ``(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)`` in the model dtype.
    Raises ``ValueError`` unless ``num_blocks`` and ``block_size`` are positive ints.
    """
    _check_positive("num_blocks", num_blocks)
    _check_positive("block_size", block_size)
    shape = (num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
    return torch.zeros(shape, dtype=cfg.torch_dtype)


@dataclass(frozen=True)
class SeqBatchEntry:
    """One sequence's slice of a flat batch.

    Attributes:
        start: offset of this sequence's new tokens in the flat ``input_ids``.
        num_new: number of new tokens (a prompt chunk for prefill, 1 for decode).
        num_cached: tokens of this sequence already in the KV cache; the new
            tokens take positions ``num_cached .. num_cached + num_new - 1``.
        block_table: LongTensor of physical block ids covering at least
            ``num_cached + num_new`` tokens.
    """

    start: int
    num_new: int
    num_cached: int
    block_table: torch.Tensor


class _Linear(nn.Module):
    """A bias-free linear layer (or embedding table) whose weight is allocated, not initialized."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As in HF Llama: normalize in at least float32, scale in the model dtype.
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _linears(dtype: torch.dtype, **shapes: tuple[int, int]) -> nn.Module:
    """A container module holding one ``_Linear(in, out)`` per keyword."""
    holder = nn.Module()
    for name, (n_in, n_out) in shapes.items():
        holder.add_module(name, _Linear(n_in, n_out, dtype))
    return holder


class _DecoderLayer(nn.Module):
    """Parameters of one layer, named as HF's ``LlamaDecoderLayer``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, dt = cfg.hidden_size, cfg.intermediate_size, cfg.torch_dtype
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.self_attn = _linears(dt, q_proj=(h, q), k_proj=(h, kv), v_proj=(h, kv), o_proj=(q, h))
        self.mlp = _linears(dt, gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        self.input_layernorm = _RMSNorm(h, cfg.rms_norm_eps, dt)
        self.post_attention_layernorm = _RMSNorm(h, cfg.rms_norm_eps, dt)

    def qkv(self, x: torch.Tensor, cfg: ModelConfig, cos: torch.Tensor, sin: torch.Tensor):
        """Normalizes ``x`` (T, hidden); returns rotated q (T, H, d), rotated k and v (T, KVH, d)."""
        a, t, d = self.self_attn, x.shape[0], cfg.head_dim
        x = self.input_layernorm(x)
        q = _apply_rope(a.q_proj(x).view(t, cfg.num_heads, d), cos, sin)
        k = _apply_rope(a.k_proj(x).view(t, cfg.num_kv_heads, d), cos, sin)
        return q, k, a.v_proj(x).view(t, cfg.num_kv_heads, d)

    def finish(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection and residual, then the SwiGLU MLP and its residual."""
        h = h + self.self_attn.o_proj(attn_out.reshape(h.shape[0], -1))
        x, m = self.post_attention_layernorm(h), self.mlp
        return h + m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, dim); cos/sin: (T, dim). HF Llama's ``rotate_half`` convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class LlamaModel(nn.Module):
    """Llama decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) over a paged KV cache.

    Weights are seeded-random (``torch.Generator`` seeded with ``cfg.seed``,
    normal with std 0.02; norm weights 1) unless ``init_weights`` is False, in
    which case they are left uninitialized for a loader to fill.

    Args:
        cfg: the model's shape and dtype.
        init_weights: draw the seeded random weights.
    """

    def __init__(self, cfg: ModelConfig, init_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()                 # HF's LlamaModel: embed_tokens, layers, norm
        self.model.embed_tokens = _Linear(cfg.hidden_size, cfg.vocab_size, cfg.torch_dtype)
        self.model.layers = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.model.norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.torch_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else _Linear(cfg.hidden_size, cfg.vocab_size, cfg.torch_dtype))
        self._rope_len = 0
        self._cos = self._sin = torch.empty(0)
        if init_weights:
            gen = torch.Generator().manual_seed(cfg.seed)
            for name, p in self.named_parameters():
                if not name.endswith("norm.weight"):
                    p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        self.eval()

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cos, sin) of shape (>= length, head_dim) in the model dtype.

        Tables grow by doubling (capped at ``max_position_embeddings``) and are
        computed in float32 like HF's (float64 for float64 models). Raises
        ``ValueError`` when ``length`` exceeds ``max_position_embeddings``.
        """
        cfg = self.cfg
        if length > cfg.max_position_embeddings:
            raise ValueError(f"position {length - 1} is beyond max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        if length > self._rope_len:
            n = min(max(length, 2 * self._rope_len, 1024), cfg.max_position_embeddings)
            ct = torch.float64 if cfg.torch_dtype == torch.float64 else torch.float32
            inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).to(ct) / cfg.head_dim)
            freqs = torch.outer(torch.arange(n, dtype=torch.int64).to(ct), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos().to(cfg.torch_dtype), emb.sin().to(cfg.torch_dtype)
            self._rope_len = n
        return self._cos, self._sin

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.model.norm(h), w).float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, entries: Sequence[SeqBatchEntry],
                kv_cache: torch.Tensor, block_size: int, all_positions: bool = False) -> torch.Tensor:
        """Runs one engine step over a flat batch.

        Writes each new token's K/V into ``kv_cache`` at slot
        ``(block_table[p // block_size], p % block_size)``, attends causally over
        positions ``0 .. num_cached + num_new - 1`` of each sequence, and returns
        the logits of the LAST new token of each entry (of every new token with ``all_positions``).

        Args:
            input_ids: (T,) new tokens of all sequences, concatenated; T = sum of num_new.
            entries: where each sequence's tokens are and which blocks hold it.
            kv_cache: the instance's cache, see ``allocate_kv_cache``; updated in place.
            block_size: tokens per block (must equal ``kv_cache.shape[3]``).

            all_positions: return the logits at every new token (for prompt log-likelihoods).

        Returns:
            float32 tensor of shape (len(entries), vocab_size), or (T, vocab_size) with ``all_positions``.

        Raises:
            ValueError: bad shapes or entries, a block table too short, or a position too far.
        """
        cfg = self.cfg
        expected = (cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        if kv_cache.dim() != 6 or tuple(kv_cache.shape[1:]) != expected:
            raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} does not match "
                             f"(num_blocks, *{expected})")
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
        if not entries:
            return torch.empty(input_ids.numel() if all_positions else 0, cfg.vocab_size, dtype=torch.float32)
        idx, pos, blk, slot = _flatten(entries, block_size, input_ids.numel())
        cos, sin = (table[pos] for table in self.rope_tables(int(pos.max()) + 1))
        kv_shape = (cfg.num_kv_heads, cfg.head_dim)
        h = F.embedding(input_ids[idx], self.model.embed_tokens.weight)
        for layer_id, layer in enumerate(self.model.layers):
            q, k, v = layer.qkv(h, cfg, cos, sin)
            kv_cache[blk, layer_id, 0, slot] = k
            kv_cache[blk, layer_id, 1, slot] = v
            out, offset = torch.empty_like(q), 0
            for e in entries:                       # gather this sequence's blocks, attend
                ctx = e.num_cached + e.num_new
                nb = -(-ctx // block_size)
                table = e.block_table[:nb]
                kc = kv_cache[table, layer_id, 0].view(nb * block_size, *kv_shape)[:ctx]
                vc = kv_cache[table, layer_id, 1].view(nb * block_size, *kv_shape)[:ctx]
                out[offset:offset + e.num_new] = _paged_attention(
                    q[offset:offset + e.num_new], kc, vc, e.num_cached)
                offset += e.num_new
            h = layer.finish(h, out)
        if all_positions:
            return self._logits(h)
        last = torch.tensor([e.num_new for e in entries]).cumsum(0) - 1
        return self._logits(h[last])


def _flatten(entries: Sequence[SeqBatchEntry], block_size: int, num_ids: int):
    """Validates entries; returns, per new token in entry order, its index in
    ``input_ids``, its position, and its cache (block, slot)."""
    idx, positions, blocks = [], [], []
    for e in entries:
        ctx = e.num_cached + e.num_new
        if e.num_new <= 0 or e.num_cached < 0 or e.start < 0 or e.start + e.num_new > num_ids:
            raise ValueError(f"bad entry {e}: need num_new > 0, num_cached >= 0 and "
                             f"0 <= start, start + num_new <= {num_ids} (len(input_ids))")
        if e.block_table.numel() * block_size < ctx:
            raise ValueError(f"block table of {e.block_table.numel()} blocks cannot hold "
                             f"{ctx} tokens at block_size {block_size}")
        pos = torch.arange(e.num_cached, ctx)
        idx.append(torch.arange(e.start, e.start + e.num_new))
        positions.append(pos)
        blocks.append(e.block_table[pos // block_size].long())
    pos = torch.cat(positions)
    return torch.cat(idx), pos, torch.cat(blocks), pos % block_size


def _paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     num_cached: int) -> torch.Tensor:
    """q: (n, H, d) at positions num_cached..; k, v: (ctx, KVH, d). Returns (n, H, d)."""
    n, ctx = q.shape[0], k.shape[0]
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    causal = n > 1 and num_cached == 0           # a whole prompt; a decode token sees everything
    mask = None if n == 1 or causal else (       # a chunk after a cached prefix
        torch.arange(ctx)[None, :] <= (num_cached + torch.arange(n))[:, None])
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                       enable_gqa=q.shape[0] != k.shape[0])
    return o.transpose(0, 1)


@torch.inference_mode()
def dense_reference_forward(model: LlamaModel, token_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits (n, vocab_size) at every position of ONE sequence ``token_ids`` (n,).

    The test oracle for ``LlamaModel.forward``: the same weights, no cache, an
    explicit softmax(QK^T / sqrt(d)) with a causal mask and K/V heads repeated for GQA.
    """
    cfg = model.cfg
    n = token_ids.numel()
    cos, sin = model.rope_tables(n)
    rep = cfg.num_heads // cfg.num_kv_heads
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    h = F.embedding(token_ids.reshape(-1), model.model.embed_tokens.weight)
    for layer in model.model.layers:
        q, k, v = layer.qkv(h, cfg, cos[:n], sin[:n])
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(cfg.head_dim)
        scores = scores.masked_fill(future, float("-inf"))
        probs = scores.to(torch.promote_types(q.dtype, torch.float32)).softmax(-1).to(q.dtype)
        h = layer.finish(h, torch.einsum("hqk,khd->qhd", probs, v))
    return model._logits(h)
