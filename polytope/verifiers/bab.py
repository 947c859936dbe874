"""Complete verification by branch and bound on the dual bounds (Theorem 1): input splitting and ReLU splitting.

The property is the cascade's: ``f_y(x') - f_t(x') > 0`` for every target ``t`` and every ``x'`` in the set.
A *domain* is a part of the problem -- a sub-box of the input box (input splitting) or a set of ReLU split
decisions (ReLU splitting, :mod:`polytope.bounds.splits`) -- and carries, per target, a dual lower bound
on the margin there.  A target proven on a domain stays proven on its sub-domains (they are subsets).
Domains whose every target is proven are closed; the open domain with the lowest bound is split next.

Everything runs in float64 (a float64 copy of the network, float64 inputs): ``certified`` means every
leaf's margin bounds are ``> 0`` as computed in float64, the float policy's final word
(docs/float_policy.md).  ``not_robust`` comes with a counterexample that passed the cascade's
:func:`~polytope.verifiers.points.verified_point` (membership in the ORIGINAL set and a float64 forward
pass).  The search stops with ``timeout`` at the time limit and with ``unknown`` at the domain limit,
when the domain queue would exceed its memory limit, or when a leaf can be split no further and is
neither proven nor refuted -- never with a guess.

Input splitting needs a box-shaped set (:class:`~polytope.model.sets.LinfBall`,
:class:`~polytope.model.sets.BoxedLinfBall`, or a set of kind ``"box"``): there the union of the
sub-boxes is exactly the set.  Other sets (l2, l1 balls) are refused with
:class:`~polytope.model.errors.UnsupportedSetError` (their bounding box is larger than the set, and a
proof on it would be sound but a counterexample in it need not lie in the set); ReLU splitting works
on every set.  The sub-boxes are a private :class:`_SubBoxes` set here (to be replaced by ``pt.Box``).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.optimize
import torch

from polytope.bounds.dual import DualNetwork, index_sets
from polytope.bounds.slopes import _ProjectedAdam, optimize_slopes
from polytope.bounds.splits import SplitDual
from polytope.model.checks import check_choice
from polytope.model.errors import InvalidInputError, ShapeMismatchError, UnsupportedSetError
from polytope.model.network import Network, as_float64
from polytope.model.sets import InputSet, rows_dot
from polytope.verifiers.attacks import pgd_in_set
from polytope.verifiers.points import verified_point

SPLITS = ("auto", "input", "relu")
INPUT_BRANCHING = ("gradient", "widest")
RELU_BRANCHING = ("babsr", "width")
REDERIVE = ("reached", "all", "none")
#: gradient steps per bound when :attr:`BaBOptions.steps` is ``None``, per split kind
AUTO_STEPS = {"input": 5, "relu": 20}
BOX_KINDS = ("linf", "linf-box", "box")

Branching = str | Callable[..., torch.Tensor]


@dataclass(frozen=True, eq=False)
class _SubBoxes(InputSet):
    """One box ``[lo_b, hi_b]`` per batch row (the domains of input splitting); ``eps`` is unused (0).

    Private: the lead replaces it by ``pt.Box`` once that set exists.
    """

    lo: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    hi: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    kind = "sub-box"

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi

    def centre_and_support(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gf = g.flatten(2)
        centre, radius = ((self.lo + self.hi) / 2).flatten(1), ((self.hi - self.lo) / 2).flatten(1)
        return rows_dot(gf, centre), rows_dot(gf.abs(), radius)

    def project(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(x_adv, self.lo), self.hi)

    def excess(self, x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        p = points.detach().double()
        return torch.maximum(self.lo.double() - p, p - self.hi.double()).flatten(1).amax(1).clamp_min(0)

    def subset(self, batch: int, index: Any) -> _SubBoxes:
        if isinstance(index, int):
            index = [index]
        return _SubBoxes(0.0, self.lo[index], self.hi[index])


@dataclass(frozen=True)
class BaBOptions:
    """Settings of :func:`verify_bab`.

    ``split``: ``"input"``, ``"relu"`` or ``"auto"`` (input splitting for box sets with at most
    ``max_inputs`` inputs, else ReLU splitting).  ``branching``: ``"gradient"`` (default) or ``"widest"``
    for input splitting, ``"babsr"`` (default) or ``"width"`` for ReLU splitting, or a callable (see
    :func:`input_scores`, :func:`relu_scores` for the signature).  ``time_limit`` (seconds),
    ``max_domains`` (domains bounded) and ``memory_limit`` (bytes of queued domains) stop the search;
    ``batch_size`` domains are split per step (twice as many bounded in one call); ``steps`` gradient
    steps per bound (``None``: :data:`AUTO_STEPS`, 5 for input splitting -- its domains are cheap, more
    steps cost more than the extra domains they save -- and 20 for ReLU splitting), ``lr`` the step size of
    the slopes and the split multipliers; ``root_steps`` steps of
    :func:`~polytope.bounds.slopes.optimize_slopes` for the root's layer bounds (ReLU splitting);
    ``attack_steps`` PGD steps at the root and in open sub-boxes (0: no PGD, candidates only).
    ``rederive`` (ReLU splitting): which layer bounds a child re-derives under its new split: ``"reached"``
    (default: the unstable units of later layers that depend on the split unit,
    :meth:`~polytope.bounds.splits.SplitDual.reach`), ``"all"`` (every unstable unit of later layers) or
    ``"none"`` (the parent's bounds, the split enforced by ``beta`` alone); all three are sound.
    """

    split: str = "auto"
    branching: Branching | None = None
    time_limit: float = 60.0
    max_domains: int = 200_000
    memory_limit: int = 2 * 2**30
    batch_size: int = 64
    steps: int | None = None
    lr: float = 0.1
    max_inputs: int = 20
    root_steps: int = 10
    attack_steps: int = 20
    rederive: str = "reached"

    def __post_init__(self) -> None:
        check_choice(self.split, SPLITS, "split")
        check_choice(self.rederive, REDERIVE, "rederive")
        for name in ("max_domains", "memory_limit", "batch_size", "max_inputs", "root_steps", "attack_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if "steps" in name else 1):
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 0):
            raise InvalidInputError(f"steps must be an integer >= 0, got {self.steps!r}")
        if not (isinstance(self.time_limit, int | float) and self.time_limit > 0):
            raise InvalidInputError(f"time_limit must be a positive number of seconds, got {self.time_limit!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise InvalidInputError(f"lr must be a positive number, got {self.lr!r}")
        if isinstance(self.branching, str):
            check_choice(self.branching, INPUT_BRANCHING + RELU_BRANCHING, "branching")


@dataclass
class BaBResult:
    """The outcome of :func:`verify_bab`.

    ``status``: ``certified``, ``not_robust``, ``timeout`` or ``unknown``; ``counterexample`` (float64,
    verified) for ``not_robust``; ``domains``: domains bounded; ``depth``: the most splits on one domain;
    ``bound``: a lower bound on the worst margin over the set (the smallest open leaf bound; ``inf``
    when nothing was bounded); ``message``: why the search stopped.
    """

    status: str
    split: str
    counterexample: np.ndarray | None = None
    domains: int = 0
    depth: int = 0
    seconds: float = 0.0
    bound: float = -math.inf
    message: str = ""


@dataclass
class _Domain:
    """An open domain: its bound (worst open target), depth, proven targets ``(m,)`` and its split state."""

    bound: float
    depth: int
    proven: torch.Tensor
    state: dict[str, Any]
    choice: tuple[int, int]  # where to split it next: (layer, unit), or (0, coordinate)

    def nbytes(self) -> int:
        tensors = [t for v in self.state.values() for t in (v if isinstance(v, list) else [v])]
        return sum(t.nelement() * t.element_size() for t in tensors) + self.proven.nelement()


def margin_rows(label: int, targets: list[int], n_out: int) -> torch.Tensor:
    """``c`` rows ``e_y - e_t`` (eq. 15), ``(m, n_out)`` in float64."""
    c = torch.zeros(len(targets), n_out, dtype=torch.float64)
    c[:, label] = 1.0
    c[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)] -= 1.0
    return c


def input_scores(grad_lo: torch.Tensor, grad_hi: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The ``"gradient"`` score of each input coordinate, ``(D, n_in)``: ``(|dJ/dlo| + |dJ/dhi|) (hi - lo)``.

    The first-order change of the worst bound ``J`` when the box shrinks along a coordinate, times how
    much it can shrink: an estimate of what splitting that coordinate gains.
    """
    return (grad_lo.abs() + grad_hi.abs()) * (hi - lo)


def relu_scores(lower: torch.Tensor, upper: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """The ``"babsr"`` score of each unit, ``(D, n)`` (one ReLU layer), for the worst target's ``nu`` there.

    BaBSR-style (Bunel et al. 2020, the intercept term): ``s_j = -l_j [nu_j]_+`` is what eq. (6)'s ReLU
    term loses to unit ``j``'s upper line, which a split removes in both children; units with ``s = 0``
    are ranked by ``|nu_j| (u_j - l_j)`` below every positive score (``1e-6`` of the largest).
    """
    intercept = -lower.clamp_max(0) * nu.clamp_min(0)
    backup = nu.abs() * (upper - lower)
    scale = intercept.amax(1, keepdim=True).clamp_min(1e-300)
    return torch.where(intercept > 0, intercept, 1e-6 * scale * backup / backup.amax(1, keepdim=True).clamp_min(1e-300))


class _Search:
    """The best-first loop shared by both split kinds; subclasses bound and split domains."""

    split = "abstract"

    def __init__(self, net: Network, x: torch.Tensor, label: int, input_set: InputSet, targets: list[int],
                 options: BaBOptions, index: int) -> None:
        self.net64 = as_float64(net)
        self.x = x.detach().double()
        self.label, self.input_set, self.targets, self.options, self.index = label, input_set, targets, options, index
        self.n_out = self.net64.shapes(tuple(self.x.shape[1:]))[-1][0]
        self.c = margin_rows(label, targets, self.n_out).to(self.x.device)
        self.start = time.perf_counter()
        self.explored = 0
        self.depth = 0
        self.lowest_closed = math.inf
        self.stuck: list[float] = []  # bounds of leaves that cannot be split further
        self.steps = AUTO_STEPS[self.split] if options.steps is None else options.steps

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> BaBResult:
        point = self._root_attack()
        if point is not None:
            return self._result("not_robust", "the attack at the root found a counterexample", point)
        queue: list[tuple[float, int, _Domain]] = []
        counter = itertools.count()
        queued_bytes = 0
        for domain, point in self._root():
            if point is not None:
                return self._result("not_robust", "a root candidate is a counterexample", point)
            if domain is not None:
                heapq.heappush(queue, (domain.bound, next(counter), domain))
                queued_bytes += domain.nbytes()
        while queue:
            if time.perf_counter() - self.start > self.options.time_limit:
                return self._result("timeout", f"time limit {self.options.time_limit:g} s reached", None, queue)
            if self.explored >= self.options.max_domains:
                return self._result("unknown", f"domain limit {self.options.max_domains} reached", None, queue)
            batch = [heapq.heappop(queue)[2] for _ in range(min(self.options.batch_size, len(queue)))]
            queued_bytes -= sum(d.nbytes() for d in batch)
            for domain, point in self._children(batch):
                if point is not None:
                    return self._result("not_robust", "a domain's candidate is a counterexample", point)
                if domain is not None:
                    heapq.heappush(queue, (domain.bound, next(counter), domain))
                    queued_bytes += domain.nbytes()
            if queued_bytes > self.options.memory_limit:
                return self._result("unknown", f"the domain queue would exceed memory_limit="
                                    f"{self.options.memory_limit} bytes ({len(queue)} domains)", None, queue)
        if self.stuck:
            return self._result("unknown", f"{len(self.stuck)} leaves could be split no further and stayed open")
        return self._result("certified", "every leaf is bounded above zero in float64")

    def _result(self, status: str, message: str, point: np.ndarray | None = None,
                queue: list[tuple[float, int, _Domain]] | None = None) -> BaBResult:
        open_bounds = [b for b, _, _ in queue or []] + self.stuck
        bound = min([*open_bounds, self.lowest_closed])
        if status == "not_robust":
            bound = -math.inf
        return BaBResult(status, self.split, point, self.explored, self.depth, time.perf_counter() - self.start,
                         bound, message)

    def _close_or_open(self, j: torch.Tensor, proven: torch.Tensor, depth: int,
                       state: dict[str, Any], choice: tuple[int, int] | None) -> _Domain | None:
        """A bounded domain (``j: (m,)``, float64): closed (``None``) when every target is proven."""
        # the targets proven here (each proof covers this domain's leaves): their bounds enter BaBResult.bound
        fresh = float(torch.where(~proven & (j > 0), j, torch.inf).min())
        self.lowest_closed = min(self.lowest_closed, fresh)
        proven = proven | (j > 0)
        self.depth = max(self.depth, depth)
        bound = float(torch.where(proven, torch.inf, j).min())
        if bool(proven.all()):
            return None
        if choice is None:
            self.stuck.append(bound)
            return None
        return _Domain(bound, depth, proven, state, choice)

    def _check_points(self, points: torch.Tensor) -> np.ndarray | None:
        """The first of ``points: (N, *in_shape)`` that is a verified counterexample, or ``None``."""
        if points.shape[0] == 0:
            return None
        with torch.no_grad():
            f = self.net64.forward(points.double())
        others = f.clone()
        others[:, self.label] = -torch.inf
        margins = f[:, self.label] - others.max(1).values
        for k in torch.argsort(margins).tolist():
            if margins[k] > 0:
                return None
            point = verified_point(self.net64, self.x[0], points[k], self.label, self.input_set, self.index)
            if point is not None:
                return point
        return None

    def _objectives(self, proven: torch.Tensor) -> torch.Tensor:
        """``c: (D, m, n_out)`` with the rows of proven targets zeroed (their ``J`` is then ignored)."""
        return self.c.unsqueeze(0) * (~proven).to(torch.float64).unsqueeze(2)

    def _root_attack(self) -> np.ndarray | None:
        eps = float(self.input_set.radius(self.x).max())
        if eps == 0 or self.options.attack_steps == 0:
            return self._check_points(self.x)
        x_adv = pgd_in_set(self.net64.forward, self.x, torch.tensor([self.label]), self.input_set,
                           steps=self.options.attack_steps, step_size=eps / 4, restarts=3,
                           generator=torch.Generator().manual_seed(self.index))
        return self._check_points(torch.cat([self.x, x_adv]))

    def _root(self) -> list[tuple[_Domain | None, np.ndarray | None]]:
        raise NotImplementedError

    def _children(self, batch: list[_Domain]) -> list[tuple[_Domain | None, np.ndarray | None]]:
        raise NotImplementedError

    def _elapsed(self) -> bool:
        return time.perf_counter() - self.start > self.options.time_limit


# -- input splitting --------------------------------------------------------------------------


class _InputSearch(_Search):
    """Domains are sub-boxes of the set's box, bounded with optimised slopes (one call per batch)."""

    split = "input"

    def _root(self) -> list[tuple[_Domain | None, np.ndarray | None]]:
        lo, hi = self.input_set.box(self.x)
        self.width0 = (hi - lo).flatten(1).clamp_min(1e-300)
        proven = torch.zeros(1, len(self.targets), dtype=torch.bool)
        return self._bound(lo.flatten(1), hi.flatten(1), proven, [0])

    def _children(self, batch: list[_Domain]) -> list[tuple[_Domain | None, np.ndarray | None]]:
        lo = torch.stack([d.state["lo"] for d in batch])
        hi = torch.stack([d.state["hi"] for d in batch])
        coord = torch.tensor([d.choice[1] for d in batch])
        rows = torch.arange(len(batch))
        mid = (lo[rows, coord] + hi[rows, coord]) / 2
        lo2, hi2 = lo.repeat(2, 1), hi.repeat(2, 1)
        hi2[rows, coord] = mid  # first half: [lo, mid]
        lo2[rows + len(batch), coord] = mid  # second half: [mid, hi]
        proven = torch.stack([d.proven for d in batch]).repeat(2, 1)
        depths = [d.depth + 1 for d in batch] * 2
        return self._bound(lo2, hi2, proven, depths)

    def _bound(self, lo: torch.Tensor, hi: torch.Tensor, proven: torch.Tensor,
               depths: list[int]) -> list[tuple[_Domain | None, np.ndarray | None]]:
        """Bound the boxes ``(D, n_in)`` flat; returns each as an open domain, ``None`` (closed) or a counterexample."""
        shape = self.x.shape[1:]
        lo_s, hi_s = lo.reshape(-1, *shape), hi.reshape(-1, *shape)
        centres = (lo_s + hi_s) / 2
        boxes = _SubBoxes(0.0, lo_s, hi_s)
        c = self._objectives(proven)
        j, _ = optimize_slopes(self.net64, centres, boxes, c, steps=self.steps, lr=self.options.lr,
                               until_positive=True)
        self.explored += len(depths)
        grad_lo, grad_hi, corner = self._sensitivity(lo, hi, c, j)
        point = self._check_points(torch.cat([centres, corner.reshape(-1, *shape)]))
        if point is not None:
            return [(None, point)]
        scores = self._scores(grad_lo, grad_hi, lo, hi)
        out = []
        for k, depth in enumerate(depths):
            state = {"lo": lo[k].clone(), "hi": hi[k].clone()}
            choice = (0, int(scores[k].argmax())) if bool((hi[k] > lo[k]).any()) else None
            out.append((self._close_or_open(j[k], proven[k], depth, state, choice), None))
        self._attack_open(out)
        return out

    def _sensitivity(self, lo: torch.Tensor, hi: torch.Tensor, c: torch.Tensor,
                     j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``dJ/dlo``, ``dJ/dhi`` of the worst open target's fixed-slope bound, and the box corner it points at."""
        worst = torch.where(c.abs().sum(2) > 0, j, torch.inf).argmin(1)
        rows = torch.arange(len(lo))
        c_w = c[rows, worst].unsqueeze(1)
        lo_l, hi_l = lo.clone().requires_grad_(True), hi.clone().requires_grad_(True)
        shape = self.x.shape[1:]
        with torch.enable_grad():
            boxes = _SubBoxes(0.0, lo_l.reshape(-1, *shape), hi_l.reshape(-1, *shape))
            centres = ((lo + hi) / 2).reshape(-1, *shape)
            value = DualNetwork(self.net64, centres, boxes, slopes="adaptive").objective(c_w)
            grad_lo, grad_hi = torch.autograd.grad(value.sum(), [lo_l, hi_l], allow_unused=True)
        grad_lo = torch.zeros_like(lo) if grad_lo is None else grad_lo
        grad_hi = torch.zeros_like(hi) if grad_hi is None else grad_hi
        # the bound's input term is smallest at the corner its gradient points at (eq. 6, min over the box)
        corner = torch.where(grad_lo.abs() >= grad_hi.abs(), lo, hi)
        return grad_lo, grad_hi, corner

    def _scores(self, grad_lo: torch.Tensor, grad_hi: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        branching = self.options.branching or "gradient"
        if callable(branching):
            return torch.as_tensor(branching(grad_lo, grad_hi, lo, hi), dtype=torch.float64)
        check_choice(branching, INPUT_BRANCHING, "branching for input splitting")
        if branching == "widest":
            return (hi - lo) / self.width0
        scores = input_scores(grad_lo, grad_hi, lo, hi)
        # a zero gradient everywhere (e.g. a dead network part) still splits the widest side
        return torch.where(scores.amax(1, keepdim=True) > 0, scores, (hi - lo) / self.width0)

    def _attack_open(self, out: list[tuple[_Domain | None, np.ndarray | None]]) -> None:
        """PGD inside the lowest-bound open sub-boxes (at most 8); a verified hit replaces the outcome list."""
        open_ = sorted((d for d, _ in out if d is not None), key=lambda d: d.bound)[:8]
        if not open_ or self.options.attack_steps == 0:
            return
        lo = torch.stack([d.state["lo"] for d in open_]).reshape(-1, *self.x.shape[1:])
        hi = torch.stack([d.state["hi"] for d in open_]).reshape(-1, *self.x.shape[1:])
        step = float((hi - lo).max()) / 4
        if step <= 0:
            return
        x_adv = pgd_in_set(self.net64.forward, (lo + hi) / 2, torch.full((len(open_),), self.label),
                           _SubBoxes(0.0, lo, hi), steps=self.options.attack_steps, step_size=step)
        point = self._check_points(x_adv)
        if point is not None:
            out[:] = [(None, point)]


# -- ReLU splitting ---------------------------------------------------------------------------


class _ReluSearch(_Search):
    """Domains are ReLU split decisions, bounded by :class:`~polytope.bounds.splits.SplitDual` with
    slopes ``alpha`` and split multipliers ``beta`` optimised by projected Adam, warm-started from the parent."""

    split = "relu"

    def _root(self) -> list[tuple[_Domain | None, np.ndarray | None]]:
        c = self.c.unsqueeze(0)
        # the root's layer bounds with optimised slopes (stopping once every target is proven: then one domain)
        _, slopes = optimize_slopes(self.net64, self.x, self.input_set, c, steps=self.options.root_steps,
                                    lr=self.options.lr, until_positive=True)
        with torch.no_grad():
            root = DualNetwork(self.net64, self.x, self.input_set, slopes=slopes.bounds)
        bounds = [(lo.flatten(1), up.flatten(1)) for lo, up in root.bounds]
        signs = [torch.zeros_like(lo, dtype=torch.int8) for lo, _ in bounds]
        # alpha and beta live on the root's unstable units: a domain's bounds only tighten (they are
        # intersected with the parent's), so its unstable and split units are among these
        self.index = [index_sets(lo[0], up[0], self.net64.linear_mask(i)).unstable.nonzero().flatten()
                      for i, (lo, up) in enumerate(bounds)]
        m = len(self.targets)
        # the objective's slopes start from the root's optimised ones (per objective), beta from 0
        alpha = [a.flatten(2).clone() for a in slopes.objective] if slopes.objective else \
            [a.flatten(1).unsqueeze(1).expand(-1, m, -1).clone() for a in slopes.bounds]
        alpha = [a[:, :, idx] for a, idx in zip(alpha, self.index, strict=True)]
        beta = [torch.zeros(1, m, len(idx), dtype=torch.float64, device=self.x.device) for idx in self.index]
        proven = torch.zeros(1, m, dtype=torch.bool, device=self.x.device)
        return self._bound(bounds, signs, alpha, beta, proven, [0], start=len(bounds))

    def _children(self, batch: list[_Domain]) -> list[tuple[_Domain | None, np.ndarray | None]]:
        n_layers = len(batch[0].state["signs"])

        def stack(key: str, k: int) -> torch.Tensor:
            return torch.stack([d.state[key][k] for d in batch]).repeat(2, *[1] * batch[0].state[key][k].dim())

        signs = [stack("signs", k) for k in range(n_layers)]
        bounds = [(stack("lower", k), stack("upper", k)) for k in range(n_layers)]
        alpha = [stack("alpha", k) for k in range(n_layers)]
        beta = [stack("beta", k) for k in range(n_layers)]
        changed = [torch.zeros_like(s, dtype=torch.bool) for s in signs]
        for k, d in enumerate(batch):
            layer, unit = d.choice
            signs[layer][k, unit] = 1
            signs[layer][k + len(batch), unit] = -1
            changed[layer][[k, k + len(batch)], unit] = True
        proven = torch.stack([d.proven for d in batch]).repeat(2, 1)
        start = min(d.choice[0] for d in batch) + 1
        return self._bound(bounds, signs, alpha, beta, proven, [d.depth + 1 for d in batch] * 2, start, changed)

    def _bound(self, bounds: list[tuple[torch.Tensor, torch.Tensor]], signs: list[torch.Tensor],
               alpha: list[torch.Tensor], beta: list[torch.Tensor], proven: torch.Tensor, depths: list[int],
               start: int, changed: list[torch.Tensor] | None = None) -> list[tuple[_Domain | None, np.ndarray | None]]:
        n = len(depths)
        x = self.x.expand(n, *self.x.shape[1:])
        dual = SplitDual(self.net64, x, self.input_set, bounds, signs, self.index)
        if self.options.rederive != "none":
            dual.rederive(start, changed if self.options.rederive == "reached" else None)
        c = self._objectives(proven)
        # only the targets open in some domain of the batch are bounded (the others' rows would be zeros)
        cols = (~proven).any(0).nonzero().flatten()
        best_open, alpha_open, beta_open, terms = self._optimize(dual, c[:, cols], [a[:, cols] for a in alpha],
                                                                 [b[:, cols] for b in beta])
        alpha = [a.index_copy(1, cols, a_open) for a, a_open in zip(alpha, alpha_open, strict=True)]
        beta = [b.index_copy(1, cols, b_open) for b, b_open in zip(beta, beta_open, strict=True)]
        best = torch.full_like(proven, math.inf, dtype=torch.float64).index_copy(1, cols, best_open)
        self.explored += n
        counted = c[:, cols].abs().sum(2) > 0
        worst = torch.where(counted, best_open, torch.inf).argmin(1)
        rows = torch.arange(n, device=x.device)
        guesses = dual.primal_guess(terms.nu_hat_1[rows, worst])
        point = self._check_points(guesses)
        if point is None:
            lowest = torch.where(counted & ~dual.empty.unsqueeze(1), best_open, torch.inf).amin(1)
            point = self._attack_from(guesses, cols[worst], lowest)
        if point is not None:
            return [(None, point)]
        choices = self._choices(dual, [nu[rows, worst] for nu in terms.nus])
        out = []
        for k in range(n):
            state = {"signs": [s[k].clone() for s in dual.signs], "lower": [b[0][k].clone() for b in dual.bounds],
                     "upper": [b[1][k].clone() for b in dual.bounds], "alpha": [a[k].clone() for a in alpha],
                     "beta": [b[k].clone() for b in beta]}
            # an empty domain (sound bounds contradict a split, or cross) has no point to refute: closed
            j = torch.full_like(best[k], torch.inf) if bool(dual.empty[k]) else best[k]
            if choices[k] is None and not bool((proven[k] | (j > 0)).all()) and not self._elapsed():
                j, point = self._leaf_lp(dual, k, c[k], best[k])
                if point is not None:
                    return [(None, point)]
            out.append((self._close_or_open(j, proven[k], depths[k], state, choices[k]), None))
        return out

    def _attack_from(self, starts: torch.Tensor, targets: torch.Tensor, bounds: torch.Tensor,
                     count: int = 8) -> np.ndarray | None:
        """Targeted PGD in the whole set from the primal guesses of the ``count`` lowest-bound open domains.

        ``starts: (D, *in_shape)``, ``targets: (D,)`` (positions in :attr:`targets` of each domain's worst open
        target), ``bounds: (D,)`` (its bound; ``inf`` for closed or empty domains).  Each run ascends
        ``f_t - f_label`` (the pair's cross-entropy, as the cascade's targeted attack); a domain whose bound is
        low is where the relaxation is loose or a counterexample lies, and its guess is a start near it.
        """
        order = torch.argsort(bounds)[:count]
        order = order[bounds[order] <= 0]
        eps = float(self.input_set.radius(self.x).max())
        if len(order) == 0 or self.options.attack_steps == 0 or eps == 0:
            return None
        classes = torch.tensor(self.targets, device=self.x.device)[targets[order]]
        columns = torch.stack([torch.full_like(classes, self.label), classes], 1)

        def pair(z: torch.Tensor) -> torch.Tensor:
            return torch.gather(self.net64.forward(z), 1, columns)

        x = self.x.expand(len(order), *self.x.shape[1:])
        x_adv = pgd_in_set(pair, x, torch.zeros(len(order), dtype=torch.long, device=x.device), self.input_set,
                           steps=self.options.attack_steps, step_size=eps / 8, start=starts[order])
        return self._check_points(x_adv)

    def _optimize(self, dual: SplitDual, c: torch.Tensor, alpha: list[torch.Tensor],
                  beta: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], Any]:
        """Projected Adam on ``J(c, alpha, beta)`` (``alpha in [0, 1]``, ``beta >= 0``); the best ``J`` seen per
        objective."""
        depth = len(self.net64.layers)
        with torch.no_grad():
            terms = dual.backward(c, depth, alpha, beta)
        best = terms.value.clone()
        n_alpha = len(alpha)
        adam = _ProjectedAdam(alpha + beta, self.options.lr, upper=[1.0] * n_alpha + [math.inf] * len(beta))
        counted = c.abs().sum(2) > 0
        for _ in range(self.steps if alpha or beta else 0):  # no ReLU layer: J is exact already
            if self._elapsed() or bool(((best > 0) | ~counted).all()):
                break
            leaves = adam.leaves()
            with torch.enable_grad():
                step_terms = dual.backward(c, depth, leaves[:n_alpha], leaves[n_alpha:])
                pushed = counted & (best <= 0)
                grads = torch.autograd.grad((step_terms.value * pushed).sum(), leaves, allow_unused=True)
            value = step_terms.value.detach()
            better = value > best
            best = torch.maximum(best, value)
            if bool(better.any()):
                terms = step_terms
            adam.step([torch.zeros_like(a) if g is None else g for a, g in zip(leaves, grads, strict=True)])
        params = [p.detach() for p in adam.params]
        nus = [nu.detach() for nu in terms.nus]
        return best, params[:n_alpha], params[n_alpha:], type(terms)(terms.value.detach(), terms.nu_hat_1.detach(), nus)

    def _choices(self, dual: SplitDual, nus: list[torch.Tensor]) -> list[tuple[int, int] | None]:
        """The unit to split next in each domain: the best-scoring free unstable unit, ``None`` when none is left."""
        branching = self.options.branching or "babsr"
        scores = []
        for (lo, up), s, nu, r in zip(dual.bounds, dual.signs, nus, dual.relax, strict=True):
            free = r.sets.unstable & (s == 0)  # a split unit's bounds no longer cross 0; linear units never do
            if callable(branching):
                score = torch.as_tensor(branching(lo, up, nu), dtype=torch.float64)
            elif check_choice(branching, RELU_BRANCHING, "branching for ReLU splitting") == "width":
                score = up - lo
            else:
                score = relu_scores(lo, up, nu)
            scores.append(torch.where(free, score.clamp_min(0), -1.0))
        if not scores:  # no ReLU layer: nothing to split, the domain's bound is exact
            return [None] * dual.x.shape[0]
        flat = torch.cat(scores, 1)
        offsets = np.cumsum([0] + [s.shape[1] for s in scores])
        out: list[tuple[int, int] | None] = []
        for k, u in enumerate(flat.argmax(1).tolist()):
            if flat[k, u] < 0:
                out.append(None)
                continue
            layer = int(np.searchsorted(offsets, u, side="right") - 1)
            out.append((layer, u - int(offsets[layer])))
        return out

    def _leaf_lp(self, dual: SplitDual, k: int, c: torch.Tensor,
                 j: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        """A fully split domain: its linear region's LP per open target (HiGHS), for box sets.

        The LP's minimiser is a candidate counterexample; its duals are split multipliers ``beta``, whose
        bound :meth:`SplitDual.backward` recomputes in float64 (the LP's own value is never the proof).
        """
        if self.input_set.kind not in BOX_KINDS:
            return j, None
        region = region_lp(self.net64, dual.x[k:k + 1], self.input_set, [s[k] for s in dual.signs],
                           [(lo[k], up[k]) for lo, up in dual.bounds], c)
        if region is None:
            return j, None
        points, betas = region
        point = None if points is None else self._check_points(points)
        if point is not None:
            return j, point
        sub = SplitDual(self.net64, dual.x[k:k + 1].expand(len(c), *dual.x.shape[1:]), self.input_set,
                        [(lo[k:k + 1].expand(len(c), -1), up[k:k + 1].expand(len(c), -1)) for lo, up in dual.bounds],
                        [s[k:k + 1].expand(len(c), -1) for s in dual.signs])
        depth = len(self.net64.layers)
        scale = 1.0
        with torch.no_grad():
            if points is None:  # an empty region: scale the phase-one multipliers past the bound without them
                scale = 2 * (1 + float(sub.backward(c.unsqueeze(1), depth).value.abs().max()))
            value = sub.backward(c.unsqueeze(1), depth, None, [scale * b.unsqueeze(1) for b in betas]).value
        return torch.maximum(j, value[:, 0]), None


@torch.no_grad()
def region_lp(net64: Network, x: torch.Tensor, input_set: InputSet, signs: list[torch.Tensor],
              bounds: list[tuple[torch.Tensor, torch.Tensor]],
              c: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]] | None:
    """``min c_t^T f(x')`` over the set's box intersected with a fully decided activation pattern, per row of ``c``.

    Units are active where split active or ``l >= 0``, inactive where split inactive or ``u <= 0``
    (every unit must be one of these); the split units' sign constraints are the LP's rows.  Returns
    the minimisers ``(m, *in_shape)`` and the multipliers of the split rows (``beta``, one ``(m, n_i)`` per
    layer); for an empty region ``None`` and normalised phase-one multipliers (:func:`_empty_region`);
    ``None`` when a unit is undecided or HiGHS fails.
    """
    lo, hi = (t.reshape(-1).numpy() for t in input_set.box(x))
    n_in = lo.size
    shape = tuple(x.shape[1:])
    linear = [torch.zeros_like(s, dtype=torch.bool) if (m := net64.linear_mask(i)) is None else m
              for i, s in enumerate(signs)]  # a graph's carried values: z = zhat
    active = [(s > 0) | ((lb >= 0) & (s == 0)) | lin for s, (lb, _), lin in zip(signs, bounds, linear, strict=True)]
    decided = [(s != 0) | (lb >= 0) | (ub <= 0) | lin for s, (lb, ub), lin in zip(signs, bounds, linear, strict=True)]
    if not all(bool(d.all()) for d in decided):
        return None
    # zhat_i = A_i x + b_i under the pattern: push the points 0 and e_k through the masked network
    points = torch.cat([torch.zeros(1, n_in, dtype=torch.float64), torch.eye(n_in, dtype=torch.float64)])
    z = points.reshape(-1, *shape)
    rows, rhs, where = [], [], []
    for i, layer in enumerate(net64.layers):
        zhat = layer.forward(z).flatten(1)
        affine_a, affine_b = (zhat[1:] - zhat[:1]).T.numpy(), zhat[0].numpy()
        if i == len(net64.layers) - 1:
            break
        s = signs[i].numpy().astype(np.float64)
        split = np.flatnonzero(s)
        rows.append(-s[split, None] * affine_a[split])  # s zhat >= 0  <=>  -s A x <= s b
        rhs.append(s[split] * affine_b[split])
        where.append((i, split))
        z = (zhat * active[i].to(torch.float64)).reshape(-1, *net64.shapes(shape)[i + 1])
    a_ub = np.concatenate(rows) if rows else np.zeros((0, n_in))
    b_ub = np.concatenate(rhs) if rhs else np.zeros(0)
    box = list(zip(lo, hi, strict=True))

    def multipliers(marginals: np.ndarray) -> list[torch.Tensor]:
        """The split rows' multipliers (HiGHS marginals of ``<=`` rows are ``<= 0``), one ``(n_i,)`` per layer."""
        out = [torch.zeros(lb.numel(), dtype=torch.float64) for lb, _ in bounds]
        offset = 0
        for i, split in where:
            out[i][torch.from_numpy(split)] = torch.from_numpy(np.maximum(-marginals[offset:offset + split.size], 0))
            offset += split.size
        return out

    xs, betas = [], []
    for row in c.numpy():
        res = scipy.optimize.linprog(row @ affine_a, A_ub=a_ub, b_ub=b_ub, bounds=box, method="highs")
        if res.status == 2:
            return _empty_region(a_ub, b_ub, box, multipliers, len(c))
        if res.status != 0:
            return None
        xs.append(torch.from_numpy(res.x))
        betas.append(multipliers(res.ineqlin.marginals if a_ub.shape[0] else np.zeros(0)))
    return torch.stack(xs).reshape(-1, *shape), [torch.stack(b) for b in zip(*betas, strict=True)]


def _empty_region(a_ub: np.ndarray, b_ub: np.ndarray, box: list[tuple[float, float]], multipliers,
                  m: int) -> tuple[None, list[torch.Tensor]] | None:
    """An infeasible region: ``t* = max_x min_j s_j zhat_j(x) < 0`` (phase one) and its multipliers ``lambda``.

    ``lambda / -t*`` makes ``min_{x in box} -sum_j beta_j s_j zhat_j(x) = 1``, so large multiples of it push
    ``J`` above any level (:meth:`_ReluSearch._leaf_lp` scales and re-evaluates them).  Returns
    ``(None, betas)`` with the normalised multipliers for each of the ``m`` objectives.
    """
    n = a_ub.shape[1]
    res = scipy.optimize.linprog(np.r_[np.zeros(n), -1.0], A_ub=np.c_[a_ub, np.ones(len(a_ub))], b_ub=b_ub,
                                 bounds=[*box, (None, 1.0)], method="highs")
    if res.status != 0 or -res.fun >= 0:
        return None
    beta = [b / res.fun for b in multipliers(res.ineqlin.marginals)]  # res.fun = -t* > 0
    return None, [b.unsqueeze(0).expand(m, -1) for b in beta]


def choose_split(net: Network, x: torch.Tensor, input_set: InputSet, options: BaBOptions) -> str:
    """``"input"`` or ``"relu"`` for ``options.split``; input splitting of a set that is not a box is refused."""
    n_in = int(np.prod(x.shape[1:]))
    if options.split == "input":
        if input_set.kind not in BOX_KINDS:
            raise UnsupportedSetError(
                "input splitting needs a box-shaped set (l_inf ball, boxed l_inf ball or box), got "
                f"{input_set.kind!r}: its sub-boxes would cover more than the set; use split='relu'")
        return "input"
    if options.split == "relu":
        return "relu"
    return "input" if input_set.kind in BOX_KINDS and n_in <= options.max_inputs else "relu"


def _one_example(net: Network, x: torch.Tensor) -> torch.Tensor:
    """``x`` as a batch of one, ``(1, *in_shape)``, from ``(*in_shape)`` or ``(1, *in_shape)``."""
    for candidate in (x.unsqueeze(0), x):
        try:
            net.shapes(tuple(candidate.shape[1:]))
        except (ShapeMismatchError, RuntimeError):
            continue
        if candidate.shape[0] == 1:
            return candidate
    raise ShapeMismatchError(f"x must be one example, (*in_shape) or (1, *in_shape), got shape {tuple(x.shape)}")


def verify_bab(net: Network, x: torch.Tensor, label: int, input_set: InputSet, targets: list[int] | None = None,
               options: BaBOptions | None = None, index: int = 0) -> BaBResult:
    """Decide ``f_label(x') > f_t(x')`` for every target ``t`` (default: every other class) and ``x'`` in the set.

    ``x``: one example, ``(*in_shape)`` or ``(1, *in_shape)``; ``input_set`` its set (one example's);
    ``index`` names the example in error messages and seeds the attacks.  See :class:`BaBOptions` and
    :class:`BaBResult`; the module docstring states what each status means.
    """
    options = options or BaBOptions()
    x1 = _one_example(net, x)
    input_set.validate(x1)
    n_out = net.shapes(tuple(x1.shape[1:]))[-1][0]
    if targets is None:
        targets = [t for t in range(n_out) if t != label]
    if not 0 <= label < n_out or any(not 0 <= t < n_out or t == label for t in targets):
        raise InvalidInputError(f"label {label} and targets {targets} must be distinct classes in 0..{n_out - 1}")
    split = choose_split(net, x1, input_set, options)
    start = time.perf_counter()
    if not targets:
        return BaBResult("certified", split, message="no target to prove", bound=math.inf)
    search = (_InputSearch if split == "input" else _ReluSearch)(net, x1, label, input_set, targets, options, index)
    result = search.run()
    result.seconds = time.perf_counter() - start
    return result
