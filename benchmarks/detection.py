"""Mask R-CNN: training memory and step time on Swin-T, and each method's box/mask AP on fashion-scenes.

Two parts (``--part cost``, ``--part accuracy``, or both, the default).

**cost**: full, linear (the heads alone: the floor), LoRA, Mona, SSF and E3VA r8.

torchvision's Mask R-CNN (``deltavision.create_model(..., task="instance")``,
FPN 256, torchvision's heads) on Swin-T (random init: only the embedded
backbone has offline weights, and weights do not change memory or time), at
320x320 px, batch 2, with a fixed batch of three boxes and masks per image.
For every method this measures

* **peak training memory**: a fresh process per method builds the model and
  the batch, reads the peak RSS, runs training steps (the detector's summed
  loss dict, backward, AdamW over timm's ``param_groups_weight_decay``) and reports how far
  the peak grew (``common.peak_growth``, exact allocation as e3va.py);
* **step time**: one fresh process builds every method and runs their steps
  round-robin (``common.interleaved_medians``), as a ratio to full fine-tuning.

Targets (E3VA's COCO Mask R-CNN figures, PASS/MISS lines): E3VA peak memory
<= 0.45x full fine-tuning and <= 0.64x LoRA's; E3VA step time <= 0.8x full.
Writes detection.md, detection.csv and detection.png.

**accuracy**: ``deltavision train --task instance --data fashion-scenes`` on
the embedded pretrained EfficientNet-Lite0 for full, linear, LoRA, Mona, SSF
and E3VA (one fresh process each, the method's default learning rate capped
at the detector's 1e-3); box and mask AP, AP50 of the last epoch. Finished
runs with the same settings are kept and reused. Writes
detection_accuracy.md, detection_accuracy.csv and detection_accuracy.png.

Usage: ``python benchmarks/detection.py [--quick] [--part cost|accuracy|both] [--out benchmarks/results]``.
The Markdown also goes to stdout.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import deltavision
import common
from common import (
    DEVICE, EMBEDDED, WEIGHT_DECAY, LEARNING_RATE, RunRecord, add_ratios, base_parser, describe_status,
    fitting_methods, fmt, interleaved_medians, kept_or_trained, markdown_table, peak_growth, prepare_all, progress,
    pyplot, run_in_fresh_process, run_script, save_figure, size_options, write_csv, write_sweep,
)
from deltavision.data.segmentation import FASHION_SCENES
from deltavision.train.loop import TrainConfig
from deltavision.train.run import RunConfig
from timm.optim import param_groups_weight_decay

SWIN = "swin_tiny_patch4_window7_224"
FULL, LORA, E3VA = "full", "lora", "e3va-r8"
VARIANTS: dict[str, tuple[str, dict]] = {
    FULL: ("full", {}), "linear": ("linear", {}), LORA: ("lora", {}), "mona": ("mona", {}), "ssf": ("ssf", {}), E3VA: ("e3va", {"rank": 8}),
}
CLASSES = 11  # ten object classes and the background, as fashion-scenes
TARGETS = (
    ("peak memory", "memory_vs_full", 0.45, "full fine-tuning"),
    ("peak memory", "memory_vs_lora", 0.64, "LoRA"),
    ("step time", "step_vs_full", 0.8, "full fine-tuning"),
)


@dataclass(frozen=True)
class Setting:
    image_size: int
    batch: int
    memory_steps: int
    warmup_steps: int
    timed_steps: int
    architecture: dict = field(default_factory=dict)  # timm overrides (empty: the real Swin-T)
    fpn_channels: int = 256
    variants: tuple[str, ...] = tuple(VARIANTS)


FULL_SETTING = Setting(320, 2, 2, 1, 2)
TINY_SWIN = {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2), "window_size": 4}
QUICK_SETTING = Setting(64, 2, 2, 1, 1, TINY_SWIN, fpn_channels=32, variants=(FULL, LORA, E3VA))


@dataclass(frozen=True)
class AccuracySetting:
    image_size: int
    train_scenes: int
    val_scenes: int
    batch: int
    epochs: int
    methods: tuple[str, ...]


ACCURACY_METHODS = ("full", "linear", "lora", "mona", "ssf", "e3va")
# Sized to finish in about an hour on 2 idle CPU cores (about 10 minutes per method).
ACCURACY = AccuracySetting(128, 160, 48, 8, 3, ACCURACY_METHODS)
QUICK_ACCURACY = AccuracySetting(64, 8, 4, 4, 1, ("e3va",))
RUNS_DIR = Path(__file__).resolve().parent / "runs" / "detection"


# ---------------------------------------------------------------- worker side


def fixed_detection_batch(batch: int, size: int) -> tuple[torch.Tensor, list[dict]]:
    """Random images in [0, 1] and three fixed boxes with their rectangular masks per image."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=generator)
    targets = []
    for index in range(batch):
        corners = (torch.rand(3, 2, generator=generator) * 0.6 * size).floor()
        sides = (torch.rand(3, 2, generator=generator) * 0.3 * size + 0.1 * size).floor()
        boxes = torch.cat([corners, corners + sides], dim=1)
        masks = torch.zeros(3, size, size, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes.to(DEVICE), "labels": torch.tensor([1 + index, 2, 3]).to(DEVICE),
                        "masks": masks.to(DEVICE)})
    return images.to(DEVICE), targets


def build_detector(label: str, image_size: int, architecture: dict | None = None, fpn_channels: int = 256
                   ) -> torch.nn.Module:
    method, options = VARIANTS[label]
    return deltavision.create_model(
        SWIN, method, CLASSES, pretrained=False,
        backbone_options={**size_options(SWIN, image_size), **(architecture or {})} or None,
        task="instance", head_options={"image_size": image_size, "fpn_channels": fpn_channels}, **options,
    ).to(DEVICE)


def detection_step(model, optimizer, images, targets) -> None:
    optimizer.zero_grad(set_to_none=True)
    losses = model(list(images), targets)
    sum(losses.values()).backward()
    optimizer.step()


def detection_call(model, images, targets):
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, WEIGHT_DECAY), lr=LEARNING_RATE)
    model.train()
    return functools.partial(detection_step, model, optimizer, images, targets)


def measure_memory(label: str, image_size: int, batch: int, steps: int, architecture: dict, fpn_channels: int
                   ) -> dict:
    model = build_detector(label, image_size, architecture, fpn_channels)
    images, targets = fixed_detection_batch(batch, image_size)
    return {**deltavision.count_parameters(model), **peak_growth(model, images, targets, detection_call, steps)}


def measure_step_times(labels: list[str], image_size: int, batch: int, warmup: int, runs: int,
                       architecture: dict, fpn_channels: int) -> dict:
    images, targets = fixed_detection_batch(batch, image_size)
    calls, skipped = prepare_all(
        lambda label: detection_call(build_detector(label, image_size, architecture, fpn_channels), images, targets), labels)
    return {"step_s": interleaved_medians(calls, warmup, runs), "skipped": skipped}


TASKS = {"memory": measure_memory, "time": measure_step_times}


# ---------------------------------------------------------------- parent side


def run_all(setting: Setting) -> list[dict]:
    counter = (f"[{i}/{len(setting.variants) + 1}]" for i in itertools.count(1))
    rows = []
    for label in setting.variants:
        result = run_in_fresh_process(__file__, "memory", exact_allocation=True, label=label,
                                      image_size=setting.image_size, batch=setting.batch, steps=setting.memory_steps,
                                      architecture=setting.architecture, fpn_channels=setting.fpn_channels)
        rows.append({"method": label, "backbone": SWIN, **result})
        progress(f"{next(counter)} {label} memory: {describe_status(result, _memory_text)}")
    ok = [row["method"] for row in rows if row["status"] == "ok"]
    timing = run_in_fresh_process(__file__, "time", labels=ok, image_size=setting.image_size, batch=setting.batch,
                                  warmup=setting.warmup_steps, runs=setting.timed_steps, architecture=setting.architecture,
                                  fpn_channels=setting.fpn_channels)
    progress(f"{next(counter)} step times: {describe_status(timing, _time_text)}")
    for row in rows:
        row["step_s"] = timing.get("step_s", {}).get(row["method"])
    return add_ratios(rows)


def _memory_text(result: dict) -> str:
    return f"+{result['peak_growth_mib']:.0f} MiB peak"


def _time_text(result: dict) -> str:
    return ", ".join(f"{label} {s:.2f} s" for label, s in result["step_s"].items())


# ---------------------------------------------------------------- reporting


def target_lines(rows: list[dict]) -> list[str]:
    lines = []
    e3va = next((r for r in rows if r["method"] == E3VA), None)
    if e3va is None or e3va["status"] != "ok":
        return [f"MISS  {E3VA}: not measured ({(e3va or {}).get('reason', 'missing')})"]
    for what, key, limit, reference in TARGETS:
        value = e3va.get(key)
        verdict = "PASS" if value is not None and value <= limit else "MISS"
        lines.append(f"{verdict}  {E3VA} Mask R-CNN {SWIN}: {what} {fmt(value, '.2f')}x {reference} "
                     f"(target <= {limit})")
    verdicts = [line[:4] for line in lines]
    return lines + [f"{verdicts.count('PASS')} of {len(verdicts)} target checks pass."]


def results_table(rows: list[dict]) -> str:
    headers = ["Method", "Trainable", "Peak mem. growth (MiB)", "Mem. vs full", "Mem. vs LoRA", "Step (s)",
               "Step vs full"]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["method"], r["status"], "", "", "", "", r["reason"]])
            continue
        lines.append([r["method"], f"{r['trainable']:,}", f"{r['peak_growth_mib']:.0f}",
                      fmt(r["memory_vs_full"], ".2f"), fmt(r["memory_vs_lora"], ".2f"), fmt(r["step_s"], ".2f"),
                      fmt(r["step_vs_full"], ".2f")])
    return markdown_table(headers, lines)


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    x = range(len(ok))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([i - 0.2 for i in x], [r["memory_vs_full"] or 0 for r in ok], 0.4, label="peak memory / full")
    ax.bar([i + 0.2 for i in x], [r["step_vs_full"] or 0 for r in ok], 0.4, label="step time / full")
    ax.axhline(0.45, color="tab:blue", linestyle=":", linewidth=1)
    ax.axhline(0.8, color="tab:orange", linestyle=":", linewidth=1)
    ax.set_xticks(list(x), [r["method"] for r in ok])
    ax.set_ylabel("ratio to full fine-tuning (dotted: E3VA targets)")
    ax.set_title(f"Mask R-CNN, {SWIN}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_cost(setting: Setting, record: RunRecord, out: Path) -> str:
    rows = run_all(setting)
    out.mkdir(parents=True, exist_ok=True)
    report = "\n\n".join([
        "# Detection benchmark: Mask R-CNN training memory and step time",
        f"torchvision Mask R-CNN on {SWIN}{' (tiny: ' + str(setting.architecture) + ')' if setting.architecture else ''}"
        f" (random init), FPN {setting.fpn_channels}, {setting.image_size}x{setting.image_size} px, batch "
        f"{setting.batch}, AdamW; memory after {setting.memory_steps} steps (fresh process each); step time: median "
        f"of {setting.timed_steps} interleaved rounds after {setting.warmup_steps} warm-up. {record.environment()}",
        "## Targets",
        "```\n" + "\n".join(target_lines(rows)) + "\n```",
        "## Results",
        results_table(rows),
        "Peak memory growth: peak RSS above the level once the model and batch exist (weights are in the "
        "baseline), so it holds gradients, AdamW state and saved activations. linear trains the FPN and the "
        "detector heads alone (about 20M parameters at FPN width 256), the floor every method pays.",
    ]) + "\n"
    (out / "detection.md").write_text(report)
    write_csv(rows, out / "detection.csv")
    plot(rows, out / "detection.png")
    return report


# ---------------------------------------------------------------- accuracy


def run_config(setting: AccuracySetting, method: str, runs_dir: Path) -> RunConfig:
    """One method's Mask R-CNN run on fashion-scenes (the method's default learning rate, capped for detectors)."""
    train = TrainConfig(epochs=setting.epochs, batch_size=setting.batch, progress=False, device=str(common.DEVICE),
                        precision=common.PRECISION)
    return RunConfig(
        backbone=EMBEDDED, method=method, data=FASHION_SCENES, out_dir=str(runs_dir / method), task="instance",
        image_size=setting.image_size, train_limit=setting.train_scenes, val_limit=setting.val_scenes,
        augment=False, overwrite=True, train=train,
    )


AP_COLUMNS = ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50")


def run_accuracy(setting: AccuracySetting, runs_dir: Path) -> tuple[list[dict], dict]:
    methods, skipped = fitting_methods(setting.methods)
    rows = []
    for number, method in enumerate(methods, 1):
        row = kept_or_trained(run_config(setting, method, runs_dir))
        progress(f"[{number}/{len(methods)}] {method}: box AP {row['box_ap']:.2f}, mask AP {row['mask_ap']:.2f}, "
                 f"{row['train_seconds']:.0f} s" + (" (kept)" if row.get("cached") else ""))
        rows.append(row)
    return rows, skipped


def accuracy_table(rows: list[dict]) -> str:
    headers = ["Method", "Trainable params", "LR", "Box AP", "Box AP50", "Box AP75", "Mask AP", "Mask AP50",
               "Train time (s)"]
    lines = [[r["method"], f"{r['trainable']:,}", f"{r['lr']:g}", *(f"{r[k]:.2f}" for k in AP_COLUMNS),
              f"{r['train_seconds']:.0f}"] for r in rows]
    return markdown_table(headers, lines)


def write_accuracy(setting: AccuracySetting, record: RunRecord, out: Path, runs_dir: Path, command: str) -> str:
    os.environ["OMP_NUM_THREADS"] = str(common.THREADS)  # the spawned training processes' torch threads
    rows, skipped = run_accuracy(setting, runs_dir)
    first = rows[0] if rows else {}
    report = "\n\n".join([
        "# Detection: Mask R-CNN on fashion-scenes (tf_efficientnet_lite0, real weights)",
        f"Command: `{command}`",
        f"torchvision Mask R-CNN (FPN 256), {setting.image_size} px, {first.get('train_images')} training / "
        f"{first.get('val_images')} validation scenes, batch {setting.batch}, {setting.epochs} "
        f"epoch{'s' * (setting.epochs != 1)}, augmentation off, each method's default learning rate capped at 1e-3 "
        f"(LR column); one fresh process per run, device {common.DEVICE}. " + record.environment(),
        accuracy_table(rows),
        "AP: COCO box and mask AP (IoU 0.50:0.95), AP50, AP75 on the validation scenes after the last epoch "
        "(torchmetrics' MeanAveragePrecision, pycocotools backend), in percent. One seed per method: a "
        "comparison of short runs, not of converged detectors.",
        "Not run (do not fit the backbone): "
        + ("; ".join(f"{m} ({why})" for m, why in skipped.items()) or "none") + ".",
        "![box AP vs trainable parameters](detection_accuracy.png)",
    ]) + "\n"
    write_sweep(rows, report, out, "detection_accuracy", f"Mask R-CNN, {EMBEDDED} on {FASHION_SCENES}",
                key="box_ap", label="validation box AP (%)")
    return report


# ---------------------------------------------------------------- entry


def parse_args(argv=None):
    parser = base_parser(__doc__, "smoke test: full, LoRA and E3VA on a tiny Swin at 64 px, one timed round; "
                                  "e3va on 8 scenes at 64 px, 1 epoch")
    parser.add_argument("--part", choices=["cost", "accuracy", "both"], default="both",
                        help="memory/time of Mask R-CNN on Swin-T (cost), the AP sweep (accuracy), or both (default)")
    parser.add_argument("--runs", type=Path, default=RUNS_DIR,
                        help="run folders of the accuracy sweep (default benchmarks/runs/detection)")
    parser.add_argument("--image-size", type=int, metavar="PX",
                        help=f"cost: another input size than {FULL_SETTING.image_size} px (the targets are stated at 320)")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help=f"accuracy: only these methods (default: {', '.join(ACCURACY_METHODS)})")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/detection.py " + " ".join(sys.argv[1:] if argv is None else argv)
    setting, accuracy = (QUICK_SETTING, QUICK_ACCURACY) if args.quick else (FULL_SETTING, ACCURACY)
    if args.methods:
        accuracy = replace(accuracy, methods=tuple(args.methods))
    if args.image_size:
        setting = replace(setting, image_size=args.image_size)

    def benchmark(record: RunRecord) -> str:
        reports = []
        if args.part in ("cost", "both"):
            reports.append(write_cost(setting, record, args.out))
        if args.part in ("accuracy", "both"):
            reports.append(write_accuracy(accuracy, RunRecord(), args.out, args.runs, command))
        return "\n".join(reports)

    run_script(args, TASKS, benchmark)


if __name__ == "__main__":
    main()
