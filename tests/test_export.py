"""`deltavision export`: ONNX and TorchScript files that compute what the adapted model computes.

Each file is checked here independently of the exporter's own check: onnxruntime
(or torch.jit.load) runs it on batches of other sizes than the traced one, and
its logits are compared with the unmerged PyTorch model rebuilt from the
adapter. The backbones are the tiny seeded ones of conftest (``--checkpoint``).
"""

import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import deltavision as dv
from deltavision import export as export_module
from deltavision.cli import app
from deltavision.errors import ArtifactExistsError, ExportError
from deltavision.export import export_adapter

from conftest import place_in_cache, plain_tiny, random_images, tiny_model

TOLERANCE = 1e-4
# (family, method, recorded run input size or None): methods that fold export the merged plain timm graph,
# the others their modules (ONNX export takes 2-4 s of CPU per tiny model, so the table is short). The ResNet adapter records a run at 48 px, which the export must use.
CASES = [
    ("vit", "ssf", None), ("vit", "adaptformer", None), ("vit", "e3va", None), ("vit", "vpt", None),
    ("resnet", "bitfit", 48),
]
HUB_CASE = ("vit", "mona", None)  # exported through the CLI from the hub cache


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, backbone_checkpoint):
    """(family, method) -> adapter folder of a tiny model on the family's seeded checkpoint."""
    folder = tmp_path_factory.mktemp("export-adapters")
    made = {}
    for family, method, size in [*CASES, HUB_CASE]:
        model = tiny_model(family, method, checkpoint=backbone_checkpoint(family))
        _perturb_method_tensors(model)
        extra = {"data": {"image_size": size, "mean": [0.5] * 3, "std": [0.5] * 3}} if size else None
        made[family, method] = dv.save_adapter(model, folder / f"{family}-{method}", extra=extra)
    return made


def _perturb_method_tensors(model):
    """Move every trained tensor off its initial value (LoRA's B and Mona's up-projections start at zero, which
    would make the method a no-op that an export could drop unnoticed)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def reference_logits(adapter, checkpoint, images):
    model = dv.load_adapter(adapter, checkpoint=checkpoint).eval()
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("family,method,size", CASES, ids=[f"{f}-{m}" for f, m, _ in CASES])
def test_onnx_export_matches_pytorch_with_a_dynamic_batch(family, method, size, adapters, backbone_checkpoint,
                                                          tmp_path, monkeypatch):
    checkpoint = backbone_checkpoint(family)
    exported_modules = []
    export_onnx = export_module.EXPORTERS["onnx"]
    monkeypatch.setitem(export_module.EXPORTERS, "onnx",
                        lambda model, example, path: exported_modules.append(model) or export_onnx(model, example, path))
    out = tmp_path / "model.onnx"
    result = export_adapter(adapters[family, method], out, "onnx", checkpoint=checkpoint)
    expected_size = size or 32  # the run's, else the tiny ViT's fixed img_size
    assert result.path == out and result.image_size == expected_size
    assert result.merged == dv.methods.get_method(method).folds
    assert 0 <= result.max_difference <= TOLERANCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary file left

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (images_input,) = session.get_inputs()
    assert images_input.name == "images" and images_input.shape[1:] == [3, expected_size, expected_size]
    assert isinstance(images_input.shape[0], str)  # a named, dynamic batch axis
    for batch in (1, 5):
        images = random_images(batch, expected_size, seed=batch)
        (onnx_logits,) = session.run(["logits"], {"images": images.numpy()})
        difference = np.abs(onnx_logits - reference_logits(adapters[family, method], checkpoint, images).numpy())
        assert difference.max() <= TOLERANCE, (batch, difference.max())

    exported = exported_modules[0]
    plain = plain_tiny(family)
    if result.merged:  # the plain timm graph: timm's own module with timm's parameters, nothing of the method
        assert type(exported) is type(plain) and not hasattr(exported, "deltavision")
        assert [(n, p.shape) for n, p in exported.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    else:
        assert exported.deltavision.method == method
        assert sum(p.numel() for p in exported.parameters()) > sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("method", ["ssf", "vpt"])
def test_torchscript_export_matches_pytorch(method, adapters, backbone_checkpoint, tmp_path):
    checkpoint = backbone_checkpoint("vit")
    out = tmp_path / "model.pt"
    result = export_adapter(adapters["vit", method], out, "torchscript", checkpoint=checkpoint)
    assert result.max_difference <= TOLERANCE and result.merged == (method == "ssf")
    loaded = torch.jit.load(str(out))
    for batch in (1, 4):
        images = random_images(batch, 32, seed=batch)
        with torch.no_grad():
            difference = (loaded(images) - reference_logits(adapters["vit", method], checkpoint, images)).abs().max()
        assert difference <= TOLERANCE


def test_image_size_flag_overrides_the_run_size(adapters, backbone_checkpoint, tmp_path):
    result = export_adapter(adapters["resnet", "bitfit"], tmp_path / "model.pt", "torchscript", image_size=40,
                            checkpoint=backbone_checkpoint("resnet"))
    assert result.image_size == 40


def test_an_export_that_differs_from_pytorch_is_not_written(adapters, backbone_checkpoint, tmp_path, monkeypatch):
    run = export_module.RUNNERS["torchscript"]
    monkeypatch.setitem(export_module.RUNNERS, "torchscript", lambda path, images: run(path, images) + 1e-3)
    with pytest.raises(ExportError, match=r"differs from PyTorch by up to 0\.001.*model\.pt was not written"):
        export_adapter(adapters["vit", "ssf"], tmp_path / "model.pt", "torchscript",
                       checkpoint=backbone_checkpoint("vit"))
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite_and_unknown_formats(adapters, tmp_path):
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(ArtifactExistsError, match="already exists; pass --overwrite"):
        export_adapter(adapters["vit", "ssf"], existing, "onnx")
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(ExportError, match="unknown export format 'tflite'; choose one of onnx, torchscript"):
        export_adapter(adapters["vit", "ssf"], tmp_path / "model.tflite", "tflite")


def test_onnx_export_without_the_export_extra_says_what_to_install(adapters, backbone_checkpoint, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(ExportError, match=r"ONNX export needs onnxscript: pip install 'deltavision\[export\]'"):
        export_adapter(adapters["vit", "ssf"], tmp_path / "model.onnx", "onnx", checkpoint=backbone_checkpoint("vit"))
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_an_hf_hub_adapter_and_prints_path_and_difference(adapters, backbone_checkpoint, hub_cache,
                                                                      tmp_path):
    place_in_cache(hub_cache, "deltavision-tests/tiny-mona", adapters["vit", "mona"])
    out = tmp_path / "mona.onnx"
    checkpoint = backbone_checkpoint("vit")
    result = CliRunner().invoke(app, ["export", "hf-hub:deltavision-tests/tiny-mona", "--out", str(out),
                                      "--checkpoint", str(checkpoint)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.startswith(f"wrote {out} (onnx, with the method's modules, input N x 3 x 32 x 32); "
                           "max logit difference from PyTorch "), text
    printed = float(text.rsplit(" ", 1)[-1])
    assert 0 <= printed <= TOLERANCE
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = random_images(3, 32)
    (onnx_logits,) = session.run(["logits"], {"images": images.numpy()})
    expected = reference_logits(adapters["vit", "mona"], checkpoint, images).numpy()
    assert np.abs(onnx_logits - expected).max() <= TOLERANCE
