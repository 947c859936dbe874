"""Robust loss (Theorem 2), certificates (Corollaries 1 and 2) and certified radii (eq. 17)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from polytope.bounds.dual import DualNetwork, Slopes
from polytope.bounds.parallel import chunk_size, map_chunks
from polytope.bounds.precision import settle_in_float64
from polytope.bounds.slopes import optimize_slopes
from polytope.model.checks import check_choice, check_labels
from polytope.model.errors import InvalidInputError, ShapeMismatchError
from polytope.model.network import Network
from polytope.model.sets import InputSet, check_finite
from polytope.model.specs import margin_objective, worst_of

METHODS = ("dual", "adaptive", "optimized", "lp", "lp-all", "bab", "milp", "cascade")
"""The ``method`` choices of :func:`certify`."""

def _labels(net: Network, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    net.check_input(x)
    check_finite(x)
    if y is not None:
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ShapeMismatchError(f"labels must be a vector of {x.shape[0]} (one per example), got shape "
                                     f"{tuple(y.shape)}")
        check_labels(y, net.shapes(tuple(x.shape[1:]))[-1][0])
        return y.to(x.device)
    with torch.no_grad():
        return net.forward(x).argmax(1)


def margin_bounds(
    net: Network, x: torch.Tensor, y: torch.Tensor, input_set: InputSet, slopes: Slopes = "fixed"
) -> torch.Tensor:
    """``J(x, g(e_y 1^T - I))``: ``(B, n)`` lower bounds on ``f_y - f_j`` over ``S(x)``; entry ``y`` is 0.

    ``slopes="optimized"`` runs :func:`polytope.bounds.slopes.optimize_slopes` (default budget).
    """
    if isinstance(slopes, str):
        check_choice(slopes, ("fixed", "adaptive", "optimized"), "slopes")
    c = margin_objective(y, net.shapes(tuple(x.shape[1:]))[-1][0], x.dtype)
    if slopes == "optimized":
        return optimize_slopes(net, x, input_set, c)[0]

    size = chunk_size(net.check_input(x), x)

    def chunk(s: int) -> torch.Tensor:
        rows = input_set.rows(x.shape[0], s, s + size)
        return DualNetwork(net, x[s:s + size], rows, slopes=slopes).objective(c[s:s + size])

    parts = map_chunks(chunk, x.shape[0], size, x.device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def certified_by_margins(margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Corollary 1: certified when every ``J_j > 0`` for ``j != y`` (a tie is not certified)."""
    return worst_of(margins, y) > 0


def robust_loss(
    net: Network, x: torch.Tensor, y: torch.Tensor, input_set: InputSet, slopes: Slopes = "fixed"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Theorem 2: mean cross-entropy of ``-J`` and the robust error (fraction not certified).

    The error follows the float policy of :func:`certify` (near-zero margins decided in float64);
    the loss is the bound of ``x``'s own dtype.  Both are means over the batch: an empty batch raises
    :class:`InvalidInputError` (the per-example functions -- :func:`certify`, :func:`margin_bounds`,
    :class:`DualNetwork` -- return empty results).
    """
    if x.dim() >= 1 and x.shape[0] == 0:
        raise InvalidInputError("robust_loss needs a non-empty batch: its mean over no examples is undefined")
    y = _labels(net, x, y)
    margins = margin_bounds(net, x, y, input_set, slopes)
    loss = F.cross_entropy(-margins, y)
    settled = settle_in_float64(net, x, y, input_set, margins,
                                lambda net64, _, x64, y64, s64: margin_bounds(net64, x64, y64, s64, slopes))
    err = (~certified_by_margins(settled, y)).to(x.dtype).mean()
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
    ``"lp"``, ``"lp-all"``, ``"bab"`` (branch and bound, :mod:`polytope.verifiers.bab`), ``"milp"`` (each alone)
    or ``"cascade"`` (all rungs, cheapest first;
    see :mod:`polytope.verifiers.cascade`).  An unknown ``method`` raises :class:`UnknownOptionError`.

    Float policy (``docs/float_policy.md``): a certificate never rests on lower-precision rounding.
    For a network and inputs in float32 (or any dtype but float64), every example whose worst
    margin bound ``min_{j != y} J_j`` lies within ``tau = 64 * machine_eps(dtype) * max_j a_L[j]``
    of zero -- ``a_L`` bounds the magnitude of every term of ``J`` (:func:`polytope.bounds.precision.magnitude_bound`),
    so ``tau`` scales with the outputs -- is recomputed in float64 from a float64 copy of the same
    weights, and the float64 value decides.  The LP and MILP rungs always run in float64.
    """
    check_choice(method, METHODS, "method")
    y = _labels(net, x, y)
    if method in ("lp", "lp-all", "bab", "milp", "cascade"):
        from polytope.verifiers.cascade import RUNGS, Cascade

        rungs = RUNGS if method == "cascade" else (method,)
        verdicts = Cascade(net, input_set, rungs=rungs).run(x, y, list(range(len(x))))
        return torch.tensor([v.verdict == "certified" for v in verdicts], dtype=torch.bool, device=x.device)
    return certified_by_margins(certificate_margins(net, x, y, input_set, method), y)


def certificate_margins(net: Network, x: torch.Tensor, y: torch.Tensor, input_set: InputSet,
                        method: str = "dual") -> torch.Tensor:
    """``(B, n)`` margin bounds ``J_j`` for a bound method: ``"dual"``, ``"adaptive"`` or ``"optimized"``.

    ``"optimized"`` stops each example as soon as it is certified (``until_positive``), so its
    margins are valid bounds that are not maximised beyond 0.  In a dtype other than float64 the
    rows of examples whose worst margin lies within the rounding tolerance of zero are recomputed
    in float64 (:func:`polytope.bounds.precision.settle_in_float64`; see :func:`certify`).
    """
    slopes = {"dual": "fixed", "adaptive": "adaptive", "optimized": "optimized"}[
        check_choice(method, ("dual", "adaptive", "optimized"), "bound method")]
    margins = _method_margins(net, x, y, input_set, slopes)
    return settle_in_float64(net, x, y, input_set, margins,
                             lambda net64, _, x64, y64, s64: _method_margins(net64, x64, y64, s64, slopes))


def _method_margins(net: Network, x: torch.Tensor, y: torch.Tensor, input_set: InputSet, slopes: str) -> torch.Tensor:
    """The margin bounds of one bound method in ``x``'s own dtype (no float policy)."""
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
