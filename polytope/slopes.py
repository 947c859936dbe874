"""Optimised lower slopes in every ReLU layer (the dual's free ``alpha`` of eq. 5).

Theorem 1 holds for *any* ``alpha`` in ``[0, 1]``, in the final objective and in the
bounds of every intermediate layer alike, so gradient ascent on ``J`` over all layers'
slopes -- intermediate bounds re-derived from the slopes at each step -- only ever yields
valid bounds; the best ``J`` seen is kept.
"""

from __future__ import annotations

import torch

from polytope.dual import DualNetwork
from polytope.network import Network
from polytope.sets import InputSet


def optimize_slopes(
    net: Network,
    x: torch.Tensor,
    input_set: InputSet,
    c: torch.Tensor,
    steps: int = 20,
    lr: float = 0.1,
    patience: int = 5,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Maximise ``J(c)`` over one lower slope per unit of every ReLU layer, per example.

    Warm start: per example, the better (larger summed ``J``) of the fixed (eq. 8) and the
    adaptive slopes.  Projected Adam on ``alpha in [0, 1]``; stops after ``steps`` or when
    no objective improved for ``patience`` steps.  Returns ``(J, alpha)`` with ``J: (B, m)``
    the best bound seen for each objective (each one a valid lower bound) and ``alpha`` the
    slopes of the last step.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    with torch.no_grad():
        fixed = DualNetwork(net, x, input_set, slopes="fixed")
        adaptive = DualNetwork(net, x, input_set, slopes="adaptive")
        j_fixed, j_adaptive = fixed.objective(c), adaptive.objective(c)
    take_adaptive = j_adaptive.sum(1) > j_fixed.sum(1)
    best = torch.maximum(j_fixed, j_adaptive)
    alpha = []
    for rf, ra in zip(fixed.relaxations, adaptive.relaxations, strict=True):
        view = take_adaptive.reshape(-1, *[1] * (rf.lower.dim() - 1))
        start = torch.where(view, ra.adaptive_slope(), rf.upper_slope)
        alpha.append(start.detach().clone().requires_grad_(True))
    optimizer = torch.optim.Adam(alpha, lr=lr)
    stale = 0
    for _ in range(steps):
        with torch.enable_grad():
            j = DualNetwork(net, x, input_set, slopes=alpha).objective(c)
            optimizer.zero_grad()
            (-j.sum()).backward(inputs=alpha)
        optimizer.step()
        with torch.no_grad():
            for a in alpha:
                a.clamp_(0.0, 1.0)
            improved = (j.detach() > best).any()
            best = torch.maximum(best, j.detach())
        stale = 0 if improved else stale + 1
        if stale >= patience:
            break
    return best, [a.detach() for a in alpha]
