"""Figures of a run: the loss curve, and accuracy against trainable parameters across methods.

Drawn on a bare `matplotlib.figure.Figure` (Agg canvas), never through pyplot: no GUI backend is
needed, and the process-wide pyplot state of whoever imports peftkit is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_loss(history: Mapping, path: str | os.PathLike) -> Path:
    """Draw training loss per step (and eval loss, when present) to a PNG; returns the path.

    Args:
        history: `{"train_loss": [{"step", "loss"}, ...], "eval": [{"step", "loss", ...}, ...]}`,
            the shape of `train()`'s metrics (metrics.json can be passed as loaded).
    """
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = history.get("train_loss", [])
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    evals = [r for r in history.get("eval", []) if "loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_tradeoff(rows: Sequence[Mapping], path: str | os.PathLike, metric: str = "accuracy",
                  references: Mapping[str, float] | None = None) -> Path:
    """Scatter `metric` against trainable parameters (log x), one labelled point per method.

    Args:
        rows: `{"method": name, "trainable_params": count, "accuracy": value}` per method.
        metric: the key plotted on the y axis.
        references: {label: value} drawn as dashed horizontal lines (baselines from elsewhere).
    """
    needed = {"method", "trainable_params", metric}
    for row in rows:
        if not needed <= set(row):
            raise ValueError(f"plot_tradeoff row {dict(row)} lacks {sorted(needed - set(row))}")
    fig = Figure(figsize=(6.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in rows:
        x, y = max(row["trainable_params"], 1), row[metric]
        ax.scatter([x], [y], s=36)
        ax.annotate(row["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for i, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{7 + i}", label=label)
    if references:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (log scale)", ylabel=metric, title=f"{metric} vs trainable parameters")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
