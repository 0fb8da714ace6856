"""Privacy per person: user-level units and DP federated averaging with clients as a vmap axis.

`make_round(local_update, privatizer, server_optimizer)` is one DP-FedAvg / DP-FedAdam round;
`local_sgd` builds a client's local training from a per-example loss; `user_loss` is the loss of
one unit (a user's or a client's rows) for user-level DP-SGD with `make_train_step`.
"""

from funcdp.federated.local import local_sgd
from funcdp.federated.rounds import make_round
from funcdp.federated.units import user_loss

__all__ = ["local_sgd", "make_round", "user_loss"]
