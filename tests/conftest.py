"""Shared tiny configurations, offline environment and real-asset fixtures.

Every test runs offline: HF_HUB_OFFLINE must be set before huggingface_hub is
first imported (it reads the variable at import time), hence the module-level
``setdefault`` here, which pytest imports before any test module.
"""

import hashlib
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import huggingface_hub.constants  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

import deltavision  # noqa: E402
from deltavision.data import write_image_folder  # noqa: E402

# The models here are tiny: one intra-op thread is as fast as two on an idle machine and avoids the
# OpenMP oversubscription that makes a 32 px EfficientNet forward ~100x slower when other processes
# share the two cores. CLI subprocesses get the same setting through OMP_NUM_THREADS (see test_cli.py).
torch.set_num_threads(1)

# family -> (timm name, options that make a tiny random-init model of that family).
# tf_efficientnet_lite0 hard-codes its channel multiplier (passing one is a TypeError), so the
# EfficientNet entry is the real architecture (3.4M params) used at 32 px, which is fast enough.
TINY = {
    "vit": ("vit_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, window_size=2, embed_dim=16, depths=(1, 1, 2), num_heads=(1, 2, 2)),
    ),
    "convnext": ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))),
    "efficientnet": ("tf_efficientnet_lite0", {}),
    # Bottleneck blocks (so LoRA has its default 1x1 targets); every stage opens with a projection
    # block and the last stage also has one block with an identity skip. timm zero-initialises each
    # branch's last BatchNorm, which would make every branch a no-op that no test could see through.
    "resnet": ("resnet50", dict(layers=(1, 1, 1, 2), channels=(8, 16, 32, 64), zero_init_last=False)),
}
FAMILIES = list(TINY)
IMAGE_SIZE = 32
NUM_CLASSES = 5

# Read at collection time, so a newly registered method is tested automatically.
METHODS = deltavision.list_methods()

# The parameter-name prefix of each family's classifier.
CLASSIFIER = {"vit": "head.", "swin": "head.fc.", "convnext": "head.fc.", "efficientnet": "classifier.", "resnet": "fc."}



def head_prefix(model: nn.Module, family: str) -> str:
    """The parameter-name prefix of ``model``'s classifier; wrapper models (e3va, vpt) own the timm
    model as ``backbone``."""
    return ("backbone." if isinstance(getattr(model, "backbone", None), nn.Module) else "") + CLASSIFIER[family]


NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def tiny_model(family: str, method: str, num_classes: int = NUM_CLASSES, checkpoint=None, **method_options):
    """deltavision model on the tiny random-init (or ``checkpoint``) backbone of ``family``.

    deltavision starts a new classifier at zero; here it gets small random
    weights instead, so that comparisons of logits see what the body computes.
    """
    name, opts = TINY[family]
    model = deltavision.create_model(
        name, method, num_classes, pretrained=False, checkpoint=checkpoint, backbone_options=opts, **method_options
    )
    classifier = model.get_classifier()
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in classifier.parameters():
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def plain_tiny(family: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    name, opts = TINY[family]
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **opts)


def random_images(batch: int = 2, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def file_snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """{relative path: (bytes, mtime_ns)} of every file under ``folder``."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session", autouse=True)
def offline_environment(tmp_path_factory):
    """A private DELTAVISION_CACHE and no hub access for the whole session (subprocesses inherit both)."""
    cache = tmp_path_factory.mktemp("deltavision-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DELTAVISION_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield cache


# --- real assets ---------------------------------------------------------------------------------

DIGITS_PER_CLASS = 8


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """Real handwritten digits (sklearn, 8x8), 8 per class, written as a train/ + val/ PNG folder (60 + 20)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == c)[:DIGITS_PER_CLASS] for c in range(10)])
    root = tmp_path_factory.mktemp("assets") / "digits"
    return write_image_folder(
        root, digits.images[keep], digits.target[keep], [str(c) for c in range(10)], val_fraction=0.25
    )


@pytest.fixture(scope="session")
def three_class_folder(tmp_path_factory) -> Path:
    """Real digits 0, 1 and 2 only (flat class-folder layout): a dataset with another class count."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == c)[:6] for c in range(3)])
    root = tmp_path_factory.mktemp("assets") / "three"
    return write_image_folder(root, digits.images[keep], digits.target[keep], ["0", "1", "2"], split=False)


@pytest.fixture(scope="session")
def corrupt_image_folder(tmp_path_factory) -> Path:
    """Two classes of real digits where one PNG is truncated garbage."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == c)[:4] for c in range(2)])
    root = tmp_path_factory.mktemp("assets") / "corrupt"
    write_image_folder(root, digits.images[keep], digits.target[keep], ["0", "1"], split=False)
    victim = sorted((root / "1").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:20])
    return root


@pytest.fixture(scope="session")
def empty_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("empty-data")


@pytest.fixture(scope="session")
def backbone_checkpoint(tmp_path_factory):
    """family -> a local .safetensors state dict of a seeded random-init tiny timm model (1000 classes).

    Building deltavision models from it gives identical frozen weights every time.
    """
    folder = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            torch.manual_seed(1234)
            name, opts = TINY[family]
            model = timm.create_model(name, pretrained=False, **opts)
            path = folder / f"{family}.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            made[family] = path
        return made[family]

    return get


@pytest.fixture(scope="session")
def vit_base_ssf():
    """ViT-B/16 (random init) with SSF and a 100-class head: the paper's configuration."""
    torch.manual_seed(0)
    return deltavision.create_model("vit_base_patch16_224", "ssf", 100, pretrained=False)


# --- the Hugging Face Hub cache ------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub (this process and its subprocesses) uses."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import time, so patched here
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def place_in_cache(cache, repo_id, folder, revision="main"):
    """Put the files of ``folder`` into ``cache`` as a snapshot of ``repo_id`` at ``revision``; return its commit."""
    digest = hashlib.sha1()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    commit = digest.hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit
