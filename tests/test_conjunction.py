"""Joint output constraints ``A y <= b``: dual, LP and MILP bounds on ``min max_i (A_i f(x) - b_i)`` (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import polytope as pt
from polytope.bounds.conjunction import conjunction_bound, row_bounds
from tests.strategies import build_fc, fast

DTYPE = torch.float64


def _problem(seed: int, k: int, shift: float):
    g = torch.Generator().manual_seed(seed)
    net = pt.Network.from_torch(build_fc(2, [6, 5], 3, seed))
    lo = torch.rand(2, generator=g, dtype=DTYPE) - 0.5
    box = pt.Box(lo, lo + 0.2 + 0.6 * torch.rand(2, generator=g, dtype=DTYPE))
    A = torch.randn(k, 3, generator=g, dtype=DTYPE)
    x = box.centre()
    # b near the reachable values so that both answers occur
    b = (A @ net.forward(x)[0]) - shift * torch.rand(k, generator=g, dtype=DTYPE)
    return net, box, x, A, b


def _grid_minmax(net, box, A, b, n: int = 201) -> tuple[float, torch.Tensor]:
    axes = [torch.linspace(float(box.lo[i]), float(box.hi[i]), n, dtype=DTYPE) for i in range(2)]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    z = (net.forward(pts) @ A.T - b).amax(1)
    return float(z.min()), pts


@fast(10)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.sampled_from([0.5, 1.5, 3.0]))
def test_joint_unreachability_matches_the_milp(seed: int, k: int, shift: float) -> None:
    net, box, x, A, b = _problem(seed, k, shift)
    milp = pt.ExactMILP(net, x, box).solve_max(A, b)
    assert milp.status == "optimal"
    exact = milp.value
    # the MILP's point attains its value in a forward pass, and the grid never goes below it
    z_in = torch.as_tensor(milp.z_in).reshape(1, 2)
    with torch.no_grad():
        reached = float((net.forward(z_in)[0] @ A.T - b).max())
    assert reached == pytest.approx(exact, abs=1e-6)
    with torch.no_grad():
        grid, _ = _grid_minmax(net, box, A, b)
    spacing = float((box.hi - box.lo).max()) / 200
    assert exact <= grid + 1e-7
    seq = build_fc(2, [6, 5], 3, seed)
    lip = math.prod(float(torch.linalg.matrix_norm(m.weight, 2)) for m in seq if isinstance(m, torch.nn.Linear))
    assert grid - exact <= lip * float(A.norm(dim=1).max()) * spacing + 1e-7
    # every method is a lower bound, so proves unreachability only when the MILP's value is > 0
    lp = pt.RelaxedLP(net, x, box).solve_max(A, b)
    assert lp.status == "optimal"
    rows = float(row_bounds(net, x, box, A, b)[0])
    joint = float(conjunction_bound(net, x, box, A, b, steps=15, until_positive=False)[0])
    for v in (rows, joint, lp.value):
        assert v <= exact + 1e-7
    assert joint >= rows - 1e-12
    # the MILP with a cutoff: a proof exactly when the min-max is above it
    tau = 1e-6
    cut = pt.ExactMILP(net, x, box).solve_max(A, b, cutoff=tau)
    if exact > tau + 1e-6:
        assert cut.status == "cutoff"
    elif exact < tau - 1e-6:
        assert cut.status == "target"
        p = torch.as_tensor(cut.z_in).reshape(1, 2)
        assert float((net.forward(p)[0] @ A.T - b).max()) <= tau + 1e-6


def test_joint_lambda_beats_every_row() -> None:
    """y0 <= 0 and y1 <= 0 jointly unreachable though each row alone is reachable: y = (x, -x) on [-1, 1]
    (max(x, -x) = |x| >= 0; with b = -0.5 the conjunction needs |x| <= -0.5)."""
    seq = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2)).to(DTYPE)
    with torch.no_grad():
        seq[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        seq[0].bias.zero_()
        seq[2].weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        seq[2].bias.zero_()
    net = pt.Network.from_torch(seq)
    box = pt.Box(torch.tensor([-1.0], dtype=DTYPE), torch.tensor([1.0], dtype=DTYPE))
    x = box.centre()
    A, b = torch.eye(2, dtype=DTYPE), torch.full((2,), -0.5, dtype=DTYPE)
    assert float(row_bounds(net, x, box, A, b)[0]) < 0  # each row alone is reachable
    assert float(conjunction_bound(net, x, box, A, b)[0]) > 0  # lambda = (1/2, 1/2): (y0 + y1)/2 = 0 > -0.5
    assert pt.RelaxedLP(net, x, box).solve_max(A, b).value > 0
    assert pt.ExactMILP(net, x, box).solve_max(A, b).value == pytest.approx(0.5, abs=1e-7)


def test_conjunction_shape_errors() -> None:
    net = pt.Network.from_torch(build_fc(2, [3], 2, 0))
    x = torch.zeros(1, 2, dtype=DTYPE)
    with pytest.raises(pt.ShapeMismatchError):
        conjunction_bound(net, x, pt.LinfBall(0.1), torch.ones(2, 3, dtype=DTYPE), torch.ones(2, dtype=DTYPE))
    with pytest.raises(pt.ShapeMismatchError):
        pt.RelaxedLP(net, x, pt.LinfBall(0.1)).solve_max(torch.ones(2, 2), torch.ones(3))
