"""Evaluation figures (confusion matrix, ROC, calibration) as matplotlib Figures.

Figures are built with matplotlib.figure.Figure and the Agg canvas, never pyplot:
no global state, no display needed, safe in a worker or a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from ml.evaluation.metrics import TARGET_NAMES


@dataclass(frozen=True)
class RocSeries:
    """One ROC curve to draw: a name, labels, scores and the AUROC (with CI) for the legend."""

    name: str
    y_true: np.ndarray
    scores: np.ndarray
    auroc: float | None
    ci: tuple[float, float] | None = None
    threshold: float | None = None


def _new_figure(width: float = 5.0, height: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write fig as a PNG and return the path."""
    fig.savefig(path, format="png")
    return Path(path)


def confusion_matrix_figure(cm: dict[str, int], title: str = "Confusion matrix") -> Figure:
    """A 2x2 matrix (rows true, columns predicted) with counts and row percentages."""
    grid = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]], dtype=float)
    fig = _new_figure(4.5, 4.0)
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="Blues", vmin=0)
    row_totals = grid.sum(axis=1, keepdims=True)
    share = np.divide(grid, row_totals, out=np.zeros_like(grid), where=row_totals > 0)
    for i in range(2):
        for j in range(2):
            dark = grid[i, j] > grid.max() / 2
            ax.text(
                j, i, f"{int(grid[i, j])}\n{share[i, j]:.0%}",
                ha="center", va="center", color="white" if dark else "black",
            )  # fmt: skip
    ax.set_xticks([0, 1], TARGET_NAMES)
    ax.set_yticks([0, 1], TARGET_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig


def _legend_label(series: RocSeries) -> str:
    if series.auroc is None:
        return f"{series.name} (AUROC n/a: one class)"
    ci = f" [{series.ci[0]:.3f}, {series.ci[1]:.3f}]" if series.ci else ""
    return f"{series.name}: AUROC {series.auroc:.3f}{ci}"


def roc_figure(series: Sequence[RocSeries], title: str = "ROC") -> Figure:
    """ROC curves on one axis; each legend entry carries AUROC and its CI; dots mark thresholds."""
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    for item in series:
        y = np.asarray(item.y_true).astype(int)
        s = np.asarray(item.scores, dtype=float)
        if item.auroc is None:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        (line,) = ax.plot(fpr, tpr, linewidth=1.8, label=_legend_label(item))
        if item.threshold is not None:
            pred = s >= item.threshold
            sens = float(pred[y == 1].mean())
            fpr_at = float(pred[y == 0].mean())
            ax.plot([fpr_at], [sens], "o", color=line.get_color())
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def calibration_figure(bins: Sequence[dict], title: str = "Calibration") -> Figure:
    """Observed COVID fraction against mean predicted probability per bin, with counts below."""
    fig = _new_figure(5.0, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    filled = [b for b in bins if b["count"]]
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect")
    top.plot(
        [b["mean_predicted"] for b in filled],
        [b["observed_fraction"] for b in filled],
        "o-",
        label="model",
    )
    top.set_ylim(0, 1)
    top.set_ylabel("observed COVID fraction")
    top.set_title(title)
    top.legend(loc="upper left", fontsize="small")
    bottom.bar(
        [(b["lo"] + b["hi"]) / 2 for b in bins],
        [b["count"] for b in bins],
        width=[b["hi"] - b["lo"] for b in bins],
        edgecolor="white",
    )
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("predicted probability of COVID")
    bottom.set_ylabel("images")
    return fig
