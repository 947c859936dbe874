"""Optimised lower slopes: closing the gap between Theorem 1's ``J`` and the LP (eq. 19) from below.

With the bounds ``l, u`` fixed, every ``alpha in [0, 1]`` gives a valid ``J(c, alpha)`` and
``max_alpha J`` equals the relaxed LP's optimum (its LP dual is ``J`` at some ``alpha``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

from polytope.bounds.dual import DualNetwork
from polytope.model.checks import check_choice, check_objective
from polytope.model.errors import ShapeMismatchError


def _objective_batch(dual: DualNetwork, c: torch.Tensor) -> torch.Tensor:
    """``c`` as ``(B, m, n_out)`` on the dual's dtype and device."""
    c = torch.as_tensor(c).to(dtype=dual.x.dtype, device=dual.x.device)
    check_objective(c)
    if c.dim() == 2:
        c = c.unsqueeze(0).expand(dual.x.shape[0], *c.shape)
    n_out = dual.shapes[-1][0]
    if c.dim() != 3 or c.shape[0] != dual.x.shape[0] or c.shape[2] != n_out:
        raise ShapeMismatchError(f"c must be (B={dual.x.shape[0]}, m, {n_out}) or (m, {n_out}), got {tuple(c.shape)}")
    return c


def _per_objective(t: torch.Tensor, m: int) -> torch.Tensor:
    """A layer tensor ``(B, *shape)`` repeated for ``m`` objectives: ``(B, m, *shape)``."""
    return t.unsqueeze(1).expand(t.shape[0], m, *t.shape[1:]).clone()


def _pick(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where the per-objective ``mask: (B, m)`` holds, else ``b`` (layer tensors ``(B, m, ...)``)."""
    return torch.where(mask.reshape(*mask.shape, *([1] * (a.dim() - 2))), a, b)


def optimize_alpha(
    dual: DualNetwork,
    c: torch.Tensor,
    steps: int = 200,
    lr: float = 0.1,
    lr_final: float = 1e-3,
    optimizer: Literal["adam", "sgd"] = "adam",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Maximise Theorem 1's ``J(c, alpha)`` over the lower slopes ``alpha in [0, 1]``.

    The bounds ``l, u`` stay those of ``dual``; only the last pass (from ``c``) changes, with one
    slope per unstable unit of every ReLU layer *and per objective* (``alpha: (B, m, *shape)``).
    Every ``alpha`` gives a valid bound, and with the same bounds ``max_alpha J`` is the optimum
    of eq. (19) (its LP dual is ``J`` at some ``alpha``), so this closes the gap from below.

    Projected Adam (or plain projected gradient) with a cosine learning-rate decay from ``lr``
    to ``lr_final``, batched on the tensors' device.  It starts, per objective, from the better
    of ``alpha = u/(u-l)`` (eq. 8) and the adaptive slopes, and returns the best ``J`` seen with
    its slopes: ``(J: (B, m), alpha: list of (B, m, *shape))``, both without autograd history
    (the model's parameters are frozen while it runs).

    On small 1- and 2-hidden-layer nets over l_inf balls 200 steps usually land within ~1e-5
    relative of the LP (some need ~400).  The residual is the slow convergence of (sub)gradient steps on this
    piecewise-linear objective and shrinks with more steps; it is worst for l_1 balls, whose
    ``-eps ||g||_inf`` term puts the optimum on ridges (there, use ~1000 steps).
    :meth:`RelaxedLP.alpha_from_duals` gives the exact maximiser (``J`` = LP).
    """
    check_choice(optimizer, ("adam", "sgd"), "optimizer")
    with _frozen(dual.net.module):
        return _optimize_alpha(dual, _objective_batch(dual, c), steps, lr, lr_final, optimizer)


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """Switch off ``requires_grad`` on the model's parameters for the duration (then restore it).

    Only the slopes are optimised; without this autograd also differentiates through every
    weight-dependent operation of the dual network (several times slower on conv nets).
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _optimize_alpha(
    dual: DualNetwork, c: torch.Tensor, steps: int, lr: float, lr_final: float, optimizer: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    m = c.shape[1]
    relax = dual.relaxations
    with torch.no_grad():
        fixed = [_per_objective(r.upper_slope.detach(), m) for r in relax]
        adaptive = [_per_objective(r.lower_slope(r.adaptive_slope()).detach(), m) for r in relax]
        j_fixed = dual.objective(c, fixed).detach()
        j_adaptive = dual.objective(c, adaptive).detach()
        use_adaptive = j_adaptive > j_fixed
        best = _Best(
            torch.maximum(j_fixed, j_adaptive),
            [_pick(use_adaptive, a, f) for a, f in zip(adaptive, fixed, strict=True)],
        )
    if not relax or steps <= 0:
        return best.j, best.alpha
    _ascend(dual, c, best, steps, lr, lr_final, optimizer)
    return best.j, [a.clone() for a in best.alpha]


@dataclass
class _Best:
    """The best ``J`` per objective seen so far and its slopes."""

    j: torch.Tensor
    alpha: list[torch.Tensor]

    def update(self, j: torch.Tensor, alpha: list[torch.Tensor]) -> None:
        better = j > self.j
        self.j = torch.where(better, j, self.j)
        self.alpha = [_pick(better, a.detach(), b) for a, b in zip(alpha, self.alpha, strict=True)]


def _ascend(
    dual: DualNetwork, c: torch.Tensor, best: _Best, steps: int, lr: float, lr_final: float, optimizer: str
) -> None:
    """Projected gradient ascent from the best slopes so far, cosine learning-rate decay."""
    params = [a.clone().requires_grad_(True) for a in best.alpha]
    opt: torch.optim.Optimizer
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    for step in range(steps + 1):
        j = dual.objective(c, params)
        with torch.no_grad():
            best.update(j.detach(), params)
        if step == steps:
            break
        grads = torch.autograd.grad(j.sum(), params)
        for p, g in zip(params, grads, strict=True):
            p.grad = -g
        for group in opt.param_groups:
            group["lr"] = lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * step / steps))
        opt.step()
        with torch.no_grad():
            for p in params:
                p.clamp_(0.0, 1.0)
