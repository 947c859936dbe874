"""Optimised lower slopes in every ReLU layer (the dual's free ``alpha`` of eq. 5).

Theorem 1 holds for *any* ``alpha`` in ``[0, 1]``, in the final objective and in the
bounds of every intermediate layer alike, so gradient ascent on ``J`` over all layers'
slopes -- intermediate bounds re-derived from the slopes at each step -- only ever yields
valid bounds; the best ``J`` seen is kept, per objective.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from polytope.bounds.dual import DualNetwork
from polytope.model.checks import check_objective
from polytope.model.errors import InvalidInputError
from polytope.model.network import Network
from polytope.model.sets import InputSet


class _ProjectedAdam:
    """Adam on a list of per-example tensors ``(B, ...)``, projected to ``[0, upper]`` after each step.

    ``upper``: one bound per tensor (default 1, the slopes' range; ``inf`` for the split multipliers of
    :mod:`polytope.bounds.splits`).  Its state is per example too, so :meth:`keep` can drop finished
    examples from the batch.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, upper: list[float] | None = None) -> None:
        self.params = [p.detach().clone() for p in params]
        self.upper = [1.0] * len(params) if upper is None else list(upper)
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def leaves(self) -> list[torch.Tensor]:
        """The current slopes as fresh leaves that record gradients."""
        return [p.clone().requires_grad_(True) for p in self.params]

    def step(self, grads: list[torch.Tensor]) -> None:
        """One ascent step along ``grads`` (gradients of the objective to maximise)."""
        self.t += 1
        b1, b2 = self.betas
        for p, m, v, g, hi in zip(self.params, self.m, self.v, grads, self.upper, strict=True):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            step = self.lr * (m / (1 - b1**self.t)) / ((v / (1 - b2**self.t)).sqrt() + self.eps)
            p.add_(step).clamp_(0.0, hi)

    def drop_finished(self, active: torch.Tensor, done: torch.Tensor) -> torch.Tensor | None:
        """The batch's ``active`` example indices without the ``done`` ones (their state leaves too);
        ``None`` when every one is done."""
        if done.all():
            return None
        if done.any():
            self.keep(~done)
            active = active[~done]
        return active

    def keep(self, rows: torch.Tensor) -> None:
        """Restrict the batch to ``rows`` (a boolean mask over the current examples)."""
        self.params = [p[rows] for p in self.params]
        self.m = [m[rows] for m in self.m]
        self.v = [v[rows] for v in self.v]


def warm_start(
    net: Network, x: torch.Tensor, input_set: InputSet, c: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(max(J_fixed, J_adaptive), slopes)``: per example, the slopes of the better (larger summed ``J``) mode."""
    with torch.no_grad():
        fixed = DualNetwork(net, x, input_set, slopes="fixed")
        adaptive = DualNetwork(net, x, input_set, slopes="adaptive")
        j_fixed, j_adaptive = fixed.objective(c), adaptive.objective(c)
    take_adaptive = j_adaptive.sum(1) > j_fixed.sum(1)
    alpha = []
    for rf, ra in zip(fixed.relaxations, adaptive.relaxations, strict=True):
        view = take_adaptive.reshape(-1, *[1] * (rf.lower.dim() - 1))
        alpha.append(torch.where(view, ra.adaptive_slope(), rf.upper_slope))
    return torch.maximum(j_fixed, j_adaptive), alpha


class OptimizedSlopes(NamedTuple):
    """The slopes :func:`optimize_slopes` ended with, per example.

    ``bounds``: one ``(B, *layer_shape)`` tensor per ReLU layer, the slopes of every
    intermediate bound; ``objective``: one ``(B, m, *layer_shape)`` tensor per ReLU layer, each
    objective's own slopes in its final backward pass (``None`` without ``per_objective``: the
    objectives use ``bounds``).  ``DualNetwork(net, x, S, slopes=bounds).objective(c, objective)``
    recomputes ``J``.
    """

    bounds: list[torch.Tensor]
    objective: list[torch.Tensor] | None


def optimize_slopes(
    net: Network,
    x: torch.Tensor,
    input_set: InputSet,
    c: torch.Tensor,
    steps: int = 20,
    lr: float = 0.1,
    patience: int = 5,
    until_positive: bool = False,
    per_objective: bool = True,
) -> tuple[torch.Tensor, OptimizedSlopes]:
    """Maximise ``J(c)`` over the lower slopes of every ReLU layer, per example.

    The slopes of the intermediate bounds are one per unit, shared by all objectives; with
    ``per_objective`` (the default) each objective's final backward pass (eq. 7 from ``c``) has
    its own slopes too, as ``alpha`` in Theorem 1 may differ per objective.  Every choice is
    sound.  Warm start: per example, the better (larger summed ``J``) of the fixed (eq. 8) and
    the adaptive slopes, and ``J >= max(J_fixed, J_adaptive)`` per objective from the start.
    Projected Adam on ``alpha in [0, 1]`` for at most ``steps`` steps; an example leaves the
    batch once none of its objectives improved for ``patience`` steps.  ``c: (B, m, n_out)``
    or ``(m, n_out)``.

    ``until_positive`` is for certificates: an example also leaves as soon as every objective
    with a nonzero ``c`` row has ``J > 0``, or at once when some ``c^T f(x) <= 0`` (then no bound
    is positive), and the ascent only pushes objectives not yet positive.  Its ``J`` are then
    valid lower bounds but not maximised.

    Returns ``(J, slopes)``: ``J: (B, m)`` the best bound seen for each objective (each a valid
    lower bound) and every example's :class:`OptimizedSlopes` when it left the batch.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InvalidInputError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise InvalidInputError(f"patience must be an integer >= 1, got {patience!r}")
    check_objective(c)
    if c.dim() == 2:
        c = c.unsqueeze(0).expand(x.shape[0], *c.shape)
    best, start = warm_start(net, x, input_set, c)
    m = c.shape[1]
    n_bounds = len(start)
    if per_objective:
        start = start + [a.unsqueeze(1).expand(-1, m, *a.shape[1:]) for a in start]
    alpha_out = [a.clone() for a in start]
    counted = c.flatten(2).ne(0).any(2)  # objectives that are not trivially 0
    with torch.no_grad():  # J <= c^T f(x) <= 0 somewhere: no slopes can certify the example
        hopeless = ((torch.einsum("bmo,bo->bm", c, net.forward(x)) <= 0) & counted).any(1) & until_positive
    active = torch.arange(x.shape[0], device=x.device)
    stale = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    adam = _ProjectedAdam(start, lr)

    def finished() -> torch.Tensor:
        done = stale[active] >= patience
        if until_positive:
            done |= ((best[active] > 0) | ~counted[active]).all(1) | hopeless[active]
        return done

    for _ in range(steps if start else 0):  # without ReLU layers J is exact: no slopes to optimise
        remaining = adam.drop_finished(active, finished())
        if remaining is None:
            break
        active = remaining
        leaves = adam.leaves()
        with torch.enable_grad():
            dual = DualNetwork(net, x[active], input_set.subset(x.shape[0], active), slopes=leaves[:n_bounds])
            j = dual.objective(c[active], leaves[n_bounds:] or None)
            pushed = counted[active] & (best[active] <= 0) if until_positive else counted[active]
            grads = torch.autograd.grad((j * pushed).sum(), leaves, allow_unused=True)
        with torch.no_grad():
            j = j.detach()
            improved = (j > best[active]).any(1)
            best[active] = torch.maximum(best[active], j)
            stale[active] = torch.where(improved, torch.zeros_like(stale[active]), stale[active] + 1)
            for out, a in zip(alpha_out, leaves, strict=True):
                out[active] = a.detach()
            adam.step([torch.zeros_like(a) if g is None else g for a, g in zip(leaves, grads, strict=True)])
    return best, OptimizedSlopes(alpha_out[:n_bounds], alpha_out[n_bounds:] if per_objective else None)
