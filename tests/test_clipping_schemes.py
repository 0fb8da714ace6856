"""Tests for the clipping schemes of funcdp/transforms/clipping.py beyond flat `clip`.

`clip_by` (user factor rules, grouped norms), `clip_per_layer`, `normalize_per_example`
(automatic clipping), the step's non-finite policy across them; and the testing kit run over every shipped clipping
transform (check_sensitivity and check_pure, 200 hypothesis examples each).
"""

from __future__ import annotations

import math

import pytest
import torch

import funcdp as fdp
from funcdp import transforms as T
from funcdp.testing import check_pure, check_sensitivity, param_trees

GROUPED = {
    "fc1.weight": torch.zeros(3, 2),
    "fc1.bias": torch.zeros(3),
    "fc2.weight": torch.zeros(4),
}


def _grads(batch: int = 5, seed: int = 0, scale: float = 3.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: scale * torch.randn((batch, *leaf.shape), generator=gen, dtype=torch.float64)
        for name, leaf in GROUPED.items()
    }


def _group_norms(tree, names) -> torch.Tensor:
    return torch.stack(
        [
            torch.cat([tree[n].reshape(tree[n].shape[0], -1) for n in group], 1).norm(dim=1)
            for group in names
        ],
        1,
    )


def test_clip_by_hands_true_group_norms_to_the_rule_and_applies_its_factors():
    grads = _grads()
    seen = []

    def rule(norms):
        seen.append(norms.clone())
        return torch.arange(1.0, 1.0 + norms.shape[1], dtype=norms.dtype).expand_as(norms)

    transform = T.clip_by(rule, 1.0, groups=lambda path: path.split(".")[0])
    out, state = transform.update(grads, transform.init(None))
    assert state == ()
    expected = _group_norms(grads, [["fc1.weight", "fc1.bias"], ["fc2.weight"]])
    torch.testing.assert_close(seen[0], expected)
    # Columns follow the sorted group names: "fc1" gets factor 1, "fc2" factor 2.
    torch.testing.assert_close(out["fc1.weight"], grads["fc1.weight"])
    torch.testing.assert_close(out["fc2.weight"], 2 * grads["fc2.weight"])


def test_clip_by_flat_rule_equals_clip():
    grads = _grads(batch=9, scale=0.5)
    ours, _ = T.clip_by(T.flat_factors(1.0), 1.0).update(grads, ())
    reference, _ = fdp.clip(1.0).update(grads, ())
    for name in grads:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-12, atol=0)


def test_clip_by_refuses_bad_factor_shapes_and_claims():
    transform = T.clip_by(lambda norms: norms[:, 0], 1.0)
    with pytest.raises(ValueError, match=r"factor_fn must return a tensor of shape \(5, 1\)"):
        transform.update(_grads(), ())
    with pytest.raises(ValueError, match="sensitivity must be a finite number > 0, got -1"):
        T.clip_by(T.flat_factors(1.0), -1)
    with pytest.raises(TypeError, match="factor_fn must be callable"):
        T.clip_by(1.0, 1.0)


def test_clip_per_layer_bounds_each_group_and_declares_root_sum_of_squares():
    norms = {"fc1.weight": 0.5, "fc1.bias": 2.0, "fc2.weight": 1.0}
    transform = T.clip_per_layer(norms)
    assert transform.sensitivity == pytest.approx(math.sqrt(0.25 + 4.0 + 1.0))
    grads = _grads(batch=50, scale=1.0)
    out, _ = transform.update(grads, ())
    for name, limit in norms.items():
        before = grads[name].reshape(50, -1).norm(dim=1)
        after = out[name].reshape(50, -1).norm(dim=1)
        assert (after <= limit * (1 + 1e-12)).all()
        small = before <= limit
        assert small.any() and (~small).any()  # both cases are exercised
        torch.testing.assert_close(after[small], before[small])
        torch.testing.assert_close(after[~small], torch.full_like(after[~small], limit))


def test_clip_per_layer_with_a_grouping_function_and_unknown_groups():
    transform = T.clip_per_layer({"fc1": 1.0, "fc2": 1.0}, groups=lambda p: p.split(".")[0])
    out, _ = transform.update(_grads(batch=20, scale=5.0), ())
    fc1 = _group_norms(out, [["fc1.weight", "fc1.bias"]])
    torch.testing.assert_close(fc1, torch.ones_like(fc1))
    lonely = T.clip_per_layer({"fc1": 1.0}, groups=lambda p: p.split(".")[0])
    with pytest.raises(
        ValueError, match="leaf 'fc2.weight' is in group 'fc2', which is not one of"
    ):
        lonely.update(_grads(), ())
    with pytest.raises(ValueError, match=r"max_norms\['a'\] must be a finite number > 0, got 0"):
        T.clip_per_layer({"a": 0.0})
    with pytest.raises(ValueError, match="max_norms must be a non-empty mapping"):
        T.clip_per_layer({})


def test_normalize_per_example_is_r_over_norm_plus_gamma():
    grads = _grads(batch=6, scale=2.0)
    radius, gamma = 0.7, 0.05
    transform = T.normalize_per_example(radius, gamma)
    assert transform.sensitivity == radius
    out, _ = transform.update(grads, ())
    norms = _group_norms(grads, [list(grads)])[:, 0]
    factor = radius / (norms + gamma)
    for name in grads:
        shaped = factor.reshape((-1,) + (1,) * (grads[name].dim() - 1))
        torch.testing.assert_close(out[name], grads[name] * shaped)
    after = _group_norms(out, [list(out)])[:, 0]
    torch.testing.assert_close(after, radius * norms / (norms + gamma))
    with pytest.raises(ValueError, match="gamma must be a finite number > 0, got 0"):
        T.normalize_per_example(1.0, 0)


def test_per_layer_automatic_clipping():
    radii = {"fc1.weight": 1.0, "fc1.bias": 0.5, "fc2.weight": 2.0}
    transform = T.normalize_per_example(None, 0.01, group_norms=radii)
    assert transform.sensitivity == pytest.approx(math.sqrt(1 + 0.25 + 4))
    grads = _grads(batch=4)
    out, _ = transform.update(grads, ())
    for name, radius in radii.items():
        norm = grads[name].reshape(4, -1).norm(dim=1)
        after = out[name].reshape(4, -1).norm(dim=1)
        torch.testing.assert_close(after, radius * norm / (norm + 0.01))


@pytest.mark.parametrize(
    "transform",
    [
        fdp.clip(1.0),
        T.clip_per_layer({"fc1.weight": 1.0, "fc1.bias": 1.0, "fc2.weight": 1.0}),
        T.normalize_per_example(1.0),
    ],
    ids=["flat", "per_layer", "automatic"],
)
@pytest.mark.parametrize("mode", ["vmap", "ghost"])
def test_on_nonfinite_zero_leaves_nonfinite_examples_out_for_every_scheme(transform, mode):
    """The one non-finite policy is the step's: with on_nonfinite="zero", a real example whose
    gradient is not finite contributes exactly what a padded row does (nothing), in both
    engines, for every clipping scheme."""
    model = torch.nn.Sequential()
    model.add_module("fc1", torch.nn.Linear(2, 3))
    model.add_module("fc2", torch.nn.Linear(3, 1, bias=False))
    apply_fn, params, buffers = fdp.functionalize(model.double())

    def loss_fn(params, buffers, x):
        return apply_fn(params, buffers, x[None]).sum() * 3.0

    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[1, 0], x[3, 1] = float("nan"), float("inf")
    mask = torch.tensor([True, True, True, True, True, False])
    finite_only = mask.clone()
    finite_only[[1, 3]] = False
    privatizer = T.chain(transform, T.aggregate())
    optimizer = fdp.optim.sgd(1.0)
    step = fdp.make_train_step(
        loss_fn, privatizer, optimizer, on_nonfinite="zero", performance=fdp.Performance(mode=mode)
    )
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    new, metrics = step(state, fdp.Batch((x,), mask))
    clean = torch.where(finite_only[:, None], x, 0.0)
    reference, _ = step(state, fdp.Batch((clean,), finite_only))
    assert metrics["nonfinite"] == 2
    for name, value in new.params.items():
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, reference.params[name])


def test_called_directly_a_nonfinite_example_poisons_the_sum():
    grads = _grads()
    grads["fc1.bias"][1, 0] = float("nan")
    summed = T.chain(fdp.clip(1.0), T.aggregate())
    out, _ = summed.update(grads, summed.init(None))
    assert torch.isnan(out["fc1.bias"]).any()


# ---- the kit over every shipped clipping transform -------------------------------------------

KIT_PARAMS = {
    "fc1.weight": torch.zeros(2, 2),
    "fc1.bias": torch.zeros(2),
    "fc2.weight": torch.zeros(3),
}
_PER_LEAF = {"fc1.weight": 0.5, "fc1.bias": 0.3, "fc2.weight": 2.0}
SHIPPED = {
    "clip": (fdp.clip(1.0), None),
    "clip_per_layer": (T.clip_per_layer(_PER_LEAF), KIT_PARAMS),
    "clip_per_group": (
        T.clip_per_layer({"fc1": 1.0, "fc2": 0.1}, groups=lambda p: p.split(".")[0]),
        KIT_PARAMS,
    ),
    "normalize_per_example": (T.normalize_per_example(2.0, 0.01), None),
    "normalize_per_layer": (
        T.normalize_per_example(None, 0.1, group_norms=_PER_LEAF),
        KIT_PARAMS,
    ),
    "clip_by_soft": (
        T.clip_by(lambda n: torch.tanh(n) / n.clamp_min(1e-30), 1.0),
        param_trees(dtypes=(torch.float32, torch.float64)),
    ),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_clipping_passes_check_sensitivity(name):
    transform, params = SHIPPED[name]
    check_sensitivity(transform, params=params, max_examples=200)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_clipping_passes_check_pure(name):
    transform, params = SHIPPED[name]
    check_pure(transform, params=params, max_examples=200)


@pytest.mark.parametrize("name", ["clip", "clip_per_layer", "normalize_per_example"])
def test_shipped_clipping_passes_replace_one(name):
    transform, params = SHIPPED[name]
    check_sensitivity(transform, params=params, relation="replace", max_examples=50)


def test_grouped_norms_names_its_columns():
    grads = _grads(batch=3)
    norms, names = T.clipping.grouped_norms(grads, lambda p: p.split(".")[0])
    assert names == ("fc1", "fc2")
    expected = _group_norms(grads, [["fc1.weight", "fc1.bias"], ["fc2.weight"]])
    torch.testing.assert_close(norms, expected)
