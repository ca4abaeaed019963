"""digits_cnn: a small PyTorch CNN trained here on scikit-learn's digits, cached after first use.

Training is seeded and takes a few seconds on two cores (digits_cnn_net.py, which also holds the
network).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from enginekit.models.digits import EPOCHS, SEED, DigitsDataset
from enginekit.models.spec import ModelSpec
from enginekit.core.tensors import TensorSpec

if TYPE_CHECKING:
    from torch import nn



def _architecture() -> "nn.Module":
    from enginekit.models.digits_cnn_net import DigitsCNN

    return DigitsCNN()


def _load_weights(module: "nn.Module") -> None:
    from enginekit.models.digits_cnn_net import load_weights

    load_weights(module)


SPEC = ModelSpec(
    name="digits_cnn",
    parameters=40_394,
    summary="small CNN (3 conv + 2 fc) trained on sklearn digits, 8x8 grey",
    inputs=(TensorSpec("image", ("batch", 1, 8, 8)),),
    outputs=(TensorSpec("logits", ("batch", 10)),),
    architecture=_architecture,
    load_weights=_load_weights,
    dataset=lambda: DigitsDataset("image", "NCHW"),
    preprocessing="pixel / 16 (values 0..1), NCHW",
    metric="task accuracy (labels) and top-1 agreement with FP32",
    weights_source=f"trained here: seed {SEED}, {EPOCHS} epochs Adam, cached in the enginekit cache",
)
