"""convex_adversarial's residual layout (Wong et al. 2018, "Scaling provable adversarial defenses").

That library writes a residual network as a ``DenseSequential``: an ``nn.Sequential`` whose
forward keeps the outputs ``xs = [x, out_1, ..., out_k]`` of all its layers so far; a layer whose
class name contains ``"Dense"`` receives the whole list and returns ``sum_i W_i(xs[-m:][i])`` over
its ``m`` sub-layers ``Ws`` (``None`` entries skipped, an empty ``nn.Sequential`` the identity),
any other layer reads ``xs[-1]`` only.  ``torch.fx`` traces that forward, but ``Dense`` adds its
terms with Python's ``sum``, which starts from the integer ``0``: a constant the tracer refuses.

:func:`dense_graph` therefore traces an equivalent module that registers the same
layers under the same names and adds the terms without the ``0``; the traced graph (a ReLU graph
of :mod:`polytope.model.graph`) is then exactly the reference's network.  The layout is recognised
by duck typing (class names and the ``Ws`` list); polytope does not import convex_adversarial.
A model of that name whose forward computes something else is refused, not mis-bounded: the
traced layout's output is compared with the model's own on a random input.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from functools import reduce

import torch
from torch import nn

from polytope.model.errors import UnsupportedLayerError
from polytope.model.graph import Graph
from polytope.model.trace import trace_module

#: The forward comparison's tolerance, relative to the outputs' magnitude (same operations, same order).
_CHECK_RTOL = 1e-4


def is_dense_layer(module: nn.Module) -> bool:
    """Whether ``DenseSequential.forward`` hands ``module`` all earlier outputs (its own test: the class name)."""
    return "Dense" in type(module).__name__


def is_dense_sequential(model: nn.Module) -> bool:
    """Whether ``model`` is laid out as convex_adversarial's ``DenseSequential``."""
    return isinstance(model, nn.Sequential) and type(model).__name__ == "DenseSequential"


class _DenseGraph(nn.Module):
    """The forward of a ``DenseSequential`` with its sums written for ``torch.fx`` (same layers, same names)."""

    def __init__(self, model: nn.Sequential) -> None:
        super().__init__()
        for name, layer in model._modules.items():
            if is_dense_layer(layer) and not isinstance(getattr(layer, "Ws", None), nn.ModuleList):
                raise UnsupportedLayerError(
                    f"layer {name} ({type(layer).__name__}) is a Dense layer without its sub-layers "
                    "in an nn.ModuleList `Ws`"
                )
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [x]
        for name, layer in self._modules.items():
            xs.append(_dense_sum(name, layer, xs) if is_dense_layer(layer) else layer(xs[-1]))
        return xs[-1]


def _dense_sum(name: str, layer: nn.Module, xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Dense.forward(*xs)``: sub-layer ``i`` of ``Ws`` applied to ``xs[-len(Ws):][i]``, the terms summed."""
    ws = list(layer.Ws)
    terms = [w(x) for x, w in zip(xs[-len(ws):], ws, strict=False) if w is not None]
    if not terms:
        raise UnsupportedLayerError(f"layer {name} ({type(layer).__name__}) applies no sub-layer: its output is 0")
    return reduce(operator.add, terms)


def dense_graph(model: nn.Sequential, input_shape: Sequence[int] | None = None) -> tuple[Graph, int]:
    """The ReLU graph of a ``DenseSequential`` and its output node (see the module docstring)."""
    layout = _DenseGraph(model)
    graph, output = trace_module(layout, input_shape)
    _check_forward(layout, model, graph.input_shape)
    return graph, output


def _check_forward(layout: nn.Module, model: nn.Module, input_shape: Sequence[int]) -> None:
    """Refuse ``model`` when its own forward differs from the layout's on a random input."""
    weight = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, *input_shape, generator=gen, dtype=weight.dtype).to(weight.device)
    with torch.no_grad():
        ours, theirs = layout(x), model(x)
    scale = float(theirs.abs().max()) if theirs.numel() else 0.0
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=_CHECK_RTOL, atol=_CHECK_RTOL * scale):
        raise UnsupportedLayerError(
            f"{type(model).__name__}.forward does not compute convex_adversarial's DenseSequential layout "
            "(each Dense layer summing its sub-layers on the latest outputs); polytope cannot read it"
        )
