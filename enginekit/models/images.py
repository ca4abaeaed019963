"""Offline natural images and the crops the image zoo models calibrate and evaluate on.

The images ship inside scikit-image and scikit-learn, so nothing is downloaded. Calibration and
evaluation sets are random-resized crops (with horizontal flips) drawn with different seeds, so
they are disjoint samples of real photographs, never noise.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
from PIL import Image

# RGB photographs, then grey ones (replicated to three channels).
_SKIMAGE_RGB = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
_SKIMAGE_GREY = ("camera", "coins", "moon", "brick", "grass", "gravel", "clock", "text", "page")


@functools.cache
def natural_images() -> tuple[np.ndarray, ...]:
    """Every bundled natural image as an H x W x 3 uint8 RGB array."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = [getattr(skimage.data, name)() for name in _SKIMAGE_RGB]
    images += [np.repeat(getattr(skimage.data, name)()[..., None], 3, axis=2) for name in _SKIMAGE_GREY]
    images += list(load_sample_images().images)
    return tuple(np.ascontiguousarray(img[..., :3]) for img in images)


def resize_center_crop(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Resize the short side to `resize` (bilinear), then take the central `crop` square."""
    pil = Image.fromarray(image)
    width, height = pil.size
    scale = resize / min(width, height)
    pil = pil.resize((max(crop, round(width * scale)), max(crop, round(height * scale))), Image.BILINEAR)
    width, height = pil.size
    left, top = (width - crop) // 2, (height - crop) // 2
    return np.asarray(pil.crop((left, top, left + crop, top + crop)))


def iter_random_resized_crops(seed: int, size: int, scale: tuple[float, float] = (0.2, 1.0)) -> Iterator[np.ndarray]:
    """An endless, seeded stream of size x size x 3 uint8 crops of random area and aspect, half
    of them flipped; the n-th crop depends only on the seed and n."""
    rng = np.random.default_rng(seed)
    images = natural_images()
    while True:
        image = images[rng.integers(len(images))]
        height, width = image.shape[:2]
        area = height * width * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        crop_w = int(min(width, round(np.sqrt(area * aspect))))
        crop_h = int(min(height, round(np.sqrt(area / aspect))))
        top = rng.integers(height - crop_h + 1)
        left = rng.integers(width - crop_w + 1)
        patch = np.asarray(Image.fromarray(image[top : top + crop_h, left : left + crop_w]).resize((size, size), Image.BILINEAR))
        yield patch[:, ::-1] if rng.random() < 0.5 else patch


def random_resized_crops(count: int, seed: int, size: int) -> np.ndarray:
    """The first `count` crops of the stream, as one N x size x size x 3 array."""
    crops = np.empty((count, size, size, 3), np.uint8)
    for i, crop in zip(range(count), iter_random_resized_crops(seed, size)):
        crops[i] = crop
    return crops
