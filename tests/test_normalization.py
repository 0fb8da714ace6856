"""Tests for funcdp/transforms/normalization.py: division by the EXPECTED batch size."""

from __future__ import annotations

import math

import pytest
import torch

import funcdp as fdp
from funcdp.transforms import AGGREGATE


def test_divides_by_expected_not_realised_batch_size():
    gen = torch.Generator().manual_seed(0)
    per_example = {"a": torch.rand(8, 3, generator=gen), "b": torch.rand(8, generator=gen)}
    mask = torch.tensor([True, False] * 4)  # 4 real rows of 8
    privatizer = fdp.chain(fdp.clip(100.0), fdp.aggregate(), fdp.normalize(expected_batch_size=16))
    out, state = privatizer.update(per_example, privatizer.init(None), mask=mask)
    assert state == ((), (), ())
    for name, leaf in per_example.items():
        torch.testing.assert_close(out[name], leaf[mask].sum(0) / 16)
        # Not the mean over the 4 real rows, nor over the 8 padded ones.
        assert not torch.allclose(out[name], leaf[mask].mean(0))


def test_standalone_update_scales_the_tree():
    tree = {"a": torch.tensor([2.0, -4.0]), "b": (torch.tensor(8.0),)}
    out, _ = fdp.normalize(4).update(tree, ())
    assert torch.equal(out["a"], torch.tensor([0.5, -1.0]))
    assert torch.equal(out["b"][0], torch.tensor(2.0))


def test_fractional_expected_batch_size():
    out, _ = fdp.normalize(2.5).update({"a": torch.tensor([5.0])}, ())
    torch.testing.assert_close(out["a"], torch.tensor([2.0]))


def test_normalize_is_an_aggregate_stage_transform():
    transform = fdp.normalize(10)
    assert transform.stage == AGGREGATE and transform.sensitivity is None


@pytest.mark.parametrize("size", [0, -4, math.nan, math.inf, True, "8", None])
def test_bad_expected_batch_size_raises(size):
    with pytest.raises(ValueError, match=r"expected_batch_size must be a finite number > 0, got"):
        fdp.normalize(size)


@pytest.mark.parametrize("size", [1e-320, 5e-324, 2.0**-1025])
def test_expected_batch_size_whose_reciprocal_overflows_raises(size):
    # A subnormal size passes "finite and > 0" but 1 / size is inf: the factor must be finite.
    with pytest.raises(ValueError, match=r"expected_batch_size must be large enough that 1 / "):
        fdp.normalize(size)


def test_tiny_expected_batch_size_with_a_finite_reciprocal_is_accepted():
    size = 2.0**-1000  # 1 / size = 2**1000, finite
    out, _ = fdp.normalize(size).update({"a": torch.tensor([1.0], dtype=torch.float64)}, ())
    assert torch.equal(out["a"], torch.tensor([2.0**1000], dtype=torch.float64))
