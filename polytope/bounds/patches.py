"""The dual network restricted to receptive fields, for bounds on convolutional layers.

Bounding unit ``(c, h, w)`` of a convolution runs the dual network (eq. 7) from
``c = e_(c,h,w)``.  When every layer up to that one is a convolution, ``nu_hat`` at each
earlier layer is nonzero only on the unit's receptive field: a ``(C, K, K)`` patch whose
top-left corner sits at ``(h * S - P, w * S - P)`` for the composite stride ``S`` and padding
``P``.  Carrying these patches instead of full-size identity columns cuts the arithmetic of
Algorithm 1 on the paper's MNIST model by an order of magnitude, with the same numbers.

Layout and kernels (each chosen by measurement on a 2-core CPU, see ``benchmarks/``):

* patches are position-major, ``(B, L, P, C)``: per output position a ``(patch x channel)``
  matrix, which is what both consumers multiply;
* through two convolutions with ``alpha = d`` the patches come from :class:`_CellPlan`, one
  GEMM per ``s_0 x s_0`` cell of the patch over the slopes under it (4x fewer multiply-adds
  than expanding the patch transpose, on MNIST);
* :func:`fold_patches` (``sum_u w_u nu_hat_1(u)``) is a batched GEMM per position followed by
  ``ceil(K / S)^2`` shifted adds of stride-sized tiles, with the objectives innermost;
* everything runs in chunks of :data:`CHUNK` examples so that the working set stays in cache.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from polytope.model.network import Conv2dOp, Network, Shape, numel


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

    def pad(self, t: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """``t: (B, C, H, W)`` zero-padded so that the patch of every output unit lies inside it."""
        h_o, w_o = out_hw
        pad_h = max(0, (h_o - 1) * self.stride + self.size - self.padding - t.shape[2])
        pad_w = max(0, (w_o - 1) * self.stride + self.size - self.padding - t.shape[3])
        return F.pad(t, (self.padding, pad_w, self.padding, pad_h))

    def unfold(self, t: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """Patches of ``t: (B, C, H, W)`` under every output unit: ``(B, H_o, W_o, C, K, K)``.

        Positions outside ``t`` read as zero (zero padding), so they add nothing.
        """
        h_o, w_o = out_hw
        t = self.pad(t, out_hw)
        cols = t.unfold(2, self.size, self.stride).unfold(3, self.size, self.stride)[:, :, :h_o, :w_o]
        return cols.permute(0, 2, 3, 1, 4, 5)


T = TypeVar("T")

CHUNK = 8
"""Examples per chunk in the patch computations: one chunk's patches and products stay in cache."""


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

    Mirrors :class:`polytope.bounds.dual.DualTerms` with patches, position-major: ``nu_hat_1`` is
    ``(B, L, P, C)`` for the ``L = H W`` output positions, ``P = C_0 K K`` patch entries and
    ``C`` channels, and ``bias``, ``relu``, ``relu_neg`` are ``(B, L, C)``; ``geometry`` says
    where each patch sits in the input.
    """

    nu_hat_1: torch.Tensor
    geometry: PatchGeometry
    bias: torch.Tensor
    relu: torch.Tensor
    relu_neg: torch.Tensor | None


def channel_major(t: torch.Tensor) -> torch.Tensor:
    """A position-major ``(B, L, C)`` unit vector in the layer's own ``(B, C H W)`` order."""
    return t.transpose(1, 2).reshape(t.shape[0], -1)


def _channel_bias(op: Conv2dOp, like: torch.Tensor) -> torch.Tensor:
    b = op.module.bias
    return torch.zeros(op.module.out_channels, dtype=like.dtype, device=like.device) if b is None else b


def _patch_transpose_matrix(op: Conv2dOp, patch_shape: tuple[int, ...]) -> torch.Tensor:
    """:func:`_build_patch_transpose`, reused while the weight is unchanged (:func:`weight_derived`)."""
    return weight_derived(op, ("transpose", patch_shape), (op.module.weight,),
                          lambda: _build_patch_transpose(op, patch_shape))


def _build_patch_transpose(op: Conv2dOp, patch_shape: tuple[int, ...]) -> torch.Tensor:
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


def _last_geometry(op: Conv2dOp) -> PatchGeometry:
    """A unit's receptive field in the input of its own convolution."""
    m = op.module
    return PatchGeometry(m.kernel_size[0], m.stride[0], m.padding[0])


def _position_major(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` to ``(B, H W, C)``."""
    return t.flatten(2).transpose(1, 2)


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
    ``alpha = d``) describe the ReLU after each convolution but the last.  The work runs in
    chunks of :data:`CHUNK` examples (the patches of one chunk stay in cache).
    """
    batch = upper_slopes[0].shape[0]
    cells = _CellPlan.for_ops(ops[0], ops[1], sign) if len(ops) == 2 and lower_slopes is None else None
    transposes, geometry = [], _last_geometry(ops[-1])
    for op in reversed(ops[:-1] if cells is None else []):
        transposes.append(_patch_transpose_matrix(op, (op.module.out_channels, geometry.size, geometry.size)))
        geometry = geometry.through(op)
    parts = [
        _patch_backward_chunk(ops, out_shape, [t[s:s + CHUNK] for t in upper_slopes],
                              [t[s:s + CHUNK] for t in lower_unstable],
                              None if lower_slopes is None else [t[s:s + CHUNK] for t in lower_slopes], sign,
                              transposes, cells)
        for s in range(0, max(batch, 1), CHUNK)
    ]
    if len(parts) == 1:
        return parts[0]
    relu_neg = None if parts[0].relu_neg is None else torch.cat([p.relu_neg for p in parts])
    return PatchTerms(torch.cat([p.nu_hat_1 for p in parts]), parts[0].geometry,
                      torch.cat([p.bias for p in parts]), torch.cat([p.relu for p in parts]), relu_neg)


def _patch_backward_chunk(
    ops: list[Conv2dOp],
    out_shape: Shape,
    upper_slopes: list[torch.Tensor],
    lower_unstable: list[torch.Tensor],
    lower_slopes: list[torch.Tensor] | None,
    sign: float,
    transposes: list[torch.Tensor],
    cells: _CellPlan | None,
) -> PatchTerms:
    """One chunk of :func:`patch_backward`: by ``cells`` (two convolutions, linear) or by the
    patch transposes ``transposes`` of the layers below ``ops[-1]``, top down."""
    last = ops[-1]
    c_out, h_o, w_o = out_shape
    batch = upper_slopes[0].shape[0]
    weight = last.module.weight
    # nu_{i+1} = -sign e_u, so nu_hat_i = -sign W^T e_u: the kernel of channel c, at every (h, w).
    kernel = -sign * weight
    nu_hat = kernel.expand(batch, h_o, w_o, *weight.shape)
    bias = (-sign * _channel_bias(last, weight)).expand(batch, h_o * w_o, c_out)
    geometry = _last_geometry(last)
    # The first ReLU below: nu_hat is the kernel itself, so the ReLU and bias terms of eq. (6)
    # are ordinary convolutions of the slope maps with the kernel's positive/negative parts.
    j = len(ops) - 2
    relu, relu_neg, first_bias = _first_relu_terms(last, kernel, upper_slopes[j], lower_unstable[j],
                                                   None if lower_slopes is None else lower_slopes[j],
                                                   _channel_bias(ops[j], weight))
    bias = bias + _position_major(first_bias)
    relu, relu_neg = _position_major(relu), None if relu_neg is None else _position_major(relu_neg)
    if cells is not None:
        return PatchTerms(cells.patches(upper_slopes[0], (h_o, w_o)), geometry.through(ops[0]), bias, relu, relu_neg)
    for j in range(len(ops) - 2, -1, -1):
        d = geometry.unfold(upper_slopes[j], (h_o, w_o)).unsqueeze(3)  # (B, H, W, 1, C_j, K, K)
        if lower_slopes is None:
            nu = torch.mul(d.contiguous(), nu_hat)
        else:
            a = geometry.unfold(lower_slopes[j], (h_o, w_o)).unsqueeze(3)
            nu = torch.where(nu_hat >= 0, d, a) * nu_hat
        if j < len(ops) - 2:
            lower = geometry.unfold(lower_unstable[j], (h_o, w_o)).unsqueeze(3)
            relu = relu + (lower * nu.clamp_min(0)).flatten(4).sum(4).flatten(1, 2)
            if relu_neg is not None:
                relu_neg = relu_neg + (lower * (-nu).clamp_min(0)).flatten(4).sum(4).flatten(1, 2)
            bias = bias + torch.einsum("bhwckxy,k->bhwc", nu, _channel_bias(ops[j], nu)).flatten(1, 2)
        op = ops[j]
        geometry = geometry.through(op)
        nu_hat = (nu.flatten(4) @ transposes[len(ops) - 2 - j]).reshape(
            batch, h_o, w_o, c_out, op.module.in_channels, geometry.size, geometry.size
        )
    return PatchTerms(nu_hat.reshape(batch, h_o * w_o, c_out, -1).transpose(2, 3), geometry, bias, relu, relu_neg)


_DERIVED: weakref.WeakKeyDictionary[Conv2dOp, list] = weakref.WeakKeyDictionary()
"""Recent weight-derived constants per convolution, with the weights (and versions) they came from."""


def weight_derived(owner: Conv2dOp, tag: tuple, weights: tuple[torch.Tensor, ...], build: Callable[[], T]) -> T:
    """``build()``, reused while ``weights`` are the same, unchanged tensors and autograd does not track them.

    For constants such as :class:`_CellPlan`'s matrices that cost more to build than to use on
    a small batch.  An in-place update (``_version``), a new storage or dtype, or another tensor
    object all rebuild; under autograd the constant is always rebuilt so gradients reach the weights,
    and under ``torch.inference_mode`` it is not kept (an inference tensor cannot enter a later graph).
    """
    if torch.is_inference_mode_enabled() or (torch.is_grad_enabled() and any(w.requires_grad for w in weights)):
        return build()
    state = tuple((w._version, w.data_ptr(), w.dtype, w.device) for w in weights)
    entries = _DERIVED.setdefault(owner, [])
    for k_tag, k_weights, k_state, value in entries:
        if k_tag == tag and k_state == state and all(a is b for a, b in zip(k_weights, weights, strict=True)):
            return value
    value = build()
    entries[:] = [*entries[-7:], (tag, weights, state, value)]
    return value


@dataclass(frozen=True, eq=False)
class _CellPlan:
    """The linear patch pass through two convolutions as one batched GEMM per output cell.

    With ``d`` the upper slopes between the convolutions (stride ``s_0`` of the first), the
    patch of unit ``(c_2, L)`` is ``sum_{c, q} W_2[c_2, c, q] d[c, L, q] W_1[c]`` with ``W_1[c]``
    placed at ``s_0 q``: linear in the ``d`` under the unit's receptive field.  Cut the patch
    into ``s_0 x s_0`` cells ``t`` and the first kernel's taps into ``k = s_0 a + r``: cell
    ``t`` collects ``q = t - a``, so the cell's values are ``d[., t - a]`` (``C_1 reach^2``
    numbers) times a fixed ``(C_1 reach^2, C_0 s_0^2 C_2)`` matrix.  That is
    ``(k_2 + reach - 1)^2 (reach s_0)^2 C_0 C_1 C_2``, about ``(k_1 k_2)^2 C_0 C_1 C_2``,
    multiply-adds per position (the sparsity of both kernels), against ``(k_2 K)^2 C_0 C_1 C_2``
    for multiplying out the patch transpose in the generic pass (4x more on the MNIST model).
    """

    matrices: torch.Tensor  # (cells^2, reach^2 C_1, C_0 s_0^2 C_2); rows (a'_y, a'_x, c), a' = reach - 1 - a
    field: PatchGeometry  # the second convolution's receptive field, widened by reach - 1 a side
    reach: int
    cells: int
    stride: int
    size: int  # the patch size K (cells * stride may exceed it by less than a stride)
    channels: int  # C_2

    @classmethod
    def for_ops(cls, op0: Conv2dOp, op1: Conv2dOp, sign: float) -> _CellPlan:
        """:meth:`build`, reused while both weights are unchanged (:func:`weight_derived`)."""
        weights = (op0.module.weight, op1.module.weight)
        return weight_derived(op1, ("cells", op0, sign), weights, lambda: cls.build(op0, op1, sign))

    @classmethod
    def build(cls, op0: Conv2dOp, op1: Conv2dOp, sign: float) -> _CellPlan:
        w0, w1 = op0.module.weight, -sign * op1.module.weight
        s0, k1 = op0.module.stride[0], op0.module.kernel_size[0]
        c2, c1, k2, _ = w1.shape
        c0 = w0.shape[1]
        reach = -(-k1 // s0)
        cells = k2 + reach - 1
        # (c, c_0, a_y, r_y, a_x, r_x): the first kernel's taps split as k = s_0 a + r
        taps = F.pad(w0, (0, reach * s0 - k1, 0, reach * s0 - k1)).reshape(c1, c0, reach, s0, reach, s0)
        blocks = []
        for ay in range(reach):
            row = []
            for ax in range(reach):
                blk = torch.einsum("ocyx,cdrt->yxcdrto", w1, taps[:, :, ay, :, ax, :])  # cells q + a
                row.append(F.pad(blk.unsqueeze(0), (0, 0) * 5 + (ax, reach - 1 - ax, ay, reach - 1 - ay)))
            blocks.append(torch.cat(row))
        # (a_y, a_x, t_y, t_x, c, ...) -> (t_y, t_x, a'_y, a'_x, c, ...) with a' = reach - 1 - a
        mats = torch.stack(blocks).flip(0, 1).permute(2, 3, 0, 1, 4, 5, 6, 7, 8)
        mats = mats.reshape(cells * cells, c1 * reach * reach, c0 * s0 * s0 * c2)
        m1 = op1.module
        field = PatchGeometry(k2 + 2 * (reach - 1), m1.stride[0], m1.padding[0] + reach - 1)
        return cls(mats, field, reach, cells, s0, (k2 - 1) * s0 + k1, c2)

    def patches(self, d: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """``nu_hat_1`` of every unit, ``(B, L, P, C_2)``, for the slopes ``d: (B, C_1, H_1, W_1)``."""
        b, (h_o, w_o), n, s = d.shape[0], out_hw, self.cells, self.stride
        # x[t, (b, h, w), (a', c)] = d[b, c, h s_1 + t + a'] (padded), read from a channels-last
        # copy of d so that each (a'_x, c) run is contiguous
        g, r = self.field, self.reach
        last = g.pad(d, out_hw).permute(0, 2, 3, 1).contiguous()
        sb, sh, sw, _ = last.stride()
        x = last.as_strided((n, n, b, h_o, w_o, r, r, d.shape[1]),
                            (sh, sw, sb, g.stride * sh, g.stride * sw, sh, sw, 1))
        x = x.reshape(n * n, b * h_o * w_o, -1)
        c0 = self.matrices.shape[2] // (s * s * self.channels)
        out = torch.bmm(x, self.matrices).view(n, n, b * h_o * w_o, c0, s, s, self.channels)
        out = out.permute(2, 3, 0, 4, 1, 5, 6).reshape(b * h_o * w_o, c0, n * s, n * s, self.channels)
        return out[:, :, :self.size, :self.size].reshape(b, h_o * w_o, -1, self.channels)


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
    """``nu_hat_1^T m`` and ``|nu_hat_1|^T r`` for every unit, each ``(B, L, C)``, with the box's centre
    ``m`` and radius ``r``.

    ``min_{x' in [lo, hi]} (-sign nu_hat_1)^T x' = -sign nu_hat_1^T m - |nu_hat_1|^T r`` for either sign.
    """
    centre = terms.geometry.unfold((lo + hi) / 2, out_hw).flatten(3).flatten(1, 2)  # (B, L, P)
    radius = terms.geometry.unfold((hi - lo) / 2, out_hw).flatten(3).flatten(1, 2)
    g = terms.nu_hat_1  # (B, L, P, C)
    linear = (centre.unsqueeze(2) @ g).squeeze(2)
    spread = (radius.unsqueeze(2) @ g.abs()).squeeze(2)
    return linear, spread


def prefix_unit_bounds(
    ops: list[Conv2dOp], out_shape: Shape, linear: PatchTerms, relax_unstable: torch.Tensor,
    upper_slope: torch.Tensor, lower_slope: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
    units: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds ``(B, K)`` of selected units of a two-convolution prefix over the box ``[lo, hi]``.

    ``units: (B, K)`` are position-major flat indices ``L C + c``.  The bounds are ``J(e_u)`` and
    ``-J(-e_u)`` of ``patch_backward(ops, out_shape, [d], [l], [a], sign)`` (``linear`` is its pass
    with ``a = d``, ``sign = +1``).  With ``W`` the second kernel, eq. (7) gives
    ``nu = -d W - (a - d) [W]_+`` for ``sign = +1`` and ``nu = d W + (a - d) [W]_-`` for
    ``sign = -1``, so both ``nu_hat_1`` are the linear pass's patch minus (up to sign)
    ``sum_t (a_t - d_t) [W_t]_+- T_t`` over the unstable taps ``t`` of the first ReLU under the
    unit's receptive field, ``T_t`` the first kernel's transpose at tap ``t``: a weighted sum of a
    few rows of a small table per unit (``embedding_bag``).  Of ``nu_hat_1`` only ``<nu_hat_1, m>``
    and ``<|nu_hat_1|, r>`` are needed, for the box's centre ``m`` and radius ``r``.
    """
    op0, op1 = ops
    weight = op1.module.weight
    c_out, h_o, w_o = out_shape
    batch, k = units.shape
    field = _last_geometry(op1)

    def unfold(t: torch.Tensor) -> torch.Tensor:
        return field.unfold(t, (h_o, w_o)).reshape(batch, h_o * w_o, -1)  # (B, L, C_0 k k)

    examples = torch.arange(batch, device=units.device).unsqueeze(1)
    at, channel = units // c_out, units % c_out  # position and channel of each unit, (B, K)
    mask = unfold(relax_unstable.to(weight.dtype))
    kp = int(mask.sum(2).max()) if mask.numel() else 0
    taps = torch.topk(mask, kp, dim=2, sorted=False).indices  # every unstable tap, padded: (B, L, kp)
    diff = torch.gather(unfold(lower_slope - upper_slope) * mask, 2, taps)[examples, at]  # (B, K, kp)
    taps = taps[examples, at]
    table = _patch_transpose_matrix(op0, tuple(weight.shape[1:]))  # (C_0 k k, P)
    geometry = linear.geometry
    centre = geometry.unfold((lo + hi) / 2, (h_o, w_o)).flatten(3).flatten(1, 2)[examples, at]  # (B, K, P)
    radius = geometry.unfold((hi - lo) / 2, (h_o, w_o)).flatten(3).flatten(1, 2)[examples, at]
    lin = linear.nu_hat_1[examples, at, :, channel]  # (B, K, P)
    w = weight.flatten(1).T  # (C_0 k k, C)
    # eq. (6)'s first-layer terms: the ReLU terms are the linear pass's (they use the upper line
    # only); the bias terms differ from it by (a - d) b_0 convolved with [W]_+ (sign +1) or [-W]_+
    m1 = op1.module
    shift = F.conv2d((lower_slope - upper_slope) * _channel_bias(op0, weight).reshape(1, -1, 1, 1),
                     torch.cat([weight.clamp_min(0), (-weight).clamp_min(0)]), None, m1.stride, m1.padding)
    shift = _position_major(shift)  # (B, L, 2C)

    def per_unit(t: torch.Tensor, offset: int = 0) -> torch.Tensor:  # (B, L, C') at the units' (L, c), (B, K)
        return t[examples, at, channel + offset]

    out = []
    for sign, part, relu, bias in ((1.0, w.clamp_min(0), linear.relu, per_unit(linear.bias) - per_unit(shift)),
                                   (-1.0, w.clamp_max(0), linear.relu_neg,
                                    -per_unit(linear.bias) - per_unit(shift, c_out))):
        if kp and k:
            weights = part[taps, channel.unsqueeze(2)] * diff  # (B, K, kp)
            corr = F.embedding_bag(taps.reshape(-1, kp), table, per_sample_weights=weights.reshape(-1, kp),
                                   mode="sum").view(batch, k, -1)
            g = lin - corr  # nu_hat_1 (sign +1), -nu_hat_1 (sign -1)
        else:
            g = lin
        linear_term = sign * (centre * g).sum(2)  # <nu_hat_1, m>
        value = -(bias + linear_term) - (radius * g.abs()).sum(2) + per_unit(relu)  # J(sign e_u), eq. (6)
        out.append(value if sign > 0 else -value)
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
    unused, and its ``out_index`` is 0.  Output units are numbered position-major, ``(H, W, C)``.
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
    out = (oh[None, :, None, None, :, None] * w_out + ow[None, None, :, None, None, :]) * c_out + co  # (H, W, C)
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


class SparseRows(NamedTuple):
    """``K`` rows of a sparse ``(K, width)`` matrix per example: ``(B, K, R)`` column indices and
    values, at most ``R`` nonzeros per row (unused slots hold a zero value on column 0)."""

    cols: torch.Tensor
    vals: torch.Tensor
    width: int

    @classmethod
    def of(cls, op: Conv2dOp, index: tuple[torch.Tensor, torch.Tensor], units: torch.Tensor, width: int) -> SparseRows:
        """The rows at ``units: (B, K)`` of an ``(index, weight index)`` table of ``op``'s weights."""
        cols, widx = (t.to(units.device)[units] for t in index)
        return cls(cols, F.pad(op.module.weight.flatten(), (0, 1))[widx], width)

    def matmul(self, dense: torch.Tensor) -> torch.Tensor:
        """``rows @ dense`` for ``dense: (B, n_cols, m)``, ``(B, K, m)``: one weighted sum of ``R`` rows of
        ``dense`` per row (``embedding_bag``), ``R / n_cols`` of the dense product's work."""
        b, n_cols, m = dense.shape
        k, r = self.cols.shape[1:]
        if b * k == 0:
            return dense.new_zeros(b, k, m)
        offsets = self.cols + torch.arange(b, device=self.cols.device).view(b, 1, 1) * n_cols
        out = F.embedding_bag(offsets.reshape(b * k, r), dense.reshape(b * n_cols, m),
                              per_sample_weights=self.vals.reshape(b * k, r), mode="sum")
        return out.view(b, k, m)

    def rmatmul(self, coef: torch.Tensor) -> torch.Tensor:
        """``coef @ rows`` for ``coef: (B, m, K)``, ``(B, m, width)``, through the rows made dense (``K`` is
        small: a scatter of ``K R`` values, then one batched product)."""
        dense = self.vals.new_zeros(*self.cols.shape[:2], self.width).scatter_add(2, self.cols, self.vals)
        return coef @ dense


def transpose_rows(op: Conv2dOp, in_shape: Shape, out_shape: Shape, units: torch.Tensor) -> SparseRows:
    """Rows of ``W^T`` at selected input units, for ``units: (B, K)``, with the output units
    (columns) position-major, ``(H, W, C)``, as the dual's ``w`` is laid out.

    ``(W^T nu)`` at those units is then ``rows.matmul(nu)``: each row has at most
    ``C_out ceil(k/s)^2`` nonzeros, and ``K`` is small (the unstable units of a layer).
    """
    return SparseRows.of(op, _transpose_index(op, in_shape, out_shape), units, numel(out_shape))


def kernel_rows(op: Conv2dOp, in_shape: Shape, out_shape: Shape, units: torch.Tensor) -> SparseRows:
    """Rows of ``W`` at selected output units ``units: (B, K)``: each unit's kernel placed in the input.

    ``W^T delta`` for a ``delta: (B, m, K)`` supported on those units is ``rows.rmatmul(delta)``.
    """
    return SparseRows.of(op, _kernel_index(op, in_shape, out_shape), units, numel(in_shape))


def position_major_index(units: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Flat unit indices of a ``(C, H, W)`` layer, in ``(H, W, C)`` order."""
    positions = shape[1] * shape[2]
    return (units % positions) * shape[0] + units // positions


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


def patch_rows(terms: PatchTerms, out_shape: Shape, in_shape: Shape, units: torch.Tensor) -> SparseRows:
    """The patches ``nu_hat_1(u)`` of selected units ``units: (B, K)`` as rows of the input, at most ``P``
    nonzeros each (``units`` are flat indices in the layer's ``(C, H, W)`` order).

    ``fold_patches`` of a ``w`` supported on those units is then ``rows.rmatmul(w)``.
    """
    index, valid = (t.to(units.device)[units] for t in _patch_index(terms.geometry, out_shape, in_shape))
    positions = out_shape[1] * out_shape[2]
    examples = torch.arange(units.shape[0], device=units.device).unsqueeze(1)
    patches = terms.nu_hat_1[examples, units % positions, :, units // positions]  # (B, K, P)
    return SparseRows(index, patches * valid.to(patches.dtype), numel(in_shape))  # entries off the input: 0


def fold_patches(w: torch.Tensor, terms: PatchTerms, in_shape: Shape, out_hw: tuple[int, int]) -> torch.Tensor:
    """``sum_u w_u nu_hat_1(u)``: combine the units' input patches, ``w: (B, L, C, m)`` position-major.

    Per output position a ``(patch x C) @ (C x m)`` product, then the patches are added into
    the input image, in chunks of :data:`CHUNK` examples.  Returns ``(B, m, *in_shape)``.
    """
    batch = w.shape[0]
    parts = [_fold_chunk(w[s:s + CHUNK], terms.nu_hat_1[s:s + CHUNK], terms.geometry, in_shape, out_hw)
             for s in range(0, max(batch, 1), CHUNK)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)  # (B, n_in, m)
    return out.transpose(1, 2).unflatten(2, in_shape)


def _fold_chunk(coef: torch.Tensor, patches: torch.Tensor, g: PatchGeometry, in_shape: Shape,
                out_hw: tuple[int, int]) -> torch.Tensor:
    """``fold_patches`` for one chunk: ``coef: (b, L, C, m)``, ``patches: (b, L, P, C)``; ``(b, n_in, m)``.

    The image is cut into ``stride x stride`` tiles; a patch covers ``ceil(K / stride)`` tiles a
    side, so adding every patch is that many shifted adds of whole tile blocks, with ``m``
    innermost (long contiguous runs).
    """
    b, m = coef.shape[0], coef.shape[3]
    c0, h_in, w_in = in_shape
    h_o, w_o = out_hw
    k, s, p = g.size, g.stride, g.padding
    z = (patches @ coef.contiguous()).view(b, h_o, w_o, c0, k, k, m)
    reach = -(-k // s)
    rows, cols = max(h_o + reach - 1, -(-(p + h_in) // s)), max(w_o + reach - 1, -(-(p + w_in) // s))
    tiles = z.new_zeros(b, rows, cols, c0, s, s, m)
    for iy in range(reach):
        hy = min(s, k - iy * s)
        for ix in range(reach):
            hx = min(s, k - ix * s)
            tiles[:, iy:iy + h_o, ix:ix + w_o, :, :hy, :hx] += z[:, :, :, :, iy * s:iy * s + hy, ix * s:ix * s + hx]
    img = tiles.permute(0, 3, 1, 4, 2, 5, 6).reshape(b, c0, rows * s, cols * s, m)
    return img[:, :, p:p + h_in, p:p + w_in].reshape(b, c0 * h_in * w_in, m)
