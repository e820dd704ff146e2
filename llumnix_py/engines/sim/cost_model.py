"""A roofline cost model for one engine step and for moving KV blocks.

The simulated engine needs three numbers, all in seconds: how long one
iteration of continuous batching takes (``step_time``), how long copying KV
blocks between instances takes (``migration_time``), and how long recomputing a
sequence takes (``recompute_time``). This module derives them from a model and
a hardware description plus three calibration constants; ``profiles.py`` holds
calibrated instances and a least-squares fit to measured step times.

Units: "GB" is 10**9 bytes throughout (memory capacity, bandwidths, link).

Roofline of one pass over the model (tensor parallel over ``num_gpus``, so peak
FLOP/s and memory bandwidth add up across GPUs and the weights are read once per
pass)::

    flops  = 2 * params * (prefill_tokens + decode_seqs)           # GEMMs
           + 4 * layers * hidden * (prefill_ctx + decode_ctx)      # QK^T and AV
    mem_s  = weight_bytes / (bandwidth * bandwidth_efficiency * gpus)
           + kv_bytes_per_token * (decode_ctx + prefill_tokens)
             / (bandwidth * attention_bandwidth_efficiency * gpus)
    pass_s = max(flops / (peak * prefill_efficiency * gpus), mem_s)
    step   = overhead + per_seq_overhead * decode_seqs + pass_s(...)

A *fused* mixed step (``fused_mixed_steps=True``: prefill and decode tokens in one
batch, as chunked-prefill engines run them) is one pass and pays the max of
compute and memory time: the weights stream once and the GEMMs of all tokens
overlap with that stream. A *serial* engine (``fused_mixed_steps=False``: vLLM
up to 0.3 never batches a prompt with decodes; Llumnix's own simulator adds the
prefill and decode latencies of a step) pays one pass for the prefill tokens plus
one for the decodes. ``prefill_ctx`` is the number of (query, key) pairs of the
prefill tokens; see ``causal_context``. An empty step costs 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

_GB = 1e9


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def causal_context(num_cached: int, num_new: int) -> int:
    """Attention (query, key) pairs of ``num_new`` tokens appended after ``num_cached``.

    Token ``j`` of the chunk (0-based) attends to ``num_cached + j + 1`` keys::

        cached: |c c c c|        new: |n0 n1 n2|
        n0 sees c c c c n0              -> num_cached + 1
        n2 sees c c c c n0 n1 n2        -> num_cached + 3
        total = num_new * num_cached + num_new * (num_new + 1) / 2
    """
    _check_count("num_cached", num_cached)
    _check_count("num_new", num_new)
    return num_new * num_cached + num_new * (num_new + 1) // 2


@dataclass(frozen=True)
class HardwareSpec:
    """One instance's hardware.

    Attributes:
        name: label, e.g. ``"A10-24GB"``.
        num_gpus: GPUs of one instance (tensor parallel).
        peak_tflops: dense fp16 peak per GPU, TFLOP/s.
        mem_bandwidth_gbps: memory bandwidth per GPU, GB/s.
        mem_gb: memory per GPU, GB.
        link_gbps: effective bandwidth of the migration path of the whole
            instance (all its GPUs together) to an instance on the same node, GB/s.
        cross_node_link_gbps: the same to an instance on another node, GB/s (the
            network); ``None``: as ``link_gbps`` (no node boundary is modelled).
        tp_link_gbps: per-GPU, per-direction bandwidth of the link tensor-parallel
            all-reduces run over (NVLink), GB/s; with it, a step of an instance of more
            than one GPU pays its all-reduces explicitly (``CostProfile.allreduce_time``).
            ``None``: they are folded into the calibration constants (the A10 profiles),
            and the profile cannot be re-sized (``profiles.with_tensor_parallel``).
        allreduce_latency_s: fixed cost of one all-reduce (launch and synchronisation), seconds.
        link_latency_s: fixed cost of one migration transfer (a round trip of
            control messages), seconds.
        host_link_gbps: bandwidth between one GPU and host memory, per direction,
            GB/s (the PCIe link; the instance's GPUs copy their KV shards in parallel).
        host_copy_overhead_s: fixed cost of one host<->GPU copy (issuing it, setting
            up its DMA), seconds.
    """

    name: str
    num_gpus: int
    peak_tflops: float
    mem_bandwidth_gbps: float
    mem_gb: float
    link_gbps: float
    link_latency_s: float = 1e-3
    host_link_gbps: float = 32.0
    host_copy_overhead_s: float = 1e-5
    cross_node_link_gbps: Optional[float] = None
    tp_link_gbps: Optional[float] = None
    allreduce_latency_s: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.num_gpus, bool) or not isinstance(self.num_gpus, int) or self.num_gpus < 1:
            raise ValueError(f"num_gpus must be an integer >= 1, got {self.num_gpus!r}")
        for name in ("peak_tflops", "mem_bandwidth_gbps", "mem_gb", "link_gbps", "host_link_gbps"):
            _check_positive(name, getattr(self, name))
        if not math.isfinite(self.link_latency_s) or self.link_latency_s < 0:
            raise ValueError(f"link_latency_s must be >= 0, got {self.link_latency_s!r}")
        if not math.isfinite(self.host_copy_overhead_s) or self.host_copy_overhead_s < 0:
            raise ValueError(f"host_copy_overhead_s must be >= 0, got {self.host_copy_overhead_s!r}")
        for name in ("cross_node_link_gbps", "tp_link_gbps"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if not math.isfinite(self.allreduce_latency_s) or self.allreduce_latency_s < 0:
            raise ValueError(f"allreduce_latency_s must be >= 0, got {self.allreduce_latency_s!r}")

    def pair_link_gbps(self, cross_node: bool) -> float:
        """The migration bandwidth between two instances on the same node or not, GB/s."""
        if cross_node and self.cross_node_link_gbps is not None:
            return self.cross_node_link_gbps
        return self.link_gbps


@dataclass(frozen=True)
class ModelSpec:
    """The parts of a decoder-only transformer that set its cost.

    Attributes:
        name: label, e.g. ``"llama-7b"``.
        num_params: parameter count.
        num_layers: transformer layers.
        hidden_size: model width (query heads * head dim).
        num_kv_heads: key/value heads (= query heads without GQA).
        head_dim: width of one head.
        dtype_bytes: bytes per weight and per KV element (2 for fp16).
    """

    name: str
    num_params: float
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        _check_positive("num_params", self.num_params)
        for name in ("num_layers", "hidden_size", "num_kv_heads", "head_dim", "dtype_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class CostProfile:
    """A model on a hardware instance, with the constants that calibrate the roofline.

    Attributes:
        model: the model.
        hw: the instance's hardware.
        prefill_efficiency: fraction of peak FLOP/s that GEMMs achieve (in (0, 1]);
            with tensor parallelism it also absorbs the all-reduce time.
        decode_overhead_s: fixed cost of every non-empty step (kernel launches,
            scheduling, Python, tensor-parallel synchronisation), seconds.
        mem_reserved_frac: fraction of GPU memory not usable for weights or KV
            (activations, allocator slack, CUDA context), in [0, 1).
        block_size: tokens per KV block.
        bandwidth_efficiency: fraction of peak memory bandwidth achieved streaming
            the weights, in (0, 1].
        attention_bandwidth_efficiency: fraction of peak memory bandwidth achieved
            reading and writing the KV cache (the paged-attention kernel), in
            (0, 1]; ``None``: same as ``bandwidth_efficiency``.
        per_seq_overhead_s: CPU cost of each decoding sequence in a step (input
            preparation, sampling, output processing), seconds.
        fused_mixed_steps: a step with both prefill and decode work is one pass
            (max of compute and memory); ``False``: two passes, their times add.
    """

    model: ModelSpec
    hw: HardwareSpec
    prefill_efficiency: float
    decode_overhead_s: float
    mem_reserved_frac: float
    block_size: int = 16
    bandwidth_efficiency: float = 1.0
    attention_bandwidth_efficiency: Optional[float] = None
    per_seq_overhead_s: float = 0.0
    fused_mixed_steps: bool = True

    def __post_init__(self) -> None:
        if self.attention_bandwidth_efficiency is None:
            object.__setattr__(self, "attention_bandwidth_efficiency", self.bandwidth_efficiency)
        if not math.isfinite(self.per_seq_overhead_s) or self.per_seq_overhead_s < 0:
            raise ValueError(f"per_seq_overhead_s must be >= 0, got {self.per_seq_overhead_s!r}")
        for name in ("prefill_efficiency", "bandwidth_efficiency", "attention_bandwidth_efficiency"):
            value = getattr(self, name)
            _check_positive(name, value)
            if value > 1:
                raise ValueError(f"{name} must be <= 1, got {value!r}")
        if not math.isfinite(self.decode_overhead_s) or self.decode_overhead_s < 0:
            raise ValueError(f"decode_overhead_s must be >= 0, got {self.decode_overhead_s!r}")
        if not (0 <= self.mem_reserved_frac < 1):
            raise ValueError(f"mem_reserved_frac must be in [0, 1), got {self.mem_reserved_frac!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if self.num_blocks < 1:
            raise ValueError(
                f"{self.model.name} does not fit on {self.hw.name}: "
                f"{self.weight_bytes / _GB:.1f} GB of weights, {self.usable_mem_bytes / _GB:.1f} GB usable"
            )

    # ---- derived sizes -------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer: ``2 * layers * kv_heads * head_dim * dtype_bytes``."""
        m = self.model
        return 2 * m.num_layers * m.num_kv_heads * m.head_dim * m.dtype_bytes

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block (all layers, all GPUs of the instance)."""
        return self.kv_bytes_per_token * self.block_size

    @property
    def weight_bytes(self) -> float:
        """Bytes of the weights (summed over the instance's GPUs)."""
        return self.model.num_params * self.model.dtype_bytes

    @property
    def usable_mem_bytes(self) -> float:
        """Instance memory left for weights and KV after the reserved fraction."""
        return self.hw.num_gpus * self.hw.mem_gb * _GB * (1.0 - self.mem_reserved_frac)

    @property
    def num_blocks(self) -> int:
        """KV capacity in blocks: ``(mem * (1 - reserved) - weights) / block bytes``."""
        return max(0, int((self.usable_mem_bytes - self.weight_bytes) // self.kv_block_bytes))

    @property
    def kv_tokens(self) -> int:
        """KV capacity in tokens: ``num_blocks * block_size``."""
        return self.num_blocks * self.block_size

    # ---- times ---------------------------------------------------------------
    @property
    def _flops_per_s(self) -> float:
        return self.hw.peak_tflops * 1e12 * self.prefill_efficiency * self.hw.num_gpus

    @property
    def _bytes_per_s(self) -> float:
        return self.hw.mem_bandwidth_gbps * _GB * self.bandwidth_efficiency * self.hw.num_gpus

    @property
    def _kv_bytes_per_s(self) -> float:
        return self.hw.mem_bandwidth_gbps * _GB * self.attention_bandwidth_efficiency * self.hw.num_gpus

    def allreduce_time(self, tokens: int) -> float:
        """The tensor-parallel all-reduces of one pass over ``tokens`` (0 on one GPU, or
        where ``hw.tp_link_gbps`` is None): two a layer (after attention and after the MLP,
        Megatron-style), each of ``tokens * hidden * dtype_bytes`` bytes, as a ring
        (``2 (g - 1) / g`` of the bytes over each GPU's link) plus a fixed latency; on the
        critical path, not overlapped with the GEMMs."""
        if self.hw.num_gpus == 1 or self.hw.tp_link_gbps is None:
            return 0.0
        return 2 * self.model.num_layers * (self.hw.allreduce_latency_s + self._ring_s(tokens))

    def _ring_s(self, tokens: int) -> float:
        """One all-reduce's ring transfer of ``tokens`` (``2 (g - 1) / g`` of its bytes over each
        GPU's link), without its latency: it adds up across a batch. Only with tensor parallelism."""
        g, m = self.hw.num_gpus, self.model
        return 2.0 * (g - 1) / g * tokens * m.hidden_size * m.dtype_bytes / (self.hw.tp_link_gbps * _GB)

    def _pass_time(self, tokens: int, pairs: int, kv_tokens: int) -> float:
        """One pass over the model: ``tokens`` through the GEMMs, ``pairs`` attention
        (query, key) pairs, ``kv_tokens`` of KV cache read or written, plus its all-reduces."""
        m = self.model
        flops = 2.0 * m.num_params * tokens + 4.0 * m.num_layers * m.hidden_size * pairs
        mem_s = self.weight_bytes / self._bytes_per_s + self.kv_bytes_per_token * kv_tokens / self._kv_bytes_per_s
        return max(flops / self._flops_per_s, mem_s) + self.allreduce_time(tokens)

    def step_time(
        self,
        num_prefill_tokens: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
        prefill_context_tokens: Optional[int] = None,
    ) -> float:
        """Duration of one engine step, seconds.

        Args:
            num_prefill_tokens: prompt (or recomputed) tokens computed this step.
            num_decode_seqs: sequences that decode one token this step.
            decode_context_tokens: KV tokens the decode sequences attend to,
                summed over them (each counts its new token too).
            prefill_context_tokens: (query, key) pairs of the prefill tokens,
                summed over sequences (see ``causal_context``); ``None`` assumes
                one fresh sequence of ``num_prefill_tokens``.

        Raises:
            ValueError: a negative or non-integer count.
        """
        _check_count("num_prefill_tokens", num_prefill_tokens)
        _check_count("num_decode_seqs", num_decode_seqs)
        _check_count("decode_context_tokens", decode_context_tokens)
        if prefill_context_tokens is None:
            prefill_context_tokens = causal_context(0, num_prefill_tokens)
        _check_count("prefill_context_tokens", prefill_context_tokens)
        if num_prefill_tokens == 0 and num_decode_seqs == 0:
            return 0.0
        fixed = self.decode_overhead_s + self.per_seq_overhead_s * num_decode_seqs
        if self.fused_mixed_steps or num_prefill_tokens == 0 or num_decode_seqs == 0:
            return fixed + self._pass_time(
                num_prefill_tokens + num_decode_seqs,
                prefill_context_tokens + decode_context_tokens,
                decode_context_tokens + num_prefill_tokens,
            )
        return (
            fixed
            + self._pass_time(num_prefill_tokens, prefill_context_tokens, num_prefill_tokens)
            + self._pass_time(num_decode_seqs, decode_context_tokens, decode_context_tokens)
        )

    def prefill_work_s(self, prompt_len: int) -> float:
        """A lower bound on the step time any schedule spends prefilling one fresh prompt of
        ``prompt_len`` tokens, however it is batched or chunked: its GEMM and attention FLOPs
        at the profile's FLOP/s, plus the bytes of its tokens in the tensor-parallel
        all-reduces. A step's time is at least the sum of these over its prompts (FLOPs and
        all-reduce bytes add up across a batch); what a batch shares (the weight reads, the
        fixed overheads, the all-reduce latencies) is left out. ``experiments/pd_bound.py``
        bounds a prefill instance's throughput with it."""
        _check_count("prompt_len", prompt_len)
        ring = 0.0 if self.hw.num_gpus == 1 or self.hw.tp_link_gbps is None else \
            2 * self.model.num_layers * self._ring_s(prompt_len)
        return self._prefill_flops(prompt_len) / self._flops_per_s + ring

    def _prefill_flops(self, prompt_len: int) -> float:
        m = self.model
        return 2.0 * m.num_params * prompt_len + 4.0 * m.num_layers * m.hidden_size * causal_context(0, prompt_len)

    def prefill_latency_floor_s(self, prompt_len: int) -> float:
        """A lower bound on the time from the start of the first step that prefills a fresh
        prompt of ``prompt_len`` tokens to its first token, however it is batched or chunked:
        one step's fixed cost, the larger of its FLOPs at the profile's FLOP/s and one read of
        the weights, and its all-reduces. Chunks over ``k`` steps pay ``k`` fixed costs and
        weight reads and the same FLOPs in all, and a batch only adds FLOPs, so no schedule
        beats it; a prompt whose floor exceeds its TTFT objective misses it wherever it runs.
        ``experiments/pd_bound.py`` counts those misses."""
        _check_count("prompt_len", prompt_len)
        compute = self._prefill_flops(prompt_len) / self._flops_per_s
        return self.decode_overhead_s + max(compute, self.weight_bytes / self._bytes_per_s) \
            + self.allreduce_time(prompt_len)

    @property
    def prefill_and_decode_add(self) -> bool:
        """Whether a step's time is at least its prompts' ``prefill_work_s`` plus
        ``decode_step_floor_s`` of its decode context (when it decodes): true of serial mixed
        steps (two passes whose times add), not of fused ones (one pass, the max of compute and
        memory time). Then an instance spends a second on prefill work and decode reads
        together, not on each apart (``llumnix_py.planner.work_cap``)."""
        return not self.fused_mixed_steps

    def decode_read_s(self, context_tokens: int) -> float:
        """A lower bound on the step time any schedule spends on decode steps that read
        ``context_tokens`` tokens of KV in all (summed over sequences and steps): their bytes
        at the profile's attention bandwidth. A step's time is at least this for its decode
        context, however the step is batched or mixed with prompts (the memory side of the
        roofline); what the steps share (the weight reads, the fixed overheads) is left out.
        A request of ``p`` prompt and ``o`` output tokens reads ``(o - 1) p + (o - 1) o / 2``
        over its decode steps. ``experiments/pd_bound.py`` bounds the rate any layout of a
        GPU budget can sustain with it."""
        _check_count("context_tokens", context_tokens)
        return self.kv_bytes_per_token * context_tokens / self._kv_bytes_per_s

    def decode_step_floor_s(self, context_tokens: int) -> float:
        """A lower bound on the time of any step that decodes sequences reading
        ``context_tokens`` tokens of KV in all: the fixed cost of a step, the weights read
        once, and ``decode_read_s``. An instance whose pool holds ``K`` tokens therefore reads
        at most ``K / decode_step_floor_s(K)`` context tokens a second, however it batches
        (the bound grows with the context read, and a step reads no more than the pool)."""
        return self.decode_overhead_s + self.weight_bytes / self._bytes_per_s + self.decode_read_s(context_tokens)

    @property
    def decode_read_ceiling(self) -> float:
        """Context tokens a second an instance can read at most, however it batches: its pool of
        ``kv_tokens`` over ``decode_step_floor_s`` of that many (no step reads more than the
        pool, and reading fewer a step reads fewer a second)."""
        return self.kv_tokens / self.decode_step_floor_s(self.kv_tokens)

    def migration_time(self, num_blocks: int, cross_node: bool = False) -> float:
        """Time to copy ``num_blocks`` KV blocks to another instance (one blocking transfer),
        on the same node or (``cross_node``) on another one (``HardwareSpec.pair_link_gbps``)."""
        _check_count("num_blocks", num_blocks)
        return self.hw.link_latency_s + num_blocks * self.kv_block_bytes / (self.hw.pair_link_gbps(cross_node) * _GB)

    def host_copy_time(self, num_blocks: int, num_copies: int) -> float:
        """Time to copy ``num_blocks`` KV blocks between GPU and host in ``num_copies`` copies
        (one direction): a fixed cost per copy plus the bytes over the host link, so the
        size of a copy matters (FastSwitch, arXiv:2411.18424, Section 3.1)."""
        _check_count("num_blocks", num_blocks)
        _check_count("num_copies", num_copies)
        link = self.hw.host_link_gbps * _GB * self.hw.num_gpus
        return num_copies * self.hw.host_copy_overhead_s + num_blocks * self.kv_block_bytes / link

    def recompute_time(self, num_tokens: int) -> float:
        """Time to rebuild the KV of a ``num_tokens`` sequence by one prefill step."""
        _check_count("num_tokens", num_tokens)
        return self.step_time(num_tokens, 0, 0)
