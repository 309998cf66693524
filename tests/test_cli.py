"""The ``deltavision`` command line.

Success paths that do not need ``main()`` run in-process through typer's CliRunner. User errors
are checked through the real entry point, ``python -m deltavision.cli`` (``main()`` turns a
DeltaVisionError into one ``error:`` line and exit status 2; CliRunner invoking ``app`` would
bypass it). Each subprocess imports torch and timm (several seconds), so all error cases are
started together in a small thread pool as soon as the module's first test runs, and the CLI
smoke run (train -> eval -> merge on the real embedded EfficientNet-Lite0 and real digits) runs
meanwhile.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import timm
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltavision
from deltavision.cli import app
from deltavision.train import RunConfig, TrainConfig, run_training

from conftest import METHODS, TINY, file_snapshot

EMBEDDED = "tf_efficientnet_lite0"
SMOKE_ARGS = ["--image-size", "32", "--train-limit", "40", "--val-limit", "20", "--epochs", "1", "--batch-size", "8"]
SUBPROCESS_TIMEOUT = 300


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # one thread: see conftest.py
    return subprocess.run(
        [sys.executable, "-m", "deltavision.cli", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=SUBPROCESS_TIMEOUT,
    )


def assert_user_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, shown
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert re.search(pattern, lines[0]), shown


# --- in-process: help, methods, params -----------------------------------------------------------

runner = CliRunner()
COMMANDS = [[], ["methods"], ["params"], ["train"], ["eval"], ["merge"], ["compare"], ["bench"], ["bench", "vtab"]]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "root" for c in COMMANDS])
def test_help_of_every_command(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_methods_lists_every_registered_method():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    listed = {line.split("│")[1].strip() for line in result.output.splitlines() if line.count("│") >= 3}
    assert set(METHODS) <= listed


@pytest.mark.parametrize(
    "command,text",
    [
        ("train", "AdamW learning rate [default: the method's]."),
        ("train", "Input size [default: the backbone's]."),
        ("compare", "Methods to compare (repeatable) [default: all]."),
    ],
)
def test_help_shows_bracketed_text(command, text):
    """Rich markup once swallowed "[default: ...]" in help texts."""
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    assert text in " ".join(result.output.split())


def test_methods_shows_options_with_defaults_and_families():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "300"})
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 5}
    assert "rank=8 alpha=8.0" in rows["lora"] and "convnext, efficientnet, resnet, swin, vit" in rows["lora"]
    assert "num_tokens=10 deep=False" in rows["vpt"] and "│ vit " in rows["vpt"]
    assert "any timm model" in rows["bitfit"] and "k=1" in rows["partial"]


def test_misspelt_backbone_suggests_the_embedded_one_first():
    from deltavision.backbones import suggest_backbones

    assert suggest_backbones("efficientnet_lite00")[0].startswith("tf_efficientnet_lite0 (embedded")
    assert "tf_efficientnet_lite0" not in " ".join(suggest_backbones("vit_base_patch16_244"))


def test_params_json_for_vit_base_ssf():
    result = runner.invoke(
        app, ["params", "--backbone", "vit_base_patch16_224", "--method", "ssf", "--num-classes", "100", "--json"]
    )
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert counts["trainable"] == 282_724  # 12 x 2 x (4*768 + 2304 + 3072) + 2 x (2*768) + 768*100 + 100
    assert counts["total"] == 85_875_556 + 282_724 - 76_900
    assert counts["trainable_pct"] == pytest.approx(100 * 282_724 / counts["total"], abs=1e-4)
    assert {"backbone", "method", "num_classes"} <= set(counts)


def test_params_json_for_swin_base_bitfit_counts_the_attention_bias_tables():
    """BitFit on Swin-B trains 0.20M body parameters as in the papers' tables: 137,216 biases plus
    63,544 relative-position bias tables (169 rows x heads, summed over 24 blocks), and the head."""
    result = runner.invoke(
        app, ["params", "--backbone", "swin_base_patch4_window7_224", "--method", "bitfit", "--num-classes", "100", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["trainable"] == 137_216 + 169 * (2 * 4 + 2 * 8 + 18 * 16 + 2 * 32) + 1024 * 100 + 100


# --- fixtures for the subprocess runs ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit_run(tmp_path_factory, digits_folder):
    """A finished 1-epoch run (10 classes, with data settings) made in-process: an existing output."""
    name, opts = TINY["vit"]
    out = tmp_path_factory.mktemp("cli") / "tiny-run"
    run_training(RunConfig(
        backbone=name, method="ssf", data=str(digits_folder), out_dir=str(out), image_size=32,
        pretrained=False, backbone_options=opts, train=TrainConfig(epochs=1, batch_size=32, progress=False),
    ))
    return out


@pytest.fixture(scope="module")
def corrupt_adapter(tmp_path_factory):
    """An embedded-backbone SSF adapter folder whose safetensors file is garbage."""
    model = deltavision.create_model(EMBEDDED, "ssf", 10, pretrained=False)
    directory = deltavision.save_adapter(model, tmp_path_factory.mktemp("cli") / "corrupt-adapter")
    (directory / "deltavision.safetensors").write_bytes(os.urandom(3000))
    return directory


@pytest.fixture(scope="module")
def error_cases(tmp_path_factory, digits_folder, three_class_folder, corrupt_image_folder, empty_folder,
                tiny_vit_run, corrupt_adapter):
    """id -> (future of the CLI result, error pattern, {folder: snapshot that must not change} or paths that must not appear)."""
    scratch = tmp_path_factory.mktemp("cli-errors")
    existing_file = scratch / "existing.safetensors"
    existing_file.write_bytes(b"keep me")
    mistyped = tmp_path_factory.mktemp("cli") / "mistyped-adapter"
    shutil.copytree(tiny_vit_run / "adapter", mistyped)
    config = json.loads((mistyped / "deltavision.json").read_text())
    (mistyped / "deltavision.json").write_text(json.dumps({**config, "seed": "abc"}))
    cases = {
        "output folder under a file": (["train", "--data", digits_folder, "--out", existing_file / "run"],
                                       r"cannot write to .*existing.safetensors/run: Not a directory"),
        "adapter config of the wrong type": (["eval", mistyped], r"deltavision.json: seed should be an integer, not 'abc'"),
        "unknown backbone": (["train", "--data", digits_folder, "--backbone", "vit_nope_patch16", "--out", scratch / "a"],
                             r"unknown backbone 'vit_nope_patch16'"),
        "unknown method": (["params", "--backbone", EMBEDDED, "--method", "sff", "--num-classes", "3"],
                           r"unknown method 'sff'; choose one of"),
        "opt without =": (["train", "--data", digits_folder, "--opt", "k", "--out", scratch / "b"], r"key=value"),
        "empty data folder": (["train", "--data", empty_folder, "--out", scratch / "d"], r"no class subfolders"),
        "corrupt image": (["train", "--data", corrupt_image_folder, "--out", scratch / "e"], r"Corrupt or unreadable image"),
        "eval on data with another class count": (["eval", tiny_vit_run / "adapter", "--data", three_class_folder],
                                                  r"3 classes but the adapter was trained for 10"),
        "existing run without --overwrite": (["train", "--data", digits_folder, "--out", tiny_vit_run], r"already exists"),
        "merge to an existing file": (["merge", corrupt_adapter, "--out", existing_file], r"already exists"),
        "merge of a corrupt adapter": (["merge", corrupt_adapter, "--out", scratch / "merged.safetensors"],
                                       r"not a readable safetensors"),
        "unknown augmentation policy": (["train", "--data", digits_folder, "--auto-augment", "rand-q9",
                                         "--out", scratch / "g"], r"--auto-augment 'rand-q9' is not a timm policy"),
        "mixup for segmentation": (["train", "--data", "fashion-scenes", "--task", "segmentation", "--mixup", "0.8",
                                    "--out", scratch / "h"], r"--mixup apply to classification only"),
        "offline hub weights": (["train", "--data", digits_folder, "--backbone", "vit_tiny_patch16_224", "--image-size", "32",
                                 "--out", scratch / "f"], r"--checkpoint"),
    }
    unchanged = {"existing run without --overwrite": tiny_vit_run, "merge to an existing file": scratch}
    snapshots = {key: file_snapshot(folder) for key, folder in unchanged.items()}
    pool = ThreadPoolExecutor(max_workers=3)
    futures = {key: pool.submit(run_cli, *args, cwd=scratch) for key, (args, _) in cases.items()}
    yield {key: (futures[key], pattern, unchanged.get(key), snapshots.get(key), scratch)
           for key, (_, pattern) in cases.items()}
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def smoke_run(error_cases, tmp_path_factory, digits_folder):
    """`deltavision train` with the real embedded EfficientNet-Lite0 on the real digits folder, 1 epoch."""
    out = tmp_path_factory.mktemp("cli-smoke") / "run"
    result = run_cli("train", "--data", digits_folder, "--out", out, *SMOKE_ARGS)
    return out, result


# --- the smoke run: train -> eval -> merge -------------------------------------------------------


@pytest.mark.slow
def test_cli_train_smoke(smoke_run):
    out, result = smoke_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "top-1" in result.stdout
    assert "data: 40 training / 20 validation images, 10 classes (" in result.stdout
    assert (out / "adapter" / "deltavision.safetensors").is_file()
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "adapter" / "deltavision.json").read_text())
    assert (config["backbone"], config["method"], config["num_classes"]) == (EMBEDDED, "ssf", 10)
    assert len((out / "log.csv").read_text().strip().splitlines()) == 2  # header + 1 epoch


@pytest.fixture(scope="module")
def adapter_model(smoke_run):
    """The smoke run's adapter rebuilt in-process on the embedded ImageNet weights, in eval mode."""
    out, result = smoke_run
    assert result.returncode == 0, result.stderr
    return deltavision.load_adapter(out / "adapter").eval()


@pytest.mark.slow
def test_cli_eval_reproduces_the_logged_accuracy(smoke_run):
    out, _ = smoke_run
    result = run_cli("eval", out / "adapter", "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    logged = (out / "log.csv").read_text().strip().splitlines()
    header, row = logged[0].split(","), logged[1].split(",")
    last = dict(zip(header, row))
    assert metrics["images"] == 20
    assert metrics["top1"] == pytest.approx(float(last["top1"]))
    assert metrics["top5"] == pytest.approx(float(last["top5"]))


@pytest.fixture(scope="module")
def merged_file(smoke_run):
    out, _ = smoke_run
    target = out.parent / "merged.safetensors"
    result = run_cli("merge", out / "adapter", "--out", target)
    assert result.returncode == 0, result.stderr
    return target, result


def _eval_outputs(model):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.slow
def test_cli_merge_gives_a_plain_timm_state_dict_with_the_same_outputs(merged_file, adapter_model):
    target, _ = merged_file
    plain = timm.create_model(EMBEDDED, num_classes=10, pretrained=False)
    plain.load_state_dict(load_file(str(target)), strict=True)
    reference = _eval_outputs(adapter_model)
    assert (_eval_outputs(plain) - reference).abs().max().item() <= 1e-4


def _printed_recipe(result) -> str:
    """The timm call printed by `merge`, with rich's line wrapping undone."""
    text = "".join(line.strip() for line in result.stdout.splitlines())
    match = re.search(r"timm\.create_model\(.*\)\)", text)
    assert match, result.stdout
    return match.group(0)


@pytest.mark.slow
def test_cli_merge_prints_the_timm_loading_recipe(merged_file):
    target, result = merged_file
    recipe = _printed_recipe(result).replace(" ", "")
    assert recipe.startswith(f"timm.create_model('{EMBEDDED}',num_classes=10,")
    assert "pretrained=True" in recipe and "pretrained_cfg_overlay=dict(" in recipe
    assert f"file='{target}'" in recipe


@pytest.mark.slow
def test_cli_merge_recipe_loads_the_merged_model_with_plain_timm(merged_file, adapter_model):
    """Plain timm (create_model with pretrained=True and a pretrained_cfg_overlay naming the file, as the
    merge command prints it) reproduces the adapter model's eval outputs."""
    _, result = merged_file
    plain = eval(_printed_recipe(result), {"timm": timm})
    worst = (_eval_outputs(plain) - _eval_outputs(adapter_model)).abs().max().item()
    assert worst <= 1e-4, f"the model loaded by the printed recipe differs by {worst:.3g}: {_printed_recipe(result)}"


@pytest.mark.slow
def test_cli_merge_recipe_is_printed_on_one_line(merged_file):
    """The printed call must survive copy-paste from a pipe or a log (stdout is not a terminal here)."""
    _, result = merged_file
    lines = [line.strip() for line in result.stdout.splitlines() if "timm.create_model(" in line]
    assert len(lines) == 1 and lines[0].endswith("))"), result.stdout


# --- user errors through the real entry point ----------------------------------------------------

ERROR_IDS = [
    "output folder under a file", "adapter config of the wrong type",
    "unknown backbone", "unknown method", "opt without =", "empty data folder", "corrupt image",
    "eval on data with another class count", "existing run without --overwrite", "merge to an existing file",
    "merge of a corrupt adapter", "offline hub weights", "unknown augmentation policy", "mixup for segmentation",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", ERROR_IDS)
def test_user_error_exits_2_with_one_error_line(case, error_cases):
    future, pattern, folder, snapshot, scratch = error_cases[case]
    assert_user_error(future.result(timeout=SUBPROCESS_TIMEOUT + 60), pattern)
    if folder is not None:
        assert file_snapshot(folder) == snapshot, "an existing output was modified"
    # no failing command leaves a run folder or a merged file behind (cwd of every case is `scratch`)
    assert sorted(p.name for p in scratch.iterdir()) == ["existing.safetensors"]


@pytest.mark.slow
def test_cli_run_training_and_compare_train_identically(smoke_run, digits_folder, tmp_path):
    """Defaults (the method's learning rate included) are resolved once: the CLI's run, run_training with
    the same settings and compare's configuration for that method agree, down to the loss curve."""

    from deltavision.compare import CompareConfig, _run_config
    from deltavision.train.run import resolve_run, settings_json

    out, result = smoke_run
    assert result.returncode == 0, result.stderr
    cli_settings = json.loads((out / "run.json").read_text())["settings"]
    assert cli_settings["train"]["lr"] == deltavision.methods.get_method("ssf").default_lr

    api = RunConfig(backbone=EMBEDDED, method="ssf", data=str(digits_folder), out_dir=str(tmp_path / "api"),
                    image_size=32, train_limit=40, val_limit=20,
                    train=TrainConfig(epochs=1, batch_size=8, progress=False))
    summary = run_training(api)
    api_settings = json.loads((tmp_path / "api" / "run.json").read_text())["settings"]
    free = ("out_dir", "resume", "overwrite")
    same = lambda s: {k: v for k, v in s.items() if k not in free} | {"train": {**s["train"], "progress": None}}
    assert same(api_settings) == same(cli_settings)
    assert summary["train_loss"] == pytest.approx(float(_last_log_row(out)["train_loss"]), rel=1e-6)

    compare = CompareConfig(data=str(digits_folder), image_size=32, train_limit=40, val_limit=20, augment=True,
                            train=TrainConfig(epochs=1, batch_size=8, progress=False))
    compared = settings_json(resolve_run(_run_config(compare, "ssf", 0)))
    assert same(compared) == same(cli_settings)


def _last_log_row(out):
    header, *rows = (out / "log.csv").read_text().strip().splitlines()
    return dict(zip(header.split(","), rows[-1].split(",")))


@pytest.mark.slow
def test_an_adapter_from_a_newer_version_gives_one_warning_line(tiny_vit_run, tmp_path):
    newer = tmp_path / "newer-adapter"
    shutil.copytree(tiny_vit_run / "adapter", newer)
    config = json.loads((newer / "deltavision.json").read_text())
    (newer / "deltavision.json").write_text(json.dumps({**config, "deltavision_version": "99.0.0"}))
    result = run_cli("eval", newer, "--no-pretrained")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "99.0.0" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), result.stderr
    assert "Warning" not in result.stderr


def test_error_text_in_square_brackets_is_printed_as_written(monkeypatch, capsys):
    """An install hint like deltavision[export] must not vanish as console markup."""
    import deltavision.cli as cli
    from deltavision.errors import DeltaVisionError

    def fail():
        raise DeltaVisionError("ONNX export needs onnxscript: pip install 'deltavision[export]'")

    monkeypatch.setattr(cli, "app", fail)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert "pip install 'deltavision[export]'" in capsys.readouterr().err
