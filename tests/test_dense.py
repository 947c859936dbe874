"""convex_adversarial's DenseSequential layout read by ``Network.from_torch`` (polytope/model/dense.py).

The two classes below are written here from the layout's description (Wong et al. 2018, "Scaling
provable adversarial defenses"), so these tests run without convex_adversarial; the comparison with
the library itself is tests/test_graph_reference.py.  float64 throughout.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polytope as pt

DTYPE = torch.float64


class Dense(nn.Module):
    """``sum_i Ws[i](xs[-len(Ws):][i])``, ``None`` sub-layers skipped."""

    def __init__(self, *ws: nn.Module | None) -> None:
        super().__init__()
        self.Ws = nn.ModuleList(list(ws))

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        terms = [w(x) for x, w in zip(xs[-len(self.Ws):], self.Ws, strict=False) if w is not None]
        return sum(terms)


class DenseSequential(nn.Sequential):
    """Every Dense layer reads all outputs so far, any other layer the latest one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [x]
        for layer in self:
            xs.append(layer(*xs) if "Dense" in type(layer).__name__ else layer(xs[-1]))
        return xs[-1]


def fc_residual() -> tuple[nn.Module, tuple[int, ...]]:
    """Skips from the input, from a pre-activation and from a ReLU output (layouts beyond the reference's)."""
    torch.manual_seed(0)
    net = DenseSequential(
        nn.Linear(6, 8), nn.ReLU(),
        Dense(nn.Linear(6, 8), None, nn.Linear(8, 8)), nn.ReLU(),  # x and the first ReLU's output
        Dense(nn.Sequential(), None, nn.Linear(8, 8)),  # the pre-activation of the layer before + W z
        nn.ReLU(), Dense(nn.Linear(8, 4)),
    )
    return net.to(DTYPE).eval(), (6,)


def conv_residual() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(1)
    net = DenseSequential(
        Dense(nn.Conv2d(1, 3, 3, padding=1)), nn.ReLU(),
        Dense(nn.Conv2d(3, 3, 3, padding=1)), nn.ReLU(),
        Dense(nn.Sequential(), None, nn.Conv2d(3, 3, 3, padding=1)), nn.ReLU(),
        nn.Flatten(), Dense(nn.Linear(3 * 6 * 6, 5)),
    )
    return net.to(DTYPE).eval(), (1, 6, 6)


NETS = {"fc": fc_residual, "conv": conv_residual}


@pytest.mark.parametrize("name", sorted(NETS))
def test_network_computes_the_dense_sequential(name: str) -> None:
    model, shape = NETS[name]()
    net = pt.Network.from_torch(model, input_shape=shape)
    assert net.module is model and net.is_graph
    x = torch.rand(5, *shape, dtype=DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(net.forward(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(NETS))
def test_bounds_hold_at_sampled_points(name: str) -> None:
    """Every pre-activation and every margin of points in the ball lie within the dual's bounds."""
    model, shape = NETS[name]()
    net = pt.Network.from_torch(model, input_shape=shape)
    x = torch.rand(3, *shape, dtype=DTYPE)
    eps = 0.1
    with torch.no_grad():
        dual = pt.DualNetwork(net, x, pt.LinfBall(eps))
        y = model(x).argmax(1)
        c = pt.margin_objective(y, 4 if name == "fc" else 5, DTYPE)
        j = dual.objective(c)
        for _ in range(20):
            pts = x + eps * (2 * torch.rand_like(x) - 1)
            for (lo, hi), zhat in zip(dual.bounds, net.pre_activations(pts)[:-1], strict=True):
                assert bool((lo <= zhat + 1e-9).all() and (zhat <= hi + 1e-9).all())
            out = model(pts)
            assert bool((j <= torch.einsum("bmn,bn->bm", c, out) + 1e-9).all())


def test_chain_dense_sequential_is_a_chain() -> None:
    """Without Dense layers the layout is a plain chain (nn.Sequential's forward computes the same)."""
    model = DenseSequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DTYPE)
    assert not pt.Network.from_torch(model).is_graph


def test_other_forward_is_refused() -> None:
    class DenseSequential(nn.Sequential):  # the name, but each Dense reads only the latest output
        pass

    model = DenseSequential(nn.Linear(4, 4), nn.ReLU(), Dense(nn.Linear(4, 4), None, nn.Linear(4, 4)), nn.ReLU(),
                            Dense(nn.Linear(4, 2))).to(DTYPE)
    x = torch.rand(2, 4, dtype=DTYPE)
    model(x)  # it runs, computing something else than the layout
    with pytest.raises(pt.UnsupportedLayerError, match="does not compute convex_adversarial's DenseSequential"):
        pt.Network.from_torch(model)


def test_dense_without_sublayers_is_refused() -> None:
    class DenseBlock(nn.Module):
        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return xs[-1]

    model = DenseSequential(nn.Linear(3, 4), nn.ReLU(), DenseBlock(), nn.Linear(4, 2)).to(DTYPE)
    with pytest.raises(pt.UnsupportedLayerError, match=r"layer 2 \(DenseBlock\) .* `Ws`"):
        pt.Network.from_torch(model)


def test_dense_of_nothing_is_refused() -> None:
    model = DenseSequential(nn.Linear(3, 4), nn.ReLU(), Dense(None, None), nn.Linear(4, 2)).to(DTYPE)
    with pytest.raises(pt.UnsupportedLayerError, match=r"layer 2 \(Dense\) applies no sub-layer"):
        pt.Network.from_torch(model)


def test_float64_copy_keeps_the_layout() -> None:
    """``as_float64`` rebuilds a float64 network from the module: the DenseSequential again."""
    from polytope.model.network import as_float64

    model, shape = conv_residual()
    net32 = pt.Network.from_torch(model.float(), input_shape=shape)
    net64 = as_float64(net32)
    assert type(net64.module).__name__ == "DenseSequential"
    x = torch.rand(2, *shape, dtype=DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(net64.forward(x), net64.module(x), rtol=1e-12, atol=1e-12)
