"""Image augmentation for recovery without labels: batched, on torch tensors, seeded.

    aug = shave.augment(crop=0.6, flip=True, colour=0.2, mix=0.5)
    g2 = shave.finetune(pruned, images, teacher=original, augment=aug)

Distilling a compressed model from the original on a few hundred unlabelled
images over-fits them unless every step sees new views: each batch gets a
random resized crop and horizontal flip per image (one `grid_sample`),
brightness/contrast/channel-gain jitter, and a mixup-style blend of image
pairs. The teacher labels whatever the student sees, so no label needs to
follow the blend. Works on normalised images (N, C, H, W) of any size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImageAugment:
    crop: float = 0.5  # smallest crop area, as a fraction of the image (1.0: no crop)
    flip: bool = True  # horizontal flips
    colour: float = 0.2  # brightness, contrast and per-channel gain jitter (0: none)
    mix: float = 0.5  # fraction of each batch blended with another image (0: none)

    def __post_init__(self):
        if not 0.0 < self.crop <= 1.0:
            raise ValueError(f"augment crop is the smallest crop area in (0, 1], got {self.crop!r}")
        if not 0.0 <= self.mix <= 1.0 or self.colour < 0:
            raise ValueError(f"augment mix must be in [0, 1] and colour >= 0, got mix={self.mix!r}, "
                             f"colour={self.colour!r}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"augment wants float image batches (N, C, H, W), got {tuple(x.shape)} {x.dtype}")
        n = x.shape[0]

        def uniform(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)

        x = x.detach()
        if self.crop < 1.0 or self.flip:
            area = uniform(self.crop, 1.0)
            aspect = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
            sx = torch.sqrt(area * aspect).clamp(max=1.0)
            sy = torch.sqrt(area / aspect).clamp(max=1.0)
            tx, ty = uniform(-1, 1) * (1 - sx), uniform(-1, 1) * (1 - sy)
            if self.flip:
                sx = sx * torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
            theta = torch.zeros(n, 2, 3)
            theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.colour > 0:
            c = self.colour
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            contrast = uniform(1 - c, 1 + c, 1, 1, 1)
            gain = uniform(1 - c / 2, 1 + c / 2, x.shape[1], 1, 1)
            shift = uniform(-c, c, 1, 1, 1) * x.std(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * contrast * gain + mean + shift
        if self.mix > 0 and n > 1:
            lam = uniform(0.5, 1.0, 1, 1, 1)
            blend = torch.rand(n, 1, 1, 1, generator=generator) < self.mix
            other = x[torch.randperm(n, generator=generator)]
            x = torch.where(blend, lam * x + (1 - lam) * other, x)
        return x


def augment(crop: float = 0.5, flip: bool = True, colour: float = 0.2, mix: float = 0.5) -> ImageAugment:
    """An image augmentation for `shave.finetune(..., augment=...)` (see ImageAugment)."""
    return ImageAugment(crop, flip, colour, mix)
