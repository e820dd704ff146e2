"""Calibrated cost profiles, and a least-squares fit to measured step times.

The two built-in profiles reproduce the facts published with the Llumnix paper
(OSDI 2024) and its artifact; ``tests/test_cost_model.py`` checks each one.

``LLAMA_7B_A10``: LLaMA-7B (6.7e9 params, 32 layers, hidden 4096, 32 KV heads
of 128, fp16) on one A10-24GB (125 TFLOP/s fp16 dense, 600 GB/s, 24 GB).

* KV per token = 2 * 32 * 32 * 128 * 2 B = 512 KiB, so 8k tokens hold 4.3 GB
  (paper: "about 4 GB") and a 16-token block is 8 MiB.
* Capacity: 24 GB * (1 - 0.134) - 13.4 GB of weights = 7.38 GB = 880 blocks,
  Llumnix's simulator default. ``mem_reserved_frac = 0.134`` is vLLM's 0.9
  memory utilisation plus ~3.4% for activations and the CUDA context.
* Re-prefill of 8k tokens: 2 * 6.7e9 * 8192 = 1.10e14 GEMM FLOPs plus
  4 * 32 * 4096 * 33.6e6 pairs = 1.76e13 attention FLOPs, 1.27e14 in all; at
  ``prefill_efficiency = 0.51`` (64 TFLOP/s achieved) that is 2.0 s (paper: 2.0 s).
* Decode: weights 13.4 GB / (600 GB/s * 0.8 achieved) = 28 ms, plus 4 ms fixed
  overhead (``decode_overhead_s``) = 32 ms for a small batch, in line with the
  25-35 ms per token that a single stream of LLaMA-7B gets from vLLM on an
  A10/A10G (600 GB/s; the weights alone take 22 ms at the peak).
* KV traffic of decode (``attention_bandwidth_efficiency = 0.64``): the
  vLLM paper (SOSP 2023, Fig. 18a) measures its PagedAttention kernel 20-26%
  slower than FasterTransformer's contiguous attention kernel; taking the
  latter at the weights' 0.8 of peak gives 0.8 / 1.25 = 0.64. A batch of 16 at
  1k context reads 8.6 GB of KV: 22 ms on top of the 28 ms of weights.
* Per-sequence CPU cost (``per_seq_overhead_s = 0.1 ms``): a vLLM-0.x engine
  builds block tables and inputs, samples and processes outputs in Python for
  every sequence of every step. vLLM's v0.6 performance post (Sept. 2024) profiles
  v0.5.3 serving Llama-3-8B on an H100: scheduling and input/output processing
  take 29% of the step time, the GPU only 38%; at the ~100-250 running sequences
  of that benchmark and a ~50 ms step this is ~0.06-0.15 ms per sequence. We
  take 0.1 ms (an estimate: the source is a later vLLM on a faster host; the
  vLLM 0.1-era engine of the paper did more of this work per sequence, not less).
  It is Llumnix's own simulator's ``a * batch_size`` term (``model_decode``).
* Mixed steps are serial (``fused_mixed_steps = False``): vLLM up to 0.3 (the
  engine under the paper's Llumnix) runs a step either for prompts or for
  decodes, never both, and Llumnix's simulator (``SimGPUExecutor``) charges a
  step the prefill latency *plus* the decode latency. Our engine batches both in
  one step; charging the two passes keeps the throughput of the serial engine.
* Net: a decode step of 16 sequences at 1k context takes 4 + 1.6 + 28 + 22 =
  56 ms (48 ms with the previous single-efficiency roofline); a 512-token
  prompt admitted beside it adds its 113 ms prefill pass instead of hiding it.
* Migration link: the paper's blocking copy of 4 GB takes about 1.7 s, an
  effective 2.5 GB/s (a gloo copy through host memory over PCIe, far below
  PCIe 4.0's 32 GB/s): ``link_gbps = 2.5`` gives 1.72 s for 8k tokens.

``LLAMA_30B_4xA10``: LLaMA-30B (32.5e9 params, 60 layers, hidden 6656, 52 KV
heads of 128, fp16) on four A10s, tensor parallel.

* KV per token = 2 * 60 * 52 * 128 * 2 B = 1.52 MiB; a block is 24.4 MiB;
  capacity 4 * 24 GB * 0.866 - 65 GB = 18.1 GB = 709 blocks.
* Decode step of one 8k-token sequence: weights 65 GB / (4 * 600 GB/s * 0.8)
  = 34 ms, KV 13.1 GB / 1920 GB/s = 6.8 ms, plus ``decode_overhead_s = 24 ms``
  (120 all-reduces per step over PCIe at ~0.2 ms each) = 65 ms (paper: ~65 ms).
* Recompute of 8k tokens: 5.86e14 FLOPs; with ``prefill_efficiency = 0.34``
  (which absorbs the all-reduce traffic of prefill over PCIe) 3.47 s, about
  54 decode steps (paper: 3.5 s, 54 steps).
* Migration link: each GPU copies its own shard, 4 * 2.5 GB/s = 10 GB/s.
* Same engine as the 7B profile, so the same attention efficiency (0.64: the
  8k decode step is then 34 + 8.5 + 24 = 67 ms), per-sequence cost and serial
  mixed steps.

``OPT_13B_A100``: OPT-13B (12.9e9 params, 40 layers, hidden 5120, 40 heads of 128,
fp16) on one A100-80GB SXM (312 TFLOP/s fp16 dense, 2039 GB/s, 80 GB): the chatbot
model of DistServe (OSDI 2024), for the disaggregation experiments. From public specs
only, with the engine assumptions of the A10 profiles unchanged (GEMM efficiency 0.51,
bandwidth efficiencies 0.8 / 0.64, 4 ms per step, 0.1 ms per sequence, serial mixed
steps, as DistServe's vLLM baseline); nothing was fitted to a DistServe figure.
* KV per token = 2 * 40 * 5120 * 2 B = 800 KiB; a 16-token block is 12.5 MiB;
  capacity 80 GB * 0.866 - 25.8 GB of weights = 43.5 GB = about 3,300 blocks.
* Decode step of one short sequence: 25.8 GB / (2039 GB/s * 0.8) = 16 ms + 4 ms.
* Prefill of 512 tokens: 2 * 12.9e9 * 512 / (312e12 * 0.51) = 83 ms.
* Migration link: ``link_gbps = 25``, PCIe 4.0 x16 (32 GB/s peak) at about 80%: a
  copy through the host between two GPUs of one node, not NVLink (DistServe places the
  phases on NVLink where it can; this profile takes the slower path).
* Cross-node link: ``cross_node_link_gbps = 3.125``, DistServe's testbed (Section 6.1:
  four nodes of eight A100-80GB SXM with NVLink, "cross-node bandwidth 25 Gbps"): 25 Gbit/s
  is 3.125 GB/s, taken at its line rate (an upper bound; nothing fitted). It applies
  only where a simulation places instances on nodes (``SimConfig.instances_per_node``);
  a same-node copy stays at ``link_gbps``.

``OPT_66B_2xA100`` and ``OPT_175B_8xA100``: the larger models of DistServe's evaluation
(code completion and summarization run OPT-66B; OPT-175B is its largest chatbot model),
from public specs only (the OPT paper, Zhang et al. 2022, Table 1: OPT-66B has 64 layers,
72 heads, hidden 9216; OPT-175B 96 layers, 96 heads, hidden 12288; heads of 128, fp16),
on A100-80GB SXM GPUs with the engine assumptions of the OPT-13B profile unchanged.
Neither fits on one GPU, so each profile's instance is the smallest power-of-two group of
A100s, tensor parallel, that holds its weights with room for KV; ``with_tensor_parallel``
scales it further (degree 2 of the 66B profile is four GPUs).
* OPT-66B: KV per token = 2 * 64 * 9216 * 2 B = 2.25 MiB, a block 36 MiB; on two GPUs
  160 GB * 0.866 - 132 GB of weights = 6.6 GB = about 175 blocks (2,800 tokens: a prefill
  instance's working set, not a decode pool); on four GPUs about 3,840 blocks.
* OPT-175B: KV per token = 2 * 96 * 12288 * 2 B = 4.5 MiB, a block 72 MiB; on eight GPUs
  640 GB * 0.866 - 350 GB = 204 GB = about 2,700 blocks.
* Both pay the all-reduces of their base group on every pass (``tp_link_gbps``, the same
  NVLink figure and 10 us assumption as below), and copy each GPU's shard of a migration in
  parallel (same-node link times the GPUs).

Tensor parallelism (``with_tensor_parallel``, for the planner's search; only where the
profile has an explicit all-reduce link, ``HardwareSpec.tp_link_gbps``, i.e. the A100
profile here): ``degree`` GPUs of the profile's kind form one instance. The roofline
already adds their FLOP/s, memory bandwidth and memory (the weights are read once per
pass, split over the GPUs); each pass then pays its all-reduces (``CostProfile.
allreduce_time``): two a layer of ``tokens * hidden * 2`` bytes, as a ring over NVLink 3
at 300 GB/s per GPU and direction (A100 SXM datasheet: 600 GB/s total, both directions,
12 links), plus 10 us each. The 10 us is an assumption (the order of a small-message NCCL
all-reduce within one NVLink node), not a published figure and not fitted; for OPT-13B a
decode step pays 80 all-reduces, 0.8 ms of it. A migration copies each GPU's KV shard in
parallel (same-node link times the degree); a cross-node copy stays at the node's network
figure. Nothing else changes (the same engine constants), so a degree-``g`` instance is
not ``g`` independent instances: its fixed per-step costs are paid once, its all-reduces
on every pass.

``profile_from_csv`` fits the step time of a user's own hardware instead.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np

from llumnix_py.engines.sim.cost_model import CostProfile, HardwareSpec, ModelSpec, _check_count

A10 = HardwareSpec(
    name="A10-24GB", num_gpus=1, peak_tflops=125.0, mem_bandwidth_gbps=600.0, mem_gb=24.0, link_gbps=2.5
)
A10_X4 = HardwareSpec(
    name="4xA10-24GB", num_gpus=4, peak_tflops=125.0, mem_bandwidth_gbps=600.0, mem_gb=24.0, link_gbps=10.0
)
A100 = HardwareSpec(
    name="A100-80GB", num_gpus=1, peak_tflops=312.0, mem_bandwidth_gbps=2039.0, mem_gb=80.0, link_gbps=25.0,
    cross_node_link_gbps=25.0 / 8, tp_link_gbps=300.0, allreduce_latency_s=10e-6,
)
LLAMA_7B = ModelSpec(
    name="llama-7b", num_params=6.7e9, num_layers=32, hidden_size=4096, num_kv_heads=32, head_dim=128
)
LLAMA_30B = ModelSpec(
    name="llama-30b", num_params=32.5e9, num_layers=60, hidden_size=6656, num_kv_heads=52, head_dim=128
)

LLAMA_7B_A10 = CostProfile(
    model=LLAMA_7B,
    hw=A10,
    prefill_efficiency=0.51,
    decode_overhead_s=0.004,
    mem_reserved_frac=0.134,
    bandwidth_efficiency=0.8,
    attention_bandwidth_efficiency=0.64,
    per_seq_overhead_s=1e-4,
    fused_mixed_steps=False,
)
LLAMA_30B_4xA10 = CostProfile(
    model=LLAMA_30B,
    hw=A10_X4,
    prefill_efficiency=0.34,
    decode_overhead_s=0.024,
    mem_reserved_frac=0.134,
    bandwidth_efficiency=0.8,
    attention_bandwidth_efficiency=0.64,
    per_seq_overhead_s=1e-4,
    fused_mixed_steps=False,
)

OPT_13B = ModelSpec(
    name="opt-13b", num_params=12.9e9, num_layers=40, hidden_size=5120, num_kv_heads=40, head_dim=128
)
OPT_13B_A100 = replace(LLAMA_7B_A10, model=OPT_13B, hw=A100)  # the same engine assumptions as the A10 profile
OPT_66B = ModelSpec(
    name="opt-66b", num_params=66e9, num_layers=64, hidden_size=9216, num_kv_heads=72, head_dim=128
)
OPT_175B = ModelSpec(
    name="opt-175b", num_params=175e9, num_layers=96, hidden_size=12288, num_kv_heads=96, head_dim=128
)
A100_X2 = replace(A100, name="2xA100-80GB", num_gpus=2, link_gbps=2 * A100.link_gbps)
A100_X8 = replace(A100, name="8xA100-80GB", num_gpus=8, link_gbps=8 * A100.link_gbps)
OPT_66B_2xA100 = replace(OPT_13B_A100, model=OPT_66B, hw=A100_X2)
OPT_175B_8xA100 = replace(OPT_13B_A100, model=OPT_175B, hw=A100_X8)

PROFILES: dict[str, CostProfile] = {"llama-7b-a10": LLAMA_7B_A10, "llama-30b-4xa10": LLAMA_30B_4xA10,
                                    "opt-13b-a100": OPT_13B_A100, "opt-66b-2xa100": OPT_66B_2xA100,
                                    "opt-175b-8xa100": OPT_175B_8xA100}

def with_tensor_parallel(profile: CostProfile, degree: int) -> CostProfile:
    """``profile`` on ``degree`` times its GPUs, tensor parallel (module docstring).

    Raises:
        ValueError: ``degree`` not an integer >= 1; a profile that cannot express it (no
            ``hw.tp_link_gbps``, or a fitted profile, whose step time is a fit at one size);
            a degree that does not divide the model's KV heads.
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"a tensor-parallel degree is an integer >= 1, got {degree!r}")
    if degree == 1:
        return profile
    if isinstance(profile, FittedCostProfile) or profile.hw.tp_link_gbps is None:
        raise ValueError(f"profile {profile.model.name} on {profile.hw.name} has no all-reduce link "
                         "(HardwareSpec.tp_link_gbps): it cannot be re-sized for tensor parallelism")
    gpus = profile.hw.num_gpus * degree
    if profile.model.num_kv_heads % gpus:
        raise ValueError(f"{profile.model.num_kv_heads} KV heads of {profile.model.name} do not split over {gpus} GPUs")
    hw = replace(profile.hw, name=f"{degree}x{profile.hw.name}", num_gpus=gpus,
                 link_gbps=profile.hw.link_gbps * degree)
    return replace(profile, hw=hw)


CSV_COLUMNS = ("batch_size", "context_tokens", "prefill_tokens", "step_ms")


@dataclass(frozen=True)
class FittedCostProfile(CostProfile):
    """A profile whose step time is a linear fit to measured steps::

        step_s = fixed_s + per_prefill_token_s * prefill_tokens
               + per_decode_seq_s * decode_seqs + per_context_token_s * decode_context

    (0 for an empty step). The inherited roofline fields are derived from the
    coefficients for reporting (``prefill_efficiency`` from the per-token cost,
    ``bandwidth_efficiency`` from the per-context-token cost, both clipped to
    (0, 1]) and are not used by ``step_time``. The fit has no attention term
    for prefill: measured prefill rows fold it into the per-token cost.
    """

    fixed_s: float = field(default=0.0, kw_only=True)
    per_prefill_token_s: float = field(default=0.0, kw_only=True)
    per_decode_seq_s: float = field(default=0.0, kw_only=True)
    per_context_token_s: float = field(default=0.0, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("fixed_s", "per_prefill_token_s", "per_decode_seq_s", "per_context_token_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def step_time(
        self,
        num_prefill_tokens: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
        prefill_context_tokens: Optional[int] = None,
    ) -> float:
        """Fitted step time, seconds; ``prefill_context_tokens`` is validated and ignored."""
        _check_count("num_prefill_tokens", num_prefill_tokens)
        _check_count("num_decode_seqs", num_decode_seqs)
        _check_count("decode_context_tokens", decode_context_tokens)
        if prefill_context_tokens is not None:
            _check_count("prefill_context_tokens", prefill_context_tokens)
        if num_prefill_tokens == 0 and num_decode_seqs == 0:
            return 0.0
        return (
            self.fixed_s
            + self.per_prefill_token_s * num_prefill_tokens
            + self.per_decode_seq_s * num_decode_seqs
            + self.per_context_token_s * decode_context_tokens
        )

    def prefill_work_s(self, prompt_len: int) -> float:
        """The fit's per-token prefill cost of ``prompt_len`` tokens (its fixed cost is shared
        by a batch): ``CostProfile.prefill_work_s`` for a fitted step time."""
        _check_count("prompt_len", prompt_len)
        return self.per_prefill_token_s * prompt_len

    def prefill_latency_floor_s(self, prompt_len: int) -> float:
        """The fit's fixed cost plus its per-token cost of ``prompt_len`` tokens (a prompt alone
        in one step): ``CostProfile.prefill_latency_floor_s`` for a fitted step time."""
        return self.fixed_s + self.prefill_work_s(prompt_len)

    @property
    def prefill_and_decode_add(self) -> bool:
        """A fitted step's terms add (``CostProfile.prefill_and_decode_add``)."""
        return True

    def decode_read_s(self, context_tokens: int) -> float:
        """The fit's per-context-token decode cost of ``context_tokens`` tokens:
        ``CostProfile.decode_read_s`` for a fitted step time."""
        _check_count("context_tokens", context_tokens)
        return self.per_context_token_s * context_tokens

    def decode_step_floor_s(self, context_tokens: int) -> float:
        """The fit's fixed cost plus ``decode_read_s``: ``CostProfile.decode_step_floor_s``
        for a fitted step time."""
        return self.fixed_s + self.decode_read_s(context_tokens)


def _read_rows(path: Union[str, Path]) -> np.ndarray:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected {list(CSV_COLUMNS)}")
        rows = []
        for lineno, raw in enumerate(reader, start=2):
            row = {k.strip(): v for k, v in raw.items() if k is not None}
            try:
                values = [float(row[c]) for c in CSV_COLUMNS]
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{lineno}: non-numeric value in {raw!r}") from None
            if not all(math.isfinite(v) and v >= 0 for v in values):
                raise ValueError(f"{path}:{lineno}: values must be finite and >= 0, got {values}")
            rows.append(values)
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return np.asarray(rows, dtype=np.float64)


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0: refit without the most negative one until none is."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        del active[int(np.argmin(sol))]
    return coef


def profile_from_csv(
    path: Union[str, Path],
    model: ModelSpec,
    hw: HardwareSpec,
    *,
    block_size: int = 16,
    mem_reserved_frac: float = 0.134,
) -> FittedCostProfile:
    """Fit a profile to measured step times.

    The CSV has a header with the columns ``batch_size`` (decode sequences in
    the step), ``context_tokens`` (their summed context), ``prefill_tokens``
    and ``step_ms``; one row per measured step. The four coefficients of
    ``FittedCostProfile`` are fitted by least squares, constrained to be >= 0.

    Raises:
        ValueError: missing columns, a non-numeric or negative value, no rows,
            or too few distinct rows to fit.
    """
    data = _read_rows(path)
    batch, context, prefill, step_ms = data.T
    x = np.column_stack([np.ones_like(batch), prefill, batch, context])
    if len(np.unique(x, axis=0)) < 2:
        raise ValueError(f"{path}: need at least two distinct (batch, context, prefill) rows to fit")
    fixed, per_tok, per_seq, per_ctx = _nonnegative_lstsq(x, step_ms / 1e3)
    probe = CostProfile(model, hw, 1.0, 0.0, mem_reserved_frac, block_size)
    # Per-token GEMM cost 2 * params / (peak * eff * gpus)  =>  eff.
    eff = 2.0 * model.num_params / (per_tok * hw.peak_tflops * 1e12 * hw.num_gpus) if per_tok > 0 else 1.0
    bw_eff = probe.kv_bytes_per_token / (per_ctx * hw.mem_bandwidth_gbps * 1e9 * hw.num_gpus) if per_ctx > 0 else 1.0
    return FittedCostProfile(
        model=model,
        hw=hw,
        prefill_efficiency=min(1.0, eff),
        decode_overhead_s=float(fixed),
        mem_reserved_frac=mem_reserved_frac,
        block_size=block_size,
        bandwidth_efficiency=min(1.0, bw_eff),
        fixed_s=float(fixed),
        per_prefill_token_s=float(per_tok),
        per_decode_seq_s=float(per_seq),
        per_context_token_s=float(per_ctx),
    )
