"""Memory of N task adapters on one shared frozen backbone versus N fully fine-tuned models.

For N = 1, 2, 4, 8 tasks on vit_small_patch16_224 (random init) and the
embedded tf_efficientnet_lite0 (its real shipped weights), two ways to hold N
tasks are compared:

* **adapters**: one ``deltavision.multitask.MultiTaskModel`` with N tasks added by
  ``add_task``, the methods cycling through mona, lora, houlsby, adaptformer
  and vpt (vpt only where it applies: ViT), each with a 10-class head;
* **copies**: N models from ``create_model(backbone, "full", 10)``, i.e. N
  fully fine-tuned networks.

Two measures of each:

* **tensor bytes**: for the adapters ``MultiTaskModel.memory_report()``
  (the shared backbone once plus every task's own tensors), for the copies
  the distinct parameter and buffer bytes of every copy (N x one model);
* **held RSS growth**, measured: a fresh process per (backbone, N, way)
  first builds and drops one model of the backbone (so one-time costs of
  building, such as lazy imports and the weight-file reader, fall before the
  baseline), reads its current RSS after ``gc.collect`` and ``malloc_trim``
  (``common.held_rss_bytes``), builds the N tasks and reads it again. Unlike
  tensor bytes this includes the Python module objects each task's
  structural copy of the backbone carries.

Nothing runs forward: this is what holding the tasks costs, not training them.

Usage: ``python benchmarks/multitask.py [--quick] [--out benchmarks/results]``.
Writes multitask.md, multitask.csv and multitask.png; the Markdown also goes to stdout.
"""

from __future__ import annotations

import collections
import gc
import itertools

from deltavision.anatomy import family_of
from deltavision.methods import get_method
from deltavision.multitask import MultiTaskModel

from common import (
    EMBEDDED, MIB, NUM_CLASSES, RunRecord, base_parser, build_model, build_plain, describe_status, fmt,
    held_rss_bytes, markdown_table, progress, pyplot, ratio, run_in_fresh_process, save_figure,
    run_script, tensor_bytes, write_csv,
)

BACKBONES = ("vit_small_patch16_224", EMBEDDED)
ADAPTERS = ("mona", "lora", "houlsby", "adaptformer", "vpt")  # cycled through, skipping misfits
TASK_COUNTS = (1, 2, 4, 8)
QUICK_TASK_COUNTS = (1, 2)
NATIVE_SIZE = 224  # both backbones' own input size: no size options, models as deployed
WAYS = ("adapters", "copies")


# ---------------------------------------------------------------- worker side


def task_methods(backbone_model, n: int) -> list[str]:
    """The first ``n`` of ADAPTERS, cycled, that apply to the backbone's family."""
    family = family_of(backbone_model)
    usable = [m for m in ADAPTERS if get_method(m).families is None or family in get_method(m).families]
    return list(itertools.islice(itertools.cycle(usable), n))


def warm_up(backbone: str) -> None:
    """Build and drop one model, so one-time costs of building fall before the RSS baseline."""
    build_plain(backbone, NATIVE_SIZE)
    gc.collect()


def measure_adapters(backbone: str, n: int) -> dict:
    """Tensor bytes and held-RSS growth of one MultiTaskModel with ``n`` adapter tasks."""
    warm_up(backbone)
    baseline = held_rss_bytes()
    model = MultiTaskModel(backbone, pretrained=backbone == EMBEDDED)
    methods = task_methods(model.backbone, n)
    for i, method in enumerate(methods):
        model.add_task(f"task{i}-{method}", method, NUM_CLASSES)
    growth = held_rss_bytes() - baseline
    report = model.memory_report()
    return {
        "methods": methods, "tensor_bytes": sum(report.values()), "backbone_bytes": report["backbone"],
        "task_bytes": sum(report.values()) - report["backbone"], "rss_growth_bytes": growth,
    }


def measure_copies(backbone: str, n: int) -> dict:
    """Tensor bytes and held-RSS growth of ``n`` separately fine-tuned ("full") models."""
    warm_up(backbone)
    baseline = held_rss_bytes()
    models = [build_model(backbone, "full", NATIVE_SIZE) for _ in range(n)]
    growth = held_rss_bytes() - baseline
    return {"tensor_bytes": sum(tensor_bytes(m) for m in models), "rss_growth_bytes": growth}


TASKS = {"adapters": measure_adapters, "copies": measure_copies}


# ---------------------------------------------------------------- parent side


def run_all(task_counts) -> list[dict]:
    """One fresh process per (backbone, N, way); one row per (backbone, N) with both ways side by side."""
    total = len(BACKBONES) * len(task_counts) * len(WAYS)
    counter = (f"[{i}/{total}]" for i in itertools.count(1))
    rows = []
    for backbone, n in itertools.product(BACKBONES, task_counts):
        row = {"backbone": backbone, "tasks": n}
        for way in WAYS:
            result = run_in_fresh_process(__file__, way, backbone=backbone, n=n)
            progress(f"{next(counter)} {backbone} N={n} {way}: {describe(result)}")
            row.update({f"{way}_{key}": value for key, value in result.items()})
        rows.append(add_mib_and_ratios(row))
    return rows


def describe(result: dict) -> str:
    return describe_status(
        result, lambda r: f"{r['tensor_bytes'] / MIB:.1f} MiB tensors, +{r['rss_growth_bytes'] / MIB:.1f} MiB RSS"
    )


def add_mib_and_ratios(row: dict) -> dict:
    """MiB versions of the byte counts and the adapters / copies ratios."""
    for key in [k for k in row if k.endswith("_bytes")]:
        row[key.replace("_bytes", "_mib")] = row[key] / MIB
    row["tensor_ratio"] = ratio(row.get("adapters_tensor_bytes"), row.get("copies_tensor_bytes"))
    row["rss_ratio"] = ratio(row.get("adapters_rss_growth_bytes"), row.get("copies_rss_growth_bytes"))
    return row


# ---------------------------------------------------------------- reporting


def method_mix(methods: list[str]) -> str:
    return ", ".join(f"{count} {method}" for method, count in collections.Counter(methods).items())


def results_table(rows: list[dict]) -> str:
    headers = ["Backbone", "N", "Adapter tasks", "Shared backbone (MiB)", "Task tensors (MiB)",
               "Adapters: tensors (MiB)", "Copies: tensors (MiB)", "Tensors ratio",
               "Adapters: RSS growth (MiB)", "Copies: RSS growth (MiB)", "RSS ratio"]
    lines = []
    for r in rows:
        failed = [f"{way}: {r[f'{way}_status']} ({r[f'{way}_reason']})" for way in WAYS if r[f"{way}_status"] != "ok"]
        methods = method_mix(r.get("adapters_methods", []))
        lines.append([
            r["backbone"], str(r["tasks"]), "; ".join(failed) or methods,
            *(fmt(r.get(key), ".1f") for key in (
                "adapters_backbone_mib", "adapters_task_mib", "adapters_tensor_mib", "copies_tensor_mib")),
            fmt(r["tensor_ratio"], ".3f"),
            fmt(r.get("adapters_rss_growth_mib"), ".1f"), fmt(r.get("copies_rss_growth_mib"), ".1f"),
            fmt(r["rss_ratio"], ".3f"),
        ])
    return markdown_table(headers, lines)


def plot(rows: list[dict], path) -> None:
    """One panel per backbone: MiB against N for adapters and copies, tensor bytes and measured RSS."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(BACKBONES), figsize=(5.5 * len(BACKBONES), 4), squeeze=False)
    styles = {"tensor_mib": ("-", "tensor bytes"), "rss_growth_mib": ("--", "held RSS growth")}
    for ax, backbone in zip(axes[0], BACKBONES):
        mine = [r for r in rows if r["backbone"] == backbone]
        for (way, colour), (key, (line, label)) in itertools.product(
            zip(WAYS, ("tab:blue", "tab:red")), styles.items()
        ):
            points = [(r["tasks"], r[f"{way}_{key}"]) for r in mine if f"{way}_{key}" in r]
            if points:
                ax.plot(*zip(*points), line, marker="o", color=colour, label=f"{way}: {label}")
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["tasks"] for r in mine], [str(r["tasks"]) for r in mine])
        ax.set_xlabel("tasks N")
        ax.set_ylabel("MiB")
        ax.set_title(backbone, fontsize=9)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def write_outputs(rows: list[dict], record: RunRecord, out) -> str:
    out.mkdir(parents=True, exist_ok=True)
    report = "\n\n".join([
        "# Many tasks: N adapters on one backbone vs N fine-tuned copies",
        f"Adapters: one MultiTaskModel, methods cycling through {', '.join(ADAPTERS)} (where they apply); "
        "copies: N `create_model(backbone, \"full\")` models. Tensor bytes from `memory_report()` / the "
        "copies' tensors; held RSS growth measured in a fresh process per cell (after gc and malloc_trim). "
        f"Ratios: adapters / copies. {record.environment()}",
        results_table(rows),
    ]) + "\n"
    (out / "multitask.md").write_text(report)
    write_csv(rows, out / "multitask.csv")
    plot(rows, out / "multitask.png")
    return report


def main(argv=None) -> None:
    args = base_parser(__doc__, f"smoke test: N in {QUICK_TASK_COUNTS} only").parse_args(argv)
    counts = QUICK_TASK_COUNTS if args.quick else TASK_COUNTS
    run_script(args, TASKS, lambda record: write_outputs(run_all(counts), record, args.out))


if __name__ == "__main__":
    main()
