"""Shared helpers of the Appendix B.1 experiments: command line, output files, polygon plots.

The colours follow the paper's Figure 6: the true adversarial polytope in gray, the convex
outer approximation (the relaxed LP) in green; we add the dual polygon of Theorem 1 as a
dashed outline and the naive layerwise box (eq. 42) as an inset or a note.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from torch import nn

from polytope.io.data import load_dataset
from polytope.io.models import build_arch
from polytope.model.network import Network
from polytope.model.sets import LinfBall
from polytope.solvers.polygons import (
    Polygon,
    PolygonComparison,
    TruePolytope,
    random_network,
    rasterize,
)
from polytope.verifiers.attacks import attack_error, fgsm, pgd
from polytope.verifiers.robust import certify
from polytope.verifiers.train import TrainConfig, train

#: Where trained models are cached (gitignored ``runs/``).
MODELS_DIR = Path("runs") / "models"
TOY_WIDTHS = (2, 100, 100, 100, 100, 2)
RANDOM_WIDTHS = (2, 100, 100, 100, 2)
EPSILONS = (0.05, 0.1, 0.25)
TRUE_COLOR = "0.45"
LP_FILL = "#8fd18f"
LP_EDGE = "#1b7a1b"
DUAL_COLOR = "#1f4e9c"
LAYERWISE_COLOR = "#b03030"


# ---------------------------------------------------------------------------------------------
# command line and files
# ---------------------------------------------------------------------------------------------
def experiment_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The common options: ``--quick``, ``--seed``, ``--out``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{name}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small grids and few steps: a smoke run of seconds")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output folder for the PNG and CSV")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def save_figure(fig: Figure, out: Path, name: str, dpi: int = 150) -> Path:
    """Write ``out/name.png``, close the figure; return the path."""
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    fig.savefig(png, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return png


def save_outputs(fig: Figure, table: pd.DataFrame, out: Path, name: str, dpi: int = 150) -> tuple[Path, Path]:
    """Write ``out/name.png`` and ``out/name.csv``; return their paths."""
    png, csv = save_figure(fig, out, name, dpi), out / f"{name}.csv"
    table.to_csv(csv, index=False)
    return png, csv


def add_replot_option(parser: argparse.ArgumentParser, source: str) -> None:
    """``--replot``: redraw the PNG from the CSV a full run left in ``--out`` (``source``), computing nothing."""
    parser.add_argument(
        "--replot",
        action="store_true",
        help=f"only redraw the PNG from {source} in --out (written by an earlier run): no models, no bounds",
    )


def check_replot_source(parser: argparse.ArgumentParser, path: Path) -> Path:
    """``path`` if the CSV ``--replot`` draws from exists; else a parser error (before any work)."""
    if not path.is_file():
        parser.error(f"--replot: {path} not found (run the experiment once without --replot)")
    return path


def read_replot_table(parser: argparse.ArgumentParser, path: Path) -> pd.DataFrame:
    """The CSV ``--replot`` draws from (:func:`check_replot_source`)."""
    return pd.read_csv(check_replot_source(parser, path))


@contextmanager
def timed(label: str) -> Iterator[None]:
    """Print how long the block took."""
    start = time.perf_counter()
    yield
    print(f"{label}: {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------------------------------------
# figure layout
# ---------------------------------------------------------------------------------------------
def panel_grid(rows: int, cols: int, size: float = 3.2) -> tuple[Figure, np.ndarray]:
    """A ``rows x cols`` grid of square panels with constrained layout; axes always 2-D."""
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 1.4), squeeze=False, layout="constrained")
    return fig, axes


def finish(fig: Figure, title: str, handles: Sequence, ncol: int = 2) -> None:
    """Title on top, one legend for all panels below them."""
    fig.suptitle(title, fontsize=11)
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=9, frameon=False)


def note(ax: Axes, text: str, loc: str = "upper left", fontsize: float = 7) -> None:
    """A small boxed note inside a panel."""
    x, ha = (0.02, "left") if "left" in loc else (0.98, "right")
    y, va = (0.98, "top") if "upper" in loc else (0.02, "bottom")
    ax.text(
        x,
        y,
        text,
        transform=ax.transAxes,
        ha=ha,
        va=va,
        fontsize=fontsize,
        bbox={"fc": "white", "ec": "0.8", "alpha": 0.85, "pad": 2},
        zorder=6,
    )


def label_axes(ax: Axes, xlabel: bool = True, ylabel: bool = True, fontsize: float = 9) -> None:
    """Output-space axis labels ``zhat_{k,1}``, ``zhat_{k,2}`` and small tick labels."""
    ax.tick_params(labelsize=7)
    if xlabel:
        ax.set_xlabel(r"output $\hat z_{k,1}$", fontsize=fontsize)
    if ylabel:
        ax.set_ylabel(r"output $\hat z_{k,2}$", fontsize=fontsize)


# ---------------------------------------------------------------------------------------------
# polygons
# ---------------------------------------------------------------------------------------------
def view_box(
    polygons: Sequence[Polygon], points: np.ndarray | None = None, margin: float = 0.08, square: bool = True
) -> np.ndarray:
    """A ``[[x0, y0], [x1, y1]]`` around the polygons (and points) with a margin: square, or fitted per axis."""
    parts = [p.vertices for p in polygons if len(p.vertices)]
    if points is not None and len(points):
        parts.append(np.stack([points.min(0), points.max(0)]))
    allv = np.concatenate(parts)
    lo, hi = allv.min(0), allv.max(0)
    half = (hi - lo).max() / 2 if square else (hi - lo) / 2
    centre, half = (lo + hi) / 2, np.maximum(half * (1 + margin), 1e-9)
    return np.stack([centre - half, centre + half])


def show_occupancy(ax: Axes, occupancy: np.ndarray, box: np.ndarray, color: str = TRUE_COLOR) -> None:
    """Filled pixels ``occupancy[row, col]`` (row 0 at the bottom) over the view ``box``."""
    rgba = np.zeros((*occupancy.shape, 4))
    rgba[..., :3] = matplotlib.colors.to_rgb(color)
    rgba[..., 3] = occupancy.astype(float)
    ax.imshow(
        rgba,
        origin="lower",
        extent=(box[0, 0], box[1, 0], box[0, 1], box[1, 1]),
        interpolation="nearest",
        zorder=2,
        aspect="auto",
    )


def plot_true_polytope(
    ax: Axes, true: TruePolytope, box: np.ndarray, net: Network | None = None, bins: int = 400, base: int = 101
) -> None:
    """The true polytope as the pixels it covers (a filled, usually non-convex shape).

    With the network, cells of a ``base x base`` input grid that ``f`` stretches over several
    pixels are re-sampled (:func:`polytope.solvers.polygons.rasterize`); without it, the enumerated
    points are binned.
    """
    if net is not None:
        occupancy = rasterize(net, true.input_box, box, bins=bins, base=base)
    else:
        pts = true.points
        hist, _, _ = np.histogram2d(pts[:, 0], pts[:, 1], bins=bins, range=box.T.tolist())
        occupancy = hist.T > 0
    show_occupancy(ax, occupancy, box)


def fill_polygon(ax: Axes, polygon: Polygon, **kwargs) -> None:
    """A filled polygon (nothing for an empty one)."""
    if len(polygon.vertices) >= 3:
        ax.fill(polygon.vertices[:, 0], polygon.vertices[:, 1], **kwargs)


def outline_polygon(ax: Axes, polygon: Polygon, **kwargs) -> None:
    """A closed outline."""
    v = polygon.vertices
    if len(v) >= 2:
        closed = np.concatenate([v, v[:1]])
        ax.plot(closed[:, 0], closed[:, 1], **kwargs)


def comparison_polygons(comp: PolygonComparison) -> list[Polygon]:
    """The polygons :func:`draw_comparison` frames: the true hull, the dual and (if any) the LP polygon."""
    return [comp.true.hull, comp.dual.polygon, *([comp.lp.polygon] if comp.lp is not None else [])]


def draw_comparison(
    ax: Axes,
    comp: PolygonComparison,
    net: Network | None = None,
    bins: int = 400,
    inset: bool = False,
    view: np.ndarray | None = None,
    equal: bool = True,
    base: int = 101,
) -> np.ndarray:
    """True polytope (gray) over the LP polygon (green) with the dual polygon dashed.

    ``view`` (``[[x0, y0], [x1, y1]]``) defaults to a square around all polygons drawn at equal
    aspect; with ``equal=False`` to a box fitted to them per axis, each axis at its own scale
    (a strongly stretched axis needs a finer input grid ``base`` for :func:`plot_true_polytope`).
    Returns the view.  With ``inset`` a small inset shows the layerwise box (red) and, as a black
    square, the main view inside it, in the corner that hides the least of the polygons.
    """
    polys = comparison_polygons(comp)
    box = view_box(polys, square=equal) if view is None else np.asarray(view, dtype=np.float64)
    if comp.lp is not None:
        fill_polygon(ax, comp.lp.polygon, color=LP_FILL, zorder=1, lw=0)
    plot_true_polytope(ax, comp.true, box, net, bins=bins, base=base)
    if comp.lp is not None:
        outline_polygon(ax, comp.lp.polygon, color=LP_EDGE, lw=1.0, zorder=3)
    outline_polygon(ax, comp.dual.polygon, color=DUAL_COLOR, lw=1.0, ls="--", zorder=4)
    ax.set_xlim(box[0, 0], box[1, 0])
    ax.set_ylim(box[0, 1], box[1, 1])
    ax.set_aspect("equal" if equal else "auto", adjustable="box")
    ax.ticklabel_format(useOffset=False)
    if inset:
        draw_layerwise_inset(ax, comp.layerwise, box, corner=free_corner(polys, box))
    return box


def _outline_points(polygon: Polygon, per_edge: int = 20) -> np.ndarray:
    v = polygon.vertices
    if len(v) == 0:
        return np.zeros((0, 2))
    t = np.linspace(0.0, 1.0, per_edge, endpoint=False)[None, :, None]
    return (v[:, None] + t * (np.roll(v, -1, axis=0) - v)[:, None]).reshape(-1, 2)


def free_corner(polys: Sequence[Polygon], view: np.ndarray, size: float = 0.3) -> str:
    """The corner (``"lower right"``, ...) whose ``size`` square covers the fewest polygon points."""
    pts = np.concatenate([_outline_points(p) for p in polys])
    rel = (pts - view[0]) / (view[1] - view[0])
    best, best_count = "lower right", None
    for corner in ("lower right", "upper right", "lower left", "upper left"):
        x0 = 1 - size - 0.02 if "right" in corner else 0.02
        y0 = 1 - size - 0.02 if "upper" in corner else 0.02
        inside = (rel[:, 0] > x0) & (rel[:, 0] < x0 + size) & (rel[:, 1] > y0) & (rel[:, 1] < y0 + size)
        count = int(inside.sum())
        if best_count is None or count < best_count:
            best, best_count = corner, count
    return best


def draw_layerwise_inset(
    ax: Axes, layerwise: Polygon, view: np.ndarray, size: float = 0.3, corner: str = "lower right"
) -> Axes:
    """An inset in ``corner``: the layerwise box (red) with the main view (black) inside it."""
    x0 = 1 - size - 0.02 if "right" in corner else 0.02
    y0 = 1 - size - 0.02 if "upper" in corner else 0.02
    inner = ax.inset_axes((x0, y0, size, size))
    lw = layerwise.bbox
    outer = np.stack([np.minimum(lw[0], view[0]), np.maximum(lw[1], view[1])])
    pad = 0.06 * (outer[1] - outer[0]).max()
    inner.add_patch(Rectangle(lw[0], *(lw[1] - lw[0]), fill=False, ec=LAYERWISE_COLOR, lw=1.0))
    side = view[1] - view[0]
    # keep the view visible even when it is far below a pixel of the inset
    mark = np.maximum(side, 0.04 * (outer[1] - outer[0]))
    centre = (view[0] + view[1]) / 2
    inner.add_patch(Rectangle(centre - mark / 2, *mark, fill=True, fc="k", ec="k", lw=0.8))
    inner.set_xlim(outer[0, 0] - pad, outer[1, 0] + pad)
    inner.set_ylim(outer[0, 1] - pad, outer[1, 1] + pad)
    inner.set_aspect("equal", adjustable="datalim")
    inner.set_xticks([])
    inner.set_yticks([])
    inner.patch.set_alpha(0.85)
    for spine in inner.spines.values():
        spine.set_color("0.6")
    return inner


def legend_handles(with_lp: bool = True, layerwise: bool = True) -> list:
    """Legend entries for :func:`draw_comparison`."""
    handles: list = [Patch(color=TRUE_COLOR, label="true adversarial polytope (enumerated)")]
    if with_lp:
        handles.append(Patch(facecolor=LP_FILL, edgecolor=LP_EDGE, label="convex outer bound: relaxed LP (eq. 19)"))
    handles.append(Line2D([], [], color=DUAL_COLOR, ls="--", label="dual bound J(c) (Theorem 1)"))
    if layerwise:
        handles.append(Line2D([], [], color=LAYERWISE_COLOR, label="inset: layerwise box (eq. 42), black = main view"))
    return handles


# ---------------------------------------------------------------------------------------------
# the random 2-D cases (Figure 6, the ranges table) and the toy model (Figures 3 and 7)
# ---------------------------------------------------------------------------------------------
def random_case(seed: int, net_index: int) -> tuple[Network, torch.Tensor]:
    """Network ``net_index`` of a seed and its centre ``x ~ U([0, 1]^2)`` (float64)."""
    gen = torch.Generator().manual_seed(1000 * seed + net_index)
    net = Network.from_torch(random_network(RANDOM_WIDTHS, generator=gen, dtype=torch.float64))
    x = torch.rand(1, 2, generator=gen, dtype=torch.float64)
    return net, x


def build_model(seed: int = 0) -> nn.Sequential:
    """The 2-100-100-100-100-2 ReLU network with torch's default initialisation."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(TOY_WIDTHS):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(torch.float64)


def model_path(out: Path) -> Path:
    """Where the robust model is cached for Figure 7."""
    return out / "fig3_toy2d_robust.pt"


def save_model(path: Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> None:
    """State dict plus the data it was trained on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "x": x, "y": y, "eps": eps, "widths": TOY_WIDTHS, "seed": seed}, path)


def load_model(path: Path) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, float]:
    """``(model, x, y, eps)`` saved by :func:`save_model`."""
    blob = torch.load(path, weights_only=True)
    model = build_model()
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["x"], blob["y"], float(blob["eps"])


# ---------------------------------------------------------------------------------------------
# models trained for the experiments, error rates (Figure 5, Tables 1 and 2, Figures 10 and 11)
# ---------------------------------------------------------------------------------------------
def model_experiment_parser(name: str, description: str) -> argparse.ArgumentParser:
    """:func:`experiments._plot.experiment_parser` plus ``--models-dir`` and ``--threads``."""
    parser = experiment_parser(name, description)
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="cache of the models trained here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more is slower on a loaded machine)")
    return parser


def trained_model(
    arch: str,
    dataset: str,
    config: TrainConfig,
    models_dir: Path = MODELS_DIR,
    train_limit: int | None = None,
    progress: bool = False,
) -> tuple[nn.Sequential, dict]:
    """Train ``arch`` on ``dataset`` with ``config`` once and cache it; later calls load the cache.

    The cache folder name encodes every setting, so different settings never share a model.
    Returns the model (eval mode) and its info (``seconds`` of training, settings, final log row).
    """
    tag = (
        f"{arch}_{dataset}_{'robust' if config.robust else 'standard'}_eps{config.eps:g}_e{config.epochs}"
        f"_lr{config.lr:g}_b{config.batch_size}_s{config.seed}_n{train_limit or 'all'}"
    )
    folder = models_dir / tag
    info_path = folder / "info.json"
    model = build_arch(arch)
    if info_path.exists() and (folder / "model.pth").exists():
        model.load_state_dict(torch.load(folder / "model.pth", map_location="cpu", weights_only=True))
        return model.eval(), json.loads(info_path.read_text())
    torch.manual_seed(config.seed)
    model = build_arch(arch)
    train_data = load_dataset(dataset, "train", limit=train_limit)
    test_data = load_dataset(dataset, "test", limit=max(config.eval_examples, 1))
    t0 = time.perf_counter()
    log = train(model, train_data, test_data, config, folder, resume=True, progress=progress)
    info = {
        "arch": arch,
        "dataset": dataset,
        "train_examples": len(train_data[0]),
        "config": asdict(config),
        "seconds": time.perf_counter() - t0,
        "epoch_seconds": float(log["seconds"].sum()),
        "last_epoch": log.iloc[-1].to_dict(),
    }
    info_path.write_text(json.dumps(info, indent=1))
    return model.eval(), info


def standard_model(
    quick: bool = False, dataset: str = "mnist", models_dir: Path = MODELS_DIR, seed: int = 0, progress: bool = False
) -> tuple[nn.Sequential, dict]:
    """The standard (non-robust) baseline: the paper's conv architecture, 2 epochs of Adam (lr 1e-3, batch 50).

    ``quick`` gives a ``digits_mlp`` on sklearn's digits (4 epochs, seconds).
    """
    if quick:
        cfg = TrainConfig(epochs=4, lr=1e-3, batch_size=50, eps=0.1, robust=False, seed=seed, eval_examples=20)
        return trained_model("digits_mlp", "digits", cfg, models_dir, progress=progress)
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=50, eps=0.1, robust=False, seed=seed, eval_examples=50)
    return trained_model(dataset, dataset, cfg, models_dir, progress=progress)


def quick_robust_model(models_dir: Path = MODELS_DIR, seed: int = 0, eps: float = 0.1) -> tuple[nn.Sequential, dict]:
    """A robustly trained ``digits_mlp`` (4 epochs at ``eps``): the ``--quick`` stand-in for a released model."""
    cfg = TrainConfig(epochs=4, lr=1e-3, batch_size=50, eps=eps, robust=True, seed=seed, eval_examples=20)
    return trained_model("digits_mlp", "digits", cfg, models_dir)


def error_rates(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int = 10, pgd_steps: int = 100
) -> pd.DataFrame:
    """Per example: ``correct``, ``fgsm_error``, ``pgd_error`` (``x_adv`` misclassified, the paper's
    count), ``certified`` (Corollary 1 with the label) and ``bound_error`` (= not certified: the
    robust error bound counts every example that is wrong or uncertified).

    Small batches: a standard model has thousands of unstable ReLUs per example at eps 0.1,
    and the bound computation's memory grows with batch x unstable units (a batch of 100
    took 20 GB on the standard MNIST model)."""
    net = Network.from_torch(model)
    parts = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with torch.no_grad():
            correct = model(xb).argmax(1) == yb
        f = attack_error(model, xb, yb, fgsm(model, xb, yb, eps), include_clean=False)
        p = attack_error(model, xb, yb, pgd(model, xb, yb, eps, steps=pgd_steps), include_clean=False)
        cert = certify(net, xb, LinfBall(eps), y=yb)
        parts.append(
            pd.DataFrame(
                {
                    "index": np.arange(start, start + len(xb)),
                    "correct": correct.numpy(),
                    "fgsm_error": f.numpy(),
                    "pgd_error": p.numpy(),
                    "certified": cert.numpy(),
                    "bound_error": (~cert).numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def summarize_errors(df: pd.DataFrame) -> dict[str, float]:
    """Percentages: test error, FGSM error, PGD error, robust error bound."""
    return {
        "test_error": 100.0 * (~df["correct"]).mean(),
        "fgsm_error": 100.0 * df["fgsm_error"].mean(),
        "pgd_error": 100.0 * df["pgd_error"].mean(),
        "robust_bound": 100.0 * df["bound_error"].mean(),
    }


def run_experiment(name: str, argv: Sequence[str]) -> int:
    """Run ``experiments.<name>.main(argv)`` by name, as ``polytope reproduce`` does: experiments
    that need another one's output (Figure 7 needs Figure 3's model; the main job runs four) go
    through here instead of importing it."""
    return int(importlib.import_module(f"experiments.{name}").main(list(argv)) or 0)
