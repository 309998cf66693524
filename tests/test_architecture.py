"""The contracts the architecture promises: method registry, option grammar, BatchNorm rule, adapter files."""

import dataclasses
import json
import shutil

import pytest
import torch
from torch import nn

import deltavision
from deltavision.errors import MethodOptionError
from deltavision.methods import get_method, list_methods, register_method
from deltavision.methods.mona import Mona
from deltavision.model.modes import _KeptStatistics
from deltavision.options import backbone_options, build_config, parse_literal

from conftest import random_images, tiny_model


def test_registry_refuses_a_duplicate_name():
    @dataclasses.dataclass
    class Nothing:
        pass

    with pytest.raises(ValueError, match="registered already"):
        register_method("ssf", Nothing, "a second ssf")(lambda model, anatomy, config: None)
    assert get_method("ssf").config_cls.__name__ == "SSFConfig"


def test_every_capability_is_on_the_spec():
    sharing = {m for m in list_methods() if get_method(m).shares_backbone}
    assert sharing == set(list_methods()) - {"full", "bitfit", "norm", "partial"}
    assert {m for m in list_methods() if get_method(m).structure_free} == {"full", "linear", "bitfit", "norm"}
    assert {m for m in list_methods() if get_method(m).batch_stats} == {"full", "partial"}
    assert all(get_method(m).default_lr > 0 for m in list_methods())


@pytest.mark.parametrize("text,value", [
    ("3", 3), ("0.5", 0.5), ("true", True), ("False", False), ("none", None), ("1,1,2", (1, 1, 2)),
    ("(1, 1, 2)", (1, 1, 2)), ("[8,16]", (8, 16)), ("gelu", "gelu"), ("'avg'", "avg"),
])
def test_backbone_option_literals(text, value):
    assert parse_literal(text) == value


def test_backbone_options_from_pairs():
    assert backbone_options(["depths=1,1,2", "drop_path_rate=0.1", "global_pool=avg"]) == {
        "depths": (1, 1, 2), "drop_path_rate": 0.1, "global_pool": "avg"}


def test_method_options_are_typed_by_their_config_from_strings_and_json_alike():
    spec = get_method("lora")
    from_cli = build_config(spec.config_cls, {"rank": "4", "alpha": "16", "targets": "q,v"}, "lora")
    from_json = build_config(spec.config_cls, {"rank": 4, "alpha": 16, "targets": ["q", "v"]}, "lora")
    assert from_cli == from_json and isinstance(from_cli.alpha, float) and from_cli.targets == ("q", "v")
    with pytest.raises(MethodOptionError, match="not a valid int"):
        build_config(spec.config_cls, {"rank": "four"}, "lora")
    with pytest.raises(MethodOptionError, match="valid options: alpha, rank, targets"):
        build_config(spec.config_cls, {"rnak": "4"}, "lora")


def _plain_loop(model, steps=3):
    """The usual PyTorch loop: model.train(), forward, backward, step; no deltavision helpers."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for step in range(steps):
        loss = model(random_images(4, seed=step) * 3 + 1).logsumexp(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _running_means(model):
    return {n: m.running_mean.clone() for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("method,changes", [("bitfit", False), ("ssf", False), ("mona", False), ("full", True)])
def test_plain_train_mode_keeps_frozen_batchnorm_statistics(method, changes):
    model = tiny_model("efficientnet", method)
    before = _running_means(model)
    _plain_loop(model)
    after = _running_means(model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert bool(changed) == changes, changed
    if changes:
        assert len(changed) == len(before)


def test_merged_model_has_plain_batchnorm_classes():
    model = tiny_model("efficientnet", "bitfit")
    assert all(isinstance(m, _KeptStatistics) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    plain = deltavision.merge(model)
    import timm.layers

    kinds = {type(m) for m in plain.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds <= {nn.BatchNorm2d, timm.layers.BatchNormAct2d}
    plain.train()
    assert all(m.training for m in plain.modules())


def test_mona_projections_start_as_the_official_code():
    torch.manual_seed(0)
    mona = Mona(768, 64)
    for projection in (mona.down, mona.up):
        assert torch.equal(projection.bias, torch.zeros_like(projection.bias))
        assert projection.weight.std().item() == pytest.approx(0.02, rel=0.1)
        # normal, not PyTorch's default uniform (whose std for the 768-wide down-projection is also ~0.02)
        assert projection.weight.abs().max().item() > 3 * 0.02


def test_adapter_files_have_names_of_our_own_and_old_names_still_load(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("vit", "lora")
    directory = deltavision.save_adapter(model, tmp_path / "new")
    assert sorted(p.name for p in directory.iterdir()) == ["deltavision.json", "deltavision.safetensors"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(directory / "deltavision.json", legacy / "adapter_config.json")
    shutil.copy(directory / "deltavision.safetensors", legacy / "adapter_model.safetensors")
    torch.manual_seed(0)
    fresh = tiny_model("vit", "lora")
    deltavision.load_adapter(legacy, fresh)
    x = random_images()
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    assert "peft_type" not in json.loads((directory / "deltavision.json").read_text())


FAMILY_WORDS = {"vit", "swin", "convnext", "efficientnet", "resnet"}
FAMILY_CLASSES = {"VisionTransformer", "SwinTransformer", "ConvNeXt", "EfficientNet", "ResNet"}


def _family_mentions_in_code(path):
    """(line, text) of string constants naming a family and of timm family classes, docstrings aside."""
    import ast

    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value.lower() in FAMILY_WORDS:
                found.append((node.lineno, node.value))
        elif isinstance(node, ast.Name) and node.id in FAMILY_CLASSES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute) and node.attr in FAMILY_CLASSES:
            found.append((node.lineno, node.attr))
    return found


def test_no_module_outside_the_families_branches_on_a_family():
    from pathlib import Path

    root = Path(deltavision.__file__).parent
    offenders = {
        str(path.relative_to(root)): mentions
        for path in sorted(root.rglob("*.py"))
        if "families" not in path.relative_to(root).parts
        for mentions in [_family_mentions_in_code(path)] if mentions
    }
    assert offenders == {}
