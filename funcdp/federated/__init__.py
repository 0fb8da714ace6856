"""Privacy per person: user-level units and DP federated averaging with clients as a vmap axis.

`make_round(local_update, privatizer, server_optimizer)` is one DP-FedAvg / DP-FedAdam round;
`dp_fedavg` and `dp_fedadam` build its privatizer and server optimizer; `local_sgd` builds a
client's local training from the losses of its rows; `user_loss` is the loss of one unit (a
user's or a client's rows) for user-level DP-SGD with `make_train_step`; `label_shards` deals a
data set to non-iid clients for simulations. Under secure aggregation a round splits in two:
`make_client_update` (a client's clipped update) and `make_server_update` (noise, accounting and
the server step on the securely summed updates).
"""

from funcdp.federated.algorithms import DPFederated, dp_fedadam, dp_fedavg
from funcdp.federated.local import local_sgd
from funcdp.federated.rounds import make_round
from funcdp.federated.secure_sum import make_client_update, make_server_update
from funcdp.federated.shards import label_shards
from funcdp.federated.units import user_loss

__all__ = [
    "DPFederated",
    "dp_fedadam",
    "dp_fedavg",
    "label_shards",
    "local_sgd",
    "make_client_update",
    "make_round",
    "make_server_update",
    "user_loss",
]
