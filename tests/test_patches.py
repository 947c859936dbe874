"""The receptive-field kernels of the dual (polytope/bounds/patches.py) against plain dense computations.

The cell pass (two convolutions, linear) must give the same patches, bias and ReLU terms as the
generic patch pass; the tiled fold must equal summing the patches as dense input-sized rows.
Geometries are drawn widely (kernel not a multiple of the stride, padding, several input
channels, strides that leave input rows unread) since each changes the index arithmetic.
"""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import DTYPE, fast, seeds
from torch import nn

import polytope as pt
from polytope.bounds.patches import fold_patches, patch_backward
from polytope.model.network import Conv2dOp

geometry = st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(0, 2))  # kernel, stride, padding


def _two_convs(data: st.DataObject) -> tuple[list[Conv2dOp], tuple[int, int, int], tuple[int, int, int], int]:
    """Two random square convolutions, the input and output shapes, and the middle layer's size."""
    (k0, s0, p0), (k1, s1, p1) = data.draw(geometry), data.draw(geometry)
    c0, c1, c2 = (data.draw(st.integers(1, 3)) for _ in range(3))
    size = data.draw(st.integers(max(k0, 3), 9))
    gen = torch.Generator().manual_seed(data.draw(seeds))
    conv0 = nn.Conv2d(c0, c1, k0, s0, min(p0, k0 - 1)).to(DTYPE)
    conv1 = nn.Conv2d(c1, c2, k1, s1, min(p1, k1 - 1)).to(DTYPE)
    with torch.no_grad():
        for p in (*conv0.parameters(), *conv1.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE))
    h1 = (size + 2 * conv0.padding[0] - k0) // s0 + 1
    h2 = (h1 + 2 * conv1.padding[0] - k1) // s1 + 1
    assume(h2 >= 1)
    return [Conv2dOp(conv0), Conv2dOp(conv1)], (c0, size, size), (c2, h2, h2), h1


@given(data=st.data(), sign=st.sampled_from([1.0, -1.0]))
@fast(40)
def test_cell_pass_equals_the_generic_patch_pass(data, sign):
    ops, in_shape, out_shape, h1 = _two_convs(data)
    gen = torch.Generator().manual_seed(data.draw(seeds))
    shape1 = (2, ops[0].module.out_channels, h1, h1)
    d = torch.rand(shape1, generator=gen, dtype=DTYPE) * (torch.rand(shape1, generator=gen, dtype=DTYPE) > 0.4)
    low = -torch.rand(shape1, generator=gen, dtype=DTYPE) * (d > 0) * (d < 1)
    cells = patch_backward(ops, out_shape, [d], [low], None, sign)  # linear: the cell pass
    generic = patch_backward(ops, out_shape, [d], [low], [d], sign)  # alpha = d through the generic loop
    assert cells.geometry == generic.geometry
    torch.testing.assert_close(cells.nu_hat_1, generic.nu_hat_1, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cells.bias, generic.bias, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cells.relu, generic.relu, atol=1e-12, rtol=1e-12)
    # the patches themselves: W_1^T diag(d) W_2^T e_u, from dense adjoint convolutions
    units = out_shape[0] * out_shape[1] * out_shape[2]
    eye = torch.eye(units, dtype=DTYPE).reshape(units, *out_shape)
    nu = d[0] * ops[1].transpose(-sign * eye, (shape1[1], h1, h1))
    dense = ops[0].transpose(nu, in_shape).flatten(1)  # (U, n_in) in (C, H, W) unit order
    rows = _placed(cells, in_shape, out_shape)[0]
    torch.testing.assert_close(rows, dense, atol=1e-12, rtol=1e-12)


def _placed(terms, in_shape, out_shape) -> torch.Tensor:
    """Every unit's patch written into the (zero-padded, then cropped) input: ``(B, U, n_in)``."""
    c2, h2, w2 = out_shape
    c0, h, w = in_shape
    g = terms.geometry
    batch = terms.nu_hat_1.shape[0]
    patches = terms.nu_hat_1.reshape(batch, h2, w2, c0, g.size, g.size, c2)
    full = max((h2 - 1) * g.stride + g.size, h + g.padding)
    out = torch.zeros(batch, c2, h2, w2, c0, full, full, dtype=DTYPE)
    for i in range(h2):
        for j in range(w2):
            window = out[:, :, i, j, :, i * g.stride:i * g.stride + g.size, j * g.stride:j * g.stride + g.size]
            window += patches[:, i, j].permute(0, 4, 1, 2, 3)
    out = out[..., g.padding:g.padding + h, g.padding:g.padding + w]
    return out.reshape(batch, c2 * h2 * w2, -1)


@given(data=st.data(), m=st.integers(1, 4), batch=st.integers(1, 11))
@fast(25)
def test_fold_equals_summing_dense_rows(data, m, batch):
    ops, in_shape, out_shape, h1 = _two_convs(data)
    gen = torch.Generator().manual_seed(data.draw(seeds))
    shape1 = (batch, ops[0].module.out_channels, h1, h1)
    d = torch.rand(shape1, generator=gen, dtype=DTYPE)
    terms = patch_backward(ops, out_shape, [d], [torch.zeros_like(d)], None, 1.0)
    w = torch.randn(batch, m, *out_shape, generator=gen, dtype=DTYPE)
    folded = fold_patches(w.flatten(3).permute(0, 3, 2, 1), terms, in_shape, out_shape[1:])
    assert folded.shape == (batch, m, *in_shape)
    expected = w.flatten(2) @ _placed(terms, in_shape, out_shape)
    torch.testing.assert_close(folded.flatten(2), expected, atol=1e-11, rtol=1e-11)


def test_cached_cell_plans_follow_in_place_weight_changes():
    """The cell matrices are reused between calls; an in-place weight update must not reuse stale ones."""
    gen = torch.Generator().manual_seed(3)
    seq = nn.Sequential(nn.Conv2d(1, 3, 4, 2, 1), nn.ReLU(), nn.Conv2d(3, 4, 4, 2, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).to(DTYPE)
    x = torch.rand(2, 1, 8, 8, generator=gen, dtype=DTYPE)
    c = torch.randn(2, 3, 3, generator=gen, dtype=DTYPE)
    net = pt.Network.from_torch(seq)
    with torch.no_grad():
        before = pt.DualNetwork(net, x, pt.LinfBall(0.2)).objective(c)
        seq[2].weight.mul_(1.5)
        after = pt.DualNetwork(net, x, pt.LinfBall(0.2)).objective(c)
        plain = pt.DualNetwork(net, x, pt.LinfBall(0.2), order="backward").objective(c)
    torch.testing.assert_close(after, plain, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(before, after)


def test_cached_constants_from_inference_mode_do_not_break_autograd():
    """Constants built under ``torch.inference_mode`` are not cached: a later pass that needs
    gradients (here with respect to the input, frozen weights) must still work."""
    gen = torch.Generator().manual_seed(5)
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 3, 2, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 2 * 2, 2)).to(DTYPE).requires_grad_(False)
    net = pt.Network.from_torch(seq)
    x = torch.rand(2, 1, 8, 8, generator=gen, dtype=DTYPE)
    c = torch.randn(2, 2, 2, generator=gen, dtype=DTYPE)
    with torch.inference_mode():
        frozen = pt.DualNetwork(net, x, pt.LinfBall(0.2)).objective(c)
    x = x.clone().requires_grad_(True)
    j = pt.DualNetwork(net, x, pt.LinfBall(0.2)).objective(c)
    (grad,) = torch.autograd.grad(j.sum(), x)
    torch.testing.assert_close(j.detach(), frozen, atol=1e-12, rtol=1e-12)
    assert torch.isfinite(grad).all()
