"""Gaussian noise calibrated to the sensitivity declared upstream."""

from __future__ import annotations

import torch

from funcdp import random as fdr
from funcdp._checks import check_noise_multiplier
from funcdp.transforms.base import AGGREGATE, GradientTransformation, PrivacyContext
from funcdp.tree import tree_flatten, tree_unflatten


def gaussian_noise(noise_multiplier: float, *, secure: bool = False) -> GradientTransformation:
    """Adds N(0, (noise_multiplier * C)^2) to every coordinate of the aggregated gradient.

    C is the sensitivity of the clipping transform upstream in the chain (times the scale of any
    `normalize` between aggregation and noise), so the noise cannot drift from the clip. This is
    the Gaussian mechanism: with Poisson sampling at rate q, each step is the subsampled Gaussian
    mechanism that `account(q)` records.

    When a clipping transform upstream also releases a privatized count with noise multiplier
    sigma_b (adaptive clipping), the gradient gets the raised multiplier
    (sigma^-2 - (2 sigma_b)^-2)^-1/2, so that gradient and count together spend exactly what a
    single Gaussian release at `noise_multiplier` spends (Andrew et al. 2021, Theorem 1): the
    accountant records `noise_multiplier`.

    The noise of a step is drawn from the key the chain hands it, so the same key gives the same
    noise. With `secure=True` the key is ignored: every draw comes from the operating system's
    entropy through `funcdp.random.secure_normal`, which resists floating-point attacks.

    Raises:
      ValueError: noise_multiplier < 0 (when built), no clipping transform upstream, or
        noise_multiplier >= 2 sigma_b with a privatized count upstream (when chained).
    """
    check_noise_multiplier(noise_multiplier)
    noise_multiplier = float(noise_multiplier)

    def bind(context: PrivacyContext) -> tuple[GradientTransformation, PrivacyContext]:
        if context.sensitivity is None:
            raise ValueError(
                "gaussian_noise needs a transform with bounded sensitivity upstream: put a "
                "clipping transform such as clip(max_norm) and aggregate() before it"
            )
        gradient_multiplier = noise_multiplier
        if context.count_noise_multiplier is not None:
            gradient_multiplier = gradient_noise_multiplier(
                noise_multiplier, context.count_noise_multiplier
            )
        std = gradient_multiplier * context.sensitivity * context.scale
        bound = GradientTransformation(lambda params: (), _noise_update(std, secure), AGGREGATE)
        return bound, context._replace(noise_multiplier=noise_multiplier, secure=secure)

    return GradientTransformation(lambda params: (), _unbound_update, AGGREGATE, bind=bind)


def gradient_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """The gradient's multiplier (sigma^-2 - (2 sigma_b)^-2)^-1/2 beside a count at sigma_b.

    Raises:
      ValueError: noise_multiplier >= 2 * count_noise_multiplier (no gradient noise could make
        up the budget), or count_noise_multiplier <= 0.
    """
    sigma, sigma_b = float(noise_multiplier), float(count_noise_multiplier)
    if not sigma_b > 0:
        raise ValueError(f"count_noise_multiplier must be > 0, got {count_noise_multiplier!r}")
    if sigma == 0:
        return 0.0
    if sigma >= 2 * sigma_b:
        raise ValueError(
            f"noise_multiplier must be < 2 * count_noise_multiplier = {2 * sigma_b:g} when a "
            f"privatized count is released beside the gradient, got {sigma:g}: raise "
            "count_noise_multiplier or lower noise_multiplier"
        )
    return (sigma**-2 - (2 * sigma_b) ** -2) ** -0.5


def add_noise(tree, std: float, key, *, secure: bool = False):
    """`tree` plus N(0, std^2) on every coordinate, drawn from `key` (or OS entropy if secure)."""
    leaves, spec = tree_flatten(tree)
    if std == 0:
        return tree
    if secure:
        noisy = [
            leaf + std * fdr.secure_normal(leaf.shape, dtype=leaf.dtype, device=leaf.device)
            for leaf in leaves
        ]
    else:
        # std * N(0, 1) drawn into fresh tensors and the leaves added in place: one pass over
        # memory fewer than leaf + std * randn, and the same values.
        noisy = keyed_normal(leaves, std, key)
        torch._foreach_add_(noisy, leaves)
    return tree_unflatten(spec, noisy)


def keyed_normal(leaves: list[torch.Tensor], std: float, key) -> list[torch.Tensor]:
    """A fresh N(0, std^2) tensor shaped like each leaf, drawn from `key`: one generator per
    device (`device_key`), and per device and dtype one draw, split into the leaves' shapes in
    their order (on a GPU one launch for all leaves, not one each), so every transform that
    draws through it sees the same values for one key and one tree's shapes."""
    generators: dict[torch.device, torch.Generator] = {}
    kinds: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, leaf in enumerate(leaves):
        kinds.setdefault((leaf.device, leaf.dtype), []).append(i)
    draws: list[torch.Tensor | None] = [None] * len(leaves)
    for (device, dtype), indices in kinds.items():
        if device not in generators:
            generators[device] = fdr.generator(device_key(key, device), device)
        sizes = [leaves[i].numel() for i in indices]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        flat.normal_(0.0, std, generator=generators[device])
        for i, part in zip(indices, flat.split(sizes), strict=True):
            draws[i] = part.view(leaves[i].shape)
    return draws


def device_key(key, device: torch.device):
    """The key of the noise drawn on `device`: the key itself on the CPU (and the first device
    of a type), folded with the device's index elsewhere, so that leaves on cuda:0 and cuda:1
    get independent noise rather than two copies of one stream."""
    index = torch.device(device).index
    return key if not index else fdr.fold_in(key, index)


def _noise_update(std: float, secure: bool):
    def update(updates, state, params=None, *, key=None, mask=None):
        del params, mask
        if key is None and not secure:
            raise ValueError(
                "gaussian_noise needs a key: call update(..., key=funcdp.random.key(seed))"
            )
        return add_noise(updates, std, key, secure=secure), state

    return update


def _unbound_update(updates, state, params=None, *, key=None, mask=None):
    raise ValueError(
        "gaussian_noise takes its scale from the clipping transform upstream: use it inside "
        "chain(clip(...), aggregate(), gaussian_noise(...), ...)"
    )
