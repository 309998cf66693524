"""Segmentation: the training cost of UPerNet on Swin-T and ViT-S, and every method's accuracy on fashion-scenes.

Two parts (``--part cost``, ``--part accuracy``, or both, the default):

* **cost**: ``create_model(backbone, method, 10, task="segmentation", head="upernet")`` on
  ``swin_tiny_patch4_window7_224`` and ``vit_small_patch16_224`` (random init, ``img_size`` 256)
  at 256 px, batch 4, for full, linear, lora, mona, ssf and e3va (rank 8). Peak training memory
  growth in a fresh process per (backbone, method) with live memory (``common.peak_growth``,
  ``EXACT_ALLOCATION_ENV``), then the step times of all methods of a backbone interleaved in one
  fresh process (``common.interleaved_medians``); per-pixel cross-entropy on a fixed random batch
  of images and masks, AdamW. Ratios to full fine-tuning (memory also to LoRA) come from the same
  run, with PASS/MISS lines for E3VA's targets: memory <= 0.35x full and <= 0.6x LoRA, step time
  <= 0.6x full. Writes ``segmentation_cost.md/.csv/.png``.
* **accuracy**: every registered method that fits the embedded ``tf_efficientnet_lite0`` (real
  pretrained weights) trained on ``fashion-scenes`` with ``deltavision.compare``'s machinery (one
  fresh spawned process per run, each method's default learning rate, finished runs with the same
  settings kept in ``--runs`` and not retrained). Writes ``segmentation.md/.csv`` (method,
  trainable parameters, mIoU, pixel accuracy, training time, peak memory) and
  ``segmentation.png`` (mIoU against trainable parameters). ``--second-seed METHOD...`` trains
  those methods once more with seed 1 (other scenes too: fashion-scenes are generated from the seed)
  to show the run-to-run spread.

``--quick`` is a smoke test: tiny random-init Swin and ViT at 64 px, batch 2, and two methods
e3va on 16 scenes of 64 px for one epoch; its numbers mean nothing.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deltavision  # noqa: E402
from deltavision.data.segmentation import FASHION_SCENES  # noqa: E402
from deltavision.methods import list_methods  # noqa: E402
from deltavision.train.loop import TrainConfig  # noqa: E402
from deltavision.train.run import RunConfig  # noqa: E402

import common  # noqa: E402
from common import (  # noqa: E402
    EMBEDDED, RunRecord, add_ratios, base_parser, build_model, describe_status, fitting_methods, fixed_batch, fmt,
    interleaved_medians, kept_or_trained,
    markdown_table, peak_growth, prepare_all, progress, pyplot, run_in_fresh_process, run_script,
    save_figure, training_call, write_csv, write_sweep,
)

SWIN, VIT = "swin_tiny_patch4_window7_224", "vit_small_patch16_224"
SEGMENTATION = {"task": "segmentation", "head": "upernet"}
COST_METHODS: dict[str, dict] = {"full": {}, "linear": {}, "lora": {}, "mona": {}, "ssf": {}, "e3va": {"rank": 8}}
# (what, row key, limit, reference): E3VA's targets
TARGETS = (
    ("peak memory", "memory_vs_full", 0.35, "full fine-tuning"),
    ("peak memory", "memory_vs_lora", 0.6, "LoRA"),
    ("step time", "step_vs_full", 0.6, "full fine-tuning"),
)
RUNS_DIR = Path(__file__).resolve().parent / "runs" / "segmentation"
SECOND_SEED = 1


@dataclass(frozen=True)
class CostSetting:
    backbones: dict[str, dict]  # backbone -> timm architecture overrides (empty: the real architecture)
    image_size: int
    batch: int
    memory_steps: int
    warmup_rounds: int
    timed_rounds: int
    jobs: int  # fresh processes at once


@dataclass(frozen=True)
class AccuracySetting:
    head: str
    image_size: int
    train_scenes: int
    val_scenes: int
    batch: int
    epochs: int
    methods: tuple[str, ...] = ()  # empty: every registered method that fits the embedded backbone
    augment: bool = False  # three short epochs learn faster without it (as `deltavision compare`)


COST = CostSetting({SWIN: {}, VIT: {}}, 256, 4, memory_steps=2, warmup_rounds=1, timed_rounds=2, jobs=3)
QUICK_COST = CostSetting(
    {SWIN: {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2), "window_size": 4},
     VIT: {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}},
    64, 2, memory_steps=2, warmup_rounds=1, timed_rounds=1, jobs=4,
)
# Sized to finish in ~50 min on 2 heavily shared CPU cores (see segmentation.md): FPN, 64 px, 96 + 48 scenes.
ACCURACY = AccuracySetting("fpn", 64, 96, 48, 8, 3)
QUICK_ACCURACY = AccuracySetting("fpn", 64, 16, 8, 8, 1, methods=("e3va",))


# ---------------------------------------------------------------- cost: worker side


def measure_memory(backbone: str, architecture: dict, method: str, image_size: int, batch: int, steps: int) -> dict:
    """Parameters and peak memory growth over ``steps`` training steps of one (backbone, method)."""
    model = build_model(backbone, method, image_size, {**SEGMENTATION, **COST_METHODS[method]}, architecture)
    images, masks = fixed_batch(batch, image_size, dense=True)
    return {**deltavision.count_parameters(model), **peak_growth(model, images, masks, training_call, steps)}


def measure_step_times(backbone: str, architecture: dict, methods: list[str], image_size: int, batch: int,
                       warmup: int, runs: int) -> dict:
    """Median step time (s) of every method on one backbone, interleaved in this process."""
    images, masks = fixed_batch(batch, image_size, dense=True)

    def prepare(method):
        options = {**SEGMENTATION, **COST_METHODS[method]}
        return training_call(build_model(backbone, method, image_size, options, architecture), images, masks)

    calls, skipped = prepare_all(prepare, methods)
    return {"step_s": interleaved_medians(calls, warmup, runs), "skipped": skipped}


TASKS = {"memory": measure_memory, "time": measure_step_times}


# ---------------------------------------------------------------- cost: parent side


def run_cost(setting: CostSetting) -> list[dict]:
    """Memory of every (backbone, method) in its own process, then one interleaved timing process per backbone."""
    jobs = [(backbone, method) for backbone in setting.backbones for method in COST_METHODS]
    counter = (f"[{i}/{len(jobs) + len(setting.backbones)}]" for i in itertools.count(1))

    def memory(job):
        backbone, method = job
        result = run_in_fresh_process(
            __file__, "memory", exact_allocation=not common.on_cuda(), backbone=backbone,
            architecture=setting.backbones[backbone], method=method, image_size=setting.image_size,
            batch=setting.batch, steps=setting.memory_steps,
        )
        progress(f"{next(counter)} {backbone} {method} memory: "
                 + describe_status(result, lambda r: f"+{r['peak_growth_mib']:.0f} MiB peak"))
        return {"backbone": backbone, "method": method, **result}

    def timing(backbone):
        ok = [r["method"] for r in rows if r["backbone"] == backbone and r["status"] == "ok"]
        result = run_in_fresh_process(
            __file__, "time", backbone=backbone, architecture=setting.backbones[backbone], methods=ok,
            image_size=setting.image_size, batch=setting.batch, warmup=setting.warmup_rounds,
            runs=setting.timed_rounds,
        )
        progress(f"{next(counter)} {backbone} step times: " + describe_status(
            result, lambda r: ", ".join(f"{m} {s:.2f} s" for m, s in r["step_s"].items())))
        return backbone, result.get("step_s", {})

    with ThreadPoolExecutor(max_workers=setting.jobs) as pool:
        rows = list(pool.map(memory, jobs))
        steps = dict(pool.map(timing, setting.backbones))
    for row in rows:
        row["step_s"] = steps[row["backbone"]].get(row["method"])
    return add_ratios(rows)


def target_lines(rows: list[dict]) -> list[str]:
    """One PASS/MISS line per backbone and E3VA target (MISS when a number is missing), and the count."""
    lines = []
    for row in (r for r in rows if r["method"] == "e3va"):
        for what, key, limit, reference in TARGETS:
            value = row.get(key)
            verdict = "PASS" if value is not None and value <= limit else "MISS"
            lines.append(f"{verdict}: {row['backbone']} e3va-r8 {what} {fmt(value, '.2f')}x {reference} "
                         f"(target <= {limit})")
    passed = sum(line.startswith("PASS") for line in lines)
    return lines + [f"{passed} of {len(lines)} target checks pass."]


def cost_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        lines.append([
            r["backbone"], r["method"], f"{r['trainable']:,}" if ok else f"{r['status']}: {r['reason']}",
            fmt(r.get("peak_growth_mib"), ".0f"), fmt(r.get("memory_vs_full"), ".2f"),
            fmt(r.get("memory_vs_lora"), ".2f"), fmt(r.get("step_s"), ".2f"), fmt(r.get("step_vs_full"), ".2f"),
        ])
    headers = ["Backbone", "Method", "Trainable", "Peak mem. growth (MiB)", "Mem. vs full", "Mem. vs LoRA",
               "Step (s)", "Step vs full"]
    return markdown_table(headers, lines)


def plot_cost(rows: list[dict], path: Path) -> None:
    """One panel per backbone: memory and step time per method as ratios to full; dotted: E3VA's targets."""
    plt = pyplot()
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        mine = [r for r in rows if r["backbone"] == backbone]
        x = range(len(mine))
        ax.bar([i - 0.2 for i in x], [r.get("memory_vs_full") or 0 for r in mine], 0.4, color="tab:blue",
               label="peak memory / full")
        ax.bar([i + 0.2 for i in x], [r.get("step_vs_full") or 0 for r in mine], 0.4, color="tab:orange",
               label="step time / full")
        ax.axhline(0.35, color="tab:blue", linestyle=":")
        ax.axhline(0.6, color="tab:orange", linestyle=":")
        ax.set_xticks(list(x), [r["method"] for r in mine])
        ax.set_title(f"{backbone}, UPerNet", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def write_cost(setting: CostSetting, record: RunRecord, out: Path, command: str, quick: bool) -> str:
    return report_cost(run_cost(setting), setting, record, out, command, quick)


def report_cost(rows: list[dict], setting: CostSetting, record: RunRecord, out: Path, command: str,
                quick: bool, note: str = "") -> str:
    """Write segmentation_cost.md/.csv/.png from measured rows (``note``: a paragraph after the header)."""
    what = "tiny random-init architectures (--quick: a smoke test, numbers mean nothing)" if quick else "random init"
    memory = "max_memory_allocated growth" if common.on_cuda() else "peak RSS growth (live memory)"
    report = "\n\n".join([
        "# Segmentation: training memory and step time (UPerNet)",
        f"Command: `{command}`",
        f"Device {common.DEVICE}, {what}; UPerNet head, 10 classes, per-pixel cross-entropy, AdamW; "
        f"{setting.image_size} px, batch {setting.batch}; memory: {memory} over {setting.memory_steps} steps, "
        f"one fresh process per method; step: median of {setting.timed_rounds} interleaved rounds after "
        f"{setting.warmup_rounds} warm-up, one process per backbone. " + record.environment(),
        *([note] if note else []),
        "## E3VA targets",
        "```\n" + "\n".join(target_lines(rows)) + "\n```",
        "## Results (ratios to full fine-tuning on the same backbone)",
        cost_table(rows),
    ]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "segmentation_cost.md").write_text(report)
    write_csv(rows, out / "segmentation_cost.csv")
    plot_cost(rows, out / "segmentation_cost.png")
    return report


# ---------------------------------------------------------------- accuracy


def run_config(setting: AccuracySetting, method: str, seed: int, runs_dir: Path) -> RunConfig:
    """One method's segmentation run on fashion-scenes (the method's default learning rate)."""
    folder = method if seed == 0 else f"{method}.seed{seed}"
    train = TrainConfig(epochs=setting.epochs, batch_size=setting.batch, seed=seed, progress=False,
                        device=str(common.DEVICE), precision=common.PRECISION)
    return RunConfig(
        backbone=EMBEDDED, method=method, data=FASHION_SCENES, out_dir=str(runs_dir / folder), task="segmentation",
        head=setting.head, image_size=setting.image_size, train_limit=setting.train_scenes,
        val_limit=setting.val_scenes, augment=setting.augment, overwrite=True, train=train,
    )


def run_accuracy(setting: AccuracySetting, runs_dir: Path, second_seed: list[str]) -> tuple[list[dict], dict]:
    """Every fitting method with seed 0, then the ``second_seed`` methods with seed 1."""
    methods, skipped = fitting_methods(setting.methods or list_methods())
    jobs = [(m, 0) for m in methods] + [(m, SECOND_SEED) for m in second_seed]
    rows = []
    for number, (method, seed) in enumerate(jobs, 1):
        row = kept_or_trained(run_config(setting, method, seed, runs_dir))
        progress(f"[{number}/{len(jobs)}] {method} seed {seed}: mIoU {row['miou']:.2f}%, pixel accuracy "
                 f"{row['pixel_acc']:.2f}%, {row['train_seconds']:.0f} s" + (" (kept)" if row.get("cached") else ""))
        rows.append(row)
    return rows, skipped


def accuracy_table(rows: list[dict]) -> str:
    lines = [[
        r["method"], str(r["seed"]), f"{r['trainable']:,}", f"{100 * r['trainable'] / r['total']:.2f}",
        f"{r['lr']:g}", f"{r['miou']:.2f}", f"{r['pixel_acc']:.2f}", f"{r['train_seconds']:.0f}",
        f"{r['peak_memory_mb']:.0f}",
    ] for r in rows]
    headers = ["Method", "Seed", "Trainable params", "Trainable %", "LR", "mIoU %", "Pixel acc. %",
               "Train time (s)", "Peak memory growth (MiB)"]
    return markdown_table(headers, lines)


def seed_spread(rows: list[dict]) -> str:
    """How far each method's mIoU and pixel accuracy moved between its two seeds, if any has two."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    pairs = {m: runs for m, runs in by_method.items() if len(runs) > 1}
    if not pairs:
        return "One seed per method (no second-seed runs)."
    parts = []
    for method, runs in pairs.items():
        miou = " / ".join(f"{r['miou']:.2f}" for r in runs)
        pixel = " / ".join(f"{r['pixel_acc']:.2f}" for r in runs)
        spread = statistics.stdev(r["miou"] for r in runs)
        parts.append(f"{method}: mIoU {miou} (standard deviation {spread:.2f}), pixel accuracy {pixel}")
    return "Seeds 0 / 1 (other scenes and initialisation): " + "; ".join(parts) + "."


def write_accuracy(setting: AccuracySetting, record: RunRecord, out: Path, runs_dir: Path, second_seed: list[str],
                   command: str) -> str:
    os.environ["OMP_NUM_THREADS"] = str(common.THREADS)  # the spawned training processes' torch threads
    rows, skipped = run_accuracy(setting, runs_dir, second_seed)
    first = rows[0] if rows else {}
    pixels = (first.get("val_images") or 0) * setting.image_size ** 2
    report = "\n\n".join([
        "# Segmentation: every method on fashion-scenes (tf_efficientnet_lite0, real weights)",
        f"Command: `{command}`",
        f"{setting.head.upper()} head, {setting.image_size} px, {first.get('train_images')} training / "
        f"{first.get('val_images')} validation scenes ({pixels:,} validation pixels, "
        f"{setting.image_size}x{setting.image_size} each), batch {setting.batch}, "
        f"{setting.epochs} epoch{'s' * (setting.epochs != 1)}, "
        f"augmentation {'on' if setting.augment else 'off'}, each method's default learning rate (LR column); "
        f"one fresh process per run, device {common.DEVICE}. "
        + record.environment(),
        accuracy_table(rows),
        "mIoU: mean over the 11 classes (background included) of the per-class IoU on the validation scenes' "
        "confusion matrix; pixel accuracy: share of validation pixels classified right. Peak memory growth: the "
        "run's peak RSS above the level before training (default allocator, so it includes retained heap). "
        + seed_spread(rows),
        "Not run (do not fit the backbone): "
        + ("; ".join(f"{m} ({why})" for m, why in skipped.items()) or "none") + ".",
        "![mIoU vs trainable parameters](segmentation.png)",
    ]) + "\n"
    write_sweep(rows, report, out, "segmentation", f"{EMBEDDED} on {FASHION_SCENES} (seed 0)", key="miou",
                label="validation mIoU (%)", plotted=[r for r in rows if r["seed"] == 0])
    return report


# ---------------------------------------------------------------- entry


def parse_args(argv=None):
    parser = base_parser(__doc__, "smoke test: tiny Swin/ViT at 64 px; e3va on 16 scenes, 1 epoch")
    parser.add_argument("--part", choices=["cost", "accuracy", "both"], default="both",
                        help="memory/time of UPerNet (cost), the method sweep (accuracy), or both (default)")
    parser.add_argument("--runs", type=Path, default=RUNS_DIR,
                        help="run folders of the accuracy sweep (default benchmarks/runs/segmentation)")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help="accuracy: only these methods (default: every method that fits the backbone)")
    parser.add_argument("--second-seed", nargs="*", default=[], metavar="METHOD",
                        help="accuracy: also train these methods with seed 1")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/segmentation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cost, accuracy = (QUICK_COST, QUICK_ACCURACY) if args.quick else (COST, ACCURACY)
    if args.methods:
        accuracy = replace(accuracy, methods=tuple(args.methods))

    def benchmark(record: RunRecord) -> str:
        reports = []
        if args.part in ("cost", "both"):
            reports.append(write_cost(cost, record, args.out, command, args.quick))
        if args.part in ("accuracy", "both"):
            reports.append(write_accuracy(accuracy, RunRecord(), args.out, args.runs, args.second_seed, command))
        return "\n".join(reports)

    run_script(args, TASKS, benchmark)


if __name__ == "__main__":
    main()
