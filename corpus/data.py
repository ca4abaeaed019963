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


def yolo(size: int) -> Callable[[str, int], dict[str, np.ndarray]]:
    """An Ultralytics-exported detector's input: RGB scaled to [0, 1], NCHW (nudenet's
    blobFromImage(1 / 255, swapRB=True) of a square image)."""
    def make(split: str, count: int) -> dict[str, np.ndarray]:
        rgb = photos(split, count, size, size).astype(np.float32)
        return {"images": (rgb / 255.0).transpose(0, 3, 1, 2).copy()}

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


def speech(chunk: int = 512 + 64, rate: int = 16000, model: Callable[[], str] | None = None) -> Callable[[str, int], dict[str, np.ndarray]]:
    """Speech-like audio for a voice-activity detector, as silero's wrapper streams it: one
    continuous signal (voiced stretches of a 90-250 Hz fundamental with decaying harmonics,
    amplitude-modulated at a syllable rate of 3-6 Hz with jitter, alternating with silence and
    noise floors of varying level) cut into `chunk`-sample windows that advance by 512 samples
    (64 of context, 512 new). The recurrent state ([2, batch, 128]) of each window is the one the
    FP32 `model` carries into it when run over the stream from a zero state, as in deployment
    (all-zero states would leave the state path uncalibrated); without a model it stays zero.
    The sample rate is one scalar for every batch."""
    hop = chunk - 64

    def make(split: str, count: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(SPLIT_SEEDS[split])
        stream = _speech_stream(rng, hop * (count - 1) + chunk, rate)
        windows = np.stack([stream[i * hop: i * hop + chunk] for i in range(count)]).astype(np.float32)
        return {"input": windows, "state": _carried_states(model, windows, rate), "sr": np.array(rate, np.int64)}

    return make


def _speech_stream(rng: np.random.Generator, samples: int, rate: int) -> np.ndarray:
    parts, total = [], 0
    while total < samples:
        n = int(rng.uniform(0.1, 0.6) * rate)
        t = np.arange(n) / rate
        part = rng.normal(0, 10 ** rng.uniform(-4, -2), n)
        if rng.random() >= 0.4:  # voiced; otherwise silence / noise only
            f0 = rng.uniform(90, 250) * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
            phase = 2 * np.pi * np.cumsum(f0) / rate
            voiced = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k ** 1.3 for k in range(1, 12))
            envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 2 * np.pi)))
            part = part + rng.uniform(0.05, 0.5) * envelope * voiced / 3
        parts.append(part)
        total += n
    return np.clip(np.concatenate(parts)[:samples], -1, 1)


def _carried_states(model: Callable[[], str] | None, windows: np.ndarray, rate: int) -> np.ndarray:
    states = np.zeros((2, len(windows), 128), np.float32)
    if model is None:
        return states
    import onnxruntime as ort

    session = ort.InferenceSession(model(), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    for i, window in enumerate(windows):
        states[:, i] = state[:, 0]
        _, state = session.run(["output", "stateN"], {"input": window[None], "state": state, "sr": np.array(rate, np.int64)})
    return states
