"""E3VA: the gradient highway beside a frozen backbone (Yin et al., MM 2024; DESIGN.md "E3VA").

The e3va model is a wrapper whose forward runs the highway; the plain backbone forward stays
reachable as ``model.backbone(x)``, on the very same modules and weights.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import deltavision
from deltavision.errors import IncompatibleMethodError, MethodOptionError
from deltavision.methods.e3va import DualLowRankLinear, E3VAAdapter, e3va_features, e3va_stage_outputs

from conftest import FAMILIES, NUM_CLASSES, TINY, head_prefix, random_images, tiny_model, trainable_names

RANKS = (8, 16, 32)


def _unit_layer_scale(model):
    """Random-init ConvNeXt blocks scale their branch by 1e-6 (timm's ls_init_value); that would let a
    highway that ignored the branches pass every equivalence tolerance. Trained layer scales are ~1."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "gamma", None), nn.Parameter) and hasattr(module, "conv_dw"):
                module.gamma.fill_(1.0)
    return model


def _e3va(family, **options):
    return _unit_layer_scale(tiny_model(family, "e3va", **options)).eval()


def _plain_forward(model, x):
    return model.backbone(x)


def _backbone_stage_outputs(model, family, x):
    """timm's forward_features, cut at every stage end (run on the model's own, untouched modules)."""
    model = model.backbone
    if family == "vit":
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        return [model.blocks(t)]
    if family == "swin":
        t, stages = model.patch_embed(x), model.layers
    elif family == "convnext":
        t, stages = model.stem(x), model.stages
    elif family == "resnet":
        t = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    else:
        t, stages = model.bn1(model.conv_stem(x)), model.blocks
    outs = []
    for stage in stages:
        t = stage(t)
        outs.append(t)
    return outs


def _backbone_modules(model):
    """(name, module) of the embedding, every block and every downsampling layer, with their children."""
    anatomy = model.anatomy
    tops = anatomy.embed + tuple(b.name for b in anatomy.blocks) + tuple(s.downsample for s in anatomy.stages if s.downsample)
    found = []
    for top in tops:
        for rel, module in model.backbone.get_submodule(top).named_modules():
            found.append((f"{top}.{rel}" if rel else top, module))
    return tops, found


# --- equivalence at init -------------------------------------------------------------------------


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_untrained_highway_reproduces_the_backbone(family, dense):
    model = _e3va(family, dense=dense)
    x = random_images(batch=2, seed=11)
    with torch.no_grad():
        highway, plain = model(x), _plain_forward(model, x)
        torch.testing.assert_close(highway, plain, atol=1e-5, rtol=1e-5)
        # stage by stage too: e_i = l_i at every stage end
        for e, l in zip(e3va_stage_outputs(model, x), _backbone_stage_outputs(model, family, x), strict=True):
            torch.testing.assert_close(e, l, atol=1e-5, rtol=1e-5)
    # not vacuous: once the up branches move, the highway leaves the backbone
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.highway.named_parameters():
            if ".up.s." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        assert not torch.allclose(model(x), plain, atol=1e-4)


# --- no backprop through the backbone ------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_runs_without_autograd_and_gets_no_gradient(family):
    model = _e3va(family)
    deltavision.set_train_mode(model, True)
    tops, modules = _backbone_modules(model)

    calls, outputs = {}, []

    def record(name):
        def hook(module, args, out):
            calls.setdefault(name, []).append(torch.is_grad_enabled())
            outputs.extend(t for t in (out if isinstance(out, (tuple, list)) else (out,)) if torch.is_tensor(t))
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in modules]
    logits = model(random_images(batch=2))
    for h in handles:
        h.remove()
    loss = F.cross_entropy(logits, torch.tensor([0, 1]))

    # (a) every embedding, block and downsampling module ran, and never with autograd on
    # (transformer blocks are not called as a whole: E3VA calls their two branches, so look inside)
    never = [t for t in tops if not any(n == t or n.startswith(t + ".") for n in calls)]
    assert not never, f"never ran: {never}"
    for info in model.anatomy.blocks:
        if info.kind == "transformer":
            assert {f"{info.name}.attn", f"{info.name}.mlp"} <= set(calls), info.name
    grad_on = sorted(name for name, flags in calls.items() if any(flags))
    assert not grad_on, f"ran with autograd enabled: {grad_on[:5]}"
    # (c1) so nothing they produced is part of the graph
    assert outputs and not any(t.requires_grad for t in outputs)

    # (c2) the graph's leaves are exactly the trainable parameters: highway adapters, final norm, head
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    leaves, stack, seen = {}, [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable"):
            leaves[id(node.variable)] = node.variable
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert set(leaves) <= set(trainable), "a frozen tensor is a leaf of the graph"
    assert set(leaves) == set(trainable), f"not in the graph: {[trainable[i] for i in set(trainable) - set(leaves)][:5]}"
    for name in trainable.values():
        assert name.startswith(("highway.", head_prefix(model, family))) or _is_final_norm(model, name), name

    # (b) after backward, no frozen (backbone) parameter holds a gradient; every trainable one does
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("family", FAMILIES)
def test_highway_saves_nothing_inside_its_frozen_copies_or_low_rank_branches(family):
    """Memory (Sec. 3.2): backward keeps only what enters the highway's frozen copies (downsampling, blocks
    without a skip) and each adapter's branch; what happens inside them is recomputed in backward."""
    model = _e3va(family, dense=True)
    deltavision.set_train_mode(model, True)
    inside = [m for m in model.highway.passes.values()]
    inside += [part for adapters in model.highway.adapters for a in adapters for part in (a.down, a.up)]
    assert inside
    depth = [0]
    handles = [h for m in inside for h in (m.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1)),
                                           m.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1)))]
    saved_inside, saved = [], []

    def pack(tensor):
        (saved_inside if depth[0] else saved).append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        maps = model.features(random_images(batch=2))
    for h in handles:
        h.remove()
    assert saved, "nothing saved at all: the hook did not see the graph"
    assert not saved_inside, f"{len(saved_inside)} tensors saved inside frozen copies or branches: {saved_inside[:3]}"
    sum(m.float().mean() for m in maps).backward()
    assert all(p.grad is not None for p in model.highway.parameters() if p.requires_grad)


def _is_final_norm(model, name):
    final = model.anatomy.final
    module = model.get_submodule(name.rpartition(".")[0])
    return name.startswith(tuple(f"backbone.{f}." for f in final)) and isinstance(
        module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_parameters_are_highway_final_norm_and_head(family):
    model = tiny_model(family, "e3va")
    expected_final = {"vit": {"norm."}, "swin": {"norm."}, "convnext": {"head.norm."}, "efficientnet": {"bn2."}, "resnet": set()}
    expected_final = {"backbone." + prefix for prefix in expected_final[family]}
    names = trainable_names(model)
    other = {n for n in names if not n.startswith("highway.") and not n.startswith(head_prefix(model, family))}
    assert {n.rpartition(".")[0] + "." for n in other} == expected_final
    # the frozen copies the highway goes through do not train
    assert not any(p.requires_grad for p in model.highway.passes.parameters())


# --- parameter counts ----------------------------------------------------------------------------


def _adapter_count(c, r):
    middle = c // 2
    return (2 * r * (c + middle) + middle) + (2 * r * (middle + c) + c)  # down + up (dual low-rank + bias)


FINAL_NORM_PARAMS = {"vit": 2 * 32, "swin": 2 * 64, "convnext": 2 * 64, "efficientnet": 2 * 1280, "resnet": 0}


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_count_for_each_rank(family, rank):
    model = tiny_model(family, "e3va", rank=rank)
    expected = FINAL_NORM_PARAMS[family]
    expected += sum(p.numel() for n, p in model.named_parameters() if n.startswith(head_prefix(model, family)))
    for info in model.anatomy.blocks:
        if info.has_skip:  # one adapter per residual branch; blocks without skip are passed through
            expected += (2 if info.kind == "transformer" else 1) * _adapter_count(info.width, rank)
    assert deltavision.count_parameters(model)["trainable"] == expected


def test_trainable_count_vit_rank_8_by_hand():
    # 2 blocks x 2 adapters x [(2*8*(32+16) + 16) + (2*8*(16+32) + 32)] + norm 64 + head 32*5+5
    model = tiny_model("vit", "e3va")
    assert deltavision.count_parameters(model)["trainable"] == 4 * (784 + 800) + 64 + 165 == 6565


def test_dense_adds_one_trainable_norm_per_stage():
    plain, dense = tiny_model("swin", "e3va"), tiny_model("swin", "e3va", dense=True)
    added = deltavision.count_parameters(dense)["trainable"] - deltavision.count_parameters(plain)["trainable"]
    assert added == 2 * (16 + 32 + 64)


def test_bad_rank_is_an_option_error():
    with pytest.raises(MethodOptionError):
        tiny_model("vit", "e3va", rank=0)


# --- adapter structure ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_up_branch_starts_at_zero_and_middle_is_half_width(family):
    model = tiny_model(family, "e3va", rank=16)
    adapters = [a for a in model.highway.modules() if isinstance(a, E3VAAdapter)]
    widths = [b.width for b in model.anatomy.blocks for _ in range((2 if b.kind == "transformer" else 1) * b.has_skip)]
    assert [a.down.t[0].shape[1] for a in adapters] == widths
    for adapter, c in zip(adapters, widths):
        for k in range(2):
            assert adapter.down.t[k].shape == (16, c) and adapter.down.s[k].shape == (c // 2, 16)
            assert adapter.up.t[k].shape == (16, c // 2) and adapter.up.s[k].shape == (c, 16)
            assert torch.count_nonzero(adapter.up.s[k]) == 0
            assert torch.count_nonzero(adapter.up.t[k]) > 0 and torch.count_nonzero(adapter.down.s[k]) > 0
        assert torch.count_nonzero(adapter.up.bias) == 0
        x = torch.randn(2, 3, c) if adapter.channel_dim == -1 else torch.randn(2, c, 2, 2)
        with torch.no_grad():
            assert torch.equal(adapter(x), x)  # x + U(GELU(D(x))) with U = 0


def test_dual_low_rank_linear_is_the_sum_of_two_products():
    torch.manual_seed(0)
    layer = DualLowRankLinear(6, 4, rank=2)
    with torch.no_grad():
        layer.bias.normal_()
        x = torch.randn(3, 6)
        weight = layer.s[0] @ layer.t[0] + layer.s[1] @ layer.t[1]
        torch.testing.assert_close(layer(x), x @ weight.T + layer.bias)
    assert sum(p.numel() for p in layer.parameters()) == 2 * 2 * (6 + 4) + 4


# --- multi-scale outputs -------------------------------------------------------------------------


def _timm_feature_maps(family, x):
    """{stage index: NCHW shape} from timm's features_only model of the same config."""
    name, opts = TINY[family]
    extra = {"out_indices": (opts["depth"] - 1,)} if family == "vit" else {}
    features = timm.create_model(name, pretrained=False, features_only=True, **opts, **extra).eval()
    with torch.no_grad():
        maps = features(x)
    shapes = {}
    for info, f in zip(features.feature_info.get_dicts(), maps, strict=True):
        if family == "swin":  # timm's Swin features are NHWC
            f = f.permute(0, 3, 1, 2)
        assert f.shape[1] == info["num_chs"]
        if family == "resnet":  # the stem's map (stride 2) comes first; layer<i> is stage i - 1
            if not info["module"].startswith("layer"):
                continue
            stage = int(info["module"][len("layer"):]) - 1
        else:
            stage = 0 if family == "vit" else int(info["module"].split(".")[1])
        shapes[stage] = tuple(f.shape)
    return shapes


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_features_one_map_per_stage_like_features_only(family):
    model = _e3va(family, dense=True)
    anatomy = model.anatomy
    x = random_images(batch=2, seed=12)
    with torch.no_grad():
        feats = e3va_features(model, x)
        stage_outs = _backbone_stage_outputs(model, family, x)
    assert len(feats) == len(anatomy.stages)
    timm_shapes = _timm_feature_maps(family, x)
    assert timm_shapes
    for index, (stage, f, backbone_out) in enumerate(zip(anatomy.stages, feats, stage_outs, strict=True)):
        assert f.shape[:2] == (2, stage.width), index
        if index in timm_shapes:
            assert tuple(f.shape) == timm_shapes[index], index
        # every stage (also those features_only leaves out) has the backbone stage's resolution
        spatial = backbone_out.shape[1:3] if family == "swin" else backbone_out.shape[-2:]
        if family == "vit":
            spatial = (4, 4)
        assert tuple(f.shape[-2:]) == tuple(spatial), index
        assert torch.isfinite(f).all()
    # the stage norms are trainable and really applied
    assert all(p.requires_grad for p in model.highway.stage_norms.parameters())


def test_dense_vit_features_drop_prefix_tokens_and_follow_the_input_size():
    name, opts = TINY["vit"]
    model = deltavision.create_model(
        name, "e3va", NUM_CLASSES, pretrained=False, dense=True,
        backbone_options={**opts, "dynamic_img_size": True, "reg_tokens": 2},
    ).eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        (f,) = e3va_features(model, x)
        (e,) = e3va_stage_outputs(model, x)
    assert f.shape == (1, 32, 6, 5)
    expected = model.highway.stage_norms[0](e)[:, 3:].transpose(1, 2).reshape(1, 32, 6, 5)
    torch.testing.assert_close(f, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_features_without_dense_are_refused(family):
    model = tiny_model(family, "e3va")
    assert len(model.highway.stage_norms) == 0
    with pytest.raises(IncompatibleMethodError, match="dense"):
        e3va_features(model, random_images())


# --- persistence ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, dense, tmp_path, backbone_checkpoint):
    ckpt = backbone_checkpoint(family)
    model = tiny_model(family, "e3va", checkpoint=ckpt, rank=16, dense=dense)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    x = random_images(batch=2, seed=13)
    with torch.no_grad():
        expected = model(x)
        expected_feats = e3va_features(model, x) if dense else None
    directory = deltavision.save_adapter(model, tmp_path / "adapter")
    rebuilt = deltavision.load_adapter(directory, pretrained=False, checkpoint=ckpt).eval()
    assert rebuilt.deltavision.options == {"rank": 16, "dense": dense}
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
        if dense:
            for a, b in zip(e3va_features(rebuilt, x), expected_feats, strict=True):
                assert torch.equal(a, b)
        fresh = tiny_model(family, "e3va", checkpoint=ckpt, rank=16, dense=dense).eval()
        assert not torch.allclose(fresh(x), expected, atol=1e-4)
    with pytest.raises(IncompatibleMethodError):
        deltavision.merge(rebuilt)
