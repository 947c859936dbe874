"""Input sets: sampling, projection, the linear minimisation of Theorem 1's input term, validation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    DTYPE,
    SET_KINDS,
    fast,
    in_set,
    make_set,
    project,
    sample,
    seeds,
)

import polytope as pt


@st.composite
def set_problems(draw: st.DrawFn, per_example: bool | None = None):
    """``(input_set, x, kind)``: a batch of 1-3 inputs of shape (n,) or (C, H, W) in [0, 1] and a set."""
    shape = draw(st.sampled_from([(1,), (3,), (7,), (2, 3, 3)]))
    batch = draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(draw(seeds))
    x = torch.rand((batch, *shape), generator=gen, dtype=DTYPE)
    kind = draw(st.sampled_from(SET_KINDS))
    if per_example if per_example is not None else draw(st.booleans()):
        eps = torch.tensor([draw(st.floats(0.0, 0.6)) for _ in range(batch)], dtype=DTYPE)
    else:
        eps = draw(st.floats(0.0, 0.6))
    return make_set(kind, eps), x, kind


def _eps(input_set: pt.InputSet, x: torch.Tensor) -> torch.Tensor:
    e = input_set.eps
    if isinstance(e, torch.Tensor):
        return e.to(DTYPE)
    return torch.full((x.shape[0],), float(e), dtype=DTYPE)


def _argmin_point(input_set: pt.InputSet, kind: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The closed-form minimiser of ``<g, x'>`` over the set, ``(B, m, *in_shape)`` (from the norms)."""
    eps = _eps(input_set, x)[:, None, None]
    gf = g.flatten(2)
    xf = x.flatten(1).unsqueeze(1)
    if kind == "linf":
        p = xf - eps * gf.sign()
    elif kind == "linf-box":
        lo = (xf - eps).clamp(min=input_set.lo)
        hi = (xf + eps).clamp(max=input_set.hi)
        p = torch.where(gf > 0, lo, hi)
    elif kind == "l2":
        p = xf - eps * gf / gf.norm(dim=2, keepdim=True).clamp_min(1e-300)
    else:
        k = gf.abs().argmax(2, keepdim=True)
        p = xf - eps * torch.zeros_like(gf).scatter(2, k, 1.0) * gf.sign()
    return p.reshape(g.shape)


@given(set_problems(), seeds)
@fast(25)
def test_library_samples_lie_in_the_set(problem, seed):
    input_set, x, _ = problem
    gen = torch.Generator().manual_seed(seed)
    pts = input_set.sample(x, 64, generator=gen)
    assert pts.shape == (x.shape[0], 64, *x.shape[1:])
    assert pts.dtype == x.dtype
    assert in_set(input_set, x, pts).all()


@given(set_problems(), seeds)
@fast(25)
def test_projection_matches_independent_projection(problem, seed):
    input_set, x, _ = problem
    gen = torch.Generator().manual_seed(seed)
    n = 16
    far = x.unsqueeze(1) + 2 * torch.randn((x.shape[0], n, *x.shape[1:]), generator=gen, dtype=DTYPE)
    centre = x.unsqueeze(1).expand_as(far).flatten(0, 1)
    rep = replace(input_set, eps=_eps(input_set, x).repeat_interleave(n))
    got = rep.project(centre, far.flatten(0, 1)).reshape(far.shape)
    want = project(input_set, x, far)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    assert in_set(input_set, x, got).all()
    # a projection is idempotent
    again = rep.project(centre, got.flatten(0, 1)).reshape(far.shape)
    torch.testing.assert_close(again, got, atol=1e-12, rtol=1e-12)


@given(set_problems(), seeds)
@fast(25)
def test_min_linear_is_the_attained_minimum(problem, seed):
    input_set, x, kind = problem
    gen = torch.Generator().manual_seed(seed)
    m = 4
    g = torch.randn((x.shape[0], m, *x.shape[1:]), generator=gen, dtype=DTYPE)
    value = input_set.min_linear(x, g)
    assert value.shape == (x.shape[0], m)
    # attained at the closed-form minimiser, which lies in the set
    p = _argmin_point(input_set, kind, x, g)
    assert in_set(input_set, x, p).all()
    torch.testing.assert_close(value, (g.flatten(2) * p.flatten(2)).sum(2), atol=1e-10, rtol=1e-10)
    # and no sampled point does better
    pts = sample(input_set, x, 400, seed=seed)
    vals = torch.einsum("bmn,bkn->bmk", g.flatten(2), pts.flatten(2))
    assert (value[:, :, None] <= vals + 1e-10).all()


@given(set_problems(), seeds)
@fast(20)
def test_box_contains_the_set(problem, seed):
    input_set, x, kind = problem
    lo, hi = input_set.box(x)
    eps = _eps(input_set, x).reshape(-1, *([1] * (x.dim() - 1)))
    if kind == "linf":
        torch.testing.assert_close(lo, x - eps)
        torch.testing.assert_close(hi, x + eps)
    pts = sample(input_set, x, 300, seed=seed)
    assert (pts >= lo.unsqueeze(1) - 1e-12).all()
    assert (pts <= hi.unsqueeze(1) + 1e-12).all()


@given(set_problems(per_example=True), seeds)
@fast(15)
def test_per_example_eps_equals_separate_sets(problem, seed):
    input_set, x, kind = problem
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn((x.shape[0], 3, *x.shape[1:]), generator=gen, dtype=DTYPE)
    joint = input_set.min_linear(x, g)
    for i, e in enumerate(input_set.eps.tolist()):
        alone = make_set(kind, e).min_linear(x[i : i + 1], g[i : i + 1])
        torch.testing.assert_close(joint[i : i + 1], alone, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", SET_KINDS)
def test_zero_eps_is_the_point(kind):
    x = torch.rand(2, 5, dtype=DTYPE)
    s = make_set(kind, 0.0)
    pts = s.sample(x, 50)
    torch.testing.assert_close(pts, x.unsqueeze(1).expand_as(pts), atol=0, rtol=0)
    g = torch.randn(2, 3, 5, dtype=DTYPE)
    torch.testing.assert_close(s.min_linear(x, g), torch.einsum("bmn,bn->bm", g, x))


def test_linf_sample_includes_corners():
    x = torch.zeros(1, 4, dtype=DTYPE)
    pts = pt.LinfBall(0.25).sample(x, 400)
    at_corner = (pts.abs() == 0.25).all(-1)
    assert at_corner.sum() >= 50


@pytest.mark.parametrize("kind", SET_KINDS)
@pytest.mark.parametrize(
    "eps",
    [
        -0.1,
        math.nan,
        math.inf,
        -math.inf,
        "abc",
        torch.tensor([0.1, 0.2, 0.3]),
        torch.tensor([0.1, -0.1]),
        torch.tensor([0.1, math.nan]),
    ],
    ids=["negative", "nan", "inf", "-inf", "string", "wrong-length", "negative-entry", "nan-entry"],
)
def test_bad_epsilon_raises(kind, eps):
    x = torch.rand(2, 3, dtype=DTYPE)
    g = torch.randn(2, 1, 3, dtype=DTYPE)
    with pytest.raises(pt.InvalidEpsilonError):
        make_set(kind, eps).min_linear(x, g)
    with pytest.raises(pt.InvalidEpsilonError):
        make_set(kind, eps).box(x)


@pytest.mark.parametrize("kind", SET_KINDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises(kind, bad):
    x = torch.rand(2, 3, dtype=DTYPE)
    x[1, 2] = bad
    with pytest.raises(pt.InvalidInputError):
        make_set(kind, 0.1).validate(x)
    with pytest.raises(pt.InvalidInputError):
        make_set(kind, 0.1).min_linear(x, torch.randn(2, 1, 3, dtype=DTYPE))


def test_unbatched_input_raises():
    with pytest.raises(pt.InvalidInputError):
        pt.LinfBall(0.1).validate(torch.rand(3, dtype=DTYPE))


def test_boxed_ball_domain_validation():
    with pytest.raises(pt.InvalidInputError):
        pt.BoxedLinfBall(0.1, 1.0, 0.0)
    with pytest.raises(pt.InvalidInputError):
        pt.BoxedLinfBall(0.1, -math.inf, 1.0)
    x = torch.tensor([[0.5, 1.5]], dtype=DTYPE)  # 0.5 outside [0, 1]: farther than eps
    with pytest.raises(pt.InvalidInputError):
        pt.BoxedLinfBall(0.1, 0.0, 1.0).box(x)
    lo, hi = pt.BoxedLinfBall(0.6, 0.0, 1.0).box(x)
    torch.testing.assert_close(lo, torch.tensor([[0.0, 0.9]], dtype=DTYPE))
    torch.testing.assert_close(hi, torch.tensor([[1.0, 1.0]], dtype=DTYPE))


@given(set_problems(), seeds, st.floats(0.5, 1.5))
@fast(25)
def test_contains_agrees_with_the_norms(problem, seed, factor):
    """``contains`` is membership in the actual set (the ball, clipped to the domain box), not in its box."""
    input_set, x, _ = problem
    gen = torch.Generator().manual_seed(seed)
    lo, hi = input_set.box(x)
    # a point of the bounding box, moved along its direction from x to a multiple of the set's boundary
    corner = lo + torch.rand(x.shape, generator=gen, dtype=DTYPE) * (hi - lo)
    on_boundary = project(input_set, x, corner.unsqueeze(1))[:, 0]
    pts = x + factor * (on_boundary - x)
    expected = in_set(input_set, x, pts.unsqueeze(1), tol=0.0)[:, 0]
    clear = ~in_set(input_set, x, pts.unsqueeze(1), tol=1e-9)[:, 0] | in_set(input_set, x, pts.unsqueeze(1),
                                                                               tol=-1e-9)[:, 0]
    got = input_set.contains(x, pts)
    assert bool((got == expected)[clear].all())  # away from the boundary, where the two roundings may differ
    assert bool(input_set.contains(x, pts, tol=input_set.excess(x, pts)).all())
    assert bool(input_set.contains(x, input_set.project(x, pts), tol=1e-12).all())


@pytest.mark.parametrize(("kind", "norm"), [("l2", 2.0), ("l1", 1.0)])
def test_a_corner_of_the_box_is_outside_the_l2_and_l1_balls(kind, norm):
    x = torch.full((1, 16), 0.5, dtype=DTYPE)
    input_set = make_set(kind, 1.0)
    corner = input_set.box(x)[1]
    assert not bool(input_set.contains(x, corner, tol=1e-6)[0])
    assert float(input_set.excess(x, corner)[0]) == pytest.approx(float((corner - x).norm(p=norm)) - 1.0)
