"""Robust loss (Theorem 2), certificates (Corollaries 1 and 2) and certified radii (eq. 17)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    DTYPE,
    SET_KINDS,
    ConvSpec,
    build_conv,
    build_fc,
    cases,
    fast,
    make_set,
    pgd_minimize,
    sample,
    seeds,
)
from torch import nn

import polytope as pt


def labels(case, seed: int) -> torch.Tensor:
    """Half the examples get the predicted class, the others a random one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pred = case.seq(case.x).argmax(1)
    n_out = case.seq[-1].out_features
    rand = torch.randint(0, n_out, pred.shape, generator=gen)
    return torch.where(torch.rand(pred.shape, generator=gen) < 0.5, pred, rand)


def margin_objective(y: torch.Tensor, n: int) -> torch.Tensor:
    """Rows ``e_y - e_j``: ``c_j^T f = f_y - f_j`` (written here, not taken from polytope)."""
    eye = torch.eye(n, dtype=DTYPE)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def margins_by_definition(case, y: torch.Tensor, slopes: str = "fixed") -> torch.Tensor:
    dual = pt.DualNetwork(case.net, case.x, case.input_set, slopes=slopes)
    return dual.objective(margin_objective(y, case.seq[-1].out_features)).detach()


def worst_attacked_margin(case, y: torch.Tensor, seed: int) -> torch.Tensor:
    """The smallest ``f_y - f_j`` (``j != y``) found by sampling and PGD, per example."""
    n = case.seq[-1].out_features
    c = margin_objective(y, n)
    pts = sample(case.input_set, case.x, 2000, seed=seed)
    with torch.no_grad():
        f = case.seq(pts.flatten(0, 1)).reshape(pts.shape[0], pts.shape[1], n)
    sampled = torch.einsum("bmo,bko->bmk", c, f).amin(2)

    def fn(p):
        out = case.seq(p).reshape(case.x.shape[0], n, n)
        return torch.einsum("bmo,bmo->bm", c, out).repeat_interleave(n, 0).reshape(-1, n)

    attacked = pgd_minimize(fn, case.x, case.input_set, n, seed=seed)
    both = torch.minimum(sampled, attacked).scatter(1, y.unsqueeze(1), torch.inf)
    return both.amin(1)


# -- Theorem 2 -----------------------------------------------------------------------------------


@given(cases(max_batch=3), seeds, st.sampled_from(["fixed", "adaptive"]))
@fast(12)
def test_robust_loss_bounds_the_loss_in_the_set(case, seed, slopes):
    y = labels(case, seed)
    loss, err = pt.robust_loss(case.net, case.x, y, case.input_set, slopes=slopes)
    margins = margins_by_definition(case, y, slopes)
    # per example: CE(-J, y) >= max_{x'} CE(f(x'), y), at sampled points and PGD points
    robust = F.cross_entropy(-margins, y, reduction="none")
    torch.testing.assert_close(loss.detach(), robust.mean(), atol=1e-10, rtol=1e-10)
    pts = sample(case.input_set, case.x, 2000, seed=seed)
    n = pts.shape[1]
    with torch.no_grad():
        ce = F.cross_entropy(case.seq(pts.flatten(0, 1)), y.repeat_interleave(n), reduction="none")
    worst = ce.reshape(-1, n).amax(1)
    assert (robust >= worst - 1e-9).all()
    # the loss is increasing in every f_j - f_y, so the attacked margins bound it too
    attacked = worst_attacked_margin(case, y, seed)
    assert (margins.scatter(1, y.unsqueeze(1), torch.inf).amin(1) <= attacked + 1e-8).all()
    assert loss.item() >= worst.mean().item() - 1e-9
    assert 0.0 <= err.item() <= 1.0
    certified = (margins.scatter(1, y.unsqueeze(1), torch.inf) > 0).all(1)
    assert float(err) == pytest.approx(float((~certified).to(DTYPE).mean()))


@pytest.mark.parametrize("kind", SET_KINDS)
def test_robust_loss_at_zero_eps_is_the_clean_loss(kind):
    seq = build_fc(5, [7, 6], 4, seed=2)
    x = torch.rand(6, 5, dtype=DTYPE)
    y = torch.randint(0, 4, (6,))
    loss, _ = pt.robust_loss(pt.Network.from_torch(seq), x, y, make_set(kind, 0.0))
    torch.testing.assert_close(loss.detach(), F.cross_entropy(seq(x), y).detach(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", SET_KINDS)
@pytest.mark.parametrize("arch", ["fc", "conv"])
def test_robust_loss_is_differentiable(dtype, kind, arch):
    if arch == "fc":
        seq = build_fc(6, [8, 8], 3, seed=4)
        x = torch.rand(4, 6, dtype=DTYPE)
    else:
        seq = build_conv((2, 6, 6), [ConvSpec(3, 3, 2, 1, True), ConvSpec(4, 2, 1, 0, False)], [5], 3, seed=4)
        x = torch.rand(4, 2, 6, 6, dtype=DTYPE)
    seq = seq.to(dtype)
    x = x.to(dtype)
    y = torch.tensor([0, 1, 2, 0])
    eps = {"linf": 0.05, "linf-box": 0.05, "l2": 0.2, "l1": 0.5}[kind]
    loss, _ = pt.robust_loss(pt.Network.from_torch(seq), x, y, make_set(kind, eps))
    assert loss.dtype == dtype and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in seq.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    if dtype == torch.float64:
        # the gradient is the derivative of the loss: a central difference along it agrees
        with torch.no_grad():
            direction = [g / (sum(float(h.pow(2).sum()) for h in grads) ** 0.5) for g in grads]
            values = []
            for h in (1e-6, -1e-6):
                for p, d in zip(seq.parameters(), direction, strict=True):
                    p.add_(h * d)
                values.append(float(pt.robust_loss(pt.Network.from_torch(seq), x, y, make_set(kind, eps))[0]))
                for p, d in zip(seq.parameters(), direction, strict=True):
                    p.sub_(h * d)
        slope = (values[0] - values[1]) / 2e-6
        norm = sum(float(g.pow(2).sum()) for g in grads) ** 0.5
        assert slope == pytest.approx(norm, rel=1e-4, abs=1e-7)


# -- Corollaries 1 and 2 -------------------------------------------------------------------------


@given(cases(max_batch=3), seeds, st.sampled_from(["dual", "adaptive"]))
@fast(15)
def test_certify_matches_corollary_1_and_certified_points_are_robust(case, seed, method):
    y = labels(case, seed)
    ok = pt.certify(case.net, case.x, case.input_set, y, method=method)
    assert ok.dtype == torch.bool and ok.shape == y.shape
    margins = margins_by_definition(case, y, "fixed" if method == "dual" else "adaptive")
    definition = (margins.scatter(1, y.unsqueeze(1), torch.inf) > 0).all(1)
    assert torch.equal(ok, definition)
    torch.testing.assert_close(
        pt.margin_bounds(case.net, case.x, y, case.input_set, "fixed" if method == "dual" else "adaptive"),
        margins,
        atol=1e-12,
        rtol=1e-12,
    )
    if ok.any():
        # no point of the set found by sampling or PGD is misclassified (or even tied)
        assert (worst_attacked_margin(case, y, seed)[ok] > 0).all()


@given(cases(max_batch=4), st.sampled_from(["dual", "adaptive"]))
@fast(10)
def test_corollary_2_uses_the_prediction(case, method):
    with torch.no_grad():
        pred = case.seq(case.x).argmax(1)
    got = pt.certify(case.net, case.x, case.input_set, method=method)
    assert torch.equal(got, pt.certify(case.net, case.x, case.input_set, pred, method=method))


def test_certify_extremes():
    seq = build_fc(4, [8, 8], 3, seed=6)
    x = torch.rand(8, 4, dtype=DTYPE)
    net = pt.Network.from_torch(seq)
    with torch.no_grad():
        logits = seq(x)
    pred = logits.argmax(1)
    assert pt.certify(net, x, pt.LinfBall(1e-7), pred).all()  # generic nets have no ties at x
    assert not pt.certify(net, x, pt.LinfBall(50.0), pred).any()
    wrong = (pred + 1) % 3
    assert not pt.certify(net, x, pt.LinfBall(0.0), wrong).any()
    # a tie is not certified (the margin must be > 0)
    tie = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).to(DTYPE)
    with torch.no_grad():
        tie[0].weight.copy_(torch.eye(2, dtype=DTYPE))
        tie[0].bias.zero_()
        tie[2].weight.copy_(torch.ones(2, 2, dtype=DTYPE))
        tie[2].bias.zero_()
    assert not pt.certify(
        pt.Network.from_torch(tie), torch.ones(1, 2, dtype=DTYPE), pt.LinfBall(0.0), torch.tensor([0])
    ).any()


# -- eq. 17 ----------------------------------------------------------------------------------------


@given(cases(kind="fc", set_kinds=("linf", "l2", "linf-box"), max_batch=3), st.booleans())
@fast(10)
def test_certified_radius_is_tight(case, given_labels):
    with torch.no_grad():
        pred = case.seq(case.x).argmax(1)
    y = pred if given_labels else None
    eps_max = 1.0
    radius, steps = pt.certified_radius(case.net, case.x, case.input_set, y, eps_max=eps_max)
    assert radius.shape == steps.shape == (case.x.shape[0],)
    assert ((radius >= 0) & (radius <= eps_max)).all()
    assert (steps >= 0).all()
    kind = case.kind
    inside = radius > 0
    if inside.any():
        assert pt.certify(case.net, case.x[inside], make_set(kind, radius[inside]), pred[inside]).all()
    above = radius < eps_max
    if above.any():
        bigger = radius[above] * 1.01 + 1e-6
        assert not pt.certify(case.net, case.x[above], make_set(kind, bigger), pred[above]).any()
    # Corollary 2 by default
    if given_labels:
        again, _ = pt.certified_radius(case.net, case.x, case.input_set, None, eps_max=eps_max)
        torch.testing.assert_close(again, radius)


def test_certified_radius_of_misclassified_and_saturated_examples():
    seq = build_fc(3, [6], 3, seed=8)
    x = torch.rand(4, 3, dtype=DTYPE)
    net = pt.Network.from_torch(seq)
    with torch.no_grad():
        pred = seq(x).argmax(1)
    r, _ = pt.certified_radius(net, x, pt.LinfBall(0.0), (pred + 1) % 3)
    assert (r == 0).all()
    r, _ = pt.certified_radius(net, x, pt.LinfBall(0.0), pred, eps_max=1e-8)
    assert (r == 1e-8).all()


@given(cases(kind="fc", set_kinds=("linf", "l2"), max_batch=4))
@settings(fast(10), derandomize=True)
def test_certificate_is_monotone_in_eps_on_random_nets(case):
    """On generic random nets a certificate at ``eps`` implies one at every smaller ``eps``.

    This is empirical, not a theorem: the fixed-slope bound can be non-monotone
    (see :func:`test_certified_radius_on_a_non_monotone_margin`), hence ``derandomize``.
    """
    with torch.no_grad():
        pred = case.seq(case.x).argmax(1)
    top = float(case.eps.max()) * 3
    ok = torch.stack([pt.certify(case.net, case.x, make_set(case.kind, top * t / 24), pred) for t in range(25)], 1)
    # once lost, never regained
    assert (ok[:, 1:] <= ok[:, :-1]).all()


def test_certified_radius_on_a_non_monotone_margin():
    """The worst margin ``min_j J_eps`` of the fixed slopes need not decrease in ``eps``.

    Here it is certified at 0.35 and 0.42 but not at 0.39 (the lower line ``z >= d zhat``
    of the relaxation tightens as ``u`` grows).  The radius must still be certified.
    """
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(DTYPE)
    with torch.no_grad():
        seq[0].weight.copy_(
            torch.tensor(
                [
                    [-0.193, -0.540, 0.228, 1.212],
                    [-0.421, 0.208, -0.655, 0.342],
                    [0.137, 0.389, -0.164, -0.476],
                    [0.375, 0.078, 0.193, -0.002],
                ]
            )
        )
        seq[0].bias.copy_(torch.tensor([-0.489, -0.220, 0.279, 0.113]))
        seq[2].weight.copy_(torch.tensor([[0.109, -0.510, 0.366, 1.143], [1.105, 1.148, 1.348, 1.013]]))
        seq[2].bias.copy_(torch.tensor([0.0, 0.0136]))
    net = pt.Network.from_torch(seq)
    x = torch.tensor([[0.4, 0.9, 0.94, 0.384]], dtype=DTYPE)
    y = torch.tensor([1])
    assert [bool(pt.certify(net, x, pt.LinfBall(e), y)) for e in (0.35, 0.39, 0.42, 0.45)] == [True, False, True, False]
    radius, _ = pt.certified_radius(net, x, pt.LinfBall(0.0), y)
    assert 0 < float(radius) < 0.39
    assert pt.certify(net, x, pt.LinfBall(radius), y).all()


# -- bad inputs ----------------------------------------------------------------------------------


def _small():
    seq = build_fc(3, [4], 3, seed=1)
    return pt.Network.from_torch(seq), torch.rand(2, 3, dtype=DTYPE)


@pytest.mark.parametrize("y", [torch.tensor([0, 3]), torch.tensor([-1, 0]), torch.tensor([5, 7])])
def test_labels_out_of_range_raise(y):
    net, x = _small()
    with pytest.raises(pt.InvalidInputError):
        pt.robust_loss(net, x, y, pt.LinfBall(0.1))
    with pytest.raises(pt.InvalidInputError):
        pt.certify(net, x, pt.LinfBall(0.1), y)
    with pytest.raises(pt.InvalidInputError):
        pt.certified_radius(net, x, pt.LinfBall(0.0), y)


@pytest.mark.parametrize("y", [torch.tensor([0]), torch.tensor([0, 1, 2]), torch.tensor([[0], [1]])])
def test_labels_of_wrong_shape_raise(y):
    net, x = _small()
    with pytest.raises(pt.ShapeMismatchError):
        pt.robust_loss(net, x, y, pt.LinfBall(0.1))
    with pytest.raises(pt.ShapeMismatchError):
        pt.certify(net, x, pt.LinfBall(0.1), y)


@pytest.mark.parametrize("eps", [-0.1, float("nan"), torch.tensor([0.1, 0.2, 0.3])])
def test_robust_functions_reject_bad_epsilon(eps):
    net, x = _small()
    y = torch.tensor([0, 1])
    with pytest.raises(pt.InvalidEpsilonError):
        pt.robust_loss(net, x, y, pt.LinfBall(eps))
    with pytest.raises(pt.InvalidEpsilonError):
        pt.certify(net, x, pt.LinfBall(eps), y)


def test_robust_functions_reject_bad_inputs():
    net, x = _small()
    y = torch.tensor([0, 1])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(pt.InvalidInputError):
        pt.robust_loss(net, bad, y, pt.LinfBall(0.1))
    with pytest.raises(pt.InvalidInputError):
        pt.certify(net, bad, pt.LinfBall(0.1), y)
    with pytest.raises(pt.ShapeMismatchError):
        pt.certify(net, torch.rand(2, 4, dtype=DTYPE), pt.LinfBall(0.1), y)
    with pytest.raises(pt.PolytopeError, match="float32"):
        pt.robust_loss(net, x.float(), y, pt.LinfBall(0.1))
    with pytest.raises(ValueError, match="method"):
        pt.certify(net, x, pt.LinfBall(0.1), y, method="bogus")


@pytest.mark.parametrize(
    "x",
    [torch.rand(2, 4, dtype=DTYPE), torch.rand(2, 3), torch.rand(3, dtype=DTYPE)],
    ids=["wrong-width", "float32", "unbatched"],
)
@pytest.mark.parametrize("call", ["certify", "certified_radius", "robust_loss"])
def test_corollary_2_validates_the_input_before_predicting(x, call):
    """Without labels the prediction is taken first; a bad input must still get a named error."""
    net, _ = _small()
    with pytest.raises(pt.ShapeMismatchError):
        if call == "certify":
            pt.certify(net, x, pt.LinfBall(0.1))
        elif call == "certified_radius":
            pt.certified_radius(net, x, pt.LinfBall(0.0))
        else:
            pt.robust_loss(net, x, None, pt.LinfBall(0.1))


def test_empty_batch():
    seq = build_fc(4, [6, 6, 5], 3, seed=1)
    net = pt.Network.from_torch(seq)
    x = torch.rand(0, 4, dtype=DTYPE)
    y = torch.zeros(0, dtype=torch.long)
    assert pt.certify(net, x, pt.LinfBall(0.1), y).shape == (0,)
    radius, _ = pt.certified_radius(net, x, pt.LinfBall(0.0))
    assert radius.shape == (0,)
