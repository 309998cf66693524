"""Detection and instance models: every method on every family, torchvision's detectors, folding, files, AP."""

from __future__ import annotations

import csv
import itertools
import json

import pytest
import torch
from torch import nn

import deltavision
from deltavision.anatomy import describe
from deltavision.errors import AdapterFileError, MethodOptionError
from deltavision.methods import get_method
from deltavision.model import load_adapter, merge, save_adapter
from deltavision.tasks.drawing_detection import class_colour, draw_detections
from deltavision.train.objectives import DetectionObjective, collate_detection

from conftest import FAMILIES, IMAGE_SIZE, METHODS, TINY, plain_tiny, trainable_names

CLASSES = 3  # background + 2
SMALL = {"image_size": IMAGE_SIZE, "fpn_channels": 32}
PAIRS = [(m, f) for m, f in itertools.product(METHODS, FAMILIES) if get_method(m).fits(f)]
HEAD_PARTS = {  # what trains outside the adapted backbone
    "maskrcnn": ("backbone.neck.", "backbone.norms.", "backbone.fpn.", "rpn.", "roi_heads."),
    "fasterrcnn": ("backbone.neck.", "backbone.norms.", "backbone.fpn.", "rpn.", "roi_heads."),
    "retinanet": ("backbone.neck.", "backbone.norms.", "backbone.fpn.", "head."),
}


def _detector(family: str, method: str, detector: str = "maskrcnn", **options) -> nn.Module:
    name, opts = TINY[family]
    torch.manual_seed(0)
    task = "instance" if detector == "maskrcnn" else "detection"
    model = deltavision.create_model(name, method, CLASSES, pretrained=False, backbone_options=opts, task=task,
                                     detector=detector, head_options=dict(SMALL), **options)
    if detector != "retinanet":  # fewer proposals and sampled RoIs than at 800 px: faster, the same graph
        model.rpn._pre_nms_top_n["training"], model.rpn._post_nms_top_n["training"] = 64, 32
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 32
    return model


def _images_and_targets(batch: int = 2, size: int = IMAGE_SIZE, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    targets = []
    for index in range(batch):
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 2:18, 4:20] = 1
        masks[1, 14:30, 12 + index : 28] = 1
        targets.append({"boxes": torch.tensor([[4.0, 2.0, 20.0, 18.0], [12.0 + index, 14.0, 28.0, 30.0]]),
                        "labels": torch.tensor([1, 2]), "masks": masks})
    return images, targets


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


def _check_training_step(model: nn.Module, family: str, method: str, detector: str) -> None:
    """The loss dict of one training step reaches exactly the method's parameters and the detector."""
    model.train()
    images, targets = _images_and_targets(batch=2)  # BatchNorms that train need two images at 1 x 1
    if detector != "maskrcnn":
        targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    losses = model(list(images), targets)
    expected_losses = {"maskrcnn": {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                                    "loss_rpn_box_reg"},
                       "retinanet": {"classification", "bbox_regression"}}
    assert set(losses) == expected_losses.get(detector, expected_losses["maskrcnn"] - {"loss_mask"})

    trainable = trainable_names(model)
    body = "backbone.body."
    in_backbone = {n[len(body):] for n in trainable if n.startswith(body)}
    expected = {n for n in _classifier_trainable(family, method)  # E3VA: norms of the stages the FPN reads
                if not n.startswith("highway.stage_norms.") or int(n.split(".")[2]) in model.backbone.neck.picked}
    assert in_backbone == expected
    assert trainable - {body + n for n in in_backbone} == {
        n for n, _ in model.named_parameters() if n.startswith(HEAD_PARTS[detector])
    }, "the neck, FPN and detector heads always train, and nothing else outside the backbone"

    sum(losses.values()).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:  # every trained tensor is used: DDP needs no find_unused_parameters
            assert param.grad is not None, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("method,family", PAIRS)
def test_every_method_trains_mask_rcnn_with_only_its_parameters_and_the_detector(method, family):
    _check_training_step(_detector(family, method), family, method, "maskrcnn")


@pytest.mark.parametrize("detector,family", [(d, f) for d in ("fasterrcnn", "retinanet") for f in ("vit", "convnext")])
def test_faster_rcnn_and_retinanet_on_every_family(detector, family):
    method = "lora" if family != "resnet" else "ssf"
    model = _detector(family, method, detector)
    assert model.deltavision.head == detector
    _check_training_step(model, family, method, detector)
    strides = model.backbone.strides
    assert all(b == 2 * a for a, b in zip(strides, strides[1:])) and len(strides) == 5, strides
    first = 2 * strides[0] if detector == "retinanet" else strides[0]
    assert len(model.backbone.neck.strides) == (3 if detector == "retinanet" else 4) and strides[0] == first // (
        2 if detector == "retinanet" else 1)


def test_retinanet_reads_strides_8_to_128_and_rcnn_4_to_64_on_swin():
    assert _detector("swin", "lora", "retinanet").backbone.strides == [8, 16, 32, 64, 128]
    rcnn = _detector("swin", "lora", "fasterrcnn")
    assert rcnn.backbone.strides == [4, 8, 16, 32, 64]
    assert [s[0] for s in rcnn.rpn.anchor_generator.sizes] == [32, 64, 128, 256, 512]  # torchvision's, 8x stride


@pytest.mark.parametrize("family", ["vit", "efficientnet"])
def test_e3va_detection_never_backpropagates_through_the_backbone(family):
    model = _detector(family, "e3va")
    assert model.deltavision.options["dense"] is True
    model.train()
    timm_model = model.backbone.body.backbone
    states = []
    handles = [m.register_forward_hook(lambda mod, a, out: states.append(torch.is_grad_enabled()))
               for name, m in timm_model.named_modules() if name]
    images, targets = _images_and_targets()
    losses = model(list(images), targets)
    for h in handles:
        h.remove()
    assert states and not any(states), "a backbone module ran with autograd on"
    sum(losses.values()).backward()
    assert all(p.grad is None for p in timm_model.parameters())
    assert all(p.grad is not None for p in model.backbone.body.highway.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["swin", "efficientnet"])
def test_e3va_feeds_its_stage_norms_to_the_fpn_with_no_second_norm(family):
    """E3VA's maps already end in the highway's trainable stage norms (Sec. 3.2): the detector adds none;
    in-backbone methods' raw stage maps get the detector's own LayerNorm per level."""
    e3va, lora = _detector(family, "e3va"), _detector(family, "lora")
    assert e3va.backbone.norms and all(isinstance(n, nn.Identity) for n in e3va.backbone.norms)
    assert not any(n.startswith("backbone.norms.") for n in trainable_names(e3va))
    assert all(not isinstance(n, nn.Identity) for n in lora.backbone.norms)


def test_images_are_resized_to_the_training_size_and_boxes_mapped_back():
    model = _detector("convnext", "ssf", "fasterrcnn").eval()
    assert model.transform.min_size == (IMAGE_SIZE,) and model.transform.max_size == IMAGE_SIZE
    seen = []
    model.backbone.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        outputs = model([torch.rand(3, 48, 80)])
    assert seen == [(1, 3, IMAGE_SIZE, IMAGE_SIZE)], "the backbone sees the training size, not 800 px"
    boxes = outputs[0]["boxes"]
    assert len(boxes) and boxes[:, 2].max() <= 80 and boxes[:, 3].max() <= 48 and boxes[:, 2].max() > IMAGE_SIZE


def _perturb(model: nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn_like(param))


@pytest.mark.parametrize("method,family", [("ssf", "swin"), ("ssf", "efficientnet"), ("lora", "vit")])
def test_folding_into_a_detector_backbone_is_exact(method, family):
    model = _detector(family, method, "fasterrcnn")
    _perturb(model)
    model.eval()
    model.roi_heads.score_thresh = 0.0  # keep every box: a full comparison
    images, _ = _images_and_targets()
    with torch.no_grad():
        before = model(list(images))
        merged = merge(model)
        after = merged(list(images))
    for b, a in zip(before, after):
        assert len(b["boxes"]) > 0 and len(b["boxes"]) == len(a["boxes"])
        assert torch.allclose(b["boxes"], a["boxes"], atol=1e-3) and torch.allclose(b["scores"], a["scores"], atol=1e-4)
        assert torch.equal(b["labels"], a["labels"])
    plain = plain_tiny(family, num_classes=0)
    body = merged.backbone.body
    assert type(body) is type(plain) and not hasattr(merged, "deltavision")
    assert sum(p.numel() for p in body.parameters()) == sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("method,family,detector", [("mona", "swin", "maskrcnn"), ("e3va", "convnext", "maskrcnn"),
                                                    ("vpt", "vit", "retinanet")])
def test_adapter_file_records_task_and_detector_and_reloads(method, family, detector, tmp_path):
    model = _detector(family, method, detector)
    _perturb(model, 0.02)
    model.eval()
    save_adapter(model, tmp_path, extra={"seed": 0})
    config = json.loads((tmp_path / "deltavision.json").read_text())
    task = "instance" if detector == "maskrcnn" else "detection"
    assert (config["task"], config["head"], config["head_options"]) == (task, detector, SMALL)
    loaded = load_adapter(tmp_path, pretrained=False).eval()
    images, _ = _images_and_targets(seed=3)
    with torch.no_grad():
        ours, theirs = model(list(images)), loaded(list(images))
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_detection_adapter_refuses_another_detector_or_size(tmp_path):
    save_adapter(_detector("convnext", "ssf", "fasterrcnn"), tmp_path)
    with pytest.raises(AdapterFileError, match="head='fasterrcnn'"):
        load_adapter(tmp_path, _detector("convnext", "ssf", "retinanet"))
    name, opts = TINY["convnext"]
    other = deltavision.create_model(name, "ssf", CLASSES, pretrained=False, backbone_options=opts, task="detection",
                                     head_options={"image_size": 64, "fpn_channels": 32})
    with pytest.raises(AdapterFileError, match="head_options"):
        load_adapter(tmp_path, other)


def test_export_refuses_a_detector_with_a_clear_error(tmp_path):
    from deltavision.export import ExportError, export_adapter

    save_adapter(_detector("convnext", "ssf", "fasterrcnn"), tmp_path / "adapter")
    with pytest.raises(ExportError, match="detection model: exporting torchvision's detectors"):
        export_adapter(tmp_path / "adapter", tmp_path / "model.onnx", "onnx", pretrained=False)
    assert not (tmp_path / "model.onnx").exists()


def test_unknown_detector_or_option_is_an_option_error():
    name, opts = TINY["convnext"]

    def build(**kwargs):
        return deltavision.create_model(name, "ssf", 3, pretrained=False, backbone_options=opts, **kwargs)

    with pytest.raises(MethodOptionError, match="unknown instance detector 'retinanet'"):
        build(task="instance", detector="retinanet")
    with pytest.raises(MethodOptionError, match="unknown detection detector 'yolo'"):
        build(task="detection", head="yolo")
    with pytest.raises(MethodOptionError, match="disagree"):
        build(task="detection", head="fasterrcnn", detector="retinanet")
    with pytest.raises(MethodOptionError, match="unknown detector option"):
        build(task="detection", head_options={"min_size": 800})
    assert isinstance(build(task="instance"), torch.nn.Module)


# --- metrics, loop, pictures ------------------------------------------------------------------------


class _Oracle(nn.Module):
    """Predicts the first ``keep`` ground-truth objects of each image, with score 1 and exact masks."""

    def __init__(self, targets: list[dict], keep: int):
        super().__init__()
        self.targets, self.keep, self.calls = targets, keep, 0
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        out = []
        for _ in images:
            t = self.targets[self.calls]
            self.calls += 1
            out.append({"boxes": t["boxes"][: self.keep], "labels": t["labels"][: self.keep],
                        "scores": torch.ones(min(self.keep, len(t["labels"]))),
                        "masks": t["masks"][: self.keep, None].float()})
        return out


@pytest.mark.parametrize("keep,expected", [(2, 100.0), (1, 100.0 * 51 / 101)])
def test_coco_ap_of_known_predictions(keep, expected):
    # keep=1: every image has one object of each class, only class 1's is found. Class 1: AP 100;
    # class 2: no detections, AP 0 -> mean 50. keep=2: all found, AP 100. (COCO's 101-point interpolation
    # gives exactly these.)  The 51/101 case is a single class with half the objects found.
    _, targets = _images_and_targets(batch=4)
    if keep == 1:
        targets = [{**t, "labels": torch.tensor([1, 1])} for t in targets]
    objective = DetectionObjective(["background", "a", "b"], masks=True)
    loader = [collate_detection([(torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE), t) for t in targets[:2]]),
              collate_detection([(torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE), t) for t in targets[2:]])]
    row = objective.evaluate(_Oracle(targets, keep), loader)
    for kind in ("box", "mask"):
        assert row[f"{kind}_ap"] == pytest.approx(expected, abs=0.01)
        assert row[f"{kind}_ap50"] == pytest.approx(expected, abs=0.01)


def test_instance_training_run_on_fashion_scenes_writes_ap_and_adapter(tmp_path):
    from deltavision.train import TrainConfig
    from deltavision.train.run import RunConfig, run_training

    name, opts = TINY["swin"]
    config = RunConfig(
        backbone=name, method="lora", data="fashion-scenes", out_dir=str(tmp_path), task="instance",
        image_size=IMAGE_SIZE, train_limit=4, val_limit=2, pretrained=False, backbone_options=opts,
        train=TrainConfig(epochs=1, batch_size=2, progress=False, lr=1e-3),
    )
    summary = run_training(config)
    assert 0.0 <= summary["box_ap"] <= 100.0 and 0.0 <= summary["mask_ap"] <= 100.0
    with open(tmp_path / "log.csv") as handle:
        row = next(csv.DictReader(handle))
    assert {"box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75", "train_loss"} <= set(row)
    assert float(row["train_loss"]) > 0 and (tmp_path / "curves.png").stat().st_size > 0
    config = json.loads((tmp_path / "adapter" / "deltavision.json").read_text())
    assert (config["task"], config["head"], config["head_options"]) == ("instance", "maskrcnn",
                                                                        {"image_size": IMAGE_SIZE})
    assert config["classes"][0] == "background" and config["num_classes"] == 11

    from PIL import Image

    from deltavision.data.scenes import load_scenes
    from deltavision.inference import evaluate_saved_adapter
    from deltavision.predict import predict_images

    scores = evaluate_saved_adapter(tmp_path / "adapter", None, 2, None, None, False, "cpu")
    assert scores["task"] == "instance" and scores["images"] == 2 and scores["mask_ap"] == summary["mask_ap"]
    photo = tmp_path / "scene.png"
    Image.fromarray(load_scenes("val", 2).images[0]).save(photo)
    (result,) = predict_images(tmp_path / "adapter", [photo], tmp_path / "drawn", pretrained=False,
                               score_threshold=0.0)
    drawn = Image.open(result["overlay"])
    assert drawn.size == Image.open(photo).size and result["detections"], "boxes are drawn at the image's own size"
    assert all(d["class"] in config["classes"][1:] and 0 <= d["box"][2] <= drawn.size[0] for d in result["detections"])


def test_draw_detections_paints_boxes_and_masks_above_the_threshold():
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    masks = torch.zeros(2, 1, 40, 40)
    masks[0, 0, 10:20, 10:20] = 0.9
    masks[1, 0, 25:35, 25:35] = 0.9
    prediction = {"boxes": torch.tensor([[5.0, 5.0, 25.0, 25.0], [22.0, 22.0, 38.0, 38.0]]),
                  "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.2]), "masks": masks}
    picture = torch.from_numpy(__import__("numpy").array(draw_detections(image, prediction, ["bg", "a", "b"])))
    colour = torch.tensor(class_colour(1), dtype=torch.uint8)
    assert torch.equal(picture[12, 5], colour), "the kept box's outline is drawn in its class colour"
    assert picture[15, 15].sum() > 0 and (picture[15, 15] != colour).any(), "its mask is blended in"
    assert picture[30, 30].sum() == 0 and picture[22, 30].sum() == 0, "the low-scoring detection is not drawn"


def test_dense_runs_default_to_at_most_1e_3_but_keep_an_explicit_lr():
    from deltavision.train import TrainConfig
    from deltavision.train.run import RunConfig, resolve_run

    name, opts = TINY["convnext"]

    def lr(task, given=None):
        config = RunConfig(backbone=name, method="e3va", data="fashion-scenes", out_dir="unused", task=task,
                           backbone_options=opts, image_size=IMAGE_SIZE, train=TrainConfig(lr=given))
        return resolve_run(config).train.lr

    assert get_method("e3va").default_lr == 1e-2
    assert (lr("classification"), lr("segmentation"), lr("instance"), lr("detection")) == (1e-2, 1e-3, 1e-3, 1e-3)
    assert (lr("segmentation", 5e-3), lr("detection", 5e-3)) == (5e-3, 5e-3)
