"""The server side: SecAgg+ sums the clipped updates, funcdp adds noise once and keeps the ledger.

`run_server` runs inside a Flower `ServerApp`'s main function. Each round it samples clients
(Poisson, rate q from the privatizer's `account(q)`, drawn from the state's key), lets Flower's
`SecAggPlusWorkflow` collect the masked, clipped updates and unmask only their sum, then runs
`funcdp.federated.make_server_update` on that sum: the privatizer's part after `aggregate()`
(Gaussian noise sigma * C from the round's key, division by the EXPECTED number of clients with
`normalize`, the ledger with `account`, the budget with `budget`) and the server optimizer.
This is `funcdp.federated.make_round`'s round, spread over Flower's processes.

Privacy, precisely (the client's dataset is the unit; add/remove neighbours):
- each round is the Poisson-subsampled Gaussian mechanism the ledger records, provided clients
  clip honestly (`FuncdpClient`) and drop-outs do not depend on the data;
- SecAgg+'s rounding is absorbed by the clients' `update_scale` (see `secagg.py`);
- a round that samples fewer than `min_clients` (SecAgg+ needs two) releases nothing but is
  still recorded. Releasing nothing differs from the mechanism the ledger records only on that
  event, so the guarantee is (epsilon, delta + (1 + e^epsilon) * sum_t p_t), p_t the chance of
  the event at round t; `FlowerRun.skip_probability` holds the sum (0 when q = 1).
- a round that SecAgg+ aborts (too many drop-outs) is recorded too: clients trained on it.
  So is a round whose unmasked sum has norm above n C, which n clipped updates cannot reach
  (a defensive check: such a sum was not unmasked correctly); it is dropped, not applied.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from funcdp import random as fdr
from funcdp._checks import check_delta
from funcdp.accounting import epsilon
from funcdp.federated.flower import client as wire
from funcdp.federated.flower.secagg import SecAggPlus
from funcdp.federated.secure_sum import make_server_update
from funcdp.train import TrainState
from funcdp.transforms.accounting import AccountState, BudgetExceededError
from funcdp.transforms.base import GradientTransformation, split_at_reduce
from funcdp.tree import tree_zeros_like

_LOG = logging.getLogger("flwr")


class RoundRecord(NamedTuple):
    """What one round released, handed to `run_server`'s `on_round`.

    Attributes:
      round: Flower's round number (from 1).
      clients: clients whose update is in the sum (0 when the round released nothing).
      params: the global parameters the clients trained from.
      state: the server's state after the round (its ledger counts the round; its params are
        the new global parameters, unchanged when the round released nothing).
      epsilon: epsilon spent so far at the run's delta.
    """

    round: int
    clients: int
    params: dict[str, torch.Tensor]
    state: TrainState
    epsilon: float


def run_server(
    grid: Any,
    context: Any,
    *,
    state: TrainState,
    privatizer: GradientTransformation,
    server_optimizer: GradientTransformation,
    num_rounds: int,
    delta: float,
    secagg: SecAggPlus | None = None,
    min_clients: int = 2,
    wait_for_nodes: int = 2,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> TrainState:
    """Runs DP-FedAvg with SecAgg+ for `num_rounds` rounds; call it in `@ServerApp.main()`.

    Args:
      grid: the `Grid` Flower passes to the main function.
      context: the `Context` Flower passes to the main function.
      state: the initial server state, `TrainState.create(params, privatizer=privatizer,
        optimizer=server_optimizer, key=...)`; rounds use `fold_in(state.key, state.step)`.
      privatizer: the chain clients and server share, e.g. `chain(clip(C), aggregate(),
        gaussian_noise(sigma), normalize(q * num_clients), account(q), budget(eps, delta=d))`.
      server_optimizer: a `funcdp.optim` transform on the privatized mean pseudo-gradient
        (`sgd(1.0)`: FedAvg; `adam(...)`: FedAdam).
      num_rounds: rounds to run (fewer if the budget stops the run).
      delta: the delta at which epsilon is logged each round.
      secagg: SecAgg+'s settings; its clipping range is set to the clip norm.
      min_clients: a sampled cohort smaller than this releases nothing (>= 2, SecAgg+'s least).
      wait_for_nodes: nodes to wait for (up to an hour) before the first round.
      on_round: called after every round with its `RoundRecord`.

    Returns:
      The final state (its `ledger` counts every round clients trained on).

    Raises:
      ValueError: an argument outside its range, or a privatizer without clipping,
        `aggregate()`, `gaussian_noise` or `account`.
    """
    secagg = SecAggPlus() if secagg is None else secagg
    strategy = FlowerRun(
        state=state,
        privatizer=privatizer,
        server_optimizer=server_optimizer,
        delta=delta,
        secagg=secagg,
        min_clients=min_clients,
        wait_for_nodes=wait_for_nodes,
        on_round=on_round,
    )
    if not isinstance(num_rounds, int) or isinstance(num_rounds, bool) or num_rounds < 1:
        raise ValueError(f"num_rounds must be an int >= 1, got {num_rounds!r}")
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy
    )
    workflow = _SecAggPlusWorkflow(
        num_shares=secagg.num_shares,
        reconstruction_threshold=secagg.reconstruction_threshold,
        max_weight=1.0,  # every client reports weight 1, so SecAgg+ averages with weight 1
        clipping_range=strategy.sensitivity,
        quantization_range=secagg.quantization_range,
        modulus_range=secagg.modulus_range,
        timeout=secagg.timeout,
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    strategy.settle()
    _LOG.info(
        "funcdp: %d round(s) in the ledger, epsilon %.4g at delta %g (skip probability %.3g)",
        strategy.state.step,
        strategy.epsilon(),
        delta,
        strategy.skip_probability,
    )
    return strategy.state


class FlowerRun(Strategy):
    """The legacy Flower `Strategy` that `run_server` drives (see there for the arguments)."""

    def __init__(
        self,
        *,
        state: TrainState,
        privatizer: GradientTransformation,
        server_optimizer: GradientTransformation,
        delta: float,
        secagg: SecAggPlus,
        min_clients: int,
        wait_for_nodes: int,
        on_round: Callable[[RoundRecord], None] | None,
    ) -> None:
        if not isinstance(state, TrainState):
            raise TypeError(f"state must be a funcdp.TrainState, got {type(state).__name__}")
        check_delta(delta)
        self._secagg = secagg.check()
        for name, value, least in (
            ("min_clients", min_clients, 2),
            ("wait_for_nodes", wait_for_nodes, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        self._split = split_at_reduce(privatizer)
        chained = self._split.context
        for what, value, needed in (
            ("a clipping transform", chained.sensitivity, "clip(C)"),
            ("noise", chained.noise_multiplier, "gaussian_noise(sigma)"),
            ("accounting", chained.sample_rate, "account(q)"),
        ):
            if value is None:
                raise ValueError(f"the privatizer needs {what}: add {needed} to its chain")
        self._server_update = make_server_update(privatizer, server_optimizer)
        self._split.halves(state.privacy_state)
        self.state = state
        self.sensitivity = float(chained.sensitivity)
        self.skip_probability = 0.0
        self._delta = float(delta)
        self._min_clients = min_clients
        self._wait_for_nodes = wait_for_nodes
        self._on_round = on_round
        self._names = list(state.params)
        coordinates = sum(p.numel() for p in state.params.values())
        self._scale = secagg.update_scale(self.sensitivity, num_coordinates=coordinates)
        self._pending: tuple[int, dict[str, torch.Tensor]] | None = None
        self._stopped = False

    def epsilon(self) -> float:
        """Epsilon spent so far at the run's delta."""
        return epsilon(self.state.ledger, delta=self._delta)

    def initialize_parameters(self, client_manager) -> Parameters:
        return _to_parameters(self.state.params, self._names)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        del parameters  # the state holds the global parameters
        self.settle()
        if self._stopped:
            return []
        if server_round == 1:
            client_manager.wait_for(self._wait_for_nodes, timeout=3600)
        try:
            self._check_budget()
        except BudgetExceededError as error:
            _LOG.warning("funcdp: budget reached, no more rounds: %s", error)
            self._stopped = True
            return []
        nodes = sorted(client_manager.all().values(), key=lambda proxy: proxy.node_id)
        if server_round == 1:
            self._check_expected_clients(len(nodes))
        sampled = self._sample(nodes)
        self._add_skip_probability(len(nodes))
        if len(sampled) > self._secagg.max_clients:
            raise ValueError(
                f"round {server_round} sampled {len(sampled)} clients; SecAgg+ with "
                f"quantization_range={self._secagg.quantization_range} and modulus_range="
                f"{self._secagg.modulus_range} sums at most {self._secagg.max_clients}"
            )
        self._pending = (server_round, self.state.params)
        if len(sampled) < self._min_clients:
            _LOG.warning(
                "funcdp: round %d sampled %d client(s) < min_clients=%d; it releases nothing "
                "and is counted in the ledger",
                server_round,
                len(sampled),
                self._min_clients,
            )
            self.settle()
            return []
        config = {
            wire.ROUND: server_round,
            wire.SENSITIVITY: self.sensitivity,
            wire.SCALE: self._scale,
            wire.NAMES: json.dumps(self._names),
        }
        instructions = FitIns(_to_parameters(self.state.params, self._names), config)
        return [(proxy, instructions) for proxy in sampled]

    def aggregate_fit(self, server_round: int, results, failures):
        if self._pending is None or self._pending[0] != server_round or not results:
            return None, {}
        for _, fit_res in results:
            if fit_res.num_examples != 1:
                raise ValueError(f"a client reported weight {fit_res.num_examples}, expected 1")
        # SecAgg+ hands every result the same unmasked weighted mean; weights are 1, so the sum
        # of the updates is the mean times the number of clients it averaged.
        summed = [
            array * len(results) for array in parameters_to_ndarrays(results[0][1].parameters)
        ]
        norm = math.sqrt(math.fsum(float(np.square(array).sum()) for array in summed))
        if not norm <= len(results) * self.sensitivity * (1 + 1e-6):
            # n honest clipped updates sum to at most n C: this sum was not unmasked correctly.
            _LOG.error(
                "funcdp: round %d's secure sum has norm %.4g > %d clients x C; it is dropped and "
                "the round releases nothing",
                server_round,
                norm,
                len(results),
            )
            return None, {}
        total = {
            name: torch.from_numpy(array).to(self.state.params[name].dtype)
            for name, array in zip(self._names, summed, strict=True)
        }
        self._release(total, server_round, clients=len(results))
        metrics = {"clients": len(results), "epsilon": self.epsilon()}
        return _to_parameters(self.state.params, self._names), metrics

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round: int, results, failures):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None

    def settle(self) -> None:
        """Records a round clients were asked to train on but that released nothing."""
        if self._pending is not None:
            self._release(None, self._pending[0], clients=0)

    def _release(self, total, server_round: int, *, clients: int) -> None:
        """The server half of a round (`make_server_update`) on the sum of its clipped updates.

        With `total` None the round released nothing: the server half still runs on zeros, so
        the ledger records it, but the parameters and the optimizer's state stay as they were.
        """
        _, params = self._pending
        self._pending = None
        before = self.state
        summed = tree_zeros_like(params) if total is None else total
        after = self._server_update(before, summed)
        if total is None:
            after = after._replace(params=before.params, opt_state=before.opt_state)
        self.state = after
        spent = self.epsilon()
        _LOG.info(
            "funcdp: round %d, %d client(s), epsilon %.4g at delta %g",
            server_round,
            clients,
            spent,
            self._delta,
        )
        if self._on_round is not None:
            self._on_round(RoundRecord(server_round, clients, params, after, spent))

    def _check_budget(self) -> None:
        """Raises BudgetExceededError if one more round would exceed the privatizer's budget."""
        context = self._split.context
        _, second = self._split.halves(self.state.privacy_state)
        after = tuple(
            AccountState(part.ledger.record(context.noise_multiplier, context.sample_rate))
            if isinstance(part, AccountState)
            else part
            for part in second
        )
        for check in context.checks:
            check(after)

    def _check_expected_clients(self, num_nodes: int) -> None:
        """Warns when the privatizer divides by other than q times the nodes connected now."""
        divisor = 1.0 / self._split.context.scale
        expected = self._split.context.sample_rate * num_nodes
        if not math.isclose(divisor, expected, rel_tol=1e-6):
            _LOG.warning(
                "funcdp: the privatizer divides the noisy sum by %.6g, but q x %d connected "
                "nodes expects %.6g clients: normalize(q * num_clients) sets it",
                divisor,
                num_nodes,
                expected,
            )

    def _sample(self, nodes: list) -> list:
        """Poisson sampling: each node independently with probability q, from the round's key."""
        rate = self._split.context.sample_rate
        round_key = fdr.fold_in(self.state.key, self.state.step)
        draws = fdr.uniform(fdr.split(round_key, 1)[0], (len(nodes),))
        return [node for node, draw in zip(nodes, draws.tolist(), strict=True) if draw < rate]

    def _add_skip_probability(self, num_nodes: int) -> None:
        # Every round adds P[Binomial(N - 1, q) < m], the chance of a too-small cohort without
        # the one client whose presence is in question (with it, the chance is no larger).
        q, n, m = self._split.context.sample_rate, max(num_nodes - 1, 0), self._min_clients
        self.skip_probability += math.fsum(
            math.comb(n, k) * q**k * (1.0 - q) ** (n - k) for k in range(min(m, n + 1))
        )


class _SecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, with clients that never answered its setup stage left out.

    Flower 1.42 keeps them among the round's clients and neighbours: its unmask stage then asks
    for shares of secrets they never dealt (one client gone before the key exchange aborts the
    round) and looks up their public keys for a neighbour that drops later. In the protocol
    (Bell et al. 2020) such clients are not part of the round, and no mask involves them.
    """

    def setup_stage(self, grid, context, state) -> bool:
        if not super().setup_stage(grid, context, state):
            return False
        live = set(state.active_node_ids)
        state.sampled_node_ids = live
        state.nid_to_neighbours = {
            nid: neighbours & live
            for nid, neighbours in state.nid_to_neighbours.items()
            if nid in live
        }
        return True


def _to_parameters(params: dict[str, torch.Tensor], names: list[str]) -> Parameters:
    return ndarrays_to_parameters([np.asarray(params[name].detach().cpu()) for name in names])
