"""The zoo of `step_time.py` (and the benchmarks built on it): small models of each kind, each
with one batch of inputs and labels at its default size (`batch` rows if given)."""

from __future__ import annotations

import torch
from torch import nn


def _mlp(batch=256):
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    return model, (torch.randn(batch, 64),), torch.randint(0, 10, (batch,))


def _cnn(batch=64):
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 16, 10),
    )
    return model, (torch.randn(batch, 3, 32, 32),), torch.randint(0, 10, (batch,))


class _Encoder(nn.Module):
    def __init__(self, vocab=5000, d=128, heads=4, layers=2, classes=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def _transformer(batch=32):
    return _Encoder(), (torch.randint(0, 5000, (batch, 64)),), torch.randint(0, 2, (batch,))


class TextLSTM(nn.Module):
    """Embedding, one LSTM layer, a linear head on the mean of the outputs.

    `rnn` is torch's `nn.LSTM`; each engine swaps in the layer it can differentiate per example
    (`step_time._prepare`): funcdp its vmap-friendly `funcdp.nn.LSTM`, Opacus its `DPLSTM`.
    """

    def __init__(self, vocab=5000, d=128, hidden=128, classes=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out.mean(1))


def _lstm(batch=64):
    return TextLSTM(), (torch.randint(0, 5000, (batch, 64)),), torch.randint(0, 2, (batch,))


class _Block(nn.Module):
    """ResNet's BasicBlock with GroupNorm(32) in place of BatchNorm."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(32, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(32, cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(32, cout)
            )

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def _resnet18(batch=32):
    """ResNet-18 (torchvision's layout, 11.2M parameters) with GroupNorm, on 3x32x32, batch 32."""
    layers = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.GroupNorm(32, 64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for i, width in enumerate([64, 128, 256, 512]):
        layers += [_Block(cin, width, 1 if i == 0 else 2), _Block(width, width, 1)]
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return nn.Sequential(*layers), (images,), labels


MODELS = {
    "mlp": _mlp,
    "cnn": _cnn,
    "lstm": _lstm,
    "transformer": _transformer,
    "resnet18": _resnet18,
}
