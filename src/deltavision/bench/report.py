"""The VTAB-1k table: our top-1 per task, the three group means and two overall means, beside the papers'.

Overall means follow both conventions in the literature: ``mean`` averages the tasks (SSF,
Table 4: 73.10 for SSF) and ``mean of groups`` averages the natural, specialized and structured
means (MIST's tables). Published rows are averaged over the same tasks as ours, so a subset run
compares like with like; their printed full-benchmark means are listed under the table.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.vtab import GROUPS, TASKS
from ..io import atomic_write, save_json
from .published import PUBLISHED, published_key

GROUP_COLUMNS = tuple(GROUPS)
MEAN_COLUMNS = ("mean", "mean_of_groups")
SHORT_NAMES = {
    "cifar": "CIFAR-100", "caltech101": "Caltech101", "dtd": "DTD", "oxford_flowers102": "Flowers102",
    "oxford_iiit_pet": "Pets", "svhn": "SVHN", "sun397": "Sun397", "patch_camelyon": "Camelyon",
    "eurosat": "EuroSAT", "resisc45": "Resisc45", "diabetic_retinopathy": "Retinopathy",
    "clevr_count": "Clevr-Count", "clevr_dist": "Clevr-Dist", "dmlab": "DMLab", "kitti": "KITTI-Dist",
    "dsprites_loc": "dSpr-Loc", "dsprites_ori": "dSpr-Ori", "smallnorb_azi": "sNORB-Azim", "smallnorb_ele": "sNORB-Elev",
}  # fmt: skip


@dataclass(frozen=True)
class VtabResult:
    """Test (or val200, when tuning) top-1 of one method on one task."""

    task: str
    method: str
    top1: float
    trainable: int
    cached: bool


def summary_columns(top1: dict[str, float]) -> dict[str, float | None]:
    """The group means (over the tasks present) and both overall means of per-task top-1."""
    groups = {}
    for group, members in GROUPS.items():
        values = [top1[task] for task in members if task in top1]
        groups[group] = statistics.fmean(values) if values else None
    present = [value for value in groups.values() if value is not None]
    return {
        **groups,
        "mean": statistics.fmean(top1.values()) if top1 else None,
        "mean_of_groups": statistics.fmean(present) if present else None,
    }


def method_label(method: str, options: dict | None) -> str:
    """A method's name in the table, with its options when it has any (e.g. ``vpt deep=true``)."""
    extra = " ".join(f"{key}={value}" for key, value in sorted((options or {}).items()))
    return f"{method} {extra}".strip()


def table_rows(results: list[VtabResult], config: Any) -> list[dict[str, Any]]:
    """Our row per method, each followed by the paper's row for it (same tasks), as column -> value."""
    tasks = [task for task in TASKS if any(r.task == task for r in results)]
    rows = []
    for method in config.methods:
        options = config.method_options.get(method, {})
        ours = {r.task: r.top1 for r in results if r.method == method}
        rows.append({"method": method_label(method, options), "source": "ours", **ours, **summary_columns(ours)})
        key = published_key(method, options)
        if key is not None:
            paper = PUBLISHED[key]
            theirs = {task: value for task, value in paper.top1().items() if task in tasks}
            source = f"{paper.source}, row '{paper.row}'"
            rows.append({"method": paper.label, "source": source, **theirs, **summary_columns(theirs)})
    return rows


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown_table(rows: list[dict[str, Any]], tasks: list[str], title: str) -> str:
    """The table as Markdown, with a footer naming the published sources and their printed means."""
    names = [SHORT_NAMES[task] for task in tasks] + ["Natural", "Specialized", "Structured", "Mean", "Mean of groups"]
    head = f"## {title}\n\n| method | source | " + " | ".join(names) + " |\n"
    head += "|---|---|" + "---:|" * len(names) + "\n"
    columns = [*tasks, *GROUP_COLUMNS, *MEAN_COLUMNS]
    body = "".join(
        f"| {row['method']} | {row['source']} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |\n"
        for row in rows
    )
    return head + body + "\n" + footer(rows, tasks) + "\n"


def footer(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    """How the means are taken, and what each cited paper prints for the whole benchmark."""
    lines = [(
        f"Top-1 (%) per task; group means over the tasks of each group present here ({len(tasks)} of {len(TASKS)}); "
        "'Mean' averages the tasks (SSF's convention), 'Mean of groups' averages the group means (MIST's). "
        "Published rows are averaged over the same tasks as ours."
    )]
    for row in rows:
        if row["source"] == "ours":
            continue
        paper = next(p for p in PUBLISHED.values() if p.label == row["method"])
        lines.append(f"- {paper.label}: {paper.source}, row '{paper.row}'; the paper prints {paper.printed()} "
                     f"({paper.mean_convention}, all 19 tasks).")
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    """The table as CSV, one row per table row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["method", "source", *tasks, *GROUP_COLUMNS, *MEAN_COLUMNS],
                            extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (f"{value:.2f}" if isinstance(value, float) else value) for key, value in row.items()})
    return buffer.getvalue()


def plot_vtab(rows: list[dict[str, Any]], tasks: list[str], path: Path, title: str) -> None:
    """Per-task top-1: ours as filled circles, the papers' as crosses in the same colour."""
    from ..train.plots import _save, plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(tasks) + 3), 4.5))
    positions = range(len(tasks))
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    colour = None
    for row in rows:
        ours = row["source"] == "ours"
        colour = next(colours) if ours else colour
        values = [row.get(task) for task in tasks]
        ax.plot(positions, values, "o" if ours else "x", color=colour, linestyle="none", markersize=7,
                label=f"{row['method']} ({'ours' if ours else 'published'})")
    ax.set_xticks(list(positions), [SHORT_NAMES[task] for task in tasks], rotation=60, ha="right")
    ax.margins(x=0.1)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def write_vtab_reports(results: list[VtabResult], config: Any) -> Path:
    """vtab.md, vtab.csv, vtab.png and vtab.json in ``config.out_dir`` (``vtab-tune.*`` for the tune protocol)."""
    out = Path(config.out_dir)
    stem = "vtab" if config.protocol == "final" else f"vtab-{config.protocol}"
    tasks = [task for task in TASKS if any(r.task == task for r in results)]
    rows = table_rows(results, config)
    scored_on = "test after training on train800val200" if config.protocol == "final" else "val200 after training on train800"
    title = f"VTAB-1k, {config.backbone}: top-1 on {scored_on}"
    atomic_write(out / f"{stem}.md", lambda tmp: Path(tmp).write_text(markdown_table(rows, tasks, title)))
    atomic_write(out / f"{stem}.csv", lambda tmp: Path(tmp).write_text(csv_text(rows, tasks)))
    plot_vtab(rows, tasks, out / f"{stem}.png", title)
    save_json({"rows": rows, "results": [r.__dict__ for r in results]}, out / f"{stem}.json")
    return out / f"{stem}.md"
