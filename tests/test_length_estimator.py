"""The output-length estimator (``policies/length.py``): coverage on the prior's own
distribution, monotone predicted end, fallbacks, and the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.length import MIN_SAMPLES, LengthPrior, oracle_bound, prompt_bucket, quantile_bound, remaining_bound

lengths_st = st.lists(st.integers(1, 5000), min_size=1, max_size=200).map(sorted)
quantile_st = st.floats(0.05, 1.0)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, q=quantile_st, n=st.integers(0, 5000))
def test_undershoots_no_more_often_than_the_quantile_allows(lengths, q, n):
    """Exactly on the empirical prior: among lengths above n, the share whose remaining length
    exceeds the bound is at most 1 - q."""
    bound = quantile_bound(lengths, n, q)
    above = [L for L in lengths if L > n]
    if not above:
        assert bound >= 1
        return
    under = sum(1 for L in above if L - n > bound)
    assert under <= (1 - q) * len(above) + 1e-9


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, q=quantile_st, n=st.integers(0, 5000), step=st.integers(1, 500))
def test_predicted_end_is_monotone_in_tokens_generated(lengths, q, n, step):
    assert n + quantile_bound(lengths, n, q) <= n + step + quantile_bound(lengths, n + step, q)


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, n=st.integers(0, 5000), q1=quantile_st, q2=quantile_st)
def test_higher_quantile_is_more_conservative(lengths, n, q1, q2):
    lo, hi = sorted((q1, q2))
    assert quantile_bound(lengths, n, lo) <= quantile_bound(lengths, n, hi)


def test_coverage_on_fresh_draws_of_a_heavy_tailed_distribution():
    """A prior of 2,000 lognormal lengths; 20,000 fresh draws of the same law: at every
    conditioning point the bound undershoots about 1 - q of the time, not more. Slack: the prior's
    quantile of 2,000 draws is off by about sqrt(q(1-q)/2000) <= 1.1% (one sigma); allow 4 sigma."""
    rng = np.random.default_rng(7)
    draw = lambda k: np.clip(np.round(rng.lognormal(5.0, 1.0, k)), 1, 8000).astype(int)  # noqa: E731
    prior = LengthPrior(window=2000)
    for L in draw(2000):
        prior.observe("deadline", 100, int(L))
    fresh = draw(20000)
    lengths = prior.lengths("deadline", 100)
    checked = 0
    for q in (0.5, 0.8, 0.95):
        for n in (0, 50, 150, 400):
            alive = fresh[fresh > n]
            assert alive.size > 100
            bound = quantile_bound(lengths, n, q)
            assert np.mean(alive - n > bound) <= (1 - q) + 4 * np.sqrt(q * (1 - q) / 2000)
            checked += 1
    assert checked == 12


def test_prior_falls_back_from_bucket_to_kind_to_all_to_cold_start():
    prior = LengthPrior(window=100, cold_start_len=77)
    assert prior.lengths("stream", 10) == (77,)
    prior.observe("stream", 10, 5)
    assert prior.lengths("stream", 10) == (5,)  # too few anywhere: all there is
    for i in range(MIN_SAMPLES):
        prior.observe("deadline", 3000, 100 + i)
    assert prior.lengths("deadline", 3000)[0] == 100  # its own bucket
    assert prior.lengths("deadline", 10)[0] == 100  # another bucket: the kind's
    assert len(prior.lengths("job", 10)) == MIN_SAMPLES + 1  # an unseen kind: everything
    for i in range(MIN_SAMPLES):
        prior.observe("stream", 10, 9)
    assert set(prior.lengths("stream", 10)) == {5, 9}


def test_window_forgets_the_oldest():
    prior = LengthPrior(window=MIN_SAMPLES)
    for _ in range(MIN_SAMPLES):
        prior.observe("x", 1, 1000)
    for _ in range(MIN_SAMPLES):
        prior.observe("x", 1, 3)
    assert set(prior.lengths("x", 1)) == {3}


def test_past_every_prior_length_the_bound_stays_finite_and_positive():
    assert quantile_bound((10, 20), 50, 0.9) == 50
    assert quantile_bound((10, 20), 0, 0.5) == 10
    assert quantile_bound((), 0, 0.5) == 1


def test_oracle_and_dispatch():
    assert oracle_bound(100, 30) == 70 and oracle_bound(100, 100) == 1
    assert remaining_bound("oracle", prior=None, generated=3, quantile=0.9, true_len=10) == 7
    assert remaining_bound("quantile", prior=(5, 50), generated=6, quantile=0.9, true_len=None) == 44
    with pytest.raises(ValueError):
        remaining_bound("oracle", prior=None, generated=3, quantile=0.9, true_len=None)
    with pytest.raises(ValueError):
        remaining_bound("psychic", prior=(1,), generated=3, quantile=0.9, true_len=1)
    with pytest.raises(ValueError):
        quantile_bound((1,), 0, 0.0)


def test_prompt_buckets():
    assert prompt_bucket(1) == 0 and prompt_bucket(128) == 0 and prompt_bucket(129) == 1
    assert prompt_bucket(10**6) == prompt_bucket(8192)
