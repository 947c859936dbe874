"""Learning curves in the style of the paper's Figures 4 and 12-14."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd


def plot_learning_curves(log: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Loss (left) and error (right), robust and standard, train and test, per epoch."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("loss", "error"), strict=True):
        for split, style in (("train", "-"), ("test", "--")):
            ax.plot(log["epoch"], log[f"{split}_{metric}"], style, color="tab:blue", label=f"{split} {metric}")
            ax.plot(
                log["epoch"], log[f"{split}_robust_{metric}"], style, color="tab:red", label=f"{split} robust {metric}"
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        if metric == "loss":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
