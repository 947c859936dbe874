"""Figure 3 (section 4.1, Appendix B.1): standard vs robust training of a 2-D toy classifier.

Problem (Appendix B.1): 12 points drawn one by one in ``[0, 1]^2``, each redrawn until it lies
at least 0.16 (l_inf) from the earlier ones, with random labels (redrawn until both classes
occur); a 2-100-100-100-100-2 ReLU network (torch's default initialisation); Adam, learning
rate 1e-3, full batch.  Standard training minimises the cross-entropy (2000 steps); robust
training the robust loss of Theorem 2 for the l_inf ball of radius eps = 0.08, both from the
same initialisation.  Not in Appendix B.1: robust training ramps eps from 0.02 to 0.08 over
its first 300 steps (the paper's eps scheduling for MNIST, Appendix B.2; without it the
default data got stuck at one uncertified point after 4000 steps) and stops once the robust
error has been zero for 100 steps, keeping the last certified parameters.  The robust model
reaches zero robust error (every eps-square certified).

Robust errors are reported two ways: ``certified`` (Corollary 1 with the dual bound, an upper
bound on the true robust error) and ``attack`` (a dense grid over every eps-square, a lower
bound that is exact up to the grid in 2-D).  The robust model, its data and eps are saved to
``<out>/fig3_toy2d_robust.pt`` for Figure 7.

    python -m experiments.fig3_toy2d [--quick] [--seed S] [--out figures/]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn
from tqdm.auto import tqdm

from experiments import _plot
from experiments._plot import build_model, model_path, save_model
from polytope import LinfBall, Network, certify, robust_loss
from polytope.solvers.polygons import box_grid

NAME = "fig3_toy2d"
EPS = 0.08
N_POINTS = 12
MIN_DIST = 0.16
LR = 1e-3
DTYPE = torch.float64
CLASS_COLORS = ("#d9534f", "#337ab7")
REGION_COLORS = ("#f6d3d2", "#d2e3f3")


def make_points(n: int = N_POINTS, min_dist: float = MIN_DIST, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Appendix B.1's data: points added one at a time, each at least ``min_dist`` (l_inf) apart."""
    gen = torch.Generator().manual_seed(seed)
    points: list[torch.Tensor] = []
    while len(points) < n:
        p = torch.rand(2, generator=gen, dtype=DTYPE)
        if all(float((p - q).abs().max()) >= min_dist for q in points):
            points.append(p)
    y = torch.randint(0, 2, (n,), generator=gen)
    while y.min() == y.max():
        y = torch.randint(0, 2, (n,), generator=gen)
    return torch.stack(points), y


@dataclass
class TrainLog:
    """Per-step loss and error (robust error for robust training) and timing."""

    kind: str
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    error: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def first_zero(self) -> int | None:
        """First logged step with zero (robust) error."""
        return next((s for s, e in zip(self.steps, self.error, strict=True) if e == 0), None)


def train(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    robust: bool,
    steps: int,
    eps: float = EPS,
    lr: float = LR,
    warmup: int = 0,
    patience: int | None = None,
    progress: bool = True,
) -> TrainLog:
    """Full-batch Adam on the cross-entropy (standard) or Theorem 2's robust loss.

    ``warmup``: robust training ramps eps linearly from ``eps / 4`` to ``eps`` over that many
    steps (the paper's eps scheduling, Appendix B.2); ``patience``: stop once the robust error
    at the full eps has been zero for that many consecutive steps.  Robust training ends on the
    last parameters whose robust error (at the full eps) was zero, when there were any: the
    error is measured before each step, so the parameters after the final update are unchecked.
    """
    net = Network.from_torch(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    log = TrainLog("robust" if robust else "standard")
    start = time.perf_counter()
    zero_run = 0
    certified_state: dict[str, torch.Tensor] | None = None
    bar = tqdm(range(1, steps + 1), desc=f"{log.kind} training", disable=not progress)
    for step in bar:
        if robust:
            eps_t = eps * (0.25 + 0.75 * min(1.0, step / warmup)) if warmup > 0 else eps
            loss, err = robust_loss(net, x, y, LinfBall(eps_t))
            if eps_t < eps:
                err = torch.ones((), dtype=x.dtype)  # not yet evaluated at the target eps
        else:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            err = (logits.argmax(1) != y).to(x.dtype).mean()
        if robust and float(err) == 0:
            certified_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.steps.append(step)
        log.loss.append(float(loss.detach()))
        log.error.append(float(err))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{log.loss[-1]:.3g}", err=f"{log.error[-1]:.3g}")
        zero_run = zero_run + 1 if float(err) == 0 else 0
        if patience is not None and zero_run >= patience:
            break
    if certified_state is not None:
        model.load_state_dict(certified_state)
    log.seconds = time.perf_counter() - start
    return log


def attack_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_side: int = 101) -> float:
    """Fraction of points with a misclassified point on an ``n_side^2`` grid of their eps-square."""
    wrong = 0
    with torch.no_grad():
        for xi, yi in zip(x, y, strict=True):
            grid = box_grid(xi - eps, xi + eps, n_side)
            wrong += bool((model(grid).argmax(1) != yi).any())
    return wrong / len(x)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> dict[str, float]:
    """Clean error, certified robust error (Corollary 1) and grid-attack robust error."""
    net = Network.from_torch(model)
    with torch.no_grad():
        clean = float((model(x).argmax(1) != y).to(x.dtype).mean())
    certified = certify(net, x, LinfBall(eps), y=y)
    return {
        "clean_error": clean,
        "certified_robust_error": float((~certified).to(x.dtype).mean()),
        "attack_robust_error": attack_error(model, x, y, eps),
    }


def draw_regions(ax: Axes, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n: int = 300) -> None:
    """Decision regions over ``[-0.1, 1.1]^2`` with every point and its eps-square."""
    lim = (-0.1, 1.1)
    lo = torch.full((2,), lim[0], dtype=DTYPE)
    hi = torch.full((2,), lim[1], dtype=DTYPE)
    with torch.no_grad():
        pred = model(box_grid(lo, hi, n)).argmax(1).reshape(n, n).T.numpy()  # rows = y
    ax.imshow(pred, origin="lower", extent=(*lim, *lim), cmap=ListedColormap(REGION_COLORS), vmin=0, vmax=1)
    if pred.min() != pred.max():
        ax.contour(np.linspace(*lim, n), np.linspace(*lim, n), pred, levels=[0.5], colors="0.25", linewidths=0.8)
    for xi, yi in zip(x.numpy(), y.numpy(), strict=True):
        color = CLASS_COLORS[int(yi)]
        ax.add_patch(Rectangle(xi - eps, 2 * eps, 2 * eps, fill=False, ec=color, lw=1.2))
        ax.plot(*xi, "o", color=color, ms=4)
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")


def plot(
    models: dict[str, nn.Module],
    metrics: dict[str, dict],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    resolution: int = 300,
) -> Figure:
    """Left: standard training; right: robust training (Figure 3)."""
    fig, axes = _plot.panel_grid(1, 2, size=4.2)
    for ax, (kind, model) in zip(axes[0], models.items(), strict=True):
        draw_regions(ax, model, x, y, eps, n=resolution)
        m = metrics[kind]
        ax.set_title(
            f"{kind} training\nrobust error: certified {m['certified_robust_error']:.0%}, "
            f"attack {m['attack_robust_error']:.0%}",
            fontsize=10,
        )
    handles = [
        _plot.Patch(color=REGION_COLORS[0], label="predicted class 0"),
        _plot.Patch(color=REGION_COLORS[1], label="predicted class 1"),
        _plot.Line2D(
            [], [], marker="s", ls="", mfc="none", color=CLASS_COLORS[0], label=f"class 0 and its ε={eps:g} ball"
        ),
        _plot.Line2D(
            [], [], marker="s", ls="", mfc="none", color=CLASS_COLORS[1], label=f"class 1 and its ε={eps:g} ball"
        ),
    ]
    _plot.finish(fig, "Figure 3: standard vs robust training (2-100-100-100-100-2, l_inf ε = 0.08)", handles)
    return fig


def run(
    seed: int, steps_standard: int, steps_robust: int, warmup: int, patience: int | None, progress: bool
) -> tuple[dict[str, nn.Module], dict[str, dict], dict[str, TrainLog], torch.Tensor, torch.Tensor]:
    """Train both models from the same initialisation; return models, metrics, logs, data."""
    x, y = make_points(seed=seed)
    models, metrics, logs = {}, {}, {}
    for kind, steps in (("standard", steps_standard), ("robust", steps_robust)):
        model = build_model(seed)
        robust = kind == "robust"
        logs[kind] = train(
            model,
            x,
            y,
            robust=robust,
            steps=steps,
            warmup=warmup if robust else 0,
            patience=patience if robust else None,
            progress=progress,
        )
        models[kind] = model.eval()
        metrics[kind] = evaluate(model, x, y, EPS)
    return models, metrics, logs, x, y


def main(argv: Sequence[str] | None = None) -> int:
    parser = _plot.experiment_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="maximum robust training steps (default 2000, quick 60)"
    )
    parser.add_argument("--warmup", type=int, default=300, help="steps of the eps ramp from eps/4 to eps")
    parser.add_argument("--patience", type=int, default=100, help="stop after this many steps at zero robust error")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny batches run best on one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    robust_steps = args.steps or (60 if args.quick else 2000)
    standard_steps = 200 if args.quick else 2000
    warmup = min(args.warmup, robust_steps // 2)
    start = time.perf_counter()
    models, metrics, logs, x, y = run(
        args.seed, standard_steps, robust_steps, warmup, args.patience, not args.no_progress
    )
    rows = []
    for kind, m in metrics.items():
        log = logs[kind]
        rows.append(
            {
                "model": kind,
                **m,
                "steps": log.steps[-1],
                "first_zero_error_step": log.first_zero(),
                "final_loss": log.loss[-1],
                "train_seconds": log.seconds,
                "eps": EPS,
                "seed": args.seed,
            }
        )
    table = pd.DataFrame(rows)
    png, csv = _plot.save_outputs(
        plot(models, metrics, x, y, EPS, resolution=120 if args.quick else 300), table, args.out, NAME
    )
    history = pd.concat(
        pd.DataFrame({"model": k, "step": v.steps, "loss": v.loss, "error": v.error}) for k, v in logs.items()
    )
    history.to_csv(args.out / f"{NAME}_history.csv", index=False)
    save_model(model_path(args.out), models["robust"], x, y, EPS, args.seed)
    print(table.to_string(index=False))
    print(f"wrote {png}, {csv} and {model_path(args.out)} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
