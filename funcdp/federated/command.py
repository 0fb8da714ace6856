"""`funcdp fedavg`: DP-FedAvg (or DP-FedAdam) on the built-in digits split across clients.

The training split is dealt to clients in label shards (each client holds a few classes, like
one writer's digits: non-iid); each round Poisson-samples clients, trains each locally, clips
and sums the updates, adds noise once and steps the server optimizer. The guarantee is
client-level: epsilon bounds what the run reveals about ALL the data of one client.
"""

from __future__ import annotations

import argparse
import sys

from funcdp import datasets
from funcdp.federated.simulation import FedRecipe, RoundReport, fit_federated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `funcdp fedavg` to `parser`."""
    d = FedRecipe()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split(": ", 1)[1]
    add = parser.add_argument
    add("--clients", type=int, default=d.num_clients, help="clients the digits are dealt to")
    add("--shards-per-client", type=int, default=d.shards_per_client, help="label shards each")
    add("--rounds", type=int, default=d.rounds)
    add("--client-rate", type=float, default=d.client_rate, help="q: P(a client joins a round)")
    add("--noise", type=float, default=d.noise_multiplier, help="noise multiplier sigma")
    add("--clip", type=float, default=d.clip, help="C: bound on one client's update")
    add("--adaptive-quantile", type=float, default=None, help="track this quantile of the norms")
    add("--local-steps", type=int, default=d.local_steps)
    add("--local-lr", type=float, default=d.local_lr)
    add("--max-examples", type=int, default=d.max_examples, help="k: rows per client per round")
    add("--server", choices=("fedavg", "fedadam"), default=d.server)
    add("--server-lr", type=float, default=None, help="default 1.0 (fedavg), 0.05 (fedadam)")
    add("--hidden", type=int, default=d.hidden, help="hidden width; 0: linear model")
    add("--chunk-size", type=int, default=None, help="clients per vmap call")
    add("--delta", type=float, default=d.delta)
    add("--accountant", choices=("rdp", "pld"), default=d.accountant)
    add("--report-every", type=int, default=5, help="rounds between reports")
    add("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Trains, prints a line every --report-every rounds, then the `final:` line."""
    server_lr = args.server_lr
    if server_lr is None:
        server_lr = 1.0 if args.server == "fedavg" else 0.05
    recipe = FedRecipe(
        num_clients=args.clients,
        shards_per_client=args.shards_per_client,
        rounds=args.rounds,
        client_rate=args.client_rate,
        noise_multiplier=args.noise,
        clip=args.clip,
        local_steps=args.local_steps,
        local_lr=args.local_lr,
        max_examples=args.max_examples,
        server=args.server,
        server_lr=server_lr,
        target_quantile=args.adaptive_quantile,
        hidden=args.hidden,
        delta=args.delta,
        accountant=args.accountant,
        chunk_size=args.chunk_size,
    )
    if not isinstance(recipe.rounds, int) or recipe.rounds < 1:
        raise ValueError(f"--rounds must be an int >= 1, got {recipe.rounds!r}")
    data = datasets.load_digits()
    print(
        f"{args.server} on digits: {len(data.y_train)} train rows dealt to {args.clients} "
        f"clients ({args.shards_per_client} label shards each); q={args.client_rate:g}, "
        f"sigma={args.noise:g}, C={args.clip:g}, {args.rounds} rounds",
        flush=True,
    )
    width = len(str(args.rounds))

    def report(r: RoundReport) -> None:
        print(
            f"round {r.round:>{width}}/{args.rounds}  clients={r.clients:<3d} "
            f"test_accuracy={r.test_accuracy:.3f}  epsilon={r.epsilon:.2f}",
            flush=True,
        )

    _, reports = fit_federated(
        data, recipe, seed=args.seed, report_every=args.report_every, on_round=report
    )
    last = reports[-1]
    print(
        f"final: test_accuracy={last.test_accuracy:.3f} epsilon={last.epsilon:.2f} "
        f"delta={args.delta:g} (client-level)",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m funcdp.federated.command [options]`, the same as `funcdp fedavg`."""
    parser = argparse.ArgumentParser(prog="funcdp fedavg")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
