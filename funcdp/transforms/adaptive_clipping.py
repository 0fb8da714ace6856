"""Adaptive clipping: a clipping norm that tracks a quantile of the gradient norms, privately.

Andrew, Thakkar, McMahan & Ramaswamy (2021), "Differentially private learning with adaptive
clipping": after each batch the norm C moves geometrically towards the target quantile gamma of
the per-example norms, C <- C * exp(-eta * (b - gamma)), where b is a privatized fraction of
unclipped examples. With one norm per group of layers this is the per-layer adaptive clipping of
He et al. (2022), "Exploring the limits of differentially private deep learning with group-wise
clipping".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from funcdp import random as fdr
from funcdp._checks import _is_real, check_positive
from funcdp.transforms.base import PER_EXAMPLE, GradientTransformation, PrivacyContext
from funcdp.transforms.clipping import GroupFn, _by_path, _thresholds, clip_by


class AdaptiveClipState(NamedTuple):
    """The tracked norms and the statistics of the batch in progress.

    Attributes:
      norms: the current clipping norm of each group, float64 [G].
      pending: sum over the real examples seen since the last `finish` of
        (1[norm <= C] - 1/2), float64 [G].
    """

    norms: torch.Tensor
    pending: torch.Tensor


def adaptive_clip(
    initial_norm: float | Mapping[str, float],
    target_quantile: float = 0.5,
    learning_rate: float = 0.2,
    *,
    count_noise_multiplier: float,
    expected_batch_size: float,
    groups: GroupFn | None = None,
) -> GradientTransformation:
    """Clips at a norm C_t that tracks the `target_quantile` of the per-example gradient norms.

    Each step clips example i at the current norm C_t and counts, over the real examples,
    b_i - 1/2 with b_i = 1[||g_i|| <= C_t]; at the end of the logical batch (`finish`) the count
    gets N(0, sigma_b^2) noise, is divided by the expected batch size B, and the norm moves:
    b = count / B + 1/2, C_{t+1} = C_t * exp(-learning_rate * (b - target_quantile)).

    Centering b_i makes the count's sensitivity 1/2, so together with the gradient the step
    spends what one Gaussian release at sigma spends when the gradient's noise multiplier is
    (sigma^-2 - (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, Theorem 1). `gaussian_noise`
    downstream applies that raise by itself and refuses sigma >= 2 sigma_b; the accountant
    records sigma.

    The clipped gradient is emitted at the scale of the initial norm: example i is multiplied
    by min(1, C_t / ||g_i||) * C_0 / C_t = C_0 / max(||g_i||, C_t). So every contribution has norm
    at most C_0 (the declared, fixed sensitivity, which the noise uses), and the release equals
    the clipped-at-C_t sum with noise sigma_grad * C_t, multiplied by C_0 / C_t. At C_t = C_0 this
    is `clip(C_0)` exactly; as C_t moves, the step size seen by the optimizer is that of the
    original method times C_0 / C_t (a learning-rate rescaling, no privacy cost).

    With `groups` and a mapping of initial norms, every group has its own norm and count
    (He et al. 2022); the G counts get noise of std sigma_b * sqrt(G), so the vector of counts
    (sensitivity sqrt(G) / 2) spends what one count at sigma_b spends, and the declared
    sensitivity is sqrt(sum_g C_{g,0}^2).

    Args:
      initial_norm: C_0, or the initial norm of every group by name (per-layer variant).
      target_quantile: gamma in [0, 1], the fraction of examples to leave unclipped.
      learning_rate: eta > 0 of the geometric update.
      count_noise_multiplier: sigma_b > 0 (Andrew et al. suggest B / 20).
      expected_batch_size: B > 0, the expected (Poisson) batch size the count is divided by.
      groups: as in `clip_per_layer` (default: each leaf its own group) with a mapping.

    Raises:
      ValueError: an argument outside its range (each message names it), or `groups` with a
        single initial norm.
    """
    if isinstance(initial_norm, Mapping):
        names, initial = _thresholds("initial_norm", initial_norm)
        group_fn = groups or _by_path
    else:
        if groups is not None:
            raise ValueError(
                "adaptive_clip with groups needs initial_norm as a mapping from group name to "
                f"norm, got {initial_norm!r}"
            )
        check_positive("initial_norm", initial_norm)
        names, initial, group_fn = None, [float(initial_norm)], None
    if not _is_real(target_quantile) or not 0.0 <= target_quantile <= 1.0:
        raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile!r}")
    check_positive("learning_rate", learning_rate)
    check_positive("count_noise_multiplier", count_noise_multiplier)
    check_positive("expected_batch_size", expected_batch_size)
    sigma_b, batch = float(count_noise_multiplier), float(expected_batch_size)
    initial_norms = torch.tensor(initial, dtype=torch.float64)
    count_std = sigma_b * math.sqrt(len(initial))

    def init(params):
        del params
        zero = torch.zeros(len(initial), dtype=torch.float64)
        return AdaptiveClipState(initial_norms.clone(), zero)

    def update(updates, state, params=None, *, key=None, mask=None):
        def factor_fn(norms):
            current = state.norms.to(norms.device, norms.dtype)
            start = initial_norms.to(norms.device, norms.dtype)
            unclipped.append(norms <= current)
            return start / torch.maximum(norms, current)

        unclipped: list[torch.Tensor] = []
        clipper = clip_by(factor_fn, sensitivity, groups=group_fn, group_names=names)
        updates, _ = clipper.update(updates, clipper.init(None), params, key=key, mask=mask)
        below = unclipped[0]
        if mask is not None:
            below = below & mask.to(below.device)[:, None]
        real = below.shape[0] if mask is None else int(mask.sum())
        pending = state.pending + below.sum(0).to("cpu", torch.float64) - 0.5 * real
        return updates, AdaptiveClipState(state.norms, pending)

    def finish(state, *, key=None):
        if key is None:
            raise ValueError("adaptive_clip needs a key to noise its count: pass key= to update")
        noise = count_std * fdr.normal(fdr.fold_in(key, 1), (len(initial),), dtype=torch.float64)
        fraction = (state.pending + noise) / batch + 0.5
        norms = state.norms * torch.exp(-learning_rate * (fraction - target_quantile))
        return AdaptiveClipState(norms, torch.zeros_like(state.pending))

    def bind(context: PrivacyContext) -> tuple[GradientTransformation, PrivacyContext]:
        if context.count_noise_multiplier is not None:
            raise ValueError("a chain may hold only one adaptive clipping transform")
        return transform._replace(bind=None), context._replace(count_noise_multiplier=sigma_b)

    sensitivity = math.sqrt(sum(c * c for c in initial))
    transform = GradientTransformation(
        init, update, PER_EXAMPLE, sensitivity=sensitivity, bind=bind, finish=finish
    )
    return transform
