"""Tests for deltavision.data: bundled sets, image folders, transforms, limits and data errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import transforms as T

import deltavision.data.bundled as bundled
from deltavision.data import (
    ArrayImageDataset,
    Augmentation,
    DatasetSplits,
    build_datasets,
    load_rgb_image,
    make_transforms,
    stratified_split,
    stratified_subset,
    write_image_folder,
)
from deltavision.errors import ArtifactExistsError, DataError

GREY_STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
UNIT_STATS = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def few_digits():
    """Eight sklearn digits of each of the classes 0, 1, 2 (as 0..16 floats, like sklearn)."""
    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == digit)[:8] for digit in range(3)])
    return digits.images[keep], digits.target[keep], ["zero", "one", "two"]


@pytest.fixture
def split_folder(tmp_path, few_digits):
    """A PNG image folder in the train/ + val/ layout."""
    return write_image_folder(tmp_path / "split", *few_digits)


@pytest.fixture
def flat_folder(tmp_path, few_digits):
    """A PNG image folder with class subfolders directly under the root."""
    return write_image_folder(tmp_path / "flat", *few_digits, split=False)


def build(source, **kwargs) -> DatasetSplits:
    """build_datasets with small images and grey-friendly statistics unless overridden."""
    options = {"image_size": 16, **GREY_STATS, **kwargs}
    return build_datasets(source, **options)


def first_png(folder: Path) -> Path:
    """Some PNG inside ``folder``."""
    return next(iter(sorted(folder.rglob("*.png"))))


# --- bundled datasets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "digits",
        "mnist5k",
        "fashion-mnist",  # the Debian package dataset-fashion-mnist, installed by README's set-up and .ci/run
    ],
)
def test_bundled_source_builds_items_of_the_right_shape(source):
    splits = build(source, train_limit=40, val_limit=20)
    assert (len(splits.train), len(splits.val), splits.num_classes) == (40, 20, 10)
    for dataset in (splits.train, splits.val):
        image, label = dataset[0]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert -1.0 - 1e-6 <= image.min() and image.max() <= 1.0 + 1e-6
        assert isinstance(label, int) and 0 <= label < 10


def test_fashion_mnist_uses_official_test_split_as_val_and_its_class_names():
    splits = build("fashion-mnist", train_limit=10, val_fraction=0.5)
    assert len(splits.val) == 10_000
    assert splits.classes[0] == "T-shirt/top" and splits.classes[-1] == "Ankle boot"
    assert any(isinstance(step, T.RandomHorizontalFlip) for step in splits.train.transform.transforms)


def test_mnist5k_is_split_by_val_fraction_stratified():
    splits = build("mnist5k", val_fraction=0.2)
    assert (len(splits.train), len(splits.val)) == (4000, 1000)
    val_share = np.bincount(splits.val.labels) / np.bincount(np.concatenate([splits.train.labels, splits.val.labels]))
    assert np.allclose(val_share, 0.2, atol=0.01)


@pytest.mark.parametrize("source", ["digits", "mnist5k"])
def test_digit_datasets_are_not_flipped(source):
    splits = build(source, train_limit=10, val_limit=10)
    assert not any(isinstance(step, T.RandomHorizontalFlip) for step in splits.train.transform.transforms)


def test_bundled_names_are_case_and_underscore_insensitive():
    assert bundled.bundled_name("Fashion_MNIST") == "fashion-mnist"
    assert bundled.bundled_name("./digits") is None


def test_a_path_named_like_a_bundled_set_is_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        build(Path("digits"))


# --- grey to RGB, normalisation -----------------------------------------------------------


def test_grey_images_become_three_identical_channels():
    splits = build("digits", train_limit=5, val_limit=5)
    for dataset in (splits.train, splits.val):
        image, _ = dataset[0]
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_eval_items_are_normalised_with_the_given_mean_and_std():
    raw = build("digits", augment=False, val_limit=30, **UNIT_STATS).val
    shifted = build("digits", augment=False, val_limit=30, mean=(0.25,) * 3, std=(0.5,) * 3).val
    unit_image, _ = raw[3]
    assert 0.0 <= unit_image.min() and unit_image.max() <= 1.0 and unit_image.max() > 0.9
    assert torch.allclose(shifted[3][0], (unit_image - 0.25) / 0.5, atol=1e-6)


def test_array_dataset_keeps_uint8_and_converts_per_item():
    images = np.zeros((2, 8, 8), dtype=np.uint8)
    images[1] = 255
    _, eval_tf = make_transforms(4, **UNIT_STATS, augment=False)
    dataset = ArrayImageDataset(images, np.array([0, 1]), eval_tf)
    assert dataset.images.dtype == np.uint8
    assert torch.equal(dataset[1][0], torch.ones(3, 4, 4)) and dataset[1][1] == 1


# --- transforms ---------------------------------------------------------------------------


def _steps(transform) -> list[str]:
    return [type(step).__name__ for step in transform.transforms]


def test_make_transforms_train_and_eval():
    train_tf, eval_tf = make_transforms(24, **GREY_STATS, augment=True)
    image = Image.new("RGB", (40, 30), (10, 20, 30))
    assert train_tf(image).shape == eval_tf(image).shape == (3, 24, 24)
    crop = next(step for step in train_tf.transforms if type(step).__name__ == "RandomResizedCropAndInterpolation")
    assert crop.scale == (0.6, 1.0)  # the mild default, not timm's (0.08, 1)
    assert "RandomHorizontalFlip" in _steps(train_tf)
    assert not {"RandAugment", "RandomErasing", "ColorJitter"} & set(_steps(train_tf))  # nothing more by default


def test_make_transforms_without_augmentation_or_flip():
    train_tf, eval_tf = make_transforms(8, **GREY_STATS, augment=False)
    assert train_tf is eval_tf
    no_flip, _ = make_transforms(8, **GREY_STATS, augment=True, flip=False)
    assert "RandomHorizontalFlip" not in _steps(no_flip)


def test_the_recipe_adds_randaugment_random_erasing_and_colour_jitter():
    recipe = Augmentation(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    train_tf, _ = make_transforms(16, **GREY_STATS, augment=True, augmentation=recipe)
    steps = _steps(train_tf)
    assert "RandAugment" in steps and "RandomErasing" in steps and "ColorJitter" not in steps
    erasing = train_tf.transforms[steps.index("RandomErasing")]
    assert erasing.probability == 0.25
    jitter, _ = make_transforms(16, **GREY_STATS, augment=True, augmentation=Augmentation(color_jitter=0.4))
    assert "ColorJitter" in _steps(jitter)
    assert train_tf(Image.new("RGB", (20, 20), (90, 30, 200))).shape == (3, 16, 16)


def test_folders_are_evaluated_with_the_centre_crop_and_bundled_sets_whole(three_class_folder):
    """crop_pct reaches a folder's evaluation transform; the bundled sets (objects filling 8-28 px frames)
    are resized whole and bilinearly whatever the backbone's crop and interpolation."""
    whole = build("digits", augment=False, val_limit=5).val
    asked_to_crop = build("digits", augment=False, val_limit=5, crop_pct=0.5, interpolation="bicubic").val
    assert torch.equal(asked_to_crop[0][0], whole[0][0])  # no crop, and bilinear upscaling
    plain = build(three_class_folder, augment=False, val_fraction=0.5).val
    cropped = build(three_class_folder, augment=False, val_fraction=0.5, crop_pct=0.5).val
    assert cropped[0][0].shape == plain[0][0].shape and not torch.equal(cropped[0][0], plain[0][0])


def test_randaugment_at_full_magnitude_posterizes_without_failing():
    """timm's increasing posterize asks for 0 bits at magnitude 10, which Pillow refuses mid-epoch."""
    train_tf, _ = make_transforms(16, **GREY_STATS, augment=True, augmentation=Augmentation("rand-m10-inc1"))
    policy = next(step for step in train_tf.transforms if type(step).__name__ == "RandAugment")
    posterize = next(op for op in policy.ops if op.name == "PosterizeIncreasing")
    posterize.prob = 1.0
    image = Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3))
    pixels = np.asarray(posterize(image))
    assert set(np.unique(pixels)) <= {0, 128}  # one bit kept


def test_evaluation_crops_the_centre_by_the_backbones_crop_pct():
    """A 64 px image with a 4 px white frame: crop_pct 0.875 at 56 px resizes to 64 and cuts the frame off;
    crop_pct 1 (a plain resize) keeps it."""
    pixels = np.full((64, 64, 3), 255, dtype=np.uint8)
    pixels[4:-4, 4:-4] = 0
    image = Image.fromarray(pixels)
    _, cropped = make_transforms(56, **UNIT_STATS, augment=False, crop_pct=0.875, interpolation="bicubic")
    _, resized = make_transforms(56, **UNIT_STATS, augment=False)
    assert cropped(image).abs().max() == 0.0
    assert resized(image)[:, 0].min() > 0.9
    assert "Resize" in _steps(cropped) and "CenterCrop" in _steps(cropped)
    assert cropped.transforms[0].interpolation.value == "bicubic"


# --- limits and splits --------------------------------------------------------------------


def test_limits_are_stratified_and_deterministic_for_a_seed():
    first = build("digits", train_limit=100, val_limit=50, seed=3)
    again = build("digits", train_limit=100, val_limit=50, seed=3)
    other = build("digits", train_limit=100, val_limit=50, seed=4)
    assert np.array_equal(first.train.images, again.train.images)
    assert np.array_equal(first.val.images, again.val.images)
    assert not np.array_equal(first.train.images, other.train.images)
    assert np.array_equal(np.bincount(first.train.labels), [10] * 10)
    assert np.array_equal(np.bincount(first.val.labels), [5] * 10)


def test_stratified_subset_is_proportional_on_imbalanced_labels():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    chosen = stratified_subset(labels, 100, seed=0)
    assert np.array_equal(np.bincount(labels[chosen]), [60, 30, 10])
    assert np.array_equal(chosen, stratified_subset(labels, 100, seed=0))
    assert len(stratified_subset(labels, None, seed=0)) == len(stratified_subset(labels, 5000, seed=0)) == 1000


def test_stratified_split_is_disjoint_and_complete():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    train, val = stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    assert np.array_equal(np.bincount(labels[val]), [10, 6, 4])


@pytest.mark.parametrize("bad", [{"train_limit": 0}, {"val_limit": -3}, {"val_fraction": 0.0}, {"val_fraction": 1.5}])
def test_bad_limits_and_fractions_are_data_errors(bad):
    with pytest.raises(DataError):
        build("digits", **bad)


# --- image folders ------------------------------------------------------------------------


def test_image_folder_with_train_and_val_subfolders(split_folder):
    splits = build(split_folder)
    assert splits.classes == ["one", "two", "zero"]
    assert (len(splits.train), len(splits.val)) == (18, 6)
    image, label = splits.val[0]
    assert image.shape == (3, 16, 16) and label in (0, 1, 2)
    assert torch.equal(image[0], image[2])


def test_image_folder_with_class_subfolders_is_split_by_val_fraction(flat_folder):
    splits = build(flat_folder, val_fraction=0.25, seed=0)
    assert (len(splits.train), len(splits.val)) == (18, 6)
    assert np.array_equal(np.bincount(splits.val.labels), [2, 2, 2])
    assert not set(splits.train.paths) & set(splits.val.paths)
    again = build(flat_folder, val_fraction=0.25, seed=0)
    assert again.val.paths == splits.val.paths


def test_image_folder_limits(split_folder):
    splits = build(split_folder, train_limit=6, val_limit=3)
    assert np.array_equal(np.bincount(splits.train.labels), [2, 2, 2])
    assert np.array_equal(np.bincount(splits.val.labels), [1, 1, 1])


def test_images_of_any_mode_become_rgb(tmp_path):
    grey = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).astype(np.uint8)
    modes = {
        "grey.png": Image.fromarray(grey, mode="L"),
        "rgba.png": Image.new("RGBA", (8, 8), (200, 100, 50, 128)),
        "palette.gif": Image.fromarray(grey, mode="L").convert("P"),
        "alpha_grey.png": Image.new("LA", (8, 8), (90, 255)),
        "deep.png": Image.fromarray(grey.astype(np.uint16) * 257),
        "cmyk.jpg": Image.new("CMYK", (8, 8), (0, 50, 100, 0)),
        "binary.bmp": Image.new("1", (8, 8), 1),
    }
    class_dir = tmp_path / "data" / "things"
    class_dir.mkdir(parents=True)
    for name, image in modes.items():
        image.save(class_dir / name)
    (tmp_path / "data" / "others").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "others" / "x.jpeg")
    splits = build(tmp_path / "data", val_fraction=0.1, augment=False)
    for dataset in (splits.train, splits.val):
        assert all(dataset[i][0].shape == (3, 16, 16) for i in range(len(dataset)))
    assert load_rgb_image(class_dir / "rgba.png").mode == "RGB"


def test_sixteen_bit_images_are_rescaled_not_clipped(tmp_path):
    values = np.full((4, 4), 100 * 257, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert np.asarray(load_rgb_image(tmp_path / "deep.png"))[0, 0].tolist() == [100, 100, 100]


def test_write_image_folder_refuses_a_non_empty_folder(split_folder, few_digits):
    with pytest.raises(ArtifactExistsError):
        write_image_folder(split_folder, *few_digits)


# --- image folder errors ------------------------------------------------------------------


def test_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build(tmp_path / "nowhere")


def test_empty_folder_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        build(tmp_path / "empty")


def test_class_folder_without_images_is_a_data_error(flat_folder):
    (flat_folder / "three").mkdir()
    (flat_folder / "three" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="three.*no images"):
        build(flat_folder)


def test_corrupt_image_is_a_data_error_naming_the_file(split_folder):
    corrupt = split_folder / "val" / "one" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DataError, match="broken.png"):
        build(split_folder)


def test_image_that_fails_to_decode_later_is_a_data_error_naming_the_file(split_folder):
    splits = build(split_folder)
    victim = splits.train.paths[0]
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(DataError, match=victim.name):
        splits.train[0]


def test_mismatched_train_and_val_classes_is_a_data_error(split_folder):
    (split_folder / "train" / "extra").mkdir()
    Image.new("L", (8, 8)).save(split_folder / "train" / "extra" / "a.png")
    with pytest.raises(DataError, match="extra"):
        build(split_folder)


def test_train_without_val_is_a_data_error(split_folder):
    (split_folder / "val").rename(split_folder / "validation-old")
    with pytest.raises(DataError, match="no val/"):
        build(split_folder)


# --- Fashion-MNIST without the Debian package ---------------------------------------------


@pytest.fixture
def no_debian_fashion_mnist(tmp_path, monkeypatch):
    """Pretend the Debian package is absent and the cache is empty."""
    monkeypatch.setattr(bundled, "FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    monkeypatch.setenv("DELTAVISION_CACHE", str(tmp_path / "cache"))


def test_fashion_mnist_offline_fails_fast_naming_the_package(no_debian_fashion_mnist, monkeypatch):
    monkeypatch.setattr(bundled, "can_connect", lambda url, timeout=0: False)
    started = time.monotonic()
    with pytest.raises(DataError, match="dataset-fashion-mnist") as error:
        build("fashion-mnist")
    assert "pip" in str(error.value)
    assert time.monotonic() - started < 5


def test_fashion_mnist_failed_download_is_a_data_error(no_debian_fashion_mnist, monkeypatch):
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(bundled, "can_connect", lambda url, timeout=0: True)
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    started = time.monotonic()
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        build("fashion-mnist")
    assert time.monotonic() - started < 10


def test_unreachable_address_is_reported_quickly():
    started = time.monotonic()
    assert not bundled.can_connect("http://127.0.0.1:9/", timeout=2)
    assert time.monotonic() - started < 3


def test_corrupt_idx_file_is_a_data_error_naming_it(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        bundled.read_idx(bad)
