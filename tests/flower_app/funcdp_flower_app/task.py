"""The task both apps share, and tests/test_flower.py recomputes in-process.

A two-layer MLP (1002 parameters) on synthetic data: each partition (one SuperNode) holds 24 rows
drawn from funcdp keys, so every process builds the same data without files. Clients run two
local gradient steps; the server uses SGD with learning rate 1 (FedAvg).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import funcdp as fdp
from funcdp import random as fdr
from funcdp.federated.flower import FuncdpClient, RoundRecord, SecAggPlus, run_server
from funcdp.federated.flower.client import ROUND

SHAPES = {"w1": (32, 20), "b1": (32,), "w2": (10, 32), "b2": (10,)}
ROWS = 24
LOCAL_STEPS = 2
LOCAL_LR = 0.5


def initial_params(seed: int) -> dict[str, torch.Tensor]:
    base = fdr.fold_in(fdr.key(seed), 1)
    return {
        name: 0.3 * fdr.normal(fdr.fold_in(base, i), shape)
        for i, (name, shape) in enumerate(SHAPES.items())
    }


def client_data(partition: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = fdr.normal(fdr.fold_in(fdr.fold_in(fdr.key(seed), 2), partition), (ROWS, 20))
    return x, x[:, :10].argmax(1)


def loss(params, x, y):
    hidden = torch.tanh(x @ params["w1"].T + params["b1"])
    return F.cross_entropy(hidden @ params["w2"].T + params["b2"], y)


def local_update(params, data):
    grad = torch.func.grad(loss)
    for _ in range(LOCAL_STEPS):
        grads = grad(params, *data)
        params = {name: p - LOCAL_LR * grads[name] for name, p in params.items()}
    return params


def privatizer(config) -> fdp.GradientTransformation:
    rate = float(config["sample-rate"])
    parts = [
        fdp.clip(float(config["clip-norm"])),
        fdp.aggregate(),
        fdp.gaussian_noise(float(config["noise-multiplier"])),
        fdp.normalize(rate * int(config["num-clients"])),
        fdp.account(rate),
    ]
    if float(config["max-epsilon"]) > 0:
        parts.append(fdp.budget(float(config["max-epsilon"]), delta=float(config["delta"])))
    return fdp.chain(*parts)


def server_optimizer() -> fdp.GradientTransformation:
    return fdp.optim.sgd(1.0)


def initial_state(config) -> fdp.TrainState:
    seed = int(config["seed"])
    return fdp.TrainState.create(
        initial_params(seed),
        privatizer=privatizer(config),
        optimizer=server_optimizer(),
        key=fdr.key(seed + 100),
    )


class DroppingClient(FuncdpClient):
    """A FuncdpClient that fails in one round, after SecAgg+'s key exchange: a drop-out."""

    def __init__(self, *args, drop_round: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._drop_round = drop_round

    def fit(self, parameters, config):
        if int(config[ROUND]) == self._drop_round:
            raise ConnectionError(f"dropping out of round {self._drop_round}")
        return super().fit(parameters, config)


def make_client(context) -> FuncdpClient:
    config = context.run_config
    partition = int(context.node_config["partition-id"])
    data = client_data(partition, int(config["seed"]))
    if partition == int(config["drop-partition"]):
        return DroppingClient(
            local_update,
            data,
            privatizer=privatizer(config),
            drop_round=int(config["drop-round"]),
        )
    return FuncdpClient(local_update, data, privatizer=privatizer(config))


def serve(grid, context) -> None:
    config = context.run_config
    trace = Path(str(config["trace-dir"])) if config["trace-dir"] else None

    def on_round(record: RoundRecord) -> None:
        if trace is not None:
            torch.save(
                {
                    "round": record.round,
                    "clients": record.clients,
                    "params": record.params,
                    "new_params": record.state.params,
                    "step": record.state.step,
                    "ledger": record.state.ledger,
                    "epsilon": record.epsilon,
                },
                trace / f"round-{record.round}.pt",
            )

    state = run_server(
        grid,
        context,
        state=initial_state(config),
        privatizer=privatizer(config),
        server_optimizer=server_optimizer(),
        num_rounds=int(config["num-server-rounds"]),
        delta=float(config["delta"]),
        secagg=SecAggPlus(timeout=float(config["secagg-timeout"])),
        wait_for_nodes=int(config["num-clients"]),
        on_round=on_round,
    )
    if trace is not None:
        torch.save({"step": state.step, "ledger": state.ledger}, trace / "final.pt")


def run_config_defaults() -> dict:
    """The run config of pyproject.toml, for the tests' in-process reference."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: Flower depends on tomli
        import tomli as tomllib
    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as file:
        return dict(tomllib.load(file)["tool"]["flwr"]["app"]["config"])
