"""The scikit-learn digits data (8x8 grey images of 0-9) shared by the digits zoo models."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from enginekit.core.tensors import Feeds

TEST_FRACTION = 0.3
SPLIT_SEED = 42
EPOCHS = 40  # training recipe of the digits models (PyTorch and Keras)
SEED = 0


@functools.cache
def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified train/test split: images scaled to [0, 1] as float32 N x 8 x 8, int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target.astype(np.int64), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    return {"calibration": (x_train, y_train), "evaluation": (x_test, y_test)}


class DigitsDataset:
    """Calibration = the training split, evaluation = the held-out test split with labels."""

    description = "sklearn load_digits, stratified 70/30 split: calibration = train (1257), evaluation = test (540, labelled)"

    def __init__(self, input_name: str, layout: str):
        self.input_name = input_name
        self.layout = layout  # "NCHW" for PyTorch, "NHWC" for Keras

    def size(self, split: str) -> int:
        return len(digits_splits()[split][0])

    def samples(self, split: str, count: int, dims: Mapping[str, int] | None = None) -> Feeds:
        images = digits_splits()[split][0][:count]
        images = images[:, None] if self.layout == "NCHW" else images[..., None]
        return {self.input_name: np.ascontiguousarray(images)}

    def labels(self, split: str, count: int) -> np.ndarray:
        return digits_splits()[split][1][:count]
