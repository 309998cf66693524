"""Mask R-CNN training memory and step time per method: full, LoRA, Mona, SSF and E3VA r8 on Swin-T.

torchvision's Mask R-CNN (``deltavision.create_model(..., task="instance")``,
FPN 256, torchvision's heads) on Swin-T (random init: only the embedded
backbone has offline weights, and weights do not change memory or time), at
320x320 px, batch 2, with a fixed batch of three boxes and masks per image.
For every method this measures

* **peak training memory**: a fresh process per method builds the model and
  the batch, reads the peak RSS, runs training steps (the detector's summed
  loss dict, backward, AdamW over ``parameter_groups``) and reports how far
  the peak grew (``common.peak_growth``, exact allocation as e3va.py);
* **step time**: one fresh process builds every method and runs their steps
  round-robin (``common.interleaved_medians``), as a ratio to full fine-tuning.

Targets (E3VA's COCO Mask R-CNN figures, PASS/MISS lines): E3VA peak memory
<= 0.45x full fine-tuning and <= 0.64x LoRA's; E3VA step time <= 0.8x full.

Usage: ``python benchmarks/detection.py [--quick] [--out benchmarks/results]``.
Writes detection.md, detection.csv and detection.png; the Markdown also goes to stdout.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

import deltavision
from common import (
    DEVICE, WEIGHT_DECAY, LEARNING_RATE, RunRecord, base_parser, describe_status, fmt, interleaved_medians,
    markdown_table, peak_growth, prepare_all, progress, pyplot, ratio, run_in_fresh_process, run_script,
    save_figure, size_options, write_csv,
)
from deltavision.train.loop import parameter_groups

SWIN = "swin_tiny_patch4_window7_224"
FULL, LORA, E3VA = "full", "lora", "e3va-r8"
VARIANTS: dict[str, tuple[str, dict]] = {
    FULL: ("full", {}), LORA: ("lora", {}), "mona": ("mona", {}), "ssf": ("ssf", {}), E3VA: ("e3va", {"rank": 8}),
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


FULL_SETTING = Setting(320, 2, 2, 1, 2)
QUICK_SETTING = Setting(128, 2, 2, 1, 1)


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


def build_detector(label: str, image_size: int) -> torch.nn.Module:
    method, options = VARIANTS[label]
    return deltavision.create_model(
        SWIN, method, CLASSES, pretrained=False, backbone_options=size_options(SWIN, image_size) or None,
        task="instance", head_options={"image_size": image_size}, **options,
    ).to(DEVICE)


def detection_step(model, optimizer, images, targets) -> None:
    optimizer.zero_grad(set_to_none=True)
    losses = model(list(images), targets)
    sum(losses.values()).backward()
    optimizer.step()


def detection_call(model, images, targets):
    optimizer = torch.optim.AdamW(parameter_groups(model, WEIGHT_DECAY), lr=LEARNING_RATE)
    model.train()
    return functools.partial(detection_step, model, optimizer, images, targets)


def measure_memory(label: str, image_size: int, batch: int, steps: int) -> dict:
    model = build_detector(label, image_size)
    images, targets = fixed_detection_batch(batch, image_size)
    return {**deltavision.count_parameters(model), **peak_growth(model, images, targets, detection_call, steps)}


def measure_step_times(labels: list[str], image_size: int, batch: int, warmup: int, runs: int) -> dict:
    images, targets = fixed_detection_batch(batch, image_size)
    calls, skipped = prepare_all(lambda label: detection_call(build_detector(label, image_size), images, targets),
                                 labels)
    return {"step_s": interleaved_medians(calls, warmup, runs), "skipped": skipped}


TASKS = {"memory": measure_memory, "time": measure_step_times}


# ---------------------------------------------------------------- parent side


def run_all(setting: Setting) -> list[dict]:
    counter = (f"[{i}/{len(VARIANTS) + 1}]" for i in itertools.count(1))
    rows = []
    for label in VARIANTS:
        result = run_in_fresh_process(__file__, "memory", exact_allocation=True, label=label,
                                      image_size=setting.image_size, batch=setting.batch, steps=setting.memory_steps)
        rows.append({"variant": label, **result})
        progress(f"{next(counter)} {label} memory: {describe_status(result, _memory_text)}")
    ok = [row["variant"] for row in rows if row["status"] == "ok"]
    timing = run_in_fresh_process(__file__, "time", labels=ok, image_size=setting.image_size, batch=setting.batch,
                                  warmup=setting.warmup_steps, runs=setting.timed_steps)
    progress(f"{next(counter)} step times: {describe_status(timing, _time_text)}")
    for row in rows:
        row["step_s"] = timing.get("step_s", {}).get(row["variant"])
    return add_ratios(rows)


def _memory_text(result: dict) -> str:
    return f"+{result['peak_growth_mib']:.0f} MiB peak"


def _time_text(result: dict) -> str:
    return ", ".join(f"{label} {s:.2f} s" for label, s in result["step_s"].items())


def add_ratios(rows: list[dict]) -> list[dict]:
    by_label = {r["variant"]: r for r in rows if r["status"] == "ok"}
    full, lora = by_label.get(FULL, {}), by_label.get(LORA, {})
    for row in by_label.values():
        row["memory_vs_full"] = ratio(row["peak_growth_mib"], full.get("peak_growth_mib"))
        row["memory_vs_lora"] = ratio(row["peak_growth_mib"], lora.get("peak_growth_mib"))
        row["step_vs_full"] = ratio(row["step_s"], full.get("step_s"))
    return rows


# ---------------------------------------------------------------- reporting


def target_lines(rows: list[dict]) -> list[str]:
    lines = []
    e3va = next((r for r in rows if r["variant"] == E3VA), None)
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
            lines.append([r["variant"], r["status"], "", "", "", "", r["reason"]])
            continue
        lines.append([r["variant"], f"{r['trainable']:,}", f"{r['peak_growth_mib']:.0f}",
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
    ax.set_xticks(list(x), [r["variant"] for r in ok])
    ax.set_ylabel("ratio to full fine-tuning (dotted: E3VA targets)")
    ax.set_title(f"Mask R-CNN, {SWIN}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_outputs(rows: list[dict], setting: Setting, record: RunRecord, out) -> str:
    out.mkdir(parents=True, exist_ok=True)
    report = "\n\n".join([
        "# Detection benchmark: Mask R-CNN training memory and step time",
        f"torchvision Mask R-CNN on {SWIN} (random init), {setting.image_size}x{setting.image_size} px, batch "
        f"{setting.batch}, AdamW; memory after {setting.memory_steps} steps (fresh process each); step time: median "
        f"of {setting.timed_steps} interleaved rounds after {setting.warmup_steps} warm-up. {record.environment()}",
        "## Targets",
        "```\n" + "\n".join(target_lines(rows)) + "\n```",
        "## Results",
        results_table(rows),
    ]) + "\n"
    (out / "detection.md").write_text(report)
    write_csv(rows, out / "detection.csv")
    plot(rows, out / "detection.png")
    return report


def main(argv=None) -> None:
    args = base_parser(__doc__, "smoke test: 128 px, one timed round").parse_args(argv)
    setting = QUICK_SETTING if args.quick else FULL_SETTING
    run_script(args, TASKS, lambda record: write_outputs(run_all(setting), setting, record, args.out))


if __name__ == "__main__":
    main()
