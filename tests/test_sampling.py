"""Sampling rules: greedy, temperature, top-k, top-p, and the seeded counter-based RNG."""

from __future__ import annotations

import numpy as np
import pytest

from realm_wasm.sampling import TOP_K_CAP, SamplingParams, pcg_hash, sample, uniform


def pcg_hash_numpy(x: np.ndarray) -> np.ndarray:
    """The same hash with numpy's wrapping uint32 arithmetic (as WGSL computes it)."""
    with np.errstate(over="ignore"):
        state = x.astype(np.uint32) * np.uint32(747796405) + np.uint32(2891336453)
        word = ((state >> ((state >> np.uint32(28)) + np.uint32(4))) ^ state) * np.uint32(277803737)
        return (word >> np.uint32(22)) ^ word


def test_hash_is_u32_wrapping_arithmetic():
    xs = np.array([0, 1, 2, 12345, 0xFFFFFFFF, 0xDEADBEEF], np.uint64)
    assert [pcg_hash(int(x)) for x in xs] == [int(v) for v in pcg_hash_numpy(xs)]


def test_uniform_is_in_unit_interval_and_roughly_uniform():
    u = np.array([uniform(7, n) for n in range(20000)])
    assert u.min() >= 0.0 and u.max() < 1.0
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert np.all(np.abs(hist - 2000) < 200)


def test_greedy_is_argmax_with_lowest_id_on_ties():
    assert sample(np.array([0.1, 3.0, 3.0, -1.0]), SamplingParams(), 0) == 1


def test_temperature_sampling_follows_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, seed=3)
    counts = np.bincount([sample(logits, params, n) for n in range(8000)], minlength=4) / 8000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.02)


def test_top_k_and_top_p_restrict_the_candidates():
    logits = np.log(np.array([0.05, 0.4, 0.3, 0.25]))
    top2 = {sample(logits, SamplingParams(1.0, top_k=2, seed=1), n) for n in range(300)}
    assert top2 == {1, 2}
    # 0.4 + 0.3 = 0.7 reaches top_p 0.6: only ids 1 and 2 remain
    nucleus = {sample(logits, SamplingParams(1.0, top_p=0.6, seed=1), n) for n in range(300)}
    assert nucleus == {1, 2}
    assert {sample(logits, SamplingParams(1.0, top_k=1), n) for n in range(50)} == {1}


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = np.zeros(1000)
    run = [sample(logits, SamplingParams(0.8, seed=42), n) for n in range(20)]
    assert run == [sample(logits, SamplingParams(0.8, seed=42), n) for n in range(20)]
    assert run != [sample(logits, SamplingParams(0.8, seed=43), n) for n in range(20)]


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
                                    dict(temperature=float("nan"))])
def test_invalid_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_top_k_is_capped_like_the_gpu_sampler():
    # 200 equally likely tokens: only the first TOP_K_CAP (lowest ids on ties) can be drawn
    logits = np.zeros(200)
    drawn = {sample(logits, SamplingParams(1.0, seed=9), n) for n in range(3000)}
    assert max(drawn) < TOP_K_CAP and len(drawn) > TOP_K_CAP * 0.9


def test_top_p_never_reached_in_float32_keeps_every_candidate():
    # a mass that sums to just under 1.0 in float32 must not index past the candidates
    logits = np.log(np.full(64, 1 / 64, np.float32))
    for n in range(200):
        assert 0 <= sample(logits, SamplingParams(1.0, top_p=1.0, seed=n), n) < 64
