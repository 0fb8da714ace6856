"""Tests for funcdp/federated/secure_sum.py: a round split between clients and a secure sum.

The clients' clipped updates, summed, then the server half, give `make_round`'s round on the
same clients (noise on, same key); a client's update never exceeds C.
"""

from __future__ import annotations

import pytest
import torch

import funcdp as fdp
from funcdp import federated as fed
from funcdp.data import Batch
from funcdp.federated.secure_sum import make_client_update, make_server_update
from tests.conftest import assert_trees_close
from tests.test_federated import CLIP, _clients, _setup


def _split_round(local, privatizer, server, state, clients: Batch):
    client_update = make_client_update(local, privatizer)
    total = {n: torch.zeros_like(p) for n, p in state.params.items()}
    norms = []
    for i in range(len(clients.mask)):
        if clients.mask[i]:
            clipped = client_update(state.params, tuple(t[i] for t in clients.inputs))
            norms.append(fdp.tree.global_norm(clipped))
            total = {n: total[n] + clipped[n] for n in total}
    return make_server_update(privatizer, server)(state, total), norms


def test_clients_then_server_equal_the_in_process_round_with_noise():
    local, privatizer, server, state = _setup(noise=1.0)
    clients = _clients(10)
    round_fn = fed.make_round(local, privatizer, server)
    for _ in range(2):
        expected, _ = round_fn(state, clients)
        split, norms = _split_round(local, privatizer, server, state, clients)
        assert_trees_close(split.params, expected.params, rtol=1e-5, atol=1e-6)
        assert split.ledger == expected.ledger and split.step == expected.step
        assert all(float(n) <= CLIP * (1 + 1e-6) for n in norms)
        assert any(float(n) > 0.99 * CLIP for n in norms)  # the clip was active
        state = expected


def test_an_empty_round_adds_noise_and_is_accounted():
    local, privatizer, server, state = _setup(noise=1.0)
    zero = {n: torch.zeros_like(p) for n, p in state.params.items()}
    new = make_server_update(privatizer, server)(state, zero)
    assert new.step == 1 and new.ledger.records[0].steps == 1
    assert any(not torch.equal(new.params[n], state.params[n]) for n in state.params)


def test_adaptive_clipping_and_bad_sums_are_refused():
    local, privatizer, server, state = _setup()
    adaptive = fdp.chain(
        fdp.adaptive_clip(1.0, count_noise_multiplier=5.0, expected_batch_size=10.0),
        fdp.aggregate(), fdp.gaussian_noise(1.0), fdp.normalize(10.0), fdp.account(0.1),
    )  # fmt: skip
    with pytest.raises(ValueError, match="adaptive"):
        make_client_update(local, adaptive)
    with pytest.raises(ValueError, match="adaptive"):
        make_server_update(adaptive, server)
    server_update = make_server_update(privatizer, server)
    with pytest.raises(ValueError, match="clipped_sum"):
        server_update(state, {"nope": torch.zeros(1)})
    bad = {n: torch.full_like(p, float("nan")) for n, p in state.params.items()}
    with pytest.raises(ValueError, match="not finite"):
        server_update(state, bad)
