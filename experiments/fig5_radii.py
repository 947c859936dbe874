"""Figure 5: the largest certified l_inf radius of every test example, standard vs robust MNIST model.

For each test example the largest ``eps`` whose certificate (Corollary 2, the predicted class)
still holds is found by eq. (17)'s safeguarded Newton iteration
(:func:`polytope.verifiers.robust.certified_radius`).  The radii are sorted and coloured by whether the
example is classified correctly.  The robust model is the paper's released MNIST model
(eps = 0.1); the standard model is trained here (``mnist`` architecture, ``robust=False``,
a short run) and cached under ``runs/models/`` so that :mod:`experiments.table1` reuses it.

The paper reports medians of about 0.007 (standard) and 0.1 (robust) for correctly
classified examples, and 5-6 Newton steps per example.

The two panels share one y axis, so the gap between the models shows.  A misclassified
example's radius, as in the paper's figure, is the largest ``eps`` at which Corollary 2
certifies its (wrong) predicted class: it is drawn in red and so labelled; for its true label
it is not robust at any ``eps`` (the robust error counts it at every radius).

    python -m experiments.fig5_radii [--quick] [--limit N] [--out figures/] [--replot]

``--replot`` redraws the PNG from the ``fig5_radii.csv`` already in ``--out``, computing nothing.

``--quick`` uses sklearn's digits and two tiny ``digits_mlp`` models trained in seconds.

This module also holds the helpers shared by the paper's table experiments
(:mod:`experiments.table1`, :mod:`experiments.table2`, :mod:`experiments.fig10_index_sets`):
the command line, output files, the cached standard models and the attack/bound evaluation.
"""

from __future__ import annotations

import sys
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from experiments import _plot
from experiments._plot import (
    model_experiment_parser,
    quick_robust_model,
    standard_model,
)
from polytope.io.data import load_dataset
from polytope.io.models import load_released
from polytope.model.network import Network
from polytope.model.sets import LinfBall
from polytope.runs.tables import radius_rows

NAME = "fig5_radii"
#: The paper's values (Section 4.2).
PAPER_MEDIAN = {"standard": 0.007, "robust": 0.1}
#: The robust model of each data set (full run: the paper's released one; ``--quick``: a tiny one).
ROBUST_NAME = {"mnist": "released:mnist (eps 0.1)", "digits": "digits_mlp robust eps 0.1 (4 epochs)"}
CORRECT_COLOR = "#2b7bba"
WRONG_COLOR = "#d7301f"


# ---------------------------------------------------------------------------------------------
# Figure 5
# ---------------------------------------------------------------------------------------------
def radii(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 10,
    progress: bool = True,
    max_steps: int = 30,
) -> pd.DataFrame:
    """:func:`polytope.runs.tables.radius_rows` over ``(x, y)`` in batches."""
    from tqdm.auto import tqdm

    net = Network.from_torch(model)
    parts = []
    for start in tqdm(range(0, len(x), batch_size), desc="radii", disable=not progress, leave=False):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        parts.append(
            radius_rows(
                net,
                xb,
                yb,
                LinfBall(0.0),
                eps_max=1.0,
                tol=1e-4,
                indices=list(range(start, start + len(xb))),
                max_steps=max_steps,
            )
        )
    return pd.concat(parts, ignore_index=True)


def plot(table: pd.DataFrame, dataset: str) -> Figure:
    """Two panels (standard, robust) on one y scale: sorted radii, coloured by correctness (the paper's Figure 5).

    A misclassified example's radius certifies its predicted (wrong) class (Corollary 2).
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained", sharey=True)
    for ax, kind in zip(axes, ("standard", "robust"), strict=True):
        df = table[table["model"] == kind].sort_values("radius").reset_index(drop=True)
        ok = df["correct"].to_numpy(dtype=bool)
        rank = np.arange(len(df))
        ax.scatter(rank[ok], df["radius"][ok], s=6, color=CORRECT_COLOR, lw=0, label="correctly classified")
        ax.scatter(
            rank[~ok],
            df["radius"][~ok],
            s=22,
            color=WRONG_COLOR,
            marker="x",
            lw=1.2,
            zorder=3,
            label="misclassified: the radius certifies its wrong prediction (Corollary 2);\n"
            "for its true label it is not robust at any $\\epsilon$",
        )
        med = float(df["radius"][ok].median()) if ok.any() else float("nan")
        ax.axhline(med, color="0.3", ls="--", lw=0.8, label="median over the correctly classified")
        ax.text(
            0.97,
            0.5,
            f"median (correct) {med:.4f}\npaper: ~{PAPER_MEDIAN[kind]}\n{(~ok).sum()} of {len(df)} misclassified",
            transform=ax.transAxes,
            va="center",
            ha="right",
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "0.8", "alpha": 0.9},
        )
        ax.set_title(f"{kind} training")
        ax.set_xlabel("test example (sorted by radius)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylim(0, 1.08 * float(table["radius"].max()))  # shared: both panels on one scale
    axes[0].set_ylabel(r"largest certified $\epsilon$ ($\ell_\infty$) for the predicted class")
    axes[1].tick_params(labelleft=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False, markerscale=1.5)
    fig.suptitle(f"Figure 5: maximum certified $\\epsilon$ per test example ({dataset}, eq. 17)")
    return fig


def subtitle(dataset: str, limit: int) -> str:
    """The figure's description of the run: data, number of examples, robust model."""
    return f"{dataset}, first {limit} test examples; robust = {ROBUST_NAME[dataset]}"


def main(argv: list[str] | None = None) -> int:
    """Compute the radii of both models, write ``fig5_radii.png``/``.csv``, print the medians."""
    parser = model_experiment_parser(NAME, __doc__)
    parser.add_argument("--limit", type=int, default=None, help="first N test examples (default: 500; --quick: 100)")
    parser.add_argument("--max-steps", type=int, default=30, help="Newton steps per example (default: 30)")
    _plot.add_replot_option(parser, f"{NAME}.csv")
    args = parser.parse_args(argv)
    dataset = "digits" if args.quick else "mnist"
    if args.replot:
        table = _plot.read_replot_table(parser, args.out / f"{NAME}.csv")
        n = int((table["model"] == "standard").sum())
        print(f"wrote {_plot.save_figure(plot(table, subtitle(dataset, n)), args.out, NAME)} from the CSV")
        return 0
    torch.set_num_threads(args.threads)
    limit = args.limit or (100 if args.quick else 500)
    progress = not args.no_progress
    t0 = time.perf_counter()
    if args.quick:
        std, std_info = standard_model(quick=True, models_dir=args.models_dir, seed=args.seed)
        rob, _ = quick_robust_model(args.models_dir, args.seed)
    else:
        std, std_info = standard_model(models_dir=args.models_dir, seed=args.seed, progress=progress)
        rob = load_released("mnist").eval()
    print(
        f"standard model: {std_info['arch']}, {std_info['config']['epochs']} epochs, "
        f"trained in {std_info['seconds']:.0f} s (cached under {args.models_dir})"
    )
    x, y = load_dataset(dataset, "test", limit=limit)
    parts = []
    for kind, model in (("standard", std), ("robust", rob)):
        t = time.perf_counter()
        df = radii(model, x, y, progress=progress, max_steps=args.max_steps)
        df.insert(0, "model", kind)
        parts.append(df)
        ok = df["correct"]
        print(
            f"{kind:8s}: {len(df)} examples, median radius correct {df['radius'][ok].median():.4f} "
            f"(paper ~{PAPER_MEDIAN[kind]}), wrong {df['radius'][~ok].median():.4f}; newton steps mean "
            f"{df['newton_steps'].mean():.2f} median {df['newton_steps'].median():.0f} max "
            f"{df['newton_steps'].max()}  ({time.perf_counter() - t:.0f} s)"
        )
    table = pd.concat(parts, ignore_index=True)
    fig = plot(table, subtitle(dataset, limit))
    png, csv = _plot.save_outputs(fig, table, args.out, NAME)
    print(f"wrote {png} and {csv} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
