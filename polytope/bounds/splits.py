"""Theorem 1's dual on a domain of ReLU splits, with one multiplier ``beta >= 0`` per split (branch and bound).

A *domain* fixes some unstable units to one of their linear pieces: ``s_j = +1`` (active,
``zhat_j >= 0``) or ``s_j = -1`` (inactive, ``zhat_j <= 0``); ``s_j = 0`` leaves the unit free.
Its verification problem is eq. (2) with the extra constraints ``s_j zhat_j >= 0``.

Derivation (the paper's notation: ``nu_hat_i`` on ``z_i``, ``nu_i`` on ``zhat_i``, ``nu_k = -c``).

1. *Bounds.*  On the domain, an active unit has ``zhat_j >= 0`` so its valid lower bound becomes
   ``l_j := max(l_j, 0)``; an inactive one ``u_j := min(u_j, 0)``.  Section 3.2's index sets then put it
   in ``I+`` (``z = zhat``, the exact piece) or ``I-`` (``z = 0``), and eq. (7) treats it exactly.
   Bounds of later layers are re-derived with these relaxations (any sound bounds work: Theorem 1
   only needs ``l <= zhat <= u`` on the domain) and intersected with the parent's, which hold on the
   larger parent domain.
2. *Multipliers.*  Relax each split constraint into the objective with ``beta_j >= 0``::

       min_{x in S, l <= zhat <= u, z = relu-relaxation(zhat)}  c^T zhat_k - sum_j beta_j s_j zhat_j.

   On the domain ``s_j zhat_j >= 0``, so the added term is ``<= 0`` and this Lagrangian is a lower bound
   of the domain's minimum of ``c^T f`` for every ``beta >= 0`` (weak duality).  Eq. (3)-(5)'s
   derivation goes through unchanged except at the layers with splits: the Lagrangian's coefficient
   of ``zhat_i`` gains ``-beta_i * s_i``, i.e. in the dual network (eq. 7)::

       nu_hat_i = W_{i+1}^T nu_{i+1},    nu_i = d_i [nu_hat_i]_+ - alpha_i [nu_hat_i]_- + s_i * beta_i,

   while the ReLU term of eq. (6) keeps the relaxation's own ``nu`` (before ``+ s beta``):
   ``sum_{j in I_i} l_ij [d_ij [nu_hat_ij]_+ - alpha_ij [nu_hat_ij]_-]_+`` (on ``I`` the second part is
   ``l_ij d_ij [nu_hat_ij]_+``, as in eq. 6).  The bias and input terms of eq. (6) use the new ``nu_i``::

       J(c, alpha, beta) = -sum_i nu_{i+1}^T b_i + min_{x' in S} (-nu_hat_1)^T x' + sum_i sum_{j in I_i} l_ij [nu_ij]_+.

   Each term is the minimum of a linear function over the relaxed layer (eq. 4-5 with the extra
   linear term), so ``J <= min`` over the domain for any ``alpha in [0, 1]`` and ``beta >= 0``.
3. *Fully split domains.*  With every unstable unit split there is no relaxation left: the network is
   linear on the domain, ``J(beta)`` is the Lagrangian dual of the linear program
   ``min c^T f_lin(x) s.t. x in S, s_j zhat_j(x) >= 0``, and ``max_{beta >= 0} J`` equals that LP
   (strong LP duality; ``S`` a box stays in the inner minimisation).  ``J`` is concave in ``beta``, so
   projected gradient ascent approaches it; every iterate is a sound bound.

This generic backward pass runs on any network :class:`~polytope.model.network.Network` accepts; it
does not take :class:`~polytope.bounds.dual.DualNetwork`'s receptive-field shortcuts (correctness
first: the split overrides would have to reach into the patch folds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polytope.bounds.dual import Relaxation
from polytope.model.network import Network, Shape, numel
from polytope.model.sets import InputSet


def apply_splits(lower: torch.Tensor, upper: torch.Tensor, signs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on the domain: ``l := max(l, 0)`` where active (``s = +1``), ``u := min(u, 0)`` where inactive."""
    return (torch.where(signs > 0, lower.clamp_min(0), lower), torch.where(signs < 0, upper.clamp_max(0), upper))


class SplitTerms:
    """One backward pass's ``J: (D, m)``, ``nu_hat_1`` and, per ReLU layer, ``nu`` before ``+ s beta``,
    ``(D, m, n_i)``."""

    def __init__(self, value: torch.Tensor, nu_hat_1: torch.Tensor, nus: list[torch.Tensor]) -> None:
        self.value, self.nu_hat_1, self.nus = value, nu_hat_1, nus


@dataclass(eq=False)
class SplitDual:
    """The dual on ``D`` domains of one example: ``x: (D, *in_shape)`` (the example repeated, or sub-box centres).

    ``bounds``: one ``(lower, upper)`` pair per ReLU layer, ``(D, n_i)`` flat, valid on each domain;
    ``signs``: one ``(D, n_i)`` tensor per ReLU layer in ``{-1, 0, +1}``.  The split bounds of
    :func:`apply_splits` are applied here.  ``empty``: ``(D,)``, domains proven to contain no point
    (their bounds cross: an active split with ``u < 0``, an inactive one with ``l > 0``, or re-derived
    bounds with ``l > u``; sound bounds on a non-empty domain never cross).
    """

    net: Network
    x: torch.Tensor
    input_set: InputSet
    bounds: list[tuple[torch.Tensor, torch.Tensor]]
    signs: list[torch.Tensor]
    index: list[torch.Tensor] | None = None
    """Optional flat unit indices ``(k_i,)`` per ReLU layer: then ``alpha`` and ``beta`` of :meth:`backward` are given
    on those units only, ``(..., k_i)`` (branch and bound keeps them on the root's unstable units, the only ones
    where they can matter); elsewhere ``alpha`` is ``d`` and ``beta`` is 0, which is sound for any index."""

    def __post_init__(self) -> None:
        self.shapes: list[Shape] = self.net.check_input(self.x)
        self.biases = [layer.bias(s, self.x).flatten() for layer, s in zip(self.net.layers, self.shapes[:-1],
                                                                          strict=True)]
        self.bounds = [apply_splits(lo, up, s) for (lo, up), s in zip(self.bounds, self.signs, strict=True)]
        self.linear = [self.net.linear_mask(i) for i in range(len(self.bounds))]
        self.relax = [Relaxation.from_bounds(lo, up, m) for (lo, up), m in zip(self.bounds, self.linear, strict=True)]
        self.empty = torch.zeros(self.x.shape[0], dtype=torch.bool, device=self.x.device)
        for lo, up in self.bounds:
            self._mark_empty(lo, up)

    def _mark_empty(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        """Domains whose sound bounds cross (``l > u``, e.g. an active split with ``u < 0``) contain no point."""
        self.empty |= (lower > upper).any(1)

    @property
    def n_domains(self) -> int:
        return self.x.shape[0]

    def backward(self, c: torch.Tensor, depth: int, alpha: list[torch.Tensor] | None = None,
                 beta: list[torch.Tensor] | None = None) -> SplitTerms:
        """Eq. (7) with the split multipliers from ``c: (D, m, n)`` on the output of layer ``depth - 1``.

        ``alpha``: lower slopes per ReLU layer below, ``(D, n_i)`` or ``(D, m, n_i)`` in ``[0, 1]`` (used on ``I``
        only; ``None``: CROWN's adaptive slopes); ``beta``: ``>= 0``, same shapes (used on split units only;
        ``None``: 0).
        """
        d_count, m = c.shape[:2]
        nu = -c
        bias = torch.zeros(d_count, m, dtype=c.dtype, device=c.device)
        relu = torch.zeros_like(bias)
        nus: list[torch.Tensor] = []
        for i in range(depth - 1, -1, -1):
            bias = bias + (nu * self.biases[i]).sum(2)
            layer, in_shape = self.net.layers[i], self.shapes[i]
            out = layer.transpose(nu.reshape(d_count * m, *self.shapes[i + 1]), in_shape)
            nu_hat = out.reshape(d_count, m, numel(in_shape))
            if i == 0:
                break
            r = self.relax[i - 1]
            a = r.lower_slope(r.adaptive_slope() if alpha is None else self._dense_slopes(i - 1, alpha[i - 1], m))
            a = a if a.dim() == 3 else a.unsqueeze(1)
            nu = torch.where(nu_hat >= 0, r.upper_slope.unsqueeze(1), a) * nu_hat
            nus.insert(0, nu)
            relu = relu + (r.lower_unstable.unsqueeze(1) * nu.clamp_min(0)).sum(2)
            if beta is not None:
                nu = self._add_split_term(i - 1, nu, beta[i - 1])
        nu_hat_1 = nu_hat.reshape(d_count, m, *self.shapes[0])
        centre, support = self.input_set.centre_and_support(self.x, nu_hat_1)
        return SplitTerms(-bias - centre - support + relu, nu_hat_1, nus)

    def _dense_slopes(self, layer: int, alpha: torch.Tensor, m: int) -> torch.Tensor:
        """``alpha`` on all units of ``layer``: as given without :attr:`index`, else ``d`` off the index."""
        if self.index is None:
            return alpha
        alpha = alpha if alpha.dim() == 3 else alpha.unsqueeze(1).expand(-1, m, -1)
        base = self.relax[layer].upper_slope.unsqueeze(1).expand(-1, m, -1)
        return base.index_copy(2, self.index[layer], alpha)

    def _add_split_term(self, layer: int, nu: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """``nu + s * beta`` (step 2 of the module docstring), ``beta`` dense or on :attr:`index`."""
        b = beta if beta.dim() == 3 else beta.unsqueeze(1)
        signs = self.signs[layer].to(nu.dtype)
        if self.index is None:
            return nu + signs.unsqueeze(1) * b
        term = signs[:, self.index[layer]].unsqueeze(1) * b
        return nu.index_add(2, self.index[layer], term.expand(-1, nu.shape[1], -1))

    def rederive(self, start: int, changed: list[torch.Tensor] | None = None) -> None:
        """Re-derive the bounds of ReLU layers ``start..`` under the splits, on the units unstable there.

        Each layer's units ``u`` get ``J(e_u)`` and ``-J(-e_u)`` (adaptive slopes, ``beta = 0``), intersected with
        the current bounds (both sound on the domain); then that layer's splits are applied again.
        ``changed``: per ReLU layer, ``(D, n_i)`` masks of the units whose relaxation changed since the current
        bounds were derived (the new splits); then only the units they can reach (:meth:`reach`) are re-derived:
        the backward pass of any other unit meets no changed relaxation.  Which units are re-derived never
        matters for soundness (the others keep bounds valid on a larger domain), only for tightness.
        """
        reach = self.reach(changed) if changed is not None else None
        for i in range(start, len(self.bounds)):
            lower, upper = self.bounds[i]
            unstable = self.relax[i].sets.unstable if reach is None else self.relax[i].sets.unstable & reach[i]
            k = int(unstable.sum(1).max()) if unstable.numel() else 0
            if k == 0:
                continue
            index = torch.argsort((~unstable).to(torch.int8), dim=1, stable=True)[:, :k]
            valid = torch.gather(unstable, 1, index)
            eye = torch.nn.functional.one_hot(index, lower.shape[1]).to(lower.dtype)
            with torch.no_grad():
                j = self.backward(torch.cat([eye, -eye], 1), i + 1).value
            inf = torch.full_like(lower, torch.inf)
            new_lo = (-inf).scatter_reduce(1, index, torch.where(valid, j[:, :k], -torch.inf), "amax")
            new_up = inf.scatter_reduce(1, index, torch.where(valid, -j[:, k:], torch.inf), "amin")
            lower, upper = apply_splits(torch.maximum(lower, new_lo), torch.minimum(upper, new_up), self.signs[i])
            self._mark_empty(lower, upper)
            upper = torch.maximum(upper, lower)  # an empty domain's bounds stay ordered (it is closed anyway)
            self.bounds[i] = (lower, upper)
            self.relax[i] = Relaxation.from_bounds(lower, upper, self.linear[i])

    def reach(self, changed: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per ReLU layer, ``(D, n_i)``: the units whose pre-activation depends on a ``changed`` unit below
        (``|W_i|`` applied op by op to the indicator of the changed and reached units of layer ``i - 1``: a
        superset of the true dependence)."""
        out = [torch.zeros_like(changed[0])]
        for i in range(1, len(self.bounds)):
            below = (changed[i - 1] | out[-1]).to(self.x.dtype).reshape(-1, *self.shapes[i])
            out.append(self.net.layers[i].abs_linear(below).flatten(1) > 0)
        return out

    def primal_guess(self, nu_hat_1: torch.Tensor) -> torch.Tensor:
        """The inner minimiser of eq. (6)'s input term, ``argmin_{x' in box(S)} (-nu_hat_1)^T x'``, projected on ``S``.

        ``nu_hat_1: (D, *in_shape)``; a candidate counterexample only (checked by a forward pass)."""
        lo, hi = self.input_set.box(self.x)
        guess = torch.where(nu_hat_1 > 0, hi, torch.where(nu_hat_1 < 0, lo, (lo + hi) / 2))
        return self.input_set.project(self.x, guess)
