"""The HiGHS model builder shared by the relaxed LP (eq. 19) and the exact MILP.

:class:`HighsModel` grows a ``highspy.Highs`` instance by blocks of columns and CSR rows;
:func:`add_input`, :func:`add_affine` and :func:`add_relu` write eq. (19)'s constraints one
layer at a time, and :func:`extract` reads a primal solution back.  :class:`LPResult` is the
outcome of one solve of either, with a string ``status`` (``value`` is NaN unless optimal).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import highspy
import numpy as np
import scipy.sparse as sp
import torch

from polytope.bounds.dual import DualNetwork
from polytope.model.checks import check_objective
from polytope.model.errors import InvalidInputError, ShapeMismatchError, SolverError
from polytope.model.network import Network, Shape, numel
from polytope.model.sets import InputSet, L1Ball, L2Ball
from polytope.solvers.sparse_ops import SparseAffine

BoundsSpec = Literal["dual", "lp-all"] | Sequence[tuple[Any, Any]]
FlatBounds = list[tuple[np.ndarray, np.ndarray]]

_INF = highspy.kHighsInf

_STATUS = {
    highspy.HighsModelStatus.kOptimal: "optimal",
    highspy.HighsModelStatus.kInfeasible: "infeasible",
    highspy.HighsModelStatus.kUnbounded: "unbounded",
    highspy.HighsModelStatus.kUnboundedOrInfeasible: "infeasible_or_unbounded",
    highspy.HighsModelStatus.kTimeLimit: "time_limit",
    highspy.HighsModelStatus.kIterationLimit: "iteration_limit",
    highspy.HighsModelStatus.kObjectiveBound: "cutoff",
    highspy.HighsModelStatus.kObjectiveTarget: "target",
    highspy.HighsModelStatus.kInterrupt: "interrupted",
    highspy.HighsModelStatus.kSolutionLimit: "solution_limit",
}


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LPResult:
    """The outcome of one LP (or MILP) solve, in the manner of scipy's ``OptimizeResult``.

    ``status`` is ``"optimal"``, ``"infeasible"``, ``"unbounded"``, ``"infeasible_or_unbounded"``,
    ``"time_limit"``, ``"iteration_limit"``, ``"cutoff"`` / ``"target"`` (MILP early stops) or
    ``"error"``.  ``value`` is the optimal objective and NaN for every other status.
    ``bound`` is a proven lower bound on the objective (equal to ``value`` for an optimal LP;
    the MILP's dual bound, which survives a time limit); NaN when none is known.
    ``z_out`` (``zhat_k``), ``z_in`` (``z_1``) and ``layers`` (``(zhat_i, z_i)`` per ReLU layer,
    flattened) are the primal solution when the solver has one, else ``None``; ``z_in``, ``z_out``
    and ``z_i`` on unstable units are model columns, the rest of ``layers`` is recomputed from
    them by eq. (19)'s equalities (see :func:`extract`).  ``iterations``
    counts simplex iterations (LP) or branch-and-bound nodes (MILP).
    """

    value: float
    status: str
    z_out: np.ndarray | None
    seconds: float
    message: str = ""
    bound: float = math.nan
    z_in: np.ndarray | None = None
    layers: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None
    iterations: int = 0

    def __post_init__(self) -> None:
        """No NaN or inf under a status that claims a proof: ``optimal`` needs a finite ``value``, ``cutoff``
        a finite ``bound`` (``min >= bound``); anything else is a solver fault (:class:`SolverError`)."""
        if self.status == "optimal" and not math.isfinite(self.value):
            raise SolverError(f"the solver reported an optimum with value {self.value} ({self.message})")
        if self.status == "cutoff" and not math.isfinite(self.bound):
            raise SolverError(f"the solver reported a cutoff proof with bound {self.bound} ({self.message})")

    @property
    def success(self) -> bool:
        """``True`` when the solve ended at a proven optimum."""
        return self.status == "optimal"


def objective_vector(c: Any, n_out: int) -> np.ndarray:
    """``c`` as a float64 vector of ``n_out`` entries; :class:`ShapeMismatchError` or
    :class:`~polytope.model.errors.InvalidObjectiveError` (NaN or inf) otherwise."""
    c_np = torch.as_tensor(c).detach().cpu().double().flatten().numpy()
    if c_np.size != n_out:
        raise ShapeMismatchError(f"c must have {n_out} entries, got shape {tuple(np.shape(c))}")
    check_objective(c_np)
    return c_np


def status_name(model_status: highspy.HighsModelStatus) -> str:
    """Our status string for a HiGHS model status (anything unexpected is ``"error"``)."""
    return _STATUS.get(model_status, "error")


# ---------------------------------------------------------------------------------------------
# Preparing a network, an example and its bounds in float64
# ---------------------------------------------------------------------------------------------
def batch_of_one(net: Network, x: Any) -> torch.Tensor:
    """``x`` of shape ``(*in_shape)`` or ``(1, *in_shape)`` as a float64 CPU batch ``(1, *in_shape)``."""
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    for candidate in (t.unsqueeze(0), t):
        if candidate.dim() < 2 or candidate.shape[0] != 1:
            continue
        try:
            net.shapes(tuple(candidate.shape[1:]))
        except (ShapeMismatchError, RuntimeError):
            continue
        return candidate
    raise ShapeMismatchError(
        f"x must be one example (*in_shape) or (1, *in_shape) that fits the network, got {tuple(t.shape)}"
    )


def relu_sets(lower: np.ndarray, upper: np.ndarray,
              linear: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The masks ``I-`` (``u <= 0``), ``I+`` (``l >= 0``) and ``I`` of section 3.2, as in the dual.

    ``linear`` marks a graph's carried units (``z = zhat``, no ReLU): they join ``I+``."""
    negative = upper <= 0
    positive = (lower >= 0) & ~negative
    if linear is not None:
        negative, positive = negative & ~linear, positive | linear
    return negative, positive, ~negative & ~positive


def unstable_counts(bounds: FlatBounds, linear: Sequence[np.ndarray | None]) -> list[int]:
    """``|I|`` per ReLU layer (a graph's linear units are never unstable)."""
    return [int(relu_sets(lo, up, m)[2].sum()) for (lo, up), m in zip(bounds, linear, strict=True)]


def linear_masks(net: Network) -> list[np.ndarray | None]:
    """Per ReLU layer, the flat mask of the network's linear units (``None`` where there are none)."""
    return [None if (m := net.linear_mask(i)) is None else m.flatten().cpu().numpy()
            for i in range(len(net.layers) - 1)]


def dual_bounds(net64: Network, x64: torch.Tensor, input_set: InputSet) -> tuple[DualNetwork, FlatBounds]:
    """Algorithm 1's ``(l, u)`` per ReLU layer for a float64 batch of one, flattened to numpy."""
    with torch.no_grad():
        dual = DualNetwork(net64, x64, input_set)
        flat = [(lo[0].flatten().numpy().copy(), up[0].flatten().numpy().copy()) for lo, up in dual.bounds]
    return dual, flat


def check_bounds(bounds: Sequence[tuple[Any, Any]], shapes: Sequence[Shape]) -> FlatBounds:
    """Validate user-supplied ``(l, u)`` pairs: one per ReLU layer, right size, finite, ``l <= u``."""
    relu_shapes = list(shapes[1:-1])
    if len(bounds) != len(relu_shapes):
        raise ShapeMismatchError(f"bounds needs {len(relu_shapes)} (l, u) pairs, got {len(bounds)}")
    out = []
    for i, ((lo, up), shape) in enumerate(zip(bounds, relu_shapes, strict=True)):
        lo_np = torch.as_tensor(lo).detach().cpu().double().flatten().numpy().copy()
        up_np = torch.as_tensor(up).detach().cpu().double().flatten().numpy().copy()
        if lo_np.size != numel(shape) or up_np.size != numel(shape):
            raise ShapeMismatchError(f"bounds[{i}] must have {numel(shape)} entries (layer shape {shape})")
        if not (np.isfinite(lo_np).all() and np.isfinite(up_np).all()):
            raise InvalidInputError(f"bounds[{i}] holds NaN or inf")
        if (lo_np > up_np).any():
            bad = int(np.argmax(lo_np > up_np))
            raise InvalidInputError(
                f"bounds[{i}] has l > u (first at unit {bad}: {lo_np[bad]} > {up_np[bad]}): the relaxation is empty"
            )
        out.append((lo_np, up_np))
    return out


# ---------------------------------------------------------------------------------------------
# A thin HiGHS model: columns, CSR row blocks, objective swaps, timed runs
# ---------------------------------------------------------------------------------------------
_BANNER_SHOWN = False


def _new_highs() -> highspy.Highs:
    """A ``Highs`` instance; the first one's copyright banner (C-level stdout) is swallowed.

    HiGHS prints its banner when the first instance of a process is constructed, before any
    option can silence it, which would pollute tables and CSV written to stdout.
    """
    global _BANNER_SHOWN
    if _BANNER_SHOWN:
        return highspy.Highs()
    _BANNER_SHOWN = True
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no usable file descriptor 1: nothing to protect
        return highspy.Highs()
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class HighsModel:
    """A ``highspy.Highs`` instance grown by blocks of columns and rows."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.h = _new_highs()
        self.h.silent()
        for name, value in options.items():
            if self.h.setOptionValue(name, value) != highspy.HighsStatus.kOk:
                raise SolverError(f"HiGHS rejected option {name}={value!r}")
        self.n_cols = 0
        self.n_rows = 0
        self._cost_cols = np.empty(0, dtype=np.int32)

    def add_cols(self, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """Add ``len(lower)`` continuous columns with zero cost; return their indices."""
        n = int(lower.size)
        idx = np.arange(self.n_cols, self.n_cols + n, dtype=np.int32)
        if n:
            self._check(
                self.h.addCols(
                    n,
                    np.zeros(n),
                    np.asarray(lower, float),
                    np.asarray(upper, float),
                    0,
                    np.zeros(n, dtype=np.int32),
                    np.empty(0, dtype=np.int32),
                    np.empty(0),
                ),
                "addCols",
            )
        self.n_cols += n
        return idx

    def set_integer(self, cols: np.ndarray) -> None:
        """Mark columns as integer (binaries when their bounds are [0, 1])."""
        if cols.size:
            kinds = np.full(cols.size, int(highspy.HighsVarType.kInteger), dtype=np.uint8)
            self._check(self.h.changeColsIntegrality(cols.size, cols.astype(np.int32), kinds), "integrality")

    def add_rows(
        self, lower: np.ndarray, upper: np.ndarray, blocks: Sequence[tuple[np.ndarray, sp.spmatrix]]
    ) -> np.ndarray:
        """Add rows ``lower <= sum_b M_b x[cols_b] <= upper``; ``blocks`` are ``(cols_b, M_b)``.

        Returns the new rows' indices.
        """
        n = int(lower.size)
        idx = np.arange(self.n_rows, self.n_rows + n, dtype=np.int32)
        if not n:
            return idx
        rows, cols, vals = [], [], []
        for col_idx, mat in blocks:
            coo = sp.coo_matrix(mat)
            rows.append(coo.row)
            cols.append(col_idx[coo.col])
            vals.append(coo.data)
        csr = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, self.n_cols)
        )
        csr.sum_duplicates()
        self._check(
            self.h.addRows(
                n,
                np.asarray(lower, float),
                np.asarray(upper, float),
                int(csr.nnz),
                csr.indptr[:-1].astype(np.int32),
                csr.indices.astype(np.int32),
                csr.data.astype(float),
            ),
            "addRows",
        )
        self.n_rows += n
        return idx

    def set_objective(self, cols: np.ndarray, costs: np.ndarray) -> None:
        """Make ``costs @ x[cols]`` the (minimised) objective, clearing the previous one."""
        if self._cost_cols.size:
            zero = np.zeros(self._cost_cols.size)
            self.h.changeColsCost(self._cost_cols.size, self._cost_cols, zero)
        cols = cols.astype(np.int32)
        self.h.changeColsCost(cols.size, cols, np.asarray(costs, dtype=float))
        self._cost_cols = cols

    def run(self, time_limit: float | None, warm: bool) -> tuple[str, float, str]:
        """Solve; ``warm=False`` discards the previous basis.  Returns ``(status, seconds, message)``."""
        if not warm:
            self.h.clearSolver()
        # HiGHS's clock runs over the instance's lifetime, so the limit is set relative to it.
        limit = _INF if time_limit is None else self.h.getRunTime() + max(float(time_limit), 0.0)
        self.h.setOptionValue("time_limit", limit)
        start = time.perf_counter()
        run_status = self.h.run()
        seconds = time.perf_counter() - start
        model_status = self.h.getModelStatus()
        status = status_name(model_status)
        message = self.h.modelStatusToString(model_status)
        if run_status == highspy.HighsStatus.kError and status == "optimal":
            status, message = "error", f"HiGHS returned an error ({message})"
        return status, seconds, message

    def values(self) -> np.ndarray:
        """The primal column values of the last solve."""
        return np.asarray(self.h.getSolution().col_value, dtype=float)

    def objective_value(self) -> float:
        return float(self.h.getInfo().objective_function_value)

    def _check(self, status: highspy.HighsStatus, what: str) -> None:
        if status == highspy.HighsStatus.kError:
            raise SolverError(f"HiGHS {what} failed")


# ---------------------------------------------------------------------------------------------
# Eq. (19) as HiGHS columns and rows, one layer at a time
# ---------------------------------------------------------------------------------------------
#: An expression matrix denser than this is kept as a dense array (BLAS products, no index arithmetic).
_DENSE_FRACTION = 0.3


@dataclass(frozen=True)
class Expression:
    """Affine functions of model columns, one row per unit: ``values = weight @ matrix @ x[cols] + offset``.

    ``matrix`` is CSR or, once it is dense enough, a dense array.  ``weight`` (CSR, optional) is a
    layer's map still to be multiplied in: :meth:`rows` forms the product only for the units that
    are asked for (a unit in ``I-`` never is).  ``identity`` marks units that are model columns
    themselves (``matrix`` is the identity).
    """

    cols: np.ndarray
    matrix: sp.csr_matrix | np.ndarray
    offset: np.ndarray
    identity: bool = False
    weight: sp.csr_matrix | None = None

    def rows(self, units: np.ndarray) -> sp.csr_matrix | np.ndarray:
        """The coefficient rows of ``units`` over ``cols``."""
        if self.weight is None:
            return self.matrix[units]
        return _product(self.weight[units], self.matrix)

    def row(self, j: int) -> np.ndarray:
        """Row ``j`` as a dense vector (an objective over ``cols``)."""
        r = self.rows(np.array([j]))
        return np.asarray(r.toarray() if sp.issparse(r) else r, dtype=float).ravel()


def _compact(matrix: sp.spmatrix | np.ndarray) -> sp.csr_matrix | np.ndarray:
    """``matrix`` as CSR, or as a dense array when more than :data:`_DENSE_FRACTION` of it is non-zero."""
    if not sp.issparse(matrix):
        return np.asarray(matrix, dtype=float)
    rows, cols = matrix.shape
    if rows * cols and matrix.nnz > _DENSE_FRACTION * rows * cols:
        return matrix.toarray()
    return sp.csr_matrix(matrix)


def _product(weight: sp.csr_matrix, matrix: sp.csr_matrix | np.ndarray) -> sp.csr_matrix | np.ndarray:
    """``weight @ matrix``; a dense ``matrix`` meets a dense-enough ``weight`` as a dense array (BLAS)."""
    if sp.issparse(matrix):
        return _compact(weight @ matrix)
    return _compact(weight) @ matrix


def _identity(cols: np.ndarray) -> Expression:
    n = cols.size
    return Expression(cols, sp.identity(n, format="csr"), np.zeros(n), identity=True)


@dataclass
class NetworkColumns:
    """Column indices of the variables of eq. (19) in a :class:`HighsModel`, and how to read the rest.

    Only the input, the unstable units and the output are columns (with :func:`compose_affine`):
    a stable unit is an affine function of earlier columns (``I+``: its ``zhat``; ``I-``: 0), so
    between two layers of unstable units the network is one composed affine map.

    ``zhat[i]``: the columns of layer ``i``'s ``zhat`` -- every unit after :func:`add_affine`
    (always so for the output layer, ``zhat[-1]``), the units ``unstable[i]`` (in that order)
    after :func:`compose_affine`.  ``z[i]``: the columns of ``z_i`` on ``unstable[i]``.
    ``lower_rows[i]``: the rows ``z >= zhat`` of ``unstable[i]``; ``binaries[i]``: the MILP's
    indicator columns (empty for the LP).  ``affines``/``positive``: each layer's map and ``I+``
    mask, from which :func:`extract` rebuilds every unit's value; ``post`` is the newest layer's
    ``z`` (the input at first) and ``pending`` the newest affine map's ``zhat`` as expressions.
    """

    input: np.ndarray
    zhat: list[np.ndarray] = field(default_factory=list)
    z: list[np.ndarray] = field(default_factory=list)
    unstable: list[np.ndarray] = field(default_factory=list)
    lower_rows: list[np.ndarray] = field(default_factory=list)
    binaries: list[np.ndarray] = field(default_factory=list)
    affines: list[SparseAffine] = field(default_factory=list)
    positive: list[np.ndarray] = field(default_factory=list)
    post: Expression | None = None
    pending: Expression | None = None


def add_input(model: HighsModel, x: np.ndarray, input_set: InputSet, x64: torch.Tensor) -> NetworkColumns:
    """``z_1`` in ``S(x)``: a box for the box sets (``is_box``: l_inf, :class:`~polytope.model.sets.Box`);
    the box plus ``t >= |z_1 - x|, sum t <= eps`` for l_1."""
    if isinstance(input_set, L2Ball):
        raise SolverError(
            "the l2 ball is not polyhedral, so eq. (19) over it is a second-order cone program, not an LP: "
            "use polytope.solvers.lp.RelaxedLPCvxpy (solved by Clarabel) for l2 sets"
        )
    if not (input_set.is_box or isinstance(input_set, L1Ball)):
        raise SolverError(f"no LP form for input set {type(input_set).__name__}")
    lo, hi = input_set.box(x64)
    cols = NetworkColumns(model.add_cols(lo.flatten().numpy(), hi.flatten().numpy()))
    cols.post = _identity(cols.input)
    if isinstance(input_set, L1Ball):
        eps = float(input_set.radius(x64)[0])
        n = x.size
        t = model.add_cols(np.zeros(n), np.full(n, eps))
        eye = sp.identity(n, format="csr")
        model.add_rows(-x, np.full(n, _INF), [(t, eye), (cols.input, -eye)])  # t - z >= -x
        model.add_rows(x, np.full(n, _INF), [(t, eye), (cols.input, eye)])  # t + z >= x
        model.add_rows(np.array([-_INF]), np.array([eps]), [(t, sp.csr_matrix(np.ones((1, n))))])
    return cols


def compose_affine(cols: NetworkColumns, affine: SparseAffine) -> Expression:
    """``zhat_{i+1} = W_i z_i + b_i`` as an expression over the existing columns (no new columns or rows).

    ``z_i`` is itself an expression (its stable units are functions of earlier columns), so this
    is the product ``W_i M_i`` of the two maps; :func:`add_relu` then gives columns to the
    unstable units only.
    """
    post = cols.post
    assert post is not None, "add_input comes first"
    offset = affine.matrix @ post.offset + affine.bias
    cols.pending = Expression(post.cols, post.matrix, offset, weight=affine.matrix)
    cols.affines.append(affine)
    return cols.pending


def add_affine(model: HighsModel, cols: NetworkColumns, affine: SparseAffine) -> np.ndarray:
    """Free columns ``zhat_{i+1}`` for every unit and the equality rows ``zhat_{i+1} - W_i z_i = b_i``."""
    expr = compose_affine(cols, affine)
    zhat = _materialise(model, expr, np.arange(expr.offset.size))
    cols.pending = _identity(zhat)
    cols.zhat.append(zhat)
    return zhat


def _materialise(model: HighsModel, expr: Expression, units: np.ndarray) -> np.ndarray:
    """Columns equal to the expression's rows ``units`` (free columns and equality rows); their indices."""
    if expr.identity:
        return expr.cols[units]
    n = units.size
    new = model.add_cols(np.full(n, -_INF), np.full(n, _INF))
    offset = expr.offset[units]
    model.add_rows(offset, offset, [(new, sp.identity(n, format="csr")), (expr.cols, -expr.rows(units))])
    return new


def add_relu(
    model: HighsModel, cols: NetworkColumns, lower: np.ndarray, upper: np.ndarray, exact: bool = False,
    linear: np.ndarray | None = None,
) -> np.ndarray:
    """``z_i = ReLU(zhat_i)`` relaxed by eq. (19) on ``I`` (or exactly by big-M binaries).

    ``I-``: ``z = 0`` and ``I+``: ``z = zhat`` need no columns (they enter the next layer's
    expression); ``I`` gets columns ``zhat`` and ``z`` with ``z >= 0`` (column bound),
    ``z >= zhat`` and the upper line, written divided by ``u - l > 0`` as ``z - d zhat <= -d l``
    with ``d = u/(u-l)`` (the same half-space as eq. 19, better scaled).  With ``exact=True``
    the upper line becomes ``z <= zhat - l (1 - a)``, ``z <= u a`` with a binary ``a`` (a MILP).
    ``linear`` units (a graph's carried values) are ``z = zhat`` like ``I+``.
    Returns the columns of ``z`` on ``I``.
    """
    expr = cols.pending
    assert expr is not None, "compose_affine or add_affine comes first"
    _, positive, unstable = relu_sets(lower, upper, linear)
    unst = np.flatnonzero(unstable)
    n_u = unst.size
    zhat = _materialise(model, expr, unst)
    if not expr.identity:
        cols.zhat.append(zhat)
    z = model.add_cols(np.zeros(n_u), np.full(n_u, _INF))
    eye = sp.identity(n_u, format="csr")
    rows = model.add_rows(np.zeros(n_u), np.full(n_u, _INF), [(z, eye), (zhat, -eye)])  # z >= zhat
    l_u, u_u = lower[unst], upper[unst]
    if exact:
        a = model.add_cols(np.zeros(n_u), np.ones(n_u))
        model.set_integer(a)
        # z - zhat - l a <= -l   (a = 0: z <= zhat - l is slack; a = 1: z <= zhat)
        model.add_rows(np.full(n_u, -_INF), -l_u, [(z, eye), (zhat, -eye), (a, -sp.diags(l_u))])
        # z - u a <= 0           (a = 0: z = 0; a = 1: z <= u)
        model.add_rows(np.full(n_u, -_INF), np.zeros(n_u), [(z, eye), (a, -sp.diags(u_u))])
    else:
        a = np.empty(0, dtype=np.int32)
        d = u_u / (u_u - l_u)
        model.add_rows(np.full(n_u, -_INF), -d * l_u, [(z, eye), (zhat, -sp.diags(d))])
    cols.z.append(z)
    cols.unstable.append(unst)
    cols.lower_rows.append(rows)
    cols.binaries.append(a)
    cols.positive.append(positive)
    cols.post = _relu_expression(expr, positive, unst, z)
    cols.pending = None
    return z


def _relu_expression(expr: Expression, positive: np.ndarray, unst: np.ndarray, z: np.ndarray) -> Expression:
    """``z_i`` as an expression: ``zhat``'s rows on ``I+``, 0 on ``I-``, the new columns ``z`` on ``I``."""
    n = positive.size
    pos = np.flatnonzero(positive)
    on_pos = expr.rows(pos)
    on_z = sp.csr_matrix((np.ones(unst.size), (unst, np.arange(unst.size))), shape=(n, unst.size))
    if sp.issparse(on_pos):
        place = sp.csr_matrix((np.ones(pos.size), (pos, np.arange(pos.size))), shape=(n, pos.size))
        matrix = _compact(sp.hstack([place @ on_pos, on_z], format="csr"))
    else:
        matrix = np.zeros((n, expr.cols.size + unst.size))
        matrix[pos, : expr.cols.size] = on_pos
        matrix[unst, expr.cols.size + np.arange(unst.size)] = 1.0
    return Expression(np.concatenate([expr.cols, z]), matrix, np.where(positive, expr.offset, 0.0))


def add_max_rows(model: HighsModel, cols: NetworkColumns, A: Any, b: Any) -> np.ndarray:
    """A free column ``t`` and the rows ``A zhat_k - t <= b`` on the output columns ``cols.zhat[-1]``.

    Minimising ``t`` then gives ``min max_i (A_i zhat_k - b_i)`` over the model (the joint objective of a
    conjunction ``A y <= b``).  ``t`` is free and enters no other row, so the rows leave every other
    objective's optimum unchanged.  Returns ``t``'s index (one element).
    """
    out = cols.zhat[-1]
    A_np = np.atleast_2d(torch.as_tensor(A).detach().cpu().double().numpy())
    b_np = torch.as_tensor(b).detach().cpu().double().flatten().numpy()
    if A_np.ndim != 2 or A_np.shape[1] != out.size or A_np.shape[0] != b_np.size or b_np.size == 0:
        raise ShapeMismatchError(f"A must be (k, {out.size}) and b (k,) with k >= 1, got {A_np.shape} and {b_np.shape}")
    check_objective(A_np, "A")
    check_objective(b_np, "b")
    t = model.add_cols(np.array([-_INF]), np.array([_INF]))
    k = b_np.size
    model.add_rows(np.full(k, -_INF), b_np, [(out, sp.csr_matrix(A_np)), (t, sp.csr_matrix(-np.ones((k, 1))))])
    return t


def extract(values: np.ndarray, cols: NetworkColumns) -> tuple[np.ndarray, np.ndarray, tuple]:
    """``(z_in, z_out, ((zhat_i, z_i), ...))`` from a vector of column values.

    ``z_in`` and ``z_out`` are columns; every layer's ``zhat_i`` and ``z_i`` is recomputed by the
    forward pass of eq. (19)'s equalities, with ``z_i`` read from its columns on ``I``.
    """
    z = values[cols.input]
    layers = []
    for affine, positive, unst, z_cols in zip(cols.affines, cols.positive, cols.unstable, cols.z, strict=False):
        zhat = affine(z)
        z = np.where(positive, zhat, 0.0)
        z[unst] = values[z_cols]
        layers.append((zhat, z))
    return values[cols.input], values[cols.zhat[-1]], tuple(layers)


#: HiGHS memory per constraint non-zero of an eq. (19) model, with a 2x margin: measured on the
#: released MNIST model (about 0.6 M non-zeros; 28 MB to build it, 81 MB after a 20 s MIP).
BYTES_PER_NONZERO = 260


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(affines: Sequence[SparseAffine], what: str, memory_limit: int | None) -> None:
    """Refuse (:class:`SolverError`) a model whose estimated memory exceeds ``memory_limit``
    (default: the memory available now) before anything is allocated for it."""
    nonzeros = sum(int(a.matrix.nnz) + 4 * a.matrix.shape[0] for a in affines)  # + identity and ReLU rows
    need = BYTES_PER_NONZERO * nonzeros
    limit = available_memory() if memory_limit is None else memory_limit
    if limit is not None and need > limit:
        raise SolverError(
            f"the {what} for one example would need about {need / 2**30:.2f} GiB ({nonzeros:,} constraint "
            f"non-zeros), more than the {limit / 2**30:.2f} GiB available; use a machine with more memory "
            "or a smaller network (memory_limit= sets the budget)"
        )


def solver_options(
    primal_feasibility_tolerance: float, dual_feasibility_tolerance: float, extra: dict[str, Any] | None
) -> dict[str, Any]:
    """HiGHS options shared by the LP and the MILP."""
    options: dict[str, Any] = {
        "primal_feasibility_tolerance": primal_feasibility_tolerance,
        "dual_feasibility_tolerance": dual_feasibility_tolerance,
    }
    options.update(extra or {})
    return options
