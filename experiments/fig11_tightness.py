"""Figure 11: the exact LP optimum (eq. 19) against the dual bound, for three MNIST models.

    python -m experiments.fig11_tightness [--quick] [--n 25] [--n-large 4] [--out figures/]

Panels as in the paper (``--models``): the robust (released) model, a randomly initialised model
and a standard-trained model (the short-run baseline of :mod:`experiments.fig5_radii`); each point
is one (example, target) pair ``c = e_y - e_j`` at eps = 0.1.  ``--quick`` uses sklearn digits
models.  The random and standard MNIST models leave thousands of units unstable at eps 0.1 (the LP
has about 8,000 columns and 600,000 non-zeros): their LPs are solved by interior point with
crossover (``--large-solver``, about 15 s per LP against 70-130 s by the dual simplex) and
``--n-large`` caps their examples.  The CSV holds every row of
:func:`polytope.verifiers.tightness.tightness_rows` with its model and each example's seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch
from tqdm.auto import tqdm

from experiments._plot import (
    add_replot_option,
    experiment_parser,
    quick_robust_model,
    read_replot_table,
    save_figure,
    save_outputs,
    standard_model,
)
from polytope.io.data import load_dataset
from polytope.io.models import build_arch, load_released
from polytope.model.network import Network
from polytope.model.sets import LinfBall
from polytope.verifiers.tightness import tightness_rows

NAME = "fig11_tightness"


PANELS = ("robust", "random", "standard")
LARGE = ("random", "standard")  # panels whose LPs have thousands of unstable units


def models(quick: bool, seed: int, panels: Sequence[str]) -> tuple[list[tuple[str, torch.nn.Sequential]], str]:
    """The chosen panels' models (robust, random, standard) and their data set."""
    torch.manual_seed(seed)
    arch, dataset = ("digits_mlp", "digits") if quick else ("mnist", "mnist")
    build = {
        "robust": lambda: ("robust (digits)", quick_robust_model(seed=seed)[0]) if quick
        else ("robust (released)", load_released("mnist")),
        "random": lambda: ("random", build_arch(arch).eval()),
        "standard": lambda: (f"standard ({dataset})", standard_model(quick=quick, seed=seed)[0]),
    }
    return [build[name]() for name in panels], dataset


def plot(table: pd.DataFrame, title: str) -> plt.Figure:
    """One scatter panel per model (in the CSV's order): LP optimum against the dual bound, LP = dual dashed.

    Each title gives the median gap, its median relative to ``|LP|``, the pairs and the seconds per example.
    """
    labels = list(dict.fromkeys(table["model"]))
    fig, axes = plt.subplots(1, len(labels), figsize=(4.6 * len(labels), 4.6), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        part = table[(table["model"] == label) & (table["lp_status"] == "optimal")]
        ax.scatter(part["lp"], part["dual"], s=8, alpha=0.6)
        lo, hi = min(part["lp"].min(), part["dual"].min()), max(part["lp"].max(), part["dual"].max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="LP = dual")
        gap = part["lp"] - part["dual"]
        relative = (gap / part["lp"].abs()).median()
        per_example = table.loc[table["model"] == label, "example_seconds"].median()
        ax.set_title(
            f"{label}\nmedian LP - dual = {gap.median():.3g} ({relative:.1%} of |LP|)\n"
            f"{len(part)} pairs, {per_example:.3g} s per example",
            fontsize=10,
        )
        ax.set_xlabel("exact LP optimum (eq. 19)")
        ax.set_ylabel("dual bound J (Theorem 1)")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    """Compute the rows and draw the three panels."""
    parser = experiment_parser(NAME, __doc__)
    parser.add_argument("--n", type=int, default=None, help="test examples per model (default 25, quick 3)")
    parser.add_argument("--n-large", type=int, default=None,
                        help="test examples for the random and standard panels (default: --n)")
    parser.add_argument("--large-solver", choices=("simplex", "ipm"), default="ipm",
                        help="HiGHS solver for the random and standard panels' LPs (ipm: with crossover)")
    parser.add_argument("--eps", type=float, default=0.1, help="l_inf radius")
    parser.add_argument("--models", nargs="+", choices=PANELS, default=list(PANELS),
                        help="panels to draw (random and standard MNIST models have thousands of unstable units "
                             "at eps 0.1: 2-4 minutes per example)")
    add_replot_option(parser, f"{NAME}.csv")
    args = parser.parse_args(argv)
    dataset = "digits" if args.quick else "mnist"
    title = f"Figure 11: primal LP vs dual bound, {dataset}, eps = {args.eps}"
    if args.replot:
        fig = plot(read_replot_table(parser, args.out / f"{NAME}.csv"), title)
        print(f"wrote {save_figure(fig, args.out, NAME)} from the CSV")
        return 0
    n = args.n or (3 if args.quick else 25)
    n_large = n if args.n_large is None else args.n_large
    panels, dataset = models(args.quick, args.seed, args.models)
    x, y = load_dataset(dataset, "test", limit=max(n, n_large))
    rows = []
    for name, (label, seq) in zip(args.models, panels, strict=True):
        net = Network.from_torch(seq.double())
        large = name in LARGE and not args.quick
        options = {"solver": args.large_solver} if large else None
        for i in tqdm(range(n_large if large else n), desc=label, disable=args.no_progress):
            start = time.perf_counter()
            for row in tightness_rows(net, x[i:i + 1].double(), int(y[i]), LinfBall(args.eps), lp_options=options):
                rows.append({"model": label, "index": i, "example_seconds": math.nan, **row})
            rows[-1]["example_seconds"] = time.perf_counter() - start
    table = pd.DataFrame(rows)
    png, csv = save_outputs(plot(table, title), table, args.out, NAME)
    print(f"wrote {png} and {csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
