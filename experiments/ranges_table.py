"""Eqs. (41)-(42): output ranges of one random network -- true polytope, LP, dual, layerwise.

Appendix B.1 ("Comparison to Naive Layerwise Bounds") reports, for Figure 6 (top left), the
true range of each output over the adversarial polytope (eq. 41) and the vacuous ranges of the
naive layerwise bounds (eq. 42).  For network 0 of :mod:`experiments.fig6_polytopes` (same
seed, same centre) and each eps this prints and saves, per output ``j``:

* ``true``: ``min``/``max`` of ``zhat_{k,j}`` over >= 10^6 enumerated points (eq. 41);
* ``lp``: the relaxed LP (eq. 19) minimising ``+-e_j`` (the convex outer polytope's range);
* ``dual``: ``J(+-e_j)`` of Theorem 1 (Algorithm 1 bounds on the output);
* ``layerwise``: naive interval bounds (eq. 42),

with each width and its ratio to the true width.  The figure shows the width ratios.

    python -m experiments.ranges_table [--quick] [--seed S] [--out figures/]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from experiments import _plot
from experiments._plot import EPSILONS, random_case
from polytope import DualNetwork, LinfBall, Network
from polytope.bounds.layerwise import layerwise_bounds
from polytope.solvers.polygons import true_polytope

NAME = "ranges_table"
METHODS = ("true", "lp", "dual", "layerwise")


def lp_ranges(net: Network, x, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``min``/``max`` of each output over the relaxed LP (eq. 19) with dual bounds."""
    from polytope.solvers.lp import RelaxedLP

    lp = RelaxedLP(net, x, LinfBall(eps), bounds="dual")
    n = lp.n_out
    lower, upper = np.full(n, np.nan), np.full(n, np.nan)
    for j in range(n):
        e = np.zeros(n)
        e[j] = 1.0
        lower[j] = lp.solve(e).value
        upper[j] = -lp.solve(-e).value
    return lower, upper


def ranges(net: Network, x, eps: float, n_side: int, n_boundary: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``(lower, upper)`` per method, each an array over the outputs."""
    s = LinfBall(eps)
    true = true_polytope(net, x, s, n_side=n_side, n_boundary=n_boundary)
    dual = DualNetwork(net, x, s)
    d_lo, d_hi = (t[0].detach().numpy() for t in dual.output_bounds())
    l_lo, l_hi = (t[0].detach().numpy() for t in layerwise_bounds(net, x, s).output)
    return {
        "true": (true.ranges[0], true.ranges[1]),
        "lp": lp_ranges(net, x, eps),
        "dual": (d_lo, d_hi),
        "layerwise": (l_lo, l_hi),
    }


def table_for(net_index: int, eps: float, r: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    """Long-format rows: one per (output, method)."""
    rows = []
    true_width = r["true"][1] - r["true"][0]
    for method in METHODS:
        lo, hi = r[method]
        for j in range(len(lo)):
            rows.append(
                {
                    "net": net_index,
                    "eps": eps,
                    "output": j + 1,
                    "method": method,
                    "lower": lo[j],
                    "upper": hi[j],
                    "width": hi[j] - lo[j],
                    "width_ratio": (hi[j] - lo[j]) / true_width[j],
                }
            )
    return rows


def markdown(table: pd.DataFrame) -> str:
    """The table as the paper writes eqs. (41)-(42): ``z_j in [lo, hi]`` per method."""
    lines = ["| eps | output | true (eq. 41) | LP | dual | layerwise (eq. 42) | widths LP / dual / layerwise vs true |"]
    lines.append("|---|---|---|---|---|---|---|")
    for (eps, j), g in table.groupby(["eps", "output"]):
        cell = {m: g[g.method == m].iloc[0] for m in METHODS}

        def fmt(row: pd.Series) -> str:
            return f"[{row.lower:.4g}, {row.upper:.4g}]"

        ratios = " / ".join(f"{cell[m].width_ratio:.3g}" for m in ("lp", "dual", "layerwise"))
        lines.append(
            f"| {eps:g} | {j} | {fmt(cell['true'])} | {fmt(cell['lp'])} | {fmt(cell['dual'])} | "
            f"{fmt(cell['layerwise'])} | {ratios} |"
        )
    return "\n".join(lines)


def plot(table: pd.DataFrame) -> Figure:
    """Top: width ratio to the true range (log scale) per eps and output; bottom: the ranges."""
    fig = _plot.plt.figure(figsize=(8.0, 8.2), layout="constrained")
    ax, tab = fig.subplots(2, 1, height_ratios=(3, 2))
    groups = list(table.groupby(["eps", "output"]))
    colours = {"lp": _plot.LP_EDGE, "dual": _plot.DUAL_COLOR, "layerwise": _plot.LAYERWISE_COLOR}
    width = 0.26
    for i, (_, g) in enumerate(groups):
        for k, method in enumerate(("lp", "dual", "layerwise")):
            v = float(g[g.method == method].width_ratio.iloc[0])
            ax.bar(i + (k - 1) * width, v, width, color=colours[method])
            ax.text(i + (k - 1) * width, v * 1.08, f"{v:.3g}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(groups)), [f"$\\epsilon$={e:g}, $\\hat z_{{k,{j}}}$" for (e, j), _ in groups], fontsize=8)
    ax.set_yscale("log")
    ax.axhline(1.0, color="0.3", lw=0.8)
    ax.set_ylim(0.8, table.width_ratio.max() * 8)
    ax.set_ylabel("range width / true range width (log)")
    ax.legend(
        handles=[
            _plot.Patch(color=colours["lp"], label="relaxed LP (eq. 19)"),
            _plot.Patch(color=colours["dual"], label="dual bound J(±e_j) (Theorem 1)"),
            _plot.Patch(color=colours["layerwise"], label="naive layerwise (eq. 42)"),
        ],
        fontsize=8,
        loc="upper left",
        ncol=3,
    )
    cells = []
    for (eps, j), g in groups:
        cell = {m: g[g.method == m].iloc[0] for m in METHODS}
        cells.append([f"{eps:g}", f"{j}", *(f"[{cell[m].lower:.3f}, {cell[m].upper:.3f}]" for m in METHODS)])
    tab.axis("off")
    t = tab.table(
        cellText=cells,
        colLabels=["ε", "output", "true (eq. 41)", "LP", "dual", "layerwise (eq. 42)"],
        loc="center",
        cellLoc="center",
    )
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    t.scale(1.0, 1.35)
    fig.suptitle("Eqs. (41)-(42): output ranges over the adversarial polytope (Figure 6, net 0)", fontsize=10)
    return fig


def run(seed: int, epsilons: Sequence[float], n_side: int, n_boundary: int, progress: bool) -> pd.DataFrame:
    """All rows for network 0 of Figure 6's seed."""
    net, x = random_case(seed, 0)
    rows: list[dict] = []
    for eps in tqdm(epsilons, desc="epsilons", disable=not progress):
        rows += table_for(0, eps, ranges(net, x, eps, n_side, n_boundary))
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _plot.experiment_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--eps", type=float, nargs="+", default=list(EPSILONS), help="radii (rows of Figure 6)")
    args = parser.parse_args(argv)
    n_side, n_boundary = (151, 2000) if args.quick else (1001, 100_000)
    start = time.perf_counter()
    table = run(args.seed, args.eps, n_side, n_boundary, progress=not args.no_progress)
    png, csv = _plot.save_outputs(plot(table), table, args.out, NAME)
    print(markdown(table))
    print(f"wrote {png} and {csv} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
