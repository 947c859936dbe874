"""Network.from_torch: canonicalisation (nested Sequential, consecutive affine layers, eval-mode
BatchNorm and Dropout) and the named errors for everything it cannot bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from strategies import (
    DTYPE,
    build_fc,
    fast,
    first_layer_rows,
    make_set,
    pre_activations,
    sample,
    seq_and_x,
)
from torch import nn

import polytope as pt


def assert_sound(seq: nn.Sequential, x: torch.Tensor, input_set: pt.InputSet, n: int = 3000) -> pt.DualNetwork:
    """Bounds of every ReLU layer contain the pre-activations at ``n`` sampled points; returns the dual."""
    dual = pt.DualNetwork(pt.Network.from_torch(seq), x, input_set)
    pts = sample(input_set, x, n, seed=1)
    with torch.no_grad():
        zs = pre_activations(seq, pts.flatten(0, 1))
    assert len(zs) == len(dual.bounds)
    for (lo, up), z in zip(dual.bounds, zs, strict=True):
        z = z.reshape(pts.shape[0], n, *z.shape[1:])
        assert (lo.detach().unsqueeze(1) <= z + 1e-9).all()
        assert (z <= up.detach().unsqueeze(1) + 1e-9).all()
    return dual


def _set_stats(bn: nn.modules.batchnorm._BatchNorm, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=gen, dtype=DTYPE))
        bn.running_var.copy_(torch.rand(n, generator=gen, dtype=DTYPE) + 0.3)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(n, generator=gen, dtype=DTYPE))  # negative scales too
            bn.bias.copy_(torch.randn(n, generator=gen, dtype=DTYPE))


@given(seq_and_x())
@fast(20)
def test_canonical_network_computes_the_module(pair):
    seq, x = pair
    net = pt.Network.from_torch(seq)
    assert net.n_relu == sum(isinstance(m, nn.ReLU) for m in seq)
    with torch.no_grad():
        torch.testing.assert_close(net.forward(x), seq(x), atol=1e-12, rtol=1e-12)
        for mine, theirs in zip(net.pre_activations(x)[:-1], pre_activations(seq, x), strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=1e-12)
    shapes = net.shapes(tuple(x.shape[1:]))
    assert shapes[0] == tuple(x.shape[1:]) and shapes[-1] == (seq(x).shape[1],)


def test_network_shares_the_module_parameters():
    seq = build_fc(3, [4], 2, seed=0)
    net = pt.Network.from_torch(seq)
    x = torch.rand(2, 3, dtype=DTYPE)
    with torch.no_grad():
        seq[2].bias.add_(1.0)
        torch.testing.assert_close(net.forward(x), seq(x))


def test_nested_sequential_equals_flat():
    flat = build_fc(4, [6, 5], 3, seed=3)
    nested = nn.Sequential(nn.Sequential(flat[0], nn.Sequential(flat[1])), nn.Sequential(flat[2], flat[3]), flat[4])
    x = torch.rand(3, 4, dtype=DTYPE)
    input_set = pt.LinfBall(0.2)
    a = pt.DualNetwork(pt.Network.from_torch(flat), x, input_set)
    b = assert_sound(nested, x, input_set)
    assert pt.Network.from_torch(nested).n_relu == 2
    for (la, ua), (lb, ub) in zip(a.bounds, b.bounds, strict=True):
        torch.testing.assert_close(la, lb, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(ua, ub, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", ["linf", "l2", "l1"])
def test_consecutive_linear_layers_are_one_affine_layer(kind):
    """``Linear -> Linear -> ReLU -> Linear -> Linear`` bounds as the merged network (exact interval)."""
    torch.manual_seed(0)
    l1, l2, l3, l4 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)
    seq = nn.Sequential(l1, l2, nn.ReLU(), l3, l4).to(DTYPE)
    merged = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(DTYPE)
    with torch.no_grad():
        merged[0].weight.copy_(l2.weight @ l1.weight)
        merged[0].bias.copy_(l2.weight @ l1.bias + l2.bias)
        merged[2].weight.copy_(l4.weight @ l3.weight)
        merged[2].bias.copy_(l4.weight @ l3.bias + l4.bias)
    x = torch.rand(3, 4, dtype=DTYPE)
    input_set = make_set(kind, 0.3)
    assert pt.Network.from_torch(seq).n_relu == 1
    a = assert_sound(seq, x, input_set)
    b = pt.DualNetwork(pt.Network.from_torch(merged), x, input_set)
    torch.testing.assert_close(a.bounds[0][0], b.bounds[0][0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a.bounds[0][1], b.bounds[0][1], atol=1e-12, rtol=1e-12)
    c = torch.randn(3, 2, 3, dtype=DTYPE)
    torch.testing.assert_close(a.objective(c), b.objective(c), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("kind", ["linf", "linf-box", "l2"])
def test_eval_batchnorm_is_folded(affine, kind):
    """Linear -> BN1d and Conv -> BN2d (and a BN first) bound like the hand-folded network."""
    torch.manual_seed(1)
    bn0, bn1, bn2 = nn.BatchNorm2d(2, affine=affine), nn.BatchNorm2d(3, affine=affine), nn.BatchNorm1d(5, affine=affine)
    # no padding: an input BN before a zero-padded convolution does not fold into its bias
    conv, lin1, lin2 = nn.Conv2d(2, 3, 3, stride=2), nn.Linear(12, 5), nn.Linear(5, 3)
    seq = nn.Sequential(bn0, conv, bn1, nn.ReLU(), nn.Flatten(), lin1, bn2, nn.ReLU(), lin2).to(DTYPE)
    for i, bn in enumerate((bn0, bn1, bn2)):
        _set_stats(bn, i)
    seq.eval()
    x = torch.rand(2, 2, 6, 6, dtype=DTYPE)
    net = pt.Network.from_torch(seq)
    with torch.no_grad():
        torch.testing.assert_close(net.forward(x), seq(x), atol=1e-12, rtol=1e-12)

    # fold by hand: y = s * (W x + b) + t, and the input BN into the convolution
    def scale_shift(bn):
        s = torch.rsqrt(bn.running_var + bn.eps)
        t = -bn.running_mean * s
        if bn.weight is not None:
            s, t = s * bn.weight, t * bn.weight + bn.bias
        return s.detach(), t.detach()

    s0, t0 = scale_shift(bn0)
    s1, t1 = scale_shift(bn1)
    s2, t2 = scale_shift(bn2)
    folded = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)
    ).to(DTYPE)
    with torch.no_grad():
        w = conv.weight * s0[None, :, None, None]
        b = conv.bias + (conv.weight * t0[None, :, None, None]).sum((1, 2, 3))
        folded[0].weight.copy_(w * s1[:, None, None, None])
        folded[0].bias.copy_(b * s1 + t1)
        folded[3].weight.copy_(lin1.weight * s2[:, None])
        folded[3].bias.copy_(lin1.bias * s2 + t2)
        folded[5].load_state_dict(lin2.state_dict())
        torch.testing.assert_close(folded(x), seq(x), atol=1e-10, rtol=1e-10)
    input_set = make_set(kind, 0.05)
    dual = assert_sound(seq, x, input_set)
    ref = pt.DualNetwork(pt.Network.from_torch(folded), x, input_set)
    for (la, ua), (lb, ub) in zip(dual.bounds, ref.bounds, strict=True):
        torch.testing.assert_close(la, lb, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(ua, ub, atol=1e-9, rtol=1e-9)
    c = torch.randn(2, 2, 3, dtype=DTYPE)
    torch.testing.assert_close(dual.objective(c), ref.objective(c), atol=1e-9, rtol=1e-9)


def test_first_layer_batchnorm_keeps_the_exact_interval():
    torch.manual_seed(2)
    seq = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).to(DTYPE)
    _set_stats(seq[1], 5)
    seq.eval()
    x = torch.rand(3, 4, dtype=DTYPE)
    dual = pt.DualNetwork(pt.Network.from_torch(seq), x, pt.LinfBall(0.1))
    a, b = first_layer_rows(seq, x)
    centre = x @ a.T + b
    radius = 0.1 * a.abs().sum(1)
    torch.testing.assert_close(dual.bounds[0][0], centre - radius, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dual.bounds[0][1], centre + radius, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "module",
    [nn.Dropout(0.5), nn.Dropout(0.0), nn.Identity(), nn.Dropout2d(0.5)],
    ids=["dropout", "dropout-p0", "identity", "dropout2d"],
)
def test_eval_mode_dropout_and_identity_are_the_identity(module):
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), module, nn.Linear(4, 2)).to(DTYPE).eval()
    x = torch.rand(2, 3, dtype=DTYPE)
    net = pt.Network.from_torch(seq)
    assert net.n_relu == 1
    torch.testing.assert_close(net.forward(x), seq(x))


@pytest.mark.parametrize(
    ("module", "index"),
    [
        (nn.Dropout(0.3), "2"),
        (nn.Dropout2d(0.3), "2"),
        (nn.BatchNorm1d(4), "2"),
        (nn.Sequential(nn.Identity(), nn.BatchNorm1d(4)), "2.1"),
    ],
    ids=["dropout", "dropout2d", "batchnorm", "nested-batchnorm"],
)
def test_training_mode_raises_model_mode_error(module, index):
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), module, nn.Linear(4, 2)).to(DTYPE).train()
    with pytest.raises(pt.ModelModeError, match=f"layer {index} "):
        pt.Network.from_torch(seq)


def test_batchnorm_without_running_stats_raises_model_mode_error():
    seq = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(pt.ModelModeError):
        pt.Network.from_torch(seq.to(DTYPE).eval())


@pytest.mark.parametrize(
    ("seq", "index", "kind"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), "1", "Tanh"),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2, 2)),
            "2",
            "AdaptiveMaxPool2d",
        ),
        (nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)), "1", "Sigmoid"),
        (
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU()), nn.Linear(4, 2)),
            "2.1",
            "LeakyReLU",
        ),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Hardtanh(), nn.Flatten(), nn.Linear(2, 2)), "1", "Hardtanh"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.LPPool2d(2, 2), nn.Flatten(), nn.Linear(2, 2)), "1", "LPPool2d"),
        (nn.Sequential(nn.Linear(4, 2), nn.Softmax(dim=1)), "1", "Softmax"),
    ],
    ids=["tanh", "adaptive-maxpool", "sigmoid", "nested-leakyrelu", "hardtanh", "lppool", "softmax"],
)
def test_unsupported_layer_names_its_index_and_type(seq, index, kind):
    with pytest.raises(pt.UnsupportedLayerError) as info:
        pt.Network.from_torch(seq, input_shape=(1, 4, 4) if isinstance(seq[0], nn.Conv2d) else None)
    message = str(info.value)
    assert f"layer {index} " in message and kind in message


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.AvgPool2d(2)], ids=["maxpool", "avgpool"])
def test_pooling_in_a_sequential_is_a_graph_that_needs_the_input_shape(pool):
    seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), pool, nn.Flatten(), nn.Linear(8, 2)).to(DTYPE)
    with pytest.raises(pt.ShapeMismatchError, match="input_shape"):
        pt.Network.from_torch(seq)
    net = pt.Network.from_torch(seq, input_shape=(1, 6, 6))
    x = torch.randn(5, 1, 6, 6, dtype=DTYPE)
    assert torch.allclose(net.forward(x), seq(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 2, 3, groups=2),
        nn.Conv2d(1, 2, 3, dilation=2),
        nn.Conv2d(1, 2, 3, padding="same"),
        nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
    ],
    ids=["groups", "dilation", "same-padding", "reflect-padding"],
)
def test_unsupported_convolution_options(conv):
    seq = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(pt.UnsupportedLayerError, match=r"layer 0 \(Conv2d\)"):
        pt.Network.from_torch(seq)


@pytest.mark.parametrize(
    "seq",
    [
        nn.Sequential(nn.ReLU(), nn.Linear(3, 2)),
        nn.Sequential(nn.Linear(3, 2), nn.ReLU()),
        nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.ReLU(), nn.Linear(3, 2)),
        nn.Sequential(nn.Flatten()),
        nn.Sequential(nn.Flatten(start_dim=2), nn.Linear(3, 2)),
    ],
    ids=["relu-first", "relu-last", "double-relu", "no-affine", "partial-flatten"],
)
def test_malformed_chains_raise(seq):
    with pytest.raises(pt.UnsupportedLayerError):
        pt.Network.from_torch(seq)


def test_a_single_layer_is_a_network_and_untraceable_models_are_named():
    linear = nn.Linear(3, 2).to(DTYPE)
    x = torch.randn(4, 3, dtype=DTYPE)
    assert torch.equal(pt.Network.from_torch(linear).forward(x), linear(x))

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # control flow on values: fx cannot trace it

    with pytest.raises(pt.UnsupportedLayerError, match=r"torch\.fx"):
        pt.Network.from_torch(Branchy())
    with pytest.raises(pt.UnsupportedLayerError, match=r"layer 0 \(Tanh\)"):
        pt.Network.from_torch(nn.Tanh())


@pytest.mark.parametrize(
    ("seq", "shape"),
    [
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (2, 4)),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (2, 1, 3)),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (3,)),
        (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)), (2, 1, 4, 4)),
        (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)), (2, 2, 5, 5)),
        (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)), (2, 2, 2, 2)),
        (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Linear(4, 2)), (2, 2, 4, 4)),
    ],
    ids=["width", "extra-dim", "unbatched", "channels", "flatten-size", "kernel-too-big", "non-vector-output"],
)
def test_input_shape_mismatch_raises(seq, shape):
    net = pt.Network.from_torch(seq.to(DTYPE))
    x = torch.rand(shape, dtype=DTYPE)
    with pytest.raises(pt.ShapeMismatchError):
        net.check_input(x)
    with pytest.raises(pt.ShapeMismatchError):
        pt.DualNetwork(net, x, pt.LinfBall(0.1))


@pytest.mark.parametrize(("model_dtype", "x_dtype"), [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_dtype_mismatch_raises(model_dtype, x_dtype):
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(model_dtype)
    net = pt.Network.from_torch(seq)
    x = torch.rand(2, 3, dtype=x_dtype)
    with pytest.raises(pt.PolytopeError, match=str(x_dtype).removeprefix("torch.")):
        pt.DualNetwork(net, x, pt.LinfBall(0.1))
    with pytest.raises(pt.PolytopeError):
        pt.certify(net, x, pt.LinfBall(0.1), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(
    "ops",
    [
        lambda: [nn.Linear(6, 4)],
        lambda: [nn.Flatten(), nn.Linear(6, 4)],
        lambda: [nn.BatchNorm1d(6)],
        lambda: [nn.Linear(6, 4, bias=False)],
    ],
    ids=["linear", "flatten-linear", "batchnorm", "linear-no-bias"],
)
def test_layer_interval_is_the_exact_box_image(ops):
    """``AffineLayer.interval`` of one op is the exact image of the box: attained at its corners."""
    torch.manual_seed(4)
    modules = [m.to(DTYPE) for m in ops()]
    for m in modules:
        if isinstance(m, nn.BatchNorm1d):
            _set_stats(m, 3)
            with torch.no_grad():
                m.weight.copy_(torch.tensor([1.0, -2.0, 0.5, -0.1, 3.0, 0.0], dtype=DTYPE))
    seq = nn.Sequential(*modules, nn.ReLU(), nn.Linear(modules[-1].weight.shape[0], 2).to(DTYPE)).eval()
    layer = pt.Network.from_torch(seq).layers[0]
    lo = torch.rand(2, 6, dtype=DTYPE) - 0.5
    hi = lo + torch.rand(2, 6, dtype=DTYPE)
    low, high = layer.interval(lo, hi)
    corners = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=DTYPE)] * 6)  # (64, 6)
    with torch.no_grad():
        values = torch.stack([nn.Sequential(*modules)(lo[b] + corners * (hi[b] - lo[b])) for b in range(2)])
    torch.testing.assert_close(low, values.min(1).values, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(high, values.max(1).values, atol=1e-12, rtol=1e-12)


def test_layer_interval_has_no_cancellation_on_huge_boxes():
    """A unit fed only by zero-width inputs gets its bias exactly, whatever the other inputs' width."""
    lin = nn.Linear(3, 2).to(DTYPE)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]], dtype=DTYPE))
        lin.bias.copy_(torch.tensor([0.1, 0.3], dtype=DTYPE))
    layer = pt.Network.from_torch(nn.Sequential(lin, nn.ReLU(), nn.Linear(2, 1).to(DTYPE))).layers[0]
    lo = torch.tensor([[0.0, 0.0, 0.0]], dtype=DTYPE)
    hi = torch.tensor([[0.0, 0.0, 3e10]], dtype=DTYPE)
    low, high = layer.interval(lo, hi)
    assert low[0, 0].item() == 0.1 and high[0, 0].item() == 0.1
    assert high[0, 1].item() == 0.3 + 6e10
