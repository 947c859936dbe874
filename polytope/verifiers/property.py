"""Decide a VNN-LIB property: ``pt.verify(net, prop) -> VerifyResult``.

A property (:class:`polytope.io.vnnlib.Property`, or anything with the same ``cases``) is violated --
``sat`` -- when some case has a point ``x`` of its box ``[lo, hi]`` with ``A f(x) <= b`` for every row of
one of its conjunctions ``(A, b)``.  Each conjunction is attacked first (PGD in the box on
``max_i (A_i f(x) - b_i)``), then climbed through the proofs, cheapest first: the per-row dual bounds
with fixed and adaptive slopes, :func:`~polytope.bounds.conjunction.conjunction_bound` (``lambda`` and
the slopes optimised), the relaxed LP, branch and bound (:func:`~polytope.verifiers.bab.verify_bab`, for
one-row conjunctions: input splitting on few inputs, ReLU splitting otherwise) and the exact MILP
(:meth:`~polytope.solvers.milp.ExactMILP.solve_max`), each with the time left.

Float policy: everything runs in float64 (the network is converted with
:func:`~polytope.model.network.as_float64`), whatever the network's dtype; a bound proves a conjunction
unreachable only when it clears a margin above 0: for the dual bounds the float64 rounding band
``ROUNDING_SAFETY * eps64 * (max_i ||A_i||_1 a_L + max |b|)`` (``a_L`` the magnitude bound of
:mod:`polytope.bounds.precision`), for the LP and the MILP ``SOLVER_MARGIN`` times ``1 + `` the size of
``A f - b`` at the box centre (their values are trusted only up to HiGHS's tolerances); never from a NaN
or a non-optimal status.  A property touched at its boundary (``min max = 0``, e.g. ``y >= 1.5`` where
``f`` reaches exactly 1.5) is so never ``unsat``.

When ``onnx_path`` is given, the imported network is first compared with onnxruntime at the centre of
every box; a disagreement (an import bug) stops with :class:`~polytope.model.errors.ModelFileError`.

A counterexample is reported only after it is checked: its coordinates are rounded to values of the
network's input dtype that lie inside ``[lo, hi]``, and ``A y <= b`` must hold for every row (no
tolerance) in a float64 forward pass and, when ``onnx_path`` is given, in an onnxruntime run of the
original file (VNN-COMP replays counterexamples with onnxruntime and accepts them within an absolute
1e-4 of the box and the output constraints, see its ``SCORING/counterexamples.py``; ours holds with
tolerance 0).  A candidate that passes in float64 but not in onnxruntime is pushed deeper into the
unsafe region by a few more PGD steps; if it still fails the answer is ``unknown``, never ``sat``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from polytope.bounds.conjunction import conjunction_bound
from polytope.bounds.dual import DualNetwork
from polytope.bounds.precision import ROUNDING_SAFETY, magnitude_bound
from polytope.model.errors import ModelFileError, PropertyMismatchError, ShapeMismatchError, SolverError
from polytope.model.files import read_bytes
from polytope.model.network import Network, as_float64, numel
from polytope.model.sets import Box
from polytope.verifiers.attacks import pgd_in_set

Status = Literal["unsat", "sat", "unknown", "timeout"]

#: An LP or MILP value proves a conjunction unreachable only above this (HiGHS's tolerances are 1e-9).
SOLVER_MARGIN = 1e-6


@dataclass(frozen=True)
class Counterexample:
    """A checked violation: ``x`` (flat, in the property's ``X`` order, values of the network's input
    dtype) and ``y`` (the outputs, from onnxruntime when the file was replayed, else float64)."""

    x: np.ndarray
    y: np.ndarray
    case: int
    conjunction: int


@dataclass
class ConjunctionResult:
    """How one conjunction ``(A, b)`` of case ``case`` was decided: ``status``, the deciding ``method``
    and its ``bound`` (a lower bound on ``min max_i (A_i f - b_i)``, NaN when none)."""

    case: int
    conjunction: int
    status: Status = "unknown"
    method: str = ""
    bound: float = math.nan
    seconds: float = 0.0


@dataclass
class VerifyResult:
    """``status``: ``"unsat"`` (every conjunction of every case proven unreachable), ``"sat"`` (with a
    checked :class:`Counterexample`), ``"unknown"`` or ``"timeout"``; ``method``: the deciding method
    (for ``unsat``, the strongest one any conjunction needed); ``details``: one entry per conjunction tried."""

    status: Status
    counterexample: Counterexample | None
    seconds: float
    method: str
    details: list[ConjunctionResult] = field(default_factory=list)


_LADDER = ("dual", "attack", "adaptive", "optimized", "lp", "bab", "milp")


class _Deadline:
    def __init__(self, timeout: float | None) -> None:
        self.end = math.inf if timeout is None else time.perf_counter() + float(timeout)

    def left(self) -> float:
        return self.end - time.perf_counter()

    def passed(self) -> bool:
        return self.left() <= 0


class _Replay:
    """onnxruntime on the original file: input name, shape and dtype read from the session."""

    def __init__(self, onnx_bytes: bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.name = inp.name
        self.shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        self.dtype = np.float64 if inp.type == "tensor(double)" else np.float32

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.name: x.astype(self.dtype).reshape(self.shape)})[0]
        return np.asarray(out, dtype=np.float64).reshape(-1)


def _in_dtype(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, dtype: type) -> np.ndarray | None:
    """``x`` rounded to ``dtype`` values inside ``[lo, hi]`` (one step inwards where rounding left it), as
    float64; ``None`` when a coordinate has no such value."""
    r = np.clip(x, lo, hi).astype(dtype)
    r = np.where(r.astype(np.float64) < lo, np.nextafter(r, dtype(np.inf)), r)
    r = np.where(r.astype(np.float64) > hi, np.nextafter(r, dtype(-np.inf)), r)
    r64 = r.astype(np.float64)
    if bool(((r64 < lo) | (r64 > hi)).any()):
        return None
    return r64


class _Conjunction:
    """One case's box and one conjunction, with the float64 network: the attack, the checks and the ladder."""

    def __init__(self, net64: Network, in_shape: tuple[int, ...], lo: np.ndarray, hi: np.ndarray,
                 A: np.ndarray, b: np.ndarray, replay: _Replay | None, dtype: type) -> None:
        self.net64, self.in_shape = net64, in_shape
        self.lo, self.hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        self.box = Box(torch.from_numpy(self.lo).reshape(in_shape), torch.from_numpy(self.hi).reshape(in_shape))
        self.x = self.box.centre()
        self.A = torch.as_tensor(np.asarray(A, np.float64))
        self.b = torch.as_tensor(np.asarray(b, np.float64))
        self.replay, self.dtype = replay, dtype
        with torch.no_grad():
            a_l = float(magnitude_bound(net64, self.x, self.box)[0])
            at_centre = float((net64.forward(self.x)[0] @ self.A.T - self.b).abs().max())
        scale = float(self.A.abs().sum(1).max()) * a_l + float(self.b.abs().max())
        self.dual_margin = ROUNDING_SAFETY * float(np.finfo(np.float64).eps) * scale
        self.solver_margin = SOLVER_MARGIN * (1.0 + at_centre)

    def objective(self, z: torch.Tensor) -> torch.Tensor:
        """``max_i (A_i f(z) - b_i)`` per point of a batch ``z``."""
        return (self.net64.forward(z) @ self.A.T - self.b).amax(1)

    def attack(self, steps: int, restarts: int, start: np.ndarray | None = None,
               deepen: bool = True) -> Counterexample | None:
        """PGD in the box on the objective (as the cross-entropy of logits ``(0, -objective)`` for label 0),
        from ``start`` (else the centre) and random restarts; the best point is checked."""
        x0 = self.x if start is None else torch.from_numpy(start).reshape(1, *self.in_shape)

        def logits(z: torch.Tensor) -> torch.Tensor:
            s = -self.objective(z)
            return torch.stack([torch.zeros_like(s), s], 1)

        step = max(float(self.box.radius(x0).max()) / 8, 1e-12)
        candidates = [x0]
        if step > 1e-12:
            candidates.append(pgd_in_set(logits, x0, torch.zeros(1, dtype=torch.long), self.box, steps=steps,
                                         step_size=step, restarts=restarts,
                                         generator=torch.Generator().manual_seed(0)))
        with torch.no_grad():
            pts = torch.cat(candidates)
            best = pts[int(self.objective(pts).argmin())]
        return self.check(best.flatten().numpy(), deepen)

    def check(self, point: np.ndarray, deepen: bool = True) -> Counterexample | None:
        """A :class:`Counterexample` at ``point`` if it replays (module docstring), else ``None``."""
        x = _in_dtype(np.asarray(point, np.float64).reshape(-1), self.lo, self.hi, self.dtype)
        if x is None:
            return None
        A, b = self.A.numpy(), self.b.numpy()
        with torch.no_grad():
            y64 = self.net64.forward(torch.from_numpy(x).reshape(1, *self.in_shape))[0].numpy()
        if not bool(np.all(A @ y64 <= b)):
            return None
        y = y64
        if self.replay is not None:
            y = self.replay(x)
            if not (np.isfinite(y).all() and bool(np.all(A @ y <= b))):
                # deeper into the unsafe region: a few more PGD steps from this point, checked again
                return self.attack(50, 1, x, deepen=False) if deepen else None
        return Counterexample(x, y, -1, -1)

    def prove(self, method: str, deadline: _Deadline, milp_max_unstable: int) -> tuple[str, float, Any]:
        """One rung: ``("unsat" | "unknown" | "timeout" | "sat", bound, counterexample or None)``."""
        if method == "optimized":
            bound = float(conjunction_bound(self.net64, self.x, self.box, self.A, self.b).detach()[0])
            return ("unsat" if bound > self.dual_margin else "unknown"), bound, None
        if method == "lp":
            from polytope.solvers.lp import RelaxedLP  # the solvers (scipy, highspy) load only when needed

            res = RelaxedLP(self.net64, self.x, self.box, time_limit=max(deadline.left(), 0.01)).solve_max(
                self.A, self.b)
            if res.status == "time_limit":
                return "timeout", math.nan, None
            ok = res.status == "optimal" and res.value > self.solver_margin
            return ("unsat" if ok else "unknown"), res.value, None
        if method == "bab":
            return self._bab(deadline)
        return self._milp(deadline, milp_max_unstable)

    def _bab(self, deadline: _Deadline) -> tuple[str, float, Any]:
        """Branch and bound (:func:`polytope.verifiers.bab.verify_bab`) on a one-row conjunction ``a^T y <= b``.

        The network gets the head ``y -> (a^T y - b - margin, 0)``: class 0 beats class 1 everywhere exactly
        when ``a^T f(x) - b > margin`` on the box (unreachable, clearing the dual rounding margin), and a point
        where it does not is a candidate, replayed like every other.  Conjunctions of several rows are left to
        the MILP (``max_i`` is not one margin).
        """
        if self.A.shape[0] != 1 or deadline.left() <= 0.05:
            return "unknown", math.nan, None
        from torch import nn

        from polytope.verifiers.bab import BaBOptions, verify_bab

        head = nn.Linear(self.A.shape[1], 2).to(torch.float64)
        with torch.no_grad():
            head.weight.zero_()
            head.weight[0] = self.A[0]
            head.bias.copy_(torch.tensor([-float(self.b[0]) - self.dual_margin, 0.0], dtype=torch.float64))
        for p in head.parameters():
            p.requires_grad_(False)
        net = self.net64.with_head(head)
        res = verify_bab(net, self.x, 0, self.box, [1], BaBOptions(time_limit=max(deadline.left(), 0.05)))
        if res.status == "certified":
            return "unsat", res.bound + self.dual_margin, None
        if res.status == "not_robust" and res.counterexample is not None:
            cex = self.check(np.asarray(res.counterexample, np.float64))
            if cex is not None:
                return "sat", math.nan, cex
        return ("timeout" if res.status == "timeout" or deadline.passed() else "unknown"), res.bound, None

    def _milp(self, deadline: _Deadline, max_unstable: int) -> tuple[str, float, Any]:
        from polytope.solvers.milp import ExactMILP

        try:
            milp = ExactMILP(self.net64, self.x, self.box, time_limit=max(deadline.left(), 0.01),
                             max_unstable=max_unstable)
        except SolverError:
            return "unknown", math.nan, None
        milp.time_limit = max(deadline.left(), 0.01)
        res = milp.solve_max(self.A, self.b, cutoff=self.solver_margin)
        if res.status == "cutoff" and res.bound >= self.solver_margin:
            return "unsat", res.bound, None
        if res.status == "target" and not deadline.passed():
            # the first point below the cutoff may sit in (0, margin]: ask for one a margin deep instead
            milp.time_limit = max(deadline.left(), 0.01)
            deeper = milp.solve_max(self.A, self.b, cutoff=-self.solver_margin)
            res = deeper if deeper.z_in is not None else res
        if res.z_in is not None:
            cex = self.check(res.z_in) or self.attack(50, 1, np.asarray(res.z_in, np.float64), deepen=False)
            if cex is not None:
                return "sat", math.nan, cex
        return ("timeout" if res.status == "time_limit" or deadline.passed() else "unknown"), res.bound, None


def _case_row_bounds(jobs: list[_Conjunction], slopes: str) -> list[float]:
    """``max_i (J(A_i) - b_i)`` of every conjunction of one case from one dual network (all rows at once)."""
    first = jobs[0]
    A = torch.cat([j.A for j in jobs])
    b = torch.cat([j.b for j in jobs])
    with torch.no_grad():
        values = (DualNetwork(first.net64, first.x, first.box, slopes=slopes).objective(A.unsqueeze(0))[0] - b)
    out, start = [], 0
    for j in jobs:
        out.append(float(values[start:start + j.A.shape[0]].max()))
        start += j.A.shape[0]
    return out


def _case_attack(jobs: list[_Conjunction], steps: int, restarts: int) -> tuple[int, Counterexample] | None:
    """PGD on every conjunction of one case at once (one batch row per conjunction, the same box; rows of
    shorter conjunctions padded with ``0 <= big``, which never decides the max); the first that replays."""
    n, k = len(jobs), max(j.A.shape[0] for j in jobs)
    big = 1e6 * (1.0 + max(float(j.b.abs().max()) for j in jobs))
    A = torch.zeros(n, k, jobs[0].A.shape[1], dtype=torch.float64)
    b = torch.full((n, k), big, dtype=torch.float64)  # a padded row is 0 - big: never the max
    for r, j in enumerate(jobs):
        A[r, : j.A.shape[0]], b[r, : j.A.shape[0]] = j.A, j.b
    net64, first = jobs[0].net64, jobs[0]
    x0 = first.x.expand(n, *first.x.shape[1:]).clone()
    box = Box(first.box.lo.expand(n, *first.box.lo.shape), first.box.hi.expand(n, *first.box.hi.shape), batched=True)

    def objective(z: torch.Tensor) -> torch.Tensor:
        return (torch.einsum("bko,bo->bk", A, net64.forward(z)) - b).amax(1)

    def logits(z: torch.Tensor) -> torch.Tensor:  # cross-entropy of label 0 grows as the objective falls
        s = -objective(z)
        return torch.stack([torch.zeros_like(s), s], 1)

    step = float(box.radius(x0).max()) / 8
    points = x0
    if step > 0:
        points = pgd_in_set(logits, x0, torch.zeros(n, dtype=torch.long), box, steps=steps, step_size=step,
                            restarts=restarts, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        order = torch.argsort(objective(points)).tolist()
    for r in order:
        cex = jobs[r].check(points[r].flatten().numpy())
        if cex is not None:
            return r, cex
    return None


#: How far the imported network may differ from onnxruntime at a box centre (float32 against float64).
IMPORT_RTOL, IMPORT_ATOL = 1e-3, 1e-4


def _check_import(net64: Network, replay: _Replay, prop: Any, shape: tuple[int, ...]) -> None:
    """The imported network against onnxruntime at the centre of every box (:class:`ModelFileError` if not)."""
    for ci, case in enumerate(prop.cases):
        x = _in_dtype((np.asarray(case.lo, np.float64) + np.asarray(case.hi, np.float64)) / 2, case.lo, case.hi,
                      replay.dtype)
        if x is None:
            continue
        with torch.no_grad():
            ours = net64.forward(torch.from_numpy(x).reshape(1, *shape))[0].numpy()
        theirs = replay(x)
        if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=IMPORT_RTOL, atol=IMPORT_ATOL):
            worst = float(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else math.inf
            raise ModelFileError(f"the imported network differs from onnxruntime at the centre of box {ci} "
                                 f"(largest difference {worst:.3g}): refusing to verify it")


def _input_shape(net: Network, n_inputs: int, candidates: Sequence[tuple[int, ...] | None]) -> tuple[int, ...]:
    for shape in candidates:
        if shape is None or numel(shape) != n_inputs:
            continue
        squeezed = tuple(shape)
        while True:
            try:
                net.shapes(squeezed)
                return squeezed
            except (ShapeMismatchError, RuntimeError, ValueError):
                if len(squeezed) > 1 and squeezed[0] == 1:
                    squeezed = squeezed[1:]
                    continue
                break
    raise PropertyMismatchError(f"the property has {n_inputs} inputs, which do not fit the network's input")


def check_property(net: Network, prop: Any, in_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The network's per-example input shape for ``prop``; :class:`PropertyMismatchError` when the input or
    output counts differ or a case has no output constraint."""
    shape = _input_shape(net, int(prop.n_inputs), [in_shape, tuple(prop.input_shape), (int(prop.n_inputs),)])
    n_out = numel(net.shapes(shape)[-1])
    if n_out != int(prop.n_outputs):
        raise PropertyMismatchError(f"the property has {prop.n_outputs} outputs Y but the network has {n_out}")
    if not prop.cases or any(not case.unsafe for case in prop.cases):
        raise PropertyMismatchError("the property has no output constraint")
    return shape


def verify(
    net: Network,
    prop: Any,
    timeout: float | None = 60.0,
    onnx_path: str | Path | None = None,
    in_shape: tuple[int, ...] | None = None,
    attack_steps: int = 50,
    attack_restarts: int = 3,
    milp_max_unstable: int = 2000,
    log: Callable[[str], None] | None = None,
) -> VerifyResult:
    """Decide ``prop`` on ``net`` (module docstring): ``"sat"`` with a replayed counterexample, ``"unsat"``
    when every conjunction of every case is proven unreachable in float64, else ``"unknown"`` or
    ``"timeout"`` (``timeout`` seconds, ``None`` for none).

    ``onnx_path``: the original ONNX file, replayed in onnxruntime before any ``sat``.  ``in_shape``: the
    network's per-example input shape (default: the property's declared shape, else flat).  Float policy:
    float64 throughout (``docs/float_policy.md``).
    """
    start = time.perf_counter()
    deadline = _Deadline(timeout)
    shape = check_property(net, prop, in_shape)
    net64 = as_float64(net)
    replay = _Replay(read_bytes(onnx_path)) if onnx_path is not None else None
    dtype = replay.dtype if replay is not None else np.float64
    say = log or (lambda _msg: None)
    jobs = [(ci, ji, _Conjunction(net64, shape, case.lo, case.hi, hs.A, hs.b, replay, dtype))
            for ci, case in enumerate(prop.cases) for ji, hs in enumerate(case.unsafe)]
    details = [ConjunctionResult(ci, ji) for ci, ji, _ in jobs]
    if replay is not None:
        _check_import(net64, replay, prop, shape)

    def finish(status: Status, method: str, cex: Counterexample | None = None) -> VerifyResult:
        return VerifyResult(status, cex, time.perf_counter() - start, method, details)

    for ci in range(len(prop.cases)):  # cheapest first, each case's conjunctions together
        for method in ("dual", "attack", "adaptive"):
            members = [(r, job) for r, (c, _, job) in enumerate(jobs) if c == ci and details[r].status == "unknown"]
            if not members:
                break
            if deadline.passed():
                return finish("timeout", method)
            t0 = time.perf_counter()
            if method == "attack":
                found = _case_attack([job for _, job in members], attack_steps, attack_restarts)
                if found is not None:
                    r = members[found[0]][0]
                    details[r].status, details[r].method = "sat", "attack"
                    return finish("sat", "attack", Counterexample(found[1].x, found[1].y, ci, jobs[r][1]))
                continue
            bounds = _case_row_bounds([job for _, job in members], "fixed" if method == "dual" else "adaptive")
            for (r, job), bound in zip(members, bounds, strict=True):
                d = details[r]
                proven = bound > job.dual_margin
                d.bound = bound if math.isnan(d.bound) or bound > d.bound else d.bound
                d.seconds += (time.perf_counter() - t0) / len(members)
                say(f"case {ci} conjunction {d.conjunction}: {method} -> {'unsat' if proven else 'open'} "
                    f"(bound {bound:.6g})")
                if proven:
                    d.status, d.method = "unsat", method
    strongest, undecided = max([_LADDER.index(d.method) for d in details if d.status == "unsat"], default=0), False
    for (ci, ji, job), d in zip(jobs, details, strict=True):
        if d.status == "unsat":
            continue
        for rung, method in enumerate(_LADDER[3:], start=3):
            if deadline.passed():
                d.status = "timeout"
                return finish("timeout", method)
            t0 = time.perf_counter()
            status, bound, cex = job.prove(method, deadline, milp_max_unstable)
            d.seconds += time.perf_counter() - t0
            d.bound = bound if math.isnan(d.bound) or bound > d.bound else d.bound
            say(f"case {ci} conjunction {ji}: {method} -> {status} (bound {bound:.6g})")
            if status == "sat":
                d.status, d.method = "sat", method
                return finish("sat", method, Counterexample(cex.x, cex.y, ci, ji))
            if status == "unsat":
                d.status, d.method = "unsat", method
                strongest = max(strongest, rung)
                break
            if status == "timeout":
                d.status = "timeout"
                return finish("timeout", method)
        undecided |= d.status != "unsat"  # another conjunction may still give a counterexample
    return finish("unknown", "") if undecided else finish("unsat", _LADDER[strongest])
