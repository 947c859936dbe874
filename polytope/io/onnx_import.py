"""Import an ONNX network into polytope's own representation (:class:`~polytope.model.network.Network`).

The graph runs from one input to one output through affine operators, ReLUs, sums and
concatenations of computed values (residual blocks, branches) and max or average pooling: a ReLU
graph (paper eq. 1 with joins; Theorem 1 sums, at every value, the dual variables arriving from
all its consumers, see :mod:`polytope.model.graph`).  It is read node by node.  Between the
*joins* -- a tensor read by several nodes, a node reading several computed tensors (Add, Sub, Sum,
Concat) and pooling -- the values form chains, and every tensor carries the chain that ends at it.
Along a chain the tensor is tracked as a *view* of a *base* tensor: the base is the output of the
last real operator in polytope's layout (``(n,)`` or ``(C, H, W)``), and the view is an integer
array, shaped like the ONNX tensor, of flat indices into the base.  Layout operators (Flatten,
Reshape, Transpose, Squeeze, Unsqueeze) only permute that array, and selections (Slice, Gather
with constant indices) pick from it; the next matrix absorbs the permutation or selection into its
columns.  Elementwise affine maps (Add, Sub, Mul, Div by constants, BatchNormalization) are kept as
one pending ``x * s + t`` on the base and folded into the neighbouring Gemm/MatMul/Conv, so an
input normalisation ends up inside the first affine layer and consecutive dense maps compose into
one matrix (all folding in float64).

Convolutions stay convolutions (``nn.Conv2d``) when polytope's :class:`~polytope.model.network.Conv2dOp`
can express them exactly: group 1, dilation 1 and padding that is symmetric or whose extra side is
never reached by a window.  Otherwise (dilations, asymmetric pads, a convolution of a flat tensor)
the convolution becomes its exact dense matrix, built from the identity basis in float64, as long
as it has at most :data:`DENSE_LIMIT` entries.  Shapes, Gather, Concat, Cast, ... on constants
(the reshape-target chains exporters emit) are evaluated at load time.

A graph that is one chain becomes an ``nn.Sequential`` of its layers.  Otherwise, at each join the
chains reaching it are emitted as modules into a ``torch.fx`` graph module -- ``+``/``-`` for Add,
Sub and Sum of values of one shape, ``torch.cat`` for Concat (of the channels when every operand
keeps its own layout, else of the flattened operands, the view recording the ONNX order),
``nn.MaxPool2d``, ``nn.AvgPool2d`` (padding counted) and ``nn.AdaptiveAvgPool2d`` for pooling
(dilation 1, symmetric pads of at most half the kernel) -- and that module is traced by
:mod:`polytope.model.trace` like any torch graph (max pooling becomes ``a + ReLU(b - a)``, average
pooling a mean of gathers): exact, and the module gives the float64 forward pass.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from polytope.model.errors import ModelFileError, UnsupportedGraphError, UnsupportedOperatorError
from polytope.model.files import read_bytes, resolve
from polytope.model.network import Network

Shape = tuple[int, ...]

#: The most entries a convolution turned into a dense matrix may have.
DENSE_LIMIT = 1 << 26

#: Operators applied to the network's value (constant subgraphs may also use :data:`CONSTANT_OPS`).
VALUE_OPS = (
    "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Conv", "Relu", "Flatten", "Reshape", "Transpose",
    "BatchNormalization", "Identity", "Dropout", "Squeeze", "Unsqueeze", "Cast", "Neg", "Slice", "Gather",
    "MaxPool", "AveragePool", "GlobalAveragePool", "Sum", "Concat",
)
#: Operators that combine computed values (any other node reads at most one).
JOIN_OPS = ("Add", "Sub", "Sum", "Concat")
CONSTANT_OPS = (
    "Constant", "Shape", "Gather", "Concat", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Identity",
    "Slice", "Add", "Sub", "Mul", "Div", "Flatten", "Transpose", "Neg",
)
SUPPORTED_OPS = tuple(sorted(set(VALUE_OPS) | set(CONSTANT_OPS)))


@dataclass(frozen=True)
class OnnxNetwork:
    """An imported network and how its ONNX input and output map onto it.

    ``input_shape`` is the ONNX input's shape with a symbolic batch dimension read as 1;
    ``in_shape`` is the network's per-example shape (a batch is ``(B, *in_shape)``; an ONNX input
    ``v`` of ``input_shape`` is ``v.reshape(1, *in_shape)``, C order, as VNN-LIB numbers ``X_i``).
    """

    network: Network
    in_shape: Shape
    input_name: str
    input_shape: Shape
    output_name: str
    n_outputs: int

    @property
    def n_inputs(self) -> int:
        return int(np.prod(self.in_shape))


def load_onnx(path: str | Path, dtype: torch.dtype = torch.float32) -> Network:
    """The network of an ONNX file (see :func:`read_onnx` for its input/output metadata)."""
    return read_onnx(path, dtype).network


def read_onnx(path: str | Path, dtype: torch.dtype = torch.float32) -> OnnxNetwork:
    """Read an ONNX file into an :class:`OnnxNetwork` whose weights have ``dtype``.

    Raises :class:`ModelFileError` for a missing or non-ONNX file, :class:`UnsupportedOperatorError`
    for an operator (or attribute) outside :data:`SUPPORTED_OPS` and :class:`UnsupportedGraphError`
    for a graph shape polytope cannot import: several inputs or outputs, a dynamic shape, an output
    that does not depend on the input, a pooling of a permuted layout (all name the node and its type).
    """
    return _Importer(_load_model(Path(path)), dtype).run()


def _load_model(path: Path):
    import onnx  # optional dependency: only needed here

    path = resolve(path)
    if not path.is_file():
        raise ModelFileError(f"ONNX file {str(path)!r} does not exist")
    try:
        model = onnx.load_model_from_string(read_bytes(path))
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise ModelFileError(f"{str(path)!r} is not an ONNX model: {exc}") from exc
    if model.ir_version <= 0 or not model.graph.node:
        raise ModelFileError(f"{str(path)!r} is not an ONNX model (no graph)")
    return model


# ---------------------------------------------------------------------------------------------
# The affine pieces of one layer, in float64 on polytope's base tensor
# ---------------------------------------------------------------------------------------------
@dataclass
class _Dense:
    """``W x + b`` on a flat base."""

    w: np.ndarray
    b: np.ndarray | None

    def module(self, dtype: torch.dtype) -> nn.Module:
        m = nn.Linear(self.w.shape[1], self.w.shape[0], bias=self.b is not None)
        return _set(m, dtype, weight=self.w, bias=self.b)


@dataclass
class _Conv:
    """A convolution polytope's ``Conv2dOp`` expresses exactly (group 1, dilation 1, symmetric pads)."""

    w: np.ndarray
    b: np.ndarray | None
    stride: tuple[int, int]
    padding: tuple[int, int]

    def module(self, dtype: torch.dtype) -> nn.Module:
        c_out, c_in, kh, kw = self.w.shape
        m = nn.Conv2d(c_in, c_out, (kh, kw), self.stride, self.padding, bias=self.b is not None)
        return _set(m, dtype, weight=self.w, bias=self.b)


@dataclass
class _Flatten:
    def module(self, dtype: torch.dtype) -> nn.Module:
        return nn.Flatten()


@dataclass
class _Scale:
    """``x * s + t`` elementwise (flat base) or per channel (``(C, H, W)`` base): an eval-mode batch norm."""

    s: np.ndarray
    t: np.ndarray
    base_shape: Shape

    def module(self, dtype: torch.dtype) -> nn.Module:
        if len(self.base_shape) == 1:
            m: nn.Module = nn.BatchNorm1d(self.base_shape[0], eps=0.0)
            s, t = self.s, self.t
        else:
            m = nn.BatchNorm2d(self.base_shape[0], eps=0.0)
            s, t = _per_channel(self.s, self.base_shape), _per_channel(self.t, self.base_shape)
        _set(m, dtype, weight=s, bias=t)
        return m.eval()


def _set(m: nn.Module, dtype: torch.dtype, **values: np.ndarray | None) -> nn.Module:
    m = m.to(dtype)
    with torch.no_grad():
        for name, value in values.items():
            if value is not None:
                getattr(m, name).copy_(torch.from_numpy(np.array(value, dtype=np.float64)))
    return m


def _per_channel(a: np.ndarray, base_shape: Shape) -> np.ndarray | None:
    """The channel values of ``a`` (flat over a ``(C, H, W)`` base) if it is constant per channel."""
    if len(base_shape) != 3:
        return None
    rows = a.reshape(base_shape[0], -1)
    return rows[:, 0].copy() if np.all(rows == rows[:, :1]) else None


# ---------------------------------------------------------------------------------------------
# One chain: the pieces from a start value to one ONNX tensor
# ---------------------------------------------------------------------------------------------
@dataclass
class _Chain:
    """The affine pieces and ReLUs from a start value to one ONNX tensor, in float64.

    ``source`` is the fx node the chain starts from (``None``: the network's input, nothing emitted);
    ``segments`` are the pieces between ReLUs not emitted yet, ``pending`` an elementwise ``x * s + t``
    on the flat base not folded yet, and ``view`` the tensor as flat indices into the base (always a
    permutation of it: selections are made concrete at once).
    """

    base_shape: Shape
    view: np.ndarray
    source: fx.Node | None = None
    after_relu: bool = True  # the start is the network's input or a ReLU's output
    segments: list[list] = field(default_factory=lambda: [[]])
    pending: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def at_relu(self) -> bool:
        """Whether no affine piece follows the input or the last ReLU (a ReLU here needs one first)."""
        return not self.segments[-1] and (len(self.segments) > 1 or self.after_relu)

    @property
    def in_order(self) -> bool:
        """Whether the tensor is its base in C order."""
        return np.array_equal(self.view.ravel(), np.arange(self.view.size))

    @property
    def has_matrix(self) -> bool:
        return any(isinstance(piece, _Dense | _Conv) for seg in self.segments for piece in seg)

    @property
    def emitted(self) -> bool:
        """Whether every piece is emitted (the chain is its source, seen through the view)."""
        return self.segments == [[]] and self.pending is None

    def branch(self) -> _Chain:
        """A new chain from this emitted one, for one more consumer of its tensor."""
        return _Chain(self.base_shape, self.view, self.source, self.after_relu)

    def restart(self, source: fx.Node, base_shape: Shape, after_relu: bool) -> None:
        """Continue from ``source`` (the emitted pieces' output, or a join's), whose shape is ``base_shape``."""
        self.source, self.base_shape, self.after_relu = source, tuple(base_shape), after_relu
        self.segments, self.pending = [[]], None

    # -- matrices -----------------------------------------------------------------------------
    def dense_on_view(self, w: np.ndarray, b: np.ndarray | None, out_shape: Shape) -> np.ndarray:
        """Append ``W v + b`` where ``v`` is the view flattened: ``W``'s columns follow the view's order
        (a selection's view may repeat or skip base elements: repeated columns add up)."""
        self.flatten_base()
        full = np.zeros((w.shape[0], int(np.prod(self.base_shape))))
        np.add.at(full.T, self.view.ravel(), w.T)
        self.dense_on_base(full, b)
        return np.arange(w.shape[0], dtype=np.int64).reshape(out_shape)

    def dense_on_base(self, w: np.ndarray, b: np.ndarray | None) -> None:
        if self.pending is not None:  # W (x * s + t) + b
            s, t = self.pending
            b = (0.0 if b is None else b) + w @ t
            w = w * s[None, :]
            self.pending = None
        seg = self.segments[-1]
        if seg and isinstance(seg[-1], _Dense):  # W (W0 x + b0) + b: consecutive matrices compose
            prev = seg.pop()
            if prev.b is not None:
                b = (0.0 if b is None else b) + w @ prev.b
            w = w @ prev.w
        seg.append(_Dense(w, b))
        self.base_shape = (w.shape[0],)

    def flatten_base(self) -> None:
        if len(self.base_shape) != 1:
            self.segments[-1].append(_Flatten())
            self.base_shape = (int(np.prod(self.base_shape)),)

    # -- convolutions -------------------------------------------------------------------------
    def native(self, geo: _ConvGeometry, chw: Shape) -> bool:
        """Whether ``Conv2dOp`` computes this convolution of the tensor exactly."""
        identity = self.base_shape == chw and self.in_order
        per_channel = self.pending is None or all(_per_channel(a, chw) is not None for a in self.pending)
        return identity and per_channel and geo.symmetric is not None

    def native_conv(self, w: np.ndarray, bias: np.ndarray | None, geo: _ConvGeometry, chw: Shape) -> np.ndarray:
        if self.pending is not None:
            s, t = self.pending
            if np.any(t != 0) and any(geo.symmetric):  # zero padding: a shift is no bias at the border
                self.segments[-1].append(_Scale(s, t, chw))
            else:  # conv(x * s + t) = conv'(x) + b' with the kernel scaled per input channel
                sc, tc = _per_channel(s, chw), _per_channel(t, chw)
                shift = np.einsum("oikl,i->o", w, tc)
                w = w * sc[None, :, None, None]
                bias = shift if bias is None else bias + shift
            self.pending = None
        self.segments[-1].append(_Conv(w, bias, geo.stride, geo.symmetric))
        self.base_shape = (w.shape[0], *geo.out_hw)
        return np.arange(int(np.prod(self.base_shape)), dtype=np.int64).reshape(1, *self.base_shape)

    # -- elementwise maps, ReLUs, the end -----------------------------------------------------
    def compose(self, s_view: np.ndarray, t_view: np.ndarray) -> None:
        """Compose ``x * s + t`` (shaped like the view) into the pending elementwise map."""
        n = self.view.size
        s_base, t_base = np.empty(n), np.empty(n)
        s_base[self.view.ravel()] = s_view.ravel()
        t_base[self.view.ravel()] = t_view.ravel()
        if self.pending is not None:
            s0, t0 = self.pending
            s_base, t_base = s0 * s_base, t0 * s_base + t_base
        self.pending = (s_base, t_base)

    def relu(self) -> None:
        self.flush()
        if self.at_relu:  # a ReLU on the input, or right after another: an exact identity layer first
            self.view = self.dense_on_view(np.eye(self.view.size), None, self.view.shape)
        self.segments.append([])

    def flush(self) -> None:
        """Fold the pending elementwise map into the layer's last piece, or make it a piece of its own."""
        if self.pending is None:
            return
        s, t = self.pending
        seg = self.segments[-1]
        last = seg[-1] if seg else None
        if isinstance(last, _Dense):
            last.w = s[:, None] * last.w
            last.b = t + (0.0 if last.b is None else s * last.b)
        elif isinstance(last, _Conv) and _per_channel(s, self.base_shape) is not None \
                and _per_channel(t, self.base_shape) is not None:
            sc, tc = _per_channel(s, self.base_shape), _per_channel(t, self.base_shape)
            last.w = last.w * sc[:, None, None, None]
            last.b = tc + (0.0 if last.b is None else sc * last.b)
        else:  # a batch norm: per channel of a (C, H, W) base, else elementwise on the flattened base
            if len(self.base_shape) != 3 or _per_channel(s, self.base_shape) is None \
                    or _per_channel(t, self.base_shape) is None:
                self.flatten_base()
            seg.append(_Scale(s, t, self.base_shape))
        self.pending = None

    def finish(self, matrix_elsewhere: bool) -> int:
        """Close the last layer: the network's output is the ONNX output flattened in C order."""
        self.flush()
        n = self.view.size
        # ends with a ReLU, or a layout change to undo, or no matrix at all (polytope's layers need one)
        if self.at_relu or not self.in_order or not (matrix_elsewhere or self.has_matrix):
            self.view = self.dense_on_view(np.eye(n), None, (n,))
        self.flatten_base()
        return int(n)

    def modules(self, dtype: torch.dtype) -> list[nn.Module]:
        modules: list[nn.Module] = []
        for i, seg in enumerate(self.segments):
            if i:
                modules.append(nn.ReLU())
            modules.extend(piece.module(dtype) for piece in seg)
        for p in (p for m in modules for p in m.parameters()):
            p.requires_grad_(False)
        return modules


# ---------------------------------------------------------------------------------------------
# The importer
# ---------------------------------------------------------------------------------------------
@dataclass
class _Importer:
    """Reads the nodes in order: constants are folded, every computed tensor gets the chain ending at it,
    joins emit the chains they read into ``fx_graph`` (modules under ``root``)."""

    model: object
    dtype: torch.dtype
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, Shape] = field(default_factory=dict)  # ONNX shape of every computed tensor
    chains: dict[str, _Chain] = field(default_factory=dict)  # the chain ending at every computed tensor
    uses: Counter = field(default_factory=Counter)  # how many node inputs (and graph outputs) read each tensor
    chain: _Chain | None = None  # the chain the current node extends
    current: str = ""  # the computed tensor the current node reads
    dead: set[str] = field(default_factory=set)  # secondary outputs (masks, statistics) we do not model
    fx_graph: fx.Graph = field(default_factory=fx.Graph)  # the emitted modules and joins (graphs only)
    root: nn.Module = field(default_factory=nn.Module)
    input_node: fx.Node | None = None
    matrix_emitted: bool = False

    @property
    def view(self) -> np.ndarray:
        """The current node's computed input as flat indices into its chain's base."""
        return self.chain.view

    def run(self) -> OnnxNetwork:
        from onnx import numpy_helper

        graph = self.model.graph
        for init in graph.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        inputs = [v for v in graph.input if v.name not in self.consts]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise UnsupportedGraphError(
                f"the graph has {len(inputs)} inputs and {len(graph.output)} outputs; only one of each is supported"
            )
        output = graph.output[0].name
        self.uses.update(name for node in graph.node if node.op_type != "Shape" for name in node.input if name)
        self.uses[output] += 1
        in_shape = self._start(inputs[0])
        self.input_node = self.fx_graph.placeholder("x")
        for node in graph.node:
            self._node(node)
        if output not in self.chains:
            raise UnsupportedGraphError(f"the graph output {output!r} is not computed from the input")
        last = self._take(output)
        n_out = last.finish(self.matrix_emitted)
        is_graph = last.source is not None  # something on the way to the output was emitted at a join
        if is_graph:  # the fx module of the chains and joins, traced like any torch graph
            self.fx_graph.output(self._emit(last))
            model: nn.Module = fx.GraphModule(self.root, self.fx_graph)
        else:  # a chain: an nn.Sequential of its layers (eq. 1)
            if len(last.segments[0]) > 1 and isinstance(last.segments[0][0], _Flatten):
                del last.segments[0][0]  # a network on the flat input needs no Flatten op
                in_shape = (int(np.prod(in_shape)),)
            model = nn.Sequential(*last.modules(self.dtype))
        model.eval()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise ModelFileError("the network's weights (after folding) hold NaN or infinite values")
        network = Network.from_torch(model, in_shape if is_graph else None)
        return OnnxNetwork(network, in_shape, inputs[0].name, self.shapes[inputs[0].name], output, n_out)

    # -- the start, chains and their emission ---------------------------------------------------
    def _start(self, value) -> Shape:
        dims = value.type.tensor_type.shape.dim
        shape = []
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            elif i == 0 and len(dims) >= 2:
                shape.append(1)  # a symbolic batch dimension
            else:
                raise UnsupportedGraphError(
                    f"input {value.name!r} has a dynamic dimension {i} ({d.dim_param or '?'}); only the batch "
                    "dimension may be symbolic"
                )
        full = tuple(shape)
        base_shape = full[1:] if len(full) >= 2 and full[0] == 1 else full
        self._set(value.name, _Chain(base_shape, np.arange(int(np.prod(full)), dtype=np.int64).reshape(full)))
        return base_shape

    def _set(self, name: str, chain: _Chain) -> None:
        self.chains[name] = chain
        self.shapes[name] = tuple(chain.view.shape)

    def _take(self, name: str) -> _Chain:
        """The chain of tensor ``name`` for one consumer: its own if it is the only one, else (the pieces so
        far emitted once, shared) a new chain from the emitted value."""
        if self.uses[name] <= 1:
            return self.chains.pop(name)
        chain = self.chains[name]
        if not chain.emitted or chain.source is None:
            self._emit(chain)
        return chain.branch()

    def _emit(self, chain: _Chain) -> fx.Node:
        """Turn the chain's pieces into modules of the fx graph; the chain restarts from their output."""
        chain.flush()
        after_relu = chain.at_relu
        node = chain.source if chain.source is not None else self.input_node
        for m in chain.modules(self.dtype):
            node = self._call(m, node)
        chain.restart(node, chain.base_shape, after_relu)
        return node

    def _call(self, module: nn.Module, arg: fx.Node) -> fx.Node:
        name = f"{type(module).__name__.lower()}_{sum(1 for _ in self.root.children())}"
        self.root.add_module(name, module)
        self.matrix_emitted |= isinstance(module, nn.Linear | nn.Conv2d)
        return self.fx_graph.call_module(name, (arg,))

    # -- one node -----------------------------------------------------------------------------
    def _node(self, node) -> None:
        for name in node.input:
            if name in self.dead:
                raise UnsupportedOperatorError(
                    f"node {node.name!r} ({node.op_type}) reads {name!r}, a training-only output"
                )
        dynamic = [name for name in node.input if name in self.shapes]
        if not dynamic or (node.op_type == "Shape" and len(dynamic) == 1):
            self._fold(node)
            return
        attrs = _attrs(node)
        if node.op_type in ("Sum", "Concat") or (node.op_type in JOIN_OPS and len(dynamic) > 1):
            chain = self._concat(node, attrs) if node.op_type == "Concat" else self._sum(node, dynamic)
        elif len(dynamic) > 1:
            raise UnsupportedOperatorError(
                f"node {node.name!r} ({node.op_type}) reads {len(dynamic)} computed values "
                f"({', '.join(map(repr, dynamic))}); only {', '.join(JOIN_OPS)} combine values (not affine)"
            )
        else:
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                raise UnsupportedOperatorError(
                    f"node {node.name!r}: operator {node.op_type} is not supported on the network's value "
                    f"(supported: {', '.join(VALUE_OPS)})"
                )
            self.current, self.chain = dynamic[0], self._take(dynamic[0])
            view = handler(node, attrs)
            chain = self.chain
            chain.view = view
        self._set(node.output[0], chain)
        self.dead.update(name for name in node.output[1:] if name)

    def _const(self, node, index: int, what: str) -> np.ndarray:
        name = node.input[index] if index < len(node.input) else ""
        if name not in self.consts:
            raise UnsupportedGraphError(
                f"node {node.name!r} ({node.op_type}): its {what} is not a constant (dynamic shapes and "
                "data-dependent parameters are not supported)"
            )
        return self.consts[name]

    def _optional(self, node, index: int, what: str) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            return None
        return self._const(node, index, what)

    def _data_first(self, node) -> None:
        if node.input[0] != self.current:
            raise UnsupportedOperatorError(
                f"node {node.name!r} ({node.op_type}): the network's value must be its first input"
            )

    # -- constant folding ---------------------------------------------------------------------
    def _fold(self, node) -> None:
        if node.op_type not in CONSTANT_OPS:
            raise UnsupportedOperatorError(
                f"node {node.name!r}: operator {node.op_type} is not supported (supported: {', '.join(SUPPORTED_OPS)})"
            )
        attrs = _attrs(node)
        if node.op_type == "Shape":
            source = node.input[0]
            full = np.array(self.shapes[source] if source in self.shapes else self._known(node, source).shape,
                            dtype=np.int64)
            value = full[attrs.get("start", 0): attrs.get("end", len(full))]
        elif node.op_type == "Constant":
            value = _constant_value(node, attrs)
        else:
            value = _fold_op(node, attrs, [self._known(node, name) if name else None for name in node.input])
        self.consts[node.output[0]] = np.asarray(value)

    def _known(self, node, name: str) -> np.ndarray:
        if name not in self.consts:
            raise UnsupportedGraphError(f"node {node.name!r} ({node.op_type}) reads {name!r}, which no node computes")
        return self.consts[name]

    # -- joins: sums and concatenations of computed values ------------------------------------
    def _sum(self, node, dynamic: list[str]) -> _Chain:
        """Add, Sub or Sum of computed values (constant operands of Sum shift the result)."""
        coeffs = [-1.0 if node.op_type == "Sub" and i == 1 else 1.0
                  for i, name in enumerate(node.input) if name in self.shapes]
        chains = [self._take(name) for name in dynamic]
        if len({c.view.shape for c in chains}) > 1:
            raise UnsupportedOperatorError(
                f"node {node.name!r} ({node.op_type}) adds computed values of shapes "
                f"{', '.join(str(c.view.shape) for c in chains)}; broadcasting between them is not supported"
            )
        if len(chains) == 1:
            self.chain = chains[0]
        else:
            self._align(chains)
            total = self._emit(chains[0])
            for c, chain in zip(coeffs[1:], chains[1:], strict=True):
                total = self.fx_graph.call_function(operator.add if c > 0 else operator.sub,
                                                    (total, self._emit(chain)))
            self.chain = _Chain(chains[0].base_shape, chains[0].view, total, after_relu=False)
        shifts = [self.consts[name].astype(np.float64) for name in node.input if name and name not in self.shapes]
        if shifts:
            self.chain.view = self._elementwise(node, 1.0, sum(shifts))
        return self.chain

    def _align(self, chains: list[_Chain]) -> None:
        """Bring the operands of a sum onto one layout: equal views of bases of one shape."""
        for chain in chains:
            chain.flush()
        if any(not np.array_equal(c.view, chains[0].view) for c in chains):
            for chain in chains:  # each in C order (a permutation matrix, composed into a matrix before it)
                if not chain.in_order:
                    chain.view = chain.dense_on_view(np.eye(chain.view.size), None, chain.view.shape)
        if len({c.base_shape for c in chains}) > 1:
            for chain in chains:
                chain.flatten_base()

    def _concat(self, node, attrs: dict) -> _Chain:
        """Concatenation of computed values: ``torch.cat`` of their channels when all keep their own layout,
        else of their flattened bases, with the concatenated views as the new view."""
        if any(name not in self.shapes for name in node.input if name):
            raise UnsupportedOperatorError(
                f"node {node.name!r} (Concat) joins the network's value with a constant; only computed values "
                "(or only constants) can be concatenated"
            )
        chains = [self._take(name) for name in node.input if name]
        if len(chains) == 1:
            return chains[0]
        rank = chains[0].view.ndim
        axis = int(attrs.get("axis", 0))
        try:
            joined = np.concatenate([c.view for c in chains], axis=axis)
        except ValueError as exc:  # shapes that do not fit, or a bad axis
            raise UnsupportedOperatorError(f"node {node.name!r} (Concat): {exc}") from exc
        axis %= rank
        for chain in chains:
            chain.flush()
        shaped = axis >= 1 and all(c.in_order and c.view.shape[0] == 1 and c.base_shape == c.view.shape[1:]
                                   for c in chains)
        if not shaped:
            for chain in chains:
                chain.flatten_base()
        cat = self.fx_graph.call_function(torch.cat, ([self._emit(c) for c in chains],), {"dim": axis if shaped else 1})
        if shaped:
            return _Chain(joined.shape[1:], np.arange(joined.size, dtype=np.int64).reshape(joined.shape), cat, False)
        offsets = np.cumsum([0] + [c.base_shape[0] for c in chains[:-1]])
        view = np.concatenate([c.view + offset for c, offset in zip(chains, offsets, strict=True)], axis=axis)
        return _Chain((int(view.size),), view, cat, after_relu=False)

    # -- layout operators: only the view changes ----------------------------------------------
    def _op_Identity(self, node, attrs) -> np.ndarray:
        return self.view

    def _op_Dropout(self, node, attrs) -> np.ndarray:
        training = self._optional(node, 2, "training_mode")
        if training is not None and bool(training):
            raise UnsupportedOperatorError(f"node {node.name!r} (Dropout) is in training mode")
        return self.view

    def _op_Cast(self, node, attrs) -> np.ndarray:
        from onnx import helper

        if helper.tensor_dtype_to_np_dtype(attrs["to"]) not in (np.float32, np.float64):
            raise UnsupportedOperatorError(
                f"node {node.name!r} (Cast) casts the network's value to a type other than float32/float64"
            )
        return self.view

    def _op_Flatten(self, node, attrs) -> np.ndarray:
        return _flatten(self.view, attrs.get("axis", 1))

    def _op_Reshape(self, node, attrs) -> np.ndarray:
        self._data_first(node)
        target = [int(v) for v in self._const(node, 1, "target shape")]
        if not attrs.get("allowzero", 0):
            target = [self.view.shape[i] if v == 0 else v for i, v in enumerate(target)]
        try:
            return self.view.reshape(target)
        except ValueError as exc:
            raise UnsupportedGraphError(f"node {node.name!r} (Reshape): {exc}") from exc

    def _op_Transpose(self, node, attrs) -> np.ndarray:
        return self.view.transpose(attrs.get("perm", list(reversed(range(self.view.ndim)))))

    def _op_Slice(self, node, attrs) -> np.ndarray:
        """A selection of the value's elements: only the view changes (the next matrix picks its columns)."""
        self._data_first(node)
        args = [self.view, *(self._optional(node, i, "slice parameter") for i in range(1, len(node.input)))]
        return self._selection(node, _fold_slice(self.view, attrs, args))

    def _op_Gather(self, node, attrs) -> np.ndarray:
        """Elements of the value at constant indices (a selection, like :meth:`_op_Slice`)."""
        self._data_first(node)
        indices = self._const(node, 1, "indices").astype(np.int64)
        axis = attrs.get("axis", 0)
        if indices.size and (indices.max() >= self.view.shape[axis] or indices.min() < -self.view.shape[axis]):
            raise UnsupportedOperatorError(f"node {node.name!r} (Gather): an index is out of range")
        return self._selection(node, np.take(self.view, indices, axis=axis))

    def _selection(self, node, view: np.ndarray) -> np.ndarray:
        """Make a selection concrete at once (an exact 0/1 matrix, which composes with a dense layer before
        it), so every later view is a permutation of its base again."""
        if view.size == 0:
            raise UnsupportedGraphError(f"node {node.name!r} ({node.op_type}) selects no element")
        self.chain.view = view
        return self.chain.dense_on_view(np.eye(view.size), None, view.shape)

    def _op_Squeeze(self, node, attrs) -> np.ndarray:
        axes = self._axes(node, attrs)
        return _squeeze(self.view, axes)

    def _op_Unsqueeze(self, node, attrs) -> np.ndarray:
        return _unsqueeze(self.view, self._axes(node, attrs))

    def _axes(self, node, attrs) -> list[int] | None:
        axes = self._optional(node, 1, "axes")
        if axes is None:
            return attrs.get("axes")
        return [int(a) for a in np.atleast_1d(axes)]

    # -- elementwise affine maps --------------------------------------------------------------
    def _op_Add(self, node, attrs) -> np.ndarray:
        return self._elementwise(node, 1.0, self._other(node))

    def _op_Sub(self, node, attrs) -> np.ndarray:
        c = self._other(node)
        return self._elementwise(node, 1.0, -c) if node.input[0] == self.current else self._elementwise(node, -1.0, c)

    def _op_Neg(self, node, attrs) -> np.ndarray:
        return self._elementwise(node, -1.0, 0.0)

    def _op_Mul(self, node, attrs) -> np.ndarray:
        return self._elementwise(node, self._other(node), 0.0)

    def _op_Div(self, node, attrs) -> np.ndarray:
        if node.input[0] != self.current:
            raise UnsupportedOperatorError(f"node {node.name!r} (Div) divides by the network's value (not affine)")
        divisor = self._other(node)
        if np.any(divisor == 0):
            raise UnsupportedOperatorError(f"node {node.name!r} (Div) divides by zero")
        return self._elementwise(node, 1.0 / divisor, 0.0)

    def _other(self, node) -> np.ndarray:
        return self._const(node, 1 if node.input[0] == self.current else 0, "second operand").astype(np.float64)

    def _op_BatchNormalization(self, node, attrs) -> np.ndarray:
        if attrs.get("training_mode", 0):
            raise UnsupportedOperatorError(f"node {node.name!r} (BatchNormalization) is in training mode")
        scale, bias, mean, var = (self._const(node, i, w).astype(np.float64)
                                  for i, w in enumerate(("scale", "bias", "mean", "variance"), start=1))
        s = scale / np.sqrt(var + attrs.get("epsilon", 1e-5))
        channel = (1, -1, *([1] * (self.view.ndim - 2)))
        return self._elementwise(node, s.reshape(channel), (bias - mean * s).reshape(channel))

    def _elementwise(self, node, s, t) -> np.ndarray:
        """Compose ``x * s + t`` (broadcast to the view) into the pending elementwise map."""
        shape = self.view.shape
        try:
            s_view, t_view = (np.broadcast_to(np.asarray(a, dtype=np.float64), shape) for a in (s, t))
        except ValueError as exc:
            raise UnsupportedOperatorError(
                f"node {node.name!r} ({node.op_type}): its constant does not broadcast to the value's shape {shape}"
            ) from exc
        self.chain.compose(s_view, t_view)
        return self.view

    # -- matrices -----------------------------------------------------------------------------
    def _op_Gemm(self, node, attrs) -> np.ndarray:
        self._data_first(node)
        b = self._const(node, 1, "matrix B").astype(np.float64)
        b = b.T if attrs.get("transB", 0) else b
        shape = self.view.shape
        if attrs.get("transA", 0):
            shape = shape[::-1]
        if len(shape) != 2 or shape[0] != 1 or shape[1] != b.shape[0]:
            raise UnsupportedOperatorError(
                f"node {node.name!r} (Gemm): the network's value has shape {self.view.shape}, expected one row "
                f"of {b.shape[0]}"
            )
        w = attrs.get("alpha", 1.0) * b.T
        c = self._optional(node, 2, "bias C")
        bias = None if c is None else np.broadcast_to(attrs.get("beta", 1.0) * c.astype(np.float64),
                                                      (1, w.shape[0])).ravel()
        return self.chain.dense_on_view(w, bias, (1, w.shape[0]))

    def _op_MatMul(self, node, attrs) -> np.ndarray:
        self._data_first(node)
        w = self._const(node, 1, "weight").astype(np.float64)
        shape = self.view.shape
        if w.ndim != 2 or not shape or shape[-1] != w.shape[0]:
            raise UnsupportedOperatorError(
                f"node {node.name!r} (MatMul): value of shape {shape} times a constant of shape {w.shape}; "
                "only a 2-D constant on the right is supported"
            )
        rows = int(np.prod(shape[:-1]))
        return self.chain.dense_on_view(np.kron(np.eye(rows), w.T), None, (*shape[:-1], w.shape[1]))

    # -- convolutions -------------------------------------------------------------------------
    def _op_Conv(self, node, attrs) -> np.ndarray:
        self._data_first(node)
        w = self._const(node, 1, "kernel").astype(np.float64)
        bias = self._optional(node, 2, "bias")
        bias = None if bias is None else bias.astype(np.float64)
        shape = self.view.shape
        if w.ndim != 4 or len(shape) != 4 or shape[0] != 1:
            raise UnsupportedOperatorError(
                f"node {node.name!r} (Conv): only 2-D convolutions of one (1, C, H, W) example are supported, "
                f"got a value of shape {shape} and a kernel of shape {w.shape}"
            )
        if attrs.get("group", 1) != 1:
            raise UnsupportedOperatorError(f"node {node.name!r} (Conv) has group={attrs['group']}; only group=1")
        if w.shape[1] != shape[1]:
            raise UnsupportedOperatorError(f"node {node.name!r} (Conv): kernel {w.shape} does not fit value {shape}")
        geo = _ConvGeometry.of(node, attrs, shape[2:], w.shape[2:])
        chw = shape[1:]
        if self.chain.native(geo, chw):
            return self.chain.native_conv(w, bias, geo, chw)
        c_out, out_hw = w.shape[0], geo.out_hw
        n_in, n_out = int(np.prod(chw)), c_out * out_hw[0] * out_hw[1]
        if n_in * n_out > DENSE_LIMIT:
            raise UnsupportedOperatorError(
                f"node {node.name!r} (Conv) needs {geo.reason()}, done as a dense matrix, but {n_out}x{n_in} "
                f"exceeds {DENSE_LIMIT} entries"
            )
        dense = geo.dense(w, chw)
        b = None if bias is None else np.repeat(bias, out_hw[0] * out_hw[1])
        return self.chain.dense_on_view(dense, b, (1, c_out, *out_hw))

    # -- ReLU and pooling ---------------------------------------------------------------------
    def _op_Relu(self, node, attrs) -> np.ndarray:
        self.chain.relu()
        return self.view

    def _op_MaxPool(self, node, attrs) -> np.ndarray:
        kernel, stride, padding = self._window(node, attrs)
        return self._pool(nn.MaxPool2d(kernel, stride, padding), node)

    def _op_AveragePool(self, node, attrs) -> np.ndarray:
        kernel, stride, padding = self._window(node, attrs)
        if any(padding) and not attrs.get("count_include_pad", 0):
            raise UnsupportedOperatorError(
                f"node {node.name!r} (AveragePool) is padded with count_include_pad=0 (the padding is not counted); "
                "only count_include_pad=1 is supported"
            )
        return self._pool(nn.AvgPool2d(kernel, stride, padding, count_include_pad=True), node)

    def _op_GlobalAveragePool(self, node, attrs) -> np.ndarray:
        self._pooled(node)
        return self._pool(nn.AdaptiveAvgPool2d(1), node)

    def _pooled(self, node) -> Shape:
        """The ``(C, H, W)`` of a pooling's input, which must be a ``(1, C, H, W)`` value in its own layout."""
        chain = self.chain
        chain.flush()
        shape = chain.view.shape
        if len(shape) != 4 or shape[0] != 1 or chain.base_shape != shape[1:] or not chain.in_order:
            raise UnsupportedGraphError(
                f"node {node.name!r} ({node.op_type}): pooling needs a (1, C, H, W) value in the layout of the "
                f"convolution or input it comes from, got shape {shape} on a base of shape {chain.base_shape}"
            )
        return shape[1:]

    def _window(self, node, attrs: dict) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Kernel, strides and symmetric pads of a 2-D MaxPool or AveragePool (see :class:`_ConvGeometry`)."""
        chw = self._pooled(node)
        kernel = tuple(attrs.get("kernel_shape", ()))
        if len(kernel) != 2:
            raise UnsupportedOperatorError(f"node {node.name!r} ({node.op_type}): only 2-D pooling is supported")
        geo = _ConvGeometry.of(node, attrs, chw[1:], kernel)
        padding = geo.symmetric
        if padding is None or any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
            raise UnsupportedOperatorError(
                f"node {node.name!r} ({node.op_type}) has {geo.reason()}; only dilation 1 and symmetric pads of "
                "at most half the kernel are supported"
            )
        if attrs.get("ceil_mode", 0) and geo.out_hw != geo.ceil_hw:
            raise UnsupportedOperatorError(
                f"node {node.name!r} ({node.op_type}) has ceil_mode=1, which adds a partial window; only "
                "ceil_mode=0 is supported"
            )
        return kernel, geo.stride, padding

    def _pool(self, module: nn.Module, node) -> np.ndarray:
        """Emit the chain and ``module`` after it; the chain continues from the pooled ``(C, H', W')``."""
        source = self._emit(self.chain)
        out = tuple(module(torch.zeros(1, *self.chain.base_shape, dtype=torch.float64)).shape[1:])
        self.chain.restart(self._call(module, source), out, after_relu=False)
        return np.arange(int(np.prod(out)), dtype=np.int64).reshape(1, *out)


@dataclass(frozen=True)
class _ConvGeometry:
    """Strides, dilations and (top, left, bottom, right) pads of a 2-D ONNX Conv, MaxPool or AveragePool."""

    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]
    in_hw: tuple[int, int]
    kernel: tuple[int, int]

    @classmethod
    def of(cls, node, attrs: dict, in_hw: Shape, kernel: Shape) -> _ConvGeometry:
        stride = tuple(attrs.get("strides", (1, 1)))
        dilation = tuple(attrs.get("dilations", (1, 1)))
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("NOTSET", ""):
            pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
        elif auto == "VALID":
            pads = (0, 0, 0, 0)
        elif auto in ("SAME_UPPER", "SAME_LOWER"):
            total = [max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
                     for n, s, k, d in zip(in_hw, stride, kernel, dilation, strict=True)]
            small = [p // 2 for p in total]
            big = [p - q for p, q in zip(total, small, strict=True)]
            pads = (*small, *big) if auto == "SAME_UPPER" else (*big, *small)
        else:
            raise UnsupportedOperatorError(f"node {node.name!r} ({node.op_type}) has auto_pad={auto!r}")
        if len(stride) != 2 or len(dilation) != 2 or len(pads) != 4:
            raise UnsupportedOperatorError(f"node {node.name!r} ({node.op_type}): malformed strides, dilations or pads")
        geo = cls(stride, dilation, pads, tuple(in_hw), tuple(kernel))
        if min(geo.out_hw) < 1:
            raise UnsupportedOperatorError(
                f"node {node.name!r} ({node.op_type}): kernel {kernel} does not fit input {in_hw}"
            )
        return geo

    def _out(self, n: int, before: int, after: int, k: int, s: int, d: int, ceil: bool = False) -> int:
        span = n + before + after - d * (k - 1) - 1
        return (span + (s - 1 if ceil else 0)) // s + 1

    def _sizes(self, ceil: bool) -> tuple[int, int]:
        return tuple(self._out(n, self.pads[i], self.pads[i + 2], k, s, d, ceil) for i, (n, k, s, d)
                     in enumerate(zip(self.in_hw, self.kernel, self.stride, self.dilation, strict=True)))

    @property
    def out_hw(self) -> tuple[int, int]:
        return self._sizes(ceil=False)

    @property
    def ceil_hw(self) -> tuple[int, int]:
        """The output size with ``ceil_mode=1`` (pooling): one more window where the last is partial."""
        return self._sizes(ceil=True)

    @property
    def symmetric(self) -> tuple[int, int] | None:
        """Symmetric pads giving exactly the same windows (the leading pad on both sides), if any.

        The windows start at ``-pad_before`` with the same stride; with the same count every window
        lies inside both padded inputs, whose entries outside the image are zeros either way.
        """
        if self.dilation != (1, 1):
            return None
        out = self.out_hw
        for i, (n, k, s) in enumerate(zip(self.in_hw, self.kernel, self.stride, strict=True)):
            p = self.pads[i]
            if self._out(n, p, p, k, s, 1) != out[i]:
                return None
        return self.pads[0], self.pads[1]

    def reason(self) -> str:
        return f"pads={list(self.pads)} dilations={list(self.dilation)}"

    def dense(self, w: np.ndarray, chw: Shape) -> np.ndarray:
        """The convolution's exact matrix ``(out_numel, in_numel)`` on the C-order flattened input."""
        n = int(np.prod(chw))
        top, left, bottom, right = self.pads
        padded = F.pad(torch.eye(n, dtype=torch.float64).reshape(n, *chw), (left, right, top, bottom))
        kernel = torch.from_numpy(w)
        blocks = [F.conv2d(chunk, kernel, None, self.stride, 0, self.dilation).reshape(chunk.shape[0], -1)
                  for chunk in padded.split(1024)]
        return torch.cat(blocks).T.numpy()


# ---------------------------------------------------------------------------------------------
# Attributes and constant folding
# ---------------------------------------------------------------------------------------------
def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant_value(node, attrs: dict) -> np.ndarray:
    from onnx import numpy_helper

    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    raise UnsupportedOperatorError(f"node {node.name!r} (Constant) has no supported value attribute")


def _flatten(a: np.ndarray, axis: int) -> np.ndarray:
    axis = axis + a.ndim if axis < 0 else axis
    return a.reshape(int(np.prod(a.shape[:axis])), int(np.prod(a.shape[axis:])))


def _squeeze(a: np.ndarray, axes: list[int] | None) -> np.ndarray:
    if axes is None:
        return a.reshape([s for s in a.shape if s != 1])
    return np.squeeze(a, axis=tuple(int(x) % a.ndim for x in axes))


def _unsqueeze(a: np.ndarray, axes: list[int] | None) -> np.ndarray:
    rank = a.ndim + len(axes or [])
    for axis in sorted(int(x) % rank for x in axes or []):
        a = np.expand_dims(a, axis)
    return a


def _fold_op(node, attrs: dict, args: list) -> np.ndarray:
    """Evaluate one operator on constants (the shape arithmetic of exported graphs)."""
    op, x = node.op_type, args[0]
    if op in ("Identity", "Cast"):
        if op == "Cast":
            from onnx import helper

            return x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
        return x
    if op == "Gather":
        return np.take(x, args[1].astype(np.int64), axis=attrs.get("axis", 0))
    if op == "Concat":
        return np.concatenate([np.atleast_1d(a) for a in args], axis=attrs.get("axis", 0))
    if op in ("Unsqueeze", "Squeeze"):
        axes = [int(v) for v in np.atleast_1d(args[1])] if len(args) > 1 and args[1] is not None \
            else attrs.get("axes")
        return _unsqueeze(x, axes) if op == "Unsqueeze" else _squeeze(x, axes)
    if op == "Reshape":
        target = [x.shape[i] if v == 0 and not attrs.get("allowzero", 0) else int(v) for i, v in enumerate(args[1])]
        return x.reshape(target)
    if op == "Flatten":
        return _flatten(x, attrs.get("axis", 1))
    if op == "Transpose":
        return x.transpose(attrs.get("perm", list(reversed(range(x.ndim)))))
    if op == "Slice":
        return _fold_slice(x, attrs, args)
    if op == "Neg":
        return -x
    y = args[1]
    if op == "Div" and np.issubdtype(x.dtype, np.integer):
        return np.trunc(x / y).astype(x.dtype)
    return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](x, y)


def _fold_slice(x: np.ndarray, attrs: dict, args: list) -> np.ndarray:
    if len(args) > 1:
        starts, ends = args[1], args[2]
        axes = args[3] if len(args) > 3 and args[3] is not None else range(len(starts))
        steps = args[4] if len(args) > 4 and args[4] is not None else [1] * len(starts)
    else:
        starts, ends = attrs["starts"], attrs["ends"]
        axes, steps = attrs.get("axes", range(len(starts))), [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index[int(axis) % x.ndim] = slice(int(start), int(end), int(step))
    return x[tuple(index)]
