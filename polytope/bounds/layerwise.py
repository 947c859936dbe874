"""Naive "layerwise" interval bounds (Appendix B.1, "Comparison to Naive Layerwise Bounds").

The paper contrasts its dual bounds with bounds found "by iteratively determining absolute
allowable ranges for each activation in a network (via a simple norm bound), then for future
layers, assuming each activation can vary arbitrarily within this range"; eq. (42) is what
they give for the network of Figure 6 (top left), against the true ranges of eq. (41).

With every activation in a box ``z in [m - r, m + r]`` the exact range of ``W z + b`` is::

    zhat in [W m + b - |W| r,  W m + b + |W| r]                       (interval propagation)

and the ReLU maps ``[l, u]`` to ``[max(l, 0), max(u, 0)]``.  The first layer is exact for the
input set itself (the "simple norm bound"): over a box the formula above is exact, and for a
general l_p ball the range of row ``w_j`` is ``w_j^T x + b_j +- eps ||w_j||_q``; so on the first
ReLU layer these bounds coincide with Algorithm 1's (the paper: "in the first hidden layer,
they naturally match our bounds exactly").

``|W| r`` is exact for a layer with at most one mixing operator (one Linear or Conv2d, plus
any Flatten or diagonal eval-mode BatchNorm).  Composing the operators' absolute values,
``|W_2| |W_1| r``, is still sound for a layer that chains two mixing operators with no ReLU in
between (``|W_2 W_1| <= |W_2| |W_1|`` entrywise) but looser; such layers are materialised as
a dense matrix instead so that the interval stays exact.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from polytope.model.network import AffineLayer, Conv2dOp, LinearOp, Network, Shape, numel
from polytope.model.sets import InputSet

Bounds = tuple[torch.Tensor, torch.Tensor]


class LayerwiseBounds(NamedTuple):
    """Interval bounds: ``bounds[i]`` on ReLU layer ``i``'s pre-activation, ``output`` on ``f(x)``.

    Shapes match :attr:`polytope.DualNetwork.bounds` (``(B, *layer_shape)``) and
    :meth:`polytope.DualNetwork.output_bounds` (``(B, n_out)``).
    """

    bounds: list[Bounds]
    output: Bounds


def _mixing_ops(layer: AffineLayer) -> int:
    """How many operators of the layer mix coordinates (Linear, Conv2d)."""
    return sum(isinstance(op, LinearOp | Conv2dOp) for op in layer.ops)


def dense_matrix(layer: AffineLayer, in_shape: Shape, like: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The layer's linear part ``W`` as a dense ``(n_in, n_out)`` matrix (row ``i`` is ``W e_i``)."""
    n_in = numel(in_shape)
    rows = []
    for start in range(0, n_in, chunk):
        stop = min(start + chunk, n_in)
        eye = torch.zeros(stop - start, n_in, dtype=like.dtype, device=like.device)
        eye[:, start:stop] = torch.eye(stop - start, dtype=like.dtype, device=like.device)
        rows.append(layer.linear(eye.reshape(-1, *in_shape)).flatten(1))
    return torch.cat(rows)


def interval_radius(layer: AffineLayer, radius: torch.Tensor, in_shape: Shape) -> torch.Tensor:
    """``|W| r`` for a batch of radii ``r: (B, *in_shape)``; exact for composite layers too."""
    if _mixing_ops(layer) <= 1:
        return layer.abs_linear(radius)
    w = dense_matrix(layer, in_shape, radius)
    out_shape = layer.shapes(in_shape)[-1]
    return (radius.flatten(1) @ w.abs()).reshape(radius.shape[0], *out_shape)


def interval_affine(layer: AffineLayer, lower: torch.Tensor, upper: torch.Tensor, in_shape: Shape) -> Bounds:
    """Exact range of ``W z + b`` over the box ``lower <= z <= upper``: ``W m + b -+ |W| r``."""
    centre = layer.forward((upper + lower) / 2)
    radius = interval_radius(layer, (upper - lower) / 2, in_shape)
    return centre - radius, centre + radius


def first_layer_bounds(net: Network, x: torch.Tensor, input_set: InputSet) -> Bounds:
    """Exact range of ``zhat_2 = W_1 x' + b_1`` over ``x' in S(x)``.

    For l_inf sets (the box ``S(x)`` itself) this is interval arithmetic; for other sets each
    row uses the set's support function, ``min_{x'} w_j^T x' = w_j^T x - eps ||w_j||_q``.
    """
    layer, in_shape = net.layers[0], tuple(x.shape[1:])
    if input_set.is_box:
        lo, hi = input_set.box(x)
        return interval_affine(layer, lo, hi, in_shape)
    out_shape = layer.shapes(in_shape)[-1]
    w = dense_matrix(layer, in_shape, x)  # (n_in, n_out)
    q = getattr(input_set, "q", None)
    if q is not None:  # a centred l_p ball: w_j^T x + b_j -+ eps ||w_j||_q, one norm per unit
        eps = input_set.validate(x)
        centre = layer.forward(x)
        norms = torch.linalg.vector_norm(w, ord=q, dim=0).reshape(out_shape)
        radius = eps.reshape(-1, *([1] * len(out_shape))) * norms
        return centre - radius, centre + radius
    g = w.T.reshape(1, -1, *in_shape).expand(x.shape[0], -1, *in_shape)
    bias = layer.bias(in_shape, x).flatten()
    centre, support = input_set.centre_and_support(x, g)
    lower, upper = centre - support + bias, centre + support + bias
    return lower.reshape(x.shape[0], *out_shape), upper.reshape(x.shape[0], *out_shape)


def layerwise_bounds(net: Network, x: torch.Tensor, input_set: InputSet) -> LayerwiseBounds:
    """The paper's naive layerwise bounds for a batch ``x: (B, *in_shape)``.

    Layer 1 is exact over ``S(x)``; every later layer assumes each activation varies
    independently in ``[relu(l), relu(u)]`` of the previous one.  Differentiable in the
    network's parameters.
    """
    shapes = net.check_input(x)
    input_set.validate(x)
    lower, upper = first_layer_bounds(net, x, input_set)
    bounds: list[Bounds] = []
    for i, (layer, in_shape) in enumerate(zip(net.layers[1:], shapes[1:-1], strict=True)):
        bounds.append((lower, upper))
        lower, upper = interval_affine(layer, *net.activation_interval(i, lower, upper), in_shape)
    return LayerwiseBounds(bounds, (lower, upper))
