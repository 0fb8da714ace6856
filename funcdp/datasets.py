"""The built-in data set of `funcdp train` (scikit-learn's digits) and `.npz` loading.

Features are scaled by their KNOWN range only (digits pixels are 0..16, so divide by 16): a
statistic of the private data such as its mean or standard deviation would itself have to be
released privately. Every data set is split 80/20 into train and test with a fixed seed that does
not depend on the training seed, so all runs are scored on the same held-out examples.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch

SPLIT_SEED = 0
TEST_PERCENT = 20
DIGITS_MAX_PIXEL = 16.0


class Split(NamedTuple):
    """Train and test tensors: float features [N, D] and int64 labels [N] in 0..num_classes-1."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        """D, the number of features of one example."""
        return int(self.x_train.shape[1])


def load_digits() -> Split:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), pixels divided by 16, split 80/20.

    The data ship inside scikit-learn: nothing is downloaded.
    """
    from sklearn.datasets import load_digits as _sklearn_digits

    digits = _sklearn_digits()
    x = np.asarray(digits.data, dtype=np.float32) / DIGITS_MAX_PIXEL
    return split(x, np.asarray(digits.target), num_classes=10)


def load_npz(path: str | os.PathLike) -> Split:
    """Loads `x` (float features [N, D], already scaled) and `y` (int labels [N]) from an .npz.

    Labels must be integers in 0..K-1; K is taken as max(y) + 1 unless the file holds a scalar
    `num_classes`. The split is the same fixed-seed 80/20 split as for the digits.

    Raises:
      ValueError: the file is missing, is not an .npz with `x` and `y`, or they have the wrong
        shapes, types or values; the message names the array and what was expected.
    """
    name = os.fspath(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not named arrays")
        with loaded:
            arrays = {key: loaded[key] for key in loaded.files}
    except FileNotFoundError:
        raise ValueError(f"no such file: {name!r}") from None
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{name!r} is not a readable .npz file: {error}") from None
    if "x" not in arrays or "y" not in arrays:
        raise ValueError(f"the .npz file must hold arrays 'x' and 'y', found {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    num_classes = arrays.get("num_classes")
    if num_classes is not None:
        if num_classes.shape != () or not np.issubdtype(num_classes.dtype, np.integer):
            raise ValueError(f"'num_classes' must be a scalar int, got {num_classes!r}")
        num_classes = int(num_classes)
    return split(x, y, num_classes=num_classes)


def split(x: np.ndarray, y: np.ndarray, *, num_classes: int | None = None) -> Split:
    """Checks (x, y) and splits them 80/20 into train and test with the fixed seed `SPLIT_SEED`.

    The test part has ceil(0.2 * N) examples, the train part the rest.

    Raises:
      ValueError: x is not a finite float array [N, D], y not an int array [N] with values in
        0..num_classes-1, or N < 2.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"x must be a float array of shape [N, D], got {x.dtype} of shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError("x must hold only finite values, found NaN or inf")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be an int array of shape [N], got {y.dtype} of shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same number of rows, got {len(x)} and {len(y)}")
    if len(y) < 2:
        raise ValueError(f"need at least 2 examples to split into train and test, got {len(y)}")
    if y.min() < 0:
        raise ValueError(f"labels y must be >= 0, got {int(y.min())}")
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    if num_classes < 2 or y.max() >= num_classes:
        raise ValueError(
            f"labels y must lie in 0..num_classes-1 with num_classes >= 2, got labels up to "
            f"{int(y.max())} and num_classes={num_classes}"
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    num_test = (len(y) * TEST_PERCENT + 99) // 100  # ceil, in exact integer arithmetic
    test, train = order[:num_test], order[num_test:]
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    return Split(xt[train], yt[train], xt[test], yt[test], num_classes)
