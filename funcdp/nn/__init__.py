"""Drop-in layers that `vmap` batches where torch's own have no batching rule.

`LSTM`, `GRU` and `RNN`, `MultiheadAttention`, `TransformerEncoderLayer` and
`scaled_dot_product_attention` (an explicit path on every device), `Bilinear` and `EmbeddingBag`: each subclasses the torch layer it replaces,
with the same constructor and `state_dict`, and has `from_torch(module)` to convert one.
"""

from funcdp.nn.attention import (
    MultiheadAttention,
    TransformerEncoderLayer,
    scaled_dot_product_attention,
)
from funcdp.nn.layers import Bilinear, EmbeddingBag
from funcdp.nn.rnn import GRU, LSTM, RNN

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "Bilinear",
    "EmbeddingBag",
    "MultiheadAttention",
    "TransformerEncoderLayer",
    "scaled_dot_product_attention",
]
