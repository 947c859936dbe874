"""A ReLU network as a validated chain of affine layers and ReLUs.

The paper's network (eq. 1) is ``zhat_{i+1} = W_i z_i + b_i`` for ``i = 1..k-1`` with
``z_i = ReLU(zhat_i)`` for ``i = 2..k-1`` and output ``f(x) = zhat_k``.  Here every
``W_i`` is an :class:`AffineLayer`: one or more primitive operators (Linear, Conv2d,
Flatten, eval-mode BatchNorm, input :class:`Normalize`) applied *as operators* -- a convolution stays a
convolution, its transpose is ``conv_transpose2d`` -- never as a dense matrix.

The operators hold references to the torch modules' parameters, so gradients flow to
the model through everything computed from a :class:`Network` (robust training needs it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from polytope.model.errors import ModelModeError, ShapeMismatchError, UnsupportedLayerError

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


def _flatten_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            for sub, grandchild in _flatten_modules(child):
                yield f"{name}.{sub}", grandchild
        else:
            yield name, child


#: The modules of a plain chain (anything else in an ``nn.Sequential`` makes it a graph to trace).
CHAIN_MODULES = (nn.Linear, nn.Conv2d, nn.Flatten, nn.ReLU, nn.modules.dropout._DropoutNd, nn.Identity,
                 nn.BatchNorm1d, nn.BatchNorm2d, Normalize)


def _is_chain(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and all(
        isinstance(m, CHAIN_MODULES) for _, m in _flatten_modules(model)
    )


def _check_conv(index: str, m: nn.Conv2d) -> None:
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


@dataclass(frozen=True, eq=False)
class Network:
    """A ReLU network ``f(x) = W_{k-1} ReLU(... ReLU(W_1 x + b_1) ...) + b_{k-1}``.

    ``layers[i]`` is the paper's ``W_{i+1}, b_{i+1}``; a ReLU sits between consecutive layers.
    Build it with :meth:`from_torch`.
    """

    layers: tuple[AffineLayer, ...]
    module: nn.Module
    #: Per ReLU layer, ``None`` or a boolean mask (shaped like the layer) of *linear* units: values
    #: a graph carries past the ReLU (skip connections, see :mod:`polytope.model.graph`), whose
    #: ``z = zhat`` exactly.  Empty for a chain.
    linear: tuple[torch.Tensor | None, ...] = ()
    #: The per-example input shape a graph network was compiled for (``None`` for a chain).
    input_shape: Shape | None = None

    @classmethod
    def from_torch(cls, model: nn.Module, input_shape: Sequence[int] | None = None) -> Network:
        """Validate and canonicalise a model: an ``nn.Sequential`` chain, or any ReLU graph.

        A chain is an ``nn.Sequential`` of Linear, Conv2d, Flatten and ReLU.  Eval-mode ``Dropout``
        is the identity, eval-mode ``BatchNorm`` and :class:`Normalize` per-channel affine maps
        composed into the affine layer they sit in; in training mode both are refused. Anything
        else raises :class:`UnsupportedLayerError` naming the layer's index and type. The first and
        last layers must be affine.

        Any other module (residual blocks, ``torch.cat``, pooling) is traced with ``torch.fx``
        (:func:`polytope.model.trace.trace_module`); ``input_shape`` (one example, no batch
        dimension) is then required unless the input's first consumer is an ``nn.Linear``.
        """
        if not _is_chain(model):
            from polytope.model.trace import trace_module  # a graph: traced, compiled to a chain

            return trace_module(model, input_shape)
        layers: list[list[Op]] = [[]]
        for index, m in _flatten_modules(model):
            kind = type(m).__name__
            if isinstance(m, nn.Linear):
                layers[-1].append(LinearOp(m))
            elif isinstance(m, nn.Conv2d):
                _check_conv(index, m)
                layers[-1].append(Conv2dOp(m))
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise UnsupportedLayerError(
                        f"layer {index} (Flatten) must flatten all but the batch dimension"
                    )
                layers[-1].append(FlattenOp())
            elif isinstance(m, nn.ReLU):
                if not layers[-1]:
                    raise UnsupportedLayerError(
                        f"layer {index} (ReLU) is not preceded by an affine layer"
                    )
                layers.append([])
            elif isinstance(m, nn.modules.dropout._DropoutNd | nn.Identity):
                if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                    raise ModelModeError(
                        f"layer {index} ({kind}) is in training mode; call model.eval() first"
                    )
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                if m.training or not m.track_running_stats:
                    raise ModelModeError(
                        f"layer {index} ({kind}) uses batch statistics (training mode); "
                        "call model.eval() so its running statistics are used"
                    )
                layers[-1].append(BatchNormOp(m))
            elif isinstance(m, Normalize):
                layers[-1].append(NormalizeOp(m))
            else:
                raise UnsupportedLayerError(
                    f"layer {index} ({kind}) is not supported: polytope bounds chains of "
                    "Linear, Conv2d, Flatten and ReLU layers"
                )
        if not layers[-1]:
            raise UnsupportedLayerError("the network must end with an affine layer, not a ReLU")
        if not any(isinstance(op, LinearOp | Conv2dOp) for layer in layers for op in layer):
            raise UnsupportedLayerError("the network has no Linear or Conv2d layer")
        return cls(tuple(AffineLayer(tuple(ops)) for ops in layers), model)

    @property
    def n_relu(self) -> int:
        """Number of ReLU layers (``k - 2`` in the paper)."""
        return len(self.layers) - 1

    def shapes(self, in_shape: Shape) -> list[Shape]:
        """Shapes of ``z_1 = x`` and of every ``zhat_i``: ``[in, zhat_2, ..., zhat_k]``."""
        return list(_shapes(self.layers, tuple(in_shape)))

    def check_input(self, x: torch.Tensor) -> list[Shape]:
        """Check that ``x: (B, *in_shape)`` fits the network; return the layer shapes."""
        if x.dim() < 2:
            raise ShapeMismatchError(f"expected a batch (B, *in_shape), got a tensor of shape {tuple(x.shape)}")
        try:
            shapes = self.shapes(tuple(x.shape[1:]))
        except (ShapeMismatchError, RuntimeError) as exc:
            raise ShapeMismatchError(f"input of shape {tuple(x.shape)} does not fit the network: {exc}") from exc
        if len(shapes[-1]) != 1:
            raise ShapeMismatchError(f"the network's output must be a vector, got shape {shapes[-1]}")
        weight = next(self.module.parameters())
        if x.dtype != weight.dtype or x.device != weight.device:
            raise ShapeMismatchError(
                f"input is {x.dtype} on {x.device} but the model is {weight.dtype} on {weight.device}"
            )
        return shapes

    @property
    def is_graph(self) -> bool:
        """Whether some ReLU layer carries linear units (a compiled graph, not a plain chain)."""
        return any(mask is not None for mask in self.linear)

    def linear_mask(self, i: int) -> torch.Tensor | None:
        """The linear units of ReLU layer ``i`` (0-based), or ``None`` when all are ReLUs."""
        return self.linear[i] if i < len(self.linear) else None

    def activation(self, i: int, zhat: torch.Tensor) -> torch.Tensor:
        """``z_i`` from ``zhat_i`` for ReLU layer ``i``: ReLU, except on its linear units."""
        mask = self.linear_mask(i)
        z = torch.relu(zhat)
        return z if mask is None else torch.where(mask.to(zhat.device), zhat, z)

    def activation_interval(self, i: int, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds on ``z_i`` from bounds ``[lo, hi]`` on ``zhat_i`` (ReLU is monotone)."""
        return self.activation(i, lo), self.activation(i, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output ``f(x)`` through the canonical chain."""
        return self.pre_activations(x)[-1]

    def pre_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[zhat_2, ..., zhat_k]`` at a batch of points ``x``."""
        out = []
        z = x
        for i, layer in enumerate(self.layers):
            z = layer.forward(z if i == 0 else self.activation(i - 1, z))
            out.append(z)
        return out

    def with_head(self, head: nn.Linear) -> Network:
        """This network followed by ``head`` (a margin or property layer) on its flattened output."""
        last = self.layers[-1]
        layers = (*self.layers[:-1], AffineLayer((*last.ops, FlattenOp(), LinearOp(head))))
        return Network(layers, nn.Sequential(self.module, nn.Flatten(), head), self.linear, self.input_shape)

    def parameters_like(self) -> torch.Tensor:
        """One parameter, for reading the model's dtype and device."""
        return next(self.module.parameters())


@lru_cache(maxsize=256)
def _shapes(layers: tuple[AffineLayer, ...], in_shape: Shape) -> tuple[Shape, ...]:
    shapes = [in_shape]
    for layer in layers:
        shapes.append(layer.shapes(shapes[-1])[-1])
    return tuple(shapes)


def numel(shape: Sequence[int]) -> int:
    """Number of entries of a tensor of this shape."""
    n = 1
    for s in shape:
        n *= s
    return n


def as_float64(net: Network) -> Network:
    """``net`` itself if it is float64 on the CPU, else a float64 CPU copy (the model is untouched)."""
    weight = net.parameters_like()
    if weight.dtype == torch.float64 and weight.device.type == "cpu":
        return net
    module = copy.deepcopy(net.module).to(device="cpu", dtype=torch.float64)
    for p in module.parameters():
        p.requires_grad_(False)  # a private copy for solvers: no autograd through its weights
    return Network.from_torch(module, net.input_shape)
