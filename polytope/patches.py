"""The dual network restricted to receptive fields, for bounds on convolutional layers.

Bounding unit ``(c, h, w)`` of a convolution runs the dual network (eq. 7) from
``c = e_(c,h,w)``.  When every layer up to that one is a convolution, ``nu_hat`` at each
earlier layer is nonzero only on the unit's receptive field: a ``(C, K, K)`` patch whose
top-left corner sits at ``(h * S - P, w * S - P)`` for the composite stride ``S`` and padding
``P``.  Carrying these patches instead of full-size identity columns cuts the arithmetic of
Algorithm 1 on the paper's MNIST model by an order of magnitude, with the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from polytope.network import Conv2dOp, Network, Shape, numel


@dataclass(frozen=True)
class PatchGeometry:
    """Receptive-field geometry: patch size ``K``, composite ``stride`` and ``padding``."""

    size: int
    stride: int
    padding: int

    def through(self, op: Conv2dOp) -> PatchGeometry:
        """Geometry one convolution further back (the transpose of ``op`` widens the patch)."""
        (k, _), (s, _), (p, _) = op.module.kernel_size, op.module.stride, op.module.padding
        return PatchGeometry((self.size - 1) * s + k, self.stride * s, self.padding * s + p)

    def unfold(self, t: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """Patches of ``t: (B, C, H, W)`` under every output unit: ``(B, H_o, W_o, C, K, K)``.

        Positions outside ``t`` read as zero (zero padding), so they add nothing.
        """
        h_o, w_o = out_hw
        pad_h = max(0, (h_o - 1) * self.stride + self.size - self.padding - t.shape[2])
        pad_w = max(0, (w_o - 1) * self.stride + self.size - self.padding - t.shape[3])
        t = F.pad(t, (self.padding, pad_w, self.padding, pad_h))
        cols = t.unfold(2, self.size, self.stride).unfold(3, self.size, self.stride)[:, :, :h_o, :w_o]
        return cols.permute(0, 2, 3, 1, 4, 5)


def _is_square(op: Conv2dOp) -> bool:
    """Same kernel size, stride and padding along both axes (:class:`PatchGeometry` has one of each)."""
    m = op.module
    return all(pair[0] == pair[1] for pair in (m.kernel_size, m.stride, m.padding))


def conv_prefix(net: Network, depth: int) -> list[Conv2dOp] | None:
    """The convolutions of layers ``0..depth`` if each is a single square Conv2d, else ``None``.

    ``None`` sends the dual to the plain contraction orders, which handle any convolution.
    """
    ops = []
    for layer in net.layers[: depth + 1]:
        if len(layer.ops) != 1 or not isinstance(layer.ops[0], Conv2dOp) or not _is_square(layer.ops[0]):
            return None
        ops.append(layer.ops[0])
    return ops


class PatchTerms(NamedTuple):
    """Eq. (6)'s terms for ``c = sign * e_u`` over every unit ``u`` of a convolutional layer.

    Mirrors :class:`polytope.dual.DualTerms` with patches: ``nu_hat_1`` is ``(B, U, C_0, K, K)``
    and ``geometry`` says where each patch sits in the input.
    """

    nu_hat_1: torch.Tensor
    geometry: PatchGeometry
    bias: torch.Tensor
    relu: torch.Tensor
    relu_neg: torch.Tensor | None


def _channel_bias(op: Conv2dOp, like: torch.Tensor) -> torch.Tensor:
    b = op.module.bias
    return torch.zeros(op.module.out_channels, dtype=like.dtype, device=like.device) if b is None else b


def _patch_transpose_matrix(op: Conv2dOp, patch_shape: tuple[int, ...]) -> torch.Tensor:
    """The transpose of ``op`` on one ``(C, K, K)`` patch as a dense ``(C K K, C' K' K')`` matrix.

    Small (a few hundred rows), so one GEMM over all units beats ``conv_transpose2d`` on
    thousands of tiny images.  Built from the live weight, so gradients flow through it.
    """
    m = op.module
    n = 1
    for s in patch_shape:
        n *= s
    eye = torch.eye(n, dtype=m.weight.dtype, device=m.weight.device).reshape(n, *patch_shape)
    return F.conv_transpose2d(eye, m.weight, None, m.stride).flatten(1)


def patch_backward(
    ops: list[Conv2dOp],
    out_shape: Shape,
    upper_slopes: list[torch.Tensor],
    lower_unstable: list[torch.Tensor],
    lower_slopes: list[torch.Tensor] | None,
    sign: float,
) -> PatchTerms:
    """Eq. (7) from ``c = sign * e_u`` for every unit ``u`` of the last convolution in ``ops``.

    ``out_shape`` is the last convolution's output shape; ``upper_slopes``,
    ``lower_unstable`` (``l`` on ``I``, else 0) and ``lower_slopes`` (``None``: linear,
    ``alpha = d``) describe the ReLU after each convolution but the last.
    """
    last = ops[-1]
    c_out, h_o, w_o = out_shape
    batch = upper_slopes[0].shape[0]
    weight = last.module.weight
    units = c_out * h_o * w_o
    # nu_{i+1} = -sign e_u, so nu_hat_i = -sign W^T e_u: the kernel of channel c, at every (h, w).
    kernel = -sign * weight
    nu_hat = kernel[None, :, None, None].expand(batch, c_out, h_o, w_o, *weight.shape[1:])
    bias = (-sign * _channel_bias(last, weight)).reshape(1, c_out, 1, 1).expand(batch, c_out, h_o, w_o)
    bias = bias.reshape(batch, units)
    k, s, p = last.module.kernel_size[0], last.module.stride[0], last.module.padding[0]
    geometry = PatchGeometry(k, s, p)
    # The first ReLU below: nu_hat is the kernel itself, so the ReLU and bias terms of eq. (6)
    # are ordinary convolutions of the slope maps with the kernel's positive/negative parts.
    j = len(ops) - 2
    relu, relu_neg, first_bias = _first_relu_terms(last, kernel, upper_slopes[j], lower_unstable[j],
                                                   None if lower_slopes is None else lower_slopes[j],
                                                   _channel_bias(ops[j], weight))
    bias = bias + first_bias.reshape(batch, units)
    relu, relu_neg = relu.reshape(batch, units), None if relu_neg is None else relu_neg.reshape(batch, units)
    for j in range(len(ops) - 2, -1, -1):
        d = geometry.unfold(upper_slopes[j], (h_o, w_o)).unsqueeze(1)
        if lower_slopes is None:
            nu = d * nu_hat
        else:
            a = geometry.unfold(lower_slopes[j], (h_o, w_o)).unsqueeze(1)
            nu = torch.where(nu_hat >= 0, d, a) * nu_hat
        if j < len(ops) - 2:
            lower = geometry.unfold(lower_unstable[j], (h_o, w_o)).unsqueeze(1)
            relu = relu + (lower * nu.clamp_min(0)).flatten(4).sum(4).reshape(batch, units)
            if relu_neg is not None:
                relu_neg = relu_neg + (lower * (-nu).clamp_min(0)).flatten(4).sum(4).reshape(batch, units)
            bias = bias + torch.einsum("bchwkxy,k->bchw", nu, _channel_bias(ops[j], nu)).reshape(batch, units)
        op = ops[j]
        geometry = geometry.through(op)
        nu_hat = (nu.flatten(4) @ _patch_transpose_matrix(op, tuple(nu.shape[4:]))).reshape(
            batch, c_out, h_o, w_o, op.module.in_channels, geometry.size, geometry.size
        )
    return PatchTerms(nu_hat.reshape(batch, units, *nu_hat.shape[4:]), geometry, bias, relu, relu_neg)


def _first_relu_terms(
    conv: Conv2dOp, kernel: torch.Tensor, d: torch.Tensor, lower: torch.Tensor, a: torch.Tensor | None,
    bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``sum l [nu]_+``, ``sum l [-nu]_+`` (linear only) and ``sum nu b`` when ``nu_hat`` is ``kernel``.

    With ``nu = d [kernel]_+ - a [kernel]_-`` (``a = d`` when linear) each term is a convolution of
    a per-unit map with the positive or negative part of the kernel.
    """
    m = conv.module

    def conv(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, None, m.stride, m.padding)

    pos, neg = kernel.clamp_min(0), (-kernel).clamp_min(0)
    b_map = bias.reshape(1, -1, 1, 1)
    relu = conv(lower * d, pos)
    if a is None:
        return relu, conv(lower * d, neg), conv(d * b_map, kernel)
    return relu, None, conv(d * b_map, pos) - conv(a * b_map, neg)


def patch_box_terms(terms: PatchTerms, lo: torch.Tensor, hi: torch.Tensor,
                    out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``nu_hat_1^T m`` and ``|nu_hat_1|^T r`` for every unit, each ``(B, U)``, with the box's centre ``m``
    and radius ``r``.

    ``min_{x' in [lo, hi]} (-sign nu_hat_1)^T x' = -sign nu_hat_1^T m - |nu_hat_1|^T r`` for either sign.
    """
    batch, units = terms.nu_hat_1.shape[:2]
    centre = terms.geometry.unfold((lo + hi) / 2, out_hw).flatten(3).flatten(1, 2)  # (B, L, P)
    radius = terms.geometry.unfold((hi - lo) / 2, out_hw).flatten(3).flatten(1, 2)
    g = terms.nu_hat_1.reshape(batch, units // centre.shape[1], *centre.shape[1:])  # (B, C, L, P)
    linear = (g * centre.unsqueeze(1)).sum(3)
    spread = torch.linalg.vector_norm(g * radius.unsqueeze(1), ord=1, dim=3)
    return linear.reshape(batch, units), spread.reshape(batch, units)


def prefix_pair_terms(
    ops: list[Conv2dOp], out_shape: Shape, linear: PatchTerms, relax_unstable: torch.Tensor,
    upper_slope: torch.Tensor, lower_unstable: torch.Tensor, lower_slope: torch.Tensor,
) -> tuple[PatchTerms, PatchTerms]:
    """``patch_backward(ops, out_shape, [d], [l], [a], sign)`` for ``sign = +1, -1`` on a two-convolution prefix.

    With ``W`` the second kernel, eq. (7) gives ``nu = -d W - (a - d) [W]_+`` for ``sign = +1`` and
    ``nu = d W + (a - d) [W]_-`` for ``sign = -1``, so both ``nu_hat_1`` are the linear pass
    (``linear``: ``alpha = d``, ``sign = +1``) plus ``(a - d) [W]_+- T``.  ``a - d`` vanishes off the
    unstable set ``relax_unstable`` of the first ReLU, so each output position needs only the few
    unstable units of its receptive field: a small product per position instead of a full pass.
    """
    op0, op1 = ops
    weight = op1.module.weight
    c_out, h_o, w_o = out_shape
    batch = upper_slope.shape[0]
    k, st, p = op1.module.kernel_size[0], op1.module.stride[0], op1.module.padding[0]
    field = PatchGeometry(k, st, p)

    def unfold(t: torch.Tensor) -> torch.Tensor:
        return field.unfold(t, (h_o, w_o)).reshape(batch, h_o * w_o, -1)  # (B, L, C_0 k k)

    mask = unfold(relax_unstable.to(weight.dtype))
    kp = int(mask.sum(2).max()) if mask.numel() else 0
    taps = torch.argsort(-mask, dim=2, stable=True)[:, :, :kp]  # the unstable taps first: (B, L, kp)
    diff = torch.gather(unfold(lower_slope - upper_slope) * mask, 2, taps)
    transpose = _patch_transpose_matrix(op0, tuple(weight.shape[1:]))  # (C_0 k k, P)
    rows = transpose[taps] * diff.unsqueeze(3)  # (B, L, kp, P)
    w = weight.flatten(1)
    parts = torch.cat([w.clamp_min(0), w.clamp_max(0)])[:, taps].permute(1, 2, 0, 3)  # (B, L, 2 C, kp)
    corr = (parts @ rows).reshape(batch, h_o * w_o, 2, c_out, -1).permute(2, 0, 3, 1, 4)  # (2, B, C, L, P)
    corr = corr.reshape(2, *linear.nu_hat_1.shape)
    out = []
    for sign, nu_hat_1 in ((1.0, linear.nu_hat_1 - corr[0]), (-1.0, corr[1] - linear.nu_hat_1)):
        kernel = -sign * weight
        relu, _, first = _first_relu_terms(op1, kernel, upper_slope, lower_unstable, lower_slope,
                                           _channel_bias(op0, weight))
        bias = (-sign * _channel_bias(op1, weight)).reshape(1, c_out, 1, 1) + first
        out.append(PatchTerms(nu_hat_1, linear.geometry, bias.reshape(batch, -1), relu.reshape(batch, -1), None))
    return out[0], out[1]


def _taps(n_in: int, n_out: int, k: int, s: int, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis: for every input position, the outputs that read it and through which tap.

    Returns ``(out, tap, ok)``, each ``(n_in, ceil(k / s))``; entries with ``ok`` false are 0.
    """
    reach = -(-k // s)
    i = np.arange(n_in)[:, None]
    t = (i + p) % s + s * np.arange(reach)[None, :]
    o = (i + p - t) // s
    ok = (t < k) & (o >= 0) & (o < n_out)
    return np.where(ok, o, 0), np.where(ok, t, 0), ok


@lru_cache(maxsize=64)
def _transpose_index(op: Conv2dOp, in_shape: Shape, out_shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """For every input unit of ``op``, the output units and kernel taps that read it.

    Returns ``(out_index, weight_index)``, each ``(n_in, R)`` with ``R`` the most readers of one
    input unit; ``weight_index`` is the number of weights (one past the last) where a slot is
    unused, and its ``out_index`` is 0.
    """
    m = op.module
    c_in, h_in, w_in = in_shape
    c_out, h_out, w_out = out_shape
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = m.kernel_size, m.stride, m.padding
    oh, th, okh = _taps(h_in, h_out, k_h, s_h, p_h)
    ow, tw, okw = _taps(w_in, w_out, k_w, s_w, p_w)
    co = np.arange(c_out)[None, None, None, :, None, None]
    ci = np.arange(c_in)[:, None, None, None, None, None]
    # axes: (ci, hi, wi, co, rh, rw)
    out = (co * h_out + oh[None, :, None, None, :, None]) * w_out + ow[None, None, :, None, None, :]
    widx = ((co * c_in + ci) * k_h + th[None, :, None, None, :, None]) * k_w + tw[None, None, :, None, None, :]
    valid = okh[None, :, None, None, :, None] & okw[None, None, :, None, None, :]
    full = (c_in, h_in, w_in, c_out, oh.shape[1], ow.shape[1])
    n_in = c_in * h_in * w_in
    out = np.where(valid, out, 0)
    widx = np.where(valid, widx, m.weight.numel())
    return (torch.from_numpy(np.broadcast_to(out, full).reshape(n_in, -1).copy()),
            torch.from_numpy(np.broadcast_to(widx, full).reshape(n_in, -1).copy()))


@lru_cache(maxsize=64)
def _kernel_index(op: Conv2dOp, in_shape: Shape, out_shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """For every output unit of ``op``, the input units it reads and through which weight.

    Returns ``(in_index, weight_index)``, each ``(n_out, C_in k_h k_w)``; taps that fall on
    the zero padding have ``weight_index`` one past the last weight (and ``in_index`` 0).
    """
    m = op.module
    c_in, h_in, w_in = in_shape
    c_out, h_out, w_out = out_shape
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = m.kernel_size, m.stride, m.padding
    ih = np.arange(h_out)[:, None] * s_h - p_h + np.arange(k_h)[None, :]  # (h_out, k_h)
    iw = np.arange(w_out)[:, None] * s_w - p_w + np.arange(k_w)[None, :]
    okh, okw = (ih >= 0) & (ih < h_in), (iw >= 0) & (iw < w_in)
    co = np.arange(c_out)[:, None, None, None, None, None]
    ci = np.arange(c_in)[None, None, None, :, None, None]
    th, tw = np.arange(k_h)[None, None, None, None, :, None], np.arange(k_w)[None, None, None, None, None, :]
    # axes: (co, ho, wo, ci, th, tw)
    valid = okh[None, :, None, None, :, None] & okw[None, None, :, None, None, :]
    inp = (ci * h_in + ih[None, :, None, None, :, None]) * w_in + iw[None, None, :, None, None, :]
    widx = ((co * c_in + ci) * k_h + th) * k_w + tw
    full = (c_out, h_out, w_out, c_in, k_h, k_w)
    n_out = c_out * h_out * w_out
    inp = np.where(valid, np.broadcast_to(inp, full), 0)
    widx = np.where(valid, np.broadcast_to(widx, full), m.weight.numel())
    return torch.from_numpy(inp.reshape(n_out, -1)), torch.from_numpy(widx.reshape(n_out, -1))


def _scatter_rows(op: Conv2dOp, index: tuple[torch.Tensor, torch.Tensor], units: torch.Tensor,
                  width: int) -> torch.Tensor:
    """Dense rows ``(B, K, width)`` holding ``op``'s weights at the slots ``index`` lists for ``units``."""
    cols, widx = (t.to(units.device)[units] for t in index)
    vals = F.pad(op.module.weight.flatten(), (0, 1))[widx]
    # unused slots read the appended zero weight and add it to column 0
    return vals.new_zeros(*units.shape, width).scatter_add(2, cols, vals)


def transpose_rows(op: Conv2dOp, in_shape: Shape, out_shape: Shape, units: torch.Tensor) -> torch.Tensor:
    """Rows of ``W^T`` at selected input units, ``(B, K, n_out)`` for ``units: (B, K)``.

    ``(W^T nu)`` at those units is then one batched product ``nu @ rows^T``: each row has at
    most ``C_out ceil(k/s)^2`` nonzeros, and ``K`` is small (the unstable units of a layer).
    """
    return _scatter_rows(op, _transpose_index(op, in_shape, out_shape), units, numel(out_shape))


def kernel_rows(op: Conv2dOp, in_shape: Shape, out_shape: Shape, units: torch.Tensor) -> torch.Tensor:
    """Rows of ``W`` at selected output units, ``(B, K, n_in)``: each unit's kernel placed in the input.

    ``W^T delta`` for a ``delta`` supported on those units is ``delta @ rows``.
    """
    return _scatter_rows(op, _kernel_index(op, in_shape, out_shape), units, numel(in_shape))


@lru_cache(maxsize=64)
def _patch_index(geometry: PatchGeometry, out_shape: Shape, in_shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """For every unit of a ``out_shape`` layer, the input units under its patch entries.

    Returns ``(in_index, valid)``, each ``(U, C K K)``; entries off the input are not valid
    (and point at unit 0).
    """
    c_out, h_o, w_o = out_shape
    c_in, h_in, w_in = in_shape
    k, s, p = geometry.size, geometry.stride, geometry.padding
    ih = np.arange(h_o)[:, None] * s - p + np.arange(k)[None, :]  # (h_o, K)
    iw = np.arange(w_o)[:, None] * s - p + np.arange(k)[None, :]
    ci = np.arange(c_in)[None, None, :, None, None]
    # axes: (ho, wo, ci, ky, kx)
    valid = ((ih >= 0) & (ih < h_in))[:, None, None, :, None] & ((iw >= 0) & (iw < w_in))[None, :, None, None, :]
    index = (ci * h_in + ih[:, None, None, :, None]) * w_in + iw[None, :, None, None, :]
    full = (h_o, w_o, c_in, k, k)
    valid = np.broadcast_to(valid, full).reshape(1, h_o * w_o, -1)
    index = np.where(valid, np.broadcast_to(index, full).reshape(1, h_o * w_o, -1), 0)
    valid, index = (np.broadcast_to(t, (c_out, *t.shape[1:])).reshape(c_out * h_o * w_o, -1) for t in (valid, index))
    return torch.from_numpy(index.copy()), torch.from_numpy(valid.copy())


def patch_rows(terms: PatchTerms, out_shape: Shape, in_shape: Shape, units: torch.Tensor) -> torch.Tensor:
    """The patches ``nu_hat_1(u)`` of selected units placed in the input, ``(B, K, n_in)``.

    ``fold_patches`` of a ``w`` supported on those units is then ``w @ rows``.
    """
    index, valid = (t.to(units.device)[units] for t in _patch_index(terms.geometry, out_shape, in_shape))
    patches = terms.nu_hat_1.flatten(2)
    patches = torch.gather(patches, 1, units.unsqueeze(2).expand(-1, -1, patches.shape[2]))
    # entries off the input are zeroed and added to unit 0
    vals = patches * valid.to(patches.dtype)
    return vals.new_zeros(*units.shape, numel(in_shape)).scatter_add(2, index, vals)


def fold_patches(w: torch.Tensor, terms: PatchTerms, in_shape: Shape) -> torch.Tensor:
    """``sum_u w_u nu_hat_1(u)``: combine the units' input patches, ``w: (B, m, C, H, W)``.

    Per output position a ``(m x C) @ (C x patch)`` product, then the patches are folded
    back into the input image.  Returns ``(B, m, *in_shape)``.
    """
    batch, m, c, h_o, w_o = w.shape
    patches = terms.nu_hat_1.flatten(2).reshape(batch, c, h_o * w_o, numel(terms.nu_hat_1.shape[2:]))
    patches = patches.transpose(1, 2)  # (B, L, C, P)
    coef = w.reshape(batch, m, c, h_o * w_o).permute(0, 3, 1, 2)  # (B, L, m, C)
    z = torch.matmul(coef, patches)  # (B, L, m, P)
    g = terms.geometry
    z = z.permute(0, 2, 3, 1).reshape(batch * m, patches.shape[-1], h_o * w_o)
    _, h_in, w_in = in_shape
    full_h = (h_o - 1) * g.stride + g.size
    full_w = (w_o - 1) * g.stride + g.size
    img = F.fold(z, (full_h, full_w), g.size, stride=g.stride)
    img = F.pad(img, (0, max(0, w_in + g.padding - full_w), 0, max(0, h_in + g.padding - full_h)))
    return img[:, :, g.padding:g.padding + h_in, g.padding:g.padding + w_in].reshape(batch, m, *in_shape)
