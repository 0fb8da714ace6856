"""SecAggPlus: settings checks, and the margin that keeps SecAgg+'s rounding within the clip norm.

The quantization is Flower's own (`flwr.common.secure_aggregation.quantization`), the one
`secaggplus_mod` applies to each client's update.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("flwr")

from flwr.common.secure_aggregation.quantization import dequantize, quantize  # noqa: E402

from funcdp.federated.flower import SecAggPlus  # noqa: E402


def test_bad_settings_are_refused_with_their_name():
    with pytest.raises(ValueError, match="num_shares must be an int >= 3"):
        SecAggPlus(num_shares=2).check()
    with pytest.raises(ValueError, match="reconstruction_threshold must be below num_shares=5"):
        SecAggPlus(num_shares=5, reconstruction_threshold=5).check()
    with pytest.raises(ValueError, match="modulus_range must be a power of two"):
        SecAggPlus(modulus_range=3 << 22).check()
    with pytest.raises(ValueError, match="quantization_range=64 is too coarse"):
        SecAggPlus(quantization_range=64).update_scale(1.0, num_coordinates=1002)
    assert SecAggPlus().max_clients == 1023


@settings(max_examples=40)
@given(
    size=st.integers(1, 300),
    seed=st.integers(0, 2**31),
    clip_norm=st.floats(1e-3, 1e3),
    range_bits=st.integers(8, 24),
)
def test_secagg_rounding_of_a_scaled_update_stays_within_the_clip_norm(
    size, seed, clip_norm, range_bits
):
    """Flower's own quantize/dequantize on an update of norm C, scaled by update_scale."""
    secagg = SecAggPlus(quantization_range=1 << range_bits)
    rng = np.random.default_rng(seed)
    update = rng.standard_normal(size)
    update *= clip_norm / np.linalg.norm(update)  # on the clip norm, the worst case
    try:
        scale = secagg.update_scale(clip_norm, num_coordinates=size)
    except ValueError:
        return  # too coarse a range for this size: refused, as tested above
    np.random.seed(seed)  # Flower's stochastic rounding draws from numpy's global generator
    (quantized,) = quantize([update * scale], clip_norm, secagg.quantization_range)
    (restored,) = dequantize([quantized], clip_norm, secagg.quantization_range)
    assert np.abs(restored - update * scale).max() < secagg.step(clip_norm)
    assert np.linalg.norm(restored) <= clip_norm


def test_without_the_scale_secagg_rounding_can_exceed_the_clip_norm():
    secagg, clip_norm = SecAggPlus(quantization_range=1 << 12), 1.0
    update = np.full(1000, clip_norm / math.sqrt(1000))
    norms = []
    for seed in range(20):
        np.random.seed(seed)
        (quantized,) = quantize([update], clip_norm, secagg.quantization_range)
        norms.append(
            np.linalg.norm(dequantize([quantized], clip_norm, secagg.quantization_range)[0])
        )
    assert max(norms) > clip_norm
