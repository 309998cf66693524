"""SSF: insertion points (DESIGN.md, "Method notes"), parameter count and exact folding."""

import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import deltavision
from deltavision.errors import IncompatibleMethodError
from deltavision.methods import get_method

from conftest import FAMILIES, METHODS, NUM_CLASSES, TINY, plain_tiny, random_images, tiny_model

TRANSFORMER_BLOCK_POINTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def _vit_points():
    blocks = [f"blocks.{i}.{p}" for i in range(2) for p in TRANSFORMER_BLOCK_POINTS]
    return {"patch_embed.proj", *blocks, "norm"}


def _swin_points():
    blocks = ["layers.0.blocks.0", "layers.1.blocks.0", "layers.2.blocks.0", "layers.2.blocks.1"]
    per_block = [f"{b}.{p}" for b in blocks for p in TRANSFORMER_BLOCK_POINTS]
    # each PatchMerging norm is wrapped; its bias-less reduction is not
    return {"patch_embed.proj", "patch_embed.norm", *per_block, "layers.1.downsample.norm",
            "layers.2.downsample.norm", "norm"}


def _convnext_points():
    blocks = [f"stages.{s}.blocks.0.{p}" for s in range(4) for p in ("conv_dw", "norm", "mlp.fc1", "mlp.fc2")]
    downsamples = [f"stages.{s}.downsample.{i}" for s in (1, 2, 3) for i in (0, 1)]  # LayerNorm2d, Conv2d
    return {"stem.0", "stem.1", *blocks, *downsamples, "head.norm"}


def _efficientnet_points():
    # convolutions have no bias: SSF goes into every BatchNormAct2d, between the norm and its activation
    plain = plain_tiny("efficientnet")
    return {f"{name}.drop" for name, m in plain.named_modules() if isinstance(m, BatchNormAct2d)}


def _resnet_points():
    # convolutions have no bias: SSF follows every BatchNorm2d (stem, branches, projection shortcuts)
    plain = plain_tiny("resnet")
    return {name for name, m in plain.named_modules() if isinstance(m, nn.BatchNorm2d)}


EXPECTED_POINTS = {
    "vit": _vit_points,
    "swin": _swin_points,
    "convnext": _convnext_points,
    "efficientnet": _efficientnet_points,
    "resnet": _resnet_points,
}


def _ssf_points(model) -> dict[str, int]:
    """{module name that SSF follows: channels}, read from the parameter names."""
    return {
        n[: -len(".ssf.scale")]: p.numel() for n, p in model.named_parameters() if n.endswith(".ssf.scale")
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_ssf_insertion_points(family):
    model = tiny_model(family, "ssf")
    points = _ssf_points(model)
    expected = EXPECTED_POINTS[family]()
    assert set(points) == expected, (
        f"unexpected: {sorted(set(points) - expected)}, missing: {sorted(expected - set(points))}"
    )
    shifts = {n[: -len(".ssf.shift")]: p.numel() for n, p in model.named_parameters() if n.endswith(".ssf.shift")}
    assert shifts == points


def test_ssf_on_qkv_has_one_scale_per_output_row():
    model = tiny_model("vit", "ssf")
    width = TINY["vit"][1]["embed_dim"]
    assert _ssf_points(model)["blocks.0.attn.qkv"] == 3 * width


def test_swin_patch_merging_reduction_is_not_wrapped():
    plain = plain_tiny("swin")
    reduction = plain.get_submodule("layers.1.downsample.reduction")
    assert isinstance(reduction, nn.Linear) and reduction.bias is None
    model = tiny_model("swin", "ssf")
    assert isinstance(model.get_submodule("layers.1.downsample.reduction"), nn.Linear)
    assert "layers.1.downsample.norm" in _ssf_points(model)


@pytest.mark.parametrize("bn_name,act_type", [("bn1", nn.ReLU6), ("blocks.1.0.bn3", nn.Identity)])
def test_efficientnet_ssf_sits_between_batchnorm_and_activation(bn_name, act_type):
    """y = act(scale * BN(x) + shift): numerically, with the activation's clamp visible."""
    model = tiny_model("efficientnet", "ssf").eval()
    bn = model.get_submodule(bn_name)
    assert isinstance(bn, BatchNormAct2d) and isinstance(bn.act, act_type)
    scale = model.get_parameter(f"{bn_name}.drop.ssf.scale")
    shift = model.get_parameter(f"{bn_name}.drop.ssf.shift")
    channels = bn.num_features
    x = torch.randn(2, channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        scale.copy_(torch.linspace(-3, 3, channels))
        shift.copy_(torch.linspace(-2, 4, channels))
        normed = nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        affine = normed * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        expected = affine.clamp(0, 6) if act_type is nn.ReLU6 else affine
        assert torch.allclose(bn(x), expected, atol=1e-5)
        if act_type is nn.ReLU6:
            shift.fill_(100.0)  # SSF after the activation would give 100 + relu6(...), not 6
            assert torch.equal(bn(x), torch.full_like(x, 6.0))
            shift.fill_(-100.0)
            assert torch.equal(bn(x), torch.zeros_like(x))


def test_vit_base_ssf_trainable_parameters(vit_base_ssf):
    """ViT-B/16, 100 classes: per block 2 x (norm1 768 + qkv 2304 + proj 768 + norm2 768 + fc1 3072 + fc2 768),
    plus patch embedding and final norm 2 x 768 each, plus the 768 x 100 + 100 head."""
    per_block = 2 * (4 * 768 + 2304 + 3072)
    expected = 12 * per_block + 2 * (2 * 768) + 768 * 100 + 100
    assert expected == 282_724
    counts = deltavision.count_parameters(vit_base_ssf)
    assert counts["trainable"] == expected
    # ViT-B/16 has 86,567,656 parameters with its 1000-class head; ours has a 100-class head plus SSF
    assert counts["total"] == 86_567_656 - (768 * 1000 + 1000) + (768 * 100 + 100) + (expected - 76_900)


def _perturb(model, seed=0):
    """Move every trainable tensor (and BatchNorm statistics) away from its init so folding is not trivial.

    LoRA factors move less: their product enters every weight it touches, and a
    0.3 step on both makes a random-init EfficientNet chaotic enough that float32
    rounding alone moves the output (in float64 the same merge agrees to 1e-9)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                step = 0.05 if "lora_" in name else 0.3
                param.add_(step * torch.randn(param.shape, generator=g))
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=g))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))


MERGE_GRID = [(m, f) for m in METHODS for f in FAMILIES]


@pytest.mark.parametrize("method,family", MERGE_GRID)
def test_merge_is_exact_and_gives_the_plain_timm_model(method, family):
    spec = get_method(method)
    if spec.families is not None and family not in spec.families:
        with pytest.raises(IncompatibleMethodError):
            tiny_model(family, method)
        return
    model = tiny_model(family, method)
    if not spec.folds:
        with pytest.raises(IncompatibleMethodError):
            deltavision.merge(model)
        return
    _perturb(model)
    images = random_images(batch=3, seed=5)
    model.eval()
    with torch.no_grad():
        reference = model(images)
    merged = deltavision.merge(copy.deepcopy(model)).eval()
    with torch.no_grad():
        folded = merged(images)
    assert reference.abs().max() > 1e-2, "outputs too small for the comparison to mean anything"
    assert (folded - reference).abs().max().item() <= 1e-4

    plain = plain_tiny(family).eval()
    assert [type(m) for m in merged.modules()] == [type(m) for m in plain.modules()]
    assert [n for n, _ in merged.named_modules()] == [n for n, _ in plain.named_modules()]
    assert deltavision.count_parameters(merged)["total"] == deltavision.count_parameters(plain)["total"]
    assert list(merged.state_dict()) == list(plain.state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    assert not hasattr(merged, "deltavision")

    # a plain timm model holding the merged weights computes the same function
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(plain(images), folded, atol=1e-6)

    with pytest.raises(TypeError):
        deltavision.merge(merged)


@pytest.mark.parametrize("family", FAMILIES)
def test_ssf_merge_really_changes_the_weights(family):
    """Folding non-trivial SSF parameters must change the backbone's weights (no silent no-op)."""
    model = tiny_model(family, "ssf")
    original = {k.replace(".op.", "."): v.clone() for k, v in model.state_dict().items() if ".ssf." not in k}
    _perturb(model)
    merged = deltavision.merge(model).state_dict()
    changed = [
        k for k, v in merged.items()
        if k.endswith((".weight", ".bias")) and k in original and not torch.equal(v, original[k])
    ]
    points = EXPECTED_POINTS[family]()
    # every insertion point folds into a weight of its own (efficientnet: into the BatchNorm holding it)
    folded_modules = {k.rpartition(".")[0] for k in changed}
    targets = {p[: -len(".drop")] if p.endswith(".drop") else p for p in points}
    assert targets <= folded_modules, sorted(targets - folded_modules)[:5]


def test_merge_of_a_plain_timm_model_is_a_type_error():
    with pytest.raises(TypeError, match="create_model"):
        deltavision.merge(timm.create_model(*TINY["vit"][:1], num_classes=NUM_CLASSES, **TINY["vit"][1]))


def test_scale_shift_gradients_match_plain_autograd():
    """SSF keeps its output for backward and recomputes its input: gradients equal plain autograd's."""
    from deltavision.methods.ssf import ScaleShift

    for shape, channel_dim in (((2, 7, 5), -1), ((2, 5, 3, 4), 1)):
        layer = ScaleShift(5, channel_dim, init_std=0.3).double()
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (x,))
        view = [1] * len(shape)
        view[channel_dim] = -1
        reference = x * layer.scale.view(view) + layer.shift.view(view)
        assert torch.allclose(layer(x), reference)
        grads = torch.autograd.grad(layer(x).square().sum(), (x, layer.scale, layer.shift))
        expected = torch.autograd.grad(reference.square().sum(), (x, layer.scale, layer.shift))
        for got, want in zip(grads, expected):
            assert torch.allclose(got, want)


def test_merge_restores_inplace_activation_on_efficientnet():
    """While SSF trains, BatchNormAct2d's activation may not overwrite the SSF output; merge restores it."""
    model = tiny_model("efficientnet", "ssf")
    norm_acts = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert norm_acts and not any(getattr(m.act, "inplace", False) for m in norm_acts)
    merged = deltavision.merge(model)
    flags = [getattr(m, "inplace", None) for m in merged.modules()]
    assert flags == [getattr(m, "inplace", None) for m in plain_tiny("efficientnet").modules()]
    merged_norm_acts = [m for m in merged.modules() if isinstance(m, BatchNormAct2d)]
    assert all(m.act.inplace for m in merged_norm_acts if hasattr(m.act, "inplace"))
