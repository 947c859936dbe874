"""Figure 7: the true adversarial polytope vs the convex outer bound after robust training.

Appendix B.1 ("Outer Bound after Training"): for one training point of the robustly trained
2-D model of Figure 3, the true adversarial polytope ``f(S(x))`` in the (2-D) logit space
against the relaxed LP's outer polygon (eq. 19) and the dual polygon of Theorem 1; the paper
finds the bound "empirically quite tight".  The model comes from ``<out>/fig3_toy2d_robust.pt``
(written by :mod:`experiments.fig3_toy2d`; trained here if it is missing).

The CSV holds, for every training point, the areas and area ratios, the Hausdorff distance of
the LP / dual polygon from the true hull relative to the hull's diameter (area ratios exaggerate
for the thin, almost one-dimensional polytopes of a trained network), the smallest logit
margin ``z_y - z_other`` over the true polytope, the LP polygon and the dual polygon (= ``J``),
whether the LP polygon converged and ``view_fill`` (below).

Which point (``--point`` overrides it; :func:`choose_point`): among the training points whose LP
polygon converged -- :func:`polytope.polygons.support_polygon`'s criterion: every edge of the
inner polygon (the hull of the LP's optimal points) was confirmed as a facet by a query along its
normal within the refinement budget (``k`` more queries), so inner = outer = the LP's exact
projection -- the one whose true polytope fills the largest share of the to-scale panel's square
view (``view_fill``: true-hull area over the view's area; the view frames the true hull, the LP
and the dual polygon).  Before, the default was the point with the most unstable ReLUs, whose
LP polygon had not converged.  The rule picks a point where the bounds are comparatively tight
at the figure's scale, i.e. a favourable one, as the paper's "one of these figures" presumably
is; the CSV holds every point for the unfavourable ones.

Even the chosen polytope is a needle at equal aspect (``view_fill`` about 0.5% at most, for every
training point of the committed run): the cross-entropy's gradients with respect to ``z_1`` and ``z_2`` are
opposite, so training stretches the outputs along the margin ``z_y - z_o`` and hardly along
``z_1 + z_2``.  So the figure has two panels: left, the output space to scale (the true shape,
with the layerwise box as an inset); right, the same polytope and bounds in the coordinates
``(z_y - z_o, z_1 + z_2)``, each axis at its own scale, where the region can be seen and the
smallest margin (where certification is decided) is the leftmost point of each set.  That
panel's sets are computed for the network followed by this linear map ``A``
(:func:`margin_model`): it adds no ReLU and leaves every layer's bounds as they were, so the
true set, the LP relaxation and the dual bound of ``A f`` are those of ``f`` mapped by ``A``
(the polygons are refined afresh in the new coordinates).

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
from torch import nn
from tqdm.auto import tqdm

from experiments import _plot
from polytope import DualNetwork, LinfBall, Network
from polytope.solvers.polygons import PolygonComparison, compare_polygons

NAME = "fig7_polytope_trained"


def get_model(path: Path, out: Path, quick: bool, seed: int) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, float]:
    """Load Figure 3's robust model, or train and save it first."""
    if not path.exists():
        print(f"{path} not found: training the robust model of Figure 3 first")
        _plot.run_experiment(
            "fig3_toy2d", ["--out", str(out), "--seed", str(seed), "--no-progress", *(["--quick"] if quick else [])]
        )
        path = _plot.model_path(out)
    return _plot.load_model(path)


def margin_model(model: nn.Sequential, label: int) -> Network:
    """The network followed by ``z -> (z_y - z_o, z_1 + z_2)``, folded into its last linear layer."""
    a = torch.from_numpy(np.stack([margin_direction(label), np.ones(2)]))
    *body, last = model
    head = nn.Linear(last.in_features, 2).to(torch.float64)
    with torch.no_grad():
        head.weight.copy_(a @ last.weight.double())
        head.bias.copy_(a @ last.bias.double())
    return Network.from_torch(nn.Sequential(*body, head).to(torch.float64))


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
    row["view_fill"] = view_fill(comp)
    return row


def view_fill(comp: PolygonComparison) -> float:
    """The true hull's area over the area of the full panel's square view (what a reader can see)."""
    box = _plot.view_box(_plot.comparison_polygons(comp))
    return comp.true.area / float(np.prod(box[1] - box[0]))


def choose_point(rows: Sequence[dict]) -> int:
    """The plotted point: the largest ``view_fill`` among those whose LP polygon converged (all if none did)."""
    converged = [r for r in rows if r["lp_converged"]] or list(rows)
    return int(max(converged, key=lambda r: r["view_fill"])["point"])


def draw_boundary(ax: Axes, view: np.ndarray) -> bool:
    """The decision boundary ``z_1 = z_2`` if it crosses the view; whether it does."""
    lo, hi = max(view[0, 0], view[0, 1]), min(view[1, 0], view[1, 1])
    if lo >= hi:
        return False
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.9, ls=":", zorder=5)
    return True


def draw_margin_boundary(ax: Axes, view: np.ndarray) -> bool:
    """The decision boundary ``z_y - z_o = 0`` in margin coordinates if it is in the view; whether it is."""
    if not view[0, 0] <= 0.0 <= view[1, 0]:
        return False
    ax.axvline(0.0, color="k", lw=0.9, ls=":", zorder=5)
    return True


def plot(
    comp: PolygonComparison,
    net: Network,
    comp_m: PolygonComparison,
    net_m: Network,
    row: pd.Series,
    bins: int = 500,
) -> Figure:
    """Left: the polytope and its bounds to scale; right: the same in margin coordinates, axes at their own scales."""
    fig, axes = _plot.panel_grid(1, 2, size=4.6)
    full, stretched = axes[0]
    box = _plot.draw_comparison(full, comp, net, bins=bins, inset=True)
    # the stretch spreads an input cell over more pixels than rasterize's 64 sub-samples: a 4x finer grid
    view = _plot.draw_comparison(stretched, comp_m, net_m, bins=bins, equal=False, base=401)
    crossed = [draw_boundary(full, box), draw_margin_boundary(stretched, view)]
    _plot.label_axes(full)
    stretched.tick_params(labelsize=7)
    stretched.set_xlabel(r"margin $\hat z_{k,y} - \hat z_{k,o}$ (certified where > 0 on the whole set)", fontsize=9)
    stretched.set_ylabel(r"$\hat z_{k,1} + \hat z_{k,2}$", fontsize=9)
    full.set_title(
        f"training point {int(row.point)} (label {int(row.label)}), ε = {row.eps:g}; to scale\n"
        f"unstable ReLUs per layer {row.unstable}; LP polygon {'' if row.lp_converged else 'NOT '}converged",
        fontsize=9,
    )
    span = view[1] - view[0]
    stretched.set_title(
        f"the same sets in margin coordinates, NOT to scale\n(vertical axis stretched {span[0] / span[1]:.0f}x)",
        fontsize=9,
    )
    _plot.note(
        full,
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
    parser.add_argument(
        "--point", type=int, default=None, help="training point to plot (default: largest view_fill, LP converged)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = args.model or _plot.model_path(args.out)
    model, x, y, eps = get_model(path, args.out, args.quick, args.seed)
    net = Network.from_torch(model)
    n_table, n_plot, k = (51, 201, 32) if args.quick else (501, 1001, 256)
    rows = [point_info(i, net, x, y, eps) for i in range(len(x))]
    for i in tqdm(range(len(x)), desc="training points", disable=args.no_progress):  # every point, coarser grid
        comp_i = compare_polygons(net, x[i], LinfBall(eps), k=k, n_side=n_table, n_boundary=10 * n_table)
        rows[i].update(polygon_columns(comp_i, int(y[i])))
    chosen = args.point if args.point is not None else choose_point(rows)
    comp = compare_polygons(net, x[chosen], LinfBall(eps), k=k, n_side=n_plot, n_boundary=100 * n_plot)
    rows[chosen].update(polygon_columns(comp, int(y[chosen])))
    net_m = margin_model(model, int(y[chosen]))
    comp_m = compare_polygons(net_m, x[chosen], LinfBall(eps), k=k, n_side=n_plot, n_boundary=100 * n_plot)
    row = pd.Series(rows[chosen])
    table = pd.DataFrame(rows)
    table["plotted"] = table.point == chosen
    fig = plot(comp, net, comp_m, net_m, row, bins=200 if args.quick else 500)
    png, csv = _plot.save_outputs(fig, table, args.out, NAME)
    cols = ["point", "label", "unstable", "n_grid", "ratio_lp_outer", "ratio_dual", "gap_lp", "gap_dual"]
    cols += ["margin_true", "margin_lp", "margin_dual", "view_fill", "lp_converged"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(
        f"plotted point {chosen}: area LP/true {row.ratio_lp_outer:.4f}, dual/true {row.ratio_dual:.4f}; "
        f"Hausdorff gap LP {row.gap_lp:.3%}, dual {row.gap_dual:.3%} of the diameter"
    )
    print(f"wrote {png} and {csv} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
