"""The exact verification problem as a mixed-integer LP (big-M ReLUs), solved by HiGHS.

Eq. (19) relaxes each unstable ReLU to its convex hull; the exact problem
``min_{x' in S(x)} c^T f(x')`` keeps it, with one binary ``a`` per unit in ``I``::

    z >= 0,  z >= zhat,  z <= zhat - l (1 - a),  z <= u a,   a in {0, 1}

(valid because ``l <= zhat <= u`` on ``S(x)``; the LP relaxation of these constraints is the
triangle of eq. 19).  Stable units are handled exactly as in the LP.  The MILP is exponential in
the number of unstable units, so :class:`ExactMILP` refuses more than ``max_unstable`` of them
unless ``force=True``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import highspy
import numpy as np

from polytope.model.checks import check_choice, check_cutoff
from polytope.model.errors import SolverError
from polytope.model.network import Network, as_float64
from polytope.model.sets import InputSet
from polytope.solvers.highs import (
    BoundsSpec,
    HighsModel,
    LPResult,
    add_affine,
    add_input,
    add_max_rows,
    add_relu,
    batch_of_one,
    check_bounds,
    check_memory,
    compose_affine,
    dual_bounds,
    extract,
    linear_masks,
    objective_vector,
    solver_options,
    unstable_counts,
)
from polytope.solvers.lp import RelaxedLP
from polytope.solvers.sparse_ops import network_matrices


class ExactMILP:
    """``min_{x' in S(x)} c^T f(x')`` exactly, for one example, by branch and bound in HiGHS.

    Args:
        net, x, input_set: as for :class:`~polytope.solvers.lp.RelaxedLP` (l_inf, boxed l_inf, l_1).
        bounds: ``None`` or ``"dual"`` (Algorithm 1), ``"lp-all"`` (LP-tightened: fewer
            binaries, smaller big-M), or one valid ``(l, u)`` pair per ReLU layer.
        time_limit: seconds per solve; on timeout the status is ``"time_limit"`` and ``bound``
            still holds the proven lower bound.
        max_unstable: refuse (:class:`SolverError`) networks with more unstable units than this,
            unless ``force``.
        mip_rel_gap, mip_abs_gap: optimality gaps (tiny by default: the value is exact up to them).
        memory_limit: bytes the model may use (default: the memory available); a larger model is
            refused with :class:`SolverError` before it is built (the search tree grows within
            the estimate's 2x margin on the MNIST model; a long search may need more).
    """

    def __init__(
        self,
        net: Network,
        x: Any,
        input_set: InputSet,
        bounds: BoundsSpec | None = None,
        time_limit: float | None = None,
        max_unstable: int = 200,
        force: bool = False,
        mip_rel_gap: float = 1e-9,
        mip_abs_gap: float = 1e-9,
        feasibility_tolerance: float = 1e-9,
        highs_options: dict[str, Any] | None = None,
        memory_limit: int | None = None,
    ) -> None:
        start = time.perf_counter()
        self.net = as_float64(net)
        self.x = batch_of_one(self.net, x)
        self.shapes = self.net.shapes(tuple(self.x.shape[1:]))
        input_set.validate(self.x)
        self.time_limit = time_limit
        affines = network_matrices(self.net, self.shapes[0])
        check_memory(affines, "MILP", memory_limit)
        self.bounds = self._bounds(bounds, input_set)
        self.linear = linear_masks(self.net)
        self.n_unstable = unstable_counts(self.bounds, self.linear)
        total = sum(self.n_unstable)
        if total > max_unstable and not force:
            raise SolverError(
                f"the MILP would need {total} binaries (unstable units per layer: {self.n_unstable}), "
                f"more than max_unstable={max_unstable}; branch and bound is exponential in this number. "
                "Pass force=True to try anyway, or tighter bounds (bounds='lp-all')."
            )
        options = solver_options(feasibility_tolerance, feasibility_tolerance, highs_options)
        options.update(
            {"mip_rel_gap": mip_rel_gap, "mip_abs_gap": mip_abs_gap, "mip_feasibility_tolerance": feasibility_tolerance}
        )
        self.model = HighsModel(options)
        self.cols = add_input(self.model, self.x[0].flatten().numpy(), input_set, self.x)
        for affine, (lo, up), linear in zip(affines[:-1], self.bounds, self.linear, strict=True):
            compose_affine(self.cols, affine)
            add_relu(self.model, self.cols, lo, up, exact=True, linear=linear)
        add_affine(self.model, self.cols, affines[-1])
        self.build_seconds = time.perf_counter() - start

    def _bounds(self, bounds: BoundsSpec | None, input_set: InputSet) -> list[tuple[np.ndarray, np.ndarray]]:
        if bounds is None or bounds == "dual":
            return dual_bounds(self.net, self.x, input_set)[1]
        if bounds == "lp-all":
            return RelaxedLP(self.net, self.x, input_set, bounds="lp-all", time_limit=self.time_limit).bounds
        if isinstance(bounds, str):
            check_choice(bounds, ("dual", "lp-all"), "bounds (or give None or a list of (l, u))")
        return check_bounds(bounds, self.shapes)

    @property
    def n_out(self) -> int:
        return self.shapes[-1][0]

    def solve(self, c: Any, cutoff: float | None = None) -> LPResult:
        """Minimise ``c^T f(x')`` over ``S(x)`` exactly.

        ``cutoff`` (optional) stops early around a threshold ``t``: branches whose bound
        exceeds ``t`` are pruned (status ``"cutoff"`` when no solution below ``t`` exists --
        ``bound >= t`` is then proven), and the search stops at the first solution with
        objective ``<= t`` (status ``"target"``; ``z_in`` is that counterexample).  In both
        cases ``value`` is NaN: it is not the minimum.
        """
        return self._solve_cols(self.cols.zhat[-1], objective_vector(c, self.n_out), cutoff)

    def solve_max(self, A: Any, b: Any, cutoff: float | None = None) -> LPResult:
        """``min max_i (A_i f(x') - b_i)`` over ``S(x)`` exactly (a free ``t`` with ``A zhat_k - t <= b``).

        With ``cutoff = tau > 0``: status ``"cutoff"`` proves the min-max ``>= tau`` (the conjunction
        ``A y <= b`` is unreachable); with ``cutoff = 0``, ``"target"`` stops at the first point with
        ``max_i (...) <= 0`` (``z_in`` is a candidate counterexample).  Any other status proves nothing.
        """
        t = add_max_rows(self.model, self.cols, A, b)
        return self._solve_cols(t, np.ones(1), cutoff)

    def _solve_cols(self, cols: np.ndarray, c_np: np.ndarray, cutoff: float | None) -> LPResult:
        cutoff = check_cutoff(cutoff)
        h = self.model.h
        h.setOptionValue("objective_bound", highspy.kHighsInf if cutoff is None else cutoff)
        h.setOptionValue("objective_target", -highspy.kHighsInf if cutoff is None else cutoff)
        self.model.set_objective(cols, c_np)
        status, seconds, message = self.model.run(self.time_limit, warm=False)
        info = h.getInfo()
        dual_bound = float(info.mip_dual_bound)
        has_point = int(info.primal_solution_status) == 2  # kSolutionStatusFeasible
        if cutoff is not None:
            incumbent = self.model.objective_value() if has_point else math.inf
            status, bound, message = _cutoff_outcome(status, dual_bound, cutoff, message, incumbent)
        elif status == "optimal":
            bound = min(dual_bound, self.model.objective_value())
        else:
            bound = dual_bound if status == "time_limit" and math.isfinite(dual_bound) else math.nan
        if not has_point or status == "cutoff":
            return LPResult(math.nan, status, None, seconds, message, bound)
        z_in, z_out, layers = extract(self.model.values(), self.cols)
        value = self.model.objective_value() if status == "optimal" else math.nan
        return LPResult(value, status, z_out, seconds, message, bound, z_in, layers, int(info.mip_node_count))


def _cutoff_outcome(
    status: str, dual_bound: float, cutoff: float, message: str, incumbent: float
) -> tuple[str, float, str]:
    """Read a HiGHS run with ``objective_bound = objective_target = cutoff``.

    HiGHS discards every branch whose bound reaches the cutoff, so a search that ends without
    a point below the cutoff -- reported as optimal (with a value that is *not* the minimum),
    infeasible or objective-bound -- proves ``min >= cutoff``.  A run that ends "optimal"
    *with* an incumbent at or below the cutoff (the optimum was proven before the target
    check fired) found a counterexample: that is ``"target"``, never a proof.
    """
    if status == "target" or (status == "optimal" and incumbent <= cutoff):
        status = "target"
        return status, math.nan, f"found a point with objective <= {cutoff} ({message})"
    if status in ("optimal", "infeasible", "cutoff"):
        return "cutoff", cutoff, f"no point with objective below {cutoff} ({message})"
    bound = min(dual_bound, cutoff) if status == "time_limit" and math.isfinite(dual_bound) else math.nan
    return status, bound, message
