"""ReLU graphs: affine operators, weighted sums, concatenations and ReLUs in a DAG, compiled to a chain.

Theorem 1 on a graph sums, at every node, the dual variables arriving from all its consumers, and
Algorithm 1 bounds each ReLU node from everything below it.  Rather than a second dual engine,
a :class:`Graph` is compiled to the paper's chain (eq. 1) in which the state between two ReLU
layers may hold, besides the ReLU units of one depth, *linear* units: copies of the values a
later operator reads (the ``x`` of ``x + f(x)``, the ``a`` of ``max(a, b) = a + ReLU(b - a)``).
A linear unit has ``z = zhat`` exactly, like a stably active ReLU, so on the compiled chain the
dual network passes ``nu`` through it unchanged -- the backward pass then adds, at every node, the
contributions of all its consumers: the graph's dual, not a relaxation of it.  The LP of eq. (19)
and the MILP get one equality per carried value, which changes neither optimum.

Depth ("level") of a node: the input has level 0, a ReLU one more than its argument, anything
else the largest level of its arguments.  Compiled layer ``j`` reads the state after the ReLUs of
level ``j`` and evaluates the affine nodes of level ``j``; its outputs are the pre-activations of
the ReLUs of level ``j + 1`` and the values some later layer reads (carried as linear units).
A layer that is a plain sequence of operators from one value to one ReLU stays an ordinary
:class:`~polytope.model.network.AffineLayer`, so a chain written as a graph compiles to the same
chain (same shapes, same fast paths).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from polytope.model.errors import ShapeMismatchError, UnsupportedLayerError
from polytope.model.ops import AffineLayer, GatherOp, Op, Shape, numel

Kind = Literal["input", "op", "sum", "cat", "relu"]


@dataclass(frozen=True, eq=False)
class Node:
    """One value of the graph: the input, ``op(x)``, ``sum_i c_i x_i``, a concatenation or ``ReLU(x)``."""

    kind: Kind
    inputs: tuple[int, ...]
    shape: Shape
    op: Op | None = None
    coeffs: tuple[float, ...] = ()
    dim: int = 0  # concatenation axis of one example (no batch dimension)


@dataclass
class Graph:
    """A builder of ReLU graphs over one input of shape ``input_shape`` (one example).

    Every method appends a node and returns its id; arguments must already exist, so ids are a
    topological order.  :meth:`compile` turns the graph into a :class:`Network`.
    """

    input_shape: Shape
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.nodes = [Node("input", (), self.input_shape)]

    @property
    def input(self) -> int:
        return 0

    def shape(self, x: int) -> Shape:
        return self.nodes[x].shape

    def _add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def op(self, x: int, op: Op) -> int:
        """``op(x)`` for one primitive operator (Linear, Conv2d, Flatten, BatchNorm, Gather, ...)."""
        return self._add(Node("op", (x,), tuple(op.out_shape(self.shape(x))), op))

    def sum(self, xs: Sequence[int], coeffs: Sequence[float] | None = None) -> int:
        """``sum_i c_i x_i`` of values of one shape (``c = 1`` by default): residual additions."""
        xs = tuple(xs)
        coeffs = tuple(float(c) for c in (coeffs if coeffs is not None else [1.0] * len(xs)))
        shapes = {self.shape(x) for x in xs}
        if len(shapes) != 1 or len(coeffs) != len(xs):
            raise ShapeMismatchError(f"an addition needs operands of one shape, got {[self.shape(x) for x in xs]}")
        return self._add(Node("sum", xs, shapes.pop(), coeffs=coeffs))

    def cat(self, xs: Sequence[int], dim: int) -> int:
        """Concatenation along axis ``dim`` of one example (``torch.cat`` along ``dim + 1``)."""
        xs = tuple(xs)
        shapes = [self.shape(x) for x in xs]
        rank = len(shapes[0])
        dim = dim + rank if dim < 0 else dim
        if not 0 <= dim < rank or any(
            len(s) != rank or s[:dim] + s[dim + 1:] != shapes[0][:dim] + shapes[0][dim + 1:] for s in shapes
        ):
            raise ShapeMismatchError(f"cannot concatenate shapes {shapes} along axis {dim}")
        shape = (*shapes[0][:dim], sum(s[dim] for s in shapes), *shapes[0][dim + 1:])
        return self._add(Node("cat", xs, shape, dim=dim))

    def relu(self, x: int) -> int:
        return self._add(Node("relu", (x,), self.shape(x)))

    def maximum(self, a: int, b: int) -> int:
        """``max(a, b) = a + ReLU(b - a)``: exact, and a ReLU graph every method handles."""
        return self.sum((a, self.relu(self.sum((b, a), (1.0, -1.0)))))

    def max_pool(self, x: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> int:
        """2-D max pooling of a ``(C, H, W)`` value: the window's taps, maximised pairwise in a balanced tree."""
        taps = self._window_taps(x, kernel, stride, padding, pad_value="repeat")
        while len(taps) > 1:
            taps = [self.maximum(taps[i], taps[i + 1]) if i + 1 < len(taps) else taps[i]
                    for i in range(0, len(taps), 2)]
        return taps[0]

    def avg_pool(self, x: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> int:
        """2-D average pooling (padding counted as zeros, PyTorch's default ``count_include_pad``)."""
        taps = self._window_taps(x, kernel, stride, padding, pad_value="zero")
        return self.sum(taps, [1.0 / len(taps)] * len(taps))

    def _window_taps(self, x: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                     pad_value: Literal["zero", "repeat"]) -> list[int]:
        shape = self.shape(x)
        if len(shape) != 3:
            raise ShapeMismatchError(f"pooling expects a (C, H, W) value, got shape {shape}")
        c, h, w = shape
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        if ph > kh // 2 or pw > kw // 2:
            raise UnsupportedLayerError(f"pooling padding {padding} must be at most half the kernel {kernel}")
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if oh < 1 or ow < 1:
            raise ShapeMismatchError(f"pooling kernel {kernel} does not fit input {shape}")
        grid = torch.arange(c * h * w).reshape(c, h, w)
        oy = torch.arange(oh).reshape(-1, 1) * sh - ph
        ox = torch.arange(ow).reshape(1, -1) * sw - pw
        first_y, first_x = oy.clamp_min(0), ox.clamp_min(0)  # a tap inside every window (padding <= k/2)
        taps = []
        for ky in range(kh):
            for kx in range(kw):
                iy, ix = oy + ky, ox + kx
                inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
                if pad_value == "repeat":  # max: an outside tap repeats one inside the window
                    iy, ix = torch.where(inside, iy, first_y), torch.where(inside, ix, first_x)
                index = grid[:, iy.clamp(0, h - 1), ix.clamp(0, w - 1)]
                if pad_value == "zero":
                    index = torch.where(inside, index, torch.full_like(index, -1))
                taps.append(self.op(x, GatherOp(index, c * h * w)))
        return taps

    def compile(self, output: int) -> tuple[tuple[AffineLayer, ...], tuple[torch.Tensor | None, ...]]:
        """The chain computing node ``output``: its affine layers and, per ReLU layer, the mask of its
        linear units (empty when there are none); :meth:`Network.from_graph` wraps them."""
        if len(self.shape(output)) != 1:
            raise ShapeMismatchError(f"the network's output must be a vector, got shape {self.shape(output)}")
        return _Compiler(self.nodes, output).chain()


# -- one compiled layer -------------------------------------------------------------------------


def _pack(values: list[torch.Tensor], shaped: bool) -> torch.Tensor:
    return values[0] if shaped else torch.cat([v.flatten(1) for v in values], dim=1)


@dataclass(frozen=True, eq=False)
class GraphOp:
    """One compiled layer: evaluates the affine nodes between two ReLU layers of a graph.

    ``inputs`` are the node ids of the state it reads, ``sources`` the nodes whose values make up its
    output, both in layout order; a state of one value keeps that value's shape, a state of several
    is their flat concatenation.  It has the primitive operators' interface (apply, transpose,
    interval, ``|W|``), so every generic path of the library runs through it.
    """

    nodes: tuple[Node, ...]
    inputs: tuple[int, ...]
    steps: tuple[int, ...]
    sources: tuple[int, ...]

    def state_shape(self, ids: Sequence[int]) -> Shape:
        return self.nodes[ids[0]].shape if len(ids) == 1 else (sum(numel(self.nodes[i].shape) for i in ids),)

    def out_shape(self, in_shape: Shape) -> Shape:
        if tuple(in_shape) != self.state_shape(self.inputs):
            raise ShapeMismatchError(
                f"graph layer expects inputs of shape {self.state_shape(self.inputs)}, got {in_shape}"
            )
        return self.state_shape(self.sources)

    def _split(self, x: torch.Tensor, ids: Sequence[int]) -> list[torch.Tensor]:
        """The values of the nodes ``ids`` in a state tensor ``x: (N, *state_shape)``, in layout order."""
        if len(ids) == 1:
            return [x]
        sizes = [numel(self.nodes[i].shape) for i in ids]
        return [part.reshape(x.shape[0], *self.nodes[i].shape)
                for i, part in zip(ids, x.split(sizes, dim=1), strict=True)]

    def _forward(self, values: dict[int, tuple[torch.Tensor, ...]], op_fn, sum_fn) -> None:
        for n in self.steps:
            node = self.nodes[n]
            args = [values[i] for i in node.inputs]
            if node.kind == "op":
                values[n] = op_fn(node.op, *args)
            elif node.kind == "sum":
                values[n] = sum_fn(node.coeffs, args)
            else:
                values[n] = tuple(torch.cat(parts, dim=node.dim + 1) for parts in zip(*args, strict=True))

    def _run(self, parts: tuple[torch.Tensor, ...], op_fn, sum_fn) -> tuple[torch.Tensor, ...]:
        split = [self._split(p, self.inputs) for p in parts]
        values = {i: tuple(u[k] for u in split) for k, i in enumerate(self.inputs)}
        self._forward(values, op_fn, sum_fn)
        shaped = len(self.sources) == 1
        return tuple(_pack([values[s][k] for s in self.sources], shaped) for k in range(len(parts)))

    def apply(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        def weighted(coeffs, args):
            return (sum(c * a[0] for c, a in zip(coeffs, args, strict=True)),)

        return self._run((x,), lambda op, a: (op.apply(a[0], bias),), weighted)[0]

    def apply_abs(self, x: torch.Tensor) -> torch.Tensor:
        def weighted(coeffs, args):
            return (sum(abs(c) * a[0] for c, a in zip(coeffs, args, strict=True)),)

        return self._run((x,), lambda op, a: (op.apply_abs(a[0]),), weighted)[0]

    def apply_interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def weighted(coeffs, args):
            low = sum(c * (a[0] if c >= 0 else a[1]) for c, a in zip(coeffs, args, strict=True))
            high = sum(c * (a[1] if c >= 0 else a[0]) for c, a in zip(coeffs, args, strict=True))
            return low, high

        return self._run((lo, hi), lambda op, a: op.apply_interval(*a), weighted)

    def transpose(self, y: torch.Tensor, in_shape: Shape) -> torch.Tensor:
        """``W^T y``: adjoints flow back through the steps, summed at every node with several consumers."""
        adj: dict[int, torch.Tensor] = {}

        def add(i: int, g: torch.Tensor) -> None:
            adj[i] = g if i not in adj else adj[i] + g

        for s, g in zip(self.sources, self._split(y, self.sources), strict=True):
            add(s, g)
        for n in reversed(self.steps):
            g = adj.pop(n, None)
            if g is None:
                continue
            node = self.nodes[n]
            if node.kind == "op":
                add(node.inputs[0], node.op.transpose(g, self.nodes[node.inputs[0]].shape))
            elif node.kind == "sum":
                for c, i in zip(node.coeffs, node.inputs, strict=True):
                    add(i, c * g)
            else:
                sizes = [self.nodes[i].shape[node.dim] for i in node.inputs]
                for i, part in zip(node.inputs, g.split(sizes, dim=node.dim + 1), strict=True):
                    add(i, part)
        zeros = [adj.get(i, y.new_zeros(y.shape[0], *self.nodes[i].shape)) for i in self.inputs]
        return _pack(zeros, len(self.inputs) == 1)


# -- compilation --------------------------------------------------------------------------------


class _Compiler:
    """Levels, carried values and layer layouts of a graph (see the module docstring)."""

    def __init__(self, nodes: list[Node], output: int) -> None:
        self.nodes = tuple(nodes)
        self.output = output
        keep = self._ancestors(output)
        self.ids = sorted(keep)
        self.level: dict[int, int] = {}
        for n in self.ids:
            node = self.nodes[n]
            if node.kind == "input":
                self.level[n] = 0
            elif node.kind == "relu":
                self.level[n] = self.level[node.inputs[0]] + 1
            else:
                self.level[n] = max(self.level[i] for i in node.inputs)
        self.depth = self.level[output]
        # the state a consumer reads an argument from: a ReLU reads it within the layer below it
        self.last_read = dict(self.level)
        for n in self.ids:
            node = self.nodes[n]
            state = self.level[n] - 1 if node.kind == "relu" else self.level[n]
            for i in node.inputs:
                self.last_read[i] = max(self.last_read[i], state)

    def _ancestors(self, output: int) -> set[int]:
        seen, stack = set(), [output]
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(self.nodes[n].inputs)
        if 0 not in seen:
            raise UnsupportedLayerError("the network's output does not depend on its input")
        return seen

    def state(self, j: int) -> tuple[list[int], list[int]]:
        """The ReLU nodes of level ``j`` and the values carried through state ``j`` (linear units)."""
        if j == 0:
            return [0], []
        relus = [n for n in self.ids if self.nodes[n].kind == "relu" and self.level[n] == j]
        carried = [n for n in self.ids if n not in relus and self.level[n] < j <= self.last_read[n]]
        return relus, carried

    def layer(self, j: int) -> AffineLayer:
        relus, carried = self.state(j)
        inputs = tuple(relus + carried)
        if j == self.depth:
            sources = (self.output,)
        else:
            nxt_relus, nxt_carried = self.state(j + 1)
            sources = tuple([self.nodes[r].inputs[0] for r in nxt_relus] + nxt_carried)
        steps = self._steps(set(inputs), sources, j)
        chain = self._as_chain(inputs, steps, sources)
        if chain is not None:
            return AffineLayer(chain)
        return AffineLayer((GraphOp(self.nodes, inputs, tuple(steps), sources),))

    def _steps(self, available: set[int], sources: Sequence[int], j: int) -> list[int]:
        needed, stack = set(), list(sources)
        while stack:
            n = stack.pop()
            if n in available or n in needed:
                continue
            if self.nodes[n].kind in ("input", "relu") or self.level[n] != j:
                raise AssertionError(f"graph compilation: node {n} is not computable in layer {j}")
            needed.add(n)
            stack.extend(self.nodes[n].inputs)
        return sorted(needed)

    def _as_chain(self, inputs: Sequence[int], steps: list[int], sources: Sequence[int]) -> tuple[Op, ...] | None:
        """The layer's operators when it is one sequence ``op_k(...op_1(input))`` (else ``None``)."""
        if len(inputs) != 1 or len(sources) != 1 or not steps:
            return None
        ops, current = [], inputs[0]
        for n in steps:
            node = self.nodes[n]
            if node.kind != "op" or node.inputs != (current,):
                return None
            ops.append(node.op)
            current = n
        return tuple(ops) if current == sources[0] else None

    def chain(self) -> tuple[tuple[AffineLayer, ...], tuple[torch.Tensor | None, ...]]:
        layers = tuple(self.layer(j) for j in range(self.depth + 1))
        masks = []
        for j in range(1, self.depth + 1):
            relus, carried = self.state(j)
            if not carried:
                masks.append(None)
                continue
            sizes = [numel(self.nodes[n].shape) for n in relus + carried]
            flags = [False] * len(relus) + [True] * len(carried)
            masks.append(torch.cat([torch.full((s,), f) for s, f in zip(sizes, flags, strict=True)]))
        return layers, (tuple(masks) if any(m is not None for m in masks) else ())
