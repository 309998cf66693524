"""Adapters on disk, backbone weights from local files, and every user error of the model API."""

import json
import time

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import deltavision
from deltavision.errors import (
    AdapterFileError,
    DeltaVisionError,
    IncompatibleMethodError,
    MethodOptionError,
    UnknownBackboneError,
    UnknownMethodError,
    WeightsUnavailableError,
)
from deltavision.model import read_adapter_config

from conftest import CLASSIFIER, FAMILIES, NUM_CLASSES, TINY, random_images, tiny_model, trainable_names

WEIGHTS, CONFIG = "deltavision.safetensors", "deltavision.json"
# the folding method with new modules, a baseline training biases only, one that re-estimates BN statistics
ROUND_TRIP_METHODS = ("ssf", "bitfit", "partial")


def _trained(family, method, checkpoint, seed=0, num_classes=NUM_CLASSES):
    """A model whose trained tensors (and BatchNorm statistics) have moved away from their init."""
    model = tiny_model(family, method, num_classes=num_classes, checkpoint=checkpoint)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=g))
        deltavision.set_train_mode(model, True)
        model(random_images(batch=4, seed=seed + 1))  # norms that train update their statistics
    return model.eval()


def _outputs(model):
    model.eval()
    with torch.no_grad():
        return model(random_images(batch=3, seed=7))


@pytest.fixture
def saved_vit(tmp_path, backbone_checkpoint):
    """(adapter dir, model, checkpoint) of a tiny ViT with SSF."""
    ckpt = backbone_checkpoint("vit")
    model = _trained("vit", "ssf", ckpt)
    return deltavision.save_adapter(model, tmp_path / "adapter"), model, ckpt


# --- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ROUND_TRIP_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_gives_identical_outputs(family, method, tmp_path, backbone_checkpoint):
    ckpt = backbone_checkpoint(family)
    model = _trained(family, method, ckpt)
    expected = _outputs(model)
    directory = deltavision.save_adapter(model, tmp_path / "adapter")

    rebuilt = deltavision.load_adapter(directory, checkpoint=ckpt)
    assert torch.equal(_outputs(rebuilt), expected)
    assert trainable_names(rebuilt) == trainable_names(model)

    into = deltavision.load_adapter(directory, tiny_model(family, method, checkpoint=ckpt))
    assert torch.equal(_outputs(into), expected)
    # without the adapter, the fresh model differs: the comparison above is not vacuous
    assert not torch.allclose(_outputs(tiny_model(family, method, checkpoint=ckpt)), expected)


@pytest.mark.parametrize("method", ROUND_TRIP_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_config_describes_the_model(family, method, tmp_path, backbone_checkpoint):
    model = tiny_model(family, method, checkpoint=backbone_checkpoint(family))
    directory = deltavision.save_adapter(model, tmp_path / "adapter", extra={"note": "x"})
    config = json.loads((directory / CONFIG).read_text())
    name, opts = TINY[family]
    assert config["backbone"] == name
    assert config["method"] == method
    assert config["num_classes"] == NUM_CLASSES
    assert config["options"] == {"ssf": {"init_std": 0.02}, "partial": {"k": 1}}.get(method, {})
    assert config["backbone_options"] == json.loads(json.dumps(opts))
    assert config["deltavision_version"] == deltavision.__version__
    assert config["note"] == "x"


@pytest.mark.parametrize("method", ROUND_TRIP_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_file_holds_only_trained_tensors(family, method, tmp_path, backbone_checkpoint):
    model = _trained(family, method, backbone_checkpoint(family))
    directory = deltavision.save_adapter(model, tmp_path / "adapter")
    saved = load_file(str(directory / WEIGHTS))
    # trained parameters, plus the running statistics of BatchNorms that partial tuning trains
    expected = set(trainable_names(model))
    for name, module in model.named_modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if is_bn and method == "partial" and module.weight.requires_grad:
            expected |= {f"{name}.{b}" for b, _ in module.named_buffers()}
    assert set(saved) == expected
    if method == "ssf":
        assert all(".ssf." in k or k.startswith(CLASSIFIER[family]) for k in saved)
    state = model.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(tensor, state[key]), key
    assert sum(t.numel() for t in saved.values()) < sum(t.numel() for t in state.values()) / (1 if method == "partial" else 3)


# --- adapters that do not fit --------------------------------------------------------------------

MISMATCHES = {
    # what differs -> (the model loaded into, text the message must contain)
    "num_classes": (lambda ckpt: tiny_model("vit", "ssf", num_classes=7, checkpoint=ckpt), "num_classes"),
    "backbone": (lambda ckpt: tiny_model("convnext", "ssf"), "backbone"),
    "method": (lambda ckpt: tiny_model("vit", "bitfit", checkpoint=ckpt), "method"),
    "options": (lambda ckpt: tiny_model("vit", "ssf", checkpoint=ckpt, init_std=0.5), "options"),
}


@pytest.mark.parametrize("what", sorted(MISMATCHES))
def test_loading_into_another_model_is_a_clear_adapter_error(what, saved_vit):
    directory, _, ckpt = saved_vit
    make, text = MISMATCHES[what]
    with pytest.raises(AdapterFileError, match=text) as info:
        deltavision.load_adapter(directory, make(ckpt))
    assert str(directory) in str(info.value)


def test_adapter_config_naming_an_unknown_task_is_an_adapter_error(saved_vit):
    directory, _, _ = saved_vit
    config = json.loads((directory / CONFIG).read_text())
    config["task"] = "depth"
    (directory / CONFIG).write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"task should be one of classification, .*not 'depth'") as info:
        read_adapter_config(directory)
    assert str(directory) in str(info.value)


def test_adapter_tensors_of_another_class_count_name_the_shape(saved_vit):
    """A config edited to another class count: the tensors no longer fit and the error says which."""
    directory, _, ckpt = saved_vit
    config = json.loads((directory / CONFIG).read_text())
    config["num_classes"] = 7
    (directory / CONFIG).write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"head\.(weight|bias) has shape"):
        deltavision.load_adapter(directory, checkpoint=ckpt)


CORRUPTIONS = {
    "random bytes": lambda data: bytes(range(256)) * 8,
    "truncated": lambda data: data[: len(data) // 2],
    "header only": lambda data: data[:40],
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_adapter_weights_raise_adapter_file_error(corruption, saved_vit):
    directory, _, ckpt = saved_vit
    path = directory / WEIGHTS
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    with pytest.raises(AdapterFileError, match=WEIGHTS):
        deltavision.load_adapter(directory, checkpoint=ckpt)


CONFIG_DAMAGE = {
    "missing config": lambda d: (d / CONFIG).unlink(),
    "missing weights": lambda d: (d / WEIGHTS).unlink(),
    "config not JSON": lambda d: (d / CONFIG).write_text("{not json"),
    "config a list": lambda d: (d / CONFIG).write_text("[1, 2]"),
    "config lacks method": lambda d: (d / CONFIG).write_text(json.dumps({"backbone": "x", "num_classes": 3})),
}


@pytest.mark.parametrize("damage", sorted(CONFIG_DAMAGE))
def test_damaged_adapter_folder_raises_adapter_file_error(damage, saved_vit):
    directory, _, ckpt = saved_vit
    CONFIG_DAMAGE[damage](directory)
    with pytest.raises(AdapterFileError):
        deltavision.load_adapter(directory, checkpoint=ckpt)


def test_missing_adapter_folder_raises_adapter_file_error(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        deltavision.load_adapter(tmp_path / "nowhere", pretrained=False)


# --- bad names and options -----------------------------------------------------------------------

VIT, VIT_OPTS = TINY["vit"]
BAD_CALLS = [
    # (id, backbone, method, method options, error, message fragment)
    ("unknown option", VIT, "ssf", {"nope": 1}, MethodOptionError, "no option 'nope'"),
    ("option on optionless method", VIT, "linear", {"k": 1}, MethodOptionError, "valid options: none"),
    ("option of wrong type", VIT, "ssf", {"init_std": "wide"}, MethodOptionError, "init_std"),
    ("partial k=0", VIT, "partial", {"k": 0}, MethodOptionError, "at least 1"),
    ("partial k not a number", VIT, "partial", {"k": "two"}, MethodOptionError, "k="),
    ("partial k > blocks", VIT, "partial", {"k": 3}, MethodOptionError, "only 2 blocks"),
    ("unknown backbone", "vit_smal_patch16_224", "ssf", {}, UnknownBackboneError, "did you mean vit_small_patch16_224"),
    ("unknown method", VIT, "sff", {}, UnknownMethodError, "choose one of: .*ssf"),
    ("ssf on regnet", "regnetx_002", "ssf", {}, IncompatibleMethodError, "RegNet"),
    ("partial on regnet", "regnetx_002", "partial", {}, IncompatibleMethodError, "RegNet"),
    ("lora on a basic-block resnet", "resnet18", "lora", {}, MethodOptionError, "--opt targets="),
]


@pytest.mark.parametrize(
    "backbone,method,options,error,message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_bad_model_requests_raise_the_right_error(backbone, method, options, error, message):
    backbone_options = VIT_OPTS if backbone == VIT else None
    with pytest.raises(error, match=message) as info:
        deltavision.create_model(
            backbone, method, NUM_CLASSES, pretrained=False, backbone_options=backbone_options, **options
        )
    assert isinstance(info.value, DeltaVisionError)


def test_string_options_from_the_command_line_are_converted():
    model = tiny_model("vit", "partial", k="2")
    assert model.deltavision.options == {"k": 2}
    assert any(n.startswith("blocks.0.") for n in trainable_names(model))


def test_structure_free_method_works_on_an_unknown_family():
    model = deltavision.create_model("regnetx_002", "bitfit", NUM_CLASSES, pretrained=False)
    expected = {n for n, _ in model.named_parameters() if n.endswith(".bias")} | {"head.fc.weight"}
    assert trainable_names(model) == expected
    assert model(random_images(batch=2)).shape == (2, NUM_CLASSES)
    merged = deltavision.merge(model)
    assert type(merged) is type(timm.create_model("regnetx_002", pretrained=False))


# --- backbone weights ----------------------------------------------------------------------------


def test_offline_hub_download_fails_fast_and_points_to_checkpoint():
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="--checkpoint") as info:
        deltavision.create_model("vit_tiny_patch16_224", "linear", NUM_CLASSES, pretrained=True)
    assert time.monotonic() - started < 10
    assert "vit_tiny_patch16_224" in str(info.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_local_checkpoint_supplies_the_backbone_weights(family, backbone_checkpoint):
    ckpt = backbone_checkpoint(family)
    source = load_file(str(ckpt))
    model = tiny_model(family, "ssf", checkpoint=ckpt)
    merged = deltavision.merge(tiny_model(family, "linear", checkpoint=ckpt)).state_dict()
    head = CLASSIFIER[family]
    compared = 0
    for key, tensor in merged.items():
        if not key.startswith(head):
            assert torch.equal(tensor, source[key]), key
            compared += 1
    assert compared == len(source) - 2  # everything but the 1000-class head
    assert model(random_images(batch=2)).shape == (2, NUM_CLASSES)


def test_local_pth_checkpoint_is_accepted(tmp_path, backbone_checkpoint):
    pth = tmp_path / "vit.pth"
    torch.save(load_file(str(backbone_checkpoint("vit"))), pth)
    model = tiny_model("vit", "linear", checkpoint=pth)
    assert torch.equal(model.pos_embed, load_file(str(backbone_checkpoint("vit")))["pos_embed"])


def _without(tmp, ck, key):
    tensors = load_file(str(ck("vit")))
    del tensors[key]
    save_file(tensors, str(tmp / "partial.safetensors"))
    return tmp / "partial.safetensors"


BAD_CHECKPOINTS = {
    "another architecture": lambda tmp, ck: ck("convnext"),
    "missing a backbone tensor": lambda tmp, ck: _without(tmp, ck, "blocks.1.mlp.fc2.weight"),
    "missing file": lambda tmp, ck: tmp / "nope.safetensors",
    "random bytes": lambda tmp, ck: _write(tmp / "junk.safetensors", bytes(range(256)) * 4),
    "random bytes .pth": lambda tmp, ck: _write(tmp / "junk.pth", bytes(range(256)) * 4),
}


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_unusable_checkpoint_raises_weights_unavailable(case, tmp_path, backbone_checkpoint):
    path = BAD_CHECKPOINTS[case](tmp_path, backbone_checkpoint)
    with pytest.raises(WeightsUnavailableError, match="checkpoint"):
        tiny_model("vit", "ssf", checkpoint=path)


def test_saved_tensors_carry_safetensors_metadata(saved_vit):
    directory, _, _ = saved_vit
    with safe_open(str(directory / WEIGHTS), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


@pytest.mark.parametrize("method", ["linear", "ssf", "mona"])
def test_a_new_classifier_starts_at_zero_and_a_fitting_pretrained_one_is_kept(method, backbone_checkpoint):
    from safetensors.torch import load_file as read

    name, opts = TINY["vit"]
    path = backbone_checkpoint("vit")
    fresh = deltavision.create_model(name, method, 10, checkpoint=path, backbone_options=opts)
    assert all(torch.count_nonzero(p) == 0 for p in fresh.get_classifier().parameters())
    kept = deltavision.create_model(name, method, 1000, checkpoint=path, backbone_options=opts)
    assert torch.equal(kept.get_classifier().weight, read(str(path))["head.weight"])
