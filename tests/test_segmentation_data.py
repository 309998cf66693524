"""Segmentation data: folder layouts, bad input, fashion-scenes and joint augmentation."""

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from deltavision.data import scenes as scenes_module
from deltavision.data.bundled import load_fashion_mnist
from deltavision.data.scenes import ITEM_THRESHOLD, SCENE_CLASSES, generate_scenes, load_scenes, paste_item, scale_item
from deltavision.data.segmentation import (
    VOC_CLASSES,
    _apply,
    build_segmentation_datasets,
    make_segmentation_transforms,
)
from deltavision.errors import DataError

SIDE = 32
PLAIN = dict(mean=0.0, std=1.0, augment=False)


def photo_crop(index: int) -> np.ndarray:
    """A real SIDE x SIDE RGB crop of the astronaut photo."""
    return np.ascontiguousarray(skimage.data.astronaut()[index * SIDE : (index + 1) * SIDE, :SIDE])


def label_mask(index: int, high: int) -> np.ndarray:
    """A SIDE x SIDE uint8 mask of 8 px blocks with labels 0..high, one 255 (ignore) block."""
    rng = np.random.default_rng(index)
    blocks = rng.integers(0, high + 1, size=(4, 4)).astype(np.uint8)
    blocks[0, 0], blocks[3, 3] = 255, high
    return np.kron(blocks, np.ones((8, 8), dtype=np.uint8))


def write_pair(image_path, mask_path, index: int, mask: np.ndarray, palette: bool = False) -> None:
    """Write a photo crop and its mask (palette PNG if ``palette``, else grey PNG)."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo_crop(index)).save(image_path, quality=95)
    picture = Image.fromarray(mask, mode="L")
    if palette:
        picture = picture.convert("P")
        picture.putpalette(list(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8)))
    picture.save(mask_path)


def voc_folder(root, masks):
    """A Pascal VOC layout with the given masks: the first n-1 are train, the last val."""
    names = [f"2007_{i:06d}" for i in range(len(masks))]
    for i, (name, mask) in enumerate(zip(names, masks)):
        write_pair(root / "JPEGImages" / f"{name}.jpg", root / "SegmentationClass" / f"{name}.png", i, mask, palette=True)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(names[:-1]) + "\n")
    (sets / "val.txt").write_text(names[-1] + "\n")
    return root


def ade_folder(root, masks, classes=None):
    """An ADE20K layout: all masks in training, the last also in validation."""
    for split, chosen in (("training", masks), ("validation", masks[-1:])):
        for i, mask in enumerate(chosen):
            write_pair(root / "images" / split / f"ADE_{i}.jpg", root / "annotations" / split / f"ADE_{i}.png", i, mask)
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def generic_folder(root, masks, classes, subfolders=False):
    """images/ + masks/ + classes.txt, flat or with train/ and val/ subfolders (last mask in val)."""
    for i, mask in enumerate(masks):
        split = ("val" if i == len(masks) - 1 else "train") if subfolders else ""
        write_pair(root / "images" / split / f"img{i}.png", root / "masks" / split / f"img{i}.png", i, mask)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_voc_layout_reads_palette_indices_and_ignore(tmp_path):
    masks = [label_mask(i, 20) for i in range(3)]
    splits = build_segmentation_datasets(voc_folder(tmp_path, masks), SIDE, **PLAIN)
    assert splits.classes == VOC_CLASSES and len(splits.classes) == 21 and splits.ignore_index == 255
    assert (len(splits.train), len(splits.val)) == (2, 1)
    image, mask = splits.val[0]
    assert image.shape == (3, SIDE, SIDE) and image.dtype == torch.float32
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(masks[2].astype(np.int64)))
    assert {20, 255} <= set(mask.unique().tolist())


def test_voc_layout_found_inside_vocdevkit(tmp_path):
    voc_folder(tmp_path / "VOCdevkit" / "VOC2012", [label_mask(i, 20) for i in range(2)])
    splits = build_segmentation_datasets(tmp_path, SIDE, **PLAIN)
    assert splits.classes == VOC_CLASSES and (len(splits.train), len(splits.val)) == (1, 1)


def test_ade20k_layout_reduces_zero_label(tmp_path):
    masks = [label_mask(i, 150) for i in range(2)]
    masks[1][:8, 8:16] = 0  # "other"
    splits = build_segmentation_datasets(ade_folder(tmp_path, masks), SIDE, **PLAIN)
    assert splits.classes == [f"class_{i}" for i in range(150)]
    _, mask = splits.val[0]
    raw = masks[1].astype(np.int64)
    expected = np.where((raw == 0) | (raw == 255), 255, raw - 1)
    assert torch.equal(mask, torch.from_numpy(expected))
    assert mask[0, 8].item() == 255 and mask[-1, -1].item() == 149


def test_ade20k_class_names_from_file(tmp_path):
    names = [f"thing{i}" for i in range(150)]
    splits = build_segmentation_datasets(ade_folder(tmp_path, [label_mask(0, 150)], names), SIDE, **PLAIN)
    assert splits.classes == names


def test_generic_layout_split_by_fraction_and_by_subfolders(tmp_path):
    masks = [label_mask(i, 2) for i in range(5)]
    flat = build_segmentation_datasets(generic_folder(tmp_path / "flat", masks, ["bg", "a", "b"]), SIDE, **PLAIN, val_fraction=0.4)
    assert flat.classes == ["bg", "a", "b"] and (len(flat.train), len(flat.val)) == (3, 2)
    sub = build_segmentation_datasets(generic_folder(tmp_path / "sub", masks, ["bg", "a", "b"], subfolders=True), SIDE, **PLAIN)
    assert (len(sub.train), len(sub.val)) == (4, 1)
    assert torch.equal(sub.val[0][1], torch.from_numpy(masks[4].astype(np.int64)))
    limited = build_segmentation_datasets(tmp_path / "sub", SIDE, **PLAIN, train_limit=2)
    assert len(limited.train) == 2


def test_mask_of_wrong_size_names_the_file(tmp_path):
    root = generic_folder(tmp_path, [label_mask(i, 2) for i in range(3)], ["bg", "a", "b"], subfolders=True)
    bad = root / "masks" / "val" / "img2.png"
    Image.fromarray(np.zeros((SIDE, SIDE + 4), np.uint8)).save(bad)
    splits = build_segmentation_datasets(root, SIDE, **PLAIN)
    with pytest.raises(DataError, match="img2.png"):
        splits.val[0]


def test_label_above_class_count_names_the_file(tmp_path):
    masks = [label_mask(i, 20) for i in range(3)]
    masks[2][-1, -1] = 21  # VOC has 21 classes, 0..20
    splits = build_segmentation_datasets(voc_folder(tmp_path, masks), SIDE, **PLAIN)
    with pytest.raises(DataError, match=r"2007_000002\.png.*label 21"):
        splits.val[0]


def test_missing_mask_names_the_file(tmp_path):
    root = ade_folder(tmp_path, [label_mask(i, 150) for i in range(2)])
    (root / "annotations" / "training" / "ADE_1.png").unlink()
    with pytest.raises(DataError, match="ADE_1.png"):
        build_segmentation_datasets(root, SIDE, **PLAIN)


def test_colour_mask_names_the_file(tmp_path):
    root = generic_folder(tmp_path, [label_mask(i, 2) for i in range(3)], ["bg", "a", "b"], subfolders=True)
    Image.fromarray(photo_crop(0)).save(root / "masks" / "val" / "img2.png")
    with pytest.raises(DataError, match=r"img2\.png is a RGB image"):
        build_segmentation_datasets(root, SIDE, **PLAIN).val[0]


def test_folder_items_batch_in_a_data_loader(tmp_path):
    masks = [label_mask(i, 20) for i in range(3)]
    splits = build_segmentation_datasets(voc_folder(tmp_path, masks), 24, 0.5, 0.25, augment=True)
    images, targets = next(iter(torch.utils.data.DataLoader(splits.train, batch_size=2)))
    assert images.shape == (2, 3, 24, 24) and targets.shape == (2, 24, 24) and targets.dtype == torch.int64
    assert set(targets.unique().tolist()) <= set(range(21)) | {255}


def test_unknown_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not a segmentation dataset"):
        build_segmentation_datasets(tmp_path, SIDE, **PLAIN)


# --- fashion-scenes -----------------------------------------------------------------------------


def test_fashion_scenes_are_deterministic_per_seed():
    first, again, other = generate_scenes("train", 4, 64, seed=0), generate_scenes("train", 4, 64, seed=0), generate_scenes("train", 4, 64, seed=1)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.instance_map, again.instance_map)
    assert not np.array_equal(first.images, other.images)
    fewer = generate_scenes("train", 2, 64, seed=0)
    assert np.array_equal(fewer.images, first.images[:2])  # a larger count extends a smaller one


def test_pasted_item_mask_is_exactly_its_bright_pixels():
    item = scale_item(load_fashion_mnist().images[0], 60)
    image = np.zeros((80, 80, 3), np.uint8)
    instance_map = np.zeros((80, 80), np.uint8)
    paste_item(image, instance_map, item, 3, top=7, left=11)
    expected = np.zeros((80, 80), bool)
    expected[7:67, 11:71] = item > ITEM_THRESHOLD
    assert np.array_equal(instance_map == 3, expected) and expected.sum() > 500
    assert np.array_equal(image[expected], np.repeat(item[item > ITEM_THRESHOLD][:, None], 3, axis=1))


def test_generated_masks_cover_only_bright_grey_item_pixels():
    scenes = generate_scenes("val", 6, 64, seed=0)
    semantic = scenes.semantic_masks()
    items = semantic > 0
    grey = (scenes.images[..., 0] == scenes.images[..., 1]) & (scenes.images[..., 1] == scenes.images[..., 2])
    assert items.any() and np.all(grey[items]) and np.all(scenes.images[..., 0][items] > ITEM_THRESHOLD)
    assert semantic.max() < len(SCENE_CLASSES) == 11
    masks, labels, boxes = scenes.instances(0)
    assert len(masks) == len(labels) == len(boxes) >= 1
    for mask, label, (x0, y0, x1, y1) in zip(masks, labels, boxes.long().tolist()):
        rows, cols = np.nonzero(mask.numpy())
        assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max(), rows.max())
        assert np.all(semantic[0][mask.numpy()] == label.item())


def test_fashion_scenes_cached_second_call_is_identical(monkeypatch):
    first = load_scenes("train", 5, 64, seed=3)
    assert scenes_module.cache_path("train", 5, 64, 3).is_file()
    monkeypatch.setattr(scenes_module, "generate_scenes", lambda *args: pytest.fail("regenerated instead of cached"))
    second = load_scenes("train", 5, 64, seed=3)
    for name in ("images", "instance_map", "instance_labels"):
        assert np.array_equal(getattr(first, name), getattr(second, name))


def test_fashion_scenes_datasets():
    splits = build_segmentation_datasets("fashion-scenes", 48, 0.5, 0.5, train_limit=6, val_limit=3)
    assert splits.classes == SCENE_CLASSES and splits.classes[0] == "background"
    assert (len(splits.train), len(splits.val)) == (6, 3)
    image, mask = splits.train[0]
    assert image.shape == (3, 48, 48) and mask.shape == (48, 48) and mask.dtype == torch.int64


# --- joint augmentation ------------------------------------------------------------------------


def interior(mask: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Pixels whose whole (2 radius + 1)-square neighbourhood has one label (away from blurred edges)."""
    values = mask[None, None].float()
    high = torch.nn.functional.max_pool2d(values, 2 * radius + 1, stride=1, padding=radius)
    low = -torch.nn.functional.max_pool2d(-values, 2 * radius + 1, stride=1, padding=radius)
    return (high == low)[0, 0]


def test_augmentation_keeps_image_and_mask_aligned():
    mask = np.kron(np.random.default_rng(0).integers(0, 10, size=(4, 4)), np.ones((16, 16), np.int64))
    image = np.repeat((mask * 25 + 10).astype(np.uint8)[None], 3, axis=0)  # pixel value encodes the label
    train_tf, _ = make_segmentation_transforms(40, 0.0, 1.0, augment=True)
    torch.manual_seed(0)
    padded = checked = 0
    for _ in range(12):
        out_image, out_mask = _apply(train_tf, torch.from_numpy(image), torch.from_numpy(mask))
        decoded = torch.round((out_image[0] * 255 - 10) / 25).long()
        valid = out_mask != 255
        inside = valid & interior(out_mask)
        assert torch.equal(decoded[inside], out_mask[inside])
        checked += int(inside.sum())
        assert torch.all(out_image[:, ~valid] == 0)  # padding: black image, ignored mask
        padded += int((~valid).sum())
    assert checked > 4000 and padded > 0  # some draws shrank the image below the crop and were padded


def test_eval_resize_keeps_mask_labels():
    mask = label_mask(0, 20).astype(np.int64)
    _, eval_tf = make_segmentation_transforms(50, 0.0, 1.0, augment=True)
    _, out_mask = _apply(eval_tf, torch.from_numpy(photo_crop(0)).permute(2, 0, 1), torch.from_numpy(mask))
    assert out_mask.shape == (50, 50) and set(out_mask.unique().tolist()) <= set(np.unique(mask).tolist())
