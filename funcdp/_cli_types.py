"""Argument types of the `funcdp` command: each error names the value and the allowed range
(argparse adds the argument's name)."""

from __future__ import annotations

import argparse
import math
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `prog: error: ...`, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def ranged(kind: type, low: float, high: float, *, closed_low: bool, closed_high: bool):
    """An argparse type: a `kind` in the range low..high, an error naming the range otherwise."""
    text_range = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            name = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        above = value >= low if closed_low else value > low
        below = value <= high if closed_high else value < high
        if not (above and below):  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be in {text_range}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def positive(kind: type):
    return ranged(kind, 0, math.inf, closed_low=False, closed_high=False)


def non_negative(kind: type):
    return ranged(kind, 0, math.inf, closed_low=True, closed_high=False)


delta = ranged(float, 0, 1, closed_low=False, closed_high=False)
sample_rate = ranged(float, 0, 1, closed_low=False, closed_high=True)


def positive_or_auto(kind: type):
    """An argparse type: "auto", or a positive `kind`."""
    number = positive(kind)

    def parse(text: str) -> Any:
        return "auto" if text == "auto" else number(text)

    parse.__name__ = f"{kind.__name__} or auto"
    return parse
