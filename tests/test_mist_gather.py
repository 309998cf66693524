"""Gather_k (MIST Sec. 3.2) against sums of timm's own intermediate outputs."""

import pytest
import timm
import torch
from conftest import IMAGE_SIZE, TINY, random_images

from deltavision.anatomy.layout import to_tokens
from deltavision.mist.server.gather import Gather, candidate_ks

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def seeded(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, **options).eval()


@pytest.mark.parametrize(
    "blocks, expected",
    [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (4, (1, 2, 3, 4)), (6, (2, 3, 5, 6)), (12, (3, 6, 9, 12)), (24, (6, 12, 18, 24))],
)
def test_candidate_ks_are_quarters_of_depth(blocks, expected):
    assert candidate_ks(blocks) == expected


def test_vit_gather_is_embedding_plus_block_outputs_from_forward_intermediates():
    model = seeded("vit_small_patch16_224", **TINY_VIT)
    images = random_images(3)
    embedded = {}
    model.norm_pre.register_forward_hook(lambda module, args, output: embedded.setdefault("z0", output))
    timm_outputs = model.forward_intermediates(
        images, indices=list(range(4)), norm=False, output_fmt="NLC", intermediates_only=True,
        return_prefix_tokens=True, output_dict=True,
    )  # fmt: skip
    blocks = [
        torch.cat([prefix, patches], dim=1)
        for prefix, patches in zip(timm_outputs["image_intermediates_prefix"], timm_outputs["image_intermediates"])
    ]
    gathered = Gather(model)(images)
    assert sorted(gathered) == [1, 2, 3, 4]
    for k, features in gathered.items():
        manual = embedded["z0"] + sum(blocks[:k])
        assert features.shape == (3, 1 + 16, 32)
        torch.testing.assert_close(features, manual, rtol=1e-5, atol=1e-5)


def test_vit_gather_n_ends_at_the_stream_forward_features_normalises():
    model = seeded("vit_small_patch16_224", **TINY_VIT)
    images = random_images(2)
    last = {}
    model.blocks[-1].register_forward_hook(lambda module, args, output: last.setdefault("out", output))
    with torch.no_grad():
        model.forward_features(images)
    gathered = Gather(model)(images, ks=[3, 4])
    difference = gathered[4] - gathered[3]  # z_4, the last block's output
    torch.testing.assert_close(difference, last["out"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["swin", "convnext", "efficientnet", "resnet"])
def test_last_stage_span_sums_the_last_residual_stream_as_the_backbone_runs_it(family):
    """z_0 = the stream entering the first summed block, z_i = summed block outputs, all taken
    with hooks during timm's own forward_features."""
    name, options = TINY[family]
    model = seeded(name, **options)
    gatherer = Gather(model, span="last_stage")
    blocks = [model.get_submodule(block) for block in gatherer.summed_blocks]
    seen = {"outputs": []}
    blocks[0].register_forward_pre_hook(lambda module, args: seen.setdefault("z0", args[0]))
    for block in blocks:
        block.register_forward_hook(lambda module, args, output: seen["outputs"].append(output))
    images = random_images(2, size=IMAGE_SIZE)
    with torch.no_grad():
        model.forward_features(images)
    gathered = gatherer(images)
    assert sorted(gathered) == list(candidate_ks(len(blocks)))
    for k, features in gathered.items():
        manual = to_tokens(seen["z0"] + sum(seen["outputs"][:k]), gatherer.layout)
        torch.testing.assert_close(features, manual, rtol=1e-5, atol=1e-5)


def test_last_stage_span_choices_per_family():
    """Swin and ConvNeXt: their last stage; EfficientNet-Lite0: stage 5, as its stage 6 has no skip;
    ResNet: layer4 after its projection block."""
    expectations = {
        "swin": ("layers.2.blocks.0", "layers.2.blocks.1"),
        "convnext": ("stages.3.blocks.0",),
        "efficientnet": ("blocks.5.1", "blocks.5.2", "blocks.5.3"),
        "resnet": ("layer4.1",),
    }
    for family, expected in expectations.items():
        name, options = TINY[family]
        assert Gather(seeded(name, **options), span="last_stage").summed_blocks == expected


def test_default_span_runs_over_every_block_of_swin_t():
    """Appendix Sec. 8: on Swin-T, k ranges over all 12 blocks."""
    gatherer = Gather(seeded("swin_tiny_patch4_window7_224"))
    assert gatherer.span == "all" and gatherer.num_blocks == 12 and gatherer.ks == (3, 6, 9, 12)


def test_all_span_carries_the_sum_through_each_stage_downsampling():
    """Tiny Swin (depths 1, 1, 2): the running sum crosses stages through the frozen PatchMerging
    layers, and every Gather_k is carried on to the last stage's resolution and width."""
    name, options = TINY["swin"]
    model = seeded(name, **options)
    images = random_images(2)
    down1, down2 = model.layers[1].downsample, model.layers[2].downsample
    b0, b1, b2, b3 = model.layers[0].blocks[0], model.layers[1].blocks[0], *model.layers[2].blocks
    with torch.no_grad():
        z0 = model.patch_embed(images)
        s1 = b0(z0)
        t1 = z0 + s1
        s2 = b1(down1(s1))
        t2 = down1(t1) + s2
        s3 = b2(down2(s2))
        t3 = down2(t2) + s3
        t4 = t3 + b3(s3)
    expected = {1: down2(down1(t1)), 2: down2(t2), 3: t3, 4: t4}
    gathered = Gather(model)(images)
    assert sorted(gathered) == [1, 2, 3, 4]
    for k, features in gathered.items():
        assert features.shape == (2, 2 * 2, 64), k
        torch.testing.assert_close(features, to_tokens(expected[k], "nhwc"), rtol=1e-5, atol=1e-5)


def test_all_span_passes_the_sum_through_blocks_without_a_skip():
    """Tiny ResNet: layer1..4 open with projection blocks, which carry the running sum through
    themselves; layer4.1 (identity skip) adds its output, as in timm's own forward_features."""
    name, options = TINY["resnet"]
    model = seeded(name, **options)
    gatherer = Gather(model)
    assert gatherer.summed_blocks == ("layer1.0", "layer2.0", "layer3.0", "layer4.0", "layer4.1")
    seen = {}
    model.layer4[1].register_forward_pre_hook(lambda module, args: seen.setdefault("in", args[0]))
    model.layer4[1].register_forward_hook(lambda module, args, output: seen.setdefault("out", output))
    images = random_images(2)
    with torch.no_grad():
        model.forward_features(images)
    gathered = gatherer(images, ks=[1, 4, 5])
    torch.testing.assert_close(gathered[4], to_tokens(seen["in"], "nchw"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gathered[5], to_tokens(seen["in"] + seen["out"], "nchw"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gathered[1], gathered[4], rtol=1e-5, atol=1e-5)  # nothing added before layer4.1
    shape = gatherer.output_shape(IMAGE_SIZE)
    assert (shape.tokens, shape.width, shape.grid) == (1, 256, (1, 1))


@pytest.mark.parametrize("family", ["vit", "swin", "convnext", "efficientnet", "resnet"])
@pytest.mark.parametrize("span", ["all", "last_stage"])
def test_every_k_has_the_announced_wire_shape(family, span):
    name, options = TINY[family]
    gatherer = Gather(seeded(name, **options), span=span)
    shape = gatherer.output_shape(IMAGE_SIZE)
    for k, features in gatherer(random_images(2)).items():
        assert features.shape == (2, shape.tokens, shape.width), k
    assert shape.tokens == shape.num_prefix_tokens + shape.grid[0] * shape.grid[1]


def test_unknown_span_is_refused():
    with pytest.raises(ValueError, match="last_stage"):
        Gather(seeded("vit_small_patch16_224", **TINY_VIT), span="first")


def test_gather_output_is_tokens_for_every_layout():
    name, options = TINY["convnext"]
    gather = Gather(seeded(name, **options))
    shape = gather.output_shape(64)
    features = gather(random_images(2, size=64))[1]
    assert features.shape == (2, shape.tokens, shape.width) == (2, 4, 64)
    assert shape.grid == (2, 2) and shape.num_prefix_tokens == 0


def test_one_pass_stops_at_the_largest_k_asked_and_takes_no_gradient():
    model = seeded("vit_small_patch16_224", **TINY_VIT)
    calls = []
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, output, index=index: calls.append(index))
    gathered = Gather(model)(random_images(1).requires_grad_(), ks=[1, 2])
    assert calls == [0, 1]
    assert not any(t.requires_grad for t in gathered.values())


def test_unknown_k_is_refused():
    gather = Gather(seeded("vit_small_patch16_224", **TINY_VIT))
    with pytest.raises(ValueError, match="1..4"):
        gather(random_images(1), ks=[5])


def test_gather_is_public_and_loaded_lazily():
    import subprocess
    import sys

    import deltavision.mist
    from deltavision.mist.server.gather import Gather as Direct

    assert deltavision.mist.Gather is Direct
    script = "import sys, deltavision.mist; print(any(m.startswith('deltavision.mist.server') for m in sys.modules))"
    # deltavision/__init__ loads the model API (and timm); what matters is that mist itself loads no server module
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-500:]
