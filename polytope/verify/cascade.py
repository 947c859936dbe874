"""The tightness ladder as a cascade: each example climbs only while it is undecided.

Rungs, cheapest first: ``attack`` (PGD; a hit, checked by a float64 forward pass, is a
counterexample), ``dual`` (the paper's bound), ``adaptive``, ``optimized`` (all layers'
slopes), ``lp`` (eq. 19 with the dual's layer bounds), ``lp-all`` (LP-tightened layer bounds)
and ``milp`` (exact, big-M with HiGHS, stopped at the threshold 0).  A target ``j`` proven
(``f_y - f_j > 0`` over the ball) on one rung stays proven; an example is ``certified`` when
all its targets are, ``not_robust`` when a verified counterexample exists, and otherwise
``timeout``/``undecided`` -- never guessed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from polytope.bounds.dual import DualNetwork
from polytope.bounds.slopes import optimize_slopes
from polytope.model.errors import PolytopeError, SolverError
from polytope.model.network import Network
from polytope.model.sets import InputSet
from polytope.model.specs import margin_objective, worst_of
from polytope.solvers.highs import FlatBounds, as_float64
from polytope.solvers.lp import RelaxedLP
from polytope.solvers.milp import ExactMILP
from polytope.verify.attacks import pgd

RUNGS = ("attack", "dual", "adaptive", "optimized", "lp", "lp-all", "milp")


class CounterexampleError(PolytopeError, RuntimeError):
    """A counterexample from an attack or the MILP that a float64 forward pass does not confirm."""


@dataclass
class Verdict:
    """The outcome for one example: ``verdict``, the deciding ``rung`` and per-rung records."""

    index: int
    label: int
    verdict: str = "undecided"
    rung: str = ""
    margins: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    counterexample: np.ndarray | None = None

    def row(self) -> dict[str, Any]:
        """A flat table row: verdict, rung, each rung's worst-margin lower bound and seconds."""
        out: dict[str, Any] = {"index": self.index, "label": self.label, "verdict": self.verdict,
                               "rung": self.rung, "status": self.verdict}
        for rung in RUNGS:
            out[f"{rung}_margin"] = self.margins.get(rung, math.nan)
            out[f"{rung}_seconds"] = self.seconds.get(rung, 0.0)
        out["seconds"] = sum(self.seconds.values())
        return out


def _margin64(net64: Network, point: torch.Tensor, label: int) -> float:
    """``f_y - max_{j != y} f_j`` at ``point`` in float64 (<= 0: misclassified or tied)."""
    with torch.no_grad():
        f = net64.forward(point.reshape(1, *point.shape).double())[0]
    others = torch.cat([f[:label], f[label + 1:]])
    return float(f[label] - others.max())


def verified_point(net64: Network, x: torch.Tensor, point: torch.Tensor, label: int,
                    input_set: InputSet, index: int, tol: float = 1e-6) -> np.ndarray | None:
    """``point`` clamped into the set in float64 when it is misclassified there (margin ``<= 0``).

    Returns ``None`` when the clamped point is not misclassified (a borderline attack); raises
    :class:`CounterexampleError` when ``point`` lies farther than ``tol`` outside the set or is far
    from misclassified (a solver's point that does not reproduce is a bug, never a verdict).
    """
    lo, hi = input_set.box(x.reshape(1, *x.shape).double())
    p = point.detach().cpu().double().reshape(lo[0].shape)
    if not bool(((p >= lo[0] - tol) & (p <= hi[0] + tol)).all()):
        raise CounterexampleError(f"example {index}: the counterexample leaves the input set")
    p = torch.minimum(torch.maximum(p, lo[0]), hi[0])
    margin = _margin64(net64, p, label)
    if margin > 1e-6:
        raise CounterexampleError(f"example {index}: counterexample has margin {margin:.3g} > 0 in float64")
    return p.numpy() if margin <= 0 else None


@dataclass
class Cascade:
    """Decide examples by climbing :data:`RUNGS` (a subset may be chosen, order kept)."""

    net: Network
    input_set: InputSet
    rungs: tuple[str, ...] = RUNGS
    time_limit: float | None = 60.0
    optimize_steps: int = 20
    milp_max_unstable: int = 2000
    attack_steps: int = 100
    milp_attack_restarts: int = 10
    milp_attack_min_unstable: int = 32

    def __post_init__(self) -> None:
        unknown = [r for r in self.rungs if r not in RUNGS]
        if unknown:
            raise ValueError(f"unknown rungs {unknown}; choose from {RUNGS}")
        self.net64 = as_float64(self.net)

    def run(self, x: torch.Tensor, y: torch.Tensor, indices: list[int]) -> list[Verdict]:
        """Verdicts for a batch ``x: (B, *in_shape)`` with labels ``y`` and dataset ``indices``."""
        verdicts = [Verdict(i, int(lab)) for i, lab in zip(indices, y.tolist(), strict=True)]
        n_out = self.net.shapes(tuple(x.shape[1:]))[-1][0]
        proven = torch.zeros(len(x), n_out, dtype=torch.bool)
        proven[torch.arange(len(x)), y.cpu()] = True
        self._clean(x, y, verdicts)
        tightened: dict[int, FlatBounds] = {}  # example -> its LP-all layer bounds, reused by the MILP
        for rung in self.rungs:
            open_ = [k for k, v in enumerate(verdicts) if v.verdict == "undecided"]
            if not open_:
                break
            if rung == "attack":
                self._attack(x, y, verdicts, open_)
            elif rung in ("dual", "adaptive", "optimized"):
                self._dual(rung, x, y, verdicts, open_, proven)
            else:
                for k in open_:
                    self._solver(rung, x[k], int(y[k]), verdicts[k], proven[k], tightened.setdefault(k, []))
        return verdicts

    def _clean(self, x: torch.Tensor, y: torch.Tensor, verdicts: list[Verdict]) -> None:
        for k, v in enumerate(verdicts):
            if _margin64(self.net64, x[k], v.label) <= 0:
                v.verdict, v.rung, v.counterexample = "not_robust", "clean", x[k].detach().cpu().double().numpy()

    def _attack(self, x: torch.Tensor, y: torch.Tensor, verdicts: list[Verdict], open_: list[int]) -> None:
        t0 = time.perf_counter()
        idx = torch.tensor(open_)
        eps = self.input_set.radius(x[idx])
        lo, hi = self.input_set.box(x[idx])
        step = float(eps.max()) / 4 if float(eps.max()) > 0 else 1e-3
        x_adv = pgd(self.net.forward, x[idx], y[idx], eps, steps=self.attack_steps, step_size=step)
        x_adv = torch.minimum(torch.maximum(x_adv, lo), hi)
        seconds = (time.perf_counter() - t0) / len(open_)
        for j, k in enumerate(open_):
            v = verdicts[k]
            v.seconds["attack"] = seconds
            v.margins["attack"] = _margin64(self.net64, x_adv[j], v.label)
            if v.margins["attack"] <= 0:
                point = verified_point(self.net64, x[k], x_adv[j], v.label, self.input_set, v.index)
                if point is not None:
                    v.verdict, v.rung, v.counterexample = "not_robust", "attack", point

    def _dual(self, rung: str, x: torch.Tensor, y: torch.Tensor, verdicts: list[Verdict], open_: list[int],
              proven: torch.Tensor) -> None:
        t0 = time.perf_counter()
        idx = torch.tensor(open_)
        xb, yb = x[idx], y[idx]
        c = margin_objective(yb, proven.shape[1], x.dtype)
        if rung == "optimized":
            # targets proven on an earlier rung drop out of the objective (a zero row: J = 0)
            c = c * (~proven[idx]).to(c.dtype).unsqueeze(2).to(c.device)
            margins, _ = optimize_slopes(self.net, xb, self.input_set, c, steps=self.optimize_steps,
                                         until_positive=True)
            margins = torch.where(proven[idx].to(margins.device), torch.inf, margins)  # as the solver rungs
        else:
            with torch.no_grad():
                slopes = "fixed" if rung == "dual" else "adaptive"
                margins = DualNetwork(self.net, xb, self.input_set, slopes=slopes).objective(c)
        margins = margins.detach().cpu()
        seconds = (time.perf_counter() - t0) / len(open_)
        for j, k in enumerate(open_):
            proven[k] |= margins[j] > 0
            self._record(verdicts[k], rung, margins[j], seconds, proven[k])

    def _record(self, v: Verdict, rung: str, margins: torch.Tensor, seconds: float, proven: torch.Tensor) -> None:
        v.margins[rung] = float(worst_of(margins.unsqueeze(0), torch.tensor([v.label]))[0])
        v.seconds[rung] = v.seconds.get(rung, 0.0) + seconds
        if v.verdict == "undecided" and bool(proven.all()):
            v.verdict, v.rung = "certified", rung

    def _solver(self, rung: str, x: torch.Tensor, label: int, v: Verdict, proven: torch.Tensor,
                tightened: FlatBounds) -> None:
        """An LP or MILP rung for one example; ``tightened`` carries LP-all bounds from rung to rung."""
        t0 = time.perf_counter()
        n_out = proven.shape[0]
        margins = torch.full((n_out,), math.inf, dtype=torch.float64)
        try:
            if rung == "milp":
                self._milp(x, label, v, proven, margins, tightened or "lp-all")
            else:
                lp = RelaxedLP(self.net64, x, self.input_set, bounds="dual" if rung == "lp" else "lp-all",
                               time_limit=self.time_limit)
                if rung == "lp-all":
                    tightened[:] = lp.bounds
                for j in (~proven).nonzero().flatten().tolist():
                    c = torch.zeros(n_out, dtype=torch.float64)
                    c[label], c[j] = 1.0, -1.0
                    result = lp.solve(c)
                    margins[j] = result.value if result.success else -math.inf
                    proven[j] = result.success and result.value > 0
        except SolverError:
            v.margins[rung] = math.nan
            v.seconds[rung] = time.perf_counter() - t0
            v.verdict, v.rung = "error", rung
            return
        self._record(v, rung, margins, time.perf_counter() - t0, proven)

    def _targeted_attack(self, x: torch.Tensor, label: int, targets: torch.Tensor, index: int) -> np.ndarray | None:
        """PGD with random restarts on each ``f_target - f_label`` (one batch row per target).

        Returns a verified counterexample, or ``None``.
        """
        x64 = x.detach().cpu().double().reshape(1, *x.shape).expand(len(targets), *x.shape)
        columns = torch.stack([torch.full_like(targets, label), targets], dim=1)

        def pair(z: torch.Tensor) -> torch.Tensor:  # cross-entropy of label 0 grows with f_target - f_label
            return torch.gather(self.net64.forward(z), 1, columns)

        lo, hi = self.input_set.box(x64)
        radius = self.input_set.radius(x64)
        step = float(radius.max()) / 10 if float(radius.max()) > 0 else 1e-3
        x_adv = pgd(pair, x64, torch.zeros(len(targets), dtype=torch.long), radius, steps=self.attack_steps,
                    step_size=step, clip=(lo, hi), restarts=self.milp_attack_restarts,
                    generator=torch.Generator().manual_seed(index))
        for point in x_adv:
            if _margin64(self.net64, point, label) <= 0:
                verified = verified_point(self.net64, x, point, label, self.input_set, index)
                if verified is not None:
                    return verified
        return None

    def _milp(self, x: torch.Tensor, label: int, v: Verdict, proven: torch.Tensor, margins: torch.Tensor,
              bounds: FlatBounds | str) -> None:
        """One MIP per open target, stopped at the threshold 0: a proof or a counterexample.

        With at least ``milp_attack_min_unstable`` binaries, a targeted attack on each open target
        comes first (rung ``"milp-attack"`` when it hits): a hard MIP takes far longer to find a
        counterexample than PGD with restarts aimed at one target; on small MIPs it does not pay.
        """
        milp = ExactMILP(self.net64, x, self.input_set, bounds=bounds, time_limit=self.time_limit,
                         max_unstable=self.milp_max_unstable)
        if sum(milp.n_unstable) >= self.milp_attack_min_unstable:
            point = self._targeted_attack(x, label, (~proven).nonzero().flatten(), v.index)
            if point is not None:
                v.verdict, v.rung, v.counterexample = "not_robust", "milp-attack", point
                return
        n_out = proven.shape[0]
        timed_out = False
        for j in (~proven).nonzero().flatten().tolist():
            c = torch.zeros(n_out, dtype=torch.float64)
            c[label], c[j] = 1.0, -1.0
            result = milp.solve(c, cutoff=0.0)
            if result.status == "cutoff":
                proven[j] = True
                margins[j] = result.bound
            elif result.status == "target" and result.z_in is not None:
                point = torch.from_numpy(result.z_in).reshape(x.shape)
                margins[j] = _margin64(self.net64, point, label)
                verified = verified_point(self.net64, x, point, label, self.input_set, v.index)
                if verified is not None:
                    v.verdict, v.rung, v.counterexample = "not_robust", "milp", verified
                    return
            else:
                timed_out = True
                margins[j] = result.bound if math.isfinite(result.bound) else -math.inf
        if timed_out and not bool(proven.all()):
            v.verdict, v.rung = "timeout", "milp"
