"""A torch module as a ReLU graph: ``torch.fx`` tracing into :class:`polytope.model.graph.Graph`.

Any module ``torch.fx`` can trace symbolically is accepted when its graph uses only supported
operators, in module or functional form: Linear, Conv2d, eval-mode BatchNorm, :class:`Normalize`,
Flatten / ``flatten`` / ``view(x.size(0), -1)``, Dropout / Identity (eval), ReLU, additions and
subtractions of branches (``x + f(x)``), multiplication or division by a number, ``torch.cat``,
MaxPool2d, AvgPool2d and adaptive average pooling to sizes that divide the input.  Anything
else raises :class:`UnsupportedLayerError` naming the layer (or node) and its type; an unsupported
layer type is named before a missing ``input_shape`` is asked for.

In-place operations (``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``relu_``, ``x += y``,
``add_``, ...) are read as eager mode runs them: every later read of the overwritten tensor sees the
new value (plain fx would record ``x += y`` as ``x + y`` and read the old one).  One that overwrites a
tensor while a view of it is read later is refused.  A bare layer (``nn.Linear``) is the one-layer chain.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from polytope.model.errors import ModelModeError, ShapeMismatchError, UnsupportedLayerError
from polytope.model.graph import Graph
from polytope.model.ops import (
    BatchNormOp,
    Conv2dOp,
    FlattenOp,
    LinearOp,
    Normalize,
    NormalizeOp,
    check_conv,
    numel,
)

_ADD = (operator.add, torch.add, operator.iadd)
_SUB = (operator.sub, torch.sub, operator.isub)
_MUL = (operator.mul, torch.mul, operator.imul)
_DIV = (operator.truediv, torch.div, operator.itruediv)
_RELU = (torch.relu, F.relu, torch.relu_)
_FLATTEN = (torch.flatten,)
#: The modules a traced graph may call (their options are checked when the graph is built).
_MODULES = (nn.Linear, nn.Conv2d, nn.Flatten, nn.ReLU, nn.modules.dropout._DropoutNd, nn.Identity, nn.BatchNorm1d,
            nn.BatchNorm2d, Normalize, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


class _Ref(int):
    """A graph node id (kept apart from the plain integers of a forward's arguments)."""


class _Batch:
    """The batch size (``x.size(0)``/``x.shape[0]``): only usable as a reshape's first dimension."""


class _InplaceProxy(fx.Proxy):
    """An fx proxy that records ``x += y`` (and ``-=``, ``*=``, ``/=``) as the in-place operator.

    Plain fx records ``x += y`` as ``x + y``, losing the mutation that every other reference to
    the tensor sees in eager mode; :func:`_mutation` needs to know it happened.
    """

    def _inplace(self, fn: Any, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", fn, (self, other), {})

    def __iadd__(self, other: Any) -> fx.Proxy:
        return self._inplace(operator.iadd, other)

    def __isub__(self, other: Any) -> fx.Proxy:
        return self._inplace(operator.isub, other)

    def __imul__(self, other: Any) -> fx.Proxy:
        return self._inplace(operator.imul, other)

    def __itruediv__(self, other: Any) -> fx.Proxy:
        return self._inplace(operator.itruediv, other)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InplaceProxy(node, self)


def trace_module(model: nn.Module, input_shape: Sequence[int] | None = None) -> tuple[Graph, int]:
    """The ReLU graph of ``model`` traced by ``torch.fx`` and its output node (see the module docstring).

    (A bare Linear or Conv2d is the one-layer chain :meth:`Network.from_torch` builds without tracing.)"""
    if _Tracer().is_leaf_module(model, ""):  # a bare layer that is no chain on its own
        _check_module("0", model)
        raise UnsupportedLayerError("the network has no Linear or Conv2d layer")
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds (control flow on values, unsupported Python)
        raise UnsupportedLayerError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
            "polytope needs a model whose forward uses no data-dependent control flow"
        ) from exc
    modules = dict(model.named_modules())
    for node in graph.nodes:  # an unsupported layer is named before a missing input shape is asked for
        if node.op == "call_module":
            _check_module(node.target, modules[node.target])
            node.meta["kind"] = type(modules[node.target]).__name__
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedLayerError(
            f"{type(model).__name__}.forward must take exactly one input, got {len(placeholders)}"
        )
    shape = tuple(input_shape) if input_shape is not None else _infer_input_shape(placeholders[0], modules)
    builder = _Builder(Graph(shape), modules)
    output = _build(graph, builder, modules)
    if not isinstance(output, _Ref):
        raise UnsupportedLayerError("the model's output must be one tensor computed from its input")
    if not any(isinstance(n.op, LinearOp | Conv2dOp) for n in builder.graph.nodes):
        raise UnsupportedLayerError("the network has no Linear or Conv2d layer")
    return builder.graph, output


def _build(graph: fx.Graph, builder: _Builder, modules: dict[str, nn.Module]) -> Any:
    """Visit the fx nodes in program order; return the value of the output."""
    order = {node: k for k, node in enumerate(graph.nodes)}
    output = None
    for node in graph.nodes:
        if node.op == "output":
            output = builder.value(node.args[0], node)
            continue
        result = builder.visit(node)
        builder.env[node.name] = _Ref(result) if type(result) is int else result
        mutated = _mutation(node, modules, order)
        if mutated is not None:  # later reads of the mutated tensor see the new value, as in eager mode
            builder.env[mutated.name] = builder.env[node.name]
    return output


_INPLACE_FUNCTIONS = (torch.relu_, operator.iadd, operator.isub, operator.imul, operator.itruediv)
_INPLACE_METHODS = ("relu_", "add_", "sub_", "mul_", "div_")


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or (
            node.target is F.relu and bool(node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False)))
    if node.op == "call_method":
        return node.target in _INPLACE_METHODS
    return node.op == "call_module" and isinstance(modules[node.target], nn.ReLU) and modules[node.target].inplace


def _is_alias(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s tensor may share memory with its first argument (a view, or an identity)."""
    if node.op == "call_method":
        return node.target in ("view", "reshape", "flatten", "contiguous")
    if node.op == "call_function":
        return node.target in (torch.flatten, F.dropout)
    return node.op == "call_module" and isinstance(
        modules[node.target], nn.Flatten | nn.Identity | nn.modules.dropout._DropoutNd)


def _mutation(node: fx.Node, modules: dict[str, nn.Module], order: dict[fx.Node, int]) -> fx.Node | None:
    """The tensor an in-place ``node`` overwrites (``None`` for other nodes).

    Refused when a view of that tensor (or a tensor it is a view of) is read after ``node``: such a
    read would see the new value too, and the graph has no way to express it.
    """
    if not _is_inplace(node, modules) or not isinstance(node.args[0], fx.Node):
        return None
    target = node.args[0]
    family, stack = {target, node}, [target]
    while stack:  # the tensors sharing memory with target: views of it, and what it is a view of
        n = stack.pop()
        linked = [u for u in n.users if _is_alias(u, modules) or (_is_inplace(u, modules) and u.args[0] is n)]
        if (_is_alias(n, modules) or _is_inplace(n, modules)) and isinstance(n.args[0], fx.Node):
            linked.append(n.args[0])
        for m in linked:
            if m not in family:
                family.add(m)
                stack.append(m)
    for n in family - {target, node}:
        if any(order[u] > order[node] for u in n.users):
            raise UnsupportedLayerError(
                f"{_where(node)} overwrites {target.name} in place while {n.name}, which shares its memory, is read "
                "later; use the out-of-place form"
            )
    return target


def _check_module(name: str, m: nn.Module) -> None:
    if not isinstance(m, _MODULES):
        raise UnsupportedLayerError(
            f"layer {name} ({type(m).__name__}) is not supported: polytope bounds ReLU graphs of Linear, Conv2d, "
            "BatchNorm, Flatten, pooling, additions and concatenations"
        )


def _infer_input_shape(placeholder: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, ...]:
    for user in placeholder.users:
        if user.op == "call_module" and isinstance(modules[user.target], nn.Linear):
            return (modules[user.target].in_features,)
    raise ShapeMismatchError(
        "this model is a graph, not an nn.Sequential chain: pass input_shape (one example, no batch "
        "dimension), e.g. Network.from_torch(model, input_shape=(1, 28, 28))"
    )


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Builder:
    def __init__(self, graph: Graph, modules: dict[str, nn.Module]) -> None:
        self.graph = graph
        self.modules = modules
        self.env: dict[str, Any] = {}

    # -- arguments ------------------------------------------------------------------------------
    def value(self, arg: Any, node: fx.Node) -> Any:
        if isinstance(arg, fx.Node):
            return self.env[arg.name]
        if isinstance(arg, list | tuple):
            return type(arg)(self.value(a, node) for a in arg)
        return arg

    def tensor(self, arg: Any, node: fx.Node) -> int:
        v = self.value(arg, node)
        if not isinstance(v, _Ref):
            raise UnsupportedLayerError(f"{_where(node)} needs a tensor computed from the input, got {v!r}")
        return v

    # -- nodes -----------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.graph.input
        if node.op == "call_module":
            return self.module(node, self.modules[node.target])
        if node.op == "call_function":
            return self.function(node, node.target)
        if node.op == "call_method":
            return self.method(node)
        raise UnsupportedLayerError(
            f"{_where(node)} is not supported: constants and parameters "
            "read in forward cannot be bounded; put them in a Linear/Conv2d/BatchNorm layer"
        )

    def module(self, node: fx.Node, m: nn.Module) -> int:
        name, kind = node.target, type(m).__name__
        x = self.tensor(node.args[0], node)
        g = self.graph
        if isinstance(m, nn.Linear):
            return g.op(x, LinearOp(m))
        if isinstance(m, nn.Conv2d):
            check_conv(name, m)
            return g.op(x, Conv2dOp(m))
        if isinstance(m, nn.Flatten):
            return self._flatten(x, m.start_dim, m.end_dim, node)
        if isinstance(m, nn.ReLU):
            return g.relu(x)
        if isinstance(m, nn.modules.dropout._DropoutNd | nn.Identity):
            if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                raise ModelModeError(f"layer {name} ({kind}) is in training mode; call model.eval() first")
            return x
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            if m.training or not m.track_running_stats:
                raise ModelModeError(
                    f"layer {name} ({kind}) uses batch statistics (training mode); "
                    "call model.eval() so its running statistics are used"
                )
            return g.op(x, BatchNormOp(m))
        if isinstance(m, Normalize):
            return g.op(x, NormalizeOp(m))
        if isinstance(m, nn.MaxPool2d):
            return self._max_pool(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices,
                                  node)
        if isinstance(m, nn.AvgPool2d):
            return self._avg_pool(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                  m.divisor_override, node)
        return self._adaptive_avg_pool(x, m.output_size, node)  # the last of _MODULES (checked when traced)

    def function(self, node: fx.Node, fn: Any) -> Any:
        g = self.graph
        args = [self.value(a, node) for a in node.args]
        if fn in _RELU:
            return g.relu(self.tensor(node.args[0], node))
        if fn in _ADD or fn in _SUB:
            return self._add(node, args, -1.0 if fn in _SUB else 1.0)
        if fn in _MUL or fn in _DIV:
            return self._scale(node, args, fn in _DIV)
        if fn is operator.neg:
            x = self.tensor(node.args[0], node)
            return g.sum((x,), (-1.0,))
        if fn is torch.cat:
            xs = [self.tensor(a, node) for a in node.args[0]]
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            return self._cat(xs, dim, node)
        if fn in _FLATTEN:
            start = node.kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = node.kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            return self._flatten(self.tensor(node.args[0], node), start, end, node)
        if fn is F.max_pool2d:
            p = _bound_args(F.max_pool2d, args, node.kwargs)
            return self._max_pool(self.tensor(node.args[0], node), p["kernel_size"], p["stride"] or p["kernel_size"],
                                  p["padding"], p["dilation"], p["ceil_mode"], p["return_indices"], node)
        if fn is F.avg_pool2d:
            p = _bound_args(F.avg_pool2d, args, node.kwargs)
            return self._avg_pool(self.tensor(node.args[0], node), p["kernel_size"], p["stride"] or p["kernel_size"],
                                  p["padding"], p["ceil_mode"], p["count_include_pad"], p["divisor_override"], node)
        if fn is F.adaptive_avg_pool2d:
            return self._adaptive_avg_pool(self.tensor(node.args[0], node), args[1], node)
        if fn is getattr and args[1:] == ["shape"] and isinstance(args[0], _Ref):  # x.shape
            return _Shape()
        if fn is operator.getitem and isinstance(args[0], torch.Size | _Shape):
            return _Batch() if args[1] == 0 else _unsupported(node)
        if fn is F.dropout:
            if node.kwargs.get("training", args[2] if len(args) > 2 else True):
                raise ModelModeError(f"node {node.name} (F.dropout) runs in training mode; pass training=False")
            return self.tensor(node.args[0], node)
        return _unsupported(node)

    def method(self, node: fx.Node) -> Any:
        g = self.graph
        name = node.target
        args = [self.value(a, node) for a in node.args]
        if name in ("relu", "relu_"):
            return g.relu(self.tensor(node.args[0], node))
        if name in ("add", "add_", "sub", "sub_"):
            return self._add(node, args, -1.0 if name.startswith("sub") else 1.0)
        if name in ("mul", "mul_", "div", "div_"):
            return self._scale(node, args, name.startswith("div"))
        if name == "flatten":
            start = node.kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = node.kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            return self._flatten(self.tensor(node.args[0], node), start, end, node)
        if name in ("view", "reshape"):
            shape = args[1:] if len(args) > 2 or not isinstance(args[1], list | tuple) else list(args[1])
            x = self.tensor(node.args[0], node)
            batch_first = isinstance(shape[0], _Batch) or shape[0] == -1
            if len(shape) == 2 and batch_first and shape[1] in (-1, numel(g.shape(x))):
                return self._flatten(x, 1, -1, node)
            return _unsupported(node, "only view/reshape to (batch, -1) is supported")
        if name == "size" and args[1:] in ([0], []):
            return _Batch() if args[1:] == [0] else _Shape()
        if name in ("contiguous", "clone"):
            return self.tensor(node.args[0], node)
        return _unsupported(node)

    # -- operators -------------------------------------------------------------------------------
    def _add(self, node: fx.Node, args: list, sign: float) -> int:
        alpha = float(node.kwargs.get("alpha", 1.0))
        a, b = args[0], args[1]
        if not all(isinstance(v, _Ref) for v in (a, b)):
            return _unsupported(node, "adding a constant is not supported; use a layer's bias")
        return self.graph.sum((a, b), (1.0, sign * alpha))

    def _scale(self, node: fx.Node, args: list, divide: bool) -> int:
        a, b = args[0], args[1]
        if isinstance(b, _Ref) and not isinstance(a, _Ref) and not divide:
            a, b = b, a  # 2 * x
        if not isinstance(a, _Ref) or isinstance(b, _Ref | bool) or not isinstance(b, float | int):
            return _unsupported(node, "only multiplication or division by a number is affine")
        if not math.isfinite(b) or (divide and b == 0):
            return _unsupported(node, f"{'division' if divide else 'multiplication'} by {b} is not finite")
        return self.graph.sum((a,), (1.0 / b if divide else float(b),))

    def _cat(self, xs: list[int], dim: int, node: fx.Node) -> int:
        if dim == 0 or dim < -len(self.graph.shape(xs[0])):
            return _unsupported(node, "concatenation along the batch dimension")
        return self.graph.cat(xs, dim - 1 if dim > 0 else dim)

    def _flatten(self, x: int, start: int, end: int, node: fx.Node) -> int:
        rank = len(self.graph.shape(x)) + 1
        if start != 1 or end not in (-1, rank - 1):
            return _unsupported(node, "flatten must flatten all but the batch dimension")
        return self.graph.op(x, FlattenOp())

    def _max_pool(self, x: int, kernel, stride, padding, dilation, ceil_mode: bool, return_indices: bool,
                  node: fx.Node) -> int:
        if _pair(dilation) != (1, 1) or ceil_mode or return_indices:
            return _unsupported(node, "max pooling needs dilation 1, ceil_mode=False, return_indices=False")
        return self.graph.max_pool(x, _pair(kernel), _pair(stride if stride is not None else kernel), _pair(padding))

    def _avg_pool(self, x: int, kernel, stride, padding, ceil_mode: bool, count_include_pad: bool,
                  divisor_override, node: fx.Node) -> int:
        if ceil_mode or divisor_override is not None or (not count_include_pad and _pair(padding) != (0, 0)):
            return _unsupported(node, "average pooling needs ceil_mode=False, no divisor_override, "
                                      "and count_include_pad=True when padded")
        return self.graph.avg_pool(x, _pair(kernel), _pair(stride if stride is not None else kernel), _pair(padding))

    def _adaptive_avg_pool(self, x: int, output_size, node: fx.Node) -> int:
        shape = self.graph.shape(x)
        out = _pair(output_size) if not isinstance(output_size, list | tuple) or None not in output_size else None
        if len(shape) != 3 or out is None or shape[1] % out[0] or shape[2] % out[1]:
            return _unsupported(node, f"adaptive average pooling to {output_size} of shape {shape} "
                                      "(the output size must divide the input's)")
        kernel = (shape[1] // out[0], shape[2] // out[1])
        return self.graph.avg_pool(x, kernel, kernel, (0, 0))


class _Shape:
    """``x.size()`` / ``x.shape``: only indexed at 0 (the batch size)."""



def _bound_args(fn: Any, args: list, kwargs: dict) -> dict[str, Any]:
    """The pooling functions' arguments by name (their documented order; they have no signature)."""
    names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"] \
        if fn is F.max_pool2d else \
        ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
    defaults = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False,
                "count_include_pad": True, "divisor_override": None}
    return {**defaults, **dict(zip(names, args, strict=False)), **kwargs}


def _describe(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_module":
        return node.meta["kind"]
    return getattr(target, "__name__", str(target)) if node.op != "call_method" else f".{target}()"


def _where(node: fx.Node) -> str:
    """``layer NAME (Type)`` for a module call (as for a chain), else ``node NAME (function)``."""
    return f"layer {node.target} ({_describe(node)})" if node.op == "call_module" else \
        f"node {node.name} ({_describe(node)})"


def _unsupported(node: fx.Node, why: str = "") -> Any:
    raise UnsupportedLayerError(
        f"{_where(node)} is not supported" + (f": {why}" if why else
        ": polytope bounds ReLU graphs of affine layers, additions, concatenations and pooling")
    )
