"""ReLU graphs (issue 21): tracing, compilation and the compiled layers' operators.

Random graphs come from :mod:`graph_programs` (residual additions, subtractions, scalings,
concatenations, pooling, BatchNorm, in several torch spellings).  Properties, float64:

* the compiled network computes the module (``1e-12``);
* the max-pooling rewrite ``max(a, b) = a + ReLU(b - a)`` over gathered window taps equals
  ``F.max_pool2d`` (negative inputs, padding), the average pooling equals ``F.avg_pool2d``;
* every compiled layer's sparse matrix (``layer_matrix``) is its dense Jacobian and bias;
  ``transpose`` is the adjoint of the bias-free map (``<W x, y> = <x, W^T y>``); interval and
  ``|W|`` maps bound the layer on sampled points;
* a graph that is a plain chain compiles to the same layers as the ``nn.Sequential``, with
  bit-identical bounds;
* unsupported graphs raise one named error with a clear message before any work starts.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from graph_programs import DTYPE, chain_program, jacobian_of, programs
from hypothesis import given
from hypothesis import strategies as st
from strategies import fast, seeds
from torch import nn

import polytope as pt
from polytope.model.graph import Graph, GraphOp
from polytope.model.network import FlattenOp
from polytope.solvers.sparse_ops import layer_matrix

TOL = 1e-12


def _inputs(shape: tuple[int, ...], n: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=gen, dtype=DTYPE) * scale


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _layer_inputs(net: pt.Network, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every compiled layer at the points ``x`` (``z_i`` of eq. 1)."""
    zhat = net.pre_activations(x)
    return [x] + [net.activation(i, z) for i, z in enumerate(zhat[:-1])]


# -- forward ----------------------------------------------------------------------------------------


@fast(40)
@given(programs(), seeds)
def test_compiled_graph_computes_the_module(prog, seed):
    module, shape = prog
    net = pt.Network.from_torch(module, shape)
    x = _inputs(shape, 3, seed)
    _close(net.forward(x), module(x))
    assert net.shapes(shape)[-1] == tuple(module(x).shape[1:])


def _pool_graph(shape: tuple[int, int, int], kind: str, kernel: int, stride: int, padding: int) -> pt.Network:
    g = Graph(shape)
    pool = g.max_pool if kind == "max" else g.avg_pool
    out = g.op(pool(g.input, (kernel, kernel), (stride, stride), (padding, padding)), FlattenOp())
    return pt.Network.from_graph(g, out, nn.Linear(1, 1).to(DTYPE))


@st.composite
def pool_cases(draw):
    kernel = draw(st.integers(2, 3))
    padding = draw(st.integers(0, min(1, kernel // 2)))
    shape = (draw(st.integers(1, 2)), draw(st.integers(kernel, 6)), draw(st.integers(kernel, 6)))
    return shape, kernel, draw(st.integers(1, 2)), padding, draw(seeds)


@fast(40)
@given(pool_cases(), st.sampled_from(["mixed", "negative"]))
def test_max_pool_rewrite_is_max_pool2d(case, sign):
    shape, kernel, stride, padding, seed = case
    x = _inputs(shape, 4, seed)
    if sign == "negative":  # padding must never win a window (torch pads max pooling with -inf)
        x = -x.abs() - 0.5
    net = _pool_graph(shape, "max", kernel, stride, padding)
    _close(net.forward(x), F.max_pool2d(x, kernel, stride, padding).flatten(1))


@fast(40)
@given(pool_cases())
def test_avg_pool_rewrite_is_avg_pool2d(case):
    shape, kernel, stride, padding, seed = case
    x = _inputs(shape, 4, seed)
    net = _pool_graph(shape, "avg", kernel, stride, padding)
    _close(net.forward(x), F.avg_pool2d(x, kernel, stride, padding).flatten(1))


@pytest.mark.parametrize("spelling", ["module", "functional"])
def test_adaptive_avg_pool_to_one_is_the_mean(spelling):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            h = self.pool(h) if spelling == "module" else F.adaptive_avg_pool2d(h, 1)
            return self.fc(h.flatten(1))

    module = Net().to(DTYPE).eval()
    net = pt.Network.from_torch(module, (2, 5, 4))
    x = _inputs((2, 5, 4), 3, 0)
    with torch.no_grad():
        _close(net.forward(x), module(x))


def test_sequential_with_pooling_is_traced():
    seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.AvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2)).to(DTYPE)
    net = pt.Network.from_torch(seq, (1, 6, 4))
    x = _inputs((1, 6, 4), 3, 1)
    with torch.no_grad():
        _close(net.forward(x), seq(x))


def test_shape_spellings_of_the_batch_size():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.fc(h.reshape(x.shape[0], -1)) + self.fc(h.view(h.size(0), -1))

    module = Net().to(DTYPE)
    x = _inputs((1, 4, 5), 2, 2)
    with torch.no_grad():
        _close(pt.Network.from_torch(module, (1, 4, 5)).forward(x), module(x))


class _Inplace(nn.Module):
    """A module whose forward ``fn(self, x)`` mutates tensors in place (Linear ``fc``: 3 -> 3, head ``out``)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.fc, self.fc2, self.out = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.out(self.fn(self, x))


def _augmented(self, x):
    h = self.fc(x)
    g = h
    h += x  # g sees it too
    return torch.relu(g) + h


def _scaled(self, x):
    h = self.fc(x)
    r = torch.relu(h)
    h -= x
    h *= 2.0
    h /= 4
    return h + r


def _block(self, x):  # a residual block written the torchvision way
    out = self.relu(self.fc(x))
    out = self.fc2(out)
    out += x
    return self.relu(out)


INPLACE = {
    "module-relu": lambda self, x: self.relu(self.fc(x)) + self.fc(x),
    "module-relu-read-later": lambda self, x: (lambda h: self.relu(h) + h)(self.fc(x)),
    "functional-relu": lambda self, x: (lambda h: F.relu(h, inplace=True) - 2 * h)(self.fc(x)),
    "relu_": lambda self, x: (lambda h: torch.relu_(h) + h.relu())(self.fc(x)),
    "method-relu_": lambda self, x: (lambda h: [h.relu_(), h.add_(x), h.mul_(3)] and h)(self.fc(x)),
    "augmented": _augmented,
    "scaled": _scaled,
    "block": _block,
    "input": lambda self, x: [x.relu_()] and self.fc(x) + x,
}


@pytest.mark.parametrize("name", sorted(INPLACE))
def test_in_place_operations_compile_to_what_eager_mode_computes(name):
    module = _Inplace(INPLACE[name]).to(DTYPE).requires_grad_(False)
    net = pt.Network.from_torch(module)
    x = _inputs((3,), 5, 7)
    _close(net.forward(x.clone()), module(x.clone()))


def test_in_place_operation_on_a_viewed_tensor_is_refused():
    def fn(self, x):
        h = self.fc(x)
        v = h.view(h.size(0), -1)
        h.relu_()
        return v + h

    with pytest.raises(pt.UnsupportedLayerError, match="shares its memory"):
        pt.Network.from_torch(_Inplace(fn).to(DTYPE))


# -- the compiled layers' operators ------------------------------------------------------------------


@fast(25)
@given(programs(), seeds)
def test_layer_matrix_is_the_dense_jacobian(prog, seed):
    module, shape = prog
    net = pt.Network.from_torch(module, shape)
    shapes = net.shapes(shape)
    for layer, s in zip(net.layers, shapes[:-1], strict=True):
        sparse = layer_matrix(layer, s)
        w, b = jacobian_of(layer.forward, s)
        _close(torch.from_numpy(sparse.matrix.toarray()), w)
        _close(torch.from_numpy(sparse.bias), b)
        _close(layer.bias(s, b).flatten(), b)


@fast(25)
@given(programs(), seeds)
def test_transpose_is_the_adjoint(prog, seed):
    module, shape = prog
    net = pt.Network.from_torch(module, shape)
    shapes = net.shapes(shape)
    for k, (layer, s_in, s_out) in enumerate(zip(net.layers, shapes[:-1], shapes[1:], strict=True)):
        x = _inputs(s_in, 2, seed + k)
        y = _inputs(s_out, 2, seed + k + 1)
        lhs = (layer.linear(x) * y).flatten(1).sum(1)
        wt_y = layer.transpose(y, s_in)
        rhs = (x * wt_y).flatten(1).sum(1)
        assert wt_y.shape == x.shape
        _close(lhs, rhs, 1e-10 * (1 + float(lhs.abs().max())))
        for op in layer.ops:
            if isinstance(op, GraphOp):  # the graph operator alone, from its own input state
                u = _inputs(op.state_shape(op.inputs), 2, seed)
                v = _inputs(op.out_shape(op.state_shape(op.inputs)), 2, seed + 3)
                a = (op.apply(u, bias=False) * v).flatten(1).sum(1)
                b = (u * op.transpose(v, op.state_shape(op.inputs))).flatten(1).sum(1)
                _close(a, b, 1e-10 * (1 + float(a.abs().max())))


@fast(25)
@given(programs(), seeds)
def test_interval_and_abs_maps_bound_every_layer(prog, seed):
    module, shape = prog
    net = pt.Network.from_torch(module, shape)
    shapes = net.shapes(shape)
    for k, (layer, s) in enumerate(zip(net.layers, shapes[:-1], strict=True)):
        centre = _inputs(s, 1, seed + k)
        radius = _inputs(s, 1, seed + k + 1, 0.5).abs()
        lo, hi = centre - radius, centre + radius
        points = lo + (hi - lo) * torch.rand((200, *s), generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
        points[:2] = torch.cat([lo, hi])
        out = layer.forward(points)
        low, high = layer.interval(lo, hi)
        spread = layer.abs_linear(radius)
        w, _ = jacobian_of(layer.linear, s)
        slack = 1e-10 * (1 + float(out.abs().max()))
        assert (out >= low - slack).all() and (out <= high + slack).all()
        exact = (w.abs() @ radius.flatten()).reshape(spread.shape)  # |W| r, the tightest radius
        assert (spread >= exact - slack).all()
        assert (out - layer.forward(centre)).abs().le(spread + slack).all()


def test_relu_mask_marks_the_carried_units():
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            return self.out(h + torch.relu(self.fc2(h)))

    net = pt.Network.from_torch(Res().to(DTYPE))
    assert net.is_graph and net.linear[0] is None
    assert net.linear[1].tolist() == [False] * 4 + [True] * 4  # the ReLUs of fc2, then the copy of h
    z = torch.tensor([[-1.0, 2.0, -3.0, 4.0, -5.0, 6.0, -7.0, 8.0]], dtype=DTYPE)
    assert net.activation(1, z).tolist() == [[0.0, 2.0, 0.0, 4.0, -5.0, 6.0, -7.0, 8.0]]


# -- a chain written as a graph ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fc", "conv"])
@pytest.mark.parametrize("slopes", ["fixed", "adaptive"])
def test_chain_as_graph_gives_the_sequentials_layers_and_bounds(kind, slopes):
    program_net, seq, shape = chain_program(kind, seed=3)
    as_graph = pt.Network.from_torch(program_net, shape)
    as_chain = pt.Network.from_torch(seq)
    assert not as_graph.is_graph
    assert [[type(op) for op in layer.ops] for layer in as_graph.layers] == \
        [[type(op) for op in layer.ops] for layer in as_chain.layers]
    assert [[getattr(op, "module", None) for op in layer.ops] for layer in as_graph.layers] == \
        [[getattr(op, "module", None) for op in layer.ops] for layer in as_chain.layers]
    x = _inputs(shape, 2, 5, 1.0)
    input_set = pt.LinfBall(0.1)
    c = torch.eye(3, dtype=DTYPE) - torch.ones(3, 3, dtype=DTYPE) / 3
    a = pt.DualNetwork(as_graph, x, input_set, slopes=slopes)
    b = pt.DualNetwork(as_chain, x, input_set, slopes=slopes)
    for (la, ua), (lb, ub) in zip(a.bounds, b.bounds, strict=True):
        assert torch.equal(la, lb) and torch.equal(ua, ub)
    assert torch.equal(a.objective(c), b.objective(c))


# -- errors ---------------------------------------------------------------------------------------


class _Fn(nn.Module):
    """A module whose forward is ``fn(self, x)`` (with a Linear ``fc``, a Conv2d ``conv`` and ``extra``)."""

    def __init__(self, fn, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.fc = nn.Linear(4, 4)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.extra = extra if extra is not None else nn.Identity()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.fn(self, x)


def _branch(self, x):
    if x.sum() > 0:  # control flow on a tensor value
        return self.fc(x)
    return -self.fc(x)


FC_ERRORS = [
    (lambda self, x: torch.sigmoid(self.fc(x)), pt.UnsupportedLayerError, r"node sigmoid \(sigmoid\)"),
    (lambda self, x: self.extra(self.fc(x)), pt.UnsupportedLayerError, r"layer extra \(Tanh\) is not supported",
     nn.Tanh()),
    (lambda self, x: self.fc(x) + 1.0, pt.UnsupportedLayerError, "adding a constant"),
    (lambda self, x: self.fc(x) * self.scale, pt.UnsupportedLayerError, "constants and parameters"),
    (lambda self, x: self.fc(x) * self.fc(x), pt.UnsupportedLayerError, "multiplication or division by a number"),
    (lambda self, x: self.fc(x) / 0, pt.UnsupportedLayerError, "division by 0 is not finite"),
    (lambda self, x: self.fc(x) * math.inf, pt.UnsupportedLayerError, "multiplication by inf is not finite"),
    (_branch, pt.UnsupportedLayerError, "control flow"),
    (lambda self, x: torch.cat([self.fc(x), x], 0), pt.UnsupportedLayerError, "batch dimension"),
    (lambda self, x: self.fc(x).view(2, -1), pt.UnsupportedLayerError, r"view/reshape to \(batch, -1\)"),
    (lambda self, x: (self.fc(x), x), pt.UnsupportedLayerError, "one tensor"),
    (lambda self, x: self.scale + 0 * self.fc(x).sum(), pt.UnsupportedLayerError, "not supported"),
    (lambda self, x: self.extra(torch.relu(self.fc(x))), pt.ModelModeError, r"layer extra \(Dropout\).*eval",
     nn.Dropout(0.5).train()),
    (lambda self, x: self.extra(self.fc(x)), pt.ModelModeError, r"layer extra \(BatchNorm1d\).*eval",
     nn.BatchNorm1d(4).train()),
    (lambda self, x: F.dropout(self.fc(x), 0.5), pt.ModelModeError, "training=False"),
]


@pytest.mark.parametrize("case", FC_ERRORS, ids=["sigmoid", "tanh", "constant", "parameter", "product", "by-zero",
                                                  "by-inf", "branch", "batch-cat", "view", "tuple", "no-input",
                                                  "dropout", "batchnorm", "f-dropout"])
def test_unsupported_fc_graphs_raise_named_errors(case):
    fn, error, message, *extra = case
    module = _Fn(fn, *extra).to(DTYPE)
    with pytest.raises(error, match=message) as info:
        pt.Network.from_torch(module, (4,))
    assert "\n" not in str(info.value)


CONV_ERRORS = [
    (lambda self, x: self.extra(torch.relu(self.conv(x))).flatten(1), r"layer extra \(MaxPool2d\).*dilation 1",
     nn.MaxPool2d(2, dilation=2)),
    (lambda self, x: self.extra(torch.relu(self.conv(x))).flatten(1), r"layer extra \(MaxPool2d\).*ceil_mode",
     nn.MaxPool2d(2, ceil_mode=True)),
    (lambda self, x: F.max_pool2d(self.conv(x), 2, dilation=2).flatten(1), r"node max_pool2d.*dilation 1", None),
    (lambda self, x: self.extra(self.conv(x)).flatten(1), r"layer extra \(AvgPool2d\).*ceil_mode",
     nn.AvgPool2d(2, ceil_mode=True)),
    (lambda self, x: F.avg_pool2d(self.conv(x), 2, divisor_override=3).flatten(1), "divisor_override", None),
    (lambda self, x: F.adaptive_avg_pool2d(self.conv(x), 4).flatten(1), "must divide", None),
    (lambda self, x: self.extra(self.conv(x)).flatten(1), r"layer extra \(Conv2d\) uses groups=2",
     nn.Conv2d(2, 2, 1, groups=2)),
    (lambda self, x: torch.flatten(self.conv(x), 2).flatten(1), "all but the batch dimension", None),
    (lambda self, x: torch.cat([self.conv(x), self.conv(x)], -4).flatten(1), "batch dimension", None),
]


@pytest.mark.parametrize("case", CONV_ERRORS, ids=["maxpool-dilation", "maxpool-ceil", "f-maxpool-dilation",
                                                    "avgpool-ceil", "divisor", "adaptive", "groups", "flatten",
                                                    "batch-cat"])
def test_unsupported_conv_graphs_raise_named_errors(case):
    fn, message, extra = case
    module = _Fn(fn, extra).to(DTYPE)
    with pytest.raises(pt.UnsupportedLayerError, match=message) as info:
        pt.Network.from_torch(module, (1, 6, 6))
    assert "\n" not in str(info.value)


def test_conv_graph_without_input_shape_asks_for_it():
    module = _Fn(lambda self, x: torch.relu(self.conv(x)).flatten(1)).to(DTYPE)
    with pytest.raises(pt.ShapeMismatchError, match="pass input_shape"):
        pt.Network.from_torch(module)


def test_unsupported_layer_is_named_before_the_input_shape_is_asked_for():
    seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(pt.UnsupportedLayerError, match=r"layer 1 \(Tanh\)"):
        pt.Network.from_torch(seq)


def test_graph_without_affine_layer_is_refused():
    module = _Fn(lambda self, x: F.max_pool2d(x, 2).flatten(1)).to(DTYPE)
    with pytest.raises(pt.UnsupportedLayerError, match="no Linear or Conv2d layer"):
        pt.Network.from_torch(module, (1, 4, 4))


def test_graph_input_of_another_shape_is_refused():
    module = _Fn(lambda self, x: self.fc(torch.relu(self.fc(x)) + x)).to(DTYPE)
    net = pt.Network.from_torch(module)
    with pytest.raises(pt.ShapeMismatchError):
        pt.DualNetwork(net, torch.zeros(1, 5, dtype=DTYPE), pt.LinfBall(0.1))


def test_builder_refuses_mismatched_operands():
    g = Graph((2, 4, 4))
    a = g.op(g.input, FlattenOp())
    with pytest.raises(pt.ShapeMismatchError, match="one shape"):
        g.sum((a, g.input))
    with pytest.raises(pt.ShapeMismatchError, match="concatenate"):
        g.cat((a, g.input), 0)
    with pytest.raises(pt.ShapeMismatchError, match=r"\(C, H, W\)"):
        g.max_pool(a, (2, 2), (2, 2), (0, 0))
    with pytest.raises(pt.ShapeMismatchError, match="vector"):
        g.compile(g.input)
    assert math.prod(g.shape(a)) == 32
