"""E3VA's training memory and step time against full fine-tuning, LoRA, Houlsby, Mona and the no-grad floor.

For every (backbone, batch) configuration (Swin-T and ViT-S at batch 8 and
32, the embedded tf_efficientnet_lite0 at batch 32; 224x224 images) and every
variant (full fine-tuning, the no-grad forward, LoRA, Houlsby adapters, Mona,
E3VA at rank 8, 16 and 32) this measures

* **peak training memory**: a fresh process per (backbone, batch, variant)
  builds the model and a fixed random batch, reads the peak RSS, runs a few
  training steps (AdamW over timm's ``param_groups_weight_decay``) and reports how far the
  peak grew, as foundation.py does (``common.peak_growth``);
* **step time**: one fresh process per (backbone, batch) builds every
  variant and runs their steps round-robin, rotating the order each round:
  warm-up rounds, then the median of the timed rounds
  (``common.interleaved_medians``), reported as a ratio to full fine-tuning.

The *no-grad forward* is the floor any method that trains something must pay:
the plain, frozen timm model's ``with torch.no_grad(): model(x)``, in the
training mode ``deltavision.set_train_mode`` sets, with no loss, backward or
optimizer. E3VA runs its backbone exactly this way and adds the highway, so
its memory and time as multiples of the floor show what the highway costs.

Targets (printed as PASS/MISS lines): E3VA peak memory <= 0.35x full
fine-tuning and <= 0.6x LoRA's; E3VA step time <= 0.6x full fine-tuning.

``--profile BACKBONE BATCH VARIANT`` instead runs torch.profiler (CPU,
record_shapes, profile_memory) over one training step of one variant, after a
warm-up step, and prints the top operators by self CPU time and by CPU memory
(grouped by input shape), to see where the time and memory of a missed target go.

Usage: ``python benchmarks/e3va.py [--quick] [--out benchmarks/results]``.
Writes e3va.md, e3va.csv and e3va.png; the Markdown also goes to stdout.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import deltavision

from common import (
    EMBEDDED, RunRecord, base_parser, build_model, build_plain, describe_status, fixed_batch, fmt,
    interleaved_medians, markdown_table, no_grad_call, peak_growth, prepare_all, progress, pyplot, ratio,
    run_in_fresh_process, run_script, save_figure, setup_torch, training_call, write_csv,
)

SWIN, VIT = "swin_tiny_patch4_window7_224", "vit_small_patch16_224"
FULL, FLOOR, LORA = "full", "no-grad forward", "lora"
E3VA_RANKS = (8, 16, 32)
E3VA = tuple(f"e3va-r{rank}" for rank in E3VA_RANKS)
# label -> (method, options); method None is the plain frozen model's no-grad forward
VARIANTS: dict[str, tuple[str | None, dict]] = {
    FULL: ("full", {}),
    FLOOR: (None, {}),
    LORA: ("lora", {}),
    "houlsby": ("houlsby", {}),
    "mona": ("mona", {}),
    **{label: ("e3va", {"rank": rank}) for label, rank in zip(E3VA, E3VA_RANKS)},
}
# (what, row key, limit, reference): E3VA's targets
TARGETS = (
    ("peak memory", "memory_vs_full", 0.35, "full fine-tuning"),
    ("peak memory", "memory_vs_lora", 0.6, "LoRA"),
    ("step time", "step_vs_full", 0.6, "full fine-tuning"),
)


@dataclass(frozen=True)
class Setting:
    image_size: int
    configs: tuple[tuple[str, int], ...]  # (backbone, batch)
    warmup_steps: int
    timed_steps: int
    memory_steps: int


FULL_SETTING = Setting(224, ((SWIN, 8), (SWIN, 32), (VIT, 8), (VIT, 32), (EMBEDDED, 32)), 1, 5, 3)
QUICK_SETTING = Setting(112, ((SWIN, 4), (SWIN, 8), (VIT, 4), (VIT, 8), (EMBEDDED, 8)), 1, 2, 2)


# ---------------------------------------------------------------- worker side


def build_variant(label: str, backbone: str, batch: int, image_size: int):
    """Model, fixed batch and step-call factory of one variant (all built before any memory baseline)."""
    method, options = VARIANTS[label]
    images, labels = fixed_batch(batch, image_size)
    if method is None:
        return build_plain(backbone, image_size).requires_grad_(False), images, labels, no_grad_call
    return build_model(backbone, method, image_size, options), images, labels, training_call


def measure_memory(backbone: str, batch: int, label: str, image_size: int, steps: int) -> dict:
    """Parameters and peak-RSS growth of one (backbone, batch, variant) configuration."""
    model, images, labels, make_call = build_variant(label, backbone, batch, image_size)
    return {**deltavision.count_parameters(model), **peak_growth(model, images, labels, make_call, steps)}


def measure_step_times(backbone: str, batch: int, labels: list[str], image_size: int, warmup: int, runs: int) -> dict:
    """Median step time (s) of every variant on (backbone, batch), interleaved in one process."""

    def prepare(label):
        model, images, targets, make_call = build_variant(label, backbone, batch, image_size)
        return make_call(model, images, targets)

    calls, skipped = prepare_all(prepare, labels)
    return {"step_s": interleaved_medians(calls, warmup, runs), "skipped": skipped}


TASKS = {"memory": measure_memory, "time": measure_step_times}


def profile_step(backbone: str, batch: int, label: str, image_size: int, rows: int = 15) -> None:
    """torch.profiler over one step of one variant (after a warm-up step); top operators by time and memory."""
    from torch.profiler import ProfilerActivity, profile

    setup_torch()
    model, images, labels, make_call = build_variant(label, backbone, batch, image_size)
    call = make_call(model, images, labels)
    call()  # one-time allocations and AdamW state happen outside the profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
        call()
    print(f"# {label} on {backbone}, batch {batch}, {image_size}x{image_size}: one step\n")
    print(f"## Top {rows} operators by self CPU time\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print(f"## Top {rows} operators by input shape, by CPU memory (allocated minus freed, children included)\n")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="cpu_memory_usage", row_limit=rows))


# ---------------------------------------------------------------- parent side


def run_config(backbone: str, batch: int, setting: Setting, counter) -> list[dict]:
    """Memory per variant (one process each), then step times of all of them (one process)."""
    rows = []
    for label in VARIANTS:
        result = run_in_fresh_process(
            __file__, "memory", exact_allocation=True, backbone=backbone, batch=batch, label=label,
            image_size=setting.image_size, steps=setting.memory_steps,
        )
        rows.append({"backbone": backbone, "batch": batch, "variant": label, **result})
        progress(f"{next(counter)} {backbone} b{batch} / {label} memory: {describe(result)}")
    ok = [row["variant"] for row in rows if row["status"] == "ok"]
    timing = run_in_fresh_process(
        __file__, "time", backbone=backbone, batch=batch, labels=ok, image_size=setting.image_size,
        warmup=setting.warmup_steps, runs=setting.timed_steps,
    )
    progress(f"{next(counter)} {backbone} b{batch} step times: {describe(timing)}")
    for row in rows:
        row["step_s"] = timing.get("step_s", {}).get(row["variant"])
    return add_ratios(rows)


def describe(result: dict) -> str:
    def detail(r):
        if "peak_growth_mib" in r:
            return f"+{r['peak_growth_mib']:.0f} MiB peak"
        return ", ".join(f"{label} {s:.2f} s" for label, s in r["step_s"].items())

    return describe_status(result, detail)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Memory and step time relative to full fine-tuning, LoRA and the no-grad floor of one configuration."""
    by_label = {r["variant"]: r for r in rows if r["status"] == "ok"}
    full, lora, floor = (by_label.get(label, {}) for label in (FULL, LORA, FLOOR))
    for row in by_label.values():
        memory, step = row["peak_growth_mib"], row["step_s"]
        row["memory_vs_full"] = ratio(memory, full.get("peak_growth_mib"))
        row["memory_vs_lora"] = ratio(memory, lora.get("peak_growth_mib"))
        row["memory_vs_floor"] = ratio(memory, floor.get("peak_growth_mib"))
        row["step_vs_full"] = ratio(step, full.get("step_s"))
        row["step_vs_floor"] = ratio(step, floor.get("step_s"))
    return rows


def run_all(setting: Setting) -> list[dict]:
    total = len(setting.configs) * (len(VARIANTS) + 1)
    counter = (f"[{i}/{total}]" for i in itertools.count(1))
    return [row for backbone, batch in setting.configs for row in run_config(backbone, batch, setting, counter)]


# ---------------------------------------------------------------- reporting


def target_lines(rows: list[dict]) -> list[str]:
    """PASS/MISS per E3VA rank, configuration and target, and E3VA's cost as a multiple of the floor."""
    lines = []
    for r in rows:
        if r["variant"] not in E3VA:
            continue
        where = f"{r['variant']} {r['backbone']} b{r['batch']}"
        if r["status"] != "ok":
            lines.append(f"MISS  {where}: not measured ({r['reason']})")
            continue
        for what, key, limit, reference in TARGETS:
            value = r.get(key)
            verdict = "PASS" if value is not None and value <= limit else "MISS"
            lines.append(f"{verdict}  {where}: {what} {fmt(value, '.2f')}x {reference} (target <= {limit})")
        lines.append(
            f"INFO  {where}: peak memory {fmt(r.get('memory_vs_floor'), '.2f')}x, step time "
            f"{fmt(r.get('step_vs_floor'), '.2f')}x the no-grad forward floor"
        )
    verdicts = [line[:4] for line in lines if line[:4] in ("PASS", "MISS")]
    return lines + [f"{verdicts.count('PASS')} of {len(verdicts)} target checks pass."]


def results_table(rows: list[dict]) -> str:
    headers = ["Backbone", "Batch", "Method", "Trainable", "Peak mem. growth (MiB)", "Mem. vs full",
               "Mem. vs LoRA", "Mem. vs floor", "Step (s)", "Step vs full", "Step vs floor"]
    lines = []
    for r in rows:
        head = [r["backbone"], str(r["batch"]), r["variant"]]
        if r["status"] != "ok":
            lines.append(head + [r["status"], "", "", "", "", "", "", r["reason"]])
            continue
        lines.append(head + [
            f"{r['trainable']:,}", f"{r['peak_growth_mib']:.0f}", fmt(r["memory_vs_full"], ".2f"),
            fmt(r["memory_vs_lora"], ".2f"), fmt(r["memory_vs_floor"], ".2f"), fmt(r["step_s"], ".3f"),
            fmt(r["step_vs_full"], ".2f"), fmt(r["step_vs_floor"], ".2f"),
        ])
    return markdown_table(headers, lines)


def plot(rows: list[dict], setting: Setting, path) -> None:
    """One panel per (backbone, batch): memory and step time per variant as ratios to full fine-tuning."""
    plt = pyplot()
    limits = {key: limit for _, key, limit, _ in TARGETS}
    fig, axes = plt.subplots(1, len(setting.configs), figsize=(4 * len(setting.configs), 4), squeeze=False)
    for ax, (backbone, batch) in zip(axes[0], setting.configs):
        ok = [r for r in rows if (r["backbone"], r["batch"]) == (backbone, batch) and r["status"] == "ok"]
        x = range(len(ok))
        memory, step = ([r[key] or 0 for r in ok] for key in ("memory_vs_full", "step_vs_full"))
        ax.bar([i - 0.2 for i in x], memory, 0.4, color="tab:blue", label="peak memory / full")
        ax.bar([i + 0.2 for i in x], step, 0.4, color="tab:orange", label="step time / full")
        ax.axhline(limits["memory_vs_full"], color="tab:blue", linestyle=":", linewidth=1)
        ax.axhline(limits["step_vs_full"], color="tab:orange", linestyle=":", linewidth=1)
        ax.set_xticks(list(x), [r["variant"] for r in ok], rotation=45, ha="right")
        ax.set_title(f"{backbone}, batch {batch}", fontsize=9)
    axes[0][0].set_ylabel("ratio to full fine-tuning (dotted: E3VA targets)")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


def write_outputs(rows: list[dict], setting: Setting, record: RunRecord, out) -> str:
    out.mkdir(parents=True, exist_ok=True)
    report = "\n\n".join([
        "# E3VA benchmark: training memory and step time",
        f"Image {setting.image_size}x{setting.image_size}, AdamW; memory after {setting.memory_steps} steps "
        f"(fresh process each); step time: median of {setting.timed_steps} interleaved rounds after "
        f"{setting.warmup_steps} warm-up (one process per backbone and batch). {record.environment()}",
        "## Targets",
        "```\n" + "\n".join(target_lines(rows)) + "\n```",
        "## Results",
        "Floor = the plain frozen model's `torch.no_grad()` forward (no loss, backward or optimizer).",
        results_table(rows),
    ]) + "\n"
    (out / "e3va.md").write_text(report)
    write_csv(rows, out / "e3va.csv")
    plot(rows, setting, out / "e3va.png")
    return report


def parse_args(argv=None):
    parser = base_parser(__doc__, "smoke test: 112 px, batch 4 and 8, few steps")
    parser.add_argument(
        "--profile", nargs=3, metavar=("BACKBONE", "BATCH", "VARIANT"),
        help=f"profile one training step instead; VARIANT is one of: {', '.join(VARIANTS)}",
    )
    args = parser.parse_args(argv)
    if args.profile and (args.profile[2] not in VARIANTS or not args.profile[1].isdigit()):
        parser.error(f"--profile BACKBONE BATCH VARIANT: BATCH an integer, VARIANT one of {', '.join(VARIANTS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    setting = QUICK_SETTING if args.quick else FULL_SETTING
    if args.profile:
        backbone, batch, label = args.profile
        profile_step(backbone, int(batch), label, setting.image_size)
        return
    run_script(args, TASKS, lambda record: write_outputs(run_all(setting), setting, record, args.out))


if __name__ == "__main__":
    main()
