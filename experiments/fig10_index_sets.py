"""Figure 10: how each ReLU layer's units split into the index sets I-, I+ and I (eq. 10).

For every training example, Algorithm 1's bounds ``l <= zhat <= u`` over the l_inf ball of
radius ``eps`` (0.1, the released model's) put each unit of ReLU layer ``i`` into
``I-`` (``u <= 0``: always off), ``I+`` (``l >= 0``: always on) or ``I`` (unstable, the only
units whose relaxation is loose and that enter the last term of eq. 6).  The figure shows,
per layer (rows) and set (columns), the histogram over examples of the *fraction* of the
layer's units in that set -- the paper's Figure 10 on the released MNIST model.

    python -m experiments.fig10_index_sets [--quick] [--limit N] [--eps 0.1] [--out figures/]

``--quick`` uses a tiny robust ``digits_mlp`` (one ReLU layer) on sklearn's digits.
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
from tqdm.auto import tqdm

from experiments._plot import model_experiment_parser, quick_robust_model, save_outputs
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


def plot(table: pd.DataFrame, title: str) -> Figure:
    """Rows: ReLU layers; columns: I-, I+, I; each a histogram over examples of the fraction."""
    layers = sorted(table["layer"].unique())
    fig, axes = plt.subplots(len(layers), 3, figsize=(10, 2.3 * len(layers) + 0.6), squeeze=False, layout="constrained")
    bins = np.linspace(0, 1, 51)
    for r, layer in enumerate(layers):
        df = table[table["layer"] == layer]
        for c, (name, label, color) in enumerate(SETS):
            ax = axes[r, c]
            ax.hist(df[name], bins=bins, color=color, alpha=0.85)
            ax.axvline(df[name].mean(), color="k", lw=0.8, ls="--")
            ax.text(0.97, 0.92, f"mean {df[name].mean():.3f}", transform=ax.transAxes, ha="right", va="top", fontsize=8)
            ax.set_xlim(0, 1)
            if r == 0:
                ax.set_title(label)
            if c == 0:
                ax.set_ylabel(f"layer {layer} ({int(df['units'].iloc[0])} units)\nexamples")
            if r == len(layers) - 1:
                ax.set_xlabel("fraction of the layer's units")
    fig.suptitle(title)
    return fig


def main(argv: list[str] | None = None) -> int:
    """Compute the index-set fractions, write ``fig10_index_sets.png``/``.csv`` and print the means."""
    parser = model_experiment_parser(NAME, __doc__)
    parser.add_argument(
        "--limit", type=int, default=None, help="first N training examples (default: 2000; --quick: 200)"
    )
    parser.add_argument("--eps", type=float, default=0.1, help="l_inf radius (default: 0.1, the training eps)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    limit = args.limit or (200 if args.quick else 2000)
    t0 = time.perf_counter()
    if args.quick:
        model, _ = quick_robust_model(args.models_dir, args.seed)
        dataset, model_name = "digits", "robust digits_mlp (quick)"
    else:
        model, dataset, model_name = load_released("mnist").eval(), "mnist", "released robust MNIST model"
    x, _ = load_dataset(dataset, "train", limit=limit)
    table = index_set_fractions(model, x, args.eps, progress=not args.no_progress)
    means = table.groupby("layer")[[name for name, _, _ in SETS]].mean()
    print(f"mean fraction per layer ({len(x)} {dataset} training examples, eps {args.eps}):\n{means.round(4)}")
    fig = plot(
        table,
        f"Figure 10: index sets at $\\epsilon$ = {args.eps:g}, {model_name}, "
        f"first {len(x)} {dataset} training examples",
    )
    png, csv = save_outputs(fig, table, args.out, NAME)
    print(f"wrote {png} and {csv} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
