"""``polytope verify`` and ``polytope supports`` through ``python -m polytope`` (the VNN-LIB 2.0 interface)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from polytope.io.onnx_import import SUPPORTED_OPS

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "polytope", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def _main(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same command in this process (no start-up cost), as a ``CompletedProcess``."""
    from polytope.commands.main import main

    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def _affine_net(tmp_path: Path, name: str = "net.onnx") -> Path:
    """y = relu(x + 0.5) (one input, one output), opset 18."""
    nodes = [helper.make_node("Add", ["x", "c"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [helper.make_tensor("c", TensorProto.FLOAT, [1], [0.5])])
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _v2(tmp_path: Path, output: str, lo: float = 0.0, hi: float = 1.0) -> Path:
    path = tmp_path / "prop.vnnlib"
    path.write_text(f"""(vnnlib-version <2.0>)
(declare-network N
    (declare-input X float32 [1])
    (declare-output Y float32 [1])
)
(assert (>= X[0] {lo}))
(assert (<= X[0] {hi}))
(assert {output})
""")
    return path


@pytest.mark.parametrize(("output", "answer"), [("(>= Y[0] 2.0)", "unsat"), ("(>= Y[0] 1.25)", "sat")])
def test_verify_answers_and_assignment(tmp_path: Path, output: str, answer: str, capsys) -> None:
    net = _affine_net(tmp_path)
    results = tmp_path / "results.txt"
    run = _run if answer == "sat" else lambda *a: _main(capsys, *a)  # python -m for one of them
    out = run("verify", str(_v2(tmp_path, output)), "--network", f"N={net}", "--timeout", "60",
               "--results", str(results))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == answer
    if answer == "sat":
        assert lines[1] == "(" and lines[-1] == ")"
        values = dict(line.strip()[1:-1].split() for line in lines[2:-1])
        x, y = float(values["X[0]"]), float(values["Y[0]"])
        assert 0.0 <= x <= 1.0 and y >= 1.25 and y == pytest.approx(max(x + 0.5, 0), abs=1e-6)
        text = results.read_text().splitlines()
        assert text[0] == "sat" and text[1].startswith("((X_0 ") and text[-1].endswith(")")
    else:
        assert len(lines) == 1 and results.read_text() == "unsat\n"


def test_verify_v1_property_and_plain_network_path(tmp_path: Path, capsys) -> None:
    net = _affine_net(tmp_path)
    prop = tmp_path / "p1.vnnlib"
    prop.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= X_0 -1.0))\n"
                    "(assert (<= X_0 1.0))\n(assert (<= Y_0 0.25))\n")
    out = _main(capsys, "verify", str(prop), "--network", str(net))
    assert out.stdout.splitlines()[0] == "sat"
    assert "(X_0 " in out.stdout and "(Y_0 " in out.stdout


def test_timeout_prints_timed_out(tmp_path: Path, capsys) -> None:
    net = _affine_net(tmp_path)
    out = _main(capsys, "verify", str(_v2(tmp_path, "(>= Y[0] 2.0)")), "--network", f"N={net}", "--timeout", "0")
    assert out.returncode == 0 and out.stdout.splitlines() == ["timed-out"]


def _bad_cases(tmp_path: Path):
    net = _affine_net(tmp_path)
    good = _v2(tmp_path, "(>= Y[0] 2.0)")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    two = tmp_path / "two.vnnlib"
    two.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                   "(assert (<= X_0 1.0))\n(assert (>= X_0 0.0))\n(assert (<= X_1 1.0))\n(assert (>= X_1 0.0))\n"
                   "(assert (<= Y_0 0.0))\n")
    malformed = tmp_path / "bad.vnnlib"
    malformed.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1.0)\n")
    sig = tmp_path / "sigmoid.onnx"
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"], name="squash")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(sig))
    return [
        ((str(good), "--network", str(tmp_path / "missing.onnx")), "missing.onnx"),
        ((str(good), "--network", str(garbage)), "not an ONNX model"),
        ((str(good), "--network", str(sig)), "Sigmoid"),
        ((str(two), "--network", str(net)), "2 inputs"),
        ((str(malformed), "--network", str(net)), "line 3"),
        ((str(tmp_path / "nope.vnnlib"), "--network", str(net)), "nope.vnnlib"),
    ]


def test_bad_input_is_one_line_and_unknown(tmp_path: Path, capsys) -> None:
    cases = _bad_cases(tmp_path)
    for k, (args, needle) in enumerate(cases):
        results = tmp_path / "r.txt"
        run = _run if k == 0 else lambda *a: _main(capsys, *a)  # one through python -m, the rest in-process
        out = run("verify", *args, "--results", str(results))
        assert out.returncode == 2, (args, out.stderr)
        assert out.stdout == "unknown\n"
        err = out.stderr.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "Traceback" not in out.stderr, (needle, out.stderr)
        assert results.read_text() == "error\n"


def test_supports_queries(capsys) -> None:
    ops = _run("supports", "--onnx-operators")
    assert ops.returncode == 0 and ops.stdout.split() == list(SUPPORTED_OPS)

    def ask(flag: str) -> str:
        return _main(capsys, "supports", flag).stdout

    assert ask("--vnnlib-versions") == "1.0\n2.0\n"
    lo, hi = (int(v) for v in ask("--onnx-opset-versions").split())
    assert 1 <= lo <= 18 <= hi
    assert ask("--serialise-assignments") == "true\n"
    assert ask("--multiple-network-theories") == "SNET\n"
    assert ask("--multiple-input-output-theories") == "SIO\n"
    theories = [line.split()[0] for line in ask("--arithmetic-complexity-theories").splitlines()]
    assert theories == ["BND", "OUTC", "LIN"]


def test_sat_assignment_replays_in_onnxruntime(tmp_path: Path) -> None:
    """A torch-exported net: the printed X replays in onnxruntime into the unsafe region."""
    import onnxruntime as ort

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    net = tmp_path / "fc.onnx"
    torch.onnx.export(seq, torch.zeros(1, 2), str(net), dynamo=False, input_names=["x"], output_names=["y"])
    prop = tmp_path / "p.vnnlib"
    with torch.no_grad():
        y = seq(torch.zeros(1, 2))[0]
    rel = "<=" if float(y[0]) <= float(y[1]) else ">="
    prop.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                    "(declare-const Y_1 Real)\n(assert (>= X_0 -0.1))\n(assert (<= X_0 0.1))\n(assert (>= X_1 -0.1))\n"
                    f"(assert (<= X_1 0.1))\n(assert ({rel} Y_0 Y_1))\n")
    out = _run("verify", str(prop), "--network", str(net))
    lines = out.stdout.splitlines()
    assert lines[0] == "sat"
    values = dict(line.strip()[1:-1].split() for line in lines[2:-1])
    x = np.array([float(values["X_0"]), float(values["X_1"])], dtype=np.float32)
    y_ort = ort.InferenceSession(str(net), providers=["CPUExecutionProvider"]).run(None, {"x": x.reshape(1, 2)})[0][0]
    assert (y_ort[0] <= y_ort[1]) if rel == "<=" else (y_ort[0] >= y_ort[1])
