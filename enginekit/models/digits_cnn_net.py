"""The digits CNN in PyTorch, its seeded training and cached weights (kept apart from the zoo
entry, so listing the zoo does not import torch). The weights are cached under a key made of
this file's source and the torch version: a change to the architecture or recipe retrains."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from enginekit.core.cache import cache_dir, load_or_train
from enginekit.models.digits import EPOCHS, SEED, digits_splits


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def _weights_path() -> Path:
    key = hashlib.sha256(Path(__file__).read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    return cache_dir() / f"digits_cnn-{key}.safetensors"


def train(module: DigitsCNN) -> None:
    """Seeded Adam training on the train split (the calibration split is the same data)."""
    x_train, y_train = digits_splits()["calibration"]
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    for layer in module.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    images = torch.from_numpy(x_train[:, None])
    labels = torch.from_numpy(y_train)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    module.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(module(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
        schedule.step()
    module.eval()


def load_weights(module: nn.Module) -> None:
    """Load cached weights, training (and caching) them first if absent."""
    from safetensors.torch import save_file

    from enginekit.core.loaders import load_state_dict

    from enginekit.core.errors import InputError

    def save(path: Path) -> None:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))

    load_or_train(_weights_path(), lambda p: module.load_state_dict(load_state_dict(p), strict=True), lambda: train(module),
                  save, (InputError, RuntimeError), "digits_cnn")


def test_accuracy(module: nn.Module) -> float:
    x_test, y_test = digits_splits()["evaluation"]
    with torch.no_grad():
        predicted = module(torch.from_numpy(x_test[:, None])).argmax(1).numpy()
    return float(np.mean(predicted == y_test))
