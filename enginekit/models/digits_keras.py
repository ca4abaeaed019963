"""digits_keras: the digits classifier trained in Keras (TF backend), NHWC, cached after first use.

Training is seeded (Keras' global seed plus TF op determinism) and takes a few seconds; the
weights are cached under a key made of this file's source and the Keras/TF versions. Weights are
stored as a `.weights.h5` (arrays only) and read back into the architecture built here, so no
model code is ever loaded from the cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.core.cache import cache_dir, load_or_train
from enginekit.models.digits import DigitsDataset, digits_splits
from enginekit.models.spec import ModelSpec
from enginekit.core.tensors import TensorSpec

EPOCHS = 40
SEED = 0


def architecture() -> Any:
    """Conv(16)-Conv(32)-pool-Conv(64)-pool-Dense(64)-Dense(10), the same shape as digits_cnn."""
    from enginekit.core.tf_support import require_keras

    keras = require_keras()
    from keras import layers

    image = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(image)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    logits = layers.Dense(10, name="logits")(x)
    return keras.Model(image, logits, name="digits_keras")


def _weights_path() -> Path:
    import keras
    import tensorflow as tf

    key = hashlib.sha256(Path(__file__).read_bytes() + keras.__version__.encode() + tf.__version__.encode()).hexdigest()[:16]
    return cache_dir() / f"digits_keras-{key}.weights.h5"


def train(model: Any) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    fresh = architecture()  # seeded initial weights, whatever `model` held
    model.set_weights(fresh.get_weights())
    x_train, y_train = digits_splits()["calibration"]
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, EPOCHS * 20)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train[..., None], y_train, batch_size=64, epochs=EPOCHS, shuffle=True, verbose=0)


def load_weights(model: Any) -> None:
    """Load cached weights, training (and caching) them first if absent or unreadable."""
    # h5py/Keras raise OSError, ValueError... for a damaged file
    load_or_train(_weights_path(), lambda p: model.load_weights(str(p)), lambda: train(model),
                  lambda p: model.save_weights(str(p)), (Exception,), "digits_keras")


def test_accuracy(model: Any) -> float:
    x_test, y_test = digits_splits()["evaluation"]
    logits = np.asarray(model(x_test[..., None], training=False))
    return float(np.mean(logits.argmax(1) == y_test))


SPEC = ModelSpec(
    name="digits_keras",
    parameters=40_394,
    summary="the digits CNN trained in Keras 3 (TF backend), 8x8 grey, NHWC",
    inputs=(TensorSpec("image", ("batch", 8, 8, 1)),),
    outputs=(TensorSpec("logits", ("batch", 10)),),
    architecture=architecture,
    load_weights=load_weights,
    dataset=lambda: DigitsDataset("image", "NHWC"),
    preprocessing="pixel / 16 (values 0..1), NHWC",
    metric="task accuracy (labels) and top-1 agreement with FP32",
    weights_source=f"trained here in Keras: seed {SEED}, {EPOCHS} epochs Adam, cached in the enginekit cache",
    framework="keras",
)
