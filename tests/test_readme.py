"""README.md as a user reads it: its Python snippets run, its commands fit a fresh machine.

Every ```python block is executed, in order and in one namespace, in a scratch folder that holds
``flowers.safetensors`` (a merged 10-class EfficientNet-Lite0, as `deltavision merge` writes it).
A block whose first line says it "needs network" (hub downloads or files a reader supplies) is
only compiled: the tests run offline.
"""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltavision
from deltavision.inference import merge_saved_adapter, timm_loading_call

README = Path(__file__).resolve().parents[1] / "README.md"
CI = Path(__file__).resolve().parents[1] / ".ci" / "run"
EMBEDDED = "tf_efficientnet_lite0"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _needs_network(block: str) -> bool:
    return block.lstrip().startswith("#") and "needs network" in block.splitlines()[0]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder with flowers.safetensors: a 10-class SSF adapter with a trained-looking head, merged."""
    folder = tmp_path_factory.mktemp("readme")
    model = deltavision.create_model(EMBEDDED, "ssf", 10)
    with torch.no_grad():
        model.get_classifier().weight.copy_(torch.randn(model.get_classifier().weight.shape))
    deltavision.save_adapter(model, folder / "trained")
    merge_saved_adapter(folder / "trained", folder / "flowers.safetensors", None, True, False)
    return folder


def test_readme_has_python_snippets_and_marks_the_ones_needing_network():
    blocks = _blocks("python")
    assert len(blocks) >= 3
    assert sum(not _needs_network(b) for b in blocks) >= 3


def test_readme_python_snippets_run(scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    namespace: dict = {}
    for number, block in enumerate(_blocks("python"), 1):
        code = compile(block, f"README.md python block {number}", "exec")
        if not _needs_network(block):
            exec(code, namespace)


def test_readme_timm_snippet_is_the_one_merge_prints_and_keeps_the_trained_classifier(scratch, monkeypatch):
    call = timm_loading_call(EMBEDDED, 10, "flowers.safetensors")
    block = next(b for b in _blocks("python") if "timm.create_model(" in b)
    assert call in block
    monkeypatch.chdir(scratch)
    namespace: dict = {}
    exec(block, namespace)
    trained = load_file(str(scratch / "flowers.safetensors"))["classifier.weight"]
    assert torch.equal(namespace["model"].classifier.weight, trained)


def test_readme_setup_commands_use_a_virtual_environment():
    """Stock Debian's python3 refuses `pip install` (PEP 668): the commands make and use a venv."""
    commands = [line for b in _blocks("bash") for line in b.splitlines() if "pip install -e" in line]
    assert len(commands) == 2
    for line in commands:
        assert re.search(r"python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e", line), line
    assert "python3-venv" in commands[0] and "dataset-fashion-mnist" in commands[0]
    assert commands[0].endswith("deltavision compare")


def test_ci_runs_the_readme_test_command():
    test_command = next(line for b in _blocks("bash") for line in b.splitlines() if "pytest" in line)
    assert test_command in CI.read_text()


def test_readme_tells_cpu_users_how_to_get_the_cpu_build_of_torch():
    text = README.read_text()
    assert re.search(r"pip install torch torchvision --index-url \S+/cpu", text)
