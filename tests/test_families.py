"""The Family objects: every family question answered against timm's own forward, for every family."""

import pytest
import torch

from deltavision.anatomy import Family, describe, family_of, get_family, register_family, supported_families
from deltavision.anatomy.layout import Grid, grid_of, join_tokens, split_tokens, to_nchw_map, to_tokens
from deltavision.errors import IncompatibleMethodError

from conftest import FAMILIES, IMAGE_SIZE, plain_tiny, random_images


def _model(family):
    torch.manual_seed(0)
    return plain_tiny(family).eval()


def test_every_tiny_family_is_registered_and_recognised():
    assert set(FAMILIES) <= set(supported_families())
    for family in FAMILIES:
        model = _model(family)
        assert family_of(model) is get_family(family)
        assert describe(model).family == family


def test_registry_refuses_a_second_family_of_the_same_name():
    class Duplicate(Family):
        name = "vit"

    with pytest.raises(ValueError, match="registered already"):
        register_family(Duplicate())


def test_unknown_family_name_is_an_incompatible_method_error():
    with pytest.raises(IncompatibleMethodError, match="known"):
        get_family("alexnet")


@pytest.mark.parametrize("family", FAMILIES)
def test_embed_blocks_head_reproduce_the_timm_forward(family):
    """embed -> every block and downsampling in anatomy order -> head == model(images)."""
    model, spec = _model(family), get_family(family)
    anatomy = describe(model)
    images = random_images(2)
    with torch.no_grad():
        stream = spec.embed(model, images)
        for stage in anatomy.stages:
            if stage.downsample:
                stream = model.get_submodule(stage.downsample)(stream)
            for index in stage.blocks:
                stream = model.get_submodule(anatomy.blocks[index].name)(stream)
        torch.testing.assert_close(spec.head(model, stream), model(images), rtol=1e-5, atol=1e-5)


STAGE_STRIDES = {
    "vit": [8],
    "swin": [4, 8, 16],
    "convnext": [4, 8, 16, 32],
    "efficientnet": [2, 4, 8, 16, 16, 32, 32],
    "resnet": [4, 8, 16, 32],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_outputs_are_nchw_maps_one_per_stage(family):
    model, spec = _model(family), get_family(family)
    anatomy = describe(model)
    with torch.no_grad():
        maps = spec.stage_outputs(model, random_images(2, size=IMAGE_SIZE))
    assert [(f.shape[0], f.shape[1]) for f in maps] == [(2, stage.width) for stage in anatomy.stages]
    assert [IMAGE_SIZE // f.shape[-1] for f in maps] == [IMAGE_SIZE // f.shape[-2] for f in maps] == STAGE_STRIDES[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_branches_of_transformer_blocks_rebuild_the_block(family):
    model, spec = _model(family), get_family(family)
    anatomy = describe(model)
    if anatomy.blocks[0].kind != "transformer":
        assert spec.branches(model.get_submodule(anatomy.blocks[0].name)) == {}
        return
    block = model.get_submodule(anatomy.blocks[0].name)
    with torch.no_grad():
        x = spec.embed(model, random_images(2))
        branches = spec.branches(block)
        x1 = x + branches["attn"](x)
        torch.testing.assert_close(x1 + branches["mlp"](x1), block(x), rtol=1e-5, atol=1e-5)


def test_layout_round_trips():
    x = torch.randn(2, 3 + 4 * 5, 7)
    grid = Grid("tokens", 4, 5, 3)
    prefix, patches = split_tokens(x, grid)
    assert prefix.shape == (2, 3, 7) and patches.shape == (2, 7, 4, 5)
    assert torch.equal(join_tokens(prefix, patches, grid), x)
    assert torch.equal(to_nchw_map(x, grid), patches)
    nchw = torch.randn(2, 7, 4, 5)
    assert grid_of(nchw, "nchw") == Grid("nchw", 4, 5)
    assert torch.equal(to_tokens(nchw, "nchw"), to_tokens(nchw.permute(0, 2, 3, 1), "nhwc"))
    assert grid_of(x, "tokens", (4, 5)) == grid


def test_resnet_lora_defaults_are_the_bottleneck_1x1_convs():
    assert get_family("resnet").lora_targets(_model("resnet")) == ("conv1", "conv3")
