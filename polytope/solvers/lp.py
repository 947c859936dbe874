"""The exact relaxed LP of Appendix A.1 (eq. 19), solved directly with HiGHS.

For one example ``x`` and an objective ``c`` on the output, eq. (19) is::

    minimize   c^T zhat_k
    subject to zhat_{i+1} = W_i z_i + b_i                          i = 1..k-1
               z_1 in S(x)                                          (box for l_inf)
               z_ij = 0                                             j in I_i^-
               z_ij = zhat_ij                                       j in I_i^+
               z_ij >= 0,  z_ij >= zhat_ij,
               (u_ij - l_ij) z_ij - u_ij zhat_ij <= -u_ij l_ij      j in I_i

Theorem 1's ``J(c, alpha)`` is the objective of its dual, so ``J <= LP <= min c^T f`` and, with
the same bounds ``l, u``, ``max_alpha J = LP``: :func:`~polytope.bounds.alpha.optimize_alpha` closes that gap from
below.  :class:`RelaxedLP` builds the model once per example and only swaps the objective between
targets, so each further target is a warm-started dual simplex from the previous basis.  The model
has columns only for ``z_1``, the unstable units (``zhat`` and ``z`` on ``I``) and the output
``zhat_k``: a stable unit is an affine function of earlier columns (``z = zhat`` on ``I+``, 0 on
``I-``), so each layer's ``zhat`` is the product of the layer matrices of
:mod:`polytope.solvers.sparse_ops` with the previous layer's expression
(:func:`~polytope.solvers.highs.compose_affine`).  On the released MNIST model this is about
1,100 columns, 500 rows and 22,000 non-zeros instead of 10,400, 6,500 and 560,000; the optimum is
the same LP's.

Input sets: the l_inf ball (and its box-clipped version) is a box on ``z_1``; the l_1 ball adds
``t >= |z_1 - x|``, ``sum t <= eps``.  The l_2 ball is not polyhedral: :class:`RelaxedLP`
refuses it with a :class:`~polytope.model.errors.SolverError`, and :class:`RelaxedLPCvxpy` solves it
as a second-order cone program with Clarabel.

Bounds: ``"dual"`` takes ``l, u`` from :class:`~polytope.bounds.dual.DualNetwork` (the paper's
setting); ``"lp-all"`` re-derives them layer by layer by LPs over the relaxation of the earlier
layers; a list of ``(l, u)`` pairs uses them as given.  Eq. (19) puts no bounds on ``zhat`` of
stable units (they would make the LP tighter than its dual ``J``), and neither does this model.

Solutions are reported like scipy's ``OptimizeResult``: :class:`LPResult` with a string
``status``; ``value`` is NaN unless the status is ``"optimal"`` -- a value that was not proven
optimal is never returned as a bound.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from polytope.bounds.dual import DualNetwork
from polytope.model.checks import check_choice
from polytope.model.errors import ShapeMismatchError, SolverError
from polytope.model.network import Network, Shape, as_float64, numel
from polytope.model.sets import Box, BoxedLinfBall, InputSet, L1Ball, L2Ball, LinfBall
from polytope.solvers.highs import (
    BoundsSpec,
    FlatBounds,
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
    relu_sets,
    solver_options,
    unstable_counts,
)
from polytope.solvers.sparse_ops import network_matrices


# ---------------------------------------------------------------------------------------------
# The relaxed LP
# ---------------------------------------------------------------------------------------------
class RelaxedLP:
    """Eq. (19) for one example, built once, solved for any number of objectives ``c``.

    Args:
        net: the network (any dtype; a float64 copy is used).
        x: one example, ``(*in_shape)`` or ``(1, *in_shape)``.
        input_set: ``LinfBall``, ``BoxedLinfBall``, ``Box`` or ``L1Ball`` (``L2Ball`` raises
            :class:`SolverError`; see :class:`RelaxedLPCvxpy`).
        bounds: ``"dual"`` (Algorithm 1), ``"lp-all"`` (every layer's ``l, u`` re-derived by LPs
            over the relaxation of the earlier layers, itself built from the tightened bounds),
            or one ``(l, u)`` pair per ReLU layer.
        only_unstable: with ``"lp-all"``, re-solve only the units that the dual bounds leave in
            ``I`` (stable units stay stable, and their ``l, u`` do not enter eq. 19).  The first
            ReLU layer always keeps its dual bounds: for one affine map over ``S(x)`` they are
            already the LP's min/max.  Each LP bound is trusted up to HiGHS's tolerances.
        time_limit: seconds per LP solve (``None``: unlimited).
        warm_start: reuse the previous basis between objectives (the default); ``False`` solves
            every objective from scratch.
        primal_feasibility_tolerance, dual_feasibility_tolerance: HiGHS tolerances.
        highs_options: further HiGHS options.
        memory_limit: bytes the model may use (default: the memory available); a larger model is
            refused with :class:`SolverError` before it is built.

    Attributes: ``bounds`` (flat ``(l, u)`` per ReLU layer), ``shapes``, ``dual`` (the
    :class:`DualNetwork`, ``None`` for given bounds), ``n_unstable``, ``build_seconds``,
    ``bound_seconds`` / ``bound_solves`` / ``bound_failures`` (for ``"lp-all"``).
    """

    def __init__(
        self,
        net: Network,
        x: Any,
        input_set: InputSet,
        bounds: BoundsSpec = "dual",
        only_unstable: bool = True,
        time_limit: float | None = None,
        warm_start: bool = True,
        primal_feasibility_tolerance: float = 1e-9,
        dual_feasibility_tolerance: float = 1e-9,
        highs_options: dict[str, Any] | None = None,
        memory_limit: int | None = None,
    ) -> None:
        start = time.perf_counter()
        self.net = as_float64(net)
        self.x = batch_of_one(self.net, x)
        self.input_set = input_set
        self.shapes = self.net.shapes(tuple(self.x.shape[1:]))
        if len(self.shapes[-1]) != 1:
            raise ShapeMismatchError(f"the network's output must be a vector, got shape {self.shapes[-1]}")
        self.time_limit = time_limit
        self.warm_start = warm_start
        self.input_set.validate(self.x)
        self.dual: DualNetwork | None = None
        self.bound_seconds = 0.0
        self.bound_solves = 0
        self.bound_failures = 0

        if isinstance(bounds, str):
            check_choice(bounds, ("dual", "lp-all"), "bounds (or give a list of (l, u))")
            self.dual, flat = dual_bounds(self.net, self.x, input_set)
        else:
            flat = check_bounds(bounds, self.shapes)
        self._affines = network_matrices(self.net, self.shapes[0])
        check_memory(self._affines, "LP", memory_limit)
        options = solver_options(primal_feasibility_tolerance, dual_feasibility_tolerance, highs_options)
        self.model = HighsModel(options)
        x_flat = self.x[0].flatten().numpy()
        self.cols = add_input(self.model, x_flat, input_set, self.x)
        self.bounds: FlatBounds = []
        self.linear = linear_masks(self.net)
        for i, affine in enumerate(self._affines[:-1]):
            compose_affine(self.cols, affine)
            lo, up = flat[i]
            if bounds == "lp-all" and i > 0:
                lo, up = self._tighten(lo, up, only_unstable, self.linear[i])
            self.bounds.append((lo, up))
            add_relu(self.model, self.cols, lo, up, linear=self.linear[i])
        add_affine(self.model, self.cols, self._affines[-1])
        self.n_unstable = unstable_counts(self.bounds, self.linear)
        self.build_seconds = time.perf_counter() - start - self.bound_seconds

    # -- public ----------------------------------------------------------------------------
    @property
    def n_out(self) -> int:
        return self.shapes[-1][0]

    def layer_bounds(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``(l, u)`` used in eq. (19), shaped like each ReLU layer (float64 tensors)."""
        return [
            (torch.from_numpy(lo).reshape(s), torch.from_numpy(up).reshape(s))
            for (lo, up), s in zip(self.bounds, self.shapes[1:-1], strict=True)
        ]

    def solve(self, c: Any, warm_start: bool | None = None) -> LPResult:
        """Minimise ``c^T zhat_k`` over eq. (19); ``c: (n_out,)``, finite."""
        c_np = objective_vector(c, self.n_out)
        warm = self.warm_start if warm_start is None else warm_start
        return self._solve_cols(self.cols.zhat[-1], c_np, warm)

    def solve_max(self, A: Any, b: Any) -> LPResult:
        """Minimise ``max_i (A_i zhat_k - b_i)`` over eq. (19): a free ``t`` with ``A zhat_k - t <= b``
        (:func:`~polytope.solvers.highs.add_max_rows`).  An optimal value ``> 0`` shows the conjunction
        ``A y <= b`` unreachable from the relaxation (up to HiGHS's tolerances); ``value`` is that min-max."""
        t = add_max_rows(self.model, self.cols, A, b)
        return self._solve_cols(t, np.ones(1), warm=False)

    def _solve_cols(self, cols: np.ndarray, costs: np.ndarray, warm: bool) -> LPResult:
        self.model.set_objective(cols, costs)
        status, seconds, message = self.model.run(self.time_limit, warm)
        if status not in ("optimal", "infeasible", "time_limit") and warm:
            # A warm start that went astray: retry once from scratch before reporting.
            status, more, message = self.model.run(self.time_limit, warm=False)
            seconds += more
        return self._result(status, seconds, message)

    def alpha_from_duals(self) -> list[torch.Tensor]:
        """The lower slopes that the last optimal solve's LP dual certifies, one tensor per layer.

        On an unstable unit the lower envelope ``z >= max(0, zhat)`` enters the LP as the two
        constraints ``z >= 0`` (multiplier ``mu_0``, the reduced cost of ``z``) and
        ``z >= zhat`` (``mu_1``); their combination is the single line ``z >= alpha zhat`` with
        ``alpha = mu_1 / (mu_0 + mu_1)``.  With these slopes Theorem 1's ``J`` equals the LP
        optimum (strong duality), so this is the exact maximiser that :func:`~polytope.bounds.alpha.optimize_alpha`
        approaches.  Units without active lower constraints get ``u/(u-l)``.  Shaped
        ``(1, *layer_shape)``.
        """
        sol = self.model.h.getSolution()
        col_dual = np.asarray(sol.col_dual, dtype=float)
        row_dual = np.asarray(sol.row_dual, dtype=float)
        out = []
        for (lo, up), z, unst, rows, shape, linear in zip(
            self.bounds, self.cols.z, self.cols.unstable, self.cols.lower_rows, self.shapes[1:-1], self.linear,
            strict=True,
        ):
            alpha = np.where(relu_sets(lo, up, linear)[2], up / np.where(up > lo, up - lo, 1.0), 0.0)
            mu0 = np.abs(col_dual[z])
            mu1 = np.abs(row_dual[rows])
            total = mu0 + mu1
            alpha[unst] = np.where(total > 0, mu1 / np.where(total > 0, total, 1.0), alpha[unst])
            out.append(torch.from_numpy(np.clip(alpha, 0.0, 1.0)).reshape(1, *shape))
        return out

    def solve_many(self, C: Any, warm_start: bool | None = None) -> list[LPResult]:
        """:meth:`solve` for every row of ``C: (m, n_out)``, reusing the basis between rows."""
        c_all = torch.as_tensor(C).detach().cpu().double()
        if c_all.dim() != 2 or c_all.shape[1] != self.n_out:
            raise ShapeMismatchError(f"C must be (m, {self.n_out}), got {tuple(c_all.shape)}")
        return [self.solve(row, warm_start) for row in c_all]

    # -- internals -------------------------------------------------------------------------
    def _result(self, status: str, seconds: float, message: str) -> LPResult:
        iterations = int(self.model.h.getInfo().simplex_iteration_count)
        if status != "optimal":
            return LPResult(math.nan, status, None, seconds, message, iterations=iterations)
        value = self.model.objective_value()
        z_in, z_out, layers = extract(self.model.values(), self.cols)
        return LPResult(value, status, z_out, seconds, message, value, z_in, layers, iterations)

    def _tighten(self, lower: np.ndarray, upper: np.ndarray, only_unstable: bool,
                 linear: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``min``/``max`` of each unit of the newest ``zhat`` over the current relaxation.

        The unit is an expression over the model's columns (``cols.pending``): its row is the
        objective and its offset is added back.  A bound whose LP is not solved to optimality
        keeps its (valid) dual value; an LP bound never loosens the dual one (both are valid,
        the larger lower bound wins).
        """
        start = time.perf_counter()
        lower, upper = lower.copy(), upper.copy()
        units = np.flatnonzero(relu_sets(lower, upper, linear)[2]) if only_unstable else np.arange(lower.size)
        expr = self.cols.pending
        assert expr is not None
        for j in units:
            row = expr.row(j)
            for sign in (1.0, -1.0):
                self.model.set_objective(expr.cols, sign * row)
                status, _, _ = self.model.run(self.time_limit, warm=True)
                self.bound_solves += 1
                if status != "optimal":
                    self.bound_failures += 1
                    continue
                value = sign * self.model.objective_value() + expr.offset[j]
                if sign > 0:
                    lower[j] = max(lower[j], value)
                else:
                    upper[j] = min(upper[j], value)
        self.model.set_objective(np.empty(0, dtype=np.int32), np.empty(0))
        self.bound_seconds += time.perf_counter() - start
        return lower, upper


# ---------------------------------------------------------------------------------------------
# An independent builder: cvxpy (HiGHS for LPs, Clarabel for the l2 SOCP)
# ---------------------------------------------------------------------------------------------
def dense_layer(layer, in_shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` of an affine layer as dense float64 arrays, by pushing the identity through torch."""
    n = numel(in_shape)
    with torch.no_grad():
        eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
        w = layer.linear(eye).reshape(n, -1).T.numpy().copy()
        b = layer.bias(in_shape, eye).flatten().numpy().copy()
    return w, b


class RelaxedLPCvxpy:
    """Eq. (19) written a second way, in cvxpy with dense torch-derived matrices (for testing).

    It shares nothing with :class:`RelaxedLP` but the bounds: ``"dual"`` or a list of ``(l, u)``.
    The l2 ball becomes ``||z_1 - x||_2 <= eps`` (a second-order cone program); it is solved by
    Clarabel, every other set by HiGHS, unless ``solver`` names another cvxpy solver.
    """

    def __init__(
        self, net: Network, x: Any, input_set: InputSet, bounds: BoundsSpec = "dual", solver: str | None = None
    ) -> None:
        import cvxpy as cp

        self._cp = cp
        self.net = as_float64(net)
        self.x = batch_of_one(self.net, x)
        self.shapes = self.net.shapes(tuple(self.x.shape[1:]))
        if isinstance(bounds, str):
            check_choice(bounds, ("dual",), "bounds for RelaxedLPCvxpy (or give a list of (l, u))")
            _, flat = dual_bounds(self.net, self.x, input_set)
        else:
            flat = check_bounds(bounds, self.shapes)
        self.bounds = flat
        self.solver = solver or ("CLARABEL" if isinstance(input_set, L2Ball) else "HIGHS")
        x_flat = self.x[0].flatten().numpy()
        z = cp.Variable(x_flat.size)
        cons = self._input_constraints(z, x_flat, input_set)
        self.zhat: list[Any] = []
        linear = linear_masks(self.net)
        for i, layer in enumerate(self.net.layers):
            w, b = dense_layer(layer, self.shapes[i])
            zhat = cp.Variable(w.shape[0])
            cons.append(zhat == w @ z + b)
            self.zhat.append(zhat)
            if i < len(self.net.layers) - 1:
                z = cp.Variable(w.shape[0])
                cons += self._relu_constraints(z, zhat, *flat[i], linear[i])
        self.c = cp.Parameter(self.shapes[-1][0])
        self.problem = cp.Problem(cp.Minimize(self.c @ self.zhat[-1]), cons)

    def _input_constraints(self, z, x_flat: np.ndarray, input_set: InputSet) -> list:
        cp = self._cp
        eps = float(input_set.radius(self.x)[0])
        if isinstance(input_set, L2Ball):
            return [cp.norm(z - x_flat, 2) <= eps]
        if isinstance(input_set, L1Ball):
            return [cp.norm(z - x_flat, 1) <= eps]
        if isinstance(input_set, Box):
            lo_t = input_set.lo if input_set.lo.dim() == self.x.dim() - 1 else input_set.lo[0]
            hi_t = input_set.hi if input_set.hi.dim() == self.x.dim() - 1 else input_set.hi[0]
            return [z >= lo_t.double().flatten().numpy(), z <= hi_t.double().flatten().numpy()]
        if isinstance(input_set, BoxedLinfBall):
            lo = np.maximum(x_flat - eps, input_set.lo)
            hi = np.minimum(x_flat + eps, input_set.hi)
            return [z >= lo, z <= hi]
        if isinstance(input_set, LinfBall):
            return [z >= x_flat - eps, z <= x_flat + eps]
        raise SolverError(f"no cvxpy form for input set {type(input_set).__name__}")

    @staticmethod
    def _relu_constraints(z, zhat, lower: np.ndarray, upper: np.ndarray, linear: np.ndarray | None) -> list:
        neg, pos, unst = relu_sets(lower, upper, linear)
        cons = []
        if neg.any():
            cons.append(z[np.flatnonzero(neg)] == 0)
        if pos.any():
            p = np.flatnonzero(pos)
            cons.append(z[p] == zhat[p])
        if unst.any():
            j = np.flatnonzero(unst)
            lo, up = lower[j], upper[j]
            cons += [z[j] >= 0, z[j] >= zhat[j], cp_mul(up - lo, z[j]) - cp_mul(up, zhat[j]) <= -up * lo]
        return cons

    def solve(self, c: Any) -> LPResult:
        cp = self._cp
        self.c.value = objective_vector(c, self.shapes[-1][0])
        start = time.perf_counter()
        try:
            self.problem.solve(solver=self.solver)
        except cp.error.SolverError as exc:
            return LPResult(math.nan, "error", None, time.perf_counter() - start, str(exc))
        seconds = time.perf_counter() - start
        status = {
            cp.OPTIMAL: "optimal",
            cp.INFEASIBLE: "infeasible",
            cp.UNBOUNDED: "unbounded",
            cp.OPTIMAL_INACCURATE: "inaccurate",
        }.get(self.problem.status, "error")
        if status != "optimal":
            return LPResult(math.nan, status, None, seconds, str(self.problem.status))
        value = float(self.problem.value)
        return LPResult(value, status, np.asarray(self.zhat[-1].value), seconds, "", value)


def cp_mul(coef: np.ndarray, var):
    """Elementwise ``coef * var`` for a cvxpy expression."""
    import cvxpy as cp

    return cp.multiply(coef, var)
