"""Exact sparse matrices of the network's affine layers, for the LPs of Appendix A.1.

The LP of eq. (19) has one equality block ``zhat_{i+1} = W_i z_i + b_i`` per layer.  Here each
:class:`~polytope.model.network.AffineLayer` becomes a ``scipy.sparse`` CSR matrix of shape
``(out_numel, in_numel)`` plus a bias vector, in float64 and in torch's C-order flattening.

A convolution is never materialised densely: its nonzeros are enumerated directly, one per
(output position, kernel tap) pair that lands inside the (zero-padded) input, with numpy index
arithmetic.  Linear layers are dense by nature and are converted as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from polytope.model.errors import UnsupportedLayerError
from polytope.model.graph import GraphOp
from polytope.model.network import (
    AffineLayer,
    ChannelAffineOp,
    Conv2dOp,
    FlattenOp,
    GatherOp,
    LinearOp,
    Network,
    Op,
    Shape,
    numel,
)


@dataclass(frozen=True)
class SparseAffine:
    """``y = matrix @ x + bias`` on flattened tensors: ``matrix`` is CSR ``(out_numel, in_numel)``."""

    matrix: sp.csr_matrix
    bias: np.ndarray
    in_shape: Shape
    out_shape: Shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Apply the map to a flat vector (or to the columns of a 2-D array)."""
        out = self.matrix @ x
        return out + (self.bias if out.ndim == 1 else self.bias[:, None])


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64).numpy()


def linear_matrix(op: LinearOp, in_shape: Shape) -> SparseAffine:
    """``nn.Linear``: its (dense) weight as CSR and its bias (zero if absent)."""
    out_shape = op.out_shape(in_shape)
    weight = _numpy(op.module.weight)
    bias = _numpy(op.module.bias)
    bias = np.zeros(out_shape[0]) if bias is None else bias.copy()
    return SparseAffine(sp.csr_matrix(weight), bias, in_shape, out_shape)


def conv2d_matrix(op: Conv2dOp, in_shape: Shape) -> SparseAffine:
    """``nn.Conv2d`` (any stride and zero padding) as a sparse matrix, built tap by tap.

    Output unit ``(o, y, x)`` reads input ``(c, y*s_h - p_h + k_y, x*s_w - p_w + k_x)`` with
    weight ``W[o, c, k_y, k_x]``; taps that fall on the padding are dropped.
    """
    m = op.module
    out_shape = op.out_shape(in_shape)
    c_out, h_out, w_out = out_shape
    c_in, h_in, w_in = in_shape
    k_h, k_w = m.kernel_size
    s_h, s_w = m.stride
    p_h, p_w = m.padding
    weight = _numpy(m.weight)

    # Axes (o, oy, ox, c, ky, kx): entries come out row by row (row = (o, oy, ox)) with increasing
    # columns (c, iy, ix) inside each row, so the CSR arrays are written directly (no sort).
    oy = np.arange(h_out).reshape(1, -1, 1, 1, 1, 1)
    ox = np.arange(w_out).reshape(1, 1, -1, 1, 1, 1)
    c = np.arange(c_in).reshape(1, 1, 1, -1, 1, 1)
    ky = np.arange(k_h).reshape(1, 1, 1, 1, -1, 1)
    kx = np.arange(k_w).reshape(1, 1, 1, 1, 1, -1)
    iy = oy * s_h - p_h + ky
    ix = ox * s_w - p_w + kx
    full = (c_out, h_out, w_out, c_in, k_h, k_w)
    taps = weight[:, None, None]  # (o, 1, 1, c, ky, kx)
    keep = np.broadcast_to((iy >= 0) & (iy < h_in) & (ix >= 0) & (ix < w_in), full) & (taps != 0)
    cols = np.broadcast_to((c * h_in + iy) * w_in + ix, full)[keep]
    vals = np.broadcast_to(taps, full)[keep]
    indptr = np.zeros(numel(out_shape) + 1, dtype=np.int64)
    np.cumsum(keep.reshape(numel(out_shape), -1).sum(axis=1), out=indptr[1:])
    matrix = sp.csr_matrix((vals, cols, indptr), shape=(numel(out_shape), numel(in_shape)))
    bias = _numpy(m.bias)
    flat_bias = np.zeros(numel(out_shape)) if bias is None else np.repeat(bias, h_out * w_out)
    return SparseAffine(matrix, flat_bias, in_shape, out_shape)


def flatten_matrix(op: FlattenOp, in_shape: Shape) -> SparseAffine:
    """``nn.Flatten``: the identity on C-order flattened tensors."""
    n = numel(in_shape)
    return SparseAffine(sp.identity(n, format="csr"), np.zeros(n), in_shape, op.out_shape(in_shape))


def batchnorm_matrix(op: ChannelAffineOp, in_shape: Shape) -> SparseAffine:
    """Eval-mode batch norm or input normalisation: a diagonal matrix of per-channel scales plus shifts."""
    scale_t, shift_t = op._expanded(in_shape)
    scale, shift = _numpy(scale_t), _numpy(shift_t)
    per_channel = numel(in_shape[1:])
    diag = np.repeat(scale, per_channel)
    return SparseAffine(sp.diags(diag, format="csr"), np.repeat(shift, per_channel), in_shape, op.out_shape(in_shape))


def gather_matrix(op: GatherOp, in_shape: Shape) -> SparseAffine:
    """A selection of entries: one 1 per output row (none where the index reads a zero)."""
    index = op.index.reshape(-1).numpy()
    rows = np.flatnonzero(index >= 0)
    matrix = sp.csr_matrix((np.ones(rows.size), (rows, index[rows])), shape=(index.size, numel(in_shape)))
    return SparseAffine(matrix, np.zeros(index.size), in_shape, op.out_shape(in_shape))


def graph_matrix(op: GraphOp, in_shape: Shape) -> SparseAffine:
    """A compiled graph layer: each node's map composed from its arguments', the sources stacked.

    Inputs are row blocks of the identity, an operator composes, a weighted sum adds, and a
    concatenation stacks its arguments' rows in the C order of the concatenated tensor.
    """
    nodes = op.nodes
    sizes = [numel(nodes[i].shape) for i in op.inputs]
    eye = sp.identity(sum(sizes), format="csr")
    maps: dict[int, SparseAffine] = {}
    for i, start, size in zip(op.inputs, np.cumsum([0, *sizes[:-1]]), sizes, strict=True):
        maps[i] = SparseAffine(eye[start:start + size], np.zeros(size), tuple(in_shape), nodes[i].shape)
    for n in op.steps:
        node = nodes[n]
        args = [maps[i] for i in node.inputs]
        if node.kind == "op":
            step = op_matrix(node.op, nodes[node.inputs[0]].shape)
            maps[n] = compose(step, args[0])
        elif node.kind == "sum":
            matrix = sum(c * a.matrix for c, a in zip(node.coeffs, args, strict=True))
            bias = sum(c * a.bias for c, a in zip(node.coeffs, args, strict=True))
            maps[n] = SparseAffine(sp.csr_matrix(matrix), bias, tuple(in_shape), node.shape)
        else:
            offsets = np.cumsum([0] + [numel(nodes[i].shape) for i in node.inputs])
            order = np.concatenate([np.arange(numel(nodes[i].shape)).reshape(nodes[i].shape) + off
                                    for i, off in zip(node.inputs, offsets, strict=False)], axis=node.dim).ravel()
            stacked = sp.vstack([a.matrix for a in args], format="csr")
            bias = np.concatenate([a.bias for a in args])
            maps[n] = SparseAffine(stacked[order], bias[order], tuple(in_shape), node.shape)
    out = [maps[s] for s in op.sources]
    return SparseAffine(sp.vstack([m.matrix for m in out], format="csr"), np.concatenate([m.bias for m in out]),
                        tuple(in_shape), op.out_shape(tuple(in_shape)))


def op_matrix(op: Op | GraphOp, in_shape: Shape) -> SparseAffine:
    """The sparse affine map of one primitive operator (or of a compiled graph layer)."""
    if isinstance(op, LinearOp):
        return linear_matrix(op, in_shape)
    if isinstance(op, Conv2dOp):
        return conv2d_matrix(op, in_shape)
    if isinstance(op, FlattenOp):
        return flatten_matrix(op, in_shape)
    if isinstance(op, ChannelAffineOp):
        return batchnorm_matrix(op, in_shape)
    if isinstance(op, GatherOp):
        return gather_matrix(op, in_shape)
    if isinstance(op, GraphOp):
        return graph_matrix(op, in_shape)
    raise UnsupportedLayerError(f"no sparse form for operator {type(op).__name__}")


def compose(outer: SparseAffine, inner: SparseAffine) -> SparseAffine:
    """``outer(inner(x))``: matrices multiply, ``b = A_outer b_inner + b_outer``."""
    matrix = (outer.matrix @ inner.matrix).tocsr()
    bias = outer.matrix @ inner.bias + outer.bias
    return SparseAffine(matrix, bias, inner.in_shape, outer.out_shape)


def layer_matrix(layer: AffineLayer, in_shape: Shape) -> SparseAffine:
    """The whole :class:`AffineLayer` ``W_i z + b_i`` as one CSR matrix and bias.

    A flatten is the identity on C-order flattened tensors, so it only changes the shape.
    """
    shapes = layer.shapes(tuple(in_shape))
    result: SparseAffine | None = None
    for op, shape in zip(layer.ops, shapes[:-1], strict=True):
        if isinstance(op, FlattenOp):
            continue
        step = op_matrix(op, shape)
        result = step if result is None else compose(step, result)
    if result is None:  # a layer of flattens only
        result = flatten_matrix(FlattenOp(), tuple(in_shape))
    result = SparseAffine(result.matrix, result.bias, tuple(in_shape), shapes[-1])
    result.matrix.sum_duplicates()
    result.matrix.sort_indices()
    return result


def network_matrices(net: Network, in_shape: Shape) -> list[SparseAffine]:
    """One :class:`SparseAffine` per layer of ``net``: ``[W_1, b_1], ..., [W_{k-1}, b_{k-1}]``."""
    shapes = net.shapes(tuple(in_shape))
    return [layer_matrix(layer, s) for layer, s in zip(net.layers, shapes[:-1], strict=True)]
