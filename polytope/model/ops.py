"""The primitive affine operators of a network and the affine layer ``W_i z + b_i`` they compose (paper eq. 1).

Each operator is applied *as an operator* -- a convolution stays a convolution, its transpose is
``conv_transpose2d`` -- never as a dense matrix, with the same small interface: ``out_shape``,
``apply`` (with or without bias), ``transpose`` (one step of the dual network, eq. 7), ``apply_abs``
(``|W| x``) and ``apply_interval``.  The operators hold references to the torch modules' parameters,
so gradients flow to the model through everything computed from them (robust training needs it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polytope.model.errors import ShapeMismatchError, UnsupportedLayerError

Shape = tuple[int, ...]


@dataclass(frozen=True, eq=False)
class LinearOp:
    """``y = W x + b`` on the last dimension; transpose ``x = W^T y``."""

    module: nn.Linear

    def out_shape(self, in_shape: Shape) -> Shape:
        if in_shape != (self.module.in_features,):
            raise ShapeMismatchError(
                f"Linear layer expects inputs of shape ({self.module.in_features},), got {in_shape}"
            )
        return (self.module.out_features,)

    def apply(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return F.linear(x, self.module.weight, self.module.bias if bias else None)

    def transpose(self, y: torch.Tensor, in_shape: Shape) -> torch.Tensor:
        return y @ self.module.weight

    def apply_abs(self, x: torch.Tensor) -> torch.Tensor:
        """``|W| x``: the radius of an interval pushed through the layer."""
        return F.linear(x, self.module.weight.abs())

    def apply_interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _signed_interval(F.linear, self.module.weight, self.module.bias, lo, hi)


@dataclass(frozen=True, eq=False)
class Conv2dOp:
    """A 2-D convolution (any stride and padding, bias optional) and its adjoint."""

    module: nn.Conv2d

    def out_shape(self, in_shape: Shape) -> Shape:
        m = self.module
        if len(in_shape) != 3 or in_shape[0] != m.in_channels:
            raise ShapeMismatchError(
                f"Conv2d expects inputs of shape ({m.in_channels}, H, W), got {in_shape}"
            )
        sizes = []
        for n, k, s, p in zip(in_shape[1:], m.kernel_size, m.stride, m.padding, strict=True):
            o = (n + 2 * p - k) // s + 1
            if o < 1:
                raise ShapeMismatchError(f"Conv2d kernel {m.kernel_size} does not fit input {in_shape}")
            sizes.append(o)
        return (m.out_channels, *sizes)

    def apply(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        m = self.module
        return F.conv2d(x, m.weight, m.bias if bias else None, m.stride, m.padding)

    def transpose(self, y: torch.Tensor, in_shape: Shape) -> torch.Tensor:
        m = self.module
        out_hw = y.shape[-2:]
        output_padding = tuple(
            n - ((o - 1) * s - 2 * p + k)
            for n, o, s, p, k in zip(in_shape[1:], out_hw, m.stride, m.padding, m.kernel_size, strict=True)
        )
        return F.conv_transpose2d(y, m.weight, None, m.stride, m.padding, output_padding)

    def apply_abs(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return F.conv2d(x, m.weight.abs(), None, m.stride, m.padding)

    def apply_interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        return _signed_interval(lambda x, w, b: F.conv2d(x, w, b, m.stride, m.padding), m.weight, m.bias, lo, hi)


@dataclass(frozen=True, eq=False)
class FlattenOp:
    """Reshape ``(C, H, W)`` to ``(C*H*W,)``; its transpose reshapes back."""

    def out_shape(self, in_shape: Shape) -> Shape:
        n = 1
        for s in in_shape:
            n *= s
        return (n,)

    def apply(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return x.flatten(1)

    def transpose(self, y: torch.Tensor, in_shape: Shape) -> torch.Tensor:
        return y.reshape(y.shape[0], *in_shape)

    def apply_abs(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def apply_interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lo.flatten(1), hi.flatten(1)


@dataclass(frozen=True, eq=False)
class GatherOp:
    """``y = x.flatten()[index]``: a selection of input entries (``index`` -1 reads a zero).

    Max and average pooling are built from it (one gather per window tap); its transpose
    scatters back and adds, its interval and ``|W|`` maps are the same selection.
    """

    index: torch.Tensor  # long, shaped like one output example
    in_numel: int

    def out_shape(self, in_shape: Shape) -> Shape:
        if numel(in_shape) != self.in_numel:
            raise ShapeMismatchError(f"Gather expects {self.in_numel} input entries, got shape {in_shape}")
        return tuple(self.index.shape)

    def _flat_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.index.reshape(-1).to(device)
        return flat.clamp_min(0), (flat >= 0)

    def apply(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        index, valid = self._flat_index(x.device)
        y = x.flatten(1)[:, index] * valid.to(x.dtype)
        return y.reshape(x.shape[0], *self.index.shape)

    def transpose(self, y: torch.Tensor, in_shape: Shape) -> torch.Tensor:
        index, valid = self._flat_index(y.device)
        out = y.new_zeros(y.shape[0], self.in_numel)
        out.index_add_(1, index, y.flatten(1) * valid.to(y.dtype))
        return out.reshape(y.shape[0], *in_shape)

    def apply_abs(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    def apply_interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(lo), self.apply(hi)


class Normalize(nn.Module):
    """Input normalisation ``(x - mean) / std`` per channel (a ``torchvision`` ``Normalize`` as a layer).

    ``mean`` and ``std`` are scalars or one value per channel (the first input dimension).  As
    the first layer of a model it is composed into ``W_1`` (see :class:`NormalizeOp`), so the
    perturbation set -- and ``eps`` -- stay in the space of the raw inputs ``x``.
    """

    def __init__(self, mean: Sequence[float] | float, std: Sequence[float] | float) -> None:
        super().__init__()
        mean_t, std_t = torch.broadcast_tensors(torch.as_tensor(mean, dtype=torch.float64).reshape(-1),
                                                torch.as_tensor(std, dtype=torch.float64).reshape(-1))
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all() and (std_t > 0).all()):
            raise ValueError(f"mean must be finite and std finite and positive, got mean {mean}, std {std}")
        self.register_buffer("mean", mean_t.to(torch.float32).clone())
        self.register_buffer("std", std_t.to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (-1, *([1] * (x.dim() - 2)))
        return (x - self.mean.reshape(view)) / self.std.reshape(view)


@dataclass(frozen=True, eq=False)
class ChannelAffineOp:
    """A per-channel affine map ``y = s x + t`` (channel = first input dimension); subclasses give ``s, t``."""

    def _scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _channels(self) -> int:
        raise NotImplementedError

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return t.reshape(-1, *([1] * (ndim - 2)))

    def _expanded(self, in_shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        """``s, t`` with one value per channel of ``in_shape`` (scalars broadcast)."""
        return tuple(t.expand(in_shape[0]) if t.numel() == 1 else t for t in self._scale_shift())

    def out_shape(self, in_shape: Shape) -> Shape:
        if self._channels() not in (1, in_shape[0]):
            raise ShapeMismatchError(
                f"{type(self).__name__[:-2]} expects {self._channels()} channels, got input shape {in_shape}"
            )
        return in_shape

    def apply(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        scale, shift = self._scale_shift()
        y = x * self._view(scale, x.dim())
        return y + self._view(shift, x.dim()) if bias else y

    def transpose(self, y: torch.Tensor, in_shape: Shape) -> torch.Tensor:
        return self.apply(y, bias=False)

    def apply_abs(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._view(self._scale_shift()[0].abs(), x.dim())

    def apply_interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = (self._view(t, lo.dim()) for t in self._scale_shift())
        a, b = scale * lo + shift, scale * hi + shift
        return torch.minimum(a, b), torch.maximum(a, b)


@dataclass(frozen=True, eq=False)
class BatchNormOp(ChannelAffineOp):
    """An eval-mode batch norm: the per-channel affine map ``y = s x + t`` of its running statistics."""

    module: nn.modules.batchnorm._BatchNorm

    def _channels(self) -> int:
        return self.module.num_features

    def _scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        shift = -m.running_mean * scale
        if m.bias is not None:
            shift = shift + m.bias
        return scale, shift


@dataclass(frozen=True, eq=False)
class NormalizeOp(ChannelAffineOp):
    """:class:`Normalize` as the affine map ``x / std - mean / std``, composed into the layer it precedes."""

    module: Normalize

    def _channels(self) -> int:
        return self.module.mean.numel()

    def _scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = 1.0 / self.module.std
        return scale, -self.module.mean * scale


def _signed_interval(apply, weight: torch.Tensor, bias: torch.Tensor | None, lo: torch.Tensor,
                     hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply(x, W, b)`` over the box ``[lo, hi]``: ``W+ lo + W- hi + b`` and ``W+ hi + W- lo + b``.

    Exact for one linear map, and computed without the cancellation of the centre-radius form
    (``W m +- |W| r`` loses ``|W| r`` digits on units whose true bound is small).
    """
    pos, neg = weight.clamp_min(0), weight.clamp_max(0)
    return apply(lo, pos, bias) + apply(hi, neg, None), apply(hi, pos, bias) + apply(lo, neg, None)


Op = LinearOp | Conv2dOp | FlattenOp | ChannelAffineOp | GatherOp


@dataclass(frozen=True, eq=False)
class AffineLayer:
    """``W_i z + b_i`` as a composition of primitive operators (paper eq. 1)."""

    ops: tuple[Op, ...]

    def shapes(self, in_shape: Shape) -> list[Shape]:
        """Input shape of every op followed by the layer's output shape."""
        shapes = [in_shape]
        for op in self.ops:
            shapes.append(op.out_shape(shapes[-1]))
        return shapes

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``W z + b`` for a batch ``z: (N, *in_shape)``."""
        for op in self.ops:
            z = op.apply(z)
        return z

    def linear(self, z: torch.Tensor) -> torch.Tensor:
        """``W z`` (no bias) for a batch ``z: (N, *in_shape)``."""
        for op in self.ops:
            z = op.apply(z, bias=False)
        return z

    def transpose(self, nu: torch.Tensor, in_shape: Shape) -> torch.Tensor:
        """``W^T nu`` for ``nu: (N, *out_shape)`` -- one step of the dual network, eq. (7)."""
        shapes = self.shapes(in_shape)
        for op, shape in zip(reversed(self.ops), reversed(shapes[:-1]), strict=True):
            nu = op.transpose(nu, shape)
        return nu

    def interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds of the layer's output over the box ``[lo, hi]``, op by op (exact for a single op)."""
        for op in self.ops:
            lo, hi = op.apply_interval(lo, hi)
        return lo, hi

    def abs_linear(self, r: torch.Tensor) -> torch.Tensor:
        """``|W| r`` for a nonnegative radius ``r`` (exact only for a single op; see interval bounds)."""
        for op in self.ops:
            r = op.apply_abs(r)
        return r

    def bias(self, in_shape: Shape, like: torch.Tensor) -> torch.Tensor:
        """The offset ``b_i = W_i 0 + b_i`` of the composed layer, shaped ``(*out_shape)``."""
        if len(self.ops) == 1 and isinstance(self.ops[0], LinearOp | Conv2dOp):  # the module's own bias
            op = self.ops[0]
            out_shape = op.out_shape(in_shape)
            b = op.module.bias
            if b is None:
                return torch.zeros(out_shape, dtype=like.dtype, device=like.device)
            return b.to(like.dtype).reshape(-1, *([1] * (len(out_shape) - 1))).expand(out_shape)
        zero = torch.zeros((1, *in_shape), dtype=like.dtype, device=like.device)
        return self.forward(zero)[0]



def check_conv(index: str, m: nn.Conv2d) -> None:
    bad = []
    if m.groups != 1:
        bad.append(f"groups={m.groups}")
    if tuple(m.dilation) != (1, 1):
        bad.append(f"dilation={m.dilation}")
    if isinstance(m.padding, str):
        bad.append(f"padding={m.padding!r}")
    if m.padding_mode != "zeros":
        bad.append(f"padding_mode={m.padding_mode!r}")
    if bad:
        raise UnsupportedLayerError(
            f"layer {index} (Conv2d) uses {', '.join(bad)}; only groups=1, dilation=1 and "
            "integer zero padding are supported"
        )


def numel(shape: Sequence[int]) -> int:
    """Number of entries of a tensor of this shape."""
    n = 1
    for s in shape:
        n *= s
    return n
