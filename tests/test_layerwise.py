"""Tests of polytope.bounds.layerwise: the naive interval bounds of Appendix B.1 (eq. 42)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polytope as pt
from polytope.bounds.layerwise import dense_matrix, interval_radius, layerwise_bounds
from polytope.solvers.polygons import random_network

SETS = [pt.LinfBall(0.1), pt.BoxedLinfBall(0.1), pt.L2Ball(0.2), pt.L1Ball(0.3)]


def _mlp(seed: int = 0, widths: tuple[int, ...] = (4, 30, 30, 30, 3)) -> pt.Network:
    return pt.Network.from_torch(random_network(widths, seed=seed))


def _conv_net() -> pt.Network:
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        bn,
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 20),
        nn.Linear(20, 10),  # no ReLU in between: a composite layer with two mixing ops
        nn.ReLU(),
        nn.Linear(10, 3),
    ).double()
    return pt.Network.from_torch(model.eval())


def _sample(input_set: pt.InputSet, x: torch.Tensor, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return input_set.sample(x, n, generator=gen).flatten(0, 1)


@pytest.mark.parametrize("input_set", SETS, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("make_net", [_mlp, _conv_net], ids=["mlp", "conv"])
def test_bounds_contain_sampled_preactivations(make_net, input_set: pt.InputSet) -> None:
    net = make_net()
    shape = (4,) if make_net is _mlp else (1, 8, 8)
    x = torch.rand(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lw = layerwise_bounds(net, x, input_set)
    pts = _sample(input_set, x, 500)  # (2 * 500, *shape)
    with torch.no_grad():
        acts = net.pre_activations(pts)
    for (lo, up), z in zip([*lw.bounds, lw.output], acts, strict=True):
        z = z.reshape(2, 500, *z.shape[1:])
        assert (z >= lo.unsqueeze(1) - 1e-9).all()
        assert (z <= up.unsqueeze(1) + 1e-9).all()


@pytest.mark.parametrize("input_set", SETS, ids=lambda s: type(s).__name__)
def test_first_layer_equals_dual(input_set: pt.InputSet) -> None:
    """'In the first hidden layer, they naturally match our bounds exactly' (Appendix B.1)."""
    for net, shape in ((_mlp(), (4,)), (_conv_net(), (1, 8, 8))):
        x = torch.rand(3, *shape, dtype=torch.float64)
        dual = pt.DualNetwork(net, x, input_set)
        lw = layerwise_bounds(net, x, input_set)
        torch.testing.assert_close(lw.bounds[0][0], dual.bounds[0][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lw.bounds[0][1], dual.bounds[0][1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_bounds_are_tighter(seed: int) -> None:
    """On random wide networks the dual bounds lie inside the layerwise ones (empirically:
    with fixed slopes this is not a theorem, see the single-ReLU counterexample below)."""
    net = _mlp(seed, (2, 100, 100, 100, 2))
    x = torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for eps in (0.05, 0.1, 0.25):
        dual = pt.DualNetwork(net, x, pt.LinfBall(eps))
        lw = layerwise_bounds(net, x, pt.LinfBall(eps))
        pairs = [*zip(lw.bounds, dual.bounds, strict=True), (lw.output, dual.output_bounds())]
        for (l_lo, l_up), (d_lo, d_up) in pairs:
            assert (l_lo <= d_lo + 1e-9).all()
            assert (l_up >= d_up - 1e-9).all()
        width_lw = lw.output[1] - lw.output[0]
        width_dual = dual.output_bounds()[1] - dual.output_bounds()[0]
        assert (width_lw > 10 * width_dual).all()  # eq. 42 vs eq. 41: the naive bounds are vacuous


def test_single_relu_layerwise_can_beat_fixed_slope_dual() -> None:
    """``f(x) = relu(x)`` on ``[-1, 1]``: the interval is ``[0, 1]``; the dual with ``alpha = d``
    uses the lower line ``z >= x / 2`` and only proves ``f >= -1/2``."""
    lin1, lin2 = nn.Linear(1, 1).double(), nn.Linear(1, 1).double()
    with torch.no_grad():
        lin1.weight.fill_(1.0)
        lin1.bias.zero_()
        lin2.weight.fill_(1.0)
        lin2.bias.zero_()
    net = pt.Network.from_torch(nn.Sequential(lin1, nn.ReLU(), lin2))
    x = torch.zeros(1, 1, dtype=torch.float64)
    lw = layerwise_bounds(net, x, pt.LinfBall(1.0))
    dual = pt.DualNetwork(net, x, pt.LinfBall(1.0))
    assert float(lw.output[0].detach()) == pytest.approx(0.0)
    assert float(dual.output_bounds()[0].detach()) == pytest.approx(-0.5)


def test_composite_layer_radius_is_exact() -> None:
    """``|W_2 W_1| r``, not the looser ``|W_2| |W_1| r`` of composing ``abs_linear``."""
    net = _conv_net()
    layer = net.layers[1]  # Flatten is in layer 0; layer 1 is Linear(64, 20) -> Linear(20, 10)
    in_shape = net.shapes((1, 8, 8))[1]
    r = torch.rand(2, *in_shape, dtype=torch.float64)
    w = dense_matrix(layer, in_shape, r)
    exact = r.flatten(1) @ w.abs()
    torch.testing.assert_close(interval_radius(layer, r, in_shape), exact)
    assert (layer.abs_linear(r) >= exact - 1e-12).all()  # sound but looser
    assert (layer.abs_linear(r) > exact + 1e-6).any()


def test_shapes_match_dual_and_gradients_flow() -> None:
    net = _conv_net()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    dual = pt.DualNetwork(net, x, pt.LinfBall(0.05))
    lw = layerwise_bounds(net, x, pt.LinfBall(0.05))
    assert [b[0].shape for b in lw.bounds] == [b[0].shape for b in dual.bounds]
    assert lw.output[0].shape == (2, 3)
    (lw.output[1] - lw.output[0]).sum().backward()
    assert all(p.grad is not None for p in net.module.parameters() if p.requires_grad)


def test_zero_epsilon_is_the_forward_pass() -> None:
    net = _mlp()
    x = torch.rand(3, 4, dtype=torch.float64)
    lw = layerwise_bounds(net, x, pt.LinfBall(0.0))
    for (lo, up), z in zip([*lw.bounds, lw.output], net.pre_activations(x), strict=True):
        torch.testing.assert_close(lo, z)
        torch.testing.assert_close(up, z)
