"""Many tasks on one frozen backbone (deltavision.multitask.MultiTaskModel)."""

import itertools
import json

import pytest
import torch

import deltavision
from deltavision.errors import AdapterFileError, DeltaVisionError, IncompatibleMethodError
from deltavision.model import adapter_state_dict, load_adapter_tensors
from deltavision.multitask import MultiTaskModel

from conftest import NUM_CLASSES, TINY, random_images, tiny_model

VIT_NAME, VIT_OPTS = TINY["vit"]
TASKS = {"mona": 3, "lora": 4, "houlsby": 5, "vpt": 6, "adaptformer": 7}  # task (= method) -> class count
REFUSED = ("bitfit", "full", "norm", "partial")


def _tensors(module):
    return list(itertools.chain(module.parameters(), module.buffers()))


def _bytes(tensors):
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _out(module, x, **kwargs):
    module.eval()
    with torch.no_grad():
        return module(x, **kwargs)


@pytest.fixture
def multi(backbone_checkpoint):
    """A MultiTaskModel on the tiny ViT checkpoint with one trained-looking task per adapter method."""
    ckpt = backbone_checkpoint("vit")
    mt = MultiTaskModel(VIT_NAME, pretrained=False, checkpoint=ckpt, backbone_options=VIT_OPTS)
    for seed, (method, classes) in enumerate(TASKS.items()):
        _perturb(mt.add_task(method, method, classes), seed)
    return mt.eval(), ckpt


X = random_images(batch=2, seed=21)


def test_each_task_equals_a_standalone_model_with_the_same_weights(multi, tmp_path):
    mt, ckpt = multi
    assert list(mt.tasks) == list(TASKS)
    for method, classes in TASKS.items():
        got = _out(mt, X, task=method)
        assert got.shape == (2, classes)
        directory = mt.save_task(method, tmp_path / method)
        standalone = deltavision.load_adapter(directory, pretrained=False, checkpoint=ckpt)
        assert standalone.deltavision.method == method
        assert not any(t.data_ptr() in {b.data_ptr() for b in _tensors(mt.backbone)} for t in _tensors(standalone))
        torch.testing.assert_close(_out(standalone, X), got, atol=1e-6, rtol=1e-6)
        # and against a standalone built with create_model and the task's tensors copied in
        built = tiny_model("vit", method, num_classes=classes, checkpoint=ckpt)
        load_adapter_tensors(built, adapter_state_dict(mt.task(method)), method)
        torch.testing.assert_close(_out(built, X), got, atol=1e-6, rtol=1e-6)


def test_activate_and_task_argument_switch_tasks(multi):
    mt, _ = multi
    assert mt.active == "adaptformer"  # the last task added is active
    outputs = {m: _out(mt, X, task=m) for m in TASKS}
    for method in TASKS:
        mt.activate(method)
        assert mt.active == method
        assert torch.equal(_out(mt, X), outputs[method])
        assert torch.equal(_out(mt.task(), X), outputs[method])
    mt.activate("lora")
    assert torch.equal(_out(mt, X, task="houlsby"), outputs["houlsby"])  # task= wins, active stays
    assert mt.active == "lora"
    # tasks with equal class counts still differ: the adapters, not just the heads, are per task
    assert not torch.allclose(outputs["mona"][:, :3], outputs["lora"][:, :3])
    with pytest.raises(DeltaVisionError, match="nope"):
        mt.activate("nope")
    with pytest.raises(DeltaVisionError):
        mt(X, task="nope")


def test_backbone_tensors_are_shared_not_copied(multi):
    mt, _ = multi
    backbone = {name: t for name, t in itertools.chain(mt.backbone.named_parameters(), mt.backbone.named_buffers())}
    assert backbone and not any(t.requires_grad for t in backbone.values())
    ids = {id(t) for t in backbone.values()}
    ptrs = {t.data_ptr() for t in backbone.values()}
    for method, task in mt.tasks.items():
        tensors = {id(t): t for t in _tensors(task)}
        assert ids <= set(tensors), f"{method} copied backbone tensors"
        # lora renames qkv.weight to qkv.base.weight: the module is wrapped, the tensor is the same object
        timm_model = getattr(task, "backbone", task)  # e3va and vpt tasks own the timm model as ``backbone``
        qkv = timm_model.blocks[0].attn.qkv
        shared_qkv = qkv.base.weight if method == "lora" else qkv.weight
        assert shared_qkv is mt.backbone.blocks[0].attn.qkv.weight
        assert timm_model.pos_embed.data_ptr() == mt.backbone.pos_embed.data_ptr()
        own = [t for t in tensors.values() if id(t) not in ids]
        assert all(t.data_ptr() not in ptrs for t in own)
        # a task's own tensors are exactly what it trains
        assert {id(t) for t in own} == {id(p) for p in task.parameters() if p.requires_grad}
        assert getattr(task, "deltavision_shared_backbone", False)


def test_memory_report_counts_the_backbone_once(multi):
    mt, _ = multi
    report = mt.memory_report()
    assert set(report) == {"backbone", *TASKS}
    assert report["backbone"] == _bytes(_tensors(mt.backbone))
    for method in TASKS:
        task = mt.task(method)
        own = [p for p in task.parameters() if p.requires_grad]
        assert report[method] == _bytes(own) > 0
        saved = adapter_state_dict(task)
        assert report[method] == sum(t.numel() * t.element_size() for t in saved.values())
    # what the whole MultiTaskModel holds is exactly backbone + tasks
    assert _bytes(_tensors(mt)) == sum(report.values())


def test_n_tasks_cost_far_less_than_n_models(backbone_checkpoint):
    ckpt, n = backbone_checkpoint("vit"), 4
    mt = MultiTaskModel(VIT_NAME, pretrained=False, checkpoint=ckpt, backbone_options=VIT_OPTS)
    methods = ["lora", "houlsby", "adaptformer", "vpt"]
    for method in methods:
        mt.add_task(method, method, NUM_CLASSES)
    report = mt.memory_report()
    shared_total = report["backbone"] + sum(report[m] for m in methods)
    separate = [_bytes(_tensors(tiny_model("vit", m, checkpoint=ckpt))) for m in methods]
    assert shared_total == _bytes(_tensors(mt))
    assert shared_total < n * max(separate)
    assert shared_total < sum(separate)
    # the saving is the N - 1 backbone copies not made
    assert sum(separate) - shared_total == (n - 1) * report["backbone"]


@pytest.mark.parametrize("method", REFUSED)
def test_methods_that_train_backbone_tensors_are_refused(multi, method):
    """DESIGN/multitask docstring: full, bitfit, norm, partial and ssf cannot share the backbone."""
    mt, _ = multi
    before = {m: _out(mt, X, task=m) for m in TASKS}
    with pytest.raises(IncompatibleMethodError, match=method):
        mt.add_task("refused", method, NUM_CLASSES)
    assert not any(t.requires_grad for t in _tensors(mt.backbone))
    assert list(mt.tasks) == list(TASKS) and mt.active == "adaptformer"
    for m in TASKS:  # every task still trains its own tensors, and computes what it did
        assert any(p.requires_grad for p in mt.task(m).parameters())
        assert torch.equal(_out(mt, X, task=m), before[m])


def test_linear_probing_can_share_the_backbone(multi):
    mt, _ = multi
    task = mt.add_task("probe", "linear", 2)
    assert {n for n, p in task.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert mt.memory_report()["probe"] == (32 * 2 + 2) * 4


def test_save_task_load_task_round_trip(multi, tmp_path):
    mt, _ = multi
    for method in TASKS:
        directory = mt.save_task(method, tmp_path / method)
        config = json.loads((directory / "deltavision.json").read_text())
        assert config["backbone"] == VIT_NAME and config["method"] == method
        assert config["backbone_options"] == json.loads(json.dumps(VIT_OPTS))
        copy = mt.load_task(f"{method}-copy", directory)
        assert mt.active == f"{method}-copy" and copy is mt.task()
        assert torch.equal(_out(mt, X, task=f"{method}-copy"), _out(mt, X, task=method))
    # loaded tasks share the backbone like the others
    assert _bytes(_tensors(mt)) == sum(mt.memory_report().values())
    with pytest.raises(DeltaVisionError, match="exists"):
        mt.load_task("mona", tmp_path / "mona")


def test_load_task_for_another_backbone_is_an_adapter_error(multi, tmp_path):
    mt, _ = multi
    other = deltavision.save_adapter(tiny_model("swin", "mona"), tmp_path / "swin")
    with pytest.raises(AdapterFileError, match="swin"):
        mt.load_task("swin", other)
    assert "swin" not in mt.tasks and mt.active == "adaptformer"


def test_failed_load_task_leaves_no_half_made_task(multi, tmp_path):
    """Same timm name, other backbone options (embed_dim 48): the load fails, and must not leave an
    untrained task registered (and active) under the requested name."""
    mt, _ = multi
    wider = deltavision.create_model(
        VIT_NAME, "houlsby", NUM_CLASSES, pretrained=False, backbone_options={**VIT_OPTS, "embed_dim": 48}
    )
    directory = deltavision.save_adapter(wider, tmp_path / "wider")
    with pytest.raises(AdapterFileError):
        mt.load_task("wider", directory)
    assert list(mt.tasks) == list(TASKS)
    assert mt.active == "adaptformer"


def test_merge_of_a_shared_task_is_refused(multi):
    mt, _ = multi
    before = {m: _out(mt, X, task=m) for m in TASKS}
    qkv = mt.backbone.blocks[0].attn.qkv.weight.clone()
    for method in TASKS:  # lora would fold; the others cannot; either way a shared task must not merge
        with pytest.raises(IncompatibleMethodError, match="shares its backbone"):
            deltavision.merge(mt.task(method))
    assert torch.equal(mt.backbone.blocks[0].attn.qkv.weight, qkv)
    assert hasattr(mt.task("lora"), "deltavision")
    for m in TASKS:
        assert torch.equal(_out(mt, X, task=m), before[m]), m
    assert not any(t.requires_grad for t in _tensors(mt.backbone))


def test_training_one_task_leaves_the_others_alone(multi):
    mt, _ = multi
    before = {m: _out(mt, X, task=m) for m in TASKS}
    task = mt.task("houlsby")
    deltavision.set_train_mode(task, True)
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.5)
    backbone_before = [t.clone() for t in _tensors(mt.backbone)]
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(task(X), torch.tensor([0, 1])).backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(backbone_before, _tensors(mt.backbone)))
    assert not torch.allclose(_out(mt, X, task="houlsby"), before["houlsby"])
    for m in TASKS:
        if m != "houlsby":
            assert torch.equal(_out(mt, X, task=m), before[m]), m
