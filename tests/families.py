"""Small versions of torchvision's classification families, for the tests.

Every family is torchvision's own model class (``torchvision.models``, imported
through ``shave.zoo.torchvision_models``), shrunk through its constructor
arguments (widths, depths, stage settings) and run at small input resolutions,
so that one forward pass takes a few milliseconds on a CPU and each compiles
quickly. Where torchvision fixes a width that no argument changes (the
4096-wide classifiers of VGG and AlexNet, GoogLeNet's 1024-input classifier,
ResNet's 64..512-wide stem and stages), those modules are replaced after
construction by small ones of the same kind; each place says so. The widths
matter: the compile embeds the weights, and a full-width ResNet-18 took 47 s
to compile instead of 4.

``FAMILIES`` maps a family name to a zero-argument factory returning
``(model, example_inputs)``. Factories are deterministic: they seed the global
RNG, build the model, give every normalisation layer, bias and layer scale
non-trivial values, calibrate BatchNorm running statistics and return the
model in eval mode.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

from shave.zoo import torchvision_models

torchvision_models()  # from here on torchvision.models imports (behind a stand-in package beside the CPU torch)

from torchvision.models.alexnet import AlexNet  # noqa: E402
from torchvision.models.convnext import CNBlock, CNBlockConfig, ConvNeXt  # noqa: E402
from torchvision.models.densenet import DenseNet  # noqa: E402
from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig  # noqa: E402
from torchvision.models.googlenet import BasicConv2d, GoogLeNet, Inception, InceptionAux  # noqa: E402
from torchvision.models.mnasnet import MNASNet  # noqa: E402
from torchvision.models.mobilenetv2 import MobileNetV2  # noqa: E402
from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3  # noqa: E402
from torchvision.models.regnet import BlockParams, RegNet  # noqa: E402
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402
from torchvision.models.shufflenetv2 import ShuffleNetV2  # noqa: E402
from torchvision.models.squeezenet import SqueezeNet  # noqa: E402
from torchvision.models.vgg import VGG, make_layers  # noqa: E402

Factory = Callable[[], Tuple[nn.Module, Tuple[Tensor, ...]]]
_NUM_CLASSES = 10


@torch.no_grad()
def _make_nontrivial(model: nn.Module, example_shape: Tuple[int, ...]) -> None:
    """Give a freshly initialised model the statistics of a "trained" one.

    torchvision's inits leave BatchNorm/LayerNorm as identities (weight 1,
    bias 0, running stats 0/1), biases at zero and ConvNeXt's layer scale at
    1e-6, which would let a compiler get BN folding, bias handling or the
    residual branches wrong without any visible difference.  So:

    * norm-layer affine parameters and all conv/linear biases get random values;
    * ConvNeXt layer scales get O(1) values so residual branches matter;
    * BatchNorm running statistics are *calibrated*: one eval-mode forward pass
      over a random batch sets each BN's mean/var from the input it actually
      receives (with a little per-channel jitter).  Drawing stats blindly, or
      calibrating in train mode, leaves mismatches that compound layer after
      layer in eval mode and blow activations up by 100x+ in deep nets; this
      way activations stay O(1) and outputs are neither vanishing nor huge.
    """
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            if module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            module.bias.normal_(0.0, 0.05)
        if isinstance(module, CNBlock):
            module.layer_scale.uniform_(0.2, 1.0)

    model.eval()

    def calibrate(bn: nn.modules.batchnorm._BatchNorm, args: Tuple[Tensor, ...]) -> None:
        # Runs before the BN computes, and BNs run in topological order, so
        # every BN calibrates against already-calibrated upstream layers.
        x = args[0]
        dims = [d for d in range(x.ndim) if d != 1]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        std = var.sqrt()
        bn.running_mean.copy_(mean + torch.randn_like(mean) * std * 0.1)
        bn.running_var.copy_(var * torch.empty_like(var).uniform_(0.8, 1.25) + bn.eps)
        bn.num_batches_tracked.fill_(1000)

    handles = [
        m.register_forward_pre_hook(calibrate)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    try:
        if handles:
            model(torch.randn(8, *example_shape[1:]))
    finally:
        for handle in handles:
            handle.remove()


def build_family(make_model: Callable[[], nn.Module], input_shape: Tuple[int, ...]) -> Tuple[nn.Module, Tuple[Tensor, ...]]:
    """Seed, build, make non-trivial, switch to eval; returns ``(model, (example_input,))``."""
    torch.manual_seed(0)
    model = make_model()
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    _make_nontrivial(model, input_shape)
    example = torch.randn(*input_shape)
    return model, (example,)


def _narrow_resnet(block: type, layers: List[int], width: int, **kwargs: int) -> nn.Module:
    """torchvision's ResNet at stage widths ``width * (1, 2, 4, 8)`` instead of 64..512.

    No ResNet argument changes those widths, and at full width the weights make the compile
    slow (ResNet-18 at 64x64: 47 s instead of 4, most of it LLVM code generation and writing
    the library, both growing with the embedded weights). So the stem, the four stages and
    ``fc`` are replaced after construction by narrow ones of the same kind, built by the
    model's own ``_make_layer``, and get torchvision's ResNet init.
    """
    model = ResNet(block, layers, num_classes=_NUM_CLASSES, **kwargs)
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    for i, blocks in enumerate(layers):
        setattr(model, f"layer{i + 1}", model._make_layer(block, width * 2**i, blocks, stride=1 if i == 0 else 2))
    model.fc = nn.Linear(width * 8 * block.expansion, _NUM_CLASSES)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def _resnet() -> nn.Module:
    # ResNet-18 layout (BasicBlock) at 1/8 width; Bottleneck is covered by "resnext" below.
    return _narrow_resnet(BasicBlock, [2, 2, 2, 2], width=8)


def _resnext() -> nn.Module:
    # ResNeXt-50 layout at 1/8 width: bottleneck width = planes * (width_per_group / 64) * groups.
    return _narrow_resnet(Bottleneck, [1, 2, 2, 1], width=8, groups=4, width_per_group=32)


def _vgg() -> nn.Module:
    features = make_layers([8, "M", 16, "M", 32, 32, "M"], batch_norm=True)
    with torch.device("meta"):  # the 120M-parameter head made here (1.3 s to initialise) is replaced below
        model = VGG(features, num_classes=_NUM_CLASSES)
    # torchvision's head is fixed at 512 * 7 * 7 -> 4096 -> 4096; the same layers, narrower, on a 3x3 pool.
    model.avgpool = nn.AdaptiveAvgPool2d((3, 3))
    model.classifier = nn.Sequential(
        nn.Linear(32 * 3 * 3, 64), nn.ReLU(True), nn.Dropout(p=0.5),
        nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(p=0.5),
        nn.Linear(64, _NUM_CLASSES),
    )
    for m in model.classifier.modules():
        if isinstance(m, nn.Linear):  # torchvision's VGG init
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    return model


def _mobilenet_v2() -> nn.Module:
    return MobileNetV2(num_classes=_NUM_CLASSES, width_mult=0.25)


def _mobilenet_v3() -> nn.Module:
    # A shortened mobilenet_v3_small setting at half width: covers ReLU and
    # Hardswish blocks, 3x3 and 5x5 depthwise, SE with Hardsigmoid, residuals.
    bneck = partial(InvertedResidualConfig, width_mult=0.5)
    setting = [
        bneck(16, 3, 16, 16, True, "RE", 2, 1),
        bneck(16, 3, 72, 24, False, "RE", 2, 1),
        bneck(24, 3, 88, 24, False, "RE", 1, 1),
        bneck(24, 5, 96, 40, True, "HS", 2, 1),
        bneck(40, 5, 240, 40, True, "HS", 1, 1),
        bneck(40, 5, 120, 48, True, "HS", 1, 1),
    ]
    return MobileNetV3(setting, last_channel=128, num_classes=_NUM_CLASSES)


def _shufflenet_v2() -> nn.Module:
    return ShuffleNetV2([2, 3, 2], [8, 16, 32, 64, 128], num_classes=_NUM_CLASSES)


def _densenet() -> nn.Module:
    return DenseNet(growth_rate=8, block_config=(2, 3, 2), num_init_features=16, bn_size=2, num_classes=_NUM_CLASSES)


def _googlenet() -> nn.Module:
    # GoogLeNet at 1/8 width: torchvision's widths are all multiples of 8, and its `blocks`
    # argument takes the factories of its BasicConv2d and Inception modules, which here build
    # them with every channel count divided by 8 (the 3 input channels excepted).
    def conv_block(in_channels: int, out_channels: int, **kwargs: object) -> nn.Module:
        return BasicConv2d(in_channels if in_channels == 3 else in_channels // 8, out_channels // 8, **kwargs)

    def inception_block(in_channels: int, *widths: int) -> nn.Module:
        return Inception(in_channels // 8, *(w // 8 for w in widths))

    model = GoogLeNet(num_classes=_NUM_CLASSES, aux_logits=False, init_weights=True,
                      blocks=[conv_block, inception_block, InceptionAux])
    # torchvision's classifier is fixed at 1024 inputs: the same layer at 1024 / 8, torchvision's init.
    model.fc = nn.Linear(1024 // 8, _NUM_CLASSES)
    nn.init.trunc_normal_(model.fc.weight, mean=0.0, std=0.01, a=-2, b=2)
    return model


def _squeezenet() -> nn.Module:
    return SqueezeNet("1_1", num_classes=_NUM_CLASSES)


def _efficientnet() -> nn.Module:
    # efficientnet_b0 setting at quarter width / half depth.
    bneck = partial(MBConvConfig, width_mult=0.25, depth_mult=0.5)
    setting = [
        bneck(1, 3, 1, 32, 16, 1),
        bneck(6, 3, 2, 16, 24, 2),
        bneck(6, 5, 2, 24, 40, 2),
        bneck(6, 3, 2, 40, 80, 3),
        bneck(6, 5, 1, 80, 112, 3),
        bneck(6, 5, 2, 112, 192, 4),
        bneck(6, 3, 1, 192, 320, 1),
    ]
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=_NUM_CLASSES)


def _efficientnet_v2() -> nn.Module:
    # efficientnet_v2_s layout, shrunk: fused-MBConv stages then MBConv stages.
    setting = [
        FusedMBConvConfig(1, 3, 1, 8, 8, 1),
        FusedMBConvConfig(4, 3, 2, 8, 16, 2),
        FusedMBConvConfig(4, 3, 2, 16, 24, 2),
        MBConvConfig(4, 3, 2, 24, 32, 2),
        MBConvConfig(6, 3, 1, 32, 40, 2),
        MBConvConfig(6, 3, 2, 40, 64, 2),
    ]
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=_NUM_CLASSES,
                        norm_layer=partial(nn.BatchNorm2d, eps=1e-03), last_channel=256)


def _regnet() -> nn.Module:
    # RegNetY-style: grouped 3x3 bottlenecks with SE; group width 8.
    params = BlockParams(depths=[1, 2, 2, 1], widths=[16, 32, 48, 96], group_widths=[8] * 4,
                         bottleneck_multipliers=[1.0] * 4, strides=[2] * 4, se_ratio=0.25)
    return RegNet(params, num_classes=_NUM_CLASSES, stem_width=16)


def _mnasnet() -> nn.Module:
    return MNASNet(alpha=0.5, num_classes=_NUM_CLASSES)


def _convnext() -> nn.Module:
    # convnext_tiny block setting at 1/8 width and reduced depth.
    setting = [
        CNBlockConfig(16, 32, 1),
        CNBlockConfig(32, 64, 1),
        CNBlockConfig(64, 96, 2),
        CNBlockConfig(96, None, 1),
    ]
    return ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=_NUM_CLASSES)


def _alexnet() -> nn.Module:
    model = AlexNet(num_classes=_NUM_CLASSES)
    # torchvision's head is fixed at 256 * 6 * 6 -> 4096 -> 4096; the same layers, narrower. At
    # 160x160 the last feature map is 4x4, so adaptive pooling to 3x3 uses overlapping,
    # non-uniform windows instead of degenerating to an identity.
    model.avgpool = nn.AdaptiveAvgPool2d((3, 3))
    model.classifier = nn.Sequential(
        nn.Dropout(p=0.5), nn.Linear(256 * 3 * 3, 64), nn.ReLU(inplace=True),
        nn.Dropout(p=0.5), nn.Linear(64, 64), nn.ReLU(inplace=True),
        nn.Linear(64, _NUM_CLASSES),
    )
    return model


FAMILIES: Dict[str, Factory] = {
    "resnet": partial(build_family, _resnet, (1, 3, 64, 64)),
    "resnext": partial(build_family, _resnext, (1, 3, 64, 64)),
    "vgg": partial(build_family, _vgg, (1, 3, 48, 48)),
    "mobilenet_v2": partial(build_family, _mobilenet_v2, (1, 3, 64, 64)),
    "mobilenet_v3": partial(build_family, _mobilenet_v3, (1, 3, 64, 64)),
    "shufflenet_v2": partial(build_family, _shufflenet_v2, (1, 3, 64, 64)),
    "densenet": partial(build_family, _densenet, (1, 3, 64, 64)),
    "googlenet": partial(build_family, _googlenet, (1, 3, 64, 64)),
    "squeezenet": partial(build_family, _squeezenet, (1, 3, 64, 64)),
    "efficientnet": partial(build_family, _efficientnet, (1, 3, 64, 64)),
    "efficientnet_v2": partial(build_family, _efficientnet_v2, (1, 3, 64, 64)),
    "regnet": partial(build_family, _regnet, (1, 3, 64, 64)),
    "mnasnet": partial(build_family, _mnasnet, (1, 3, 64, 64)),
    "convnext": partial(build_family, _convnext, (1, 3, 64, 64)),
    "alexnet": partial(build_family, _alexnet, (1, 3, 160, 160)),
}
