"""The dual network of Theorem 1 and the layer bounds of Algorithm 1.

Notation follows the paper.  For an objective ``c`` on the output ``zhat_k`` the dual
network (eq. 7) runs backwards::

    nu_k = -c,    nu_hat_i = W_i^T nu_{i+1},    nu_i = d_i [nu_hat_i]_+ - a_i [nu_hat_i]_-

with ``d = u/(u-l)`` the slope of the upper line of the ReLU relaxation on the unstable set
``I`` (1 on ``I+``, 0 on ``I-``) and ``a`` the slope of its lower line (the paper's ``alpha``;
the paper fixes ``alpha = d``, eq. 8).  The bound is (eq. 6)::

    J(c) = -sum_i nu_{i+1}^T b_i + min_{x' in S(x)} (-nu_hat_1)^T x' + sum_{i, j in I_i} l_ij [nu_ij]_+

and ``J(c) <= min_{x' in S(x)} c^T f(x')`` for *any* slopes ``a`` in ``[0, 1]``.

Bounds ``(l_i, u_i)`` on every ReLU layer come layer by layer from ``J(+-e_j)`` (section 3.3),
in one of two contraction orders that give the same numbers:

* **forward** (Algorithm 1): push the input identity, and one column per unstable unit of the
  earlier layers, forward through the relaxed network; cost grows with the input size plus the
  number of unstable units.  Only for ``alpha = d`` (the dual is then linear in ``c``).
* **backward**: run the dual network from ``c = I`` over the layer's units; cost grows with the
  layer's width.  Works for any slopes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

import torch

from polytope.bounds.patches import (
    PatchTerms,
    SparseRows,
    channel_major,
    conv_prefix,
    fold_patches,
    kernel_rows,
    patch_backward,
    patch_box_terms,
    patch_rows,
    position_major_index,
    prefix_unit_bounds,
    transpose_rows,
)
from polytope.model.checks import check_choice, check_objective, check_slopes
from polytope.model.errors import ShapeMismatchError, UnknownOptionError
from polytope.model.network import AffineLayer, Conv2dOp, LinearOp, Network, Shape, numel
from polytope.model.sets import InputSet, rows_dot

Slopes = Literal["fixed", "adaptive", "optimized"]
Order = Literal["auto", "forward", "backward", "patches"]


class IndexSets(NamedTuple):
    """The paper's ``I-`` (``u <= 0``), ``I+`` (``l >= 0``) and ``I`` (``l < 0 < u``) masks."""

    negative: torch.Tensor
    positive: torch.Tensor
    unstable: torch.Tensor


def index_sets(lower: torch.Tensor, upper: torch.Tensor, linear: torch.Tensor | None = None) -> IndexSets:
    """Split the units of a layer by the sign of their bounds (section 3.2).

    ``linear`` marks units without a ReLU (values a graph carries, ``z = zhat``): they join ``I+``.
    """
    negative = upper <= 0
    positive = (lower >= 0) & ~negative
    if linear is not None:
        linear = linear.to(lower.device)
        negative, positive = negative & ~linear, positive | linear
    return IndexSets(negative, positive, ~negative & ~positive)


@dataclass(frozen=True, eq=False)
class Relaxation:
    """The convex ReLU relaxation of one layer given its pre-activation bounds.

    ``upper_slope`` is eq. (10)'s ``D``: 0 on ``I-``, 1 on ``I+``, ``u/(u-l)`` on ``I``.
    ``lower_unstable`` is ``l`` on ``I`` and 0 elsewhere (the last term of eq. 6).
    """

    lower: torch.Tensor
    upper: torch.Tensor
    sets: IndexSets
    upper_slope: torch.Tensor
    lower_unstable: torch.Tensor

    @classmethod
    def from_bounds(cls, lower: torch.Tensor, upper: torch.Tensor, linear: torch.Tensor | None = None) -> Relaxation:
        sets = index_sets(lower, upper, linear)
        width = torch.where(sets.unstable, upper - lower, torch.ones_like(upper))
        d = torch.where(sets.unstable, upper / width, sets.positive.to(upper.dtype))
        return cls(lower, upper, sets, d, torch.where(sets.unstable, lower, torch.zeros_like(lower)))

    def lower_slope(self, alpha: torch.Tensor | None) -> torch.Tensor:
        """Slopes of the lower line: ``alpha`` on ``I`` (default ``d``, eq. 8), ``d`` elsewhere."""
        if alpha is None:
            return self.upper_slope
        if alpha.dim() == self.upper_slope.dim() + 1:
            return torch.where(self.sets.unstable.unsqueeze(1), alpha, self.upper_slope.unsqueeze(1))
        return torch.where(self.sets.unstable, alpha, self.upper_slope)

    @cached_property
    def unstable_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`unstable_indices` of ``I``: flat indices ``(B, K)`` and their validity."""
        return unstable_indices(self.sets.unstable)

    def adaptive_slope(self) -> torch.Tensor:
        """CROWN's adaptive lower slope: 1 where ``u >= -l``, else 0 (on ``I``)."""
        return (self.upper >= -self.lower).to(self.upper.dtype)


class DualTerms(NamedTuple):
    """The pieces of ``J`` (eq. 6) from one backward pass for objectives ``c: (B, m, ...)``.

    ``bias`` is ``sum_i nu_{i+1}^T b_i``, ``relu`` is ``sum l_ij [nu_ij]_+`` and ``relu_neg``
    is ``sum l_ij [-nu_ij]_+`` (only for linear passes: then ``J(-c)`` needs no second pass).
    """

    nu_hat_1: torch.Tensor
    bias: torch.Tensor
    relu: torch.Tensor
    relu_neg: torch.Tensor | None


def _apply_batched(fn, t: torch.Tensor, lead: int) -> torch.Tensor:
    """Apply a batched operator to ``t: (B, m, *shape)`` by folding ``(B, m)`` into one dimension."""
    out = fn(t.flatten(0, lead - 1))
    return out.reshape(*t.shape[:lead], *out.shape[1:])


def _layer_cost(layer: AffineLayer, in_shape: Shape) -> int:
    """Multiply-adds for pushing one column through a layer (or its transpose)."""
    shapes = layer.shapes(in_shape)
    cost = 0
    for op, s_in, s_out in zip(layer.ops, shapes[:-1], shapes[1:], strict=True):
        if isinstance(op, LinearOp):
            cost += numel(s_in) * numel(s_out)
        elif isinstance(op, Conv2dOp):
            k = op.module.kernel_size
            cost += numel(s_out) * s_in[0] * k[0] * k[1]
        else:
            cost += numel(s_out)
    return cost


class DualNetwork:
    """Algorithm 1's bounds and Theorem 1's objective for a batch ``x: (B, *in_shape)``.

    ``slopes`` picks the lower line of every unstable ReLU, intermediate layers included:
    ``"fixed"`` (the paper's ``alpha = u/(u-l)``, eq. 8), ``"adaptive"`` (1 where
    ``u >= -l``, else 0), or one tensor per ReLU layer, ``(B, *layer_shape)`` in ``[0, 1]``
    (any choice is sound; :func:`polytope.bounds.slopes.optimize_slopes` searches for good ones).
    With slopes other than fixed, the bounds of each ReLU layer after the first are interval
    bounds from the layer below, intersected with the dual's on the units the intervals leave
    unstable (:func:`_tighten`); fixed slopes give the paper's numbers exactly.
    ``order`` picks the contraction order of the bound computation;
    ``"auto"`` takes the cheaper one per layer (forward is only available for fixed slopes).
    """

    def __init__(
        self,
        net: Network,
        x: torch.Tensor,
        input_set: InputSet,
        slopes: Slopes | list[torch.Tensor] = "fixed",
        order: Order = "auto",
    ) -> None:
        if isinstance(slopes, str) and slopes not in ("fixed", "adaptive"):
            raise UnknownOptionError(
                f"slopes must be 'fixed', 'adaptive' or a list of tensors, got {slopes!r}; "
                "use polytope.optimize_slopes for optimised slopes"
            )
        check_choice(order, ("auto", "forward", "backward", "patches"), "order")
        if order == "forward" and slopes != "fixed":
            raise UnknownOptionError("the forward order (Algorithm 1) needs fixed slopes alpha = u/(u-l)")
        self.net = net
        self.x = x
        self.input_set = input_set
        self.slopes = slopes if isinstance(slopes, str) else "custom"
        self._custom = None if isinstance(slopes, str) else list(slopes)
        self.order = order
        self.shapes = net.check_input(x)
        if self._custom is not None:
            expected = [(x.shape[0], *shape) for shape in self.shapes[1:-1]]
            if [tuple(a.shape) for a in self._custom] != expected:
                raise ShapeMismatchError(
                    f"custom slopes must have shapes {expected}, got {[tuple(a.shape) for a in self._custom]}"
                )
            check_slopes(self._custom)
        self.eps = input_set.validate(x)
        self.biases = [layer.bias(s, x) for layer, s in zip(net.layers, self.shapes[:-1], strict=True)]
        self.relaxations: list[Relaxation] = []
        self.orders: list[str] = []
        self._tail: _LinearTail | None = None
        self._slope_tail: _SlopeTail | None = None
        self._compute_bounds(order)

    # -- public ---------------------------------------------------------------------------
    @property
    def bounds(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(lower, upper)`` of every ReLU layer's pre-activation, each ``(B, *layer_shape)``."""
        return [(r.lower, r.upper) for r in self.relaxations]

    def index_sets(self, layer: int) -> IndexSets:
        """``I-``, ``I+`` and ``I`` of ReLU layer ``layer`` (0-based), as boolean masks."""
        return self.relaxations[layer].sets

    def default_alpha(self) -> list[torch.Tensor]:
        """The lower slopes this network's mode uses in every ReLU layer."""
        return [self._mode_slope(i, r) for i, r in enumerate(self.relaxations)]

    def objective(self, c: torch.Tensor, alpha: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Theorem 1's ``J(c, alpha)``: a lower bound on ``min_{x' in S(x)} c^T f(x')``.

        ``c: (B, m, n_out)`` (or ``(m, n_out)``, shared by the batch); ``alpha`` one tensor per
        ReLU layer in ``[0, 1]``, shaped ``(B, *layer_shape)`` or ``(B, m, *layer_shape)``;
        ``None`` takes the network's slope mode.  Returns ``(B, m)``.
        """
        c = self._check_objective(c)
        if alpha is None:
            slopes = None if self.slopes == "fixed" else self.default_alpha()
        else:
            slopes = self._check_alpha(alpha, c.shape[1])
        terms = self._backward(c, len(self.net.layers), slopes, mode_slopes=alpha is None)
        return self._value(terms)

    def output_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Elementwise bounds on the output ``zhat_k`` from ``J(+-e_j)``."""
        return self._bounds_backward(len(self.net.layers) - 1)

    # -- the dual network -------------------------------------------------------------------
    def _mode_slope(self, i: int, r: Relaxation) -> torch.Tensor:
        if self._custom is not None:
            return r.lower_slope(self._custom[i])
        if self.slopes == "adaptive":
            return r.lower_slope(r.adaptive_slope())
        return r.upper_slope

    def _check_objective(self, c: torch.Tensor) -> torch.Tensor:
        n_out = self.shapes[-1][0]
        if not isinstance(c, torch.Tensor):
            raise ShapeMismatchError(f"c must be a tensor, got {type(c).__name__}")
        if c.dim() == 2:
            c = c.unsqueeze(0).expand(self.x.shape[0], *c.shape)
        if c.dim() != 3 or c.shape[0] != self.x.shape[0] or c.shape[2] != n_out:
            raise ShapeMismatchError(
                f"c must be (B={self.x.shape[0]}, m, n_out={n_out}) or (m, {n_out}), got {tuple(c.shape)}"
            )
        check_objective(c)
        if c.dtype != self.x.dtype or c.device != self.x.device:
            c = c.to(dtype=self.x.dtype, device=self.x.device)
        return c

    def _check_alpha(self, alpha: list[torch.Tensor], m: int) -> list[torch.Tensor]:
        if len(alpha) != len(self.relaxations):
            raise ShapeMismatchError(f"alpha needs {len(self.relaxations)} tensors, got {len(alpha)}")
        check_slopes(alpha, "alpha")
        out = []
        for i, (a, r) in enumerate(zip(alpha, self.relaxations, strict=True)):
            shape = tuple(r.lower.shape)
            if tuple(a.shape) not in (shape, (shape[0], m, *shape[1:])):
                raise ShapeMismatchError(f"alpha[{i}] must be {shape} or (B, m, ...), got {tuple(a.shape)}")
            out.append(r.lower_slope(a.to(self.x.dtype)))
        return out

    def _backward(
        self, c: torch.Tensor, depth: int, slopes: list[torch.Tensor] | None,
        record: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        keep: tuple[torch.Tensor, torch.Tensor] | None = None, mode_slopes: bool = False,
    ) -> DualTerms:
        """Eq. (7) from ``c`` on ``zhat_{depth+1}`` back to the input; ``slopes=None`` is linear.

        ``record`` collects ``(l, nu)`` on each ReLU layer's unstable units (for :class:`_LinearTail`).
        A linear pass that reaches the layer of the recorded tail finishes through it.  ``keep``
        (units ``(B, k)`` of the third layer and their validity; ``c = e_u`` are the first ``k``
        objectives) records a :class:`_SlopeTail`, through which later passes with the mode's
        slopes (``mode_slopes``) finish.
        """
        batch, m = c.shape[:2]
        # the same objectives for every example (c = I): W^T c once, not once per example
        nu = -(c[:1] if batch > 1 and c.stride(0) == 0 else c)
        bias = torch.zeros(c.shape[:2], dtype=c.dtype, device=c.device)
        relu = torch.zeros_like(bias)
        relu_neg = torch.zeros_like(bias) if slopes is None else None
        for i in range(depth - 1, -1, -1):
            tail = self._tail
            if slopes is None and tail is not None and tail.depth == i + 1:
                return tail.finish(nu, bias, relu, relu_neg)
            if i == 1 and self._shortcut_applies:  # c sits on the second convolution's output
                w = -nu.expand(batch, *nu.shape[1:]).flatten(2).transpose(1, 2)
                w = w.unflatten(1, self.shapes[2]).flatten(2, 3).transpose(1, 2)  # (B, L, C, m)
                return self._prefix_shortcut(w, bias, relu, relu_neg, slopes, record)
            layer, in_shape = self.net.layers[i], self.shapes[i]
            bias = bias + rows_dot(nu.flatten(2), self.biases[i].flatten().expand(nu.shape[0], -1))
            nu_hat = _apply_batched(lambda t, layer=layer, s=in_shape: layer.transpose(t, s), nu, 2)
            if i == 0:
                return DualTerms(nu_hat.expand(batch, *nu_hat.shape[1:]), bias, relu, relu_neg)
            r = self.relaxations[i - 1]
            a = None if slopes is None else slopes[i - 1]
            index, valid = r.unstable_index
            lower = _on_units(r.lower_unstable, index) * valid.unsqueeze(1)
            if i == 2 and self._shortcut_applies:
                v = _on_units(nu_hat.expand(batch, *nu_hat.shape[1:]), index, True)  # (B, m, K)
                d_u = _on_units(r.upper_slope, index)
                a_u = d_u if a is None else _on_units(a, index, a.dim() == nu_hat.dim())  # (B, 1 or m, K)
                # eq. (7): nu = d nu_hat + corr there, corr = (a - d) [nu_hat]_- (0 when linear)
                corr = None if a is None else (a_u - d_u) * v.clamp_max(0) * valid.unsqueeze(1)
                if mode_slopes and self._slope_tail is not None:
                    linear = self._slope_tail.finish(self, nu, corr)
                else:
                    w = _scaled_position_major(nu_hat, r, corr, batch)  # (B, L, C, m): the shortcut's -nu
                    linear = self._shortcut_linear(w)
                    if keep is not None:
                        self._slope_tail = _SlopeTail.record(keep, linear, corr)
                nu_u = d_u * v * valid.unsqueeze(1)  # eq. (7) on the unstable units
                nu_u = nu_u if corr is None else nu_u + corr
                relu, relu_neg = _relu_terms(lower, nu_u, relu, relu_neg, record)
                return self._first_layer(bias + linear.bias, linear.nu_hat_1, linear.nu_hat_0, relu, relu_neg, slopes,
                                         record)
            d = r.upper_slope.unsqueeze(1)
            if a is None:
                nu = d * nu_hat
            else:
                a = a if a.dim() == nu_hat.dim() else a.unsqueeze(1)
                nu = torch.where(nu_hat >= 0, d, a) * nu_hat
            # the ReLU term: l is 0 off the unstable set, so only its columns count
            nu_u = torch.gather(nu.flatten(2), 2, index.unsqueeze(1).expand(nu.shape[0], m, -1))
            relu, relu_neg = _relu_terms(lower, nu_u, relu, relu_neg, record)
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def _shortcut_applies(self) -> bool:
        """Layers 0 and 1 are single convolutions whose unit patches are known (see patches.py).

        An empty batch takes the plain passes (the patch folds need at least one example)."""
        return (self.order in ("auto", "patches") and self.x.shape[0] > 0 and len(self.relaxations) >= 1
                and conv_prefix(self.net, 1) is not None)

    @cached_property
    def _prefix_terms(self) -> PatchTerms:
        """The linear patch pass (``alpha = d``) from every unit of the second convolution."""
        ops = conv_prefix(self.net, 1)
        assert ops is not None
        r = self.relaxations[0]
        return patch_backward(ops, self.shapes[2], [r.upper_slope], [r.lower_unstable], None, 1.0)

    @cached_property
    def _unstable_rows(self) -> SparseRows:
        """Rows of the second convolution's ``W^T`` at the first ReLU layer's unstable units."""
        conv1 = self.net.layers[1].ops[0]
        index = self.relaxations[0].unstable_index[0]
        return transpose_rows(conv1, self.shapes[1], self.shapes[2], index)

    def _prefix_shortcut(
        self, w: torch.Tensor, bias: torch.Tensor, relu: torch.Tensor, relu_neg: torch.Tensor | None,
        slopes: list[torch.Tensor] | None, record: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> DualTerms:
        """Finish eq. (7) from ``nu = -w`` on the second convolution's output via unit patches.

        ``w`` is position-major, ``(B, L, C, m)`` (see :func:`_scaled_position_major`).
        """
        linear = self._shortcut_linear(w)
        return self._first_layer(bias + linear.bias, linear.nu_hat_1, linear.nu_hat_0, relu, relu_neg, slopes, record)

    def _shortcut_linear(self, w: torch.Tensor) -> _ShortcutLinear:
        """The maps of ``nu = -w`` on the second convolution's output that are linear whatever the slopes.

        Everything but the first layer's ReLU step is the ``w``-combination of the per-unit patch
        passes (the bias term and ``nu_hat_1`` as if ``alpha = d`` there); the first layer's ReLU
        step needs ``nu_hat`` on its unstable units only (:func:`transpose_rows`).
        """
        terms = self._prefix_terms
        batch, n = w.shape[0], w.shape[3]
        flat = w.reshape(batch, -1, n)  # (B, n_2, m), position-major
        bias = (terms.bias.reshape(batch, 1, -1) @ flat).squeeze(1)
        nu_hat_1 = fold_patches(w, terms, self.shapes[0], self.shapes[2][1:])
        # nu_hat_0 = W_2^T nu = -W_2^T w, on the unstable units only: (B, m, K)
        return _ShortcutLinear(bias, nu_hat_1, -self._unstable_rows.matmul(flat).transpose(1, 2))

    def _first_layer(
        self, bias: torch.Tensor, nu_hat_1: torch.Tensor, nu_hat_0: torch.Tensor, relu: torch.Tensor,
        relu_neg: torch.Tensor | None, slopes: list[torch.Tensor] | None,
        record: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> DualTerms:
        """Eq. (7)'s ReLU step on the first layer's unstable units, given the shortcut's linear maps.

        Slopes other than ``d`` there add ``W_1^T`` of a correction on those units to ``nu_hat_1``,
        and its bias term.
        """
        r = self.relaxations[0]
        index, valid = r.unstable_index
        d = _on_units(r.upper_slope, index)
        lower = _on_units(r.lower_unstable, index) * valid.unsqueeze(1)
        if slopes is None:
            nu_0 = d * nu_hat_0
        else:
            a = _on_units(slopes[0], index, slopes[0].dim() > r.upper_slope.dim())
            nu_0 = torch.where(nu_hat_0 >= 0, d, a) * nu_hat_0
            # nu_0 - d nu_hat_0 lives on the unstable units: add W_1^T of it and its bias term
            delta = (nu_0 - d * nu_hat_0) * valid.unsqueeze(1)
            rows = kernel_rows(self.net.layers[0].ops[0], self.shapes[0], self.shapes[1], index)
            nu_hat_1 = nu_hat_1 + rows.rmatmul(delta).reshape(nu_hat_1.shape)
            b_0 = self.biases[0].flatten()[index]  # (B, K)
            bias = bias + rows_dot(delta, b_0)
        relu, relu_neg = _relu_terms(lower, nu_0, relu, relu_neg, record)
        return DualTerms(nu_hat_1, bias, relu, relu_neg)

    def _value(self, terms: DualTerms) -> torch.Tensor:
        """``J(c)`` (eq. 6) from one backward pass: ``min <-nu_hat_1, x'> = -<nu_hat_1, m> - support``."""
        centre, support = self.input_set.centre_and_support(self.x, terms.nu_hat_1)
        return -terms.bias - centre - support + terms.relu

    def _value_pair(self, terms: DualTerms) -> tuple[torch.Tensor, torch.Tensor]:
        """``J(c)`` and ``J(-c)`` from one linear pass (``nu`` flips sign; the input set is symmetric)."""
        assert terms.relu_neg is not None
        centre, support = self.input_set.centre_and_support(self.x, terms.nu_hat_1)
        return -terms.bias - centre - support + terms.relu, terms.bias + centre - support + terms.relu_neg

    # -- Algorithm 1: layer bounds ---------------------------------------------------------
    def _compute_bounds(self, order: Order) -> None:
        forward_state: _ForwardState | None = None
        for i in range(len(self.net.layers) - 1):
            if i == 0 and self._first_layer_is_interval():
                lower, upper = self._first_layer_interval()
                self.orders.append("interval")
            elif order in ("auto", "patches") and self._patches_apply(i):
                lower, upper = self._bounds_patches(i)
                self.orders.append("patches")
            else:
                use_forward = order == "forward" or (
                    order == "auto" and self.slopes == "fixed" and self._forward_is_cheaper(i, forward_state)
                )
                if use_forward:
                    forward_state = self._advance(forward_state, i)
                    lower, upper = forward_state.bounds(self.x, self.input_set)
                    self.orders.append("forward")
                else:
                    lower, upper = self._bounds_backward(i, screen=True)
                    self.orders.append("backward")
            self.relaxations.append(Relaxation.from_bounds(lower, upper, self.net.linear_mask(i)))

    def _bounds_backward(self, i: int, screen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds on ``zhat`` after layer ``i`` from the dual network started at ``c = +-I``.

        ``screen``: for slopes other than fixed, a ReLU layer's bounds are :meth:`_screened_bounds`.
        """
        shape = self.shapes[i + 1]
        n, batch = numel(shape), self.x.shape[0]
        if self.slopes == "fixed":
            eye = torch.eye(n, dtype=self.x.dtype, device=self.x.device).reshape(n, *shape)
            record: list[tuple[torch.Tensor, torch.Tensor]] = []
            terms = self._backward(eye.unsqueeze(0).expand(batch, *eye.shape), i + 1, None, record=record)
            if i == len(self.net.layers) - 2:  # the objective's pass will run through the same layers
                self._tail = _LinearTail(i + 1, terms, record)
            lower, neg_upper = self._value_pair(terms)
            return lower.reshape(batch, *shape), -neg_upper.reshape(batch, *shape)
        if screen and i > 0:
            return self._screened_bounds(i)
        units = torch.arange(n, device=self.x.device).expand(batch, n)
        lower, upper = self._unit_bounds(i, units, torch.ones_like(units, dtype=torch.bool))
        return lower.reshape(batch, *shape), upper.reshape(batch, *shape)

    def _unit_bounds(self, i: int, units: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``J(e_u)`` and ``-J(-e_u)`` in this network's slope mode for the units ``units: (B, k)`` of layer ``i``.

        The pass of the third layer's units through the shortcut is kept (:class:`_SlopeTail`) when
        every unit that a later pass can reach is among them (``valid``: not padding).
        """
        eye, k = self._unit_objectives(i, units), units.shape[1]
        c = torch.cat([eye, -eye], 1)
        keep = (units, valid) if i == 2 and self._shortcut_applies else None
        j = self._value(self._backward(c, i + 1, self.default_alpha()[:i], keep=keep, mode_slopes=True))
        return j[:, :k], -j[:, k:]

    def _interval(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Interval bounds through layer ``i`` from the box ``[relu(l), relu(u)]`` of the ReLU below it
        (``[l, u]`` on its linear units)."""
        r = self.relaxations[i - 1]
        return self.net.layers[i].interval(*self.net.activation_interval(i - 1, r.lower, r.upper))

    def _screened_bounds(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer bounds of the slope modes other than fixed, each step on the units still unstable:

        1. interval bounds through layer ``i`` from the box ``[relu(l), relu(u)]`` of the ReLU below;
        2. on a layer that the receptive-field order can bound (:meth:`_patches_apply`), the
           fixed-slope dual (linear, cheap from the same patches);
        3. the mode's dual (:meth:`_unit_bounds`).

        Each step intersects (:func:`_tighten_at`); all are sound, and only a unit's stability
        reaches later layers, so a settled unit keeps the bounds that settled it, in every
        contraction order.  On the paper's MNIST model the intervals settle 90% of the dense
        layer's units, and intervals and fixed slopes 95% of the second convolution's.  Step 3
        runs on a dense layer's units that step 1 does not prove inactive (the active ones too,
        whose pass a :class:`_SlopeTail` needs); on a graph, on the unstable ReLU units only.
        """
        lower, upper = (t.flatten(1) for t in self._interval(i))
        shape = (lower.shape[0], *self.shapes[i + 1])
        patchable = self._patches_apply(i)
        if patchable:
            index, valid = unstable_indices((lower < 0) & (upper > 0))
            if index.shape[1]:
                lower, upper = _tighten_at(lower, upper, index, valid, *self._fixed_unit_bounds(i, index))
        todo = (lower < 0) & (upper > 0) if patchable or self.net.is_graph else upper > 0
        linear = self.net.linear_mask(i)
        if linear is not None:  # a graph's carried values: their interval bounds only feed later intervals
            todo = todo & ~linear.to(todo.device)
        index, valid = unstable_indices(todo)
        if index.shape[1]:
            lower, upper = _tighten_at(lower, upper, index, valid, *self._unit_bounds(i, index, valid))
        return lower.reshape(shape), upper.reshape(shape)

    def _fixed_unit_bounds(self, i: int, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``J(e_u)`` and ``-J(-e_u)`` with fixed slopes (one linear pass) for the units ``units: (B, k)``
        of layer ``i``."""
        lower, neg_upper = self._value_pair(self._backward(self._unit_objectives(i, units), i + 1, None))
        return lower, -neg_upper

    def _unit_objectives(self, i: int, units: torch.Tensor) -> torch.Tensor:
        """``c = e_u`` on the output of layer ``i`` for the units ``units: (B, k)``, as ``(B, k, *shape)``."""
        shape = self.shapes[i + 1]
        return torch.nn.functional.one_hot(units, numel(shape)).to(self.x.dtype).reshape(*units.shape, *shape)

    def _patches_apply(self, i: int) -> bool:
        """Receptive-field bounds for layer ``i``: a convolutional prefix over an l_inf set, a non-empty batch."""
        return (i > 0 and self.x.shape[0] > 0 and self.input_set.is_box
                and conv_prefix(self.net, i) is not None)

    def _bounds_patches(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds on a convolutional layer from the dual network on receptive fields only.

        Other slopes than fixed: :meth:`_screened_bounds`' rule, with the fixed-slope dual from the
        same patches and the mode's dual on the units that the first two leave unstable only.
        """
        ops = conv_prefix(self.net, i)
        assert ops is not None
        shape = self.shapes[i + 1]
        batch = self.x.shape[0]
        relax = self.relaxations[:i]
        d = [r.upper_slope for r in relax]
        low = [r.lower_unstable for r in relax]
        lo, hi = self.input_set.box(self.x)
        out_hw = (shape[1], shape[2])
        terms = self._prefix_terms if i == 1 else patch_backward(ops, shape, d, low, None, 1.0)
        linear, spread = patch_box_terms(terms, lo, hi, out_hw)
        lower = channel_major(-terms.bias - linear - spread + terms.relu)
        upper = channel_major(-terms.bias - linear + spread - terms.relu_neg)
        if self.slopes != "fixed":
            lower, upper = _tighten(*(t.flatten(1) for t in self._interval(i)), lower, upper)
            index, valid = unstable_indices((lower < 0) & (upper > 0))
            if index.shape[1] and i == 1:
                a = self.default_alpha()[0]
                low_a, up_a = prefix_unit_bounds(ops, shape, terms, relax[0].sets.unstable, d[0], a, lo, hi,
                                                 position_major_index(index, shape))
                lower, upper = _tighten_at(lower, upper, index, valid, low_a, up_a)
            elif index.shape[1]:
                a = self.default_alpha()[:i]

                def value(sign: float) -> torch.Tensor:  # J(sign e_u), eq. (6), channel-major (B, n)
                    t = patch_backward(ops, shape, d, low, a, sign)
                    linear, spread = patch_box_terms(t, lo, hi, out_hw)
                    return channel_major(-(t.bias + linear) - spread + t.relu)

                low_a, up_a = (torch.gather(v, 1, index) for v in (value(1.0), -value(-1.0)))
                lower, upper = _tighten_at(lower, upper, index, valid, low_a, up_a)
        return lower.reshape(batch, *shape), upper.reshape(batch, *shape)

    def _first_layer_is_interval(self) -> bool:
        ops = [op for op in self.net.layers[0].ops if isinstance(op, LinearOp | Conv2dOp)]
        return len(ops) == 1 and self.input_set.is_box

    def _first_layer_interval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact bounds of ``W_1 x' + b_1`` over a box (:meth:`AffineLayer.interval`)."""
        return self.net.layers[0].interval(*self.input_set.box(self.x))

    def _forward_is_cheaper(self, i: int, state: _ForwardState | None) -> bool:
        start = 0 if state is None else state.depth
        n_cols = numel(self.shapes[0]) + sum(
            int(r.sets.unstable.flatten(1).sum(1).max()) if r.sets.unstable.numel() else 0 for r in self.relaxations
        )
        forward = n_cols * sum(_layer_cost(self.net.layers[j], self.shapes[j]) for j in range(start, i + 1))
        backward = numel(self.shapes[i + 1]) * sum(
            _layer_cost(self.net.layers[j], self.shapes[j]) for j in range(i + 1)
        )
        return forward < backward

    def _advance(self, state: _ForwardState | None, i: int) -> _ForwardState:
        if state is None:
            state = _ForwardState.start(self.net.layers[0], self.shapes[0], self.biases[0], self.x)
        while state.depth <= i:
            j = state.depth
            state = state.push(self.relaxations[j - 1], self.net.layers[j], self.biases[j])
        return state


def _tighten(lo_i: torch.Tensor, up_i: torch.Tensor, lower: torch.Tensor,
             upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds ``(lo_i, up_i)`` intersected with ``(lower, upper)`` on the units that they leave unstable.

    Both are sound, so the result is.  Only a unit's stability reaches later layers (a unit with
    ``u <= 0`` or ``l >= 0`` has the same relaxation whatever its other bound), so a settled unit
    keeps the bounds that settled it (see :meth:`DualNetwork._screened_bounds`).
    """
    keep = (lo_i < 0) & (up_i > 0)
    return torch.where(keep, torch.maximum(lo_i, lower), lo_i), torch.where(keep, torch.minimum(up_i, upper), up_i)


def _tighten_at(lower: torch.Tensor, upper: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                low: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat bounds ``(B, n)`` intersected with bounds ``(low, up): (B, K)`` of the units ``index`` on the
    ones that they leave unstable (:func:`_tighten`); padded slots (not ``valid``) change nothing."""
    inf = torch.tensor(float("inf"), dtype=lower.dtype, device=lower.device)
    # padded slots point at unit 0: they carry -inf / +inf, which the max / min ignore
    new_lower = (-inf).expand_as(lower).scatter_reduce(1, index, torch.where(valid, low, -inf), "amax")
    new_upper = inf.expand_as(upper).scatter_reduce(1, index, torch.where(valid, up, inf), "amin")
    return _tighten(lower, upper, new_lower, new_upper)


@dataclass(frozen=True, eq=False)
class _ForwardState:
    """Algorithm 1's running terms at ``zhat_{depth+1}`` (the output of layer ``depth - 1``).

    The relaxed network with ``alpha = d`` is affine in the input ``x'`` and in one offset
    ``t_j in [0, -d_j l_j]`` per unstable unit (``z_j = d_j zhat_j + t_j``), so
    ``zhat = A^T x' + sum_j M_j t_j + const``.  ``inputs`` is ``A`` (``(B or 1, n_in, *shape)``),
    ``offsets`` one ``(columns, widths)`` pair per earlier ReLU layer, ``const`` the pushed biases.
    """

    depth: int
    inputs: torch.Tensor
    offsets: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    const: torch.Tensor

    @classmethod
    def start(cls, layer: AffineLayer, in_shape: Shape, bias: torch.Tensor, x: torch.Tensor) -> _ForwardState:
        n_in = numel(in_shape)
        eye = torch.eye(n_in, dtype=x.dtype, device=x.device).reshape(n_in, *in_shape)
        return cls(1, layer.linear(eye).unsqueeze(0), (), bias.unsqueeze(0).expand(x.shape[0], *bias.shape))

    def push(self, relax: Relaxation, layer: AffineLayer, bias: torch.Tensor) -> _ForwardState:
        """Apply ``D`` (eq. 10) and the next layer ``W`` to every term; open columns for ``I``."""
        d = relax.upper_slope

        def through(t: torch.Tensor) -> torch.Tensor:
            return _apply_batched(layer.linear, d.unsqueeze(1) * t, 2)

        inputs = through(self.inputs.expand(d.shape[0], *self.inputs.shape[1:]))
        offsets = tuple((through(cols), widths) for cols, widths in self.offsets)
        columns, widths = _unstable_columns(relax)
        offsets += ((_apply_batched(layer.linear, columns, 2), widths),)
        const = layer.linear(d * self.const) + bias
        return _ForwardState(self.depth + 1, inputs, offsets, const)

    def bounds(self, x: torch.Tensor, input_set: InputSet) -> tuple[torch.Tensor, torch.Tensor]:
        """``l = const + min_x' A^T x' + sum_j w_j min(M_j, 0)`` and the matching ``u``."""
        batch, shape = x.shape[0], self.const.shape[1:]
        g = self.inputs.expand(batch, *self.inputs.shape[1:]).flatten(2).transpose(1, 2)
        g = g.reshape(batch, numel(shape), *x.shape[1:])
        centre, support = input_set.centre_and_support(x, g)
        lower = self.const.flatten(1) + centre - support
        upper = self.const.flatten(1) + centre + support
        for columns, widths in self.offsets:
            m = columns.flatten(2)
            w = widths.unsqueeze(2)
            lower = lower + (w * m.clamp(max=0)).sum(1)
            upper = upper + (w * m.clamp(min=0)).sum(1)
        return lower.reshape(batch, *shape), upper.reshape(batch, *shape)


@dataclass(frozen=True, eq=False)
class _LinearTail:
    """The fixed-slope dual from the output of layer ``depth - 1`` down to the input, over that layer's units.

    With ``alpha = d`` everything in eq. (6) but the ReLU terms is linear in ``nu`` there, and so
    is each ReLU layer's ``nu`` before ``[.]_+``.  ``terms`` and ``relus`` were recorded by the
    bound pass that started from ``nu = -I`` (Algorithm 1's bounds on that layer), so any later
    objective's pass finishes with products by them instead of a second pass through the layers
    below (the ReLU terms are recomputed from its own ``nu``).
    """

    depth: int
    terms: DualTerms
    relus: list[tuple[torch.Tensor, torch.Tensor]]

    def finish(self, nu: torch.Tensor, bias: torch.Tensor, relu: torch.Tensor,
               relu_neg: torch.Tensor | None) -> DualTerms:
        """:class:`DualTerms` of the whole pass, given ``nu: (B or 1, m, *shape)`` at the tail's top."""
        v = -nu.flatten(2)  # the recorded pass is F(-I): F(nu) = (-nu) F(-I)
        bias = bias + rows_dot(v.expand(bias.shape[0], -1, -1), self.terms.bias)
        nu_hat_1 = v @ self.terms.nu_hat_1.flatten(2)
        for lower, pre in self.relus:
            relu, relu_neg = _relu_terms(lower, v @ pre, relu, relu_neg)
        return DualTerms(nu_hat_1.unflatten(2, self.terms.nu_hat_1.shape[2:]), bias, relu, relu_neg)


class _ShortcutLinear(NamedTuple):
    """The maps of ``w`` in :meth:`DualNetwork._shortcut_linear`, linear in ``w``: the bias term ``(B, m)``,
    ``nu_hat_1`` ``(B, m, *in_shape)`` and ``nu_hat_0`` on the first ReLU layer's unstable units ``(B, m, K_0)``."""

    bias: torch.Tensor
    nu_hat_1: torch.Tensor
    nu_hat_0: torch.Tensor


def _on_units(t: torch.Tensor, index: torch.Tensor, per_objective: bool = False) -> torch.Tensor:
    """Values of a layer ``t: (B, *shape)``, or ``(B, m, *shape)`` per objective, at the flat units
    ``index: (B, K)``: ``(B, 1, K)`` or ``(B, m, K)``."""
    flat = t.flatten(2) if per_objective else t.flatten(1).unsqueeze(1)
    return torch.gather(flat, 2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))


@dataclass(frozen=True, eq=False)
class _SlopeTail:
    """The bound pass of the third layer's units ``units`` (``c = e_u``), kept at the second convolution's
    output, for the later passes in the same slope mode.

    There ``w = -nu`` is ``-d v - corr(v)`` for ``v = W_3^T nu_3`` (``nu_3`` on the third layer's output),
    with ``corr(v) = (a - d) [v]_-`` on the second ReLU layer's unstable set ``I_2`` (eq. 7).  ``v`` is
    linear in ``nu_3``; a later pass's ``nu_3`` lives on units whose upper bound is positive, all
    among ``units``, so ``nu_3 = sum_j coef_j (-e_j)`` and ``w = sum_j coef_j w_j + delta`` with
    ``delta = sum_j coef_j corr(v_j) - corr(v)`` on ``I_2`` only.
    The maps of :meth:`DualNetwork._shortcut_linear` are linear, so the pass finishes with the kept
    maps of the ``w_j`` and those of ``delta`` (a few dozen sparse columns) instead of a fold.
    """

    units: torch.Tensor  # (B, k), padded slots not valid
    valid: torch.Tensor
    linear: _ShortcutLinear  # of the w_j, (B, k, ...)
    corr: torch.Tensor  # corr(v_j) on I_2, (B, k, K_2)

    @classmethod
    def record(cls, keep: tuple[torch.Tensor, torch.Tensor], linear: _ShortcutLinear,
               corr: torch.Tensor) -> _SlopeTail:
        """Keep the first ``k`` objectives of a pass (``corr``: its ``corr(v)`` on ``I_2``, ``(B, m, K_2)``)."""
        units, valid = keep
        k = units.shape[1]
        return cls(units, valid, _ShortcutLinear(*(t[:, :k] for t in linear)), corr[:, :k])

    def finish(self, dual: DualNetwork, nu: torch.Tensor, corr: torch.Tensor) -> _ShortcutLinear:
        """The maps for ``nu: (B or 1, m, *shape)`` on the third layer's output, with its ``corr(v)`` on ``I_2``."""
        batch, m = corr.shape[:2]
        coef = -_on_units(nu.expand(batch, *nu.shape[1:]), self.units, True) * self.valid.unsqueeze(1)  # (B, m, k)
        index = dual.relaxations[1].unstable_index[0]
        delta = coef @ self.corr - corr  # the w-space correction (w = -nu), (B, m, K_2), 0 on padded slots
        terms, shape = dual._prefix_terms, dual.shapes[2]
        pm = position_major_index(index, shape)
        bias = (coef @ self.linear.bias.unsqueeze(2)).squeeze(2) + rows_dot(
            delta, torch.gather(terms.bias.reshape(batch, -1), 1, pm))
        fold = patch_rows(terms, shape, dual.shapes[0], index).rmatmul(delta)
        nu_hat_1 = (coef @ self.linear.nu_hat_1.flatten(2)).reshape(batch, m, *dual.shapes[0]) + fold.reshape(
            batch, m, *dual.shapes[0])
        spread = delta.new_zeros(batch, numel(shape), m).scatter_add(1, pm.unsqueeze(2).expand(-1, -1, m),
                                                                    delta.transpose(1, 2))
        nu_hat_0 = coef @ self.linear.nu_hat_0 - dual._unstable_rows.matmul(spread).transpose(1, 2)
        return _ShortcutLinear(bias, nu_hat_1, nu_hat_0)


def _relu_terms(
    lower: torch.Tensor, nu: torch.Tensor, relu: torch.Tensor, relu_neg: torch.Tensor | None,
    record: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Add eq. (6)'s ``sum l [nu]_+`` (and ``sum l [-nu]_+`` for linear passes) over unstable units.

    ``lower: (B, 1, K)`` is ``l`` on the unstable units (0 on padding), ``nu: (B, m, K)`` there;
    ``record`` (if given) keeps both.
    """
    if record is not None:
        record.append((lower, nu))
    relu = relu + (lower * nu.clamp_min(0)).sum(2)
    if relu_neg is not None:
        relu_neg = relu_neg + (lower * (-nu).clamp_min(0)).sum(2)
    return relu, relu_neg


def _scaled_position_major(nu_hat: torch.Tensor, r: Relaxation, corr: torch.Tensor | None, batch: int) -> torch.Tensor:
    """``-nu`` of eq. (7)'s ReLU step ``nu = [nu_hat]_+ d - [nu_hat]_- a``, laid out ``(B, L, C, m)``.

    ``nu_hat: (B or 1, m, C, H, W)`` (the sign goes on it, which may be shared).  Slopes ``a`` other
    than ``d`` differ from it on the unstable set ``I`` only: ``nu = d nu_hat + corr`` with
    ``corr = (a - d) [nu_hat]_-`` there, given as ``(B, m, K)`` on :attr:`Relaxation.unstable_index`
    (``None``: linear) and added to the linear product at those units.
    """
    def pm(t: torch.Tensor) -> torch.Tensor:  # (., C, H, W) -> (., L, C, 1); (., m, C, H, W) -> (., L, C, m)
        t = t.flatten(2).transpose(1, 2).unsqueeze(3) if t.dim() == 4 else t.flatten(3).permute(0, 3, 2, 1)
        return t.contiguous()  # small (a shared nu_hat, slopes): the product then comes out contiguous

    v = pm(nu_hat)
    w = (pm(r.upper_slope) * -v).expand(batch, *v.shape[1:])
    if corr is None:
        return w
    m, shape = v.shape[3], tuple(r.lower.shape[1:])
    at = position_major_index(r.unstable_index[0], shape).unsqueeze(2).expand(-1, -1, m)  # (B, K, m)
    # w is a fresh product (its inputs carry the gradient)
    w.view(batch, -1, m).scatter_add_(1, at, -corr.transpose(1, 2))
    return w


def unstable_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the unstable units of each example, padded to the batch's largest ``|I|``.

    Returns ``(index: (B, K), valid: (B, K))``; padded slots point at unit 0 and are not valid.
    """
    flat = mask.flatten(1)
    k = int(flat.sum(1).max()) if flat.numel() else 0
    index = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, :k]
    valid = torch.gather(flat, 1, index)
    return torch.where(valid, index, torch.zeros_like(index)), valid


def _unstable_columns(relax: Relaxation) -> tuple[torch.Tensor, torch.Tensor]:
    """One basis column per unstable unit, padded to the batch's largest ``|I|``.

    Returns ``(columns: (B, K, *shape), widths: (B, K))`` with ``widths = -d l`` (0 for padding).
    """
    index, valid = unstable_indices(relax.sets.unstable)
    batch, n = index.shape[0], numel(relax.lower.shape[1:])
    w_all = (-relax.upper_slope * relax.lower_unstable).flatten(1)
    widths = torch.gather(w_all, 1, index) * valid
    columns = torch.zeros(batch, index.shape[1], n, dtype=w_all.dtype, device=w_all.device)
    columns.scatter_(2, index.unsqueeze(2), valid.unsqueeze(2).to(w_all.dtype))
    return columns.reshape(batch, index.shape[1], *relax.lower.shape[1:]), widths
