"""A tightness table: Theorem 1's ``J``, optimised ``J``, the LP (eq. 19), LP-all and the MILP per target.

Expect ``dual <= alpha <= lp <= lp_all <= milp`` up to solver tolerances (the paper's
Appendix A.1 and section 6's comparison of the relaxation with the exact problem).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from polytope.bounds.alpha import optimize_alpha
from polytope.bounds.dual import DualNetwork
from polytope.model.errors import ShapeMismatchError, SolverError
from polytope.model.network import Network, as_float64
from polytope.model.sets import InputSet
from polytope.solvers.highs import batch_of_one
from polytope.solvers.lp import RelaxedLP


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _solve_rows(prefix: str, solver: Any, cs: torch.Tensor, build_seconds: float) -> list[dict[str, Any]]:
    """``{prefix, prefix_status, prefix_seconds, prefix_build_seconds}`` for each objective."""
    rows = []
    for c in cs:
        r = solver.solve(c)
        rows.append(
            {
                prefix: r.value,
                f"{prefix}_status": r.status,
                f"{prefix}_seconds": r.seconds,
                f"{prefix}_build_seconds": build_seconds,
            }
        )
    return rows


def _skipped(prefix: str, status: str, n: int) -> list[dict[str, Any]]:
    return [{prefix: math.nan, f"{prefix}_status": status, f"{prefix}_seconds": math.nan} for _ in range(n)]


def tightness_rows(
    net: Network,
    x: Any,
    y: int,
    input_set: InputSet,
    targets: Sequence[int] | None = None,
    lp_all: bool = False,
    milp: bool = False,
    alpha_steps: int = 0,
    time_limit: float | None = None,
    milp_max_unstable: int = 200,
    lp_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Compare the bounds on ``f_y - f_j`` (``c = e_y - e_j``) for one example, one row per target.

    Each row holds ``target``, ``label``, ``n_unstable`` and, for ``dual`` (Theorem 1 with
    ``alpha = u/(u-l)``), ``alpha`` (:func:`optimize_alpha`, if ``alpha_steps > 0``), ``lp``
    (eq. 19, dual bounds), ``lp_all`` (eq. 19, LP-tightened bounds, if ``lp_all``) and ``milp``
    (exact, if ``milp``): the value (NaN unless solved to optimality or not run), a
    ``*_status`` and ``*_seconds``.  Solver rows also carry ``*_build_seconds``: the one-off
    cost of building the model (and, for ``lp_all``, of the bound LPs) for this example.
    Batched methods (dual, alpha) report their batch time divided by the number of targets.
    Expect ``dual <= alpha <= lp <= lp_all <= milp`` up to solver tolerances.  ``lp_options``:
    HiGHS options for the LPs (e.g. ``{"solver": "ipm"}``, interior point with crossover, much
    faster than the dual simplex when thousands of units are unstable).
    """
    net64 = as_float64(net)
    x64 = batch_of_one(net64, x)
    n_out = net64.shapes(tuple(x64.shape[1:]))[-1][0]
    y = int(y)
    if not 0 <= y < n_out:
        raise ShapeMismatchError(f"label {y} is not a class of a network with {n_out} outputs")
    targets = [j for j in range(n_out) if j != y] if targets is None else [int(j) for j in targets]
    if any(not 0 <= j < n_out for j in targets):
        raise ShapeMismatchError(f"targets must be classes in [0, {n_out}), got {targets}")
    eye = torch.eye(n_out, dtype=torch.float64)
    cs = torch.stack([eye[y] - eye[j] for j in targets]) if targets else torch.zeros(0, n_out, dtype=torch.float64)
    m = max(len(targets), 1)

    (dual, j_dual), t_dual = _timed(lambda: _dual_objective(net64, x64, input_set, cs))
    rows: list[dict[str, Any]] = [
        {"target": j, "label": y, "dual": float(v), "dual_status": "optimal", "dual_seconds": t_dual / m}
        for j, v in zip(targets, j_dual, strict=True)
    ]
    if alpha_steps > 0:
        (j_alpha, _), t_alpha = _timed(lambda: optimize_alpha(dual, cs.unsqueeze(0), steps=alpha_steps))
        extra = [
            {"alpha": float(v), "alpha_status": "optimal", "alpha_seconds": t_alpha / m} for v in j_alpha[0].detach()
        ]
    else:
        extra = _skipped("alpha", "skipped", len(targets))
    _merge(rows, extra)

    lp, t_build = _timed(lambda: RelaxedLP(net64, x64, input_set, time_limit=time_limit, highs_options=lp_options))
    for row in rows:
        row["n_unstable"] = sum(lp.n_unstable)
    _merge(rows, _solve_rows("lp", lp, cs, t_build))
    if lp_all:
        lp2, t_build2 = _timed(lambda: RelaxedLP(
            net64, x64, input_set, bounds="lp-all", time_limit=time_limit, highs_options=lp_options
        ))
        _merge(rows, _solve_rows("lp_all", lp2, cs, t_build2))
    else:
        _merge(rows, _skipped("lp_all", "skipped", len(targets)))
    _merge(rows, _milp_rows(net64, x64, input_set, cs, milp, time_limit, milp_max_unstable))
    return rows


def _dual_objective(
    net64: Network, x64: torch.Tensor, input_set: InputSet, cs: torch.Tensor
) -> tuple[DualNetwork, torch.Tensor]:
    with torch.no_grad():
        dual = DualNetwork(net64, x64, input_set)
        values = dual.objective(cs.unsqueeze(0))[0] if cs.shape[0] else torch.zeros(0, dtype=torch.float64)
    return dual, values


def _milp_rows(
    net64: Network,
    x64: torch.Tensor,
    input_set: InputSet,
    cs: torch.Tensor,
    run: bool,
    time_limit: float | None,
    max_unstable: int,
) -> list[dict[str, Any]]:
    if not run:
        return _skipped("milp", "skipped", cs.shape[0])
    from polytope.solvers.milp import ExactMILP

    try:
        milp, t_build = _timed(
            lambda: ExactMILP(net64, x64, input_set, time_limit=time_limit, max_unstable=max_unstable)
        )
    except SolverError:
        return _skipped("milp", "refused", cs.shape[0])
    return _solve_rows("milp", milp, cs, t_build)


def _merge(rows: list[dict[str, Any]], extra: list[dict[str, Any]]) -> None:
    for row, more in zip(rows, extra, strict=True):
        row.update(more)
