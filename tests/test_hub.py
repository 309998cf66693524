"""Adapters on the Hugging Face Hub, without network.

Loading goes through a hub cache laid out as huggingface_hub writes it
(``models--org--name/snapshots/<commit>/`` and ``refs/<revision>``) in a
temporary folder, with ``HF_HUB_OFFLINE=1`` (conftest). Pushing goes through a
stand-in for ``HfApi`` that records what would be uploaded; the uploaded files
are then placed in the cache and the model card's own loading snippet is run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltavision as dv
from deltavision.cli import app
from deltavision.errors import AdapterFileError, HubError
from deltavision.model import count_parameters, read_adapter_config
from deltavision.model.hub import push_adapter
from deltavision.train import RunConfig, TrainConfig, run_training

from conftest import TINY, place_in_cache, plain_tiny, random_images, tiny_model

REPO = "deltavision-tests/tiny-vit-ssf"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, digits_folder):
    """A finished 2-epoch SSF run on the tiny random-init ViT (log.csv, curves.png, adapter/)."""
    name, opts = TINY["vit"]
    out = tmp_path_factory.mktemp("hub") / "run"
    run_training(RunConfig(
        backbone=name, method="ssf", data=str(digits_folder), out_dir=str(out), image_size=32,
        pretrained=False, backbone_options=opts, train=TrainConfig(epochs=2, batch_size=32, progress=False),
    ))
    return out


def logits(model, seed=0):
    model.eval()
    with torch.no_grad():
        return model(random_images(seed=seed))


# --- loading hf-hub: ids -----------------------------------------------------------------------------


def test_load_adapter_from_the_hub_cache_offline(tiny_run, hub_cache):
    place_in_cache(hub_cache, REPO, tiny_run / "adapter")
    from_hub = dv.load_adapter(f"hf-hub:{REPO}", pretrained=False)
    local = dv.load_adapter(tiny_run / "adapter", pretrained=False)
    assert torch.equal(logits(from_hub), logits(local))
    assert read_adapter_config(f"hf-hub:{REPO}") == read_adapter_config(tiny_run / "adapter")


def test_a_revision_after_at_picks_that_snapshot(tmp_path, hub_cache):
    first, second = load_into_fresh(None), load_into_fresh(None)
    with torch.no_grad():
        second.get_classifier().weight.add_(1.0)  # another trained head
    main = place_in_cache(hub_cache, REPO, dv.save_adapter(first, tmp_path / "first"))
    tagged = place_in_cache(hub_cache, REPO, dv.save_adapter(second, tmp_path / "second"), revision="v2")
    assert main != tagged
    loaded = {rev: load_into_fresh(f"hf-hub:{REPO}{rev}") for rev in ("", "@main", "@v2", f"@{tagged}")}
    assert torch.equal(logits(loaded[""]), logits(first))
    assert torch.equal(logits(loaded["@main"]), logits(first))
    assert torch.equal(logits(loaded["@v2"]), logits(second))
    assert torch.equal(logits(loaded[f"@{tagged}"]), logits(second))


def load_into_fresh(source):
    """A fresh tiny ViT + SSF (the same frozen backbone every call) with ``source``'s tensors, if given."""
    torch.manual_seed(0)
    model = tiny_model("vit", "ssf")
    return model if source is None else dv.load_adapter(source, model)


def test_offline_with_nothing_cached_fails_at_once_with_one_clear_message(hub_cache):
    start = time.monotonic()
    with pytest.raises(HubError) as caught:
        dv.load_adapter("hf-hub:deltavision-tests/not-cached", pretrained=False)
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert re.fullmatch(
        r"cannot download hf-hub:deltavision-tests/not-cached: offline \(HF_HUB_OFFLINE is set\) and it is not in "
        r"the local cache \(.*hf-cache\)", message), message


def test_no_network_fails_in_seconds_through_the_cli(hub_cache, tmp_path):
    """Online mode with the hub unreachable (a closed local port): one error line, exit status 2."""
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", OMP_NUM_THREADS="1")
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "deltavision.cli", "eval", "hf-hub:deltavision-tests/unreachable"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    took = time.monotonic() - start
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot download hf-hub:deltavision-tests/unreachable: the hub cannot be "
                               "reached and it is not in the local cache"), lines[0]
    assert took < 60, f"took {took:.0f} s"  # a python start with torch and timm imports, on a loaded machine


@pytest.mark.parametrize("source,pattern", [
    ("hf-hub:not a repo", r"is not a hub id of the form hf-hub:org/name\[@revision\]"),
    ("hf-hub:org/name@", r"nothing after '@'"),
])
def test_malformed_hub_ids_are_refused(source, pattern, hub_cache):
    with pytest.raises(HubError, match=pattern):
        read_adapter_config(source)


def test_a_cached_repository_without_our_config_is_not_an_adapter(tmp_path, hub_cache):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    place_in_cache(hub_cache, "deltavision-tests/not-an-adapter", other)
    with pytest.raises(HubError, match="holds no deltavision.json: it is not a deltavision adapter"):
        dv.load_adapter("hf-hub:deltavision-tests/not-an-adapter")


# --- pushing ----------------------------------------------------------------------------------------


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls and a copy of each uploaded folder."""

    calls: list = []

    def __init__(self, token=None, **_):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in sorted(folder_path.iterdir())}
        self.calls.append(("upload_folder", repo_id, {**kwargs, "files": files, "token": self.token}))
        return SimpleNamespace(commit_url=f"https://hub.example/{repo_id}/commit/1")  # what push reads of CommitInfo


@pytest.fixture
def recording_api(monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi


@pytest.fixture
def pushed(tiny_run, recording_api):
    url = push_adapter(tiny_run / "adapter", REPO, private=True, token="secret")
    (_, repo, create_args), (_, _, upload) = recording_api.calls
    return url, repo, create_args, upload


def test_push_creates_the_repository_and_uploads_adapter_run_files_and_card(pushed, tiny_run):
    url, repo, create_args, upload = pushed
    assert url == f"https://hub.example/{REPO}/commit/1"
    assert repo == REPO and create_args == {"private": True, "exist_ok": True}
    assert upload["token"] == "secret"
    files = upload["files"]
    assert sorted(files) == ["README.md", "curves.png", "deltavision.json", "deltavision.safetensors", "log.csv"]
    for name in ("curves.png", "log.csv"):
        assert files[name] == (tiny_run / name).read_bytes()
    for name in ("deltavision.json", "deltavision.safetensors"):
        assert files[name] == (tiny_run / "adapter" / name).read_bytes()


def test_model_card_states_backbone_method_parameters_metrics_and_curves(pushed, tiny_run):
    card = pushed[3]["files"]["README.md"].decode()
    front, body = re.fullmatch(r"---\n(.*?)\n---\n(.*)", card, flags=re.S).groups()
    assert "library_name: deltavision" in front and "pipeline_tag: image-classification" in front
    assert "base_model" not in front  # the run trained a random-init backbone, not timm's weights
    config = read_adapter_config(tiny_run / "adapter")
    counts = count_parameters(dv.load_adapter(tiny_run / "adapter", pretrained=False))
    assert f"| backbone | `{config['backbone']}` |" in body
    assert "| method | `ssf` |" in body
    assert "| backbone options | `depth=2`, `embed_dim=32`, `img_size=32`, `num_heads=2`, `patch_size=8` |" in body
    assert f"| trainable parameters | {counts['trainable']:,} of {counts['total']:,} (" in body
    header, *rows = (tiny_run / "log.csv").read_text().strip().splitlines()
    last = dict(zip(header.split(","), rows[-1].split(",")))
    assert f"After 2 epochs: top-1 **{float(last['top1']):.2f}%**, top-5 {float(last['top5']):.2f}%" in body
    assert body.count("\n| 1 | ") == 1 and body.count("\n| 2 | ") == 1  # one table row per epoch
    assert "![training curves](curves.png)" in body
    assert "Output index order: `0`, `1`, `2`" in body
    assert f"deltavision eval hf-hub:{REPO} --data" in body
    assert f"deltavision merge hf-hub:{REPO} --out" in body  # ssf folds


def test_model_card_loading_snippet_works_against_the_hub_copy(pushed, tiny_run, hub_cache, tmp_path):
    uploaded = tmp_path / "uploaded"
    uploaded.mkdir()
    for name, data in pushed[3]["files"].items():
        (uploaded / name).write_bytes(data)
    place_in_cache(hub_cache, REPO, uploaded)
    card = (uploaded / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert f"dv.load_adapter('hf-hub:{REPO}', pretrained=False)" in snippet
    namespace: dict = {}
    exec(compile(snippet, "model card snippet", "exec"), namespace)
    assert namespace["logits"].shape == (1, 10)
    trained = dv.load_adapter(tiny_run / "adapter", pretrained=False)
    assert torch.equal(logits(namespace["model"]), logits(trained))


def test_model_card_of_a_pretrained_run_names_the_timm_weights_and_loads_them_by_default(tmp_path, recording_api):
    model = dv.create_model("tf_efficientnet_lite0", "bitfit", 3)  # the embedded weights: offline
    adapter = dv.save_adapter(model, tmp_path / "adapter", extra={"run": {"pretrained": True}})
    push_adapter(adapter, "org/lite0-bitfit")
    card = recording_api.calls[1][2]["files"]["README.md"].decode()
    assert "base_model: timm/tf_efficientnet_lite0.in1k" in card
    assert "dv.load_adapter('hf-hub:org/lite0-bitfit').eval()" in card
    assert "## Results" not in card  # no log.csv next to the folder, so no metrics are claimed


def test_push_refuses_an_adapter_that_does_not_load_and_uploads_nothing(tiny_run, tmp_path, recording_api):
    broken = tmp_path / "adapter"
    shutil.copytree(tiny_run / "adapter", broken)
    other = dv.save_adapter(tiny_model("vit", "lora"), tmp_path / "lora")
    shutil.copyfile(other / "deltavision.safetensors", broken / "deltavision.safetensors")
    with pytest.raises(AdapterFileError, match="does not fit this model"):
        push_adapter(broken, REPO)
    assert recording_api.calls == []


@pytest.mark.parametrize("repo,pattern", [
    ("org/name@dev", r"the repository is org/name, not org/name@dev; a branch goes in revision"),
    ("not a repo", r"is not a hub id of the form"),
])
def test_push_refuses_a_malformed_repository_name(repo, pattern, tiny_run, recording_api):
    with pytest.raises(HubError, match=pattern):
        push_adapter(tiny_run / "adapter", repo)
    assert recording_api.calls == []


def test_push_offline_gives_one_clear_error(tiny_run):
    """The real HfApi with HF_HUB_OFFLINE=1 (conftest): the request is refused before any network use."""
    with pytest.raises(HubError, match=rf"^could not push to {REPO}: .*HF_TOKEN\)$"):
        push_adapter(tiny_run / "adapter", REPO)


def test_cli_push_prints_the_commit_and_how_to_load_it(tiny_run, recording_api):
    result = CliRunner().invoke(app, ["push", str(tiny_run / "adapter"), "--repo", REPO, "--message", "first"])
    assert result.exit_code == 0, result.output
    assert f"https://hub.example/{REPO}/commit/1" in result.output
    assert f'dv.load_adapter("hf-hub:{REPO}")' in result.output
    assert recording_api.calls[1][2]["commit_message"] == "first"


@pytest.mark.parametrize("command", ["eval", "merge", "export", "push"])
def test_help_of_adapter_commands_explains_the_adapter_argument(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    unwrapped = re.sub(r"\s+", "", result.output)  # help wraps lines, even inside an id
    assert ("hf-hub:org/name[@revision]" in unwrapped) == (command != "push")


def test_cli_eval_and_merge_take_an_hf_hub_id(tiny_run, hub_cache, tmp_path):
    place_in_cache(hub_cache, REPO, tiny_run / "adapter")
    runner = CliRunner()
    scored = runner.invoke(app, ["eval", f"hf-hub:{REPO}", "--no-pretrained", "--json"])
    assert scored.exit_code == 0, scored.output
    header, *rows = (tiny_run / "log.csv").read_text().strip().splitlines()
    logged = dict(zip(header.split(","), rows[-1].split(",")))
    assert json.loads(scored.output.strip().splitlines()[-1])["top1"] == pytest.approx(float(logged["top1"]))
    out = tmp_path / "merged.safetensors"
    merged = runner.invoke(app, ["merge", f"hf-hub:{REPO}", "--no-pretrained", "--out", str(out)])
    assert merged.exit_code == 0, merged.output
    plain = plain_tiny("vit", 10)
    plain.load_state_dict(load_file(str(out)))
    assert torch.allclose(logits(plain), logits(dv.load_adapter(tiny_run / "adapter", pretrained=False)), atol=1e-5)
