"""Figure 6: true adversarial polytopes of random 2-100-100-100-2 networks and their outer bounds.

Appendix B.1: weights ``N(0, 1/sqrt(n_in))`` -- read as standard deviation ``1/sqrt(n_in)``
(variance ``1/n_in``, torch's ``normal_(0, std)``) -- and biases ``N(0, 1)``; rows
``eps = 0.05, 0.1, 0.25``; columns are independent random networks, each around its own
centre ``x ~ U([0, 1]^2)`` (the paper does not say where ``x`` lies).  Per panel the true
polytope (gray, ``>= 10^6`` grid points plus the box boundary), the relaxed LP polygon (green,
eq. 19, ``K = 256`` uniform supporting half-planes, then refined along the inner polygon's
edge normals until inner = outer, i.e. exact), the dual polygon ``c^T z >= J(c)`` (Theorem 1,
dashed, refined the same way); the naive layerwise box (eq. 42) dwarfs the panels and is
given as an area ratio in each panel and in the CSV.

The CSV holds, per (net, eps), the areas of the true hull, LP outer / inner polygons, dual
polygon and layerwise box, their ratios to the true hull, and the Hausdorff distance of each
bound from the true hull relative to its diameter (``gap_*``); ``<name>_summary.csv`` the
geometric mean and range of the ratios per eps.

    python -m experiments.fig6_polytopes [--quick] [--seed S] [--out figures/]
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm.auto import tqdm

from experiments import _plot
from experiments._plot import EPSILONS, random_case
from polytope import DualNetwork, LinfBall, Network
from polytope.solvers.polygons import PolygonComparison, compare_polygons

NAME = "fig6_polytopes"
#: At most this many tick labels per axis (the bottom row, with the widest ranges, had 8-9).
MAX_TICKS = 6


def n_unstable(net: Network, x: torch.Tensor, eps: float) -> list[int]:
    """Size of the paper's unstable set ``I_i`` in each ReLU layer (dual bounds)."""
    dual = DualNetwork(net, x, LinfBall(eps))
    return [int(s.unstable.sum()) for s in (dual.index_sets(i) for i in range(net.n_relu))]


def record(net_index: int, x: torch.Tensor, eps: float, comp: PolygonComparison, unstable: list[int]) -> dict:
    """One CSV row: areas, ratios to the true hull, timings."""
    row: dict = {"net": net_index, "x1": float(x[0, 0]), "x2": float(x[0, 1]), "eps": eps}
    row["unstable"] = "/".join(map(str, unstable))
    row.update({f"area_{k}": v for k, v in comp.areas().items()})
    row.update({f"ratio_{k.split('/')[0]}": v for k, v in comp.ratios().items()})
    row.update({f"gap_{k}": v for k, v in comp.gaps().items()})
    row["n_grid"] = comp.true.n_side**2
    row["dual_queries"] = comp.dual.n_queries
    row["dual_converged"] = comp.dual.converged
    if comp.lp is not None:
        row["lp_queries"] = comp.lp.n_queries
        row["lp_converged"] = comp.lp.converged
        row["lp_nonoptimal"] = sum(s != "optimal" for s in comp.lp.statuses)
    row["seconds_true"] = comp.true.seconds
    row["seconds_lp"] = comp.lp.seconds if comp.lp is not None else math.nan
    row["seconds_dual"] = comp.dual.seconds
    return row


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per eps: geometric mean, min and max of every area ratio over the networks."""
    rows = []
    for eps, group in table.groupby("eps"):
        row: dict = {"eps": eps, "n_nets": len(group)}
        for col in ("ratio_lp_outer", "ratio_lp_inner", "ratio_dual", "ratio_layerwise", "gap_lp", "gap_dual"):
            v = group[col].to_numpy()
            row[f"{col}_geomean"] = float(np.exp(np.log(v).mean()))
            row[f"{col}_min"] = float(v.min())
            row[f"{col}_max"] = float(v.max())
        rows.append(row)
    return pd.DataFrame(rows)


def run(
    seed: int = 0,
    n_nets: int = 4,
    epsilons: Sequence[float] = EPSILONS,
    n_side: int = 1001,
    n_boundary: int = 100_000,
    k: int = 256,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[tuple[int, float], PolygonComparison]]:
    """All panels: a table of areas and the comparisons themselves."""
    rows, comps = [], {}
    cases = [(j, eps) for j in range(n_nets) for eps in epsilons]
    for j, eps in tqdm(cases, desc="Figure 6 panels", disable=not progress):
        net, x = random_case(seed, j)
        comp = compare_polygons(net, x, LinfBall(eps), k=k, n_side=n_side, n_boundary=n_boundary)
        comps[(j, eps)] = comp
        rows.append(record(j, x, eps, comp, n_unstable(net, x, eps)))
    return pd.DataFrame(rows), comps


def plot(comps: dict[tuple[int, float], PolygonComparison], table: pd.DataFrame, seed: int, bins: int = 300) -> Figure:
    """Rows: eps; columns: networks; each panel notes its area ratios to the true hull.

    Every panel is drawn at equal aspect (one unit of ``zhat_{k,1}`` as long as one of
    ``zhat_{k,2}``, a square view around its polygons), so the shapes are not distorted; the
    scale differs from panel to panel, and at most ``MAX_TICKS`` ticks per axis keep it readable.
    """
    nets = sorted({j for j, _ in comps})
    epsilons = sorted({e for _, e in comps})
    fig, axes = _plot.panel_grid(len(epsilons), len(nets), size=3.2)
    for c, j in enumerate(nets):
        net, _ = random_case(seed, j)
        for r, eps in enumerate(epsilons):
            ax = axes[r, c]
            _plot.draw_comparison(ax, comps[(j, eps)], net, bins=bins)
            row = table[(table.net == j) & (table.eps == eps)].iloc[0]
            ax.set_title(
                f"net {j}, $\\epsilon$ = {eps:g}\nLP {row.ratio_lp_outer:.2f}×, dual {row.ratio_dual:.2f}×, "
                f"layerwise {row.ratio_layerwise:.2g}×",
                fontsize=9,
            )
            _plot.label_axes(ax, xlabel=r == len(epsilons) - 1, ylabel=c == 0)
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(MaxNLocator(nbins=MAX_TICKS - 1, steps=[1, 2, 2.5, 5, 10]))
    _plot.finish(
        fig,
        "Figure 6: random 2-100-100-100-2 networks (weights N(0, std 1/sqrt(n_in)), biases N(0, 1))\n"
        "panel titles: area of each outer bound / area of the true polytope's convex hull; "
        "each panel to scale (1:1) on its own range",
        _plot.legend_handles(layerwise=False),
    )
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = _plot.experiment_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--nets", type=int, default=None, help="number of random networks (default 4, quick 2)")
    parser.add_argument(
        "--directions", type=int, default=None, help="uniform LP/dual directions K (default 256, quick 32)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        settings = {"n_nets": args.nets or 2, "n_side": 81, "n_boundary": 1000, "k": args.directions or 32}
    else:
        settings = {
            "n_nets": args.nets or 4,
            "n_side": 1001,
            "n_boundary": 100_000,
            "k": args.directions or 256,
        }
    start = time.perf_counter()
    table, comps = run(seed=args.seed, progress=not args.no_progress, **settings)
    fig = plot(comps, table, args.seed, bins=120 if args.quick else 300)
    png, csv = _plot.save_outputs(fig, table, args.out, NAME)
    summary = summarise(table)
    summary.to_csv(args.out / f"{NAME}_summary.csv", index=False)
    cols = [
        "eps",
        "ratio_lp_outer_geomean",
        "ratio_lp_inner_geomean",
        "ratio_dual_geomean",
        "ratio_layerwise_geomean",
        "gap_lp_geomean",
        "gap_dual_geomean",
    ]
    print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {png} and {csv} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
