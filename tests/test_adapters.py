"""Adapter methods on every family they support: Mona, Houlsby, AdaptFormer, LoRA, VPT.

Each test checks the behaviour a paper (or DESIGN.md) promises against an independent reference:
a hand-written forward built from timm's own sub-modules, the parameter formulae, or the plain
timm model carrying the same weights.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltavision
from deltavision.anatomy import describe
from deltavision.anatomy.layout import Grid
from deltavision.errors import IncompatibleMethodError, MethodOptionError
from deltavision.methods.adapters import Bottleneck, SerialAdapter
from deltavision.methods.lora import LoRAConv1x1, LoRALinear
from deltavision.methods.mona import Mona, mona_parameter_count

from conftest import (
    FAMILIES,
    NUM_CLASSES,
    TINY,
    head_prefix,
    plain_tiny,
    random_images,
    tiny_model,
    trainable_names,
)

VIT_NAME, VIT_OPTS = TINY["vit"]


# --- helpers -------------------------------------------------------------------------------------


def _vit(method: str, backbone=None, **method_options):
    """A tiny ViT with extra ``backbone`` options (reg tokens, dynamic size, depth, pooling...)."""
    return deltavision.create_model(
        VIT_NAME, method, NUM_CLASSES, pretrained=False, backbone_options={**VIT_OPTS, **(backbone or {})},
        **method_options,
    )


def _head_count(model, family) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(head_prefix(model, family)))


def _perturb_trainable(model, seed=0, scale=0.2, only=None):
    """Move trainable tensors away from their init so adapters are no longer identities."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and (only is None or only(name)):
                param.add_(scale * torch.randn(param.shape, generator=g))
    return model


def _eval_out(model, x=None):
    model.eval()
    with torch.no_grad():
        return model(random_images(batch=2, seed=3) if x is None else x)


def _block_io(model, family):
    """[(block module, its input, its output)] of every block during one eval forward."""
    anatomy = describe(model)
    blocks = [model.get_submodule(b.name) for b in anatomy.blocks]
    seen = {}

    def pre(module, args):
        seen.setdefault(id(module), [None, None])[0] = args[0].detach()

    def post(module, args, out):
        seen[id(module)][1] = out.detach()

    handles = [b.register_forward_pre_hook(pre) for b in blocks] + [b.register_forward_hook(post) for b in blocks]
    _eval_out(model)
    for h in handles:
        h.remove()
    return anatomy, [(b, *seen[id(b)]) for b in blocks]


def _attn_branch(block, family, x):
    """timm's attention residual branch (Block.forward / SwinTransformerBlock.forward)."""
    if family == "swin":
        return block.drop_path1(block._attn(block.norm1(x)))
    return block.drop_path1(block.ls1(block.attn(block.norm1(x))))


def _mlp_branch(block, family, x):
    if family == "swin":
        return block.drop_path2(block.mlp(block.norm2(x)))
    return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _grid_for(family, x, model=None):
    if family == "vit":
        return Grid("tokens", *model.patch_embed.grid_size, model.num_prefix_tokens)
    if family == "swin":
        return Grid("nhwc", x.shape[1], x.shape[2])
    return Grid("nchw", x.shape[-2], x.shape[-1])


def _channels_last(fn, x, family):
    """Apply a channel-last function to a stream of the family's layout."""
    if family in ("convnext", "efficientnet", "resnet"):
        return fn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return fn(x)


def _plain_with_same_weights(model, family):
    """A fresh, untouched timm model carrying every tensor the adapted model shares with it.

    Tap-based methods keep the backbone's parameter names, so every key of the plain model must
    be in the adapted model's state dict (checked: the load is strict over the plain keys). Its
    forward is timm's own, never the instance forward the taps bind, so comparing the two models
    is an honest "does the adapter change the output" check.
    """
    plain = plain_tiny(family)
    own, theirs = plain.state_dict(), model.state_dict()
    missing = sorted(set(own) - set(theirs))
    assert not missing, f"backbone tensors renamed by the method: {missing[:3]}"
    plain.load_state_dict({k: theirs[k] for k in own})
    return plain.eval()


def _unit_layer_scale(model):
    """Random-init ConvNeXt blocks scale their branch by 1e-6 (timm's ls_init_value), which would hide
    any change of fc1/fc2 below the tolerances; trained ConvNeXts have layer scales of order 1."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "gamma", None), nn.Parameter) and hasattr(module, "conv_dw"):
                module.gamma.fill_(1.0)
    return model


# --- Mona ----------------------------------------------------------------------------------------


def test_mona_module_structure_and_initialisation():
    mona = Mona(48)
    assert isinstance(mona.norm, nn.LayerNorm) and mona.norm.normalized_shape == (48,)
    assert torch.equal(mona.gamma.detach(), torch.full((48,), 1e-6))
    assert torch.equal(mona.gamma_x.detach(), torch.ones(48))
    assert (mona.down.in_features, mona.down.out_features) == (48, 64)
    assert (mona.up.in_features, mona.up.out_features) == (64, 48)
    assert isinstance(mona.act, nn.GELU)
    assert isinstance(mona.dropout, nn.Dropout) and mona.dropout.p == 0.1
    kernels = [conv.kernel_size for conv in mona.filter.depthwise]
    assert kernels == [(3, 3), (5, 5), (7, 7)]
    for conv in mona.filter.depthwise:
        assert conv.groups == 64 and conv.in_channels == conv.out_channels == 64
        assert conv.padding == (conv.kernel_size[0] // 2,) * 2  # "same" size
    pw = mona.filter.pointwise
    assert pw.kernel_size == (1, 1) and pw.groups == 1 and pw.in_channels == pw.out_channels == 64
    assert sum(p.numel() for p in mona.parameters()) == mona_parameter_count(48, 64)
    narrow = Mona(48, width=16, dropout=0.0)
    assert narrow.down.out_features == 16 and narrow.filter.pointwise.in_channels == 16
    assert sum(p.numel() for p in narrow.parameters()) == mona_parameter_count(48, 16)


def test_mona_parameter_count_is_eq6():
    # Eq. 6: 4m (LN + two scales) + 2mn + n + m (projections) + 83n + 3n (depth-wise) + n^2 + n (1x1)
    m, n = 768, 64
    assert mona_parameter_count(m, n) == 4 * m + 2 * m * n + n + m + 83 * n + 3 * n + n * n + n == 111_872


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_mona_forward_matches_the_paper_formula(layout):
    """x' = x + W_up(drop(GELU(d))), d = d0 + mean(DW3,5,7)(d0) then d + PW(d), d0 = W_down(LN(x) g + x g_x)."""
    torch.manual_seed(0)
    mona = Mona(12, width=8).eval()
    with torch.no_grad():
        mona.gamma.normal_()  # make the LayerNorm path matter
        mona.gamma_x.normal_()
    x = torch.randn(2, 12, 5, 7)
    stream, grid = (x, Grid("nchw", 5, 7)) if layout == "nchw" else (x.permute(0, 2, 3, 1), Grid("nhwc", 5, 7))
    with torch.no_grad():
        out = mona(stream, grid)
        cl = x.permute(0, 2, 3, 1)
        z = F.layer_norm(cl, (12,), mona.norm.weight, mona.norm.bias) * mona.gamma + cl * mona.gamma_x
        d = F.linear(z, mona.down.weight, mona.down.bias).permute(0, 3, 1, 2)
        convs = [F.conv2d(d, c.weight, c.bias, padding=c.kernel_size[0] // 2, groups=8) for c in mona.filter.depthwise]
        d = d + (convs[0] + convs[1] + convs[2]) / 3
        d = d + F.conv2d(d, mona.filter.pointwise.weight, mona.filter.pointwise.bias)
        expected = cl + F.linear(F.gelu(d.permute(0, 2, 3, 1)), mona.up.weight, mona.up.bias)
    expected = expected.permute(0, 3, 1, 2) if layout == "nchw" else expected
    assert out.shape == stream.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_mona_placement_two_per_transformer_block_one_per_conv_block(family):
    model = tiny_model(family, "mona")
    anatomy = describe(model)
    for info in anatomy.blocks:
        taps = model.get_submodule(info.name).dv_taps
        assert not len(taps.before_block) and not len(taps.branch_out) and not len(taps.parallel)
        expected_after_attn = 1 if info.kind == "transformer" else 0
        assert len(taps.after_attn) == expected_after_attn, info.name
        assert len(taps.after_block) == 1, info.name
        for mona in [*taps.after_attn, *taps.after_block]:
            assert isinstance(mona, Mona) and mona.norm.normalized_shape == (info.width,)
            assert mona.down.out_features == 64


@pytest.mark.parametrize("family", FAMILIES)
def test_mona_block_forward_is_after_attn_then_after_block(family):
    """Reference: transformer x1 = Mona1(x + attn(x)), out = Mona2(x1 + mlp(x1)); conv out = Mona(block(x))."""
    model = _perturb_trainable(_unit_layer_scale(tiny_model(family, "mona")))
    anatomy, io = _block_io(model, family)
    for info, (block, x, out) in zip(anatomy.blocks, io):
        taps = block.dv_taps
        with torch.no_grad():
            if info.kind == "transformer":
                grid = _grid_for(family, x, model)
                x1 = taps.after_attn[0](x + _attn_branch(block, family, x), grid)
                expected = taps.after_block[0](x1 + _mlp_branch(block, family, x1), grid)
            else:
                plain = type(block).forward(block, x)
                expected = taps.after_block[0](plain, Grid("nchw", *plain.shape[-2:]))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=info.name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("width", [64, 16])
def test_mona_trainable_count_is_eq6_per_module_plus_head(family, width):
    options = {} if width == 64 else {"width": width}
    model = tiny_model(family, "mona", **options)
    anatomy = describe(model)
    per_block = {"transformer": 2}
    expected = sum(per_block.get(b.kind, 1) * mona_parameter_count(b.width, width) for b in anatomy.blocks)
    expected += _head_count(model, family)
    assert deltavision.count_parameters(model)["trainable"] == expected
    assert model.deltavision.options == {"width": width, "dropout": 0.1}


def test_mona_bad_options_are_option_errors():
    with pytest.raises(MethodOptionError):
        tiny_model("vit", "mona", width=0)
    with pytest.raises(MethodOptionError):
        tiny_model("vit", "mona", dropout=1.0)


@pytest.mark.parametrize("prefix", [1, 5])
def test_mona_prefix_tokens_bypass_the_convolutions(prefix):
    """On a 6 x 10 patch grid (non-square: a transposed reshape would show) with ``prefix`` prefix tokens:

    - a prefix token's output is the token-wise path x + up(GELU(down(z))) exactly, with no filter;
    - perturbing patch (r, c) changes exactly the patch outputs within Chebyshev distance 3
      (the 7x7 depth-wise reach; the 1x1 conv adds none) and no prefix output;
    - perturbing a prefix token changes only that token's output.
    """
    torch.manual_seed(1)
    height, width, channels = 6, 10, 16
    mona = Mona(channels, width=8).eval()
    with torch.no_grad():
        mona.gamma.normal_()
    grid = Grid("tokens", height, width, prefix)
    x = torch.randn(2, prefix + height * width, channels)

    def tokenwise(t):
        z = mona.norm(t) * mona.gamma + t * mona.gamma_x
        return t + mona.up(F.gelu(mona.down(z)))

    def changed(a, b):
        return (a - b).abs().amax(dim=(0, 2)) > 1e-6  # per token

    with torch.no_grad():
        base = mona(x, grid)
        torch.testing.assert_close(base[:, :prefix], tokenwise(x[:, :prefix]), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(base[:, prefix:], tokenwise(x[:, prefix:]), atol=1e-4), "patches skip the filter"

        r, c = 2, 3
        bumped = x.clone()
        bumped[:, prefix + r * width + c] += 1.0
        diff = changed(mona(bumped, grid), base)
        assert not diff[:prefix].any(), "a patch token reached a prefix token"
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        reach = torch.maximum((rows - r).abs(), (cols - c).abs()) <= 3
        assert torch.equal(diff[prefix:].view(height, width), reach)

        for k in range(prefix):
            bumped = x.clone()
            bumped[:, k] += 1.0
            diff = changed(mona(bumped, grid), base)
            assert diff.nonzero().flatten().tolist() == [k]


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_mona_in_a_vit_sees_the_prefix_count_and_patch_grid(reg_tokens):
    model = _vit("mona", backbone=dict(reg_tokens=reg_tokens, class_token=True))
    assert model.num_prefix_tokens == 1 + reg_tokens
    grids = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: grids.append(args[1])) for m in model.modules()
             if isinstance(m, Mona)]
    out = _eval_out(model)
    for h in hooks:
        h.remove()
    assert out.shape == (2, NUM_CLASSES)
    assert len(grids) == 2 * 2  # two blocks, two Monas each
    assert set(grids) == {Grid("tokens", 4, 4, 1 + reg_tokens)}


def test_mona_vit_runs_at_any_image_size():
    model = _vit("mona", backbone=dict(dynamic_img_size=True))
    for (h, w) in [(32, 32), (48, 40), (32, 32)]:
        grids = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: grids.append(args[1])) for m in model.modules()
                 if isinstance(m, Mona)]
        out = _eval_out(model, torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h)))
        for hook in hooks:
            hook.remove()
        assert out.shape == (2, NUM_CLASSES)
        assert set(grids) == {Grid("tokens", h // 8, w // 8, 1)}


@pytest.mark.parametrize("family", FAMILIES)
def test_mona_gradient_reaches_only_trainable_parameters(family):
    model = tiny_model(family, "mona")
    deltavision.set_train_mode(model, True)
    F.cross_entropy(model(random_images()), torch.tensor([0, 1])).backward()
    # With class-token pooling, a ViT's output reads only the class token of the last block, and
    # after that block's attention the class token never meets a patch token again: both of its
    # Monas pass prefix tokens around their convolutions. So exactly those filters get zero gradient.
    dead = ("blocks.1.dv_taps.after_attn.0.filter.", "blocks.1.dv_taps.after_block.0.filter.") if family == "vit" else ()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert (param.grad.abs().sum() > 0) != name.startswith(dead), name
        else:
            assert param.grad is None, name
    assert trainable_names(model) == {n for n, _ in model.named_parameters()
                                      if ".dv_taps." in n or n.startswith(head_prefix(model, family))}


# --- Houlsby and AdaptFormer -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["houlsby", "adaptformer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bottleneck_adapters_are_the_identity_at_init(method, family):
    model = _unit_layer_scale(tiny_model(family, method))
    plain = _plain_with_same_weights(model, family)
    x = random_images(batch=2, seed=5)
    expected = _eval_out(plain, x)
    torch.testing.assert_close(_eval_out(model, x), expected, atol=1e-6, rtol=1e-6)
    # the comparison is not vacuous: once the up projections move, outputs move
    _perturb_trainable(model, only=lambda n: ".up." in n)
    assert not torch.allclose(_eval_out(model, x), expected, atol=1e-4)


def test_bottleneck_formula():
    torch.manual_seed(0)
    serial = SerialAdapter(6, 4, nn.GELU)
    side = Bottleneck(6, 4, nn.ReLU, scale=0.1)
    for module in (serial, side):
        assert torch.count_nonzero(module.up.weight) == 0 and torch.count_nonzero(module.up.bias) == 0
        _perturb_trainable(module)
    x = torch.randn(2, 6, 3, 5)
    grid = Grid("nchw", 3, 5)
    cl = x.permute(0, 2, 3, 1)
    with torch.no_grad():
        want_serial = cl + serial.up(F.gelu(serial.down(cl)))
        want_side = 0.1 * side.up(F.relu(side.down(cl)))
        torch.testing.assert_close(serial(x, grid), want_serial.permute(0, 3, 1, 2))
        torch.testing.assert_close(side(x, grid), want_side.permute(0, 3, 1, 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_houlsby_sits_on_the_branch_outputs(family):
    """Transformer: x1 = x + A_attn(attn(x)), out = x1 + A_mlp(mlp(x1)). Conv: out = skip + A(block(x) - skip)."""
    model = _perturb_trainable(_unit_layer_scale(tiny_model(family, "houlsby")))
    anatomy, io = _block_io(model, family)
    for info, (block, x, out) in zip(anatomy.blocks, io):
        taps = block.dv_taps
        with torch.no_grad():
            if info.kind == "transformer":
                assert set(taps.branch_out) == {"attn", "mlp"}
                grid = _grid_for(family, x, model)
                x1 = x + taps.branch_out["attn"](_attn_branch(block, family, x), grid)
                expected = x1 + taps.branch_out["mlp"](_mlp_branch(block, family, x1), grid)
            else:
                assert set(taps.branch_out) == {"main"}
                plain = type(block).forward(block, x)
                skip = x if info.has_skip else torch.zeros_like(plain)
                expected = skip + taps.branch_out["main"](plain - skip, Grid("nchw", *plain.shape[-2:]))
        assert not len(taps.parallel) and not len(taps.after_block) and not len(taps.after_attn)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=info.name)


@pytest.mark.parametrize("family", FAMILIES)
def test_adaptformer_is_parallel_to_the_mlp_with_scale_0_1(family):
    """Transformer: x1 = x + attn(x), out = x1 + mlp(x1) + 0.1 up(ReLU(down(x1))). Conv: block(x) + 0.1 B(x)."""
    model = _perturb_trainable(_unit_layer_scale(tiny_model(family, "adaptformer")))
    anatomy, io = _block_io(model, family)
    for info, (block, x, out) in zip(anatomy.blocks, io):
        taps = block.dv_taps
        if not info.has_skip:
            assert taps.is_empty(), f"{info.name} has no skip and must keep its plain forward"
            continue
        branch = "mlp" if info.kind == "transformer" else "main"
        assert set(taps.parallel) == {branch}
        side = taps.parallel[branch]
        assert side.scale == 0.1 and isinstance(side.act, nn.ReLU)

        def bottleneck(t):
            return 0.1 * side.up(F.relu(side.down(t)))

        with torch.no_grad():
            if info.kind == "transformer":
                x1 = x + _attn_branch(block, family, x)
                expected = x1 + _mlp_branch(block, family, x1) + bottleneck(x1)
            else:
                expected = type(block).forward(block, x) + _channels_last(bottleneck, x, family)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=info.name)


def test_adaptformer_skips_efficientnet_blocks_without_skip():
    model = tiny_model("efficientnet", "adaptformer")
    anatomy = describe(model)
    plain_blocks = [b for b in anatomy.blocks if not b.has_skip]
    assert len(plain_blocks) == 7  # the first block of every stage changes width or resolution
    for info in anatomy.blocks:
        assert ("main" in model.get_submodule(info.name).dv_taps.parallel) == info.has_skip


def _adapter(c, width=64):
    return 2 * c * width + width + c


@pytest.mark.parametrize("width", [64, 8])
@pytest.mark.parametrize("method", ["houlsby", "adaptformer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bottleneck_trainable_counts(family, method, width):
    options = {} if width == 64 else {"width": width}
    model = tiny_model(family, method, **options)
    expected = _head_count(model, family)
    for info in describe(model).blocks:
        if method == "houlsby":
            expected += (2 if info.kind == "transformer" else 1) * _adapter(info.width, width)
        elif info.has_skip:
            expected += _adapter(info.width, width)
    assert deltavision.count_parameters(model)["trainable"] == expected


def test_adaptformer_scale_option():
    model = _perturb_trainable(tiny_model("vit", "adaptformer", scale=0.5))
    assert {m.scale for m in model.modules() if isinstance(m, Bottleneck)} == {0.5}


# --- LoRA ----------------------------------------------------------------------------------------


LORA_MERGE_CASES = [(f, None) for f in FAMILIES] + [("vit", "proj"), ("swin", "proj")]


@pytest.mark.parametrize("family,targets", LORA_MERGE_CASES)
def test_lora_merge_is_exact_and_leaves_the_plain_architecture(family, targets):
    options = {"targets": targets} if targets else {}
    model = _unit_layer_scale(tiny_model(family, "lora", **options))
    # lora_b starts at zero: perturb it (and the head) so the merge has something to fold
    _perturb_trainable(model, seed=1, scale=0.1)
    x = random_images(batch=2, seed=4)
    before = _eval_out(model, x)
    assert not torch.allclose(before, _eval_out(_plain_with_lora_base(model, family), x), atol=1e-4)

    merged = deltavision.merge(model)
    torch.testing.assert_close(_eval_out(merged, x), before, atol=1e-4, rtol=1e-4)
    plain = plain_tiny(family)
    assert [type(m) for m in merged.modules()] == [type(m) for m in plain.modules()]
    assert [(n, p.shape) for n, p in merged.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    assert not hasattr(merged, "deltavision")


def _plain_with_lora_base(model, family):
    """The plain timm model with the LoRA model's base weights (its outputs before any update)."""
    plain = plain_tiny(family)
    theirs = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    plain.load_state_dict(theirs)
    return plain


def _lora_wrapped(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv1x1))}


EXPECTED_DEFAULT_TARGETS = {
    "vit": ("attn.qkv",),
    "swin": ("attn.qkv",),
    "convnext": ("mlp.fc1", "mlp.fc2"),
    "efficientnet": ("conv_pw", "conv_pwl"),
    "resnet": ("conv1", "conv3"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_default_targets_and_trainable_count(family):
    rank = 8
    model = tiny_model(family, "lora")
    plain = plain_tiny(family)
    anatomy = describe(plain)
    expected_names, expected_count = set(), _head_count(model, family)
    for info in anatomy.blocks:
        block = plain.get_submodule(info.name)
        for rel, module in block.named_modules():
            if rel in EXPECTED_DEFAULT_TARGETS[family]:
                expected_names.add(f"{info.name}.{rel}")
                if family in ("vit", "swin"):  # q and v slices of the fused qkv: r * (in + C) each
                    expected_count += 2 * rank * (module.in_features + module.out_features // 3)
                elif isinstance(module, nn.Linear):
                    expected_count += rank * (module.in_features + module.out_features)
                else:
                    expected_count += rank * (module.in_channels + module.out_channels)
    assert expected_names
    wrapped = _lora_wrapped(model)
    assert set(wrapped) == expected_names
    assert deltavision.count_parameters(model)["trainable"] == expected_count
    if family in ("vit", "swin"):
        for module in wrapped.values():
            assert set(module.slices) == {"q", "v"}
            assert set(module.lora_a) == set(module.lora_b) == {"q", "v"}


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_lora_qv_leaves_the_key_rows_alone(family):
    model = _perturb_trainable(tiny_model(family, "lora"), seed=2)
    for name, module in _lora_wrapped(model).items():
        third = module.base.out_features // 3
        with torch.no_grad():
            delta = module.delta_weight()
            assert torch.count_nonzero(delta[third : 2 * third]) == 0, f"{name}: key rows changed"
            assert torch.count_nonzero(delta[:third]) == delta[:third].numel()
            assert torch.count_nonzero(delta[2 * third :]) == delta[2 * third :].numel()
            x = torch.randn(3, module.base.in_features)
            torch.testing.assert_close(module(x), module.base(x) + x @ delta.T, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(module(x)[:, third : 2 * third], module.base(x)[:, third : 2 * third])


def test_lora_rank_and_alpha_scaling():
    model = _perturb_trainable(tiny_model("vit", "lora", rank=4, alpha=16), seed=3)
    modules = list(_lora_wrapped(model).values())
    assert len(modules) == 2
    for module in modules:
        assert module.scaling == 4.0
        for part in ("q", "v"):
            assert module.lora_a[part].shape == (4, 32)
            assert module.lora_b[part].shape == (32, 4)
        with torch.no_grad():
            delta = module.delta_weight()
            torch.testing.assert_close(delta[:32], 4.0 * module.lora_b["q"] @ module.lora_a["q"])
            torch.testing.assert_close(delta[64:], 4.0 * module.lora_b["v"] @ module.lora_a["v"])
    assert deltavision.count_parameters(model)["trainable"] == 2 * 2 * 4 * (32 + 32) + 32 * NUM_CLASSES + NUM_CLASSES


def test_lora_conv_delta_and_forward():
    model = _perturb_trainable(tiny_model("efficientnet", "lora", rank=2, alpha=6), seed=4)
    module = model.get_submodule("blocks.1.1.conv_pw")
    assert isinstance(module, LoRAConv1x1) and module.scaling == 3.0
    x = torch.randn(1, module.base.in_channels, 3, 3)
    with torch.no_grad():
        delta = module.delta_weight()
        torch.testing.assert_close(delta[:, :, 0, 0], 3.0 * module.lora_b @ module.lora_a)
        torch.testing.assert_close(module(x), module.base(x) + F.conv2d(x, delta), atol=1e-5, rtol=1e-5)


def test_lora_proj_target_wraps_proj_only():
    model = tiny_model("vit", "lora", targets="proj")
    assert set(_lora_wrapped(model)) == {"blocks.0.attn.proj", "blocks.1.attn.proj"}
    assert deltavision.count_parameters(model)["trainable"] == 2 * 8 * (32 + 32) + 32 * NUM_CLASSES + NUM_CLASSES


@pytest.mark.parametrize(
    "targets,wrapped",
    [
        ("mlp.fc1", {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}),  # a block-relative dotted name
        ("attn.proj", {"blocks.0.attn.proj", "blocks.1.attn.proj"}),
        ("qkv", {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}),  # the whole fused projection, by its name
    ],
)
def test_lora_block_relative_layer_names_are_accepted(targets, wrapped):
    """The docstring: ``targets`` may name block-relative Linear layers. A name that wraps layers is matched."""
    model = tiny_model("vit", "lora", targets=targets)
    assert set(_lora_wrapped(model)) == wrapped


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_unknown_target_is_an_option_error(family):
    with pytest.raises(MethodOptionError, match="nonexistent"):
        tiny_model(family, "lora", targets="nonexistent")


def test_lora_qkv_slices_on_a_cnn_are_incompatible():
    with pytest.raises(IncompatibleMethodError, match="qkv"):
        tiny_model("convnext", "lora", targets="q,v")


def test_lora_bad_rank_is_an_option_error():
    with pytest.raises(MethodOptionError):
        tiny_model("vit", "lora", rank=0)


# --- VPT -----------------------------------------------------------------------------------------


def _capture_inputs(modules):
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach()))
             for i, m in enumerate(modules)]
    return seen, hooks


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_vpt_shallow_inserts_prompts_after_the_prefix_tokens(reg_tokens):
    num_tokens, prefix = 6, 1 + reg_tokens
    model = _vit("vpt", num_tokens=num_tokens, backbone=dict(reg_tokens=reg_tokens, class_token=True))
    assert model.num_prefix_tokens == prefix + num_tokens
    (prompts,) = model.prompts
    assert prompts.shape == (1, num_tokens, 32) and prompts.requires_grad
    seen, hooks = _capture_inputs([model.backbone.blocks[0]])
    x = random_images(batch=2, seed=6)
    _eval_out(model, x)
    for h in hooks:
        h.remove()
    tokens = seen[0]
    assert tokens.shape == (2, prefix + num_tokens + 16, 32)
    with torch.no_grad():
        embedded = model.backbone._pos_embed(model.backbone.patch_embed(x))  # timm's embedding: [prefix, patches] + position
    assert torch.equal(tokens[:, :prefix], embedded[:, :prefix])
    assert torch.equal(tokens[:, prefix : prefix + num_tokens], prompts.detach().expand(2, -1, -1))
    assert torch.equal(tokens[:, prefix + num_tokens :], embedded[:, prefix:])
    assert deltavision.count_parameters(model)["trainable"] == num_tokens * 32 + 32 * NUM_CLASSES + NUM_CLASSES


def test_vpt_deep_replaces_prompts_before_every_later_block():
    depth, num_tokens = 3, 4
    model = _vit("vpt", num_tokens=num_tokens, deep=True, backbone=dict(depth=depth))
    all_prompts = list(model.prompts)
    assert len(all_prompts) == depth
    assert all(taps is None for taps in (getattr(b, "dv_taps", None) for b in model.backbone.blocks))
    assert len({id(p) for p in all_prompts}) == depth
    assert deltavision.count_parameters(model)["trainable"] == depth * num_tokens * 32 + 32 * NUM_CLASSES + NUM_CLASSES
    assert sum(p.numel() for p in all_prompts) == depth * num_tokens * 32

    # what each block computes on: its norm1 input (after the taps ran), and the previous block's output
    inputs, hooks = _capture_inputs([model.backbone.blocks[i].norm1 for i in range(depth)])
    outputs = {}
    hooks += [model.backbone.blocks[i].register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.detach()))
              for i in range(depth)]
    _eval_out(model)
    for h in hooks:
        h.remove()
    start, stop = 1, 1 + num_tokens
    for i in range(depth):
        assert torch.equal(inputs[i][:, start:stop], all_prompts[i].detach().expand(2, -1, -1)), i
        if i:
            assert not torch.equal(outputs[i - 1][:, start:stop], inputs[i][:, start:stop])
            assert torch.equal(inputs[i][:, :start], outputs[i - 1][:, :start])
            assert torch.equal(inputs[i][:, stop:], outputs[i - 1][:, stop:])


def test_vpt_prompts_are_left_out_of_average_pooling():
    num_tokens = 5
    model = _vit("vpt", num_tokens=num_tokens, backbone=dict(global_pool="avg"))
    assert model.num_prefix_tokens == 1 + num_tokens
    last, head_in = {}, {}
    backbone = model.backbone
    h1 = backbone.blocks[-1].register_forward_hook(lambda m, a, o: last.__setitem__("x", o.detach()))
    h2 = backbone.head.register_forward_pre_hook(lambda m, a: head_in.__setitem__("x", a[0].detach()))
    _eval_out(model)
    h1.remove(), h2.remove()
    tokens = backbone.norm(last["x"])
    with torch.no_grad():
        expected = backbone.fc_norm(tokens[:, 1 + num_tokens :].mean(dim=1))
        with_prompts = backbone.fc_norm(tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(head_in["x"], expected)
    assert not torch.allclose(head_in["x"], with_prompts, atol=1e-4)


@pytest.mark.parametrize("family", ["swin", "convnext", "efficientnet"])
def test_vpt_refuses_non_vit_families(family):
    with pytest.raises(IncompatibleMethodError) as info:
        tiny_model(family, "vpt")
    message = str(info.value)
    assert "vpt" in message and "vit" in message and family in message


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_prompt_init_bound(deep):
    num_tokens = 100
    model = _vit("vpt", num_tokens=num_tokens, deep=deep)
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 32))
    prompts = [p for n, p in model.named_parameters() if n.startswith("prompts.")]
    assert len(prompts) == (2 if deep else 1)
    for p in prompts:
        values = p.detach().flatten()
        assert values.abs().max() <= bound
        assert values.abs().max() > 0.97 * bound
        assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # uniform(-b, b)
        assert abs(values.mean().item()) < 0.1 * bound


def test_vpt_vit_runs_at_any_image_size():
    """A dynamic_img_size ViT takes any input size; prompts must not change how positions are resampled."""
    model = _vit("vpt", num_tokens=3, backbone=dict(dynamic_img_size=True))
    for size in [(32, 32), (48, 40)]:
        seen, hooks = _capture_inputs([model.backbone.blocks[0]])
        out = _eval_out(model, torch.randn(2, 3, *size))
        for h in hooks:
            h.remove()
        assert out.shape == (2, NUM_CLASSES)
        assert seen[0].shape[1] == 1 + 3 + (size[0] // 8) * (size[1] // 8)


# --- save / load / merge -------------------------------------------------------------------------

ROUND_TRIP = [
    (method, family, options)
    for method, options in [("mona", {}), ("houlsby", {}), ("adaptformer", {}), ("lora", {}),
                            ("vpt", {"deep": True}), ("e3va", {})]
    for family in FAMILIES
    if method != "vpt" or family == "vit"
]


@pytest.mark.parametrize("method,family,options", ROUND_TRIP, ids=[f"{m}-{f}" for m, f, _ in ROUND_TRIP])
def test_save_load_round_trip_and_merge_policy(method, family, options, tmp_path, backbone_checkpoint):
    ckpt = backbone_checkpoint(family)
    model = _perturb_trainable(tiny_model(family, method, checkpoint=ckpt, **options), seed=7, scale=0.1)
    x = random_images(batch=2, seed=8)
    expected = _eval_out(model, x)
    directory = deltavision.save_adapter(model, tmp_path / "adapter")

    rebuilt = deltavision.load_adapter(directory, pretrained=False, checkpoint=ckpt)
    assert torch.equal(_eval_out(rebuilt, x), expected)
    assert trainable_names(rebuilt) == trainable_names(model)
    fresh = tiny_model(family, method, checkpoint=ckpt, **options)
    assert not torch.allclose(_eval_out(fresh, x), expected, atol=1e-4), "the adapter must matter"
    into = deltavision.load_adapter(directory, fresh)
    assert torch.equal(_eval_out(into, x), expected)

    if method == "lora":
        merged = deltavision.merge(rebuilt)
        torch.testing.assert_close(_eval_out(merged, x), expected, atol=1e-4, rtol=1e-4)
    else:
        with pytest.raises(IncompatibleMethodError, match=method):
            deltavision.merge(rebuilt)
        assert torch.equal(_eval_out(rebuilt, x), expected), "a refused merge must leave the model alone"
