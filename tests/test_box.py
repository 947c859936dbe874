"""``pt.Box``: per-coordinate input bounds accepted by every method (float64 throughout)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import polytope as pt
from polytope.bounds.layerwise import layerwise_bounds
from polytope.bounds.slopes import optimize_slopes
from polytope.verifiers.attacks import pgd_in_set
from tests.strategies import ConvSpec, build_conv, build_fc, fast

DTYPE = torch.float64
seeds = st.integers(0, 2**31 - 1)


def _random_box(shape: tuple[int, ...], seed: int, batch: int | None = None) -> pt.Box:
    g = torch.Generator().manual_seed(seed)
    full = shape if batch is None else (batch, *shape)
    lo = torch.rand(full, generator=g, dtype=DTYPE) - 0.5
    width = 0.6 * torch.rand(full, generator=g, dtype=DTYPE)
    return pt.Box(lo, lo + width, batched=batch is not None)


def _nets(seed: int):
    return [
        (pt.Network.from_torch(build_fc(4, [8, 6], 3, seed)), (4,)),
        (pt.Network.from_torch(build_conv((1, 5, 5), [ConvSpec(3, 3, 1, 1, True)], [6], 3, seed)), (1, 5, 5)),
    ]


@fast(6)
@given(seeds)
def test_box_bounds_sound_against_sampling(seed: int) -> None:
    """dual / adaptive / optimized bounds on ``c^T f`` over a Box never exceed a sampled value."""
    for net, shape in _nets(seed):
        box = _random_box(shape, seed, batch=2)
        x = box.centre()
        c = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
        pts = box.sample(x, 256, torch.Generator().manual_seed(seed + 1))
        assert bool(((box.lo.unsqueeze(1) <= pts) & (pts <= box.hi.unsqueeze(1))).all())
        vals = torch.einsum("bmo,bno->bmn", c, net.forward(pts.flatten(0, 1)).reshape(2, 256, 3)).amin(2)
        for slopes in ("fixed", "adaptive"):
            j = pt.DualNetwork(net, x, box, slopes=slopes).objective(c)
            assert bool((j <= vals + 1e-9).all()), slopes
        j_opt, _ = optimize_slopes(net, x, box, c, steps=5)
        assert bool((j_opt <= vals + 1e-9).all())
        lw = layerwise_bounds(net, x, box).output
        out = net.forward(pts.flatten(0, 1)).reshape(2, 256, 3)
        assert bool((lw[0].unsqueeze(1) <= out + 1e-9).all() and (out <= lw[1].unsqueeze(1) + 1e-9).all())


@fast(6)
@given(seeds)
def test_box_equals_linf_ball_where_they_coincide(seed: int) -> None:
    """A Box equal to ``[x - eps, x + eps]`` gives the LinfBall's dual bounds, LP and MILP values."""
    net = pt.Network.from_torch(build_fc(3, [6, 5], 2, seed))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, generator=g, dtype=DTYPE)
    eps = 0.2
    box, ball = pt.Box(x[0] - eps, x[0] + eps), pt.LinfBall(eps)
    c = torch.tensor([[1.0, -1.0]], dtype=DTYPE)
    torch.testing.assert_close(pt.DualNetwork(net, x, box).objective(c), pt.DualNetwork(net, x, ball).objective(c))
    lp_box, lp_ball = pt.RelaxedLP(net, x, box).solve(c[0]), pt.RelaxedLP(net, x, ball).solve(c[0])
    assert lp_box.value == pytest.approx(lp_ball.value, abs=1e-7)
    milp_box, milp_ball = pt.ExactMILP(net, x, box).solve(c[0]), pt.ExactMILP(net, x, ball).solve(c[0])
    assert milp_box.value == pytest.approx(milp_ball.value, abs=1e-7)
    # a box inside a clipped domain equals the BoxedLinfBall
    clipped = pt.BoxedLinfBall(eps, lo=float(x.min()), hi=1.0)
    lo, hi = clipped.box(x)
    lp_clip = pt.RelaxedLP(net, x, clipped, bounds="lp-all").solve(c[0])
    lp_box2 = pt.RelaxedLP(net, x, pt.Box(lo[0], hi[0]), bounds="lp-all").solve(c[0])
    assert lp_clip.value == pytest.approx(lp_box2.value, abs=1e-7)


@fast(6)
@given(seeds)
def test_box_dual_le_lp_le_milp_le_samples(seed: int) -> None:
    net = pt.Network.from_torch(build_fc(2, [5, 4], 2, seed))
    box = _random_box((2,), seed)
    x = box.centre()
    c = torch.tensor([1.0, -0.5], dtype=DTYPE)
    dual = float(pt.DualNetwork(net, x, box).objective(c.reshape(1, 2)).detach()[0, 0])
    lp = pt.RelaxedLP(net, x, box).solve(c)
    milp = pt.ExactMILP(net, x, box).solve(c)
    pts = box.sample(x, 4000, torch.Generator().manual_seed(seed))[0]
    sampled = float((net.forward(pts) @ c).min())
    assert dual <= lp.value + 1e-7 <= milp.value + 2e-7 <= sampled + 3e-7
    assert box.contains(x, torch.as_tensor(milp.z_in).reshape(1, 2), tol=1e-8).all()


def test_box_cascade_certify_and_attack() -> None:
    net = pt.Network.from_torch(build_fc(3, [6, 5], 3, 7))
    box = _random_box((3,), 3, batch=3)
    x = box.centre()
    y = net.forward(x).argmax(1)
    certs = {m: pt.certify(net, x, box, y, method=m) for m in ("dual", "optimized", "lp", "milp", "cascade")}
    for m in ("dual", "optimized", "lp"):
        assert bool((certs[m] <= certs["milp"]).all()), m  # nothing a weaker method proves is refuted
    assert bool((certs["cascade"] == certs["milp"]).all())
    adv = pgd_in_set(net.forward, x, y, box, steps=10, step_size=float(box.radius(x).max()) / 5)
    assert bool(box.contains(x, adv).all())
    sub = box.subset(3, [2])
    assert torch.equal(sub.lo, box.lo[[2]])


def test_box_float32_rounding_never_shrinks_the_box() -> None:
    lo = torch.tensor([0.1, 1 / 3], dtype=DTYPE)
    box = pt.Box(lo, lo + 0.1)
    l32, h32 = box.box(torch.zeros(1, 2, dtype=torch.float32))
    assert bool((l32.double() <= lo).all() and (h32.double() >= lo + 0.1).all())


@pytest.mark.parametrize(
    ("lo", "hi", "err"),
    [
        ([0.0, 1.0], [1.0, 0.5], pt.InvalidInputError),
        ([0.0, float("nan")], [1.0, 1.0], pt.InvalidInputError),
        ([0.0, 0.0], [1.0, float("inf")], pt.InvalidInputError),
        ([0.0, 0.0], [1.0, 1.0, 1.0], pt.ShapeMismatchError),
    ],
)
def test_box_named_errors(lo, hi, err) -> None:
    with pytest.raises(err):
        pt.Box(np.array(lo), np.array(hi))


def test_box_shape_mismatch_with_the_input() -> None:
    net = pt.Network.from_torch(build_fc(3, [4], 2, 0))
    with pytest.raises(pt.ShapeMismatchError):
        pt.DualNetwork(net, torch.zeros(1, 3, dtype=DTYPE), pt.Box(torch.zeros(4), torch.ones(4)))


def test_box_float32_certify_follows_the_float_policy() -> None:
    """A float32 network with a float64 Box: certify runs (its near-zero rows are recomputed in float64 through
    ``Box.subset``) and never certifies what float64 does not."""
    seq = build_fc(3, [6, 5], 3, 5)
    box = _random_box((3,), 9, batch=4)
    x = box.centre()
    net64 = pt.Network.from_torch(seq)
    net32 = pt.Network.from_torch(copy.deepcopy(seq).float())
    y = net64.forward(x).argmax(1)
    c32 = pt.certify(net32, x.float(), box, y)
    c64 = pt.certify(net64, x, box, y)
    assert bool((c32 <= c64).all())


def test_box_polygons() -> None:
    """The enumerated polytope of a 2-D Box lies inside the dual polygon (a planar 2 -> 2 network)."""
    from polytope.solvers.polygons import distance_to_polygon, dual_polygon, true_polytope

    net = pt.Network.from_torch(build_fc(2, [8], 2, 4))
    box = pt.Box(torch.tensor([-0.3, 0.1], dtype=DTYPE), torch.tensor([0.2, 0.4], dtype=DTYPE))
    x = box.centre()
    true = true_polytope(net, x, box, n_side=21, n_boundary=20)
    outer = dual_polygon(net, x, box, k=16).outer
    assert float(distance_to_polygon(true.grid_image, outer).max()) <= 1e-9
    assert np.allclose(true.input_box, [[-0.3, 0.1], [0.2, 0.4]])
