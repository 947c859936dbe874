"""polytope's graph dual against convex_adversarial 0.4.4 on its own residual networks (issue 21).

Wong et al. (2018, "Scaling provable adversarial defenses") bound residual networks written as a
``DenseSequential`` of ``Dense`` skip layers; polytope reads that layout (polytope/model/dense.py)
and compiles it to a chain with linear units (polytope/model/graph.py).  With the paper's fixed
slopes both compute the same dual, so on the same weights and inputs every ReLU layer's bounds
and the margin objective ``J`` agree up to rounding (float32: 1e-5, relative where large; float64:
1e-10), and so do robust losses and certified sets.  The networks keep to the layouts the
reference supports: every skip starts at the input of a ``Dense`` layer.

Skipped when convex_adversarial is not importable (``pip install convex_adversarial==0.4.4``, part
of the ``test`` extra; or put ``benchmarks/.ca-overlay`` from ``benchmarks/ref_env.py`` on PYTHONPATH).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polytope as pt

ca = pytest.importorskip(
    "convex_adversarial",
    reason="convex_adversarial (the reference, 0.4.4) is not installed: pip install convex_adversarial==0.4.4",
)
from convex_adversarial.dual_layers import DualReLU  # noqa: E402
from convex_adversarial.utils import Dense, DenseSequential  # noqa: E402

N_CLASSES = 10
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def fc_residual() -> tuple[nn.Module, tuple[int, ...]]:
    """Two residual blocks ``z + W relu(W' z)`` (one reaching back three layers) on a 12-16-...-10 net."""
    return DenseSequential(
        Dense(nn.Linear(12, 16)), nn.ReLU(),
        Dense(nn.Linear(16, 16)), nn.ReLU(),
        Dense(nn.Sequential(), None, nn.Linear(16, 16)), nn.ReLU(),
        Dense(nn.Linear(16, 16), None, None, None, nn.Linear(16, 16)), nn.ReLU(),
        Dense(nn.Linear(16, N_CLASSES)),
    ), (12,)


def conv_residual() -> tuple[nn.Module, tuple[int, ...]]:
    """The reference's residual block ``x + conv(relu(conv(x)))``, then a strided convolution and a linear head."""
    return DenseSequential(
        Dense(nn.Conv2d(1, 4, 3, padding=1)), nn.ReLU(),
        Dense(nn.Conv2d(4, 4, 3, padding=1)), nn.ReLU(),
        Dense(nn.Sequential(), None, nn.Conv2d(4, 4, 3, padding=1)), nn.ReLU(),
        Dense(nn.Conv2d(4, 8, 4, stride=2, padding=1)), nn.ReLU(),
        nn.Flatten(),
        Dense(nn.Linear(8 * 5 * 5, N_CLASSES)),
    ), (1, 10, 10)


def trained(build, shape: tuple[int, ...], seed: int) -> nn.Module:
    """``build``'s network after 150 Adam steps of cross-entropy on a synthetic task (labels linear in x)."""
    model, _ = build()
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(N_CLASSES, *shape, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        x = torch.rand(64, *shape, generator=gen)
        y = (x.flatten(1) @ teacher.flatten(1).T).argmax(1)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def network(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The test networks, built under a fixed seed: random weights, or quickly trained."""
    with torch.random.fork_rng():
        torch.manual_seed(21)
        if kind == "fc":
            model, shape = fc_residual()
        elif kind == "conv":
            model, shape = conv_residual()
        else:
            model, shape = trained(conv_residual, (1, 10, 10), 0), (1, 10, 10)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), shape


KINDS = ("fc", "conv", "conv-trained")
#: Radii at which each network certifies part of the batch (random weights are insensitive up to a sharp edge).
RADII = {"fc": (0.01, 0.18, 0.2, 0.22), "conv": (0.01, 0.07, 0.08, 0.09), "conv-trained": (0.003, 0.01, 0.03, 0.05)}


def inputs(model: nn.Module, shape: tuple[int, ...], n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points in ``[0, 1]`` and the model's predictions there (so small radii certify some)."""
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    return x, model(x).argmax(1)


def reference_relu_bounds(dual: ca.DualNetwork) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.zl, layer.zu) for layer in dual.dual_net if isinstance(layer, DualReLU)]


def ours_relu_bounds(net: pt.Network, dual: pt.DualNetwork) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each ReLU layer's bounds on its ReLU units only (the linear units a graph carries are dropped)."""
    out = []
    for i, (lo, hi) in enumerate(dual.bounds):
        mask = net.linear_mask(i)
        keep = slice(None) if mask is None else ~mask.flatten()
        out.append((lo.flatten(1)[:, keep], hi.flatten(1)[:, keep]))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
def test_bounds_and_objective_match_the_reference(kind: str, dtype: torch.dtype) -> None:
    model, shape = network(kind)
    model = model.to(dtype)
    net = pt.Network.from_torch(model, input_shape=shape)
    assert net.is_graph
    x, y = inputs(model, shape, 8, dtype)
    eps = 0.05
    c = pt.margin_objective(y, N_CLASSES, dtype)
    tol = TOL[dtype]
    with torch.no_grad():
        ours = pt.DualNetwork(net, x, pt.LinfBall(eps))
        ref = ca.DualNetwork(model, x, eps)
        theirs = reference_relu_bounds(ref)
        mine = ours_relu_bounds(net, ours)
        assert len(mine) == len(theirs)
        unstable = 0
        for (lo, hi), (zl, zu) in zip(mine, theirs, strict=True):
            torch.testing.assert_close(lo, zl.flatten(1), rtol=tol, atol=tol)
            torch.testing.assert_close(hi, zu.flatten(1), rtol=tol, atol=tol)
            unstable += int(((zl < 0) & (zu > 0)).sum())
        assert unstable > 0  # the relaxation is exercised, not only stable units
        torch.testing.assert_close(ours.objective(c), ref(c), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", KINDS)
def test_robust_loss_and_certified_sets_match_the_reference(kind: str) -> None:
    """float32, one batch of 50, four radii: same robust loss; same certified set away from ties."""
    model, shape = network(kind)
    net = pt.Network.from_torch(model, input_shape=shape)
    x, y = inputs(model, shape, 50, torch.float32)
    mixed = 0
    for eps in RADII[kind]:
        ball = pt.LinfBall(eps)
        with torch.no_grad():
            loss, _ = pt.robust_loss(net, x, y, ball)
            ref_loss, _ = ca.robust_loss(model, eps, x, y)
            _, ref_err = ca.robust_loss(model, eps, x, y, size_average=False)
            ours = pt.certify(net, x, ball, y=y)
            j = ca.DualNetwork(model, x, eps)(pt.margin_objective(y, N_CLASSES, torch.float32))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        worst = j.scatter(1, y[:, None], torch.inf).min(1).values
        # a worst margin within float32 rounding of 0 may fall either way (polytope settles it in float64)
        decided = worst.abs() > 1e-5 * (1 + float(j.abs().max()))
        assert torch.equal(ours[decided], ~ref_err[decided])
        mixed += 0 < int(ours[decided].sum()) < int(decided.sum())
    assert mixed >= 2  # the sets compared are neither empty nor the whole batch at most radii
