"""Text images for the OCR models, rendered offline: photographs with lines of English words
printed over them (a detector's input), and single text lines cropped tight the way a detector
hands them to the recognizer and the direction classifier. Words come from the repository's
sentences, the font is the FreeType font that ships with Pillow; sizes, colours, positions and
backgrounds are seeded per split."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _words(split: str) -> list[str]:
    from enginekit.models.minilm import sentence_splits

    return [w.strip(".,;:!?\"'()") for line in sentence_splits()[split] for w in line.split() if w.strip(".,;:!?\"'()")]


def _phrase(rng: np.random.Generator, words: list[str], low: int, high: int) -> str:
    return " ".join(words[i] for i in rng.integers(0, len(words), rng.integers(low, high + 1)))


def _ink(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A colour that stands out from the mean of `background`: dark on light, light on dark."""
    light = background.mean() > 127
    base = rng.integers(0, 70, 3) if light else rng.integers(185, 256, 3)
    return tuple(int(v) for v in base)


def scene(rng: np.random.Generator, photo: np.ndarray, split: str) -> np.ndarray:
    """A photo (H, W, 3 uint8) with 3-8 lines of words: some printed straight on it, some on a
    light or dark panel (a sign, a label, a page)."""
    words = _words(split)
    image = Image.fromarray(photo)
    draw = ImageDraw.Draw(image)
    height, width = photo.shape[:2]
    for _ in range(int(rng.integers(3, 9))):
        size = int(rng.integers(max(10, height // 24), max(12, height // 8)))
        font = ImageFont.load_default(size=size)
        text = _phrase(rng, words, 1, 4)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = int(rng.integers(0, max(1, width - (right - left) // 2)))
        y = int(rng.integers(0, max(1, height - (bottom - top))))
        if rng.random() < 0.5:
            panel = tuple(int(v) for v in (rng.integers(200, 256, 3) if rng.random() < 0.7 else rng.integers(0, 60, 3)))
            pad = size // 4
            draw.rectangle((x - pad, y + top - pad, x + right - left + pad, y + bottom + pad), fill=panel)
            ink = _ink(rng, np.array(panel))
        else:
            ink = _ink(rng, photo[y:y + size, x:x + size * 4])
        draw.text((x, y), text, font=font, fill=ink)
    return np.asarray(image)


def line(rng: np.random.Generator, photo: np.ndarray, split: str, width: int, height: int) -> np.ndarray:
    """One text line cropped tight and resized to `height` keeping its aspect ratio, at most
    `width` wide (H, w, 3 uint8), on a light panel or on the photo: what a detector hands to the
    recognizer and the direction classifier."""
    words = _words(split)
    font = ImageFont.load_default(size=48)
    text = _phrase(rng, words, 1, 5)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (8, 8))).textbbox((0, 0), text, font=font)
    pad = int(rng.integers(2, 10))
    canvas_w, canvas_h = right - left + 2 * pad, bottom - top + 2 * pad
    if rng.random() < 0.6:
        background = np.broadcast_to(rng.integers(170, 256, 3).astype(np.uint8), (canvas_h, canvas_w, 3)).copy()
    else:
        background = np.asarray(Image.fromarray(photo).resize((canvas_w, canvas_h), Image.BILINEAR))
    image = Image.fromarray(background)
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font, fill=_ink(rng, background))
    scaled_w = min(width, max(8, round(canvas_w * height / canvas_h)))
    return np.asarray(image.resize((scaled_w, height), Image.BILINEAR))
