"""VNN-LIB parsing: v1.0 and v2.0 give the same property, VNN-COMP shapes, sound rounding, errors name the line."""

from __future__ import annotations

import time
from fractions import Fraction

import numpy as np
import pytest

from polytope.io.vnnlib import Halfspaces, parse_vnnlib, read_vnnlib
from polytope.model.errors import PropertyFileError, UnsupportedPropertyError


def _v1(n_x: int, n_y: int, asserts: str) -> str:
    decls = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_x))
    decls += "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_y))
    return f"; generated\n{decls}\n{asserts}"


def _v2(in_shape: str, out_shape: str, asserts: str) -> str:
    return (f"(vnnlib-version <2.0>)\n(declare-network net\n  (declare-input X Real {in_shape} \"input\")\n"
            f"  (declare-output Y float32 {out_shape}))\n{asserts}")


ACAS_V1 = _v1(5, 5, """
(assert (<= X_0 0.679857769))
(assert (>= X_0 0.6))
(assert (<= X_1 0.5))
(assert (>= X_1 -0.5))
(assert (<= X_2 -4.5e-1))
(assert (>= X_2 -0.5))
(assert (<= X_3 0.5))
(assert (>= X_3 0.45))
(assert (<= X_4 -0.45))
(assert (>= X_4 -0.5))
(assert (or
    (and (<= Y_0 Y_1) (<= Y_0 Y_2))
    (and (<= Y_0 Y_3) (<= Y_0 Y_4))
))
""")
ACAS_V2 = _v2("[1,5]", "[1,5]", """
(assert (and (<= X[0,0] 0.679857769) (>= X[0,0] 0.6) (<= X[0,1] 0.5) (>= X[0,1] -0.5)))
(assert (and (<= X[0,2] -0.45) (>= X[0,2] -0.5) (>= X[0,3] 0.45) (<= X[0,3] 0.5)))
(assert (and (<= X[0,4] -0.45) (>= X[0,4] -0.5)))
(assert (or (and (<= Y[0,0] Y[0,1]) (<= Y[0,0] Y[0,2])) (and (<= Y[0,0] Y[0,3]) (<= Y[0,0] Y[0,4]))))
""")


def test_acas_style_v1_and_v2_agree():
    p1, p2 = parse_vnnlib(ACAS_V1), parse_vnnlib(ACAS_V2)
    assert p1 == p2 and p1.version == "1.0" and p2.version == "2.0"
    assert p2.input_shape == (1, 5) and p2.output_shape == (1, 5) and p2.input_name == "input"
    ((lo, hi),) = p1.boxes
    np.testing.assert_array_equal(lo, [0.6, -0.5, -0.5, 0.45, -0.5])
    np.testing.assert_array_equal(hi, [0.679857769, 0.5, -0.45, 0.5, -0.45])
    first, second = p1.unsafe
    np.testing.assert_array_equal(first.A, [[1, -1, 0, 0, 0], [1, 0, -1, 0, 0]])
    np.testing.assert_array_equal(second.A, [[1, 0, 0, -1, 0], [1, 0, 0, 0, -1]])
    assert np.all(first.b == 0) and np.all(second.b == 0)


def _mnist(n: int, label: int, eps: float, version: int, paired: bool = True) -> str:
    """An mnist_fc-style property: a box around a point, unsafe if any other logit reaches the label's."""
    x = np.linspace(0, 1, n).tolist()
    if version == 1:
        lines = [f"(assert (<= X_{i} {min(1.0, v + eps)!r}))\n(assert (>= X_{i} {max(0.0, v - eps)!r}))"
                 for i, v in enumerate(x)]
        ors = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(10) if j != label)
        return _v1(n, 10, "\n".join(lines) + f"\n(assert (or {ors}))\n")
    pattern = ("(assert (and (>= X[0,{i}] {lo!r}) (<= X[0,{i}] {hi!r})))" if paired
               else "(assert (>= X[0,{i}] {lo!r}))\n(assert (<= X[0,{i}] {hi!r}))")
    lines = [pattern.format(i=i, lo=max(0.0, v - eps), hi=min(1.0, v + eps)) for i, v in enumerate(x)]
    ors = " ".join(f"(and (>= Y[0,{j}] Y[0,{label}]))" for j in range(10) if j != label)
    return _v2(f"[1,{n}]", "[1,10]", "\n".join(lines) + f"\n(assert (or {ors}))\n")


def test_mnist_style_v1_and_v2_agree():
    p1, p2 = parse_vnnlib(_mnist(784, 3, 0.02, 1)), parse_vnnlib(_mnist(784, 3, 0.02, 2))
    assert p1 == p2 and p1.n_inputs == 784 and len(p1.cases) == 1
    x = np.linspace(0, 1, 784)
    np.testing.assert_array_equal(p1.boxes[0][0], np.maximum(0.0, x - 0.02))
    unsafe = p1.unsafe
    assert len(unsafe) == 9
    for h, j in zip(unsafe, [j for j in range(10) if j != 3], strict=True):
        expected = np.zeros((1, 10))
        expected[0, 3], expected[0, j] = 1.0, -1.0  # Y_j >= Y_3  <=>  Y_3 - Y_j <= 0
        np.testing.assert_array_equal(h.A, expected)
        assert h.b.tolist() == [0.0]


def test_disjunction_of_boxes_and_per_box_unsafe_regions():
    prop = parse_vnnlib(_v1(1, 2, """
(assert (or (and (>= X_0 -1) (<= X_0 0)) (and (>= X_0 0) (<= X_0 1))))
(assert (<= Y_0 Y_1))
"""))
    assert [(lo.tolist(), hi.tolist()) for lo, hi in prop.boxes] == [([-1.0], [0.0]), ([0.0], [1.0])]
    assert all(len(c.unsafe) == 1 for c in prop.cases) and prop.unsafe[0].A.tolist() == [[1.0, -1.0]]
    paired = parse_vnnlib(_v1(1, 2, """
(assert (or (and (>= X_0 -1) (<= X_0 0) (>= Y_0 1)) (and (>= X_0 0) (<= X_0 1) (<= Y_1 2))
            (and (>= X_0 0) (<= X_0 1) (<= Y_0 3.5))))
"""))
    assert len(paired.cases) == 2 and len(paired.cases[1].unsafe) == 2
    with pytest.raises(UnsupportedPropertyError, match="different unsafe regions"):
        _ = paired.unsafe


def test_linear_terms_equality_strict_and_scientific():
    prop = parse_vnnlib(_v2("[2]", "[3]", """
(assert (and (< X[0] 1.5E+0) (> X[0] -2e-1) (== X[1] 0.25)))
(assert (<= (+ (* 2.0 Y[0]) (- Y[1]) (- 3 Y[2])) (- 1.0 0.5 0.25)))
"""))
    ((lo, hi),) = prop.boxes
    assert lo.tolist() == [-0.2, 0.25] and hi.tolist() == [1.5, 0.25]
    ((h,),) = [c.unsafe for c in prop.cases]
    # 2 y0 - y1 + 3 - y2 <= 0.25  <=>  2 y0 - y1 - y2 <= -2.75
    assert h.A.tolist() == [[2.0, -1.0, -1.0]] and h.b.tolist() == [-2.75]


@pytest.mark.parametrize(("coef", "bound"), [("0.3", "0.1"), ("3.0", "0.7"), ("0.1", "0.7")])
def test_rounded_bounds_are_widened_outwards(coef, bound):
    """``c x <= b`` and ``c x >= -b`` with c, b floats: the box contains the exact solution set."""
    prop = parse_vnnlib(_v1(1, 1, f"(assert (<= (* {coef} X_0) {bound}))\n(assert (>= (* {coef} X_0) (- {bound})))\n"
                               "(assert (<= Y_0 0))"))
    ((lo, hi),) = prop.boxes
    c, b = Fraction(float(coef)), Fraction(float(bound))
    assert Fraction(float(hi[0])) >= b / c and Fraction(float(lo[0])) <= -b / c
    assert float(hi[0]) <= np.nextafter(float(b / c), np.inf) * (1 + 1e-15)


def test_sums_of_constants_widen_the_unsafe_bound():
    prop = parse_vnnlib(_v1(1, 1, "(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (<= (+ Y_0 0.1 0.2) 0))"))
    b = prop.unsafe[0].b[0]
    assert Fraction(float(b)) >= -(Fraction(0.1) + Fraction(0.2))  # y <= -(0.1 + 0.2) exactly is inside


@pytest.mark.parametrize(("version", "n"), [(1, 33_330), (2, 50_000)])
def test_parses_1e5_lines_fast(tmp_path, version, n):
    """A 10^5-line file parses in under 2 s of CPU time (process time: robust to a loaded machine)."""
    path = tmp_path / "big.vnnlib"
    path.write_text(_mnist(n, 7, 0.01, version, paired=False))
    assert path.read_text().count("\n") >= 100_000
    start = time.process_time()
    prop = read_vnnlib(path)
    elapsed = time.process_time() - start
    assert prop.n_inputs == n and len(prop.unsafe) == 9
    assert elapsed < 2.0, f"parsing 1e5 lines took {elapsed:.2f} s of CPU time"


# ---------------------------------------------------------------------------------------------
# errors name the line
# ---------------------------------------------------------------------------------------------
_HEAD = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"  # lines 1-3


@pytest.mark.parametrize(("body", "line", "message", "cls"), [
    ("(assert (<= X_0 1)\n(assert (>= X_0 0))\n", 4, "never closed", PropertyFileError),
    ("(assert (<= X_0 1)))\n", 4, r"unbalanced '\)'", PropertyFileError),
    ("(assert (<= X_0 1))\n(assert (>= X_7 0))\n", 5, "undeclared variable 'X_7'", PropertyFileError),
    ("(assert (<= X_0 1))\n\n(assert (<= (* X_0 X_1) 1))\n", 6, "not linear", UnsupportedPropertyError),
    ("(assert (<= X_0 1))\n(assert (<= X_0 Y_0))\n", 5, "mixes inputs and outputs", UnsupportedPropertyError),
    ("(assert (<= X_0 1))\n(assert (<= (+ X_0 X_1) 1))\n", 5, "not a box", UnsupportedPropertyError),
    ("(assert (<= X_0 1))\n(assert (~ X_0 1))\n", 5, "unknown boolean operator '~'", PropertyFileError),
    ("(assert (<= X_0 (/ 1 2)))\n", 4, "unknown arithmetic operator '/'", PropertyFileError),
    ("(assert (!= Y_0 1))\n", 4, "'!=' is not supported", UnsupportedPropertyError),
    ("(assert (<= X_0 1 2))\n", 4, "takes two operands", PropertyFileError),
    ("(check-sat)\n", 4, "unknown command 'check-sat'", PropertyFileError),
    ("(assert (<= X_0 1))\n(assert (>= X_0 2))\n(assert (<= Y_0 0))\n", 4, "input region is empty",
     PropertyFileError),
    ("(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (>= X_1 0))\n", 4, "no output constraint",
     PropertyFileError),
    ("(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (>= X_1 0))\n(assert (<= Y_0 0))\n", 1,
     "input 1 has no finite", UnsupportedPropertyError),
    ("(assert (<= X_0 1)) $\n", 4, "'\\$' outside parentheses", PropertyFileError),
    ("(assert (<= X_0 1))\n(assert (<= X_0 \"1))\n", 5, "unexpected character", PropertyFileError),
])
def test_errors_name_the_line(body, line, message, cls):
    with pytest.raises(cls, match=message) as info:
        parse_vnnlib(_HEAD + body, source="p.vnnlib")
    assert f"p.vnnlib, line {line}:" in str(info.value)


@pytest.mark.parametrize(("text", "line", "message"), [
    (_v2("[1,2]", "[1]", "(assert (<= X[0,2] 1))"), 5, r"does not index X of shape \[1, 2\]"),
    (_v2("[1,2]", "[1]", "(assert (<= X[0] 1))"), 5, "does not index"),
    (_v2("[1,2]", "[1]", "(assert (<= Z[0] 1))"), 5, "undeclared variable 'Z\\[0\\]'"),
    ("(vnnlib-version <2.0>)\n(declare-network a (declare-input X Real [1]) (declare-output Y Real [1]))\n"
     "(declare-network b (declare-input U Real [1]) (declare-output V Real [1]))\n(assert (<= Y 0))", 3,
     "one declare-network"),
    ("(vnnlib-version <2.0>)\n(declare-network a (declare-input X Real [1])\n  (declare-hidden H Real [1] \"h\")\n"
     "  (declare-output Y Real [1]))\n(assert (<= Y 0))", 3, "declare-hidden"),
    ("(vnnlib-version <3.0>)\n", 1, "version 3.0 is not supported"),
])
def test_v2_errors_name_the_line(text, line, message):
    with pytest.raises(PropertyFileError, match=message) as info:
        parse_vnnlib(text, source="q.vnnlib")
    assert f"q.vnnlib, line {line}:" in str(info.value)


def test_v2_scalar_tensors_and_onnx_names():
    prop = parse_vnnlib("(vnnlib-version <2.0>)\n(declare-network n (declare-input x Real [])"
                        " (declare-output y Real [2] \"out\"))\n(assert (and (<= x 1) (>= x 0) (>= y[1] y[0])))")
    assert prop.n_inputs == 1 and prop.output_name == "out" and prop.input_name is None
    assert prop.unsafe == (Halfspaces(prop.unsafe[0].A, prop.unsafe[0].b),)
    assert prop.unsafe[0].A.tolist() == [[1.0, -1.0]]


def test_missing_file(tmp_path):
    with pytest.raises(PropertyFileError, match="cannot read"):
        read_vnnlib(tmp_path / "nope.vnnlib")
