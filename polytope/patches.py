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


def conv_prefix(net: Network, depth: int) -> list[Conv2dOp] | None:
    """The convolutions of layers ``0..depth`` if each of them is a single Conv2d, else ``None``."""
    ops = []
    for layer in net.layers[: depth + 1]:
        if len(layer.ops) != 1 or not isinstance(layer.ops[0], Conv2dOp):
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


def patch_box_term(terms: PatchTerms, lo: torch.Tensor, hi: torch.Tensor, out_hw: tuple[int, int],
                   sign: float) -> torch.Tensor:
    """``min_{x' in [lo, hi]} (-sign nu_hat_1)^T x'`` for every unit, ``(B, U)``."""
    centre = terms.geometry.unfold((lo + hi) / 2, out_hw)
    radius = terms.geometry.unfold((hi - lo) / 2, out_hw)
    batch = lo.shape[0]
    g = (-sign * terms.nu_hat_1).reshape(batch, terms.nu_hat_1.shape[1] // (centre.shape[1] * centre.shape[2]),
                                         *centre.shape[1:3], *terms.nu_hat_1.shape[2:])
    value = (g * centre.unsqueeze(1)).flatten(4).sum(4) - (g.abs() * radius.unsqueeze(1)).flatten(4).sum(4)
    return value.reshape(batch, terms.nu_hat_1.shape[1])


@lru_cache(maxsize=64)
def _transpose_index(op: Conv2dOp, in_shape: Shape, out_shape: Shape) -> tuple[torch.Tensor, ...]:
    """For every input unit of ``op``, the output units and kernel taps that read it.

    Returns ``(out_index, weight_index, valid)``, each ``(n_in, R)`` with ``R`` the most
    readers of one input unit; ``out_index`` points at a zero slot ``n_out`` where invalid.
    """
    m = op.module
    c_in, h_in, w_in = in_shape
    c_out, h_out, w_out = out_shape
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = m.kernel_size, m.stride, m.padding

    def taps(n_in: int, n_out: int, k: int, s: int, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        reach = -(-k // s)
        i = np.arange(n_in)[:, None]
        first = (i + p) % s
        t = first + s * np.arange(reach)[None, :]
        o = (i + p - t) // s
        ok = (t < k) & (o >= 0) & (o < n_out)
        return np.where(ok, o, 0), np.where(ok, t, 0), ok

    oh, th, okh = taps(h_in, h_out, k_h, s_h, p_h)
    ow, tw, okw = taps(w_in, w_out, k_w, s_w, p_w)
    co = np.arange(c_out)
    ci = np.arange(c_in)
    # axes: (ci, hi, wi, co, rh, rw)
    out = (co[None, None, None, :, None, None] * h_out + oh[None, :, None, None, :, None]) * w_out \
        + ow[None, None, :, None, None, :]
    widx = ((co[None, None, None, :, None, None] * c_in + ci[:, None, None, None, None, None]) * k_h
            + th[None, :, None, None, :, None]) * k_w + tw[None, None, :, None, None, :]
    valid = okh[None, :, None, None, :, None] & okw[None, None, :, None, None, :]
    full = (c_in, h_in, w_in, c_out, oh.shape[1], ow.shape[1])
    valid = np.broadcast_to(valid, full)
    n_in = c_in * h_in * w_in
    out = np.where(valid, np.broadcast_to(out, full), c_out * h_out * w_out).reshape(n_in, -1)
    widx = np.where(valid, np.broadcast_to(widx, full), 0).reshape(n_in, -1)
    return torch.from_numpy(out), torch.from_numpy(widx), torch.from_numpy(valid.reshape(n_in, -1).copy())


def transpose_at(op: Conv2dOp, in_shape: Shape, nu: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """``(W^T nu)`` at selected input units only: ``nu: (B, m, *out_shape)``, ``units: (B, K)``.

    Each input unit is read by at most ``C_out * ceil(k/s)^2`` outputs, so this costs
    ``O(m K C_out)`` instead of a full transposed convolution.  Returns ``(B, m, K)``.
    """
    out_index, weight_index, valid = (t.to(nu.device) for t in _transpose_index(op, in_shape, tuple(nu.shape[2:])))
    batch, m = nu.shape[:2]
    rows = out_index[units]  # (B, K, R)
    weights = op.module.weight.flatten()[weight_index[units]] * valid[units].to(nu.dtype)
    # rows of (B, U + 1, m): each gathered row is m contiguous values (the zero slot is U)
    table = torch.cat([nu.flatten(2), nu.new_zeros(batch, m, 1)], dim=2).transpose(1, 2)
    picked = table[torch.arange(batch, device=nu.device)[:, None, None], rows]  # (B, K, R, m)
    return torch.matmul(weights.unsqueeze(2), picked).squeeze(2).transpose(1, 2)


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
