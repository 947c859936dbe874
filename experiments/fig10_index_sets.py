"""Figure 10: how each ReLU layer's units split into the index sets I-, I+ and I (eq. 10).

For every training example, Algorithm 1's bounds ``l <= zhat <= u`` over the l_inf ball of
radius ``eps`` (0.1, the released model's) put each unit of ReLU layer ``i`` into
``I-`` (``u <= 0``: always off), ``I+`` (``l >= 0``: always on) or ``I`` (unstable, the only
units whose relaxation is loose and that enter the last term of eq. 6).  The figure shows,
per layer (rows) and set (columns), the histogram over examples of the *fraction* of the
layer's units in that set -- the paper's Figure 10 on the released MNIST model.  Each panel's
x axis spans its own data (the unstable fractions are a few percent: on a shared 0-1 axis their
histograms were squashed against zero), on the ``1/units`` grid a fraction can take.

    python -m experiments.fig10_index_sets [--quick] [--limit N] [--eps 0.1] [--out figures/] [--replot]

``--replot`` redraws the PNG from the ``fig10_index_sets.csv`` already in ``--out`` (with the
``--eps``, ``--quick`` and ``--limit`` of that run, for the title), computing nothing.

``--quick`` uses a tiny robust ``digits_mlp`` (one ReLU layer) on sklearn's digits.
"""

from __future__ import annotations

import math
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
from tqdm.auto import tqdm

from experiments._plot import (
    add_replot_option,
    model_experiment_parser,
    quick_robust_model,
    read_replot_table,
    save_figure,
    save_outputs,
)
from polytope.bounds.dual import DualNetwork
from polytope.io.data import load_dataset
from polytope.io.models import load_released
from polytope.model.network import Network
from polytope.model.sets import LinfBall

NAME = "fig10_index_sets"
SETS = (
    ("negative", r"$\mathcal{I}^-_i$ (inactive)", "#4575b4"),
    ("positive", r"$\mathcal{I}^+_i$ (active)", "#1a9850"),
    ("unstable", r"$\mathcal{I}_i$ (unstable)", "#d73027"),
)
RELEASED_NAME = "released robust MNIST model"
#: At most this many histogram bins per panel (fewer when the data take fewer values).
MAX_BINS = 30


def index_set_fractions(
    model: nn.Sequential, x: torch.Tensor, eps: float, batch_size: int = 100, progress: bool = True
) -> pd.DataFrame:
    """One row per (example, ReLU layer): the fractions of the layer's units in I-, I+ and I."""
    net = Network.from_torch(model)
    rows = []
    for start in tqdm(range(0, len(x), batch_size), desc="bounds", disable=not progress, leave=False):
        xb = x[start : start + batch_size]
        with torch.no_grad():
            dual = DualNetwork(net, xb, LinfBall(eps))
            for layer in range(len(dual.bounds)):
                sets = dual.index_sets(layer)
                n_units = sets.unstable[0].numel()
                frac = {name: getattr(sets, name).flatten(1).double().mean(1).numpy() for name, _, _ in SETS}
                for b in range(len(xb)):
                    rows.append(
                        {
                            "example": start + b,
                            "layer": layer + 1,
                            "units": n_units,
                            **{name: float(frac[name][b]) for name, _, _ in SETS},
                        }
                    )
    return pd.DataFrame(rows)


def fraction_bins(values: np.ndarray, units: int, max_bins: int = MAX_BINS) -> np.ndarray:
    """Histogram edges over the data's range: each bin holds whole counts ``k / units``, edges halfway between."""
    k_lo, k_hi = round(float(values.min()) * units), round(float(values.max()) * units)
    width = max(1, math.ceil((k_hi - k_lo + 1) / max_bins))
    n_bins = math.ceil((k_hi - k_lo + 1) / width)
    return (k_lo - 0.5 + width * np.arange(n_bins + 1)) / units


def plot(table: pd.DataFrame, title: str) -> Figure:
    """Rows: ReLU layers; columns: I-, I+, I; each a histogram over examples of the fraction, on its own x range."""
    layers = sorted(table["layer"].unique())
    fig, axes = plt.subplots(len(layers), 3, figsize=(10, 2.5 * len(layers) + 0.6), squeeze=False, layout="constrained")
    for r, layer in enumerate(layers):
        df = table[table["layer"] == layer]
        units = int(df["units"].iloc[0])
        for c, (name, label, color) in enumerate(SETS):
            ax = axes[r, c]
            bins = fraction_bins(df[name].to_numpy(), units)
            ax.hist(df[name], bins=bins, color=color, alpha=0.85)
            ax.axvline(df[name].mean(), color="k", lw=0.8, ls="--", label=f"mean {df[name].mean():.3f}")
            pad = max(0.15 * (bins[-1] - bins[0]), 1.0 / units)  # never beyond the fractions 0 and 1
            ax.set_xlim(max(bins[0] - pad, min(bins[0], 0.0)), min(bins[-1] + pad, max(bins[-1], 1.0)))
            ax.legend(loc="best", fontsize=7, frameon=False, handlelength=1.2)
            ax.tick_params(labelsize=8)
            if r == 0:
                ax.set_title(label)
            if c == 0:
                ax.set_ylabel(f"layer {layer} ({units} units)\nexamples")
            in_set = label.split(" ")[0].replace("_i", f"_{layer}")
            ax.set_xlabel(f"fraction of layer {layer}'s {units} units in {in_set}", fontsize=8)
    fig.suptitle(title)
    return fig


def figure_title(eps: float, model_name: str, n: int, dataset: str) -> str:
    """The run's description: radius, model, number of training examples."""
    return f"Figure 10: index sets at $\\epsilon$ = {eps:g}, {model_name}, first {n} {dataset} training examples"


def main(argv: list[str] | None = None) -> int:
    """Compute the index-set fractions, write ``fig10_index_sets.png``/``.csv`` and print the means."""
    parser = model_experiment_parser(NAME, __doc__)
    parser.add_argument(
        "--limit", type=int, default=None, help="first N training examples (default: 2000; --quick: 200)"
    )
    parser.add_argument("--eps", type=float, default=0.1, help="l_inf radius (default: 0.1, the training eps)")
    add_replot_option(parser, f"{NAME}.csv")
    args = parser.parse_args(argv)
    dataset, model_name = ("digits", "robust digits_mlp (quick)") if args.quick else ("mnist", RELEASED_NAME)
    if args.replot:
        table = read_replot_table(parser, args.out / f"{NAME}.csv")
        fig = plot(table, figure_title(args.eps, model_name, table["example"].nunique(), dataset))
        print(f"wrote {save_figure(fig, args.out, NAME)} from the CSV")
        return 0
    torch.set_num_threads(args.threads)
    limit = args.limit or (200 if args.quick else 2000)
    t0 = time.perf_counter()
    model = quick_robust_model(args.models_dir, args.seed)[0] if args.quick else load_released("mnist").eval()
    x, _ = load_dataset(dataset, "train", limit=limit)
    table = index_set_fractions(model, x, args.eps, progress=not args.no_progress)
    means = table.groupby("layer")[[name for name, _, _ in SETS]].mean()
    print(f"mean fraction per layer ({len(x)} {dataset} training examples, eps {args.eps}):\n{means.round(4)}")
    fig = plot(table, figure_title(args.eps, model_name, len(x), dataset))
    png, csv = save_outputs(fig, table, args.out, NAME)
    print(f"wrote {png} and {csv} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
