"""Cost of every registered tuning method on four timm backbones.

For each (backbone, method) pair this measures

* **parameters**: trainable and total counts from ``deltavision.count_parameters``;
* **peak training memory**: every pair runs in a *fresh* Python process (this
  script re-invoked with ``--worker``), so no allocator state, cache or peak
  carries over from another configuration. The worker builds the model and a
  fixed random input batch, reads the peak resident set size
  (``getrusage(RUSAGE_SELF).ru_maxrss``), runs a few training steps (AdamW over
  timm's ``param_groups_weight_decay``, so the optimizer state exists from the second step on)
  and reports how far the peak grew. The growth covers activations kept for
  backward, gradients, AdamW state and the framework's working buffers; the
  weights themselves are part of the baseline;
* **training-step time**: one more fresh process per backbone builds every
  method's model (each with its own AdamW and the same fixed batch) and runs
  forward + loss + backward + ``optimizer.step`` round-robin, rotating the order
  each round: warm-up rounds, then the median of the timed rounds. Reported as
  a ratio to full fine-tuning on the same backbone. Interleaving matters on a
  shared machine: a change of load from other processes hits every method of
  a backbone alike instead of skewing whichever ran at the time;
* **inference latency** of the model each method deploys: a fresh process per
  backbone times the plain timm model and, for every method, the model
  folded by ``deltavision.merge`` if the method folds (ssf, lora and the
  structure-free baselines) or the model as trained if it does not (its
  modules stay at inference). Eval mode, ``torch.inference_mode``, interleaved
  the same way, at two batch sizes; medians and ratios to plain timm. For
  folding methods whose merge removes tensors (ssf, lora) the unmerged model
  is timed too, showing the overhead merging removes, and every folding
  method reports the largest absolute difference between merged and unmerged
  outputs on the same batch. Before merging, the trainable tensors get small
  seeded noise, so that zero-initialised updates (LoRA's B) do not make the
  check trivially exact.

Every process uses ``torch.set_num_threads(2)`` and seed 0. The embedded
default backbone (tf_efficientnet_lite0) loads its real shipped weights; the
others use random init (the measured costs do not depend on weight values).
Methods are read from ``deltavision.list_methods()`` at run time, with their
default options; one that does not apply to a backbone is reported as n/a.

Usage: ``python benchmarks/foundation.py [--quick] [--out benchmarks/results]``.
Writes foundation.md, foundation.csv, foundation_memory_time.png and
foundation_params.png to the output directory; the Markdown also goes to stdout.
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import asdict, dataclass

import torch
from torch import nn

import deltavision
from deltavision.methods import get_method

from common import (
    SEED, RunRecord, base_parser, build_model, build_plain, describe_status, fixed_batch, fmt,
    interleaved_medians, markdown_table, peak_growth, prepare_all, progress, pyplot, ratio,
    run_in_fresh_process, run_script, save_figure, training_call, write_csv,
)

BACKBONES = ("vit_small_patch16_224", "swin_tiny_patch4_window7_224", "convnext_tiny", "tf_efficientnet_lite0")
REFERENCE = "full"  # training ratios are relative to this method
PLAIN = "plain timm"  # latency ratios are relative to this model
UNMERGED = " (unmerged)"  # suffix of the unmerged twin of a folding method in the latency run
PERTURBATION = 0.01  # std of the noise put on trainable tensors before the merge check


@dataclass(frozen=True)
class Setting:
    batch: int
    image_size: int
    warmup_steps: int
    timed_steps: int
    memory_steps: int
    latency_batches: tuple[int, ...]
    latency_warmup: int
    latency_runs: int


FULL_SETTING = Setting(8, 224, 2, 5, 3, (1, 8), 2, 10)
QUICK_SETTING = Setting(4, 112, 1, 3, 2, (1, 4), 1, 3)


# ---------------------------------------------------------------- worker side


def measure_memory(backbone: str, method: str, setting: dict) -> dict:
    """Parameters and peak-RSS growth of one (backbone, method) configuration."""
    s = Setting(**setting)
    model = build_model(backbone, method, s.image_size)
    images, labels = fixed_batch(s.batch, s.image_size)
    return {**deltavision.count_parameters(model), **peak_growth(model, images, labels, steps=s.memory_steps)}


def measure_step_times(backbone: str, methods: list[str], setting: dict) -> dict:
    """Median training-step time (s) of every method on ``backbone``, interleaved in one process."""
    s = Setting(**setting)

    def prepare(method):
        return training_call(build_model(backbone, method, s.image_size), *fixed_batch(s.batch, s.image_size))

    calls, skipped = prepare_all(prepare, methods)
    return {"step_s": interleaved_medians(calls, s.warmup_steps, s.timed_steps), "skipped": skipped}


def perturb_trainable(model: nn.Module) -> None:
    """Seeded noise on the trainable tensors, as if training had moved them."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(PERTURBATION * torch.randn(param.shape, generator=generator).to(param.device))


def inference_models(backbone: str, method: str, image_size: int, images) -> tuple[dict[str, nn.Module], dict]:
    """The model ``method`` deploys (merged if it folds, else as trained), keyed by name, and facts about it.

    A folding method whose merge removes tensors also contributes its unmerged
    model; every folding method reports max |merged - unmerged| on ``images``."""
    model = build_model(backbone, method, image_size).eval()
    if not get_method(method).folds:
        return {method: model}, {"merged": False}
    perturb_trainable(model)
    merged = deltavision.merge(copy.deepcopy(model)).eval()
    with torch.inference_mode():
        info = {"merged": True, "max_abs_diff": (merged(images) - model(images)).abs().max().item()}
    models = {method: merged}
    if deltavision.count_parameters(merged)["total"] != deltavision.count_parameters(model)["total"]:
        models[method + UNMERGED] = model
    return models, info


def measure_latency(backbone: str, methods: list[str], setting: dict) -> dict:
    """Median forward time (ms) per batch size of plain timm and every method's deployed model."""
    s = Setting(**setting)
    images, _ = fixed_batch(max(s.latency_batches), s.image_size)
    built, skipped = prepare_all(lambda m: inference_models(backbone, m, s.image_size, images), methods)
    models = {PLAIN: build_plain(backbone, s.image_size).eval()}
    for method_models, _ in built.values():
        models.update(method_models)
    ms: dict[str, dict[str, float]] = {name: {} for name in models}
    with torch.inference_mode():
        for batch in s.latency_batches:
            calls = {name: functools.partial(model, images[:batch]) for name, model in models.items()}
            for name, seconds in interleaved_medians(calls, s.latency_warmup, s.latency_runs).items():
                ms[name][str(batch)] = 1000 * seconds
    return {"ms": ms, "info": {m: info for m, (_, info) in built.items()}, "skipped": skipped}


TASKS = {"memory": measure_memory, "time": measure_step_times, "latency": measure_latency}


# ---------------------------------------------------------------- parent side


def run_backbone(backbone: str, methods: list[str], setting: Setting, counter) -> tuple[list[dict], dict]:
    """Memory per method (one process each), step times (one process), inference latency (one process)."""
    rows = []
    for method in methods:
        result = run_in_fresh_process(
            __file__, "memory", exact_allocation=True, backbone=backbone, method=method, setting=asdict(setting)
        )
        rows.append({"backbone": backbone, "method": method, **result})
        progress(f"{next(counter)} {backbone} / {method} memory: {describe(result)}")
    ok = [row["method"] for row in rows if row["status"] == "ok"]
    if not ok:
        return rows, {"status": "n/a", "reason": "no method could be built"}
    timing = run_in_fresh_process(__file__, "time", backbone=backbone, methods=ok, setting=asdict(setting))
    progress(f"{next(counter)} {backbone} step times: {describe(timing)}")
    for row in rows:
        if row["status"] == "ok":
            row["step_s"] = timing.get("step_s", {}).get(row["method"])
    latency = run_in_fresh_process(__file__, "latency", backbone=backbone, methods=ok, setting=asdict(setting))
    progress(f"{next(counter)} {backbone} inference latency: {describe(latency)}")
    return rows, latency


def describe(result: dict) -> str:
    def detail(r):
        if "peak_growth_mib" in r:
            return f"+{r['peak_growth_mib']:.0f} MiB peak"
        if "step_s" in r:
            return ", ".join(f"{m} {s:.2f} s" for m, s in r["step_s"].items())
        return f"{len(r['ms'])} models timed"

    return describe_status(result, detail)


def run_all(backbones, methods, setting: Setting) -> tuple[list[dict], dict[str, dict]]:
    """Training measurements per (backbone, method), latency per backbone."""
    total = len(backbones) * (len(methods) + 2)
    counter = (f"[{i}/{total}]" for i in itertools.count(1))
    rows, latency = [], {}
    for backbone in backbones:
        backbone_rows, latency[backbone] = run_backbone(backbone, methods, setting, counter)
        rows += backbone_rows
    return add_ratios(rows), latency


def add_ratios(rows: list[dict]) -> list[dict]:
    """Trainable share, and memory and step time relative to full fine-tuning."""
    reference = {r["backbone"]: r for r in rows if r["method"] == REFERENCE and r["status"] == "ok"}
    for row in rows:
        if row["status"] != "ok":
            continue
        row["trainable_pct"] = 100 * row["trainable"] / row["total"]
        ref = reference.get(row["backbone"], {})
        row["memory_vs_full"] = ratio(row["peak_growth_mib"], ref.get("peak_growth_mib"))
        row["step_vs_full"] = ratio(row.get("step_s"), ref.get("step_s"))
    return rows


def latency_fields(result: dict, name: str, batches) -> dict | None:
    """Latency numbers of ``name`` (a method or PLAIN) on one backbone; None if it was not timed."""
    if result["status"] != "ok" or name not in result["ms"]:
        return None
    info = result["info"].get(name, {})
    plain, own, unmerged = (result["ms"].get(key) for key in (PLAIN, name, name + UNMERGED))
    fields = {"model": "timm" if name == PLAIN else "merged" if info.get("merged") else "unmerged"}
    for b in map(str, batches):
        fields[f"b{b}_ms"] = own[b]
        fields[f"b{b}_vs_plain"] = own[b] / plain[b]
        fields[f"unmerged_b{b}_vs_plain"] = ratio(unmerged[b], plain[b]) if unmerged else None
    fields["max_abs_diff"] = info.get("max_abs_diff")
    return fields


def latency_reason(result: dict, name: str) -> str:
    """Why ``name`` has no latency on a backbone."""
    if result["status"] != "ok":
        return f"{result['status']}: {result['reason']}"
    return result["skipped"].get(name, "not timed (see the training table)")


# ---------------------------------------------------------------- reporting


def training_table(rows: list[dict]) -> str:
    headers = ["Backbone", "Method", "Trainable", "Total", "Trainable %",
               "Peak mem. growth (MiB)", "Mem. vs full", "Step (s)", "Step vs full"]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["backbone"], r["method"], r["status"], "", "", "", "", "", r["reason"]])
            continue
        lines.append([
            r["backbone"], r["method"], f"{r['trainable']:,}", f"{r['total']:,}", f"{r['trainable_pct']:.3f}",
            f"{r['peak_growth_mib']:.0f}", fmt(r.get("memory_vs_full"), ".2f"),
            fmt(r.get("step_s"), ".3f"), fmt(r.get("step_vs_full"), ".2f"),
        ])
    return markdown_table(headers, lines)


def latency_table(latency: dict[str, dict], methods, setting: Setting) -> str:
    """One line for plain timm and one per method on every backbone."""
    headers = ["Backbone", "Method", "Inference model"]
    for b in setting.latency_batches:
        headers += [f"b{b} (ms)", f"b{b} / plain", f"Unmerged b{b} / plain"]
    headers.append("max abs diff merged vs unmerged")
    lines = []
    for backbone, result in latency.items():
        for name in (PLAIN, *methods):
            f = latency_fields(result, name, setting.latency_batches)
            if f is None:
                lines.append([backbone, name, latency_reason(result, name)] + [""] * (len(headers) - 3))
                continue
            line = [backbone, name, f["model"]]
            for b in setting.latency_batches:
                line += [f"{f[f'b{b}_ms']:.1f}", f"{f[f'b{b}_vs_plain']:.3f}", fmt(f[f"unmerged_b{b}_vs_plain"], ".3f")]
            lines.append(line + [fmt(f["max_abs_diff"], ".3g")])
    return markdown_table(headers, lines)


def header_line(setting: Setting, record: RunRecord) -> str:
    return (
        f"Batch {setting.batch}, image {setting.image_size}x{setting.image_size}, AdamW; memory after "
        f"{setting.memory_steps} steps; step time: median of {setting.timed_steps} interleaved rounds after "
        f"{setting.warmup_steps} warm-up. {record.environment()}"
    )


def csv_records(rows: list[dict], latency: dict[str, dict], setting: Setting) -> list[dict]:
    """One record per (backbone, method): training numbers plus ``latency_*`` columns."""
    records = []
    for row in rows:
        result = latency.get(row["backbone"], {"status": "n/a"})
        fields = latency_fields(result, row["method"], setting.latency_batches) or {}
        plain = latency_fields(result, PLAIN, setting.latency_batches) or {}
        plain_ms = {f"latency_plain_b{b}_ms": plain.get(f"b{b}_ms") for b in setting.latency_batches}
        records.append({**row, **{f"latency_{k}": v for k, v in fields.items()}, **plain_ms})
    return records


def plot_memory_time(rows: list[dict], backbones, path) -> None:
    """One panel per backbone: peak-memory growth (left axis) and step-time ratio (right axis) per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(backbones), figsize=(4.5 * len(backbones), 4), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        ok = [r for r in rows if r["backbone"] == backbone and r["status"] == "ok"]
        x = range(len(ok))
        ax.bar([i - 0.2 for i in x], [r["peak_growth_mib"] for r in ok], 0.4, color="tab:blue")
        ax.set_ylabel("peak memory growth (MiB)", color="tab:blue")
        twin = ax.twinx()
        twin.bar([i + 0.2 for i in x], [r.get("step_vs_full") or 0 for r in ok], 0.4, color="tab:orange")
        twin.axhline(1.0, color="tab:orange", linestyle=":", linewidth=1)
        twin.set_ylabel("step time / full", color="tab:orange")
        ax.set_xticks(list(x), [r["method"] for r in ok], rotation=45, ha="right")
        ax.set_title(backbone, fontsize=9)
    save_figure(fig, path)


def plot_params(rows: list[dict], backbones, methods, path) -> None:
    """Trainable parameters per method (log scale), grouped by backbone."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(methods)
    by_key = {(r["backbone"], r["method"]): r for r in rows if r["status"] == "ok"}
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(backbones))]
        values = [by_key.get((b, method), {}).get("trainable", 0) for b in backbones]
        ax.bar(xs, values, width, label=method, color=plt.cm.tab20(j % 20))  # 10-colour cycle < 12 methods
    ax.set_yscale("log")
    ax.set_ylabel("trainable parameters")
    ax.set_xticks(range(len(backbones)), backbones, fontsize=8)
    ax.legend(fontsize=8, ncol=min(len(methods), 6), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    save_figure(fig, path)


def write_outputs(rows, latency, backbones, methods, setting, record: RunRecord, out) -> str:
    out.mkdir(parents=True, exist_ok=True)
    report = "\n\n".join([
        "# Foundation benchmark",
        header_line(setting, record),
        "## Training cost per method",
        training_table(rows),
        f"## Inference latency of each method's deployed model vs plain timm (eval, inference_mode, "
        f"median of {setting.latency_runs} interleaved runs after {setting.latency_warmup} warm-up)",
        "Inference model: *merged* = folded by `deltavision.merge` (the plain timm architecture); "
        "*unmerged* = the method's modules stay at inference (it cannot fold). "
        "Unmerged bN / plain: the same method before merging, where merging removes tensors.",
        latency_table(latency, methods, setting),
    ]) + "\n"
    (out / "foundation.md").write_text(report)
    write_csv(csv_records(rows, latency, setting), out / "foundation.csv")
    plot_memory_time(rows, backbones, out / "foundation_memory_time.png")
    plot_params(rows, backbones, methods, out / "foundation_params.png")
    return report


def parse_args(argv=None):
    parser = base_parser(__doc__, "small smoke-test setting (112 px, batch 4, few steps)")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setting = QUICK_SETTING if args.quick else FULL_SETTING
    methods = args.methods or deltavision.list_methods()

    def benchmark(record: RunRecord) -> str:
        rows, latency = run_all(args.backbones, methods, setting)
        return write_outputs(rows, latency, args.backbones, methods, setting, record, args.out)

    run_script(args, TASKS, benchmark)


if __name__ == "__main__":
    main()
