"""Robust loss (Theorem 2), certificates (Corollaries 1 and 2) and certified radii (eq. 17)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from polytope.bounds.dual import DualNetwork, Slopes
from polytope.bounds.parallel import map_chunks
from polytope.bounds.slopes import optimize_slopes
from polytope.model.errors import ShapeMismatchError
from polytope.model.network import Network
from polytope.model.sets import InputSet, check_finite
from polytope.model.specs import margin_objective, worst_of

MARGIN_CHUNK = 16
"""Examples per dual network in :func:`margin_bounds`: small enough that every intermediate
tensor is reused from the allocator's free lists instead of fresh (page-faulting) memory."""


def _labels(net: Network, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    net.check_input(x)
    check_finite(x)
    if y is not None:
        if y.shape[0] != x.shape[0]:
            raise ShapeMismatchError(f"{y.shape[0]} labels for a batch of {x.shape[0]} examples")
        return y.to(x.device)
    with torch.no_grad():
        return net.forward(x).argmax(1)


def margin_bounds(
    net: Network, x: torch.Tensor, y: torch.Tensor, input_set: InputSet, slopes: Slopes = "fixed"
) -> torch.Tensor:
    """``J(x, g(e_y 1^T - I))``: ``(B, n)`` lower bounds on ``f_y - f_j`` over ``S(x)``; entry ``y`` is 0.

    ``slopes="optimized"`` runs :func:`polytope.bounds.slopes.optimize_slopes` (default budget).
    """
    c = margin_objective(y, net.shapes(tuple(x.shape[1:]))[-1][0], x.dtype)
    if slopes == "optimized":
        return optimize_slopes(net, x, input_set, c)[0]

    def chunk(s: int) -> torch.Tensor:
        rows = input_set.rows(x.shape[0], s, s + MARGIN_CHUNK)
        return DualNetwork(net, x[s:s + MARGIN_CHUNK], rows, slopes=slopes).objective(c[s:s + MARGIN_CHUNK])

    parts = map_chunks(chunk, x.shape[0], MARGIN_CHUNK, x.device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def certified_by_margins(margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Corollary 1: certified when every ``J_j > 0`` for ``j != y`` (a tie is not certified)."""
    return worst_of(margins, y) > 0


def robust_loss(
    net: Network, x: torch.Tensor, y: torch.Tensor, input_set: InputSet, slopes: Slopes = "fixed"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Theorem 2: mean cross-entropy of ``-J`` and the robust error (fraction not certified)."""
    y = _labels(net, x, y)
    margins = margin_bounds(net, x, y, input_set, slopes)
    loss = F.cross_entropy(-margins, y)
    err = (~certified_by_margins(margins.detach(), y)).to(x.dtype).mean()
    return loss, err


def certify(
    net: Network,
    x: torch.Tensor,
    input_set: InputSet,
    y: torch.Tensor | None = None,
    method: str = "dual",
) -> torch.Tensor:
    """``(B,)`` booleans: Corollary 1 with labels ``y``, Corollary 2 (predicted class) without.

    ``method`` is ``"dual"`` (the paper's fixed slopes), ``"adaptive"``, ``"optimized"``
    (:func:`polytope.bounds.slopes.optimize_slopes`, 20 steps, each example stopping once certified),
    ``"lp"``, ``"lp-all"``, ``"milp"`` (each alone) or ``"cascade"`` (all rungs, cheapest first;
    see :mod:`polytope.verify.cascade`).
    """
    y = _labels(net, x, y)
    if method in ("lp", "lp-all", "milp", "cascade"):
        from polytope.verify.cascade import RUNGS, Cascade

        rungs = RUNGS if method == "cascade" else (method,)
        verdicts = Cascade(net, input_set, rungs=rungs).run(x, y, list(range(len(x))))
        return torch.tensor([v.verdict == "certified" for v in verdicts], device=x.device)
    return certified_by_margins(certificate_margins(net, x, y, input_set, method), y)


def certificate_margins(net: Network, x: torch.Tensor, y: torch.Tensor, input_set: InputSet,
                        method: str = "dual") -> torch.Tensor:
    """``(B, n)`` margin bounds ``J_j`` for a bound method: ``"dual"``, ``"adaptive"`` or ``"optimized"``.

    ``"optimized"`` stops each example as soon as it is certified (``until_positive``), so its
    margins are valid bounds that are not maximised beyond 0.
    """
    slopes = {"dual": "fixed", "fixed": "fixed", "adaptive": "adaptive", "optimized": "optimized"}.get(method)
    if slopes is None:
        raise ValueError(
            f"unknown method {method!r}: use 'dual', 'adaptive', 'optimized', 'lp', 'lp-all', 'milp' or 'cascade'"
        )
    if slopes == "optimized":
        c = margin_objective(y, net.shapes(tuple(x.shape[1:]))[-1][0], x.dtype)
        return optimize_slopes(net, x, input_set, c, until_positive=True)[0]
    with torch.no_grad():
        return margin_bounds(net, x, y, input_set, slopes)  # type: ignore[arg-type]


def worst_margin(
    net: Network, x: torch.Tensor, y: torch.Tensor, input_set: InputSet, slopes: Slopes = "fixed"
) -> torch.Tensor:
    """``min_{j != y} J_j``: positive exactly when the example is certified, ``(B,)``."""
    return worst_of(margin_bounds(net, x, y, input_set, slopes), y)


def certified_radius(
    net: Network,
    x: torch.Tensor,
    input_set: InputSet,
    y: torch.Tensor | None = None,
    eps_max: float = 1.0,
    tol: float = 1e-4,
    max_steps: int = 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (17): the largest ``eps`` with ``min_j J_eps(...)_j >= 0``, per example.

    Safeguarded Newton on ``m(eps) = worst margin``: each step keeps a bracket ``[lo, hi]``
    with ``m(lo) > 0 >= m(hi)`` and falls back to bisection when Newton leaves it.  The
    returned radius is always a certified ``eps`` (``m > 0`` was evaluated there, or it is 0).
    The paper calls the certificate monotone in ``eps``; for the fixed-slope bound that is
    usual but not guaranteed (the slopes ``u/(u-l)`` change with ``eps``), so on a
    non-monotone margin this finds *a* certified boundary of the bracket, not necessarily
    the largest certified ``eps``.  ``input_set`` gives the norm; its ``eps`` is ignored.  Returns
    ``(radius, steps)``; ``y`` defaults to the prediction (the paper's ``f(x)``).
    """
    y = _labels(net, x, y)
    batch = x.shape[0]
    dtype = x.dtype
    lo = torch.zeros(batch, dtype=dtype, device=x.device)
    hi = torch.full_like(lo, eps_max)

    def margin_and_slope(eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = eps.detach().requires_grad_(True)
        with torch.enable_grad():
            m = worst_margin(net, x, y, replace(input_set, eps=eps))
            (grad,) = torch.autograd.grad(m.sum(), eps, allow_unused=True)
        return m.detach(), torch.zeros_like(eps) if grad is None else grad

    m0, _ = margin_and_slope(lo)
    m_hi, _ = margin_and_slope(hi)
    done = (m0 <= 0) | (m_hi > 0)
    lo = torch.where(m_hi > 0, hi, lo)
    eps = torch.where(done, lo, torch.full_like(lo, min(0.01, eps_max / 2)))
    steps = torch.zeros(batch, dtype=torch.long, device=x.device)
    for _ in range(max_steps):
        if done.all():
            break
        m, slope = margin_and_slope(eps)
        ok = m > 0
        lo = torch.where(~done & ok, torch.maximum(lo, eps), lo)
        hi = torch.where(~done & ~ok, torch.minimum(hi, eps), hi)
        steps = steps + (~done).long()
        newton = eps - m / torch.where(slope < 0, slope, torch.full_like(slope, -1e-12))
        # a certified point whose Newton step is below tolerance is at the boundary (from below)
        converged = ok & ((newton - eps).abs() <= tol * eps.clamp_min(1e-12))
        inside = (newton > lo) & (newton < hi) & torch.isfinite(newton)
        eps = torch.where(inside, newton, (lo + hi) / 2)
        done = done | ((hi - lo) <= tol * hi.clamp_min(1e-12)) | converged
    return lo, steps
