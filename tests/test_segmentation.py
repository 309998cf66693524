"""Segmentation models: every method on every family, heads, E3VA's highway, folding, files, metrics, training."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltavision
from deltavision.anatomy import describe
from deltavision.errors import AdapterFileError, MethodOptionError
from deltavision.methods import get_method
from deltavision.model import load_adapter, merge, save_adapter
from deltavision.tasks.features import FeaturePyramid
from deltavision.tasks.metrics import ConfusionMatrix

from conftest import FAMILIES, IMAGE_SIZE, METHODS, TINY, plain_tiny, random_images, trainable_names

CLASSES = 4
PAIRS = [(m, f) for m, f in itertools.product(METHODS, FAMILIES) if get_method(m).fits(f)]
HEAD_PARTS = ("neck.", "decoder.", "classifier.")


def _segmenter(family: str, method: str, head: str = "upernet", **options) -> nn.Module:
    name, opts = TINY[family]
    torch.manual_seed(0)
    return deltavision.create_model(
        name, method, CLASSES, pretrained=False, backbone_options=opts, task="segmentation", head=head, **options
    )


def _classifier_trainable(family: str, method: str) -> set[str]:
    """What ``method`` trains inside the backbone of a classifier, minus classifier and final layers."""
    name, opts = TINY[family]
    options = {"dense": True} if method == "e3va" else {}
    model = deltavision.create_model(name, method, CLASSES, pretrained=False, backbone_options=opts, **options)
    inner = model.backbone if isinstance(getattr(model, "backbone", None), nn.Module) else model
    anatomy = describe(inner)
    prefix = "backbone." if inner is not model else ""
    unused = tuple(f"{prefix}{part}." for part in (*anatomy.final, anatomy.classifier))
    return {n for n in trainable_names(model) if not n.startswith(unused)}


@pytest.mark.parametrize("method,family", PAIRS)
def test_every_method_segments_at_input_resolution_and_trains_only_method_and_head(method, family):
    model = _segmenter(family, method)
    deltavision.set_train_mode(model, True)
    images = random_images(batch=2, size=IMAGE_SIZE)
    logits = model(images)
    assert logits.shape == (2, CLASSES, IMAGE_SIZE, IMAGE_SIZE)

    trainable = trainable_names(model)
    in_backbone = {n[len("backbone."):] for n in trainable if n.startswith("backbone.")}
    expected = {n for n in _classifier_trainable(family, method)  # E3VA: norms of the stages the head reads
                if not n.startswith("highway.stage_norms.") or int(n.split(".")[2]) in model.neck.picked}
    assert in_backbone == expected
    assert trainable - {f"backbone.{n}" for n in in_backbone} == {
        n for n, _ in model.named_parameters() if n.startswith(HEAD_PARTS)
    }, "the head (neck, decoder, classifier) always trains, and nothing else outside the backbone"

    F.cross_entropy(logits, torch.randint(0, CLASSES, (2, IMAGE_SIZE, IMAGE_SIZE))).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:  # every trained tensor is used: DDP needs no find_unused_parameters
            assert param.grad is not None, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("family", FAMILIES)
def test_fpn_head_and_four_levels_finest_first(family):
    model = _segmenter(family, "lora" if family != "resnet" else "ssf", head="fpn")
    assert model.deltavision.head == "fpn"
    assert model(random_images(batch=1)).shape == (1, CLASSES, IMAGE_SIZE, IMAGE_SIZE)
    strides = model.neck.strides
    assert len(strides) == 4 and all(b == 2 * a for a, b in zip(strides, strides[1:])), strides


def test_plain_vit_gets_a_simple_feature_pyramid_around_its_patch_stride():
    model = _segmenter("vit", "ssf")
    patch = TINY["vit"][1]["patch_size"]
    assert model.neck.simple and model.neck.strides == [patch // 4, patch // 2, patch, patch * 2]
    maps = model.neck([torch.randn(1, 32, 4, 4)])
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_pyramid_keeps_the_last_map_of_each_stride_and_pools_missing_levels():
    pyramid = FeaturePyramid([8, 16, 24, 40, 80, 112, 192], [2, 4, 8, 16, 16, 32, 32])
    assert pyramid.picked == [1, 2, 4, 6] and pyramid.channels == [16, 24, 80, 192]
    three = FeaturePyramid([8, 16, 32], [4, 8, 16])
    assert three.strides == [4, 8, 16, 32] and three.channels == [8, 16, 32, 32]
    out = three([torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 32, 1, 1)])
    assert [tuple(m.shape[-2:]) for m in out] == [(8, 8), (4, 4), (1, 1), (1, 1)]


@pytest.mark.parametrize("family", FAMILIES)
def test_e3va_segmentation_reads_the_highway_and_never_backpropagates_through_the_backbone(family):
    model = _segmenter(family, "e3va")
    assert model.deltavision.options["dense"] is True
    deltavision.set_train_mode(model, True)
    timm_model = model.backbone.backbone
    states = []
    handles = [m.register_forward_hook(lambda mod, a, out: states.append(torch.is_grad_enabled()))
               for name, m in timm_model.named_modules() if name]
    logits = model(random_images(batch=2))
    for h in handles:
        h.remove()
    assert states and not any(states), "a backbone module ran with autograd on"
    logits.sum().backward()
    assert all(p.grad is None for p in timm_model.parameters())
    assert all(p.grad is not None for p in model.backbone.highway.parameters() if p.requires_grad)


@pytest.mark.parametrize("method,family", [(m, f) for m in ("ssf", "lora", "bitfit") for f in FAMILIES
                                           if get_method(m).fits(f) and (m, f) != ("lora", "resnet")])
def test_folding_into_a_segmentation_backbone_is_exact(method, family):
    model = _segmenter(family, method)
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    model.eval()
    images = random_images(batch=2)
    before = model(images)
    merged = merge(model)
    after = merged(images)
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()
    plain = plain_tiny(family, num_classes=0)
    assert sum(p.numel() for p in merged.backbone.parameters()) == sum(p.numel() for p in plain.parameters())
    assert type(merged.backbone) is type(plain) and not hasattr(merged, "deltavision")


@pytest.mark.parametrize("method,family", [("mona", "swin"), ("e3va", "vit"), ("vpt", "vit"), ("ssf", "efficientnet")])
def test_adapter_file_records_task_and_head_and_reloads(method, family, tmp_path):
    model = _segmenter(family, method, head="fpn")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn_like(param))
    deltavision.set_train_mode(model, True)
    model(random_images(batch=4))  # the decoder's BatchNorm statistics move
    model.eval()
    save_adapter(model, tmp_path, extra={"seed": 0})
    config = deltavision.model.read_adapter_config(tmp_path)
    assert (config["task"], config["head"]) == ("segmentation", "fpn")
    loaded = load_adapter(tmp_path, pretrained=False).eval()
    images = random_images(batch=2, seed=3)
    assert torch.equal(model(images), loaded(images))


def test_segmentation_adapter_refuses_a_classifier_and_another_head(tmp_path):
    save_adapter(_segmenter("convnext", "ssf"), tmp_path)
    name, opts = TINY["convnext"]
    classifier = deltavision.create_model(name, "ssf", CLASSES, pretrained=False, backbone_options=opts)
    with pytest.raises(AdapterFileError, match="task='segmentation'"):
        load_adapter(tmp_path, classifier)
    with pytest.raises(AdapterFileError, match="head='upernet'"):
        load_adapter(tmp_path, _segmenter("convnext", "ssf", head="fpn"))


def test_unknown_task_or_head_is_an_option_error():
    name, opts = TINY["convnext"]
    with pytest.raises(MethodOptionError, match="unknown task"):
        deltavision.create_model(name, "ssf", 3, pretrained=False, backbone_options=opts, task="depth")
    with pytest.raises(MethodOptionError, match="unknown segmentation head"):
        deltavision.create_model(name, "ssf", 3, pretrained=False, backbone_options=opts, task="segmentation",
                                 head="deeplab")
    with pytest.raises(MethodOptionError, match="drop head"):
        deltavision.create_model(name, "ssf", 3, pretrained=False, backbone_options=opts, head="fpn")


def test_bf16_autocast_on_cpu():
    model = _segmenter("swin", "mona")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(random_images(batch=2))
    F.cross_entropy(logits.float(), torch.randint(0, CLASSES, (2, IMAGE_SIZE, IMAGE_SIZE))).backward()
    assert torch.isfinite(logits.float()).all()


# --- metrics ---------------------------------------------------------------------------------------


def test_confusion_matrix_by_hand():
    targets = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    predictions = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    matrix = ConfusionMatrix(4)
    matrix.update(predictions, targets)
    # class 0: TP 1, FP 1 (a 2 read as 0), FN 1 (a 0 read as 1) -> 1/3; class 1: TP 3, FP 1 -> 3/4;
    # class 2: TP 1, FN 1 -> 1/2; class 3 absent everywhere -> no IoU; the 255 pixel is not counted
    ious = matrix.per_class_iou()
    assert ious[:3] == pytest.approx([100 / 3, 75.0, 50.0]) and ious[3] is None
    assert matrix.mean_iou() == pytest.approx((100 / 3 + 75 + 50) / 3)
    assert matrix.pixel_accuracy() == pytest.approx(100 * 5 / 7)


def test_confusion_matrix_agrees_with_torchmetrics():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (3, 16, 16), generator=generator)
    targets[0, :4] = 255
    predictions = torch.where(torch.rand(3, 16, 16, generator=generator) < 0.6, targets,
                              torch.randint(0, 5, (3, 16, 16), generator=generator)).clamp(max=4)
    matrix = ConfusionMatrix(5)
    for p, t in zip(predictions, targets):
        matrix.update(p, t)
    jaccard = MulticlassJaccardIndex(5, average=None, ignore_index=255)(predictions, targets)
    accuracy = MulticlassAccuracy(5, average="micro", ignore_index=255)(predictions, targets)
    assert matrix.per_class_iou() == pytest.approx((100 * jaccard).tolist())
    assert matrix.pixel_accuracy() == pytest.approx(100 * accuracy.item())
