"""The client side: local training with funcdp, the update clipped on the client.

A `FuncdpClient` is a Flower `NumPyClient`. On each round it receives the global parameters and
runs `funcdp.federated.make_client_update`: local training (`local_update(params, client_data)
-> new params`, a pure function), the pseudo-gradient `params - new params`, clipped by the
per-unit part of the privatizer (one client is one unit). It scales the result by the SecAgg+
margin the server sends and hands it to Flower, where `secaggplus_mod` masks it: the server
only ever sees the sum over clients.

The client reports weight 1 and no metrics: SecAgg+ sends both in the clear, and a local loss
or example count would leak what the sum hides.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient

from funcdp.federated.secure_sum import make_client_update
from funcdp.transforms.base import GradientTransformation, split_at_reduce

ROUND = "funcdp.round"
SENSITIVITY = "funcdp.sensitivity"
SCALE = "funcdp.update_scale"
NAMES = "funcdp.param_names"

LocalUpdate = Callable[[dict[str, torch.Tensor], tuple[torch.Tensor, ...]], Any]


class FuncdpClient(NumPyClient):
    """A Flower client that trains with funcdp and returns its clipped update for SecAgg+.

    Args:
      local_update: `local_update(params, client_data) -> new params`, a pure function of the
        global parameters (a dict of tensors) and this client's data (as for `make_round`,
        e.g. `funcdp.federated.local_sgd`).
      client_data: this client's data, a tuple of tensors.
      privatizer: the same chain the server runs (e.g. `chain(clip(C), aggregate(),
        gaussian_noise(sigma), normalize(expected_clients), account(q))`); the client runs
        its part through `aggregate()` on its one update.

    Raises:
      ValueError: the privatizer has no `aggregate()`, no clipping with a declared
        sensitivity, or a per-unit part that keeps statistics across units (adaptive
        clipping: its count would need its own secure sum).
    """

    def __init__(
        self,
        local_update: LocalUpdate,
        client_data: tuple[torch.Tensor, ...],
        *,
        privatizer: GradientTransformation,
    ) -> None:
        if not callable(local_update):
            raise TypeError(f"local_update must be callable, got {type(local_update).__name__}")
        sensitivity = split_at_reduce(privatizer).context.sensitivity
        if sensitivity is None:
            raise ValueError(
                "the privatizer must clip each client's update with a declared sensitivity: "
                "chain(clip(C), aggregate(), ...)"
            )
        self._client_update = make_client_update(local_update, privatizer)
        self._client_data = tuple(client_data)
        self._sensitivity = float(sensitivity)

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        """Clients hold no model of their own: the server starts from its parameters."""
        raise RuntimeError("a FuncdpClient has no parameters of its own; the server sends them")

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        """Trains on the global parameters and returns the scaled clipped update, weight 1."""
        names, scale = self._read_config(config, len(parameters))
        params = {
            name: torch.from_numpy(np.array(array, copy=True))
            for name, array in zip(names, parameters, strict=True)
        }
        # A non-finite update raises (funcdp.train.NonFiniteError) and the client drops out of
        # the round: a NaN would reach SecAgg+'s integer cast and land anywhere in the sum.
        clipped = self.clipped_update(params)
        arrays = [clipped[name].detach().double().cpu().numpy() * scale for name in names]
        return arrays, 1, {}

    def clipped_update(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pseudo-gradient `params - local_update(params, data)`, clipped (before scaling)."""
        return self._client_update(params, self._client_data)

    def _read_config(self, config: dict, count: int) -> tuple[list[str], float]:
        missing = [key for key in (ROUND, SENSITIVITY, SCALE, NAMES) if key not in config]
        if missing:
            raise ValueError(
                f"the server's instructions lack {missing}: run the server with "
                "funcdp.federated.flower.run_server"
            )
        if not math.isclose(float(config[SENSITIVITY]), self._sensitivity, rel_tol=1e-12):
            raise ValueError(
                f"the server calibrates its noise to sensitivity {config[SENSITIVITY]!r} but this "
                f"client clips to {self._sensitivity!r}: build both from the same privatizer"
            )
        scale = float(config[SCALE])
        if not 0.5 <= scale <= 1.0:
            raise ValueError(f"{SCALE} must be in [0.5, 1], got {scale!r}")
        names = json.loads(str(config[NAMES]))
        if len(names) != count:
            raise ValueError(f"the server sent {count} arrays but {len(names)} parameter names")
        return names, scale
