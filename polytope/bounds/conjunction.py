"""Lower bounds on ``min_{x' in S(x)} max_i (A_i f(x') - b_i)``: is a conjunction ``A y <= b`` unreachable?

A point with ``A f(x') <= b`` (all ``k`` rows) exists exactly when that min-max is ``<= 0``, so a positive
lower bound proves the conjunction unreachable over the input set.  For any ``lambda >= 0``,
``sum_i lambda_i z_i <= (sum_i lambda_i) max_i z_i``, hence with Theorem 1's ``J`` (eq. 6)::

    min_x' max_i z_i  >=  (J(lambda^T A) - lambda^T b) / sum_i lambda_i        (z = A f(x') - b)

for every ``lambda`` in the simplex and every choice of slopes.  ``lambda = e_i`` is the per-row bound
(a one-row conjunction is the plain objective); :func:`conjunction_bound` takes the best row, then
ascends ``lambda`` jointly with the slopes of every ReLU layer (as :func:`~polytope.bounds.slopes.optimize_slopes`
does for the slopes alone: the same projected Adam, ``lambda = w / sum w`` with ``w`` in ``[0, 1]``),
keeping the best value seen per example.
"""

from __future__ import annotations

import torch

from polytope.bounds.dual import DualNetwork
from polytope.bounds.slopes import _ProjectedAdam, warm_start
from polytope.model.checks import check_objective
from polytope.model.errors import InvalidInputError, ShapeMismatchError
from polytope.model.network import Network
from polytope.model.sets import InputSet


def _batched(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` as ``(B, k, n_out)`` and ``b`` as ``(B, k)`` in ``x``'s dtype; named errors otherwise."""
    A = torch.as_tensor(A, dtype=x.dtype, device=x.device)
    b = torch.as_tensor(b, dtype=x.dtype, device=x.device)
    if A.dim() == 2:
        A = A.unsqueeze(0).expand(x.shape[0], *A.shape)
    if b.dim() == 1:
        b = b.unsqueeze(0).expand(x.shape[0], *b.shape)
    if A.dim() != 3 or A.shape[0] != x.shape[0] or A.shape[2] != n_out or A.shape[1] == 0:
        raise ShapeMismatchError(f"A must be (k, {n_out}) or (B, k, {n_out}) with k >= 1, got {tuple(A.shape)}")
    if tuple(b.shape) != tuple(A.shape[:2]):
        raise ShapeMismatchError(
            f"b must have shape {tuple(A.shape[1:2])} or {tuple(A.shape[:2])}, got {tuple(b.shape)}")
    check_objective(A, "A")
    check_objective(b, "b")
    return A, b


def row_bounds(net: Network, x: torch.Tensor, input_set: InputSet, A: torch.Tensor, b: torch.Tensor,
               slopes: str = "fixed") -> torch.Tensor:
    """``max_i (J(A_i) - b_i)`` per example, ``(B,)``: the ``lambda = e_i`` bounds (one backward pass)."""
    A, b = _batched(A, b, x, net.shapes(tuple(x.shape[1:]))[-1][0])
    with torch.no_grad():
        return (DualNetwork(net, x, input_set, slopes=slopes).objective(A) - b).amax(1)


def conjunction_bound(
    net: Network,
    x: torch.Tensor,
    input_set: InputSet,
    A: torch.Tensor,
    b: torch.Tensor,
    steps: int = 30,
    lr: float = 0.1,
    patience: int = 5,
    until_positive: bool = True,
) -> torch.Tensor:
    """A lower bound on ``min_{x' in S(x)} max_i (A_i f(x') - b_i)`` per example, ``(B,)``.

    ``A: (k, n_out)`` or ``(B, k, n_out)``, ``b: (k,)`` or ``(B, k)``.  Starts from the best per-row
    bound of the fixed and adaptive slopes, then runs at most ``steps`` projected-Adam steps on the
    simplex weights ``lambda`` and every layer's slopes together; an example leaves once its bound has
    not improved for ``patience`` steps or (``until_positive``) once it is positive.  Every value
    kept is a valid bound (module docstring).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InvalidInputError(f"steps must be an integer >= 0, got {steps!r}")
    n_out = net.shapes(tuple(x.shape[1:]))[-1][0]
    A, b = _batched(A, b, x, n_out)
    batch, k = A.shape[:2]
    _, alpha = warm_start(net, x, input_set, A)
    best = torch.maximum(row_bounds(net, x, input_set, A, b, "fixed"), row_bounds(net, x, input_set, A, b, "adaptive"))
    if k == 1 or steps == 0:
        return best
    with torch.no_grad():  # start lambda at the best row of the fixed slopes, with some weight on every row
        rows = DualNetwork(net, x, input_set).objective(A) - b
    w0 = torch.full((batch, k), 0.25, dtype=x.dtype, device=x.device)
    w0[torch.arange(batch), rows.argmax(1)] = 1.0
    adam = _ProjectedAdam([w0, *alpha, *(a.unsqueeze(1) for a in alpha)], lr)
    n_bounds = len(alpha)
    active = torch.arange(batch, device=x.device)
    stale = torch.zeros(batch, dtype=torch.long, device=x.device)
    for _ in range(steps):
        done = stale[active] >= patience
        if until_positive:
            done |= best[active] > 0
        remaining = adam.drop_finished(active, done)
        if remaining is None:
            break
        active = remaining
        leaves = adam.leaves()
        w, bounds_alpha, obj_alpha = leaves[0], leaves[1:1 + n_bounds], leaves[1 + n_bounds:]
        with torch.enable_grad():
            total = w.sum(1).clamp_min(torch.finfo(x.dtype).tiny)
            lam = w / total.unsqueeze(1)
            c = (lam.unsqueeze(1) @ A[active])  # (b, 1, n_out)
            dual = DualNetwork(net, x[active], input_set.subset(batch, active), slopes=bounds_alpha)
            value = (dual.objective(c, obj_alpha)[:, 0] - (lam * b[active]).sum(1)) / lam.sum(1).detach()
            grads = torch.autograd.grad(value.sum(), leaves, allow_unused=True)
        with torch.no_grad():
            value = value.detach()
            improved = value > best[active]
            best[active] = torch.maximum(best[active], value)
            stale[active] = torch.where(improved, torch.zeros_like(stale[active]), stale[active] + 1)
            adam.step([torch.zeros_like(a) if g is None else g for a, g in zip(leaves, grads, strict=True)])
    return best
