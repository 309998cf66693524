"""Detection data: COCO JSON and Pascal VOC XML folders made here, fashion-scenes instances, bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.ops import masks_to_boxes

from deltavision.data.detection import build_detection_datasets
from deltavision.errors import DataError
from deltavision.train.objectives import collate_detection

WIDTH, HEIGHT = 40, 32


def _photo(seed: int) -> Image.Image:
    """A real photo crop (scikit-image's astronaut), WIDTH x HEIGHT."""
    import skimage.data

    top = 40 * seed
    return Image.fromarray(skimage.data.astronaut()[top : top + 320, 100:500]).resize((WIDTH, HEIGHT))


def _coco_annotations(images: list[dict], annotations: list[dict]) -> dict:
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "rocket"}, {"id": 3, "name": "helmet"}]}


def _square(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


TRAIN_ANNOTATIONS = [
    {"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 2, 16, 12], "segmentation": _square(4, 2, 16, 12),
     "area": 192, "iscrowd": 0},
    {"id": 2, "image_id": 1, "category_id": 7, "bbox": [20, 16, 10, 10], "segmentation": _square(20, 16, 10, 10),
     "area": 100, "iscrowd": 0},
    {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 40, 32], "segmentation": _square(0, 0, 40, 32),
     "area": 1280, "iscrowd": 1},
    {"id": 4, "image_id": 2, "category_id": 7, "bbox": [10, 10, 8, 6], "segmentation": _square(10, 10, 8, 6),
     "area": 48, "iscrowd": 0},
]


def _write_coco(root: Path, train_annotations: list[dict], train_files=("a.png", "b.png")) -> Path:
    for split, names in (("train", ("a.png", "b.png")), ("val", ("c.png",))):
        (root / split).mkdir(parents=True, exist_ok=True)
        for seed, name in enumerate(names):
            _photo(seed).save(root / split / name)
    (root / "annotations").mkdir(exist_ok=True)
    train_images = [{"id": i + 1, "file_name": name, "width": WIDTH, "height": HEIGHT}
                    for i, name in enumerate(train_files)]
    val_images = [{"id": 1, "file_name": "c.png", "width": WIDTH, "height": HEIGHT}]
    val_annotations = [{**TRAIN_ANNOTATIONS[0], "image_id": 1}]
    (root / "annotations" / "instances_train.json").write_text(json.dumps(_coco_annotations(train_images,
                                                                                            train_annotations)))
    (root / "annotations" / "instances_val.json").write_text(json.dumps(_coco_annotations(val_images,
                                                                                          val_annotations)))
    return root


def test_coco_folder_gives_boxes_labels_and_masks_at_the_training_size(tmp_path):
    root = _write_coco(tmp_path, TRAIN_ANNOTATIONS)
    with pytest.warns(UserWarning, match="skipped 1 crowd annotation"):
        splits = build_detection_datasets(root, image_size=32, masks=True, augment=False)
    assert splits.classes == ["background", "helmet", "rocket"]  # by category id: 3, 7
    assert (len(splits.train), len(splits.val)) == (2, 1)
    image, target = splits.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    # 40 x 32 resized to 32 x 32: x scales by 0.8
    assert torch.allclose(target["boxes"], torch.tensor([[3.2, 2.0, 16.0, 14.0], [16.0, 16.0, 24.0, 26.0]]))
    assert target["labels"].tolist() == [1, 2]
    masks = target["masks"]
    assert masks.shape == (2, 32, 32) and masks.dtype == torch.uint8
    assert torch.allclose(masks_to_boxes(masks) + torch.tensor([0, 0, 1, 1]), target["boxes"], atol=1.0)
    crowd_image = splits.train[1][1]
    assert crowd_image["labels"].tolist() == [2], "the crowd box is left out"
    images, targets = collate_detection([splits.train[0], splits.train[1]])
    assert images.shape == (2, 3, 32, 32) and [len(t["boxes"]) for t in targets] == [2, 1]


BAD_COCO = [
    ({"bbox": [30, 2, 20, 5]}, r"annotation 1 of image a.png: box \[30, 2, 50, 7\] \(xyxy\) reaches outside the 40x32"),
    ({"bbox": [4, 2, 0, 5]}, r"annotation 1 of image a.png: degenerate box"),
    ({"category_id": 99}, r"annotation 1 of image a.png: unknown category id 99"),
]


@pytest.mark.parametrize("change,message", BAD_COCO)
def test_bad_coco_annotations_name_the_file_and_annotation(tmp_path, change, message):
    root = _write_coco(tmp_path, [{**TRAIN_ANNOTATIONS[0], **change}])
    with pytest.raises(DataError, match=message) as error:
        build_detection_datasets(root, image_size=32)
    assert "instances_train.json" in str(error.value)


def test_a_missing_coco_image_is_named(tmp_path):
    root = _write_coco(tmp_path, TRAIN_ANNOTATIONS[:2], train_files=("a.png", "gone.png"))
    with pytest.raises(DataError, match=r"instances_train.json: image 2 names .*gone.png, which is missing"):
        build_detection_datasets(root, image_size=32)


def _write_voc(root: Path, objects: dict[str, list[tuple[str, tuple[int, int, int, int]]]]) -> Path:
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for seed, (name, items) in enumerate(objects.items()):
        _photo(seed).save(root / "JPEGImages" / f"{name}.jpg")
        xml = "".join(
            f"<object><name>{cls}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for cls, b in items
        )
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>{WIDTH}</width><height>{HEIGHT}</height>"
            f"<depth>3</depth></size>{xml}</annotation>"
        )
    names = list(objects)
    (root / "ImageSets/Main/train.txt").write_text("\n".join(names[:-1]) + "\n")
    (root / "ImageSets/Main/val.txt").write_text(names[-1] + "\n")
    return root


def test_voc_folder_gives_boxes_and_the_twenty_classes(tmp_path):
    _write_voc(tmp_path / "VOCdevkit" / "VOC2007",
                      {"000001": [("dog", (5, 3, 20, 30)), ("person", (21, 1, 40, 32))], "000002": [("cat", (1, 1, 10, 10))]})
    splits = build_detection_datasets(tmp_path, image_size=40, augment=False)  # the archive's folder works too
    assert splits.classes[0] == "background" and len(splits.classes) == 21
    _, target = splits.train[0]
    # VOC counts pixels from 1: xmin 5 is the left edge at 4; 40 x 32 -> 40 x 40 stretches y by 1.25
    assert torch.allclose(target["boxes"], torch.tensor([[4.0, 2.5, 20.0, 37.5], [20.0, 0.0, 40.0, 40.0]]))
    assert [splits.classes[i] for i in target["labels"]] == ["dog", "person"]
    assert splits.val[0][1]["labels"].tolist() == [splits.classes.index("cat")]


def test_bad_voc_annotations_are_named(tmp_path):
    root = _write_voc(tmp_path / "a", {"1": [("dog", (5, 3, 20, 30)), ("unicorn", (1, 1, 5, 5))], "2": []})
    with pytest.raises(DataError, match=r"1.xml: object 2: unknown class 'unicorn'"):
        build_detection_datasets(root, image_size=32)
    root = _write_voc(tmp_path / "b", {"1": [("dog", (5, 3, 20, 60))], "2": []})
    with pytest.raises(DataError, match=r"1.xml: object 1: box .* reaches outside the 40x32 image"):
        build_detection_datasets(root, image_size=32)
    root = _write_voc(tmp_path / "c", {"1": [("dog", (5, 3, 20, 30))], "2": []})
    with pytest.raises(DataError, match="boxes, not instance masks"):
        build_detection_datasets(root, image_size=32, masks=True)


def test_fashion_scenes_instances_match_their_masks_with_and_without_augmentation():
    for augment in (False, True):
        torch.manual_seed(0)
        splits = build_detection_datasets("fashion-scenes", image_size=96, masks=True, train_limit=6, val_limit=2,
                                          augment=augment)
        assert splits.classes[0] == "background" and len(splits.classes) == 11
        for index in range(len(splits.train)):
            image, target = splits.train[index]
            assert image.shape == (3, 96, 96) and 0 <= image.min() and image.max() <= 1
            assert len(target["labels"]) >= 1 and (target["labels"] >= 1).all() and (target["labels"] <= 10).all()
            masks = target["masks"]
            assert masks.shape == (len(target["labels"]), 96, 96) and masks.flatten(1).any(1).all()
            tight = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
            # nearest-neighbour masks against exactly scaled boxes: a pixel per resize (two when augmented, <= 1.7x)
            assert torch.allclose(tight, target["boxes"], atol=3.5 if augment else 1.5), (tight, target["boxes"])


def test_not_a_detection_folder(tmp_path):
    with pytest.raises(DataError, match="not a detection dataset"):
        build_detection_datasets(tmp_path, image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="neither 'fashion-scenes' nor a folder"):
            build_detection_datasets(tmp_path / "nope", image_size=32)
