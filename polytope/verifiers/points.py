"""Counterexamples checked the one way every rung checks them: membership in the actual set, a float64 forward pass.

(Moved out of :mod:`polytope.verifiers.cascade`, which re-exports these names, so that
:mod:`polytope.verifiers.bab` can use them without an import cycle.)
"""

from __future__ import annotations

import numpy as np
import torch

from polytope.model.errors import PolytopeError
from polytope.model.network import Network
from polytope.model.sets import InputSet


class CounterexampleError(PolytopeError, RuntimeError):
    """A counterexample from an attack or the MILP outside the set, or not confirmed by a float64 forward pass."""


def _margin64(net64: Network, point: torch.Tensor, label: int) -> float:
    """``f_y - max_{j != y} f_j`` at ``point`` in float64 (<= 0: misclassified or tied)."""
    with torch.no_grad():
        f = net64.forward(point.reshape(1, *point.shape).double())[0]
    others = torch.cat([f[:label], f[label + 1:]])
    return float(f[label] - others.max())


MEMBERSHIP_TOL = 1e-6
"""Relative allowance for a counterexample just outside the set (see :func:`verified_point`)."""

PROJECTED_TOL = 1e-12
"""Relative allowance for a float64 point after the set's own projection (its rounding only)."""


def _allowance(input_set: InputSet, x64: torch.Tensor, rel: float) -> torch.Tensor:
    """``rel * (1 + ||x||_p + eps)``: a tolerance on ``||p - x||_p`` at the scale of the numbers involved."""
    return rel * (1 + input_set.norm(x64) + input_set.radius(x64))


def verified_point(net64: Network, x: torch.Tensor, point: torch.Tensor, label: int,
                    input_set: InputSet, index: int, tol: float = MEMBERSHIP_TOL) -> np.ndarray | None:
    """``point`` as a float64 counterexample in ``S(x)`` when it is misclassified there (margin ``<= 0``).

    Membership is tested in float64 on the actual set (:meth:`InputSet.contains`: the l_p ball,
    intersected with the domain box of :class:`~polytope.model.sets.BoxedLinfBall`).  A point farther
    than ``r * (1 + ||x||_p + eps)`` outside, ``r = max(tol, n * machine-eps(point.dtype))`` for ``n``
    inputs, raises :class:`CounterexampleError` (that allowance covers the rounding of a float32
    attack's projection and a solver's feasibility tolerance; anything beyond is a bug, never a
    verdict).  A point within it is projected with ``input_set.project`` in
    float64 and must then lie in the set up to :data:`PROJECTED_TOL` (relative, as above).
    Returns ``None`` when the projected point is not misclassified (a borderline attack); raises
    when it is far from misclassified (a solver's point that does not reproduce).
    """
    x64 = x.detach().cpu().double().reshape(1, *x.shape)
    p = point.detach().cpu().double().reshape(x64.shape)
    rel = max(tol, x64.numel() * torch.finfo(point.dtype).eps) if point.is_floating_point() else tol
    if not bool(input_set.contains(x64, p, _allowance(input_set, x64, rel))[0]):
        outside = float(input_set.excess(x64, p)[0])
        raise CounterexampleError(f"example {index}: the counterexample lies {outside:.3g} outside the input set")
    p = input_set.project(x64, p)
    if not bool(input_set.contains(x64, p, _allowance(input_set, x64, PROJECTED_TOL))[0]):
        raise CounterexampleError(f"example {index}: the projected counterexample is not in the input set")
    margin = _margin64(net64, p[0], label)
    if margin > 1e-6:
        raise CounterexampleError(f"example {index}: counterexample has margin {margin:.3g} > 0 in float64")
    return p[0].numpy() if margin <= 0 else None
