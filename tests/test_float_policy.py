"""The float policy: a float32 certificate never rests on rounding (docs/float_policy.md).

Near-zero-margin networks: a random float32 network whose last bias is moved (one float32 step at a
time) until the exact minimum margin over a tiny l_inf ball sits just below -- or, for the controls,
just above -- zero.  The ball is so small that every unit is stable, so the network is affine on it and
the exact minimum is ``m(x) - eps ||grad m||_1``, computed here in float64 from the float32 weights by
autograd (independently of polytope's bounds).  The last layer is scaled by 1, 10, 100 and 1000.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from strategies import build_fc
from torch import nn

import polytope as pt
from polytope.bounds.dual import DualNetwork
from polytope.bounds.precision import ROUNDING_SAFETY, rounding_tolerance
from polytope.model.network import as_float64
from polytope.verifiers.robust import certificate_margins, worst_of

EPS = 2.0**-12  # exactly representable in float32: both precisions bound the same ball
SCALES = (1.0, 10.0, 100.0, 1000.0)
SEEDS = range(6)
METHODS = ("dual", "adaptive", "optimized", "cascade")


def exact_worst_margin(seq: nn.Sequential, x: torch.Tensor, y: int) -> float:
    """``min_{j != y} min_{||x' - x||_inf <= EPS} f_y - f_j`` in float64, for a network affine on the ball."""
    seq64 = copy.deepcopy(seq).double()
    x64 = x.double().clone().requires_grad_(True)
    worst = math.inf
    with torch.enable_grad():
        f = seq64(x64)[0]
        for j in range(f.shape[0]):
            if j != y:
                (g,) = torch.autograd.grad(f[y] - f[j], x64, retain_graph=True)
                worst = min(worst, float((f[y] - f[j]).detach()) - EPS * float(g.abs().sum()))
    return worst


def near_zero_network(seed: int, scale: float, sign: int) -> tuple[nn.Sequential, torch.Tensor, int, float]:
    """A float32 network, an input and its label whose exact worst margin is tiny and has the sign ``sign``."""
    seq = build_fc(20, [30, 30], 5, seed).float().requires_grad_(False)
    x = torch.rand(1, 20, generator=torch.Generator().manual_seed(seed))
    seq[-1].weight.mul_(scale)
    seq[-1].bias.mul_(scale)
    y = int(seq(x).argmax())
    f = seq(x)[0]
    j = min((k for k in range(f.shape[0]) if k != y), key=lambda k: float(f[y] - f[k]))
    bias = seq[-1].bias
    bias[j] += exact_worst_margin(seq, x, y)  # the worst margin is now about 0: f_y - f_j falls as b_j grows
    towards = torch.tensor(math.inf if sign < 0 else -math.inf)
    for _ in range(1000):
        worst = exact_worst_margin(seq, x, y)
        if worst != 0 and (worst < 0) == (sign < 0):
            return seq, x, y, worst
        bias[j] = torch.nextafter(bias[j], towards)
    raise AssertionError("no near-zero margin reached")


def all_stable(seq: nn.Sequential, x: torch.Tensor) -> bool:
    dual = DualNetwork(as_float64(pt.Network.from_torch(seq)), x.double(), pt.LinfBall(EPS))
    return all(not bool(((lo < 0) & (up > 0)).any()) for lo, up in dual.bounds)


@pytest.mark.parametrize("scale", SCALES)
def test_float32_never_certifies_a_negative_margin(scale: float) -> None:
    for seed in SEEDS:
        seq, x, y, worst = near_zero_network(seed, scale, sign=-1)
        assert all_stable(seq, x) and -1e-6 * scale < worst < 0
        net = pt.Network.from_torch(seq)
        for method in METHODS:
            assert not bool(pt.certify(net, x, pt.LinfBall(EPS), torch.tensor([y]), method=method)[0]), (
                seed, method, worst)
        assert float(pt.robust_loss(net, x, torch.tensor([y]), pt.LinfBall(EPS))[1]) == 1.0


@pytest.mark.parametrize("scale", SCALES)
def test_float32_certifies_a_positive_margin_of_the_same_size(scale: float) -> None:
    """The controls: a policy that never certified near zero would fail here."""
    for seed in SEEDS:
        seq, x, y, worst = near_zero_network(seed, scale, sign=+1)
        assert all_stable(seq, x) and 0 < worst < 1e-6 * scale
        net = pt.Network.from_torch(seq)
        for method in METHODS:
            assert bool(pt.certify(net, x, pt.LinfBall(EPS), torch.tensor([y]), method=method)[0]), (
                seed, method, worst)
        assert float(pt.robust_loss(net, x, torch.tensor([y]), pt.LinfBall(EPS))[1]) == 0.0


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("method", ["dual", "adaptive"])
def test_float32_error_is_far_below_the_tolerance(scale: float, method: str) -> None:
    """The calibration behind ROUNDING_SAFETY: on random networks (units unstable, outputs scaled by up to
    1000) the float32 margin bounds differ from float64 by less than ``tau / 8``."""
    for seed in SEEDS:
        seq = build_fc(30, [40, 40], 6, seed)
        with torch.no_grad():
            seq[-1].weight.mul_(scale)
            seq[-1].bias.mul_(scale)
        x = torch.rand(16, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        net64 = pt.Network.from_torch(seq)
        net32 = pt.Network.from_torch(copy.deepcopy(seq).float())
        x32 = x.float()
        x = x32.double()
        y = net64.forward(x).argmax(1)
        input_set = pt.LinfBall(0.05)
        m64 = certificate_margins(net64, x, y, input_set, method)
        m32 = torch.cat([certificate_margins(net32, x32[i:i + 1], y[i:i + 1], input_set, method) for i in range(16)])
        tau = rounding_tolerance(net32, x32, input_set).double()
        finite = torch.isfinite(m64)
        err = torch.where(finite, (m32.double() - m64).abs(), 0).amax(1)
        assert bool((err <= tau / 8).all()), float((err / tau).max())
        assert float(worst_of(m64, y).abs().max()) > 0  # margins are not all trivially zero


def test_float64_is_left_alone() -> None:
    seq = build_fc(5, [6], 3, 0)
    x = torch.rand(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert bool((rounding_tolerance(pt.Network.from_torch(seq), x, pt.LinfBall(0.1)) == 0).all())
    assert ROUNDING_SAFETY > 1
