"""Small models shared by the per-example gradient tests and the two-pass clipping tests."""

from __future__ import annotations

import torch
from torch import nn

CLASSES = 3


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 2, 3, stride=2)
        self.fc = nn.Linear(2 * 2 * 2, CLASSES)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv(x)))).flatten(1))


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, tokens):
        return self.fc(self.norm(self.embed(tokens)).mean(1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, tokens):
        h = self.embed(tokens)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.fc(self.norm(h + a).mean(1))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.embed(tokens).mean(1))))


def frozen_mlp() -> nn.Module:
    module = Mlp()
    module.fc1.weight.requires_grad_(False)
    module.norm.bias.requires_grad_(False)
    return module


def _inputs(kind: str, gen: torch.Generator, batch: int) -> torch.Tensor:
    if kind == "vector":
        return torch.randn(batch, 5, generator=gen)
    if kind == "image":
        return torch.randn(batch, 2, 5, 5, generator=gen)
    return torch.randint(0, 11, (batch, 4), generator=gen)


MODELS = {
    "linear_layernorm": (Mlp, "vector", CLASSES),
    "conv2d": (Conv, "image", CLASSES),
    "embedding": (Embed, "tokens", CLASSES),
    "multihead_attention": (Attention, "tokens", CLASSES),
    "frozen": (frozen_mlp, "vector", CLASSES),
    "tied": (Tied, "tokens", 11),
}


def make(name: str, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Model `name` of MODELS (seeded), and `batch` seeded inputs and labels for it."""
    factory, kind, classes = MODELS[name]
    torch.manual_seed(0)
    module = factory()
    gen = torch.Generator().manual_seed(1)
    x = _inputs(kind, gen, batch)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return module, x, y
