"""Unlabelled natural photographs for recovery without labels: scikit-image's bundled ones.

scikit-image ships a dozen or so photographs in ``skimage/data`` (astronaut,
chelsea, coffee, rocket, the motorcycle pair, ...), none of them among the 20
ImageNet evaluation images (``imagenet_samples``). ``photo_crops`` cuts random
resized crops (any scale from 8 % of a photo's area up, flips) out of them,
normalised like ImageNet inputs: a calibration-sized set of unlabelled images
for label-free distillation (``shave.finetune(g, crops, teacher=model)``).
Nothing is downloaded: the files are in the installed package.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .imagenet_samples import IMAGENET_MEAN, IMAGENET_STD

# colour photographs of scenes and objects (no charts, microscopy or text pages)
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "camera.png", "moon.png",
          "grass.png", "gravel.png", "brick.png", "coins.png", "clock_motion.png")


def photos_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise RuntimeError("the sample photographs come from scikit-image: pip install scikit-image")
    return Path(spec.origin).parent / "data"


def natural_photos() -> list[torch.Tensor]:
    """The bundled photographs as float tensors (3, H, W) in [0, 1] (grey ones repeated to RGB)."""
    out = []
    for name in PHOTOS:
        path = photos_dir() / name
        if path.is_file():
            arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
    if len(out) < 8:
        raise RuntimeError(f"only {len(out)} photographs found in {photos_dir()}: reinstall scikit-image")
    return out


def photo_crops(n: int, size: int = 224, seed: int = 0, min_area: float = 0.08) -> torch.Tensor:
    """n random resized crops (N, 3, size, size) of the photographs, flipped at random and
    normalised with the ImageNet mean and std."""
    g = torch.Generator().manual_seed(seed)
    photos = natural_photos()
    mean = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)
    out = torch.empty(n, 3, size, size)
    for k in range(n):
        img = photos[int(torch.randint(len(photos), (1,), generator=g))]
        h, w = img.shape[1:]
        area = h * w * (min_area + (1 - min_area) * float(torch.rand(1, generator=g)))
        aspect = float(torch.exp(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3), generator=g)))
        ch = min(h, int(round(np.sqrt(area / aspect))))
        cw = min(w, int(round(np.sqrt(area * aspect))))
        i = int(torch.randint(h - ch + 1, (1,), generator=g))
        j = int(torch.randint(w - cw + 1, (1,), generator=g))
        crop = F.interpolate(img[None, :, i:i + ch, j:j + cw], size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)[0]
        if float(torch.rand(1, generator=g)) < 0.5:
            crop = crop.flip(-1)
        out[k] = (crop - mean) / std
    return out
