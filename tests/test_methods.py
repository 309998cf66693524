"""Every tuning method on every backbone family: forward, what trains, where gradients flow.

The (method, family) grid is read from ``deltavision.list_methods()`` at collection time, so a
newly registered method is exercised automatically. Methods listed in ``EXPECTED_TRAINABLE``
are checked against the exact set of parameters they promise to train; a method without an
entry still gets the generic checks (the head trains, something besides the head trains,
gradients exist exactly on trainable parameters).
"""

import pytest
import torch
from torch import nn

import deltavision
from deltavision.errors import IncompatibleMethodError
from deltavision.methods import get_method

from conftest import (
    FAMILIES,
    METHODS,
    NORM_MODULES,
    NUM_CLASSES,
    head_prefix,
    random_images,
    tiny_model,
    trainable_names,
)

GRID = [(m, f) for m in METHODS for f in FAMILIES]

# Parameter-name prefixes that partial (k=1) trains besides the classifier: the last block and the
# final norm(s). ConvNeXt's tiny config has one block in its last stage, so k=1 trains that whole
# stage, including the downsampling layer that enters it.
PARTIAL_K1 = {
    "vit": ("blocks.1.", "norm."),
    "swin": ("layers.2.blocks.1.", "norm."),
    "convnext": ("stages.3.blocks.0.", "stages.3.downsample.", "head.norm."),
    "efficientnet": ("blocks.6.0.", "conv_head.", "bn2."),
    "resnet": ("layer4.1.",),
}
# (family, k) -> prefixes for larger k.
PARTIAL_CASES = {
    ("vit", 2): ("blocks.0.", "blocks.1.", "norm."),  # every block, not the embedding
    ("swin", 2): ("layers.2.", "norm."),  # the whole last stage: both blocks and its PatchMerging
}


def _supported(method: str, family: str) -> bool:
    families = get_method(method).families
    return families is None or family in families


SUPPORTED = [(m, f) for m, f in GRID if _supported(m, f)]


def _names(model):
    return [n for n, _ in model.named_parameters()]


def _classifier(model, family):
    return {n for n in _names(model) if n.startswith(head_prefix(model, family))}


def _with_prefixes(model, prefixes):
    return {n for n in _names(model) if n.startswith(tuple(prefixes))}


def _norm_params(model):
    return {
        f"{mod_name}.{p_name}"
        for mod_name, module in model.named_modules()
        if isinstance(module, NORM_MODULES)
        for p_name, _ in module.named_parameters(recurse=False)
    }


EXPECTED_TRAINABLE = {
    "full": lambda model, family: set(_names(model)),
    "linear": lambda model, family: _classifier(model, family),
    "bitfit": lambda model, family: {
        n for n in _names(model) if n.rpartition(".")[2] in ("bias", "relative_position_bias_table")
    }
    | _classifier(model, family),
    "norm": lambda model, family: _norm_params(model) | _classifier(model, family),
    "partial": lambda model, family: _with_prefixes(model, PARTIAL_K1[family]) | _classifier(model, family),
    "ssf": lambda model, family: {n for n in _names(model) if n.endswith((".ssf.scale", ".ssf.shift"))}
    | _classifier(model, family),
}


@pytest.mark.parametrize("method,family", GRID)
def test_trainable_set_is_what_the_method_promises(method, family):
    if not _supported(method, family):
        with pytest.raises(IncompatibleMethodError):
            tiny_model(family, method)
        return
    model = tiny_model(family, method)
    got = trainable_names(model)
    classifier = _classifier(model, family)
    assert classifier and classifier <= got, "the classifier must always train"
    if method in EXPECTED_TRAINABLE:
        expected = EXPECTED_TRAINABLE[method](model, family)
        assert got == expected, (
            f"trains but should not: {sorted(got - expected)[:5]}; frozen but should train: {sorted(expected - got)[:5]}"
        )
    else:
        assert got - classifier, f"{method} trains nothing besides the classifier"
    counts = deltavision.count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    if method != "full":
        assert counts["trainable"] < counts["total"]


@pytest.mark.parametrize("method,family", [(m, f) for m, f in SUPPORTED if m not in ("full", "linear")])
def test_method_trains_something_besides_the_head(method, family):
    """Guards the exact-set test against an expectation that degenerated to the head only."""
    model = tiny_model(family, method)
    assert trainable_names(model) - _classifier(model, family)


@pytest.mark.parametrize("family,k", sorted(PARTIAL_CASES))
def test_partial_k_trains_the_last_k_blocks(family, k):
    model = tiny_model(family, "partial", k=k)
    expected = _with_prefixes(model, PARTIAL_CASES[(family, k)]) | _classifier(model, family)
    assert trainable_names(model) == expected


@pytest.mark.parametrize("method,family", SUPPORTED)
def test_forward_shape_and_gradients_only_on_trainable(method, family):
    model = tiny_model(family, method)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    stats_before = {n: m.running_mean.clone() for n, m in norms.items()}
    deltavision.set_train_mode(model, True)
    logits = model(random_images(batch=2))
    assert logits.shape == (2, NUM_CLASSES)
    # set_train_mode keeps BatchNorm statistics frozen except where full or partial tuning trains the norm
    for name, module in norms.items():
        trains = any(p.requires_grad for p in module.parameters(recurse=False))
        updates = trains and method in ("full", "partial")
        changed = not torch.equal(stats_before[name], module.running_mean)
        assert changed == updates, f"{name}: should update={updates} but running statistics changed={changed}"
    nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"trainable {name} got no gradient"
            assert torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    head_grads = [p.grad for n, p in model.named_parameters() if n.startswith(head_prefix(model, family))]
    assert any(g.abs().sum() > 0 for g in head_grads)

    model.eval()
    with torch.no_grad():
        assert model(random_images(batch=3, seed=1)).shape == (3, NUM_CLASSES)


def _ssf_values(model, which: str) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith(f".ssf.{which}")])


def test_ssf_initialisation_statistics(vit_base_ssf):
    """scale ~ N(1, 0.02) and shift ~ N(0, 0.02) over all 102,912 + 102,912 SSF values of ViT-B/16."""
    scale, shift = _ssf_values(vit_base_ssf, "scale"), _ssf_values(vit_base_ssf, "shift")
    assert scale.numel() == shift.numel() == 12 * (4 * 768 + 2304 + 3072) + 2 * 768
    # standard error of the mean is 0.02 / sqrt(1e5) ~ 6e-5
    assert abs(scale.mean().item() - 1.0) < 1e-3
    assert abs(shift.mean().item()) < 1e-3
    assert abs(scale.std().item() - 0.02) < 1e-3
    assert abs(shift.std().item() - 0.02) < 1e-3


@pytest.mark.parametrize("init_std", [0.1, 0.005])
def test_ssf_init_std_option(init_std):
    model = tiny_model("efficientnet", "ssf", init_std=init_std)
    scale, shift = _ssf_values(model, "scale"), _ssf_values(model, "shift")
    assert scale.numel() > 5000
    assert scale.std().item() == pytest.approx(init_std, rel=0.1)
    assert shift.std().item() == pytest.approx(init_std, rel=0.1)
    assert scale.mean().item() == pytest.approx(1.0, abs=0.1 * init_std)
    assert model.deltavision.options == {"init_std": init_std}
