"""ONNX import: imported networks equal onnxruntime, their dual bounds equal the torch model's, bad graphs are named."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import polytope as pt
from polytope.io.onnx_import import load_onnx, read_onnx
from polytope.model.errors import ModelFileError, UnsupportedGraphError, UnsupportedOperatorError
from polytope.model.network import Conv2dOp, LinearOp

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RTOL = 1e-5  # float32: outputs agree with onnxruntime to 1e-5 relative (to the output's scale)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _save(model, tmp_path: Path, name: str = "net.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _check_against_ort(path: Path, n: int = 6, seed: int = 0) -> pt.Network:
    """The imported network's outputs equal onnxruntime's on random inputs, to RTOL relative."""
    imported = read_onnx(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = imported.input_shape
    rng = np.random.default_rng(seed)
    batch_dim = len(shape) >= 2 and shape[0] == 1
    for _ in range(n):
        x = rng.standard_normal(shape).astype(np.float32)
        ref = sess.run(None, {imported.input_name: x})[0].reshape(-1)
        out = imported.network.forward(torch.from_numpy(x).reshape(1, *imported.in_shape))
        np.testing.assert_allclose(out.detach().numpy().reshape(-1), ref, rtol=RTOL,
                                   atol=RTOL * max(1.0, float(np.abs(ref).max())))
        assert out.shape == (1, imported.n_outputs)
    assert batch_dim or imported.n_inputs == int(np.prod(shape))
    return imported.network


def _export(model: nn.Module, example: torch.Tensor, tmp_path: Path, dynamic_batch: bool = True) -> Path:
    path = tmp_path / "torch.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), example, str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}} if dynamic_batch else None)
    return path


def _graph(nodes, in_shape, out_shape, inits=(), name="g", in_dims=None):
    """A model from nodes: input ``x`` (float, ``in_shape`` or ``in_dims`` with symbols), output ``y``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_dims or list(in_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f" else None),
                                     name=k) for k, v in inits]
    graph = helper.make_graph(nodes, name, [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


class _Normalise(nn.Module):
    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class _ViewFlatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)  # exports as a Shape/Gather/Unsqueeze/Concat chain into Reshape


# ---------------------------------------------------------------------------------------------
# torch.onnx.export round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_torch_fc(tmp_path, bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20, bias=bias), nn.ReLU(), nn.Linear(20, 16, bias=bias), nn.ReLU(),
                          nn.Linear(16, 5, bias=bias))
    net = _check_against_ort(_export(model, torch.randn(1, 12), tmp_path))
    assert net.n_relu == 2 and all(isinstance(layer.ops[0], LinearOp) for layer in net.layers)


@pytest.mark.parametrize("bias", [True, False])
def test_torch_conv(tmp_path, bias):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=bias), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, padding=1, bias=bias), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 5 * 5, 7, bias=bias))
    net = _check_against_ort(_export(model, torch.randn(1, 2, 10, 10), tmp_path))
    assert [type(layer.ops[0]) for layer in net.layers[:2]] == [Conv2dOp, Conv2dOp]


@pytest.mark.parametrize("padding", [0, 1])
def test_torch_normalisation_prefix_folds_into_first_layer(tmp_path, padding):
    torch.manual_seed(2)
    model = nn.Sequential(_Normalise([0.1, 0.5], [0.3, 2.0]), nn.Conv2d(2, 3, 3, padding=padding), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * (6 + 2 * padding - 2) ** 2, 4))
    net = _check_against_ort(_export(model, torch.randn(1, 2, 6, 6), tmp_path))
    assert net.n_relu == 1  # the normalisation is part of the first affine layer
    if padding == 0:
        assert len(net.layers[0].ops) == 1  # folded into the kernel and bias outright


def test_torch_fc_normalisation_folds_into_linear(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(_Normalise([0.2], [0.4]), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    net = _check_against_ort(_export(model, torch.randn(1, 1, 4, 4), tmp_path))
    assert [len(layer.ops) for layer in net.layers] == [1, 1]


def test_torch_batchnorm(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), _ViewFlatten(),
                          nn.Linear(3 * 4 * 4, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 2))
    for bn in (model[1], model[5]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    net = _check_against_ort(_export(model, torch.randn(1, 1, 6, 6), tmp_path))
    assert [len(layer.ops) for layer in net.layers] == [1, 2, 1]  # conv+bn, flatten+linear+bn, linear


def test_torch_flatten_and_reshape(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), _ViewFlatten(), nn.Linear(2 * 4 * 4, 6), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6, 3))
    _check_against_ort(_export(model, torch.randn(1, 1, 6, 6), tmp_path))


@pytest.mark.parametrize("conv", [False, True])
def test_dual_bounds_equal_the_torch_models(tmp_path, conv):
    """The imported network is the same network for the engine: Theorem 1's bound agrees to 1e-5."""
    torch.manual_seed(6)
    if conv:
        model = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(3 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 4))
        x = torch.rand(3, 1, 8, 8)
    else:
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
        x = torch.rand(3, 10)
    imported = load_onnx(_export(model, x[:1], tmp_path))
    c = torch.randn(3, 5, 4)
    ours = pt.DualNetwork(imported, x, pt.LinfBall(0.05)).objective(c)
    ref = pt.DualNetwork(pt.Network.from_torch(model.eval()), x, pt.LinfBall(0.05)).objective(c)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.detach().abs().max()))


# ---------------------------------------------------------------------------------------------
# hand-built graphs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("trans_a", "trans_b", "alpha", "beta", "with_c"),
                         [(*t, a, b, c) for t in itertools.product([0, 1], [0, 1])
                          for a, b, c in [(1.0, 1.0, True), (0.5, 2.0, True), (1.5, 1.0, False)]])
def test_gemm_attributes(tmp_path, trans_a, trans_b, alpha, beta, with_c):
    n, m = 6, 4
    w = _rand(m, n) if trans_b else _rand(n, m)
    inputs = ["x", "W", "C"] if with_c else ["x", "W"]
    gemm = helper.make_node("Gemm", inputs, ["y"], name="gemm", alpha=alpha, beta=beta, transA=trans_a,
                            transB=trans_b)
    inits = [("W", w), ("C", _rand(m))] if with_c else [("W", w)]
    model = _graph([gemm], [n, 1] if trans_a else [1, n], [1, m], inits)
    _check_against_ort(_save(model, tmp_path))


def test_matmul_add_chain_composes(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["h2"], name="add1"),
             helper.make_node("MatMul", ["h2", "W2"], ["h3"], name="mm2"),
             helper.make_node("Add", ["b2", "h3"], ["h4"], name="add2"),
             helper.make_node("Relu", ["h4"], ["h5"], name="relu"),
             helper.make_node("MatMul", ["h5", "W3"], ["y"], name="mm3")]
    inits = [("W1", _rand(5, 7)), ("b1", _rand(7)), ("W2", _rand(7, 6)), ("b2", _rand(6)), ("W3", _rand(6, 3))]
    net = _check_against_ort(_save(_graph(nodes, [1, 5], [1, 3], inits), tmp_path))
    assert [len(layer.ops) for layer in net.layers] == [1, 1]  # mm1, add1, mm2, add2 are one matrix


def test_acas_style_input_and_final_relu(tmp_path):
    """A (1, 1, 1, 5) input flattened, Sub/Div normalisation, MatMul chain ending in a ReLU."""
    nodes = [helper.make_node("Sub", ["x", "mean"], ["a"], name="sub"),
             helper.make_node("Div", ["a", "std"], ["b"], name="div"),
             helper.make_node("Flatten", ["b"], ["c"], name="flat"),
             helper.make_node("MatMul", ["c", "W"], ["d"], name="mm"),
             helper.make_node("Relu", ["d"], ["y"], name="relu")]
    inits = [("mean", _rand(5).reshape(1, 1, 1, 5)), ("std", np.abs(_rand(5)) + 0.5), ("W", _rand(5, 4))]
    net = _check_against_ort(_save(_graph(nodes, [1, 1, 1, 5], [1, 4], inits), tmp_path))
    assert net.n_relu == 1 and net.shapes((5,))[-1] == (4,)


@pytest.mark.parametrize(("pads", "native"), [
    ((1, 1, 1, 1), True), ((0, 0, 1, 1), False), ((2, 0, 1, 1), False), ((1, 2, 0, 1), False),
    ((0, 0, 1, 1), True),  # with stride 2 on an odd size the extra bottom/right row is never reached
])
def test_conv_pads(tmp_path, pads, native):
    size = 7 if native and pads == (0, 0, 1, 1) else 6
    stride = 2 if pads == (0, 0, 1, 1) else 1
    nodes = [helper.make_node("Conv", ["x", "K", "B"], ["h"], name="conv", pads=list(pads), strides=[stride] * 2),
             helper.make_node("Relu", ["h"], ["h2"], name="relu"),
             helper.make_node("Flatten", ["h2"], ["y"], name="flat")]
    model = _graph(nodes, [1, 2, size, size], None, [("K", _rand(3, 2, 3, 3)), ("B", _rand(3))])
    net = _check_against_ort(_save(model, tmp_path))
    assert isinstance(net.layers[0].ops[0], Conv2dOp) == native


@pytest.mark.parametrize(("strides", "dilations"), [((2, 1), (1, 1)), ((1, 1), (2, 2)), ((2, 2), (1, 2))])
def test_conv_strides_dilations(tmp_path, strides, dilations):
    nodes = [helper.make_node("Conv", ["x", "K"], ["h"], name="conv", pads=[1, 1, 1, 1], strides=list(strides),
                              dilations=list(dilations)),
             helper.make_node("Relu", ["h"], ["h2"], name="relu"),
             helper.make_node("Conv", ["h2", "K2"], ["y"], name="conv2")]
    inits = [("K", _rand(3, 1, 3, 3)), ("K2", _rand(2, 3, 2, 2))]
    _check_against_ort(_save(_graph(nodes, [1, 1, 9, 9], None, inits), tmp_path))


def test_conv_auto_pad_same(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "K"], ["y"], name="conv", auto_pad="SAME_UPPER", strides=[2, 2])]
    _check_against_ort(_save(_graph(nodes, [1, 1, 8, 8], None, [("K", _rand(2, 1, 3, 3))]), tmp_path))


def test_shape_gather_concat_reshape_target(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "K"], ["h"], name="conv"),
             helper.make_node("Shape", ["h"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsq"),
             helper.make_node("Constant", [], ["minus1"], name="const", value_ints=[-1]),
             helper.make_node("Cast", ["minus1"], ["m1"], name="cast", to=TensorProto.INT64),
             helper.make_node("Concat", ["n1", "m1"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["h", "target"], ["flat"], name="reshape"),
             helper.make_node("Gemm", ["flat", "W"], ["y"], name="gemm", transB=1)]
    inits = [("K", _rand(2, 1, 2, 2)), ("zero", np.array(0, dtype=np.int64)), ("axes", np.array([0], np.int64)),
             ("W", _rand(3, 2 * 3 * 3))]
    model = _graph(nodes, None, [None, 3], inits, in_dims=["N", 1, 4, 4])
    _check_against_ort(_save(model, tmp_path))


def test_transpose_squeeze_unsqueeze_identity_dropout(tmp_path):
    """Layout ops before a matrix only permute its columns; per-pixel Add after a conv is kept exactly."""
    nodes = [helper.make_node("Conv", ["x", "K"], ["h"], name="conv"),
             helper.make_node("Add", ["h", "pix"], ["h1"], name="add_pixelwise"),
             helper.make_node("Transpose", ["h1"], ["t"], name="transpose", perm=[0, 2, 3, 1]),
             helper.make_node("Unsqueeze", ["t", "ax"], ["u"], name="unsq"),
             helper.make_node("Squeeze", ["u", "ax"], ["s"], name="sq"),
             helper.make_node("Identity", ["s"], ["i"], name="ident"),
             helper.make_node("Dropout", ["i"], ["d"], name="drop"),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="reshape"),
             helper.make_node("Mul", ["f", "scale"], ["g"], name="mul"),
             helper.make_node("Sub", ["offset", "g"], ["y"], name="sub_from_const")]
    inits = [("K", _rand(2, 1, 2, 2)), ("pix", _rand(1, 2, 4, 4)), ("ax", np.array([1], np.int64)),
             ("shape", np.array([1, -1], np.int64)), ("scale", _rand(1, 32)), ("offset", _rand(32))]
    _check_against_ort(_save(_graph(nodes, [1, 1, 5, 5], [1, 32], inits), tmp_path))


def test_sub_div_normalisation_into_gemm(tmp_path):
    nodes = [helper.make_node("Sub", ["x", "mean"], ["a"], name="sub"),
             helper.make_node("Div", ["a", "std"], ["b"], name="div"),
             helper.make_node("Gemm", ["b", "W", "C"], ["y"], name="gemm", transB=1)]
    inits = [("mean", _rand(1, 6)), ("std", np.full((1, 6), 0.25, np.float32)), ("W", _rand(3, 6)), ("C", _rand(3))]
    net = _check_against_ort(_save(_graph(nodes, [1, 6], [1, 3], inits), tmp_path))
    assert len(net.layers) == 1 and len(net.layers[0].ops) == 1


# ---------------------------------------------------------------------------------------------
# named errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("node", "inits", "op"), [
    (helper.make_node("Sigmoid", ["x"], ["y"], name="sig0"), [], "Sigmoid"),
    (helper.make_node("MaxPool", ["x"], ["y"], name="pool0", kernel_shape=[2, 2], dilations=[2, 2]), [], "MaxPool"),
    (helper.make_node("Conv", ["x", "K"], ["y"], name="gconv", group=2), [("K", _rand(2, 1, 3, 3))], "Conv"),
    (helper.make_node("Div", ["one", "x"], ["y"], name="recip"), [("one", np.ones(1, np.float32))], "Div"),
    (helper.make_node("Mul", ["x", "x"], ["y"], name="square"), [], "Mul"),
    (helper.make_node("Cast", ["x"], ["y"], name="to_int", to=TensorProto.INT64), [], "Cast"),
    (helper.make_node("Conv", ["x", "K"], ["y"], name="conv1d"), [("K", _rand(2, 2, 3))], "Conv"),
])
def test_unsupported_operator_is_named(tmp_path, node, inits, op):
    model = _graph([node], [1, 2, 4, 4], None, inits)
    with pytest.raises((UnsupportedOperatorError, UnsupportedGraphError)) as info:
        load_onnx(_save(model, tmp_path))
    assert op in str(info.value) and node.name in str(info.value)


def test_unsupported_constant_operator_is_named(tmp_path):
    nodes = [helper.make_node("Range", ["a", "b", "c"], ["r"], name="rng"),
             helper.make_node("Reshape", ["x", "r"], ["y"], name="reshape")]
    inits = [("a", np.array(1, np.int64)), ("b", np.array(2, np.int64)), ("c", np.array(1, np.int64))]
    with pytest.raises(UnsupportedOperatorError, match=r"'rng'.*Range"):
        load_onnx(_save(_graph(nodes, [1, 4], None, inits), tmp_path))


def test_residual_graph_imports(tmp_path):
    """A value read twice (a skip connection) is a graph, not a chain (more in tests/test_onnx_graph.py)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "h"], ["y"], name="skip_add")]
    net = _check_against_ort(_save(_graph(nodes, [1, 3], [1, 3], [("W", _rand(3, 3))]), tmp_path))
    assert net.is_graph


def test_dynamic_shapes_are_refused(tmp_path):
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = _graph([node], None, None, [("W", _rand(3, 3))], in_dims=[1, "n"])
    with pytest.raises(UnsupportedGraphError, match="dynamic dimension 1"):
        load_onnx(_save(model, tmp_path))
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("Reshape", ["x", "shape_in"], ["y"], name="dyn_reshape")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    s = helper.make_tensor_value_info("shape_in", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    two_inputs = helper.make_model(helper.make_graph(nodes[1:], "g", [x, s], [y]))
    with pytest.raises(UnsupportedGraphError, match="2 inputs"):
        load_onnx(_save(two_inputs, tmp_path, "two.onnx"))


def test_relu_first_and_matrix_free_graphs_import_exactly(tmp_path):
    """A ReLU on the input (an exact identity layer goes first) and a graph of elementwise maps only."""
    relu = _graph([helper.make_node("Relu", ["x"], ["y"], name="relu0")], [1, 3], [1, 3])
    _check_against_ort(_save(relu, tmp_path, "relu.onnx"))
    two = _graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], [1, 3], [1, 3])
    _check_against_ort(_save(two, tmp_path, "two.onnx"))
    add = _graph([helper.make_node("Add", ["x", "c"], ["y"])], [1, 3], [1, 3],
                 [("c", [1.0, -1.0, 0.5])])
    _check_against_ort(_save(add, tmp_path, "add.onnx"))
    neg = _graph([helper.make_node("Neg", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], [1, 3], [1, 3])
    _check_against_ort(_save(neg, tmp_path, "neg.onnx"))


def test_slice_and_gather_on_the_value(tmp_path):
    """Selections of the network's value (a dense layer picks the elements), before and after a ReLU."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["a"], transB=1),
             helper.make_node("Slice", ["a", "starts", "ends", "axes", "steps"], ["s"]),
             helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("Gather", ["r", "idx"], ["y"], axis=1)]
    inits = [("w", _rand(6, 4)), ("starts", np.array([5], np.int64)), ("ends", np.array([-100], np.int64)),
             ("axes", np.array([1], np.int64)), ("steps", np.array([-2], np.int64)), ("idx", np.array([2, 0, -1, 0]))]
    _check_against_ort(_save(_graph(nodes, [1, 4], [1, 4], inits), tmp_path))


def test_non_finite_weights_and_division_by_zero(tmp_path):
    nodes = [helper.make_node("Div", ["x", "zero"], ["a"], name="div0"),
             helper.make_node("MatMul", ["a", "W"], ["y"], name="mm")]
    model = _graph(nodes, [1, 3], [1, 2], [("zero", np.array([1, 0, 1], np.float32)), ("W", _rand(3, 2))])
    with pytest.raises(UnsupportedOperatorError, match=r"'div0' \(Div\) divides by zero"):
        load_onnx(_save(model, tmp_path))
    w = _rand(3, 2)
    w[1, 0] = np.nan
    model = _graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [1, 3], [1, 2], [("W", w)])
    with pytest.raises(ModelFileError, match="NaN or infinite"):
        load_onnx(_save(model, tmp_path, "nan.onnx"))


def test_bad_files(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \xff\xfe\x00 at all")
    with pytest.raises(ModelFileError, match="not an ONNX model"):
        load_onnx(garbage)


def test_unbatched_input_and_output_layout_change(tmp_path):
    """An input without a batch dimension, and a Transpose after the last ReLU (output order permuted)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Cast", ["r"], ["c"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["c", "shape"], ["m"], name="reshape"),
             helper.make_node("Transpose", ["m"], ["y"], name="transpose", perm=[1, 0])]
    inits = [("W", _rand(6, 4)), ("shape", np.array([2, 2], np.int64))]
    net = _check_against_ort(_save(_graph(nodes, [6], [2, 2], inits), tmp_path))
    assert net.n_relu == 1 and isinstance(net.layers[1].ops[0], LinearOp)  # the permutation is a layer


def test_elementwise_constant_on_a_matrix_input(tmp_path):
    """A (1, 4, 5) input shifted elementwise before a ReLU: the shift is kept on the flattened input (it was a
    batch norm over 4 "channels" with default weights, a wrong network)."""
    nodes = [helper.make_node("Add", ["x", "c"], ["a"], name="shift"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="mm")]
    model = _graph(nodes, [1, 4, 5], [1, 4, 3], [("c", _rand(4, 5)), ("W", _rand(5, 3))])
    _check_against_ort(_save(model, tmp_path))


def test_released_mnist_model_round_trip(tmp_path):
    """The paper's released MNIST conv net, exported and imported: same outputs and the same dual bound."""
    from polytope.io.models import load_released, released_model_path

    if not released_model_path("mnist").exists():
        pytest.skip(f"released MNIST model not found at {released_model_path('mnist')}")
    model = load_released("mnist")
    x = torch.rand(2, 1, 28, 28)
    path = _export(model, x[:1], tmp_path)
    imported = _check_against_ort(path, n=2)
    c = torch.randn(2, 3, 10)
    ours = pt.DualNetwork(imported, x, pt.LinfBall(0.1)).objective(c).detach()
    ref = pt.DualNetwork(pt.Network.from_torch(model), x, pt.LinfBall(0.1)).objective(c).detach()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
