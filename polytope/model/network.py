"""A ReLU network as a validated chain of affine layers and ReLUs (graphs compile to such chains).

The paper's network (eq. 1) is ``zhat_{i+1} = W_i z_i + b_i`` for ``i = 1..k-1`` with
``z_i = ReLU(zhat_i)`` for ``i = 2..k-1`` and output ``f(x) = zhat_k``.  Here every
``W_i`` is an :class:`AffineLayer`: one or more primitive operators (Linear, Conv2d,
Flatten, eval-mode BatchNorm, input :class:`Normalize`) applied *as operators* -- a convolution stays a
convolution, its transpose is ``conv_transpose2d`` -- never as a dense matrix.

The operators (:mod:`polytope.model.ops`) hold references to the torch modules' parameters, so
gradients flow to the model through everything computed from a :class:`Network` (robust training
needs it).  A module that is not a plain ``nn.Sequential`` chain is traced into a ReLU graph
(:mod:`polytope.model.trace`) and compiled (:mod:`polytope.model.graph`) to a chain whose ReLU
layers may carry linear units (:attr:`Network.linear`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from polytope.model.dense import dense_graph, is_dense_sequential
from polytope.model.errors import ModelModeError, ShapeMismatchError, UnsupportedLayerError
from polytope.model.graph import Graph
from polytope.model.ops import (
    AffineLayer,
    BatchNormOp,
    ChannelAffineOp,
    Conv2dOp,
    FlattenOp,
    GatherOp,
    LinearOp,
    Normalize,
    NormalizeOp,
    Op,
    Shape,
    check_conv,
    numel,
)
from polytope.model.trace import trace_module

__all__ = [
    "AffineLayer", "BatchNormOp", "ChannelAffineOp", "Conv2dOp", "FlattenOp", "GatherOp", "LinearOp", "Network",
    "Normalize", "NormalizeOp", "Op", "Shape", "as_float64", "numel",
]


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
        convex_adversarial's ``DenseSequential`` of ``Dense`` skip layers is read the same way
        (:mod:`polytope.model.dense`).
        """
        if isinstance(model, CHAIN_MODULES):  # one layer on its own
            model = nn.Sequential(model)
        if not _is_chain(model):
            traced = dense_graph(model, input_shape) if is_dense_sequential(model) else trace_module(model, input_shape)
            return cls.from_graph(*traced, model)
        layers: list[list[Op]] = [[]]
        for index, m in _flatten_modules(model):
            kind = type(m).__name__
            if isinstance(m, nn.Linear):
                layers[-1].append(LinearOp(m))
            elif isinstance(m, nn.Conv2d):
                check_conv(index, m)
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

    @classmethod
    def from_graph(cls, graph: Graph, output: int, module: nn.Module) -> Network:
        """The network computing node ``output`` of a ReLU graph (compiled to a chain, see
        :mod:`polytope.model.graph`); ``module`` is the torch model it stands for."""
        layers, linear = graph.compile(output)
        return cls(layers, module, linear, graph.input_shape)

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


def as_float64(net: Network) -> Network:
    """``net`` itself if it is float64 on the CPU, else a float64 CPU copy (the model is untouched)."""
    weight = net.parameters_like()
    if weight.dtype == torch.float64 and weight.device.type == "cpu":
        return net
    module = copy.deepcopy(net.module).to(device="cpu", dtype=torch.float64)
    for p in module.parameters():
        p.requires_grad_(False)  # a private copy for solvers: no autograd through its weights
    return Network.from_torch(module, net.input_shape)
