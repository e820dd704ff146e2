"""The roofline cost model, the calibrated profiles and the CSV fit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.engines.sim.cost_model import HardwareSpec, ModelSpec, causal_context
from llumnix_py.engines.sim.profiles import (
    A10,
    LLAMA_7B,
    LLAMA_7B_A10,
    LLAMA_30B_4xA10,
    OPT_13B_A100,
    OPT_66B,
    OPT_66B_2xA100,
    OPT_175B_8xA100,
    PROFILES,
    FittedCostProfile,
    profile_from_csv,
)

ALL_PROFILES = [LLAMA_7B_A10, LLAMA_30B_4xA10, OPT_13B_A100, OPT_66B_2xA100, OPT_175B_8xA100]


def within(value: float, target: float, tol: float) -> bool:
    return abs(value - target) <= tol * target


# ---- calibration points (Llumnix paper and artifact) --------------------------
def test_llama7b_kv_is_512kib_per_token_and_4gb_for_8k():
    assert LLAMA_7B_A10.kv_bytes_per_token == 512 * 1024
    assert LLAMA_7B_A10.kv_block_bytes == 16 * 512 * 1024
    assert within(8192 * LLAMA_7B_A10.kv_bytes_per_token / 1e9, 4.0, 0.1)


def test_llama7b_a10_holds_about_880_blocks():
    assert within(LLAMA_7B_A10.num_blocks, 880, 0.25)


def test_llama7b_reprefill_8k_takes_about_2s():
    assert within(LLAMA_7B_A10.recompute_time(8192), 2.0, 0.3)


def test_llama7b_blocking_copy_of_8k_kv_takes_about_1_7s():
    blocks = 8192 // LLAMA_7B_A10.block_size
    assert within(LLAMA_7B_A10.migration_time(blocks), 1.7, 0.3)


def test_llama30b_4xa10_recompute_8k_and_decode_step():
    recompute = LLAMA_30B_4xA10.recompute_time(8192)
    decode = LLAMA_30B_4xA10.step_time(0, 1, 8192)
    assert within(recompute, 3.5, 0.3)
    assert within(decode, 0.065, 0.3)
    assert within(recompute / decode, 54, 0.3)


def test_decode_step_is_memory_bound_and_plausible():
    # One short sequence: about the weight-streaming time plus overhead (tens of ms).
    t = LLAMA_7B_A10.step_time(0, 1, 128)
    assert 0.02 < t < 0.05
    assert t >= LLAMA_7B_A10.weight_bytes / (A10.mem_bandwidth_gbps * 1e9)


def test_opt_66b_and_175b_from_public_specs():
    """KV per token and capacity as the module docstring derives them; OPT-66B does not fit
    on one A100, and re-sizing its two-GPU instance doubles everything but the weights."""
    from llumnix_py.engines.sim.profiles import A100, with_tensor_parallel

    assert OPT_66B_2xA100.kv_bytes_per_token == 2 * 64 * 9216 * 2
    assert OPT_175B_8xA100.kv_bytes_per_token == 2 * 96 * 12288 * 2
    assert within(OPT_66B_2xA100.num_blocks, 175, 0.05)
    assert within(OPT_175B_8xA100.num_blocks, 2700, 0.05)
    assert within(with_tensor_parallel(OPT_66B_2xA100, 2).num_blocks, 3840, 0.05)
    with pytest.raises(ValueError, match="does not fit"):
        dataclasses.replace(OPT_66B_2xA100, hw=A100)
    assert OPT_66B_2xA100.model is OPT_66B and OPT_66B_2xA100.hw.num_gpus == 2
    # a decode step streams the weights over both GPUs: 132 GB / (2 * 2039 GB/s * 0.8) + 4 ms + all-reduces
    assert within(OPT_66B_2xA100.step_time(0, 1, 128), 0.0405 + 0.004 + 0.0013, 0.1)


def test_profiles_registry_holds_both():
    assert set(PROFILES.values()) == set(ALL_PROFILES)


# ---- the roofline's shape ---------------------------------------------------------
counts = st.integers(min_value=0, max_value=20000)


@pytest.mark.parametrize("profile", ALL_PROFILES, ids=lambda p: p.model.name)
@settings(max_examples=60, deadline=None)
@given(p=counts, b=st.integers(0, 512), c=st.integers(0, 10**6), dp=st.integers(0, 4096),
       db=st.integers(0, 64), dc=st.integers(0, 10**5))
def test_step_time_monotone(profile, p, b, c, dp, db, dc):
    base = profile.step_time(p, b, c)
    assert base >= 0
    assert profile.step_time(p + dp, b, c) >= base
    assert profile.step_time(p, b + db, c) >= base
    assert profile.step_time(p, b, c + dc) >= base
    assert profile.step_time(p, b, c, causal_context(0, p) + dc) >= base


@pytest.mark.parametrize("degree", [1, 2, 4])
@pytest.mark.parametrize("profile", [OPT_13B_A100, OPT_66B_2xA100], ids=lambda p: p.model.name)
@settings(max_examples=40, deadline=None)
@given(prompts=st.lists(st.integers(1, 4096), min_size=1, max_size=12), decodes=st.integers(0, 64))
def test_a_batch_of_prompts_takes_at_least_the_sum_of_their_prefill_work(profile, degree, prompts, decodes):
    from llumnix_py.engines.sim.profiles import with_tensor_parallel

    prof = with_tensor_parallel(profile, degree)
    pairs = sum(causal_context(0, p) for p in prompts)
    work = sum(prof.prefill_work_s(p) for p in prompts)
    assert prof.step_time(sum(prompts), decodes, decodes * 100, pairs) >= work > 0
    # and chunked: the halves of one prompt cost at least its whole work
    p = prompts[0]
    if p > 1:
        h = p // 2
        chunks = prof.step_time(h, 0, 0, causal_context(0, h)) + prof.step_time(p - h, 0, 0, causal_context(h, p - h))
        assert chunks >= prof.prefill_work_s(p) * (1 - 1e-12)



@pytest.mark.parametrize("degree", [1, 2, 4])
@pytest.mark.parametrize("profile", [OPT_13B_A100, OPT_66B_2xA100], ids=lambda p: p.model.name)
@settings(max_examples=40, deadline=None)
@given(prefill=st.integers(0, 4096), seqs=st.integers(1, 256), extra=st.integers(0, 10**6))
def test_a_step_takes_at_least_its_decode_contexts_read(profile, degree, prefill, seqs, extra):
    from llumnix_py.engines.sim.profiles import with_tensor_parallel

    prof = with_tensor_parallel(profile, degree)
    context = seqs + extra  # each sequence attends to its new token at least
    for fused in (True, False):
        p = dataclasses.replace(prof, fused_mixed_steps=fused)
        assert p.step_time(prefill, seqs, context) >= p.decode_read_s(context) > 0
    # a degree's GPUs read in parallel: the read costs GPU-seconds independent of the degree
    assert prof.decode_read_s(context) * degree == pytest.approx(profile.decode_read_s(context), rel=1e-12)


@pytest.mark.parametrize("degree", [1, 2, 4])
@pytest.mark.parametrize("profile", [OPT_13B_A100, OPT_66B_2xA100], ids=lambda p: p.model.name)
@settings(max_examples=40, deadline=None)
@given(prompts=st.lists(st.integers(1, 4096), max_size=8), seqs=st.integers(0, 256), extra=st.integers(0, 10**6))
def test_a_serial_step_takes_its_prompts_work_plus_its_decode_floor(profile, degree, prompts, seqs, extra):
    # The work cap (llumnix_py.planner.work_cap) adds an instance's prefill work and its decode
    # reads in one second: every step of a serial profile pays both.
    from llumnix_py.engines.sim.profiles import with_tensor_parallel

    prof = with_tensor_parallel(profile, degree)
    assert prof.prefill_and_decode_add and not prof.fused_mixed_steps
    context = seqs + extra if seqs else 0
    pairs = sum(causal_context(0, p) for p in prompts)
    floor = sum(prof.prefill_work_s(p) for p in prompts) + (prof.decode_step_floor_s(context) if seqs else 0.0)
    assert prof.step_time(sum(prompts), seqs, context, pairs) >= floor * (1 - 1e-12)


def test_a_fused_step_can_take_less_than_its_prompts_work_plus_its_decode_floor():
    # so the work cap treats fused steps apart: one pass overlaps the GEMMs with the KV reads
    fused = dataclasses.replace(OPT_13B_A100, fused_mixed_steps=True)
    assert not fused.prefill_and_decode_add
    context = 64 * 2000
    step = fused.step_time(2048, 64, context)
    assert step < fused.prefill_work_s(2048) + fused.decode_step_floor_s(context)
    assert step >= max(fused.prefill_work_s(2048), fused.decode_step_floor_s(context))


@pytest.mark.parametrize("degree", [1, 2, 4])
@pytest.mark.parametrize("fused", [True, False])
@settings(max_examples=40, deadline=None)
@given(data=st.data(), prompt=st.integers(1, 8192))
def test_no_chunking_or_batching_of_a_prompt_beats_its_latency_floor(degree, fused, data, prompt):
    from llumnix_py.engines.sim.profiles import with_tensor_parallel

    prof = dataclasses.replace(with_tensor_parallel(OPT_13B_A100, degree), fused_mixed_steps=fused)
    floor = prof.prefill_latency_floor_s(prompt)
    assert floor > 0 and prof.step_time(prompt, 0, 0) >= floor * (1 - 1e-12)
    cuts = sorted(data.draw(st.sets(st.integers(1, prompt - 1), max_size=6)) if prompt > 1 else ())
    bounds = [0, *cuts, prompt]
    total = 0.0
    for lo, hi in zip(bounds, bounds[1:]):  # each chunk in its own step, with other prompts and decodes beside it
        others = data.draw(st.integers(0, 2048))
        seqs = data.draw(st.integers(0, 64))
        context = seqs * data.draw(st.integers(1, 4000))
        pairs = causal_context(lo, hi - lo) + causal_context(0, others)
        total += prof.step_time(hi - lo + others, seqs, context, pairs)
    assert total >= floor * (1 - 1e-12)


def test_the_latency_floor_by_hand():
    # OPT-13B on one A100: the step's fixed cost plus the larger of the FLOPs and one weight read
    p = OPT_13B_A100
    m, flops_rate = p.model, p.hw.peak_tflops * 1e12 * p.prefill_efficiency
    weights = p.weight_bytes / (p.hw.mem_bandwidth_gbps * 1e9 * p.bandwidth_efficiency)
    for n in (1, 1000):
        compute = (2 * m.num_params * n + 4 * m.num_layers * m.hidden_size * causal_context(0, n)) / flops_rate
        assert p.prefill_latency_floor_s(n) == pytest.approx(p.decode_overhead_s + max(compute, weights), rel=1e-12)
    assert p.prefill_latency_floor_s(1) == pytest.approx(p.decode_overhead_s + weights, rel=1e-12)
    # tensor parallel: the all-reduces of the prompt's tokens on the critical path
    from llumnix_py.engines.sim.profiles import with_tensor_parallel

    tp = with_tensor_parallel(p, 2)
    assert tp.prefill_latency_floor_s(1000) == pytest.approx(
        tp.decode_overhead_s + max(tp.prefill_work_s(1000) - (tp.allreduce_time(1000) - 2 * m.num_layers
                                                               * tp.hw.allreduce_latency_s), weights / 2)
        + tp.allreduce_time(1000), rel=1e-9)
    with pytest.raises(ValueError):
        p.prefill_latency_floor_s(-1)


def test_a_fitted_profile_s_latency_floor_and_work_add():
    fitted = FittedCostProfile(LLAMA_7B, A10, 0.5, 0.0, 0.1, fixed_s=0.01, per_prefill_token_s=2e-4,
                               per_decode_seq_s=1e-4, per_context_token_s=3e-7)
    assert fitted.prefill_latency_floor_s(100) == pytest.approx(0.01 + 0.02)
    assert fitted.step_time(100, 0, 0) >= fitted.prefill_latency_floor_s(100)
    assert fitted.step_time(50, 0, 0) + fitted.step_time(50, 0, 0) >= fitted.prefill_latency_floor_s(100)
    assert fitted.prefill_and_decode_add
    assert fitted.step_time(100, 4, 1000) >= fitted.prefill_work_s(100) + fitted.decode_step_floor_s(1000)


def test_decode_read_is_the_kv_bytes_at_the_attention_bandwidth_by_hand():
    p = OPT_13B_A100
    bw = p.hw.mem_bandwidth_gbps * 1e9 * p.attention_bandwidth_efficiency
    assert p.decode_read_s(1000) == pytest.approx(p.kv_bytes_per_token * 1000 / bw, rel=1e-9)
    fitted = FittedCostProfile(LLAMA_7B, A10, 0.5, 0.0, 0.1, fixed_s=0.01, per_context_token_s=3e-7)
    assert fitted.decode_read_s(1000) == pytest.approx(3e-4)
    assert fitted.step_time(0, 4, 1000) >= fitted.decode_read_s(1000)
    with pytest.raises(ValueError):
        p.decode_read_s(-1)

def test_prefill_work_is_the_flops_at_the_profiles_rate_by_hand():
    # OPT-13B on one A100: 2 * params FLOPs a token, plus the attention's 4 * layers * hidden a
    # (query, key) pair, at peak * prefill efficiency; one GPU, no all-reduce.
    p = OPT_13B_A100
    m, rate = p.model, p.hw.peak_tflops * 1e12 * p.prefill_efficiency
    expected = (2 * m.num_params * 1000 + 4 * m.num_layers * m.hidden_size * causal_context(0, 1000)) / rate
    assert p.prefill_work_s(1000) == pytest.approx(expected, rel=1e-12)
    # a fitted profile: its per-token cost (its fixed cost is shared by a batch)
    fitted = FittedCostProfile(LLAMA_7B, A10, 0.5, 0.0, 0.1, fixed_s=0.01, per_prefill_token_s=2e-4)
    assert fitted.prefill_work_s(100) == pytest.approx(0.02)
    with pytest.raises(ValueError):
        p.prefill_work_s(-1)


def test_empty_step_is_free_and_nonempty_pays_overhead():
    assert LLAMA_7B_A10.step_time(0, 0, 0) == 0.0
    assert LLAMA_7B_A10.step_time(1, 0, 0) >= LLAMA_7B_A10.decode_overhead_s


def test_fused_mixed_step_pays_max_not_sum():
    fused = dataclasses.replace(LLAMA_7B_A10, fused_mixed_steps=True)
    prefill = fused.step_time(2048, 0, 0)
    decode = fused.step_time(0, 8, 8 * 512)
    mixed = fused.step_time(2048, 8, 8 * 512)
    assert max(prefill, decode) <= mixed < prefill + decode


def test_serial_mixed_step_pays_both_passes():
    # vLLM <= 0.3 (the paper's engine) never batches prompts with decodes; the
    # built-in A10 profiles charge the two passes (and the fixed overhead once).
    assert not LLAMA_7B_A10.fused_mixed_steps
    prefill = LLAMA_7B_A10.step_time(2048, 0, 0)
    decode = LLAMA_7B_A10.step_time(0, 8, 8 * 512)
    mixed = LLAMA_7B_A10.step_time(2048, 8, 8 * 512)
    assert mixed == pytest.approx(prefill + decode - LLAMA_7B_A10.decode_overhead_s)


def test_decode_step_grows_with_batch_and_context_like_a_vllm_era_a10():
    # Small batch: ~32 ms (weights + overhead); 16 sequences at 1k context: ~56 ms.
    assert within(LLAMA_7B_A10.step_time(0, 1, 128), 0.032, 0.1)
    assert within(LLAMA_7B_A10.step_time(0, 16, 16 * 1024), 0.056, 0.1)
    # The KV cache streams at the paged-attention kernel's efficiency, the weights at theirs.
    assert LLAMA_7B_A10.attention_bandwidth_efficiency < LLAMA_7B_A10.bandwidth_efficiency
    plain = dataclasses.replace(LLAMA_7B_A10, attention_bandwidth_efficiency=None)
    assert plain.attention_bandwidth_efficiency == plain.bandwidth_efficiency
    # Per-sequence CPU cost: 0.1 ms each.
    no_cpu = dataclasses.replace(LLAMA_7B_A10, per_seq_overhead_s=0.0)
    assert LLAMA_7B_A10.step_time(0, 10, 1000) - no_cpu.step_time(0, 10, 1000) == pytest.approx(1e-3)


def test_causal_context():
    assert causal_context(0, 1) == 1
    assert causal_context(0, 4) == 1 + 2 + 3 + 4
    assert causal_context(10, 2) == 11 + 12
    # Two chunks add up to the whole prompt.
    assert causal_context(0, 100) + causal_context(100, 50) == causal_context(0, 150)


@pytest.mark.parametrize("args", [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (1.5, 0, 0)])
def test_step_time_rejects_bad_counts(args):
    with pytest.raises(ValueError):
        LLAMA_7B_A10.step_time(*args)


def test_migration_time_linear_in_blocks():
    t0, t1, t2 = (LLAMA_7B_A10.migration_time(n) for n in (0, 10, 20))
    assert t0 == LLAMA_7B_A10.hw.link_latency_s
    assert t2 - t1 == pytest.approx(t1 - t0)
    with pytest.raises(ValueError):
        LLAMA_7B_A10.migration_time(-1)


@pytest.mark.parametrize(
    "kw",
    [
        {"prefill_efficiency": 0.0},
        {"prefill_efficiency": 1.5},
        {"decode_overhead_s": -1.0},
        {"mem_reserved_frac": 1.0},
        {"block_size": 0},
        {"mem_reserved_frac": 0.6},  # weights no longer fit
        {"attention_bandwidth_efficiency": 0.0},
        {"attention_bandwidth_efficiency": 1.2},
        {"per_seq_overhead_s": -1e-4},
    ],
)
def test_profile_validation(kw):
    with pytest.raises(ValueError):
        dataclasses.replace(LLAMA_7B_A10, **kw)


def test_spec_validation():
    with pytest.raises(ValueError):
        HardwareSpec("x", 0, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        ModelSpec("x", 1e9, 0, 1, 1, 1)


# ---- CSV fit ------------------------------------------------------------------------
TRUE = {"fixed_s": 0.012, "per_prefill_token_s": 1.8e-4, "per_decode_seq_s": 3.0e-4, "per_context_token_s": 1.1e-6}


def write_synthetic_csv(path, n=300, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    lines = ["batch_size,context_tokens,prefill_tokens,step_ms"]
    for _ in range(n):
        batch = int(rng.integers(0, 128))
        context = int(batch * rng.integers(1, 2048)) if batch else 0
        prefill = int(rng.integers(0, 4096)) if rng.random() < 0.4 else 0
        if batch == 0 and prefill == 0:
            prefill = 1
        t = (TRUE["fixed_s"] + TRUE["per_prefill_token_s"] * prefill + TRUE["per_decode_seq_s"] * batch
             + TRUE["per_context_token_s"] * context)
        t *= 1 + noise * rng.standard_normal()
        lines.append(f"{batch},{context},{prefill},{t * 1e3:.6f}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("noise,rel", [(0.0, 1e-4), (0.02, 0.1)])
def test_csv_fit_recovers_coefficients(tmp_path, noise, rel):
    path = write_synthetic_csv(tmp_path / "steps.csv", noise=noise)
    prof = profile_from_csv(path, LLAMA_7B, A10)
    assert isinstance(prof, FittedCostProfile)
    for name, value in TRUE.items():
        assert getattr(prof, name) == pytest.approx(value, rel=rel), name
    assert prof.step_time(100, 10, 5000) == pytest.approx(
        TRUE["fixed_s"] + 100 * TRUE["per_prefill_token_s"] + 10 * TRUE["per_decode_seq_s"]
        + 5000 * TRUE["per_context_token_s"], rel=rel)
    assert prof.step_time(0, 0, 0) == 0.0
    assert prof.recompute_time(1000) == pytest.approx(prof.step_time(1000, 0, 0))
    assert 0 < prof.prefill_efficiency <= 1 and 0 < prof.bandwidth_efficiency <= 1
    assert prof.num_blocks == LLAMA_7B_A10.num_blocks


def test_csv_fit_coefficients_never_negative(tmp_path):
    # Prefill-only data: the decode columns cannot be fitted and must come out 0, not negative.
    path = tmp_path / "prefill.csv"
    path.write_text("batch_size,context_tokens,prefill_tokens,step_ms\n0,0,100,30\n0,0,200,50\n0,0,400,90\n")
    prof = profile_from_csv(path, LLAMA_7B, A10)
    assert prof.per_decode_seq_s == 0 and prof.per_context_token_s == 0
    assert prof.per_prefill_token_s == pytest.approx(0.2e-3)


@pytest.mark.parametrize(
    "text",
    [
        "batch_size,context_tokens,step_ms\n1,10,5\n",  # missing column
        "batch_size,context_tokens,prefill_tokens,step_ms\n",  # no rows
        "batch_size,context_tokens,prefill_tokens,step_ms\n1,x,0,5\n2,20,0,6\n",  # non-numeric
        "batch_size,context_tokens,prefill_tokens,step_ms\n1,10,0,-5\n2,20,0,6\n",  # negative
        "batch_size,context_tokens,prefill_tokens,step_ms\n1,10,0,5\n1,10,0,6\n",  # one distinct row
    ],
)
def test_csv_rejects_malformed(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError):
        profile_from_csv(path, LLAMA_7B, A10)


def test_opt_13b_a100_follows_from_public_specs():
    """KV per token 2 * 40 * 5120 * 2 B; about 3,300 blocks in 80 GB; a short decode step is
    the weights streamed at 80% of 2039 GB/s plus the 4 ms overhead; 512 prompt tokens at
    51% of 312 TFLOP/s."""
    assert OPT_13B_A100.kv_bytes_per_token == 2 * 40 * 5120 * 2
    assert 3200 <= OPT_13B_A100.num_blocks <= 3400
    assert OPT_13B_A100.step_time(0, 1, 128) == pytest.approx(25.8e9 / (2039e9 * 0.8) + 0.004, rel=0.05)
    assert OPT_13B_A100.step_time(512, 0, 0) == pytest.approx(2 * 12.9e9 * 512 / (312e12 * 0.51), rel=0.1)


def test_tensor_parallel_adds_gpus_and_pays_two_ring_all_reduces_a_layer():
    from llumnix_py.engines.sim.profiles import OPT_13B_A100, with_tensor_parallel

    assert with_tensor_parallel(OPT_13B_A100, 1) is OPT_13B_A100 and OPT_13B_A100.allreduce_time(512) == 0.0
    tp2 = with_tensor_parallel(OPT_13B_A100, 2)
    assert tp2.hw.num_gpus == 2 and tp2.hw.link_gbps == 2 * OPT_13B_A100.hw.link_gbps
    assert tp2.num_blocks > 2 * OPT_13B_A100.num_blocks  # the weights are held once, split over both
    m = OPT_13B_A100.model
    tokens = 512
    ring = 2 * (2 - 1) / 2 * tokens * m.hidden_size * 2 / 300e9
    assert tp2.allreduce_time(tokens) == pytest.approx(2 * m.num_layers * (10e-6 + ring))
    one = OPT_13B_A100.step_time(0, 1, 100)
    two = tp2.step_time(0, 1, 100)
    # the weights stream over twice the bandwidth; the fixed cost and the all-reduces do not shrink
    assert two == pytest.approx(one - 25.8e9 / 2 / (2039e9 * 0.8) + tp2.allreduce_time(1), rel=0.02)
    with pytest.raises(ValueError, match="no all-reduce link"):
        with_tensor_parallel(LLAMA_7B_A10, 2)
    with pytest.raises(ValueError, match="do not split over 3 GPUs"):
        with_tensor_parallel(OPT_13B_A100, 3)
    with pytest.raises(ValueError, match="integer >= 1"):
        with_tensor_parallel(OPT_13B_A100, 0)
