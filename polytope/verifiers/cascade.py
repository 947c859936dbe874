"""The tightness ladder as a cascade: each example climbs only while it is undecided.

Rungs, cheapest first: ``attack`` (PGD inside the actual set; a hit, checked for membership
and by a float64 forward pass, is a counterexample), ``dual`` (the paper's bound), ``adaptive``,
``optimized`` (all layers' slopes), ``lp`` (eq. 19 with the dual's layer bounds), ``lp-all`` (LP-tightened layer bounds)
``bab`` (complete: branch and bound on the dual, :mod:`polytope.verifiers.bab`; input splitting for
few inputs, else ReLU splitting; stops at the time limit) and ``milp`` (exact, big-M with HiGHS, stopped at
the threshold 0: the cross-check, and the last word on what ``bab`` leaves open).  A target ``j`` proven
(``f_y - f_j > 0`` over the ball) on one rung stays proven; an example is ``certified`` when
all its targets are, ``not_robust`` when a verified counterexample exists, and otherwise
``timeout``/``undecided`` -- never guessed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from polytope.bounds.dual import DualNetwork
from polytope.bounds.precision import settle_in_float64
from polytope.bounds.slopes import optimize_slopes
from polytope.model.errors import SolverError, UnknownOptionError
from polytope.model.network import Network, as_float64
from polytope.model.sets import InputSet
from polytope.model.specs import margin_objective, worst_of
from polytope.solvers.highs import FlatBounds
from polytope.solvers.lp import RelaxedLP
from polytope.solvers.milp import ExactMILP
from polytope.verifiers.attacks import pgd_in_set
from polytope.verifiers.bab import BaBOptions, verify_bab
from polytope.verifiers.points import (  # noqa: F401  (re-exported: the cascade's public names)
    MEMBERSHIP_TOL,
    PROJECTED_TOL,
    CounterexampleError,
    _margin64,
    verified_point,
)

RUNGS = ("attack", "dual", "adaptive", "optimized", "lp", "lp-all", "bab", "milp")


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
    domains: int = 0
    depth: int = 0

    def row(self) -> dict[str, Any]:
        """A flat table row: verdict, rung, each rung's worst-margin lower bound and seconds, and the ``bab``
        rung's domains explored and depth reached (0 when it did not run)."""
        out: dict[str, Any] = {"index": self.index, "label": self.label, "verdict": self.verdict,
                               "rung": self.rung, "status": self.verdict}
        for rung in RUNGS:
            out[f"{rung}_margin"] = self.margins.get(rung, math.nan)
            out[f"{rung}_seconds"] = self.seconds.get(rung, 0.0)
        out["bab_domains"], out["bab_depth"] = self.domains, self.depth
        out["seconds"] = sum(self.seconds.values())
        return out


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
    bab: BaBOptions = field(default_factory=BaBOptions)
    """Settings of the ``bab`` rung; its time limit is ``time_limit`` (per example) when that is set."""

    def __post_init__(self) -> None:
        unknown = [r for r in self.rungs if r not in RUNGS]
        if unknown:
            raise UnknownOptionError(f"unknown rungs {unknown}; choose from {RUNGS}")
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
            elif rung == "bab":
                for k in open_:
                    self._bab(x[k], verdicts[k], proven[k], self.input_set.subset(len(x), k))
            else:
                for k in open_:
                    self._solver(rung, x[k], int(y[k]), verdicts[k], proven[k], tightened.setdefault(k, []),
                                 self.input_set.subset(len(x), k))
        return verdicts

    def _clean(self, x: torch.Tensor, y: torch.Tensor, verdicts: list[Verdict]) -> None:
        for k, v in enumerate(verdicts):
            if _margin64(self.net64, x[k], v.label) <= 0:
                v.verdict, v.rung, v.counterexample = "not_robust", "clean", x[k].detach().cpu().double().numpy()

    def _attack(self, x: torch.Tensor, y: torch.Tensor, verdicts: list[Verdict], open_: list[int]) -> None:
        t0 = time.perf_counter()
        idx = torch.tensor(open_)
        input_set = self.input_set.subset(len(x), idx)
        eps = input_set.radius(x[idx])
        step = float(eps.max()) / 4 if float(eps.max()) > 0 else 1e-3
        x_adv = pgd_in_set(self.net.forward, x[idx], y[idx], input_set, steps=self.attack_steps, step_size=step)
        seconds = (time.perf_counter() - t0) / len(open_)
        for j, k in enumerate(open_):
            v = verdicts[k]
            v.seconds["attack"] = seconds
            v.margins["attack"] = _margin64(self.net64, x_adv[j], v.label)
            if v.margins["attack"] <= 0:
                point = verified_point(self.net64, x[k], x_adv[j], v.label, self.input_set.subset(len(x), k), v.index)
                if point is not None:
                    v.verdict, v.rung, v.counterexample = "not_robust", "attack", point

    def _dual(self, rung: str, x: torch.Tensor, y: torch.Tensor, verdicts: list[Verdict], open_: list[int],
              proven: torch.Tensor) -> None:
        """A bound rung on the open examples; margins near zero are settled in float64 (the float policy)."""
        t0 = time.perf_counter()
        idx = torch.tensor(open_)
        xb, yb, done, input_set = x[idx], y[idx], proven[idx], self.input_set.subset(len(x), idx)

        def exact(net64: Network, rows: torch.Tensor, x64: torch.Tensor, y64: torch.Tensor,
                  rows_set: InputSet) -> torch.Tensor:
            return torch.where(done[rows], torch.inf, self._dual_margins(rung, net64, x64, y64, rows_set, done[rows]))

        margins = self._dual_margins(rung, self.net, xb, yb, input_set, done).cpu()
        # the policy looks at the open targets only: a proven target's margin must not hide a near-zero one
        open_margins = torch.where(done, torch.inf, margins)
        settled = settle_in_float64(self.net, xb, yb, input_set, open_margins, exact, self.net64).cpu()
        margins = torch.where(done, margins, settled)
        seconds = (time.perf_counter() - t0) / len(open_)
        for j, k in enumerate(open_):
            proven[k] |= margins[j] > 0
            self._record(verdicts[k], rung, margins[j], seconds, proven[k])

    def _dual_margins(self, rung: str, net: Network, x: torch.Tensor, y: torch.Tensor, input_set: InputSet,
                      done: torch.Tensor) -> torch.Tensor:
        """``(b, n)`` margin bounds of a bound rung in ``net``'s dtype; targets already ``done`` count as ``inf``."""
        c = margin_objective(y, done.shape[1], x.dtype)
        if rung != "optimized":
            with torch.no_grad():
                return DualNetwork(net, x, input_set, slopes="fixed" if rung == "dual" else "adaptive").objective(c)
        # targets proven on an earlier rung drop out of the objective (a zero row: J = 0)
        c = c * (~done).to(c.dtype).unsqueeze(2).to(c.device)
        margins, _ = optimize_slopes(net, x, input_set, c, steps=self.optimize_steps, until_positive=True)
        return torch.where(done.to(margins.device), torch.inf, margins.detach())  # as the solver rungs

    def _record(self, v: Verdict, rung: str, margins: torch.Tensor, seconds: float, proven: torch.Tensor) -> None:
        v.margins[rung] = float(worst_of(margins.unsqueeze(0), torch.tensor([v.label]))[0])
        v.seconds[rung] = v.seconds.get(rung, 0.0) + seconds
        if v.verdict == "undecided" and bool(proven.all()):
            v.verdict, v.rung = "certified", rung

    def _bab(self, x: torch.Tensor, v: Verdict, proven: torch.Tensor, input_set: InputSet) -> None:
        """Branch and bound on the open targets of one example: a proof, a verified counterexample, or open."""
        options = self.bab if self.time_limit is None else replace(self.bab, time_limit=float(self.time_limit))
        targets = (~proven).nonzero().flatten().tolist()
        result = verify_bab(self.net, x, v.label, input_set, targets, options, index=v.index)
        v.domains, v.depth = result.domains, result.depth
        v.margins["bab"] = result.bound
        v.seconds["bab"] = result.seconds
        if result.status == "certified":
            proven[:] = True
            v.verdict, v.rung = "certified", "bab"
        elif result.status == "not_robust":
            v.verdict, v.rung, v.counterexample = "not_robust", "bab", result.counterexample
        elif self.rungs[-1] == "bab":  # nothing after it: say why it stopped (the MILP would go on otherwise)
            v.verdict, v.rung = ("timeout" if result.status == "timeout" else "undecided"), "bab"

    def _solver(self, rung: str, x: torch.Tensor, label: int, v: Verdict, proven: torch.Tensor,
                tightened: FlatBounds, input_set: InputSet) -> None:
        """An LP or MILP rung for one example (``input_set``: its set); ``tightened`` carries LP-all bounds
        from rung to rung."""
        t0 = time.perf_counter()
        n_out = proven.shape[0]
        margins = torch.full((n_out,), math.inf, dtype=torch.float64)
        try:
            if rung == "milp":
                self._milp(x, label, v, proven, margins, tightened or "lp-all", input_set)
            else:
                lp = RelaxedLP(self.net64, x, input_set, bounds="dual" if rung == "lp" else "lp-all",
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

    def _targeted_attack(self, x: torch.Tensor, label: int, targets: torch.Tensor, index: int,
                         input_set: InputSet) -> np.ndarray | None:
        """PGD in the set with random restarts on each ``f_target - f_label`` (one batch row per target).

        Returns a verified counterexample, or ``None``.
        """
        x64 = x.detach().cpu().double().reshape(1, *x.shape).expand(len(targets), *x.shape)
        columns = torch.stack([torch.full_like(targets, label), targets], dim=1)

        def pair(z: torch.Tensor) -> torch.Tensor:  # cross-entropy of label 0 grows with f_target - f_label
            return torch.gather(self.net64.forward(z), 1, columns)

        radius = input_set.radius(x64)
        step = float(radius.max()) / 10 if float(radius.max()) > 0 else 1e-3
        x_adv = pgd_in_set(pair, x64, torch.zeros(len(targets), dtype=torch.long), replace(input_set, eps=radius),
                           steps=self.attack_steps, step_size=step, restarts=self.milp_attack_restarts,
                           generator=torch.Generator().manual_seed(index))
        for point in x_adv:
            if _margin64(self.net64, point, label) <= 0:
                verified = verified_point(self.net64, x, point, label, input_set, index)
                if verified is not None:
                    return verified
        return None

    def _milp(self, x: torch.Tensor, label: int, v: Verdict, proven: torch.Tensor, margins: torch.Tensor,
              bounds: FlatBounds | str, input_set: InputSet) -> None:
        """One MIP per open target, stopped at the threshold 0: a proof or a counterexample.

        With at least ``milp_attack_min_unstable`` binaries, a targeted attack on each open target
        comes first (rung ``"milp-attack"`` when it hits): a hard MIP takes far longer to find a
        counterexample than PGD with restarts aimed at one target; on small MIPs it does not pay.
        """
        milp = ExactMILP(self.net64, x, input_set, bounds=bounds, time_limit=self.time_limit,
                         max_unstable=self.milp_max_unstable)
        if sum(milp.n_unstable) >= self.milp_attack_min_unstable:
            point = self._targeted_attack(x, label, (~proven).nonzero().flatten(), v.index, input_set)
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
                verified = verified_point(self.net64, x, point, label, input_set, v.index)
                if verified is not None:
                    v.verdict, v.rung, v.counterexample = "not_robust", "milp", verified
                    return
            else:
                timed_out = True
                margins[j] = result.bound if math.isfinite(result.bound) else -math.inf
        if timed_out and not bool(proven.all()):
            v.verdict, v.rung = "timeout", "milp"
