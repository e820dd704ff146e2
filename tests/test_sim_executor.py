"""The simulated executor: synthetic tokens and cost-model durations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.engines.executor import Executor, SeqWork
from llumnix_py.engines.sim.cost_model import causal_context
from llumnix_py.engines.sim.executor import SimExecutor, splitmix64
from llumnix_py.engines.sim.profiles import LLAMA_7B_A10, LLAMA_30B_4xA10
from llumnix_py.engines.types import SamplingParams


def make_executor(**kw) -> SimExecutor:
    kw.setdefault("profile", LLAMA_7B_A10)
    return SimExecutor(**kw)


def make_work(
    request_id: str = "r0",
    *,
    seed=None,
    index: int = 0,
    prefill: bool = False,
    num_new: int = 1,
    num_cached: int = 10,
    sample: bool = True,
    stop_token_ids=(),
) -> SeqWork:
    return SeqWork(
        request_id=request_id,
        token_ids=tuple(range(num_new)),
        num_cached=num_cached,
        block_table=(0,),
        sampling=SamplingParams(max_tokens=100, seed=seed, stop_token_ids=stop_token_ids),
        output_index=index,
        is_prefill=prefill,
        sample=sample,
    )


def test_is_an_executor():
    ex = make_executor()
    assert isinstance(ex, Executor)
    assert ex.kv_block_bytes == LLAMA_7B_A10.kv_block_bytes
    assert ex.vocab_size == 32000


def test_tokens_deterministic_per_seed_and_index():
    a, b = make_executor(), make_executor()
    w = make_work("r1", seed=42, index=7)
    assert a.execute([w])[0] == b.execute([w])[0]
    # The seed, not the id, keys a seeded request; batch composition does not matter.
    other = make_work("another-id", seed=42, index=7)
    tokens, _ = a.execute([make_work("x", index=3), other, make_work("y", seed=1)])
    assert tokens[1] == a.execute([w])[0][0]


def test_unseeded_tokens_keyed_by_request_id():
    ex = make_executor()
    t1 = [ex.execute([make_work("same", index=i)])[0][0] for i in range(50)]
    t2 = [ex.execute([make_work("same", index=i)])[0][0] for i in range(50)]
    t3 = [ex.execute([make_work("different", index=i)])[0][0] for i in range(50)]
    assert t1 == t2
    assert t1 != t3


def test_tokens_differ_across_indices_and_stay_in_vocab():
    ex = make_executor(vocab_size=1000)
    tokens = [ex.execute([make_work(seed=5, index=i)])[0][0] for i in range(200)]
    assert len(tokens) == 200
    assert all(0 <= t < 1000 for t in tokens)
    assert len(set(tokens)) > 150  # nearly all distinct, as a hash should be


@settings(max_examples=200, deadline=None)
@given(seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), index=st.integers(0, 10**6),
       eos=st.integers(0, 3))
def test_never_samples_eos_or_stop_tokens(seed, index, eos):
    ex = make_executor(vocab_size=4, eos_token_id=eos)
    stop = ((eos + 1) % 4,)
    token = ex.execute([make_work(seed=seed, index=index, stop_token_ids=stop)])[0][0]
    assert token not in (eos, stop[0])
    assert 0 <= token < 4


def test_all_tokens_banned_is_an_error():
    ex = make_executor(vocab_size=2, eos_token_id=0)
    with pytest.raises(ValueError):
        ex.execute([make_work(stop_token_ids=(1,))])


def test_non_sampling_chunk_returns_none():
    ex = make_executor()
    tokens, _ = ex.execute([make_work(prefill=True, num_new=64, num_cached=0, sample=False), make_work("d")])
    assert tokens[0] is None and isinstance(tokens[1], int)


@pytest.mark.parametrize("profile", [LLAMA_7B_A10, LLAMA_30B_4xA10], ids=lambda p: p.model.name)
def test_duration_matches_profile(profile):
    ex = make_executor(profile=profile)
    work = [
        make_work("p1", prefill=True, num_new=300, num_cached=0),
        make_work("p2", prefill=True, num_new=128, num_cached=256, sample=False),
        make_work("d1", num_cached=1000),
        make_work("d2", num_cached=20),
    ]
    _, duration = ex.execute(work)
    expected = profile.step_time(
        300 + 128, 2, 1001 + 21, causal_context(0, 300) + causal_context(256, 128)
    )
    assert duration == pytest.approx(expected)
    assert ex.execute([])[1] == 0.0
    decode_only = ex.execute([make_work("d", num_cached=99)])[1]
    assert decode_only == pytest.approx(profile.step_time(0, 1, 100))


def test_blocks_carry_no_data():
    ex = make_executor()
    assert ex.read_blocks([1, 2, 3]) is None
    ex.write_blocks([4, 5, 6], None)
    with pytest.raises(TypeError):
        ex.write_blocks([4], b"data")


@pytest.mark.parametrize("kw", [{"vocab_size": 1}, {"vocab_size": 10, "eos_token_id": 10}])
def test_constructor_validation(kw):
    with pytest.raises(ValueError):
        make_executor(**kw)


def test_splitmix64_known_value():
    # First output of SplitMix64 seeded with 0 (reference implementation).
    assert splitmix64(0) == 0xE220A8397B1DCDAF
