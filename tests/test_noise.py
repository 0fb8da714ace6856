"""Tests for funcdp/transforms/noise.py: Gaussian noise with std sigma * C from the clip upstream."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import funcdp as fdp
from funcdp import random as fdr
from funcdp.transforms.noise import add_noise

SHAPES = {"w": (60, 100), "b": (6000,), "v": (6000,)}  # 18000 coordinates
BATCH = 3
# Seeded draws use a fixed key, so their p-values are fixed numbers; secure draws are not
# seeded, so 1e-6 keeps a false failure at one in a million.
P_MIN = 1e-6


def _zeros(batch: int = BATCH) -> dict:
    return {name: torch.zeros(batch, *shape) for name, shape in SHAPES.items()}


def _noise(privatizer, key, *, mask=None, per_example=None):
    per_example = _zeros() if per_example is None else per_example
    out, _ = privatizer.update(per_example, privatizer.init(None), key=key, mask=mask)
    return out


def _flat(tree) -> np.ndarray:
    return torch.cat([x.reshape(-1) for x in fdp.tree.tree_leaves(tree)]).double().cpu().numpy()


def _assert_normal_with_std(values: np.ndarray, std: float) -> None:
    """KS test against N(0, std^2) and a two-sided chi-square test of the variance."""
    assert stats.kstest(values / std, "norm").pvalue > P_MIN
    assert _chi2_pvalue(values, std) > P_MIN
    # The checks have power: the variance test rejects a std 5% off, the KS test one 20% off.
    assert max(_chi2_pvalue(values, 0.95 * std), _chi2_pvalue(values, 1.05 * std)) < P_MIN
    assert stats.kstest(values / (1.2 * std), "norm").pvalue < P_MIN


def _chi2_pvalue(values: np.ndarray, std: float) -> float:
    """Two-sided p-value of sum(x^2) / std^2 ~ chi2(n), the mean being known (0)."""
    chi2 = float(np.sum(values**2)) / std**2
    return 2 * min(stats.chi2.sf(chi2, values.size), stats.chi2.cdf(chi2, values.size))


@pytest.mark.parametrize("sigma, max_norm", [(1.0, 1.0), (0.7, 3.0), (2.5, 0.1)])
def test_noise_std_is_sigma_times_clip_norm(sigma, max_norm):
    privatizer = fdp.chain(fdp.clip(max_norm), fdp.aggregate(), fdp.gaussian_noise(sigma))
    _assert_normal_with_std(_flat(_noise(privatizer, fdr.key(0))), sigma * max_norm)


@pytest.mark.parametrize("before", [True, False])
def test_normalize_divides_the_noise_std(before):
    sigma, max_norm, expected_batch = 1.3, 2.0, 8.0
    middle = [fdp.gaussian_noise(sigma), fdp.normalize(expected_batch)]
    if before:
        middle.reverse()
    privatizer = fdp.chain(fdp.clip(max_norm), fdp.aggregate(), *middle)
    _assert_normal_with_std(
        _flat(_noise(privatizer, fdr.key(1))), sigma * max_norm / expected_batch
    )


def test_noise_is_added_to_the_sum():
    privatizer = fdp.chain(fdp.clip(10.0), fdp.aggregate(), fdp.gaussian_noise(0.5))
    per_example = {name: torch.randn(BATCH, *shape) * 1e-3 for name, shape in SHAPES.items()}
    key = fdr.key(2)
    noisy = _noise(privatizer, key, per_example=per_example)
    noise_only = _noise(privatizer, key)
    for name in SHAPES:
        torch.testing.assert_close(noisy[name] - noise_only[name], per_example[name].sum(0))


def test_noise_is_std_times_the_keys_standard_normal_draws_in_leaf_order():
    """One draw per dtype from the key's generator, split into the leaves in their order."""
    tree = {"a": torch.randn(5, 7), "b": torch.randn(300), "c": torch.randn(4, dtype=torch.float64)}
    noisy = add_noise(tree, 0.7, fdr.key(9))
    generator = fdr.generator(fdr.key(9), torch.device("cpu"))
    draw = torch.randn(35 + 300, generator=generator)  # optree's order of a dict: sorted keys
    for name, part in zip(("a", "b"), draw.split([35, 300]), strict=True):
        expected = tree[name] + 0.7 * part.view(tree[name].shape)
        torch.testing.assert_close(noisy[name], expected, rtol=1e-6, atol=1e-6)
    wide = tree["c"] + 0.7 * torch.randn(4, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(noisy["c"], wide, rtol=1e-12, atol=1e-12)


def test_same_key_same_noise_new_key_new_noise():
    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0))
    key = fdr.key(3)
    first = _flat(_noise(privatizer, key))
    assert np.array_equal(first, _flat(_noise(privatizer, fdr.key(3))))
    for other in (fdr.key(4), fdr.fold_in(key, 1), fdr.split(key)[0]):
        second = _flat(_noise(privatizer, other))
        assert not np.array_equal(first, second)
        assert abs(np.corrcoef(first, second)[0, 1]) < 5 / math.sqrt(first.size)


def test_successive_steps_get_fresh_noise():
    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0))
    key = fdr.key(5)
    steps = [_flat(_noise(privatizer, fdr.fold_in(key, t))) for t in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert abs(np.corrcoef(steps[a], steps[b])[0, 1]) < 5 / math.sqrt(steps[a].size)


def test_leaves_get_independent_noise():
    noise = _noise(fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0)), fdr.key(6))
    b, v = noise["b"].double().numpy(), noise["v"].double().numpy()
    assert abs(np.corrcoef(b, v)[0, 1]) < 5 / math.sqrt(b.size)


def test_noise_keeps_dtype_and_shape():
    per_example = {"a": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(2, 4, 5)}
    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0))
    noisy = _noise(privatizer, fdr.key(0), per_example=per_example)
    assert noisy["a"].dtype == torch.float64 and noisy["a"].shape == (3,)
    assert noisy["b"].dtype == torch.float32 and noisy["b"].shape == (4, 5)


def test_zero_noise_multiplier_adds_nothing():
    per_example = {"a": torch.randn(4, 3)}
    privatizer = fdp.chain(fdp.clip(100.0), fdp.aggregate(), fdp.gaussian_noise(0.0))
    out = _noise(privatizer, fdr.key(0), per_example=per_example)
    assert torch.equal(out["a"], per_example["a"].sum(0))


def test_secure_mode_ignores_the_key_and_has_the_right_std():
    sigma, max_norm = 1.2, 0.5
    privatizer = fdp.chain(
        fdp.clip(max_norm), fdp.aggregate(), fdp.gaussian_noise(sigma, secure=True)
    )
    key = fdr.key(0)
    first, second = _flat(_noise(privatizer, key)), _flat(_noise(privatizer, key))
    assert not np.array_equal(first, second)
    assert abs(np.corrcoef(first, second)[0, 1]) < 6 / math.sqrt(first.size)
    _assert_normal_with_std(first, sigma * max_norm)
    # Secure mode needs no key at all.
    _assert_normal_with_std(_flat(_noise(privatizer, None)), sigma * max_norm)


def test_missing_key_raises():
    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0))
    with pytest.raises(ValueError, match="gaussian_noise needs a key"):
        _noise(privatizer, None)


def test_noise_outside_a_chain_raises():
    transform = fdp.gaussian_noise(1.0)
    with pytest.raises(ValueError, match=r"inside\s+chain\(clip"):
        transform.update({"a": torch.zeros(3)}, transform.init(None), key=fdr.key(0))


def test_noise_without_clip_refused_when_chained():
    with pytest.raises(
        ValueError, match="gaussian_noise needs a transform with bounded sensitivity"
    ):
        fdp.chain(fdp.aggregate(), fdp.gaussian_noise(1.0))


@pytest.mark.parametrize("sigma", [-0.1, -1, math.nan, math.inf, True, "1", None])
def test_bad_noise_multiplier_raises(sigma):
    with pytest.raises(ValueError, match=r"noise_multiplier must be a finite number >= 0, got"):
        fdp.gaussian_noise(sigma)
