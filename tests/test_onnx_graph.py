"""ONNX graphs (issue 21): residual blocks, branches, concatenations and pooling import exactly.

Every imported network is checked against onnxruntime on the same file: float32 weights within
1e-5 relative, float64 weights within 1e-6 relative of onnxruntime's float32 run (both to the
output's scale); graph shapes and operators polytope cannot import raise one named error.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

import polytope as pt
from polytope.io.onnx_import import SUPPORTED_OPS, load_onnx, read_onnx
from polytope.model.errors import UnsupportedGraphError, UnsupportedOperatorError
from polytope.model.graph import GraphOp
from polytope.model.network import Conv2dOp, as_float64

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RTOL32, RTOL64 = 1e-5, 1e-6  # float32 / float64 import against onnxruntime's float32 run


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check(path: Path, n: int = 4, seed: int = 0) -> pt.Network:
    """float32 and float64 imports equal onnxruntime on random inputs; returns the float32 network."""
    sess = _session(path)
    nets = {dtype: read_onnx(path, dtype) for dtype in (torch.float32, torch.float64)}
    imported = nets[torch.float32]
    rng = np.random.default_rng(seed)
    for _ in range(n):
        x = rng.standard_normal(imported.input_shape).astype(np.float32)
        ref = sess.run(None, {imported.input_name: x})[0].reshape(-1).astype(np.float64)
        scale = max(1.0, float(np.abs(ref).max()))
        for dtype, rtol in ((torch.float32, RTOL32), (torch.float64, RTOL64)):
            onx = nets[dtype]
            xt = torch.from_numpy(x.astype(np.float64)).to(dtype).reshape(1, *onx.in_shape)
            out = onx.network.forward(xt).detach().double().numpy().reshape(-1)
            np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * scale, err_msg=str(dtype))
            module_out = onx.network.module(xt).detach().double().numpy().reshape(-1)  # the float64 forward check
            np.testing.assert_allclose(module_out, ref, rtol=rtol, atol=rtol * scale, err_msg=str(dtype))
    assert imported.n_outputs == ref.size
    return imported.network


def _export(model: nn.Module, shape: tuple[int, ...], path: Path, opset: int = 17, fold: bool = True) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.randn(shape), str(path), dynamo=False, opset_version=opset,
                          do_constant_folding=fold, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}})
    return path


def _graph(nodes, in_shape, inits=(), out_shape=None):
    """A model from nodes: input ``x`` of ``in_shape``, output ``y``, float32 initialisers ``(name, array)``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    arrays = [numpy_helper.from_array(np.asarray(v) if np.asarray(v).dtype.kind == "i" else
                                      np.asarray(v, dtype=np.float32), name=k) for k, v in inits]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=arrays),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _save(model, tmp_path: Path, name: str = "net.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed + 7 * sum(shape)).standard_normal(shape).astype(np.float32)


def _primitive_ops(net: pt.Network) -> list:
    """The primitive operators of every layer, those inside compiled graph layers included."""
    ops = []
    for layer in net.layers:
        for op in layer.ops:
            ops += [op.nodes[n].op for n in op.steps if op.nodes[n].kind == "op"] if isinstance(op, GraphOp) else [op]
    return ops


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model


# ---------------------------------------------------------------------------------------------
# torch models exported by torch.onnx (the acceptance networks of issue 21)
# ---------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """conv-bn-relu-conv-bn plus an identity skip (or a 1x1 projection with stride 2), relu, linear head."""

    def __init__(self, projection: bool) -> None:
        super().__init__()
        c_out, stride = (6, 2) if projection else (3, 1)
        self.c1, self.b1 = nn.Conv2d(3, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out)
        self.c2, self.b2 = nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out)
        self.skip = nn.Sequential(nn.Conv2d(3, c_out, 1, stride=2), nn.BatchNorm2d(c_out)) if projection else None
        side = 4 if projection else 8
        self.head = nn.Linear(c_out * side * side, 4)

    def forward(self, x):
        h = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        skip = x if self.skip is None else self.skip(x)
        return self.head(torch.flatten(torch.relu(h + skip), 1))


class PoolNet(nn.Module):
    """conv-relu-maxpool-conv-relu-avgpool (or global average pool)-flatten-gemm."""

    def __init__(self, global_pool: bool) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.mp = nn.MaxPool2d(3, stride=2, padding=1)
        self.ap = nn.AdaptiveAvgPool2d(1) if global_pool else nn.AvgPool2d(2)
        self.head = nn.Linear(5 if global_pool else 5 * 2 * 2, 3)

    def forward(self, x):
        h = self.ap(torch.relu(self.c2(self.mp(torch.relu(self.c1(x))))))
        return self.head(torch.flatten(h, 1))


class ConcatNet(nn.Module):
    """Two convolution branches of one input concatenated along the channels, then a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 2, 1)
        self.c = nn.Conv2d(5, 3, 3, stride=2)
        self.head = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.head(torch.flatten(torch.relu(self.c(h)), 1))


MODELS = {
    "resnet_identity": (lambda: ResBlock(False), (1, 3, 8, 8)),
    "resnet_projection": (lambda: ResBlock(True), (1, 3, 8, 8)),
    "maxpool_avgpool": (lambda: PoolNet(False), (1, 2, 8, 8)),
    "maxpool_globalpool": (lambda: PoolNet(True), (1, 2, 8, 8)),
    "concat": (lambda: ConcatNet(), (1, 2, 8, 8)),
}
#: The convolutions of each model.
CONVS = {"resnet_identity": 2, "resnet_projection": 3, "maxpool_avgpool": 2, "maxpool_globalpool": 2, "concat": 3}


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(sorted(MODELS).index(name))
    make, shape = MODELS[name]
    return _randomise_batchnorm(make()).eval(), shape


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_exports_match_onnxruntime(tmp_path, name, opset):
    model, shape = _model(name)
    for fold in (True, False):  # with constant folding the exporter fuses batch norms into the convolutions
        path = _export(model, shape, tmp_path / f"{name}_{fold}.onnx", opset, fold)
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert fold or "BatchNormalization" in ops or "resnet" not in name
        net = _check(path)
        assert isinstance(net.module, fx.GraphModule)  # not a chain: pooling or joins
        assert net.is_graph == (name != "concat")  # skips and max pooling carry linear units, concatenation not
        assert sum(isinstance(op, Conv2dOp) for op in _primitive_ops(net)) == CONVS[name]  # all stay convolutions


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dual_bounds_equal_the_torch_models(tmp_path, name):
    """The imported graph is the same network for the engine: Theorem 1's bound agrees with the torch model's."""
    model, shape = _model(name)
    imported = load_onnx(_export(model, shape, tmp_path / "net.onnx"), torch.float64)
    x = torch.rand(2, *shape[1:], dtype=torch.float64)
    c = torch.randn(2, 3, imported.shapes(shape[1:])[-1][0], dtype=torch.float64)
    ours = pt.DualNetwork(imported, x, pt.LinfBall(0.02)).objective(c)
    ref = pt.DualNetwork(pt.Network.from_torch(model.double(), input_shape=shape[1:]), x,
                         pt.LinfBall(0.02)).objective(c)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6 * float(ref.detach().abs().max()))


def test_float32_graph_converts_to_float64(tmp_path):
    """``as_float64`` re-traces the imported graph module: the float64 copy computes the same function."""
    model, shape = _model("resnet_projection")
    net = load_onnx(_export(model, shape, tmp_path / "net.onnx"))
    net64 = as_float64(net)
    assert net64.parameters_like().dtype == torch.float64 and net64.is_graph
    x = torch.rand(3, *shape[1:], dtype=torch.float64)
    torch.testing.assert_close(net64.forward(x), net.forward(x.float()).double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# hand-built graphs
# ---------------------------------------------------------------------------------------------
def test_sub_sum_and_a_value_added_to_itself(tmp_path):
    """Sub of two branches, a three-way Sum with a constant, ``h + h``, and a ReLU on the forked input."""
    nodes = [helper.make_node("Relu", ["x"], ["r0"], name="relu_in"),
             helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["r0", "W2"], ["b"], name="mm2"),
             helper.make_node("Sub", ["a", "b"], ["d"], name="sub"),
             helper.make_node("Relu", ["d"], ["r1"], name="relu1"),
             helper.make_node("Add", ["r1", "r1"], ["twice"], name="double"),
             helper.make_node("Sum", ["twice", "bias", "a", "d"], ["s"], name="sum"),
             helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
             helper.make_node("Gemm", ["r2", "W3", "c3"], ["y"], name="gemm", transB=1)]
    inits = [("W1", _rand(5, 6)), ("W2", _rand(5, 6, seed=1)), ("bias", _rand(6)), ("W3", _rand(3, 6)),
             ("c3", _rand(3))]
    net = _check(_save(_graph(nodes, [1, 5], inits), tmp_path))
    assert net.is_graph


def test_normalised_input_read_by_a_dense_convolution_and_a_skip(tmp_path):
    """The pending normalisation is kept once at the fork; a convolution with reached asymmetric pads is a
    dense matrix (a flat value), added to the (C, H, W) skip, which is flattened to match."""
    nodes = [helper.make_node("Sub", ["x", "mean"], ["a"], name="sub"),
             helper.make_node("Div", ["a", "std"], ["n"], name="div"),
             helper.make_node("Conv", ["n", "K", "B"], ["h"], name="conv", pads=[1, 1, 1, 0]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "K2"], ["h2"], name="conv2", pads=[0, 1, 1, 1]),
             helper.make_node("Add", ["h2", "n"], ["s"], name="skip"),
             helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W"], ["y"], name="gemm", transB=1)]
    inits = [("mean", _rand(1, 2, 1, 1)), ("std", np.abs(_rand(1, 2, 1, 1)) + 0.5), ("K", _rand(3, 2, 3, 2)),
             ("B", _rand(3)), ("K2", _rand(2, 3, 2, 3)), ("W", _rand(3, 2 * 5 * 5))]
    net = _check(_save(_graph(nodes, [1, 2, 5, 5], inits), tmp_path))
    assert net.is_graph


def test_permuted_branches_are_aligned_and_concatenated(tmp_path):
    """Add of a value and a transposed value (a permutation first), Concat along an inner axis of permuted views."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             helper.make_node("Reshape", ["a", "s23"], ["a3"], name="ra"),
             helper.make_node("MatMul", ["x", "W2"], ["b"], name="mm2"),
             helper.make_node("Reshape", ["b", "s32"], ["b3"], name="rb"),
             helper.make_node("Transpose", ["b3"], ["bt"], name="tb", perm=[0, 2, 1]),
             helper.make_node("Relu", ["bt"], ["br"], name="relu_b"),
             helper.make_node("Add", ["a3", "br"], ["s"], name="add"),
             helper.make_node("Concat", ["s", "bt", "a3"], ["c"], name="cat", axis=2),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["rt"], name="tr", perm=[0, 2, 1]),
             helper.make_node("Flatten", ["rt"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W3"], ["y"], name="gemm", transB=1)]
    inits = [("W1", _rand(4, 6)), ("W2", _rand(4, 6, seed=1)), ("s23", np.array([1, 2, 3])),
             ("s32", np.array([1, 3, 2])), ("W3", _rand(5, 18))]
    _check(_save(_graph(nodes, [1, 4], inits), tmp_path))


@pytest.mark.parametrize(("op", "attrs", "size"), [
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, 7),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1]}, 8),  # extra pad never reached
    ("MaxPool", {"kernel_shape": [2, 3], "strides": [1, 2], "ceil_mode": 1}, 7),  # ceil adds no window
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}, 7),
    ("AveragePool", {"kernel_shape": [2, 2], "auto_pad": "VALID"}, 6),
    ("GlobalAveragePool", {}, 5),
])
def test_pooling_attributes(tmp_path, op, attrs, size):
    """Pooling of a convolution's output, then a ReLU, a second pooling and a dense head."""
    nodes = [helper.make_node("Conv", ["x", "K", "B"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node(op, ["h"], ["p"], name="pool", **attrs),
             helper.make_node("Relu", ["p"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["q"], name="pool2", kernel_shape=[1, 1]),
             helper.make_node("Flatten", ["q"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="mm")]
    shape = tuple(_session_shape(op, attrs, size))
    inits = [("K", _rand(3, 2, 3, 3)), ("B", _rand(3)), ("W", _rand(int(np.prod(shape)), 2))]
    _check(_save(_graph(nodes, [1, 2, size, size], inits), tmp_path))


def _session_shape(op: str, attrs: dict, size: int) -> tuple[int, ...]:
    """The pooled shape, from onnxruntime itself."""
    nodes = [helper.make_node(op, ["x"], ["y"], **attrs)]
    model = helper.make_model(helper.make_graph(nodes, "p", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, size, size])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.zeros((1, 3, size, size), np.float32)})[0].shape


def test_output_read_by_another_node_and_a_dead_branch(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
             helper.make_node("Relu", ["y"], ["unused"], name="dead_relu")]
    net = _check(_save(_graph(nodes, [1, 4], [("W", _rand(4, 5)), ("W2", _rand(5, 3))]), tmp_path))
    assert net.n_relu == 1


# ---------------------------------------------------------------------------------------------
# named errors
# ---------------------------------------------------------------------------------------------
def _two_branches(join, inits=(), b_width: int = 6):
    """``x`` through two MatMuls into ``join`` (a node reading ``a``, of width 6, and ``b``)."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["x", "W2"], ["b"], name="mm2"), join]
    return _graph(nodes, [1, 4], [("W1", _rand(4, 6)), ("W2", _rand(4, b_width, seed=1)), *inits])


@pytest.mark.parametrize(("model", "error", "needle"), [
    (_two_branches(helper.make_node("Mul", ["a", "b"], ["y"], name="product")), UnsupportedOperatorError,
     r"'product' \(Mul\) reads 2 computed values"),
    (_two_branches(helper.make_node("Div", ["a", "b"], ["y"], name="ratio")), UnsupportedOperatorError,
     r"'ratio' \(Div\) reads 2 computed values"),
    (_two_branches(helper.make_node("Add", ["a", "b"], ["y"], name="bcast"), b_width=1), UnsupportedOperatorError,
     r"'bcast' \(Add\) adds computed values of shapes"),
    (_two_branches(helper.make_node("Concat", ["a", "c"], ["y"], name="with_const", axis=1), [("c", _rand(1, 2))]),
     UnsupportedOperatorError, r"'with_const' \(Concat\) joins the network's value with a constant"),
    (_two_branches(helper.make_node("Concat", ["a", "b"], ["y"], name="bad_axis", axis=3)),
     UnsupportedOperatorError, r"'bad_axis' \(Concat\)"),
    (_graph([helper.make_node("MaxPool", ["x"], ["y"], name="ceil", kernel_shape=[2, 2], strides=[2, 2],
                              ceil_mode=1)], [1, 1, 5, 5]), UnsupportedOperatorError, r"'ceil' \(MaxPool\).*ceil_mode"),
    (_graph([helper.make_node("MaxPool", ["x"], ["y"], name="wide", kernel_shape=[2, 2], pads=[2, 2, 2, 2])],
            [1, 1, 5, 5]), UnsupportedOperatorError, r"'wide' \(MaxPool\) has pads"),
    (_graph([helper.make_node("MaxPool", ["x"], ["y"], name="dil", kernel_shape=[2, 2], dilations=[2, 2])],
            [1, 1, 5, 5]), UnsupportedOperatorError, r"'dil' \(MaxPool\) has pads.*dilations=\[2, 2\]"),
    (_graph([helper.make_node("MaxPool", ["x"], ["y"], name="pool1d", kernel_shape=[2])], [1, 1, 5]),
     UnsupportedGraphError, r"'pool1d' \(MaxPool\)"),
    (_graph([helper.make_node("AveragePool", ["x"], ["y"], name="avg", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
            [1, 1, 5, 5]), UnsupportedOperatorError, r"'avg' \(AveragePool\).*count_include_pad=0"),
    (_graph([helper.make_node("Transpose", ["x"], ["t"], name="tr", perm=[0, 1, 3, 2]),
             helper.make_node("MaxPool", ["t"], ["y"], name="pool_t", kernel_shape=[2, 2])], [1, 1, 4, 5]),
     UnsupportedGraphError, r"'pool_t' \(MaxPool\): pooling needs a \(1, C, H, W\) value"),
    (_graph([helper.make_node("Shape", ["x"], ["y"], name="shape_only")], [1, 3]), UnsupportedGraphError,
     r"output 'y' is not computed from the input"),
])
def test_unsupported_graphs_are_named(tmp_path, model, error, needle):
    with pytest.raises(error, match=needle):
        load_onnx(_save(model, tmp_path))


def test_supports_lists_the_graph_operators():
    """``polytope supports --onnx-operators`` (SUPPORTED_OPS) names what the graph importer now reads."""
    assert {"MaxPool", "AveragePool", "GlobalAveragePool", "Sum", "Concat", "Add", "Sub"} <= set(SUPPORTED_OPS)
    assert "Mul" in SUPPORTED_OPS and "Max" not in SUPPORTED_OPS


# ---------------------------------------------------------------------------------------------
# polytope verify on the exported graphs
# ---------------------------------------------------------------------------------------------
def _property(path: Path, lo: np.ndarray, hi: np.ndarray, n_out: int, output: str) -> Path:
    """A VNN-LIB 1.0 property: the box ``[lo, hi]`` and the unsafe region ``output``."""
    lines = [f"(declare-const X_{i} Real)" for i in range(lo.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
        lines += [f"(assert (>= X_{i} {float(a)!r}))", f"(assert (<= X_{i} {float(b)!r}))"]
    path.write_text("\n".join([*lines, f"(assert {output})", ""]))
    return path


@pytest.mark.parametrize("name", ["resnet_projection", "maxpool_avgpool", "concat"])
def test_verify_decides_properties_on_graphs(tmp_path, name, capsys):
    """sat with a counterexample that replays in onnxruntime, and unsat on an easy property."""
    from polytope.commands.main import main

    model, shape = _model(name)
    path = _export(model, shape, tmp_path / "net.onnx")
    sess = _session(path)
    x0 = np.random.default_rng(1).uniform(0, 1, shape).astype(np.float32)
    y0 = sess.run(None, {"x": x0})[0].reshape(-1)
    lo, hi = x0.reshape(-1) - 0.01, x0.reshape(-1) + 0.01
    # sat: Y_0 at least its value at the centre minus a margin (the centre itself is in the region)
    sat = _property(tmp_path / "sat.vnnlib", lo, hi, y0.size, f"(>= Y_0 {float(y0[0]) - 0.05!r})")
    assert main(["verify", str(sat), "--network", str(path), "--timeout", "120"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sat"
    values = dict(line.strip()[1:-1].split() for line in lines[2:-1])
    x = np.array([float(values[f"X_{i}"]) for i in range(lo.size)], dtype=np.float32)
    y = sess.run(None, {"x": x.reshape(shape)})[0].reshape(-1)
    assert np.all(x >= lo.astype(np.float32)) and np.all(x <= hi.astype(np.float32))
    assert y[0] >= float(y0[0]) - 0.05
    np.testing.assert_allclose([float(values[f"Y_{j}"]) for j in range(y.size)], y, rtol=1e-5, atol=1e-5)
    # unsat: Y_0 far above anything the box reaches
    unsat = _property(tmp_path / "unsat.vnnlib", lo, hi, y0.size, f"(>= Y_0 {float(y0[0]) + 5.0!r})")
    assert main(["verify", str(unsat), "--network", str(path), "--timeout", "120"]) == 0
    assert capsys.readouterr().out.splitlines() == ["unsat"]
