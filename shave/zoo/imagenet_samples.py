"""The 20 ImageNet validation images bundled with the ``foolbox`` pip package.

The images (``foolbox/data/imagenet_XX_LABEL.jpg``, 512x512 RGB) are read
straight from the installed package directory; foolbox itself is never
imported (it pulls in heavy optional dependencies and is installed without
them).  Preprocessing reproduces torchvision's standard ImageNet eval transform

    Resize(256) -> CenterCrop(224) -> ToTensor() -> Normalize(mean, std)

with PIL + numpy only.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "imagenet_samples", "imagenet_samples_dir", "preprocess_imagenet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_FILE_RE = re.compile(r"^imagenet_(\d+)_(\d+)\.jpg$")


def imagenet_samples_dir() -> Path:
    """Directory holding foolbox's sample images, found without importing foolbox."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("ImageNet sample images not found: run `pip install --no-deps foolbox`")
    data_dir = Path(spec.origin).parent / "data"
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"{data_dir} is missing: reinstall with `pip install --no-deps --force-reinstall foolbox`"
        )
    return data_dir


def preprocess_imagenet(image: Image.Image, size: int = 224) -> torch.Tensor:
    """torchvision-equivalent eval transform of one PIL image -> float32 [3, size, size].

    The resize target keeps torchvision's 256/224 ratio (256 for ``size=224``).
    """
    resize = int(round(size * 256 / 224))
    image = image.convert("RGB")

    # Resize(int): shorter side -> `resize`, longer side truncated (torchvision uses int()).
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        # PIL's BILINEAR resize is area-aware when downscaling, which is what
        # torchvision's PIL path (and its antialias=True tensor path) does.
        image = image.resize((new_w, new_h), Image.BILINEAR)

    # CenterCrop: torchvision rounds the offset with round() (banker's rounding).
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))

    array = np.asarray(image, dtype=np.float32) / 255.0  # HWC in [0, 1]
    array = (array - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def imagenet_samples(size: int = 224) -> Tuple[torch.Tensor, List[int]]:
    """All 20 samples as a normalised float32 batch [20, 3, size, size] plus their ImageNet labels.

    Samples are ordered by the index in the file name; the label is the last
    number in the file name.
    """
    data_dir = imagenet_samples_dir()
    entries = []
    for path in data_dir.iterdir():
        match = _FILE_RE.match(path.name)
        if match:
            entries.append((int(match.group(1)), int(match.group(2)), path))
    if not entries:
        raise FileNotFoundError(f"no imagenet_XX_LABEL.jpg files in {data_dir}")
    entries.sort()

    images = []
    for _, _, path in entries:
        with Image.open(path) as img:
            images.append(preprocess_imagenet(img, size))
    labels = [label for _, label, _ in entries]
    return torch.stack(images), labels
