"""Calibration and evaluation data that fit each corpus model's task, made offline and seeded:
natural photographs (scikit-image / scikit-learn) cropped and preprocessed the way each model's
own package does it, English sentences tokenized with the uncased WordPiece vocabulary, and
synthetic speech-like audio for the voice-activity detector. Arrays are laid out like the
model's inputs (samples along each input's batch dim)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from corpus import text
from enginekit.models.images import iter_random_resized_crops

SPLIT_SEEDS = {"calibration": 101, "evaluation": 202}


def photos(split: str, count: int, width: int, height: int) -> np.ndarray:
    """`count` random-resized crops of the bundled photographs, width x height, RGB uint8 (N, H, W, 3)."""
    side = max(width, height)
    crops = []
    for _, crop in zip(range(count), iter_random_resized_crops(SPLIT_SEEDS[split], side)):
        crops.append(np.asarray(Image.fromarray(crop).resize((width, height), Image.BILINEAR)))
    return np.stack(crops)


def _ppocr_normalize(rgb: np.ndarray) -> np.ndarray:
    """RapidOCR's preprocessing of an RGB uint8 image (..., H, W, 3): BGR (it reads with OpenCV),
    scaled to [0, 1], mean = std = 0.5 (config.yaml), channels first."""
    bgr = rgb[..., ::-1].astype(np.float32)
    return np.moveaxis((bgr / 255.0 - 0.5) / 0.5, -1, -3).copy()


def ppocr_scenes(width: int, height: int) -> Callable[[str, int], dict[str, np.ndarray]]:
    """The text detector's input: photographs with lines of words printed on them."""
    def make(split: str, count: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(SPLIT_SEEDS[split] + 1)
        scenes = np.stack([text.scene(rng, photo, split) for photo in photos(split, count, width, height)])
        return {"x": _ppocr_normalize(scenes)}

    return make


def ppocr_lines(width: int, height: int, upside_down: float = 0.0) -> Callable[[str, int], dict[str, np.ndarray]]:
    """The recognizer's / direction classifier's input: single text lines resized to `height`,
    normalised, then padded on the right with zeros to `width` as RapidOCR does; a share
    `upside_down` of them rotated by 180 degrees (what the classifier detects)."""
    def make(split: str, count: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(SPLIT_SEEDS[split] + 2)
        batch = np.zeros((count, 3, height, width), np.float32)
        for index, photo in enumerate(photos(split, count, width, height)):
            image = text.line(rng, photo, split, width, height)
            if rng.random() < upside_down:
                image = image[::-1, ::-1]
            batch[index, :, :, : image.shape[1]] = _ppocr_normalize(image)
        return {"x": batch}

    return make


def mtcnn(size: int) -> Callable[[str, int], dict[str, np.ndarray]]:
    """facenet-pytorch's MTCNN preprocessing: RGB, (x - 127.5) / 128, NCHW."""
    def make(split: str, count: int) -> dict[str, np.ndarray]:
        rgb = photos(split, count, size, size).astype(np.float32)
        return {"image": ((rgb - 127.5) * 0.0078125).transpose(0, 3, 1, 2).copy()}

    return make


def vit(size: int) -> Callable[[str, int], dict[str, np.ndarray]]:
    """ViT's image processor: RGB, scaled to [0, 1], mean = std = 0.5, NCHW."""
    def make(split: str, count: int) -> dict[str, np.ndarray]:
        rgb = photos(split, count, size, size).astype(np.float32)
        return {"pixel_values": ((rgb / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()}

    return make


def keras_pixels(name: str, size: int, caffe: bool = False) -> Callable[[str, int], dict[str, np.ndarray]]:
    """Keras applications' input, NHWC: 0..255 RGB for models that preprocess inside (Rescaling,
    Normalization), or ResNet50's caffe style (BGR minus the ImageNet mean)."""
    def make(split: str, count: int) -> dict[str, np.ndarray]:
        rgb = photos(split, count, size, size).astype(np.float32)
        if caffe:
            rgb = rgb[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
        return {name: np.ascontiguousarray(rgb)}

    return make


def sentences(sequence: int) -> Callable[[str, int], dict[str, np.ndarray]]:
    """The repository's English sentences, tokenized (uncased WordPiece), padded to `sequence`."""
    def make(split: str, count: int) -> dict[str, np.ndarray]:
        from enginekit.models.minilm import sentence_splits, tokenize

        texts = list(sentence_splits()[split])
        texts = (texts * (count // len(texts) + 1))[:count]
        return tokenize(texts, sequence)

    return make


def speech(chunk: int = 512 + 64, rate: int = 16000) -> Callable[[str, int], dict[str, np.ndarray]]:
    """Speech-like audio for a voice-activity detector, in `chunk`-sample windows (silero's wrapper
    feeds 512 new samples after the previous 64 at 16 kHz, one continuous signal): voiced stretches
    (a 90-250 Hz fundamental with decaying harmonics, amplitude-modulated at a syllable rate of
    3-6 Hz, with jitter) alternating with silence and noise floors of varying level. The model's
    recurrent state starts at zero (it is laid out [2, batch, 128]) and the sample rate is one
    scalar for every batch."""
    def make(split: str, count: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(SPLIT_SEEDS[split])
        t = np.arange(chunk) / rate
        windows = np.empty((count, chunk), np.float32)
        for i in range(count):
            noise = rng.normal(0, 10 ** rng.uniform(-4, -2), chunk)
            if rng.random() < 0.4:  # silence / noise only
                windows[i] = noise
                continue
            f0 = rng.uniform(90, 250) * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
            phase = 2 * np.pi * np.cumsum(f0) / rate
            voiced = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k ** 1.3 for k in range(1, 12))
            envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 2 * np.pi)))
            windows[i] = (rng.uniform(0.05, 0.5) * envelope * voiced / 3 + noise).astype(np.float32)
        return {"input": np.clip(windows, -1, 1), "state": np.zeros((2, count, 128), np.float32), "sr": np.array(rate, np.int64)}

    return make
