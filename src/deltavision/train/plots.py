"""PNG plots of training runs and method comparisons (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history: list[dict], path: Path, plotted: dict[str, str] | None = None) -> None:
    """Loss (train and val) and the validation metrics ``plotted`` ({key: label}, in percent) per epoch."""
    plotted = plotted or {"top1": "top-1", "top5": "top-5"}
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    if all("val_loss" in r for r in history):  # detectors give no validation loss
        ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    for key, label in plotted.items():
        ax_acc.plot(epochs, [r[key] for r in history], "o-", label=label)
    ax_acc.set(xlabel="epoch", ylabel="%", title="validation " + ", ".join(plotted.values()))
    ax_acc.legend()
    _save(fig, path)


def plot_accuracy_vs_params(rows: list[dict], path: Path, title: str, key: str = "top1",
                            label: str = "validation top-1 (%)") -> None:
    """``key`` (top-1 by default; e.g. "miou" for segmentation) against trainable parameters (log scale),
    one labelled point per method."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in rows:
        ax.scatter(row["trainable"], row[key], s=40)
        ax.annotate(row["method"], (row["trainable"], row[key]), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.08)  # room for the labels of the outermost points
    ax.set(xlabel="trainable parameters (log scale)", ylabel=label, title=title)
    ax.grid(True, alpha=0.3)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    from ..io import atomic_write

    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
