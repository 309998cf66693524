"""Data sources beyond folders: Hugging Face datasets (saved folders, parquet), torchvision, VTAB-1k lists."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import struct  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from vtab_layout import write_vtab_task  # noqa: E402

from deltavision.data import build_datasets  # noqa: E402
from deltavision.errors import DataError  # noqa: E402

UNIT = {"image_size": 8, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "augment": False}
CLASSES = ["cat", "dog", "owl"]


def coded_image(label: int, index: int) -> Image.Image:
    """A flat 12x12 RGB image whose red value encodes its label and green value its index."""
    return Image.fromarray(np.full((12, 12, 3), (40 * label, index, 7), dtype=np.uint8))


def decoded(item) -> tuple[int, int]:
    """(label read from the pixels, label given) of a dataset item built with UNIT statistics."""
    tensor, label = item
    return int(round(float(tensor[0].mean()) * 255 / 40)), label


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets cache (parquet loads write one) inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def hub_dataset(count: int = 12, label_feature=None, labels=None) -> datasets.Dataset:
    """``count`` coded images in an ``img`` column (Image) and a ``kind`` column (ClassLabel unless given)."""
    labels = [i % 3 for i in range(count)] if labels is None else labels
    features = datasets.Features(
        {"img": datasets.Image(), "kind": label_feature or datasets.ClassLabel(names=CLASSES), "note": datasets.Value("string")}
    )
    images = [coded_image(label, i) for i, label in enumerate(labels)]
    return datasets.Dataset.from_dict({"img": images, "kind": labels, "note": ["x"] * count}, features=features)


# --- Hugging Face datasets ----------------------------------------------------------------------


def test_saved_dataset_dict_uses_train_and_test_and_finds_columns_by_type(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": hub_dataset(12), "test": hub_dataset(6)}).save_to_disk(str(saved))
    splits = build_datasets(f"hf:{saved}", **UNIT)
    assert splits.classes == CLASSES
    assert (len(splits.train), len(splits.val)) == (12, 6)
    assert [decoded(splits.train[i]) for i in range(12)] == [(i % 3, i % 3) for i in range(12)]
    assert splits.train[0][0].shape == (3, 8, 8) and splits.train[0][0].dtype == torch.float32


def test_saved_single_dataset_is_split_deterministically_by_class(tmp_path):
    saved = tmp_path / "single"
    hub_dataset(30).save_to_disk(str(saved))
    first = build_datasets(str(saved), val_fraction=0.2, **UNIT)  # a saved folder needs no hf: prefix
    again = build_datasets(f"hf:{saved}", val_fraction=0.2, **UNIT)
    assert (len(first.train), len(first.val)) == (24, 6)
    val_labels = sorted(label for _, label in first.val)
    assert val_labels == [0, 0, 1, 1, 2, 2]
    assert [decoded(item) for item in first.val] == [decoded(item) for item in again.val]


def test_parquet_file_loads_with_classes_from_its_class_label(tmp_path):
    path = tmp_path / "pets.parquet"
    hub_dataset(20).to_parquet(str(path))
    splits = build_datasets(str(path), val_fraction=0.25, **UNIT)
    assert splits.classes == CLASSES
    assert len(splits.train) + len(splits.val) == 20
    assert all(pixels == label for pixels, label in map(decoded, splits.train))


def test_columns_named_by_flags_and_plain_integer_labels(tmp_path):
    saved = tmp_path / "plain"
    dataset = hub_dataset(12, label_feature=datasets.Value("int64"))
    dataset = dataset.rename_columns({"img": "picture", "kind": "target"})
    datasets.DatasetDict({"train": dataset, "validation": dataset.select(range(3))}).save_to_disk(str(saved))
    options = {"image_column": "picture", "label_column": "target"}
    splits = build_datasets(f"hf:{saved}", data_options=options, **UNIT)
    assert splits.classes == ["0", "1", "2"]
    assert len(splits.val) == 3
    assert [decoded(item) for item in splits.val] == [(0, 0), (1, 1), (2, 2)]


def test_missing_named_column_is_one_clear_error(tmp_path):
    saved = tmp_path / "saved"
    hub_dataset(6).save_to_disk(str(saved))
    with pytest.raises(DataError, match=r"has no column 'species' \(--label-column\); it has img, kind, note"):
        build_datasets(f"hf:{saved}", data_options={"label_column": "species"}, **UNIT)


def test_no_label_column_asks_for_the_flag(tmp_path):
    saved = tmp_path / "unlabelled"
    hub_dataset(6).remove_columns("kind").save_to_disk(str(saved))
    with pytest.raises(DataError, match="no ClassLabel column; name the label column with --label-column"):
        build_datasets(f"hf:{saved}", **UNIT)


def test_label_out_of_range_names_the_value(tmp_path):
    saved = tmp_path / "unlabelled-test"
    test = hub_dataset(4, labels=[0, 1, -1, 2])  # -1: ClassLabel's "no label"
    datasets.DatasetDict({"train": hub_dataset(6), "test": test}).save_to_disk(str(saved))
    with pytest.raises(DataError, match=r"\(evaluation\): label column 'kind' has value -1, outside 0..2"):
        build_datasets(f"hf:{saved}", **UNIT)


def test_unknown_hub_dataset_offline_fails_with_one_data_error():
    with pytest.raises(DataError, match="Cannot load Hugging Face dataset no-such-org/no-such-set"):
        build_datasets("hf:no-such-org/no-such-set", **UNIT)


# --- torchvision ----------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 IDX file, as the MNIST release has them."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_root(tmp_path) -> Path:
    """A torchvision MNIST folder (MNIST/raw/*-ubyte) holding 10 training and 5 test digits."""
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", 10), ("t10k", 5)):
        labels = np.arange(count) % 10
        images = np.stack([np.full((28, 28), 20 * label, dtype=np.uint8) for label in labels])
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return tmp_path / "tv"


def test_torchvision_mnist_from_its_raw_files(mnist_root):
    splits = build_datasets("torchvision:mnist", data_options={"data_root": str(mnist_root)}, **UNIT)
    assert (len(splits.train), len(splits.val)) == (10, 5)
    assert splits.classes[3] == "3 - three"
    for tensor, label in [splits.train[i] for i in range(10)] + [splits.val[i] for i in range(5)]:
        assert tensor.shape == (3, 8, 8)
        assert float(tensor.mean()) * 255 == pytest.approx(20 * label, abs=1)


def test_torchvision_dataset_not_there_says_how_to_download(tmp_path):
    with pytest.raises(DataError, match=r"torchvision FashionMNIST is not in .*pass --download to fetch it"):
        build_datasets("torchvision:FashionMNIST", data_options={"data_root": str(tmp_path)}, **UNIT)


def test_torchvision_needs_a_data_root_and_a_known_name(tmp_path):
    with pytest.raises(DataError, match="needs --data-root DIR"):
        build_datasets("torchvision:CIFAR10", **UNIT)
    with pytest.raises(DataError, match="torchvision has no dataset 'cifar11'"):
        build_datasets("torchvision:cifar11", data_options={"data_root": str(tmp_path)}, **UNIT)


# --- VTAB-1k lists ------------------------------------------------------------------------------------


def test_vtab_task_trains_on_train800val200_and_scores_test(tmp_path):
    task = write_vtab_task(tmp_path, "eurosat", labels=3)
    splits = build_datasets(f"vtab:{task}", **UNIT)
    assert splits.classes == [str(label) for label in range(10)]  # EuroSAT has 10 classes, whatever is listed
    assert (len(splits.train), len(splits.val)) == (8, 4)
    assert [label for _, label in splits.val] == [2, 0, 1, 2]
    assert [path.name for path in splits.val.paths] == ["0008.png", "0009.png", "0010.png", "0011.png"]


def test_vtab_tune_protocol_reads_train800_and_val200(tmp_path):
    task = write_vtab_task(tmp_path, "my_task", labels=3)
    splits = build_datasets(f"vtab:{task}:tune", **UNIT)
    assert (len(splits.train), len(splits.val)) == (6, 2)
    assert splits.classes == ["0", "1", "2"]  # an unknown task: labels up to the largest listed


def test_vtab_missing_image_names_list_and_file(tmp_path):
    task = write_vtab_task(tmp_path, "dtd")
    (task / "images" / "0009.png").unlink()
    with pytest.raises(DataError, match=r"test.txt lists .*0009.png, which does not exist"):
        build_datasets(f"vtab:{task}", **UNIT)


def test_vtab_label_out_of_range_is_refused(tmp_path):
    task = write_vtab_task(tmp_path, "kitti")
    (task / "test.txt").write_text("images/0008.png 4\n")  # KITTI-Dist has 4 classes: 0..3
    with pytest.raises(DataError, match=r"test.txt gives 0008.png label 4, outside 0..3 \(the task has 4 classes\)"):
        build_datasets(f"vtab:{task}", **UNIT)


def test_vtab_bad_line_and_missing_list_are_named(tmp_path):
    task = write_vtab_task(tmp_path, "svhn")
    (task / "train800val200.txt").write_text("images/0000.png 1\nimages/0001.png one\n")
    with pytest.raises(DataError, match=r"train800val200.txt:2: expected 'relative/image/path label'"):
        build_datasets(f"vtab:{task}", **UNIT)
    (task / "train800val200.txt").write_text("images/0000.png 1\n")
    (task / "test.txt").unlink()
    with pytest.raises(DataError, match=r"VTAB-1k list .*test.txt is missing"):
        build_datasets(f"vtab:{task}:final", **UNIT)


def test_unknown_data_option_is_refused(tmp_path):
    task = write_vtab_task(tmp_path, "dtd")
    with pytest.raises(DataError, match="Unknown data option"):
        build_datasets(f"vtab:{task}", data_options={"imag_column": "x"}, **UNIT)


def flips(dataset) -> bool:
    """Whether a dataset's transform contains a random horizontal flip."""
    from torchvision import transforms as T

    return any(isinstance(step, T.RandomHorizontalFlip) for step in dataset.transform.transforms)


def test_vtab_and_digit_sets_are_never_flipped_but_hub_images_are(tmp_path, mnist_root):
    augmented = {**UNIT, "augment": True}
    task = write_vtab_task(tmp_path, "dsprites_ori")  # a flip would change an orientation label
    assert not flips(build_datasets(f"vtab:{task}", **augmented).train)
    mnist = build_datasets("torchvision:MNIST", data_options={"data_root": str(mnist_root)}, **augmented)
    assert not flips(mnist.train)
    saved = tmp_path / "saved"
    hub_dataset(6).save_to_disk(str(saved))
    assert flips(build_datasets(str(saved), **augmented).train)


def test_mist_edge_reads_hub_images_as_png_items(tmp_path):
    import io

    from deltavision.mist.edge.client import labelled_images

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": hub_dataset(6), "test": hub_dataset(3)}).save_to_disk(str(saved))
    images = labelled_images(str(saved))
    assert images.classes == CLASSES and (len(images.train), len(images.val)) == (6, 3)
    for index, item in enumerate(images.val):
        pixels = np.asarray(Image.open(io.BytesIO(item.encoded)))
        assert item.label == index % 3 and pixels[0, 0].tolist() == [40 * (index % 3), index, 7]
