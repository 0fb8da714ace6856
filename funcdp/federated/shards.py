"""Non-iid client splits for simulations: each client holds a few label shards.

Sorting the examples by label and dealing contiguous shards to clients gives each client the
rows of only a few classes, like one writer's handful of digits; this is the pathological
non-iid split of McMahan et al. (2017), "Communication-efficient learning of deep networks
from decentralized data".
"""

from __future__ import annotations

import torch

from funcdp import random as fdr


def label_shards(
    labels: torch.Tensor, *, num_clients: int, shards_per_client: int = 2, key: torch.Tensor
) -> torch.Tensor:
    """The client of each row [N]: rows sorted by label, cut into num_clients *
    shards_per_client shards of (nearly) equal size, shards dealt to clients at random.

    Raises:
      ValueError: num_clients or shards_per_client not an int >= 1, or more shards than rows.
    """
    for name, value in (("num_clients", num_clients), ("shards_per_client", shards_per_client)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError("labels must be a 1-d tensor")
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise ValueError(
            f"num_clients * shards_per_client must be at most the number of rows "
            f"({len(labels)}), got {num_shards}"
        )
    shuffle_key, deal_key = fdr.split(key, 2)
    # Shuffled first, so ties within a label are broken at random; then sorted by label.
    order = torch.argsort(fdr.uniform(shuffle_key, (len(labels),)))
    by_label = order[torch.argsort(labels[order], stable=True)]
    shard_of_position = torch.arange(len(labels)) * num_shards // len(labels)
    owner_of_shard = torch.argsort(fdr.uniform(deal_key, (num_shards,))) % num_clients
    clients = torch.empty(len(labels), dtype=torch.long)
    clients[by_label] = owner_of_shard[shard_of_position]
    return clients
