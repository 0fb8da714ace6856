"""The clip bound and the engines' agreement on a CUDA device, where the kernels differ.

cuBLAS and cuDNN sum in other orders than the CPU's kernels, may split a reduction, and run
float32 products in TF32 when torch is set to (`set_float32_matmul_precision("high")`); the
certified norms must hold there too. Skipped without a CUDA device (CI has none); run on a lent
GPU machine with `python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_benchmark_models import ROWS, _assert_same_steps
from test_certified import _crafted_linear, _linear_loss
from test_noise import _assert_normal_with_std, _flat

import funcdp as fdp
from funcdp.testing import check_engine_sensitivity, sequence_examples
from funcdp.testing.engines import HF_LAYERS, LAYERS, Problem

C = 1.0


@pytest.fixture
def device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


def _on(device: torch.device):
    def move(problem: Problem) -> Problem:
        params = {k: v.to(device) for k, v in problem.params.items()}
        return problem._replace(params=params, batch=tuple(x.to(device) for x in problem.batch))

    return move


@pytest.mark.parametrize("layer", LAYERS + HF_LAYERS)
def test_every_engine_bounds_crafted_examples(device, layer):
    problems = sequence_examples(layers=(layer,)).map(_on(device))
    check_engine_sensitivity(problems, max_norm=C, max_examples=25)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_every_engine_bounds_crafted_examples_in_tf32(device, layer, monkeypatch):
    """TF32 products (u = 2^-11) and every op in the Gram form, whose bounds then widen."""
    from funcdp.ghost import bounds

    monkeypatch.setattr(bounds, "EXPLICIT_ELEMENTS", 0)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        problems = sequence_examples(layers=(layer,)).map(_on(device))
        check_engine_sensitivity(problems, max_norm=C, max_examples=25)
    finally:
        torch.set_float32_matmul_precision(before)


def _moved_by_each_example(performance, device, scale: float = 1e7) -> list[float]:
    """With sigma 0, lr 1 and no normalization, params - new params is the clipped sum."""
    params, x, g = _crafted_linear(scale)
    params, x, g = {k: p.to(device) for k, p in params.items()}, x.to(device), g.to(device)
    privatizer = fdp.chain(
        fdp.clip(C), fdp.aggregate(), fdp.gaussian_noise(0.0), fdp.account(sample_rate=0.5)
    )
    optimizer = fdp.optim.sgd(1.0)
    step = fdp.make_train_step(_linear_loss, privatizer, optimizer, performance=performance)
    state = fdp.TrainState.create(
        params, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    moved = []
    for i in range(x.shape[0]):
        mask = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
        mask[i] = True
        new, metrics = step(state, fdp.Batch((x, g), mask))
        assert math.isfinite(metrics["grad_norm"])
        moved.append(
            math.sqrt(
                sum(
                    float((state.params[k] - new.params[k]).double().square().sum()) for k in params
                )
            )
        )
    return moved


@pytest.mark.parametrize("mode", ["auto", "vmap", "ghost", "two_pass"])
def test_train_step_bounds_one_crafted_example(device, mode):
    moved = _moved_by_each_example(fdp.Performance(mode=mode), device)
    assert max(moved) <= C * (1 + 1e-6), moved


def test_inductor_compiled_step_bounds_one_crafted_example(device):
    """Inductor's own kernels (Triton) for the ghost step's norms and sums."""
    moved = _moved_by_each_example(fdp.Performance(mode="ghost", compile=True), device)
    assert max(moved) <= C * (1 + 1e-6), moved


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_default_step_equals_vmap_step_on_the_benchmark_model(device, name):
    import step_time

    torch.manual_seed(0)
    module, inputs, targets = step_time.MODELS[name]()
    model = step_time._prepare(module, "funcdp").to(device)
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    x, y = inputs[0][: ROWS + 1].to(device), targets[: ROWS + 1].to(device)
    mask = torch.arange(ROWS + 1, device=device) < ROWS  # one padded row
    batches = [fdp.Batch((x, y), mask), fdp.Batch((x.flip(0), y.flip(0)), mask)]
    _assert_same_steps(loss_fn, params, buffers, batches)


def test_all_finite_reads_every_tensor(device):
    """On a GPU `all_finite` takes one fused sum of absolute values over the tensors."""
    from funcdp.tree import all_finite

    tensors = [torch.ones(3, 4, device=device), torch.ones(5, device=device, dtype=torch.bfloat16)]
    assert all_finite(tensors)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i in range(2):
            broken = [t.clone() for t in tensors]
            broken[i].view(-1)[-1] = bad
            assert not all_finite(broken), (bad, i)


@pytest.mark.parametrize("secure", [False, True])
def test_noise_on_the_device_has_the_std(device, secure):
    """Keyed noise (the device's generator) and secure noise (the OS's entropy), drawn for
    leaves on the GPU: N(0, (sigma C)^2) by a KS and a variance test; a key gives the same noise
    again, another key and another leaf independent noise."""
    from funcdp.transforms.noise import add_noise

    zeros = {"b": torch.zeros(6000, device=device), "w": torch.zeros(60, 100, device=device)}
    noisy = add_noise(zeros, 0.7, fdp.random.key(0), secure=secure)
    assert all(x.device.type == "cuda" for x in noisy.values())
    _assert_normal_with_std(_flat(noisy), 0.7)
    again = _flat(add_noise(zeros, 0.7, fdp.random.key(0), secure=secure))
    assert np.array_equal(_flat(noisy), again) != secure
    other = _flat(add_noise(zeros, 0.7, fdp.random.key(1), secure=secure))
    assert abs(np.corrcoef(_flat(noisy), other)[0, 1]) < 5 / math.sqrt(other.size)
    b, w = noisy["b"].cpu().numpy(), noisy["w"].reshape(-1).cpu().numpy()
    assert abs(np.corrcoef(b, w)[0, 1]) < 5 / math.sqrt(b.size)


def test_train_step_on_the_device_adds_noise_of_std_sigma_c_over_b(device):
    """A loss with no gradient: the step moves the parameters by lr sigma C / B times N(0, 1)."""
    sigma, max_norm, expected, lr = 1.5, 2.0, 4.0, 0.5
    params = {"w": torch.zeros(120, 100, device=device)}

    def loss_fn(params, buffers, x):
        return (params["w"] * 0.0).sum() + x.sum() * 0.0

    privatizer = fdp.chain(
        fdp.clip(max_norm),
        fdp.aggregate(),
        fdp.gaussian_noise(sigma),
        fdp.normalize(expected),
        fdp.account(sample_rate=0.5),
    )
    optimizer = fdp.optim.sgd(lr)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    state = fdp.TrainState.create(
        params, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(3)
    )
    batch = fdp.Batch(
        (torch.ones(4, 3, device=device),), torch.ones(4, dtype=torch.bool, device=device)
    )
    new, _ = step(state, batch)
    moved = (new.params["w"] - params["w"]).double().cpu().numpy().reshape(-1)
    _assert_normal_with_std(moved, lr * sigma * max_norm / expected)
