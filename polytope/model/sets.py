"""Input perturbation sets ``S(x)`` and the linear minimisation that the dual needs.

Theorem 1's input term ``-x^T nu_hat_1 - eps ||nu_hat_1||_1`` is ``min_{x' in S(x)} g^T x'``
with ``g = -nu_hat_1`` for the l_inf ball; other l_p balls swap in the dual norm (the remark
after eq. 8), and a box-clipped l_inf ball is the box ``[max(x-eps, lo), min(x+eps, hi)]``.
Every set implements :meth:`InputSet.min_linear` for that term, :meth:`InputSet.box` for a
bounding box, :meth:`InputSet.contains` for membership (the check every counterexample
passes), plus sampling and projection for tests and attacks.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from polytope.model.errors import InvalidEpsilonError, InvalidInputError, ShapeMismatchError


def _batch_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(-1, *([1] * (ndim - 1)))


def rows_dot(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``<g_j, v>`` for every row of ``g: (B, m, n)`` and ``v: (B, n)``, as ``(B, m)``.

    Written as ``v^T g^T`` (one row times a matrix): several times faster on the CPU than the
    matrix-vector form whatever ``g``'s memory layout.
    """
    return (v.unsqueeze(1) @ g.transpose(1, 2)).squeeze(1)


def dual_norm(g: torch.Tensor, q: float) -> torch.Tensor:
    """``||g_j||_q`` of every row of ``g: (B, m, n)``."""
    if q == 1:
        return g.abs().sum(2)
    if q == math.inf:
        return g.abs().amax(2)
    return torch.linalg.vector_norm(g, ord=q, dim=2)


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    """Raise :class:`InvalidInputError` if ``x`` holds NaN or inf."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        raise InvalidInputError(f"{name} holds NaN or inf values (batch rows {bad[:10]})")


def _check_radius(e64: torch.Tensor, eps: object, dtype: torch.dtype) -> None:
    """Raise :class:`InvalidEpsilonError` unless every radius is finite, ``>= 0`` and fits ``dtype``."""
    if not bool(torch.isfinite(e64).all()) or bool((e64 < 0).any()):
        raise InvalidEpsilonError(f"epsilon must be finite and >= 0, got {eps!r}")
    if dtype.is_floating_point and bool((e64 > torch.finfo(dtype).max).any()):
        raise InvalidEpsilonError(
            f"epsilon {float(e64.max()):g} is not representable in {dtype} (largest {torch.finfo(dtype).max:g})"
        )


@dataclass(frozen=True)
class InputSet(ABC):
    """A norm ball around each example; ``eps`` is a float or one value per example."""

    eps: float | torch.Tensor

    kind = "abstract"
    p: ClassVar[float] = math.inf
    """The norm of the ball: ``||x' - x||_p <= eps``."""
    is_box: ClassVar[bool] = False
    """``True`` when the set *is* its bounding box :meth:`box` (the l_inf sets, :class:`Box`): the engines
    then use interval arithmetic, receptive-field bounds and LP column bounds instead of its support
    function.  A new box-like set sets it and needs no engine edits."""

    def radius(self, x: torch.Tensor) -> torch.Tensor:
        """``eps`` as a tensor of shape ``(B,)`` on ``x``'s device, validated.

        ``eps`` must be a real number (not a string or a bool) or a real tensor of one value or
        one per example, finite, ``>= 0`` and representable in ``x``'s dtype (1e39 overflows float32).
        """
        eps = self.eps
        if isinstance(eps, torch.Tensor):
            if eps.dtype == torch.bool or eps.is_complex():
                raise InvalidEpsilonError(f"epsilon must hold real numbers, got a {eps.dtype} tensor")
            flat = eps.detach().reshape(-1)
            if flat.numel() != 1 and flat.numel() != x.shape[0]:
                raise InvalidEpsilonError(
                    f"epsilon has {flat.numel()} values but the batch has {x.shape[0]} examples"
                )
            _check_radius(flat.double(), eps, x.dtype)
            e = eps.to(dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        else:
            if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
                raise InvalidEpsilonError(f"epsilon must be a number or a tensor, got {eps!r}")
            _check_radius(torch.tensor([float(eps)], dtype=torch.float64), eps, x.dtype)
            e = torch.full((x.shape[0],), float(eps), dtype=x.dtype, device=x.device)
        return e

    def subset(self, batch: int, index: int | slice | Sequence[int] | torch.Tensor) -> InputSet:
        """The set of the examples ``index`` (an int, a slice, indices or a boolean mask) of a batch of ``batch``.

        A per-example ``eps`` (``batch`` values) is indexed the way the batch is; a shared one is
        kept.  Every computation on part of a batch takes its set from here.
        """
        if isinstance(self.eps, torch.Tensor) and self.eps.numel() == batch and batch > 1:
            if isinstance(index, int):
                index = [index]
            if not isinstance(index, slice):
                index = torch.as_tensor(index, device=self.eps.device)
            return replace(self, eps=self.eps.reshape(-1)[index])
        return self

    def rows(self, batch: int, start: int, stop: int) -> InputSet:
        """The set for examples ``start:stop`` of a batch of ``batch`` (:meth:`subset` of a slice)."""
        return self.subset(batch, slice(start, stop))

    def validate(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` (finite, batched) and ``eps``; return ``eps`` as ``(B,)``."""
        if x.dim() < 2:
            raise InvalidInputError(f"x must be batched (B, *in_shape), got shape {tuple(x.shape)}")
        check_finite(x)
        return self.radius(x)

    @abstractmethod
    def centre_and_support(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``<g, m>`` and ``max_{x' in S(x)} <g, x' - m>`` for the centre ``m`` of ``S(x)``, each ``(B, m)``.

        Every set here is symmetric about its centre, so ``min <+-g, x'> = +-<g, m> - support``:
        one call serves an objective and its negation.
        """

    def min_linear(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``min_{x' in S(x)} <g, x'>`` for ``g: (B, m, *in_shape)``; returns ``(B, m)``."""
        centre, support = self.centre_and_support(x, g)
        return centre - support

    @abstractmethod
    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A box ``[lo, hi]`` containing ``S(x)`` (equal to it for l_inf sets)."""

    @abstractmethod
    def project(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Project ``x_adv`` onto ``S(x)`` (exact for l_inf sets and l2; l1 uses a sort)."""

    def norm(self, d: torch.Tensor) -> torch.Tensor:
        """``||d_b||_p`` of every example of a batch ``d: (B, *in_shape)``, as ``(B,)``."""
        return torch.linalg.vector_norm(d.flatten(1), ord=self.p, dim=1)

    def excess(self, x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """How far each ``points[b]`` lies outside ``S(x[b])``, in float64, ``(B,)`` (0 inside).

        For the norm balls it is ``max(||p - x||_p - eps, 0)``; sets with a domain box add the
        largest coordinate by which ``p`` leaves it (:class:`BoxedLinfBall` overrides this).
        """
        x64, p64 = x.detach().double(), points.detach().to(device=x.device, dtype=torch.float64)
        return (self.norm(p64 - x64) - self.radius(x64)).clamp_min(0)

    def contains(self, x: torch.Tensor, points: torch.Tensor, tol: float | torch.Tensor = 0.0) -> torch.Tensor:
        """``(B,)`` booleans: ``points[b]`` lies in ``S(x[b])`` up to the absolute tolerance ``tol``.

        The test is computed in float64: ``||p - x||_p <= eps + tol`` for the norm balls, and for
        :class:`BoxedLinfBall` every coordinate within ``tol`` of the clipped box ``[max(x - eps, lo),
        min(x + eps, hi)]``.  ``tol`` (a float or one value per example, in input units) is the
        caller's allowance for rounding; ``tol = 0`` asks for exact membership of the float64 values.
        """
        if points.shape != x.shape:
            raise InvalidInputError(f"points have shape {tuple(points.shape)}, x has {tuple(x.shape)}")
        excess = self.excess(x, points)
        return excess <= torch.as_tensor(tol, dtype=torch.float64, device=excess.device)

    def sample(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points of ``S(x)`` per example, ``(B, n, *in_shape)``: a quarter are box corners."""
        lo, hi = self.box(x)
        shape = (x.shape[0], n, *x.shape[1:])
        u = torch.rand(shape, dtype=x.dtype, device=x.device, generator=generator)
        n_corner = n // 4
        u[:, :n_corner] = u[:, :n_corner].round()
        pts = lo.unsqueeze(1) + u * (hi - lo).unsqueeze(1)
        centre = x.unsqueeze(1).expand(shape).flatten(0, 1)
        repeated = replace(self, eps=self.radius(x).repeat_interleave(n))
        return repeated.project(centre, pts.flatten(0, 1)).reshape(shape)


class _CenteredBall(InputSet):
    """An l_p ball ``{x' : ||x' - x||_p <= eps}``; ``min <g, x'> = <g, x> - eps ||g||_q``."""

    q: float = math.inf

    def centre_and_support(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.validate(x)
        gf = g.flatten(2)
        return rows_dot(gf, x.flatten(1)), eps[:, None] * dual_norm(gf, self.q)

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = _batch_view(self.validate(x), x.dim())
        return x - r, x + r


@dataclass(frozen=True)
class LinfBall(_CenteredBall):
    """The paper's set: ``||x' - x||_inf <= eps``; dual norm l_1."""

    kind = "linf"
    q = 1.0
    p = math.inf
    is_box = True

    def project(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        lo, hi = self.box(x)
        return torch.minimum(torch.maximum(x_adv, lo), hi)


@dataclass(frozen=True)
class L2Ball(_CenteredBall):
    """``||x' - x||_2 <= eps``; dual norm l_2."""

    kind = "l2"
    q = 2.0
    p = 2.0

    def project(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        eps = _batch_view(self.validate(x), x.dim())
        d = x_adv - x
        norm = _batch_view(d.flatten(1).norm(dim=1), x.dim()).clamp_min(1e-300)
        return x + d * torch.clamp(eps / norm, max=1.0)


@dataclass(frozen=True)
class L1Ball(_CenteredBall):
    """``||x' - x||_1 <= eps``; dual norm l_inf."""

    kind = "l1"
    q = math.inf
    p = 1.0

    def project(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Euclidean projection onto the l1 ball (sort-based, Duchi et al. 2008)."""
        eps = self.validate(x)
        d = (x_adv - x).flatten(1)
        a = d.abs()
        inside = a.sum(1) <= eps
        s, _ = a.sort(dim=1, descending=True)
        cs = s.cumsum(1) - eps[:, None]
        k = torch.arange(1, d.shape[1] + 1, dtype=d.dtype, device=d.device)
        rho = ((s - cs / k) > 0).sum(1).clamp_min(1)
        theta = cs.gather(1, (rho - 1)[:, None]) / rho[:, None].to(d.dtype)
        proj = torch.sign(d) * (a - theta).clamp_min(0)
        proj = torch.where(inside[:, None], d, proj)
        return x + proj.reshape(x.shape)


class AxisBox(InputSet):
    """A set that is a box ``[lo, hi]`` per example, given by :meth:`box`: the arithmetic shared by
    :class:`BoxedLinfBall` and :class:`Box`.

    With centre ``m = (lo + hi) / 2`` and half-widths ``r = (hi - lo) / 2``,
    ``min <g, x'> = <g, m> - <|g|, r>``; projection is clipping; membership is coordinatewise.
    """

    is_box = True

    def centre_and_support(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.box(x)
        gf = g.flatten(2)
        return rows_dot(gf, ((lo + hi) / 2).flatten(1)), rows_dot(gf.abs(), ((hi - lo) / 2).flatten(1))

    def project(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        lo, hi = self.box(x)
        return torch.minimum(torch.maximum(x_adv, lo), hi)

    def excess(self, x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        lo, hi = self.box(x.detach().double())
        p64 = points.detach().to(device=x.device, dtype=torch.float64)
        return torch.maximum(lo - p64, p64 - hi).flatten(1).amax(1).clamp_min(0)


@dataclass(frozen=True)
class BoxedLinfBall(AxisBox):
    """The l_inf ball intersected with the domain box ``[lo, hi]`` (pixels: ``[0, 1]``).

    It is the box ``[max(x - eps, lo), min(x + eps, hi)]`` (see :class:`AxisBox`).
    """

    lo: float = 0.0
    hi: float = 1.0

    kind = "linf-box"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or self.lo > self.hi:
            raise InvalidInputError(f"the domain box needs finite lo <= hi, got [{self.lo}, {self.hi}]")

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = _batch_view(self.validate(x), x.dim())
        lo = torch.clamp(x - r, min=self.lo)
        hi = torch.clamp(x + r, max=self.hi)
        if (lo > hi).any():
            raise InvalidInputError(
                f"x lies farther than epsilon outside the domain box [{self.lo}, {self.hi}]: the set is empty"
            )
        return lo, hi


def _bound_tensor(v: object, name: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        t = v.detach()
    else:
        try:
            t = torch.as_tensor(v)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidInputError(f"Box {name} must be a tensor or an array of numbers: {exc}") from exc
    if t.dtype == torch.bool or t.is_complex():
        raise InvalidInputError(f"Box {name} must hold real numbers, got {t.dtype}")
    if not t.is_floating_point():
        t = t.double()
    if t.dim() == 0:
        raise InvalidInputError(f"Box {name} must have the input's shape, got a scalar")
    if not bool(torch.isfinite(t).all()):
        raise InvalidInputError(f"Box {name} holds NaN or inf values")
    return t


@dataclass(frozen=True, init=False, eq=False)
class Box(AxisBox):
    """Per-coordinate input bounds ``lo <= x' <= hi`` (a VNN-LIB input region), whatever ``x``.

    ``lo`` and ``hi`` have the network's input shape ``in_shape`` (one box for the whole batch) or
    ``(B, *in_shape)`` (one box per example; ``batched=True`` says so when ``in_shape[0]`` could be
    mistaken for a batch size).  The set ignores ``x`` except for its shape and dtype: every engine
    still takes an ``x`` (``DualNetwork(net, x, Box(lo, hi))``), and the natural one is the box centre
    :meth:`centre`.  ``eps`` is unused (0).  The bounds are kept in their own dtype (float64 arrays stay
    float64) and cast to ``x``'s dtype when used.  :meth:`radius` is half the widest side per example
    (the scale attacks take their step sizes from).
    """

    lo: torch.Tensor
    hi: torch.Tensor
    batched: bool | None = None

    kind = "box"

    def __init__(self, lo: object, hi: object, eps: float | torch.Tensor = 0.0, batched: bool | None = None) -> None:
        lo_t, hi_t = _bound_tensor(lo, "lo"), _bound_tensor(hi, "hi")
        if lo_t.shape != hi_t.shape:
            raise ShapeMismatchError(f"Box lo has shape {tuple(lo_t.shape)} but hi has {tuple(hi_t.shape)}")
        if bool((lo_t > hi_t).any()):
            bad = int((lo_t > hi_t).flatten().nonzero()[0])
            raise InvalidInputError(
                f"Box needs lo <= hi: coordinate {bad} has lo {float(lo_t.flatten()[bad])} > hi "
                f"{float(hi_t.flatten()[bad])} (the set is empty)")
        object.__setattr__(self, "eps", 0.0)
        object.__setattr__(self, "lo", lo_t)
        object.__setattr__(self, "hi", hi_t)
        object.__setattr__(self, "batched", batched)

    def _per_example(self, x: torch.Tensor) -> bool:
        if tuple(self.lo.shape) == tuple(x.shape) and self.batched is not False:
            return True
        if tuple(self.lo.shape) == tuple(x.shape[1:]) and not self.batched:
            return False
        raise ShapeMismatchError(
            f"Box bounds have shape {tuple(self.lo.shape)}; x has shape {tuple(x.shape)}: they must be the "
            "input shape or (B, *input shape)")

    def radius(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.box(x)
        return ((hi - lo) / 2).flatten(1).amax(1)

    def validate(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise InvalidInputError(f"x must be batched (B, *in_shape), got shape {tuple(x.shape)}")
        check_finite(x)
        self._per_example(x)
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.validate(x)
        lo, hi = (t.to(dtype=x.dtype, device=x.device) for t in (self.lo, self.hi))
        if x.dtype.is_floating_point and x.dtype != self.lo.dtype:  # rounding may not shrink the box
            lo = torch.where(lo > self.lo.to(x.device), torch.nextafter(lo, torch.full_like(lo, -math.inf)), lo)
            hi = torch.where(hi < self.hi.to(x.device), torch.nextafter(hi, torch.full_like(hi, math.inf)), hi)
        return lo.expand(x.shape), hi.expand(x.shape)

    def centre(self, batch: int = 1) -> torch.Tensor:
        """The box centre ``(lo + hi) / 2`` as a batch ``(B, *in_shape)``: ``batch`` copies of a shared box,
        or the per-example centres of a box made with ``batched=True``."""
        m = (self.lo + self.hi) / 2
        return m if self.batched else m.unsqueeze(0).expand(batch, *m.shape).clone()

    def subset(self, batch: int, index: int | slice | Sequence[int] | torch.Tensor) -> InputSet:
        per_example = self.batched or (self.batched is None and self.lo.dim() >= 2 and self.lo.shape[0] == batch
                                       and batch > 1)
        if not per_example:
            return self
        if isinstance(index, int):
            index = [index]
        if not isinstance(index, slice):
            index = torch.as_tensor(index, device=self.lo.device)
        return Box(self.lo[index], self.hi[index], batched=True)

    def sample(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        lo, hi = self.box(x)
        shape = (x.shape[0], n, *x.shape[1:])
        u = torch.rand(shape, dtype=x.dtype, device=x.device, generator=generator)
        u[:, : n // 4] = u[:, : n // 4].round()
        return torch.minimum(torch.maximum(lo.unsqueeze(1) + u * (hi - lo).unsqueeze(1), lo.unsqueeze(1)),
                             hi.unsqueeze(1))
