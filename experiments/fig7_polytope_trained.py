"""Figure 7: the true adversarial polytope vs the convex outer bound after robust training.

Appendix B.1 ("Outer Bound after Training"): for one training point of the robustly trained
2-D model of Figure 3, the true adversarial polytope ``f(S(x))`` in the (2-D) logit space
against the relaxed LP's outer polygon (eq. 19) and the dual polygon of Theorem 1; the paper
finds the bound "empirically quite tight".  The model comes from ``<out>/fig3_toy2d_robust.pt``
(written by :mod:`experiments.fig3_toy2d`; trained here if it is missing).

The CSV holds, for every training point, the areas and area ratios, the Hausdorff distance of
the LP / dual polygon from the true hull relative to the hull's diameter (area ratios exaggerate
for the thin, almost one-dimensional polytopes of a trained network), and the smallest logit
margin ``z_y - z_other`` over the true polytope, the LP polygon and the dual polygon (= ``J``).
The figure shows one point (``--point``; by default the one with the most unstable ReLUs, i.e.
the least favourable one): the whole polytope with the layerwise box as an inset, and a zoom on
its smallest-margin end, where certification is decided.

    python -m experiments.fig7_polytope_trained [--quick] [--seed S] [--out figures/] [--point I]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from tqdm.auto import tqdm

from experiments import _plot
from polytope import DualNetwork, LinfBall, Network
from polytope.solvers.polygons import PolygonComparison, compare_polygons, diameter

NAME = "fig7_polytope_trained"


def get_model(path: Path, out: Path, quick: bool, seed: int) -> tuple[Network, torch.Tensor, torch.Tensor, float]:
    """Load Figure 3's robust model, or train and save it first."""
    if not path.exists():
        print(f"{path} not found: training the robust model of Figure 3 first")
        _plot.run_experiment(
            "fig3_toy2d", ["--out", str(out), "--seed", str(seed), "--no-progress", *(["--quick"] if quick else [])]
        )
        path = _plot.model_path(out)
    model, x, y, eps = _plot.load_model(path)
    return Network.from_torch(model), x, y, eps


def point_info(i: int, net: Network, x: torch.Tensor, y: torch.Tensor, eps: float) -> dict:
    """Unstable ReLUs per layer and the certified margin ``J(e_y - e_other)`` of training point ``i``."""
    dual = DualNetwork(net, x[i : i + 1], LinfBall(eps))
    unstable = [int(dual.index_sets(j).unstable.sum()) for j in range(net.n_relu)]
    label = int(y[i])
    c = torch.zeros(1, 1, 2, dtype=x.dtype)
    c[0, 0, label], c[0, 0, 1 - label] = 1.0, -1.0
    with torch.no_grad():
        margin = float(dual.objective(c)[0, 0])
    return {
        "point": i,
        "x1": float(x[i, 0]),
        "x2": float(x[i, 1]),
        "label": label,
        "eps": eps,
        "unstable": "/".join(map(str, unstable)),
        "n_unstable": sum(unstable),
        "certified_margin": margin,
    }


def margin_direction(label: int) -> np.ndarray:
    """``c = e_y - e_other``: ``c^T z`` is the logit margin that certification needs positive."""
    c = np.zeros(2)
    c[label], c[1 - label] = 1.0, -1.0
    return c


def polygon_columns(comp: PolygonComparison, label: int) -> dict:
    """Areas, area ratios, Hausdorff gaps (relative to the true hull's diameter) and margins.

    ``margin_true`` is the smallest ``z_y - z_other`` over the enumerated polytope, ``margin_lp``
    over the LP polygon (exact once refined) and ``margin_dual`` over the dual polygon (= ``J``).
    """
    row = {f"area_{k}": v for k, v in comp.areas().items()}
    row.update({f"ratio_{k.split('/')[0]}": v for k, v in comp.ratios().items()})
    row.update({f"gap_{k}": v for k, v in comp.gaps().items()})
    c = margin_direction(label)
    row["margin_true"] = float((comp.true.points @ c).min())
    row["margin_lp"] = float((comp.lp.outer.vertices @ c).min()) if comp.lp is not None else np.nan
    row["margin_dual"] = float((comp.dual.outer.vertices @ c).min())
    row["n_grid"] = comp.true.n_side**2
    row["lp_converged"] = comp.lp.converged if comp.lp is not None else False
    return row


def zoom_view(comp: PolygonComparison, label: int) -> np.ndarray:
    """A square around the true polytope's smallest-margin point, a few LP gaps (>= 3% of its size) wide."""
    pts = comp.true.points
    centre = pts[np.argmin(pts @ margin_direction(label))]
    size = diameter(comp.true.hull)
    gap = comp.gaps()["lp" if comp.lp is not None else "dual"] * size
    half = max(3 * gap, 0.03 * size, 1e-9)
    return np.stack([centre - half, centre + half])


def draw_boundary(ax: Axes, view: np.ndarray) -> bool:
    """The decision boundary ``z_1 = z_2`` if it crosses the view; whether it does."""
    lo, hi = max(view[0, 0], view[0, 1]), min(view[1, 0], view[1, 1])
    if lo >= hi:
        return False
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.9, ls=":", zorder=5)
    return True


def plot(comp: PolygonComparison, net: Network, row: pd.Series, bins: int = 500) -> Figure:
    """Left: the whole polytope and its bounds; right: a zoom on its smallest-margin end."""
    fig, axes = _plot.panel_grid(1, 2, size=4.6)
    full, zoom = axes[0]
    box = _plot.draw_comparison(full, comp, net, bins=bins, inset=True)
    view = zoom_view(comp, int(row.label))
    _plot.draw_comparison(zoom, comp, net, bins=bins, view=view)
    full.add_patch(Rectangle(view[0], *(view[1] - view[0]), fill=False, ec="k", lw=0.8, zorder=6))
    crossed = [draw_boundary(ax, v) for ax, v in ((full, box), (zoom, view))]
    for ax in (full, zoom):
        _plot.label_axes(ax)
    full.set_title(
        f"training point {int(row.point)} (label {int(row.label)}), ε = {row.eps:g}\n"
        f"unstable ReLUs per layer {row.unstable}",
        fontsize=9,
    )
    zoom.set_title("zoom (black square, left) on the smallest-margin end", fontsize=9)
    _plot.note(
        zoom,
        f"area / true hull: LP {row.ratio_lp_outer:.2f}, dual {row.ratio_dual:.2f}\n"
        f"Hausdorff gap / diameter: LP {row.gap_lp:.2%}, dual {row.gap_dual:.2%}\n"
        f"margin $z_y - z_o$ ≥ true {row.margin_true:.3f}, LP {row.margin_lp:.3f}, dual {row.margin_dual:.3f}",
        loc="lower left",
        fontsize=7,
    )
    handles = _plot.legend_handles()
    label = "decision boundary z1 = z2" + ("" if any(crossed) else " (outside both views)")
    handles.append(_plot.Line2D([], [], color="k", ls=":", label=label))
    _plot.finish(fig, "Figure 7: adversarial polytope of a training point after robust training", handles, ncol=2)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = _plot.experiment_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="robust model (default <out>/fig3_toy2d_robust.pt)")
    parser.add_argument("--point", type=int, default=None, help="training point to plot (default: most unstable)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = args.model or _plot.model_path(args.out)
    net, x, y, eps = get_model(path, args.out, args.quick, args.seed)
    n_table, n_plot, k = (0, 201, 32) if args.quick else (501, 1001, 256)
    rows = [point_info(i, net, x, y, eps) for i in range(len(x))]
    chosen = args.point if args.point is not None else max(range(len(x)), key=lambda i: rows[i]["n_unstable"])
    if n_table:  # every training point's polygons, at a coarser grid (quick mode: the plotted one only)
        for i in tqdm(range(len(x)), desc="training points", disable=args.no_progress):
            comp_i = compare_polygons(net, x[i], LinfBall(eps), k=k, n_side=n_table, n_boundary=10 * n_table)
            rows[i].update(polygon_columns(comp_i, int(y[i])))
    comp = compare_polygons(net, x[chosen], LinfBall(eps), k=k, n_side=n_plot, n_boundary=100 * n_plot)
    rows[chosen].update(polygon_columns(comp, int(y[chosen])))
    row = pd.Series(rows[chosen])
    table = pd.DataFrame(rows)
    table["plotted"] = table.point == chosen
    png, csv = _plot.save_outputs(plot(comp, net, row, bins=200 if args.quick else 500), table, args.out, NAME)
    cols = ["point", "label", "unstable", "n_grid", "ratio_lp_outer", "ratio_dual", "gap_lp", "gap_dual"]
    cols += ["margin_true", "margin_lp", "margin_dual"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(
        f"plotted point {chosen}: area LP/true {row.ratio_lp_outer:.4f}, dual/true {row.ratio_dual:.4f}; "
        f"Hausdorff gap LP {row.gap_lp:.3%}, dual {row.gap_dual:.3%} of the diameter"
    )
    print(f"wrote {png} and {csv} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
