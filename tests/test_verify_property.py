"""``pt.verify`` on small networks against the exact MILP; every ``sat`` replays in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import polytope as pt
from polytope.io.onnx_import import read_onnx
from polytope.io.vnnlib import Case, Halfspaces, Property, parse_vnnlib
from polytope.verifiers import property as vp
from tests.strategies import build_fc, fast

DTYPE = torch.float64


def _prop(lo, hi, conjunctions, n_out: int) -> Property:
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    unsafe = tuple(Halfspaces(np.atleast_2d(np.asarray(A, float)), np.asarray(b, float).reshape(-1))
                   for A, b in conjunctions)
    return Property(lo.size, n_out, (Case(lo, hi, unsafe),), "1.0", (lo.size,), (n_out,))


def _export(seq: torch.nn.Module, n_in: int, path: Path) -> Path:
    torch.onnx.export(seq.float().eval(), torch.zeros(1, n_in), str(path), dynamo=False,
                      input_names=["x"], output_names=["y"])
    return path


@fast(10)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.sampled_from([0.3, 1.0, 2.5]))
def test_verify_agrees_with_the_milp(seed: int, k: int, shift: float) -> None:
    g = torch.Generator().manual_seed(seed)
    net = pt.Network.from_torch(build_fc(2, [6, 5], 3, seed))
    lo = torch.rand(2, generator=g, dtype=DTYPE) - 0.5
    hi = lo + 0.2 + 0.5 * torch.rand(2, generator=g, dtype=DTYPE)
    A = torch.randn(k, 3, generator=g, dtype=DTYPE)
    with torch.no_grad():
        b = A @ net.forward(((lo + hi) / 2).reshape(1, 2))[0] - shift * torch.rand(k, generator=g, dtype=DTYPE)
    prop = _prop(lo.numpy(), hi.numpy(), [(A.numpy(), b.numpy())], 3)
    exact = pt.ExactMILP(net, ((lo + hi) / 2).reshape(1, 2), pt.Box(lo, hi)).solve_max(A, b).value
    result = pt.verify(net, prop, timeout=30)
    if exact > 1e-5:
        assert result.status == "unsat"
    elif exact < -1e-5:
        assert result.status == "sat"
    if result.status == "sat":
        cex = result.counterexample
        assert np.all(cex.x >= lo.numpy()) and np.all(cex.x <= hi.numpy())
        assert np.all(A.numpy() @ cex.y <= b.numpy())


def _two_class(tmp_path: Path):
    seq = build_fc(3, [8, 6], 2, 11)
    path = _export(seq, 3, tmp_path / "net.onnx")
    return seq, read_onnx(path), path


def test_vnnlib_text_sat_replays_in_onnxruntime(tmp_path: Path) -> None:
    import onnxruntime as ort

    _, onx, path = _two_class(tmp_path)
    lines = ["(declare-const X_0 Real)", "(declare-const X_1 Real)", "(declare-const X_2 Real)",
             "(declare-const Y_0 Real)", "(declare-const Y_1 Real)"]
    lines += [f"(assert (>= X_{i} -1.0))\n(assert (<= X_{i} 1.0))" for i in range(3)]
    for rel in ("<=", ">="):
        text = "\n".join([*lines, f"(assert ({rel} Y_0 Y_1))"])
        prop = parse_vnnlib(text)
        exact = pt.ExactMILP(onx.network, torch.zeros(1, 3, dtype=DTYPE),
                             pt.Box(torch.tensor(prop.cases[0].lo), torch.tensor(prop.cases[0].hi))).solve_max(
            prop.cases[0].unsafe[0].A, prop.cases[0].unsafe[0].b).value
        result = pt.verify(onx.network, prop, timeout=30, onnx_path=path, in_shape=onx.in_shape)
        assert result.status == ("sat" if exact < 0 else "unsat"), (rel, exact)
        if result.status == "sat":
            cex = result.counterexample
            assert cex.x.dtype == np.float64 and np.array_equal(cex.x.astype(np.float32).astype(np.float64), cex.x)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            y = sess.run(None, {"x": cex.x.astype(np.float32).reshape(1, 3)})[0][0]
            hs = prop.cases[0].unsafe[0]
            assert np.all(hs.A @ y.astype(np.float64) <= hs.b)
            assert np.all(cex.x >= prop.cases[0].lo) and np.all(cex.x <= prop.cases[0].hi)


def _shift_net(bias: float) -> torch.nn.Sequential:
    seq = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU(), torch.nn.Linear(1, 1))
    with torch.no_grad():
        seq[0].weight.fill_(1.0)
        seq[0].bias.fill_(0.0)
        seq[2].weight.fill_(1.0)
        seq[2].bias.fill_(bias)
    return seq


@pytest.mark.parametrize("ulps", [3, -3])
def test_few_ulp_margins_are_decided_in_float64(tmp_path: Path, ulps: int) -> None:
    """y = relu(x) + 0.5 on [0, 1] reaches 1.5 exactly; ``y >= 1.5 + 3 ulp`` is unsat, ``y >= 1.5 - 3 ulp`` sat."""
    ulp = float(np.spacing(np.float32(1.5)))
    threshold = 1.5 + ulps * ulp
    path = _export(_shift_net(0.5), 1, tmp_path / "shift.onnx")
    onx = read_onnx(path)  # float32 weights: the engine converts to float64
    prop = _prop([0.0], [1.0], [([[-1.0]], [-threshold])], 1)
    result = pt.verify(onx.network, prop, timeout=30, onnx_path=path, in_shape=onx.in_shape)
    assert result.status == ("unsat" if ulps > 0 else "sat")
    if ulps < 0:
        assert result.counterexample.y[0] >= threshold


def test_a_counterexample_that_does_not_replay_is_never_sat(tmp_path: Path, monkeypatch) -> None:
    path = _export(_shift_net(0.5), 1, tmp_path / "shift.onnx")
    onx = read_onnx(path)
    prop = _prop([0.0], [1.0], [([[-1.0]], [-1.0])], 1)  # y >= 1: true at x >= 0.5
    assert pt.verify(onx.network, prop, timeout=30, onnx_path=path, in_shape=onx.in_shape).status == "sat"
    monkeypatch.setattr(vp, "_check_import", lambda *args: None)
    monkeypatch.setattr(vp._Replay, "__call__", lambda self, x: np.full(1, np.nan))
    result = pt.verify(onx.network, prop, timeout=30, onnx_path=path, in_shape=onx.in_shape)
    assert result.status == "unknown"


def test_an_import_that_disagrees_with_onnxruntime_is_refused(tmp_path: Path) -> None:
    path = _export(_shift_net(0.5), 1, tmp_path / "shift.onnx")
    wrong = read_onnx(_export(_shift_net(0.6), 1, tmp_path / "other.onnx"))  # not the file that is replayed
    prop = _prop([0.0], [1.0], [([[-1.0]], [-2.0])], 1)
    with pytest.raises(pt.ModelFileError, match="differs from onnxruntime"):
        pt.verify(wrong.network, prop, timeout=30, onnx_path=path, in_shape=wrong.in_shape)


def test_a_boundary_touch_is_never_unsat() -> None:
    """y = relu(x) + 0.5 reaches 1.5 exactly at x = 1: ``y >= 1.5`` is sat (the closure), never unsat."""
    net = pt.Network.from_torch(_shift_net(0.5).double())
    result = pt.verify(net, _prop([0.0], [1.0], [([[-1.0]], [-1.5])], 1), timeout=30)
    assert result.status == "sat" and result.counterexample.y[0] >= 1.5


def test_timeout_and_mismatch_errors() -> None:
    net = pt.Network.from_torch(build_fc(2, [4], 2, 0))
    prop = _prop([0.0, 0.0], [1.0, 1.0], [([[1.0, -1.0]], [-1000.0])], 2)  # unreachable, but no time to prove it
    assert pt.verify(net, prop, timeout=0).status == "timeout"
    with pytest.raises(pt.PropertyMismatchError):
        pt.verify(net, _prop([0.0], [1.0], [([[1.0, 0.0]], [0.0])], 2))
    with pytest.raises(pt.PropertyMismatchError):
        pt.verify(net, _prop([0.0, 0.0], [1.0, 1.0], [([[1.0, 0.0, 0.0]], [0.0])], 3))


def test_the_milp_rung_finds_and_checks_counterexamples() -> None:
    """With the attack all but off, the MILP's points (checked in float64) decide the sat instances."""
    methods = []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        net = pt.Network.from_torch(build_fc(2, [6, 5], 3, seed))
        lo = torch.rand(2, generator=g, dtype=DTYPE) - 0.5
        hi = lo + 0.2 + 0.5 * torch.rand(2, generator=g, dtype=DTYPE)
        A = torch.randn(2, 3, generator=g, dtype=DTYPE)
        with torch.no_grad():
            b = A @ net.forward(((lo + hi) / 2).reshape(1, 2))[0] - 0.3 * torch.rand(2, generator=g, dtype=DTYPE)
        box = pt.Box(lo, hi)
        exact = pt.ExactMILP(net, box.centre(), box).solve_max(A, b).value
        result = pt.verify(net, _prop(lo.numpy(), hi.numpy(), [(A.numpy(), b.numpy())], 3), timeout=30,
                           attack_steps=1, attack_restarts=1)
        assert result.status == ("sat" if exact < 0 else "unsat"), (seed, exact)
        methods.append(result.method)
        if result.status == "sat":
            assert np.all(A.numpy() @ result.counterexample.y <= b.numpy())
    assert "milp" in methods


@fast(12)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.05, 0.3, 1.0]), st.booleans())
def test_the_bab_rung_agrees_with_the_milp_on_one_row_conjunctions(seed: int, shift: float, below: bool) -> None:
    """Branch and bound on a one-row conjunction: ``unsat`` only above the exact minimum's zero, ``sat`` only with a
    point that satisfies the row in float64, and decided whenever the exact minimum is clear of zero."""
    g = torch.Generator().manual_seed(seed)
    net = pt.Network.from_torch(build_fc(2, [8, 6], 3, seed))
    lo = torch.rand(2, generator=g, dtype=DTYPE) - 0.5
    hi = lo + 0.3 + 0.5 * torch.rand(2, generator=g, dtype=DTYPE)
    box = pt.Box(lo, hi)
    a = torch.randn(1, 3, generator=g, dtype=DTYPE)
    exact_min = pt.ExactMILP(net, box.centre(), box).solve(a[0]).value
    b = torch.tensor([exact_min + (shift if not below else -shift)], dtype=DTYPE)  # sat when b >= the minimum
    job = vp._Conjunction(pt.Network.from_torch(build_fc(2, [8, 6], 3, seed)), (2,), lo.numpy(), hi.numpy(),
                          a.numpy(), b.numpy(), None, np.float64)
    status, _, cex = job.prove("bab", vp._Deadline(30.0), 2000)
    assert status == ("sat" if not below else "unsat"), (seed, exact_min, float(b))
    if status == "sat":
        assert np.all(cex.x >= lo.numpy()) and np.all(cex.x <= hi.numpy())
        assert float(a.numpy()[0] @ cex.y) <= float(b)
