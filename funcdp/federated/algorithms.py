"""DP-FedAvg and DP-FedAdam as a privatizer over client updates and a server optimizer.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018): clients join a round independently with
probability q; each update is clipped at C (or at a norm that tracks a quantile of the update
norms, Andrew, Thakkar, McMahan & Ramaswamy 2021); the sum gets N(0, (sigma C)^2) noise once and
is divided by the EXPECTED number of clients q * num_clients. The guarantee is user-level
(client-level): one round is the Poisson-subsampled Gaussian mechanism at rate q over clients,
and the ledger records one such event per round. DP-FedAdam replaces the server's SGD step by
Adam on the same private mean (Reddi et al. 2021); the optimizer only post-processes it.
"""

from __future__ import annotations

from typing import NamedTuple

from funcdp import optim
from funcdp._checks import check_positive, check_sample_rate
from funcdp.transforms import (
    account,
    adaptive_clip,
    aggregate,
    chain,
    clip,
    gaussian_noise,
    normalize,
)
from funcdp.transforms.base import GradientTransformation


class DPFederated(NamedTuple):
    """The two halves of a DP federated algorithm, to hand to `make_round` and
    `TrainState.create(..., privatizer=, optimizer=)`."""

    privatizer: GradientTransformation
    server_optimizer: GradientTransformation


def dp_fedavg(
    *,
    clip_norm: float,
    noise_multiplier: float,
    sample_rate: float,
    num_clients: int,
    server_learning_rate: float = 1.0,
    server_momentum: float = 0.0,
    target_quantile: float | None = None,
    clip_learning_rate: float = 0.2,
    count_noise_multiplier: float | None = None,
) -> DPFederated:
    """DP-FedAvg: clip each client's update, noise the sum once, SGD on the server.

    Args:
      clip_norm: C, the bound on one client's update (with `target_quantile`, its initial
        value; the sensitivity stays C).
      noise_multiplier: sigma; the sum gets N(0, (sigma C)^2) per coordinate.
      sample_rate: q, the probability that a client joins a round.
      num_clients: the number of clients; q * num_clients is the divisor of the sum.
      server_learning_rate, server_momentum: the server's SGD (1.0 and 0.0: plain FedAvg).
      target_quantile: None for a fixed C; else the fraction of updates to leave unclipped,
        tracked by adaptive clipping.
      clip_learning_rate: eta of adaptive clipping's geometric update.
      count_noise_multiplier: sigma_b of adaptive clipping's private count (default
        expected clients / 20, as Andrew et al. suggest); it must exceed sigma / 2.

    Raises:
      ValueError: an argument outside its range, named in the message.
    """
    privatizer = _privatizer(
        clip_norm, noise_multiplier, sample_rate, num_clients, target_quantile,
        clip_learning_rate, count_noise_multiplier,
    )  # fmt: skip
    return DPFederated(privatizer, optim.sgd(server_learning_rate, momentum=server_momentum))


def dp_fedadam(
    *,
    clip_norm: float,
    noise_multiplier: float,
    sample_rate: float,
    num_clients: int,
    server_learning_rate: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
    target_quantile: float | None = None,
    clip_learning_rate: float = 0.2,
    count_noise_multiplier: float | None = None,
) -> DPFederated:
    """DP-FedAdam: the privatizer of `dp_fedavg`, Adam on the server (eps 1e-3, as Reddi et al.
    tune it for federated pseudo-gradients).

    Raises:
      ValueError: an argument outside its range, named in the message.
    """
    privatizer = _privatizer(
        clip_norm, noise_multiplier, sample_rate, num_clients, target_quantile,
        clip_learning_rate, count_noise_multiplier,
    )  # fmt: skip
    return DPFederated(privatizer, optim.adam(server_learning_rate, b1, b2, eps))


def _privatizer(
    clip_norm, noise_multiplier, sample_rate, num_clients, target_quantile, clip_lr, count_sigma
) -> GradientTransformation:
    check_sample_rate(sample_rate)
    if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    expected = sample_rate * num_clients
    if target_quantile is None:
        clipper = clip(clip_norm)
    else:
        count_sigma = expected / 20 if count_sigma is None else count_sigma
        check_positive("count_noise_multiplier", count_sigma)
        clipper = adaptive_clip(
            clip_norm,
            target_quantile,
            clip_lr,
            count_noise_multiplier=count_sigma,
            expected_batch_size=expected,
        )
    return chain(
        clipper,
        aggregate(),
        gaussian_noise(noise_multiplier),
        normalize(expected),
        account(sample_rate),
    )
