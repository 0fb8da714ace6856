"""Time one DP-FedAvg round over many simulated clients: vmapped, a Python loop, client objects.

All three compute the same round: every client takes `--local-steps` full-batch SGD steps on its
`--rows` rows from the global model, its update is clipped at C, the updates are summed, noise is
added once and the server steps FedAvg. Only the way clients are run differs:

- `vmap`: `funcdp.federated.make_round`, clients as one vmap axis (in `--chunk-size` chunks);
- `loop`: the same pure `local_update` called client by client in Python, clipped and summed;
- `objects`: PySyft-style per-client objects, each holding its own copy of the `nn.Module` and
  a `torch.optim.SGD`, trained with `loss.backward()`, the update read from its `state_dict`.

Printed: median seconds per round over `--repeats` and the ratio to the vmapped round; the loop's
and the objects' parameters are checked against the vmapped round's (noise off).

    python bench/fedavg_clients.py                        # 1000 clients, one torch thread
    python bench/fedavg_clients.py --clients 200 --repeats 5 --chunk-size 250
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import funcdp as fdp
from funcdp import federated as fed

CLIP, LOCAL_LR, FEATURES, CLASSES = 1.0, 0.1, 64, 10


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, CLASSES))


def _data(clients: int, rows: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(clients, rows, FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (clients, rows), generator=gen)
    real = torch.ones(clients, rows, dtype=torch.bool)
    return x, y, real


def _setup(args):
    model = _model()
    apply_fn, params, buffers = fdp.functionalize(model)

    def row_losses(p, b, x, y):
        return F.cross_entropy(apply_fn(p, b, x), y, reduction="none")

    local = fed.local_sgd(row_losses, learning_rate=LOCAL_LR, local_steps=args.local_steps)
    algorithm = fed.dp_fedavg(
        clip_norm=CLIP, noise_multiplier=0.0, sample_rate=1.0, num_clients=args.clients
    )
    state = fdp.TrainState.create(
        params,
        privatizer=algorithm.privatizer,
        optimizer=algorithm.server_optimizer,
        key=fdp.random.key(0),
    )
    return model, local, algorithm, state


def _clipped(delta: dict) -> dict:
    norm = torch.sqrt(sum(d.double().square().sum() for d in delta.values()))
    factor = min(1.0, CLIP / float(norm))
    return {n: factor * d for n, d in delta.items()}


def run_vmap(args, data):
    _, local, algorithm, state = _setup(args)
    round_fn = fed.make_round(local, *algorithm, chunk_size=args.chunk_size)
    batch = fdp.data.Batch(data, torch.ones(args.clients, dtype=torch.bool))
    new, _ = round_fn(state, batch)
    return new.params


def run_loop(args, data):
    _, local, _, state = _setup(args)
    params = state.params
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(args.clients):
        new = local(params, tuple(t[i] for t in data))
        for n, d in _clipped({n: new[n] - params[n] for n in params}).items():
            total[n] += d
    return {n: params[n] + total[n] / args.clients for n in params}


def run_objects(args, data):
    server = _model()
    clients = [_Client(tuple(t[i] for t in data)) for i in range(args.clients)]
    total = {n: torch.zeros_like(p) for n, p in server.state_dict().items()}
    for client in clients:
        for n, d in _clipped(client.train(server, args.local_steps)).items():
            total[n] += d
    start = server.state_dict()
    return {n: start[n] + total[n] / args.clients for n in start}


class _Client:
    """A client as an object: its data, its own copy of the model and optimizer each round."""

    def __init__(self, data):
        self.x, self.y, _ = data

    def train(self, server: nn.Module, steps: int) -> dict:
        model = copy.deepcopy(server)
        optimizer = torch.optim.SGD(model.parameters(), lr=LOCAL_LR)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(self.x), self.y).backward()
            optimizer.step()
        start, end = server.state_dict(), model.state_dict()
        return {n: end[n] - start[n] for n in start}


def _flat(params: dict) -> torch.Tensor:
    return torch.cat([params[n].reshape(-1) for n in sorted(params)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = _data(args.clients, args.rows)
    engines = {"vmap": run_vmap, "loop": run_loop, "objects": run_objects}
    times: dict[str, list[float]] = {name: [] for name in engines}
    results = {}
    for _ in range(args.repeats):  # engines take turns, so a slow spell hits all of them
        for name, engine in engines.items():
            start = time.perf_counter()
            results[name] = _flat(engine(args, data))
            times[name].append(time.perf_counter() - start)
    print(
        f"one DP-FedAvg round: {args.clients} clients x {args.rows} rows, {args.local_steps} "
        f"local steps, MLP 64-32-10, {args.threads} thread(s), torch {torch.__version__}"
    )
    base = statistics.median(times["vmap"])
    for name, values in times.items():
        median = statistics.median(values)
        gap = float((results[name] - results["vmap"]).abs().max())
        print(
            f"{name:8s} {median:8.3f} s/round  x{median / base:7.2f} of vmap   "
            f"max |params - vmap's| {gap:.1e}   rounds: {' '.join(f'{v:.3f}' for v in values)}"
        )


if __name__ == "__main__":
    main()
