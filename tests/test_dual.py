"""The dual network (Theorem 1) and the layer bounds of Algorithm 1.

Soundness is checked against the network itself (10^4 sampled points per example and
projected-gradient extremes), exactness against closed forms and against small dense
LPs of the paper's eq. (19) solved with scipy's HiGHS, independently of polytope's code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linprog
from strategies import (
    DTYPE,
    SET_KINDS,
    ConvSpec,
    build_conv,
    build_fc,
    cases,
    dual_norm_rows,
    fast,
    fast_no_shrink,
    first_layer_rows,
    make_set,
    pgd_minimize,
    pre_activations,
    sample,
    seeds,
    unstable_eps,
)
from torch import nn

import polytope as pt

N_SAMPLES = 5000  # from each of two samplers: 10^4 points per example


def assert_le(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-8, what: str = "") -> None:
    """``a <= b`` up to ``tol * (1 + |b|)``, with the worst violation in the message."""
    a, b = torch.broadcast_tensors(a.detach(), b.detach())
    slack = b + tol * (1 + b.abs()) - a
    assert (slack >= 0).all(), f"{what}: violated by {float(-slack.min()):.3e} (a={a.flatten()[slack.argmin()]})"


def points(case, n: int = N_SAMPLES, seed: int = 0) -> torch.Tensor:
    """``2 n`` points of the case's set per example: the independent sampler and the library's."""
    gen = torch.Generator().manual_seed(seed)
    mine = sample(case.input_set, case.x, n, seed=seed)
    theirs = case.input_set.sample(case.x, n, generator=gen)
    return torch.cat([mine, theirs], 1)


def random_c(batch: int, m: int, n_out: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, m, n_out), generator=gen, dtype=DTYPE)


def objective_values(seq: nn.Sequential, pts: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``c_j^T f(x')`` at every point: ``(B, m, n)`` from ``pts: (B, n, *in)`` and ``c: (B, m, out)``."""
    with torch.no_grad():
        f = seq(pts.flatten(0, 1)).reshape(pts.shape[0], pts.shape[1], -1)
    return torch.einsum("bmo,bno->bmn", c, f)


def detached_bounds(dual: pt.DualNetwork) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(lo.detach(), up.detach()) for lo, up in dual.bounds]


# -- a dense LP of eq. (19), written from the paper ------------------------------------------


def affine_segments(seq: nn.Sequential, x: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """The network as dense affine maps ``(A_i, b_i)`` between ReLUs (torch on basis vectors)."""
    mods: list[nn.Module] = []
    stack = list(seq.children())
    while stack:
        m = stack.pop(0)
        if isinstance(m, nn.Sequential):
            stack = list(m.children()) + stack
        else:
            mods.append(m)
    segments: list[list[nn.Module]] = [[]]
    for m in mods:
        if isinstance(m, nn.ReLU):
            segments.append([])
        else:
            segments[-1].append(m)
    out, shape = [], tuple(x.shape[1:])
    with torch.no_grad():
        for seg in segments:
            f = nn.Sequential(*seg)
            n = int(np.prod(shape))
            b = f(torch.zeros((1, *shape), dtype=x.dtype))
            eye = torch.eye(n, dtype=x.dtype).reshape(n, *shape)
            out.append(((f(eye) - b).flatten(1).T.numpy(), b.flatten().numpy()))
            shape = tuple(b.shape[1:])
    return out


def input_box(input_set: pt.InputSet, x: torch.Tensor, b: int) -> tuple[np.ndarray, np.ndarray]:
    """The l_inf (or clipped) set around ``x[b]`` as a box: the LP's variable bounds on ``z_1``."""
    eps = input_set.eps
    e = float(eps.reshape(-1)[b] if isinstance(eps, torch.Tensor) and eps.numel() > 1 else eps)
    lo, hi = x[b].flatten().numpy() - e, x[b].flatten().numpy() + e
    if isinstance(input_set, pt.BoxedLinfBall):
        lo, hi = np.maximum(lo, input_set.lo), np.minimum(hi, input_set.hi)
    return lo, hi


def relaxed_lp(segs, lo, hi, bounds, c, lower: str = "eq19", alpha=None) -> tuple[float, np.ndarray | None]:
    """``min c^T zhat_k`` over the relaxed network of eq. (19) with ``z_1`` in the box ``[lo, hi]``.

    ``bounds`` are the ``(l_i, u_i)`` of every ReLU layer (numpy vectors).  On ``I-`` the LP
    has ``z = 0``, on ``I+`` ``z = zhat``, on ``I`` the upper line ``(u - l) z - u zhat <= -u l``
    and as lower constraints either eq. (19)'s ``z >= 0, z >= zhat`` (``lower="eq19"``) or the
    single line ``z >= alpha zhat`` (``lower="alpha"``).  Returns the optimum and, for eq. (19)
    with one ReLU layer, the slopes ``alpha = tau / (mu + tau)`` read off its dual solution
    (the split of the multiplier between ``z >= zhat`` and ``z >= 0``, Appendix A.2).
    """
    n_in = segs[0][0].shape[1]
    sizes = [a.shape[0] for a, _ in segs[:-1]]
    nvar = n_in + 2 * sum(sizes)
    a_eq, b_eq, a_ub, b_ub, tags = [], [], [], [], []

    def row(**entries):
        r = np.zeros(nvar)
        for idx, v in entries.items():
            r[int(idx[1:])] += v
        return r

    prev_off, prev_n, off = 0, n_in, n_in
    for k, (a, b) in enumerate(segs[:-1]):
        n = a.shape[0]
        for j in range(n):
            zh, z = off + j, off + n + j
            r = np.zeros(nvar)
            r[zh] = 1.0
            r[prev_off : prev_off + prev_n] -= a[j]
            a_eq.append(r)
            b_eq.append(b[j])
            lj, uj = bounds[k][0][j], bounds[k][1][j]
            if uj <= 0:
                a_eq.append(row(**{f"v{z}": 1.0}))
                b_eq.append(0.0)
            elif lj >= 0:
                a_eq.append(row(**{f"v{z}": 1.0, f"v{zh}": -1.0}))
                b_eq.append(0.0)
            else:
                a_ub.append(row(**{f"v{z}": uj - lj, f"v{zh}": -uj}))
                b_ub.append(-uj * lj)
                tags.append((k, j, "lambda"))
                if lower == "eq19":
                    a_ub += [row(**{f"v{z}": -1.0}), row(**{f"v{z}": -1.0, f"v{zh}": 1.0})]
                    b_ub += [0.0, 0.0]
                    tags += [(k, j, "mu"), (k, j, "tau")]
                else:
                    a_ub.append(row(**{f"v{z}": -1.0, f"v{zh}": float(alpha[k][j])}))
                    b_ub.append(0.0)
                    tags.append((k, j, "alpha"))
        prev_off, prev_n, off = off + n, n, off + 2 * n
    a_out, b_out = segs[-1]
    cost = np.zeros(nvar)
    cost[prev_off : prev_off + prev_n] = a_out.T @ c
    res = linprog(
        cost,
        A_ub=np.array(a_ub) if a_ub else None,
        b_ub=np.array(b_ub) if b_ub else None,
        A_eq=np.array(a_eq),
        b_eq=np.array(b_eq),
        bounds=[(lo[i], hi[i]) for i in range(n_in)] + [(None, None)] * (nvar - n_in),
        method="highs",
    )
    assert res.status == 0, res.message
    slopes = None
    if lower == "eq19" and len(segs) == 2:
        mu, tau = np.zeros(sizes[0]), np.zeros(sizes[0])
        if a_ub:
            for (_, j, t), value in zip(tags, -res.ineqlin.marginals, strict=True):
                if t == "mu":
                    mu[j] = value
                elif t == "tau":
                    tau[j] = value
        slopes = np.where(mu + tau > 1e-12, tau / np.maximum(mu + tau, 1e-300), 0.5)
    return float(res.fun + c @ b_out), slopes


# -- soundness ---------------------------------------------------------------------------------


@given(cases(), seeds)
@fast(16)
def test_bounds_contain_sampled_preactivations(case, seed):
    pts = points(case, seed=seed)
    with torch.no_grad():
        zs = pre_activations(case.seq, pts.flatten(0, 1))
    for slopes in ("fixed", "adaptive"):
        dual = pt.DualNetwork(case.net, case.x, case.input_set, slopes=slopes)
        assert len(dual.bounds) == len(zs)
        for i, ((lo, up), z) in enumerate(zip(detached_bounds(dual), zs, strict=True)):
            z = z.reshape(pts.shape[0], pts.shape[1], *z.shape[1:])
            assert lo.shape == up.shape == (case.x.shape[0], *z.shape[2:])
            assert_le(lo.unsqueeze(1), z, what=f"{slopes} lower bound of layer {i}")
            assert_le(z, up.unsqueeze(1), what=f"{slopes} upper bound of layer {i}")


@given(cases(max_batch=2), seeds)
@fast_no_shrink(12)
def test_bounds_contain_pgd_extremes(case, seed):
    dual_f = pt.DualNetwork(case.net, case.x, case.input_set, slopes="fixed")
    dual_a = pt.DualNetwork(case.net, case.x, case.input_set, slopes="adaptive")
    gen = torch.Generator().manual_seed(seed)
    for i in range(len(dual_f.bounds)):
        # attack at most 12 units of the layer (each unit needs its own iterate)
        units = torch.randperm(dual_f.bounds[i][0][0].numel(), generator=gen)[:12]

        def unit(p, i=i, units=units, sign=1.0):
            return sign * pre_activations(case.seq, p)[i].flatten(1)[:, units]

        low = pgd_minimize(unit, case.x, case.input_set, len(units), seed=seed)
        high = -pgd_minimize(
            lambda p, i=i, units=units: unit(p, i, units, -1.0), case.x, case.input_set, len(units), seed=seed
        )
        for dual in (dual_f, dual_a):
            lo, up = (t.detach().flatten(1)[:, units] for t in dual.bounds[i])
            assert_le(lo, low, what=f"{dual.slopes} lower bound of layer {i}")
            assert_le(high, up, what=f"{dual.slopes} upper bound of layer {i}")


@given(cases(max_batch=2), seeds, st.sampled_from(["fixed", "adaptive", "alpha", "alpha-per-objective"]))
@fast_no_shrink(20)
def test_objective_is_a_lower_bound(case, seed, mode):
    slopes = "adaptive" if mode == "adaptive" else "fixed"
    dual = pt.DualNetwork(case.net, case.x, case.input_set, slopes=slopes)
    batch, m = case.x.shape[0], 3
    n_out = case.seq(case.x).shape[1]
    c = random_c(batch, m, n_out, seed)
    alpha = None
    if mode.startswith("alpha"):
        gen = torch.Generator().manual_seed(seed + 1)
        lead = (batch, m) if mode == "alpha-per-objective" else (batch,)
        alpha = []
        for lo, _ in dual.bounds:
            a = torch.rand((*lead, *lo.shape[1:]), generator=gen, dtype=DTYPE)
            a[a < 0.15] = 0.0  # the ends of [0, 1] are allowed too
            a[a > 0.85] = 1.0
            alpha.append(a)
    j = dual.objective(c, alpha)
    assert j.shape == (batch, m)
    vals = objective_values(case.seq, points(case, 2000, seed), c)
    assert_le(j, vals.amin(2), what=f"J ({mode}) vs sampled minimum")

    def obj(p):
        f = case.seq(p).reshape(batch, m, -1)
        return torch.einsum("bmo,bmo->bm", c, f).repeat_interleave(m, 0).reshape(-1, m)

    # pgd_minimize wants fn: (B*m points) -> (B*m, m); objective k of point (b, k) is column k
    attacked = pgd_minimize(obj, case.x, case.input_set, m, seed=seed)
    assert_le(j, attacked, what=f"J ({mode}) vs PGD minimum")


# -- exactness ---------------------------------------------------------------------------------


@given(cases(), st.sampled_from(["fixed", "adaptive"]), st.sampled_from(["auto", "backward"]))
@fast(25)
def test_first_layer_bounds_are_the_exact_interval(case, slopes, order):
    dual = pt.DualNetwork(case.net, case.x, case.input_set, slopes=slopes, order=order)
    a, b = first_layer_rows(case.seq, case.x)
    lo, up = dual.bounds[0]
    if case.kind == "linf-box":
        box_lo = (case.x - case.eps.reshape(-1, *[1] * (case.x.dim() - 1))).clamp(min=0.0).flatten(1)
        box_hi = (case.x + case.eps.reshape(-1, *[1] * (case.x.dim() - 1))).clamp(max=1.0).flatten(1)
        centre = (box_lo + box_hi) / 2 @ a.T + b
        radius = (box_hi - box_lo) / 2 @ a.abs().T
    else:
        centre = case.x.flatten(1) @ a.T + b
        radius = case.eps[:, None] * dual_norm_rows(a, case.kind)
    torch.testing.assert_close(lo.detach().flatten(1), centre - radius, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(up.detach().flatten(1), centre + radius, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["fc", "conv"])
@given(data=st.data())
@fast(15)
def test_forward_and_backward_orders_agree(kind, data):
    case = data.draw(cases(kind, per_example=data.draw(st.booleans())))
    fwd = pt.DualNetwork(case.net, case.x, case.input_set, order="forward")
    bwd = pt.DualNetwork(case.net, case.x, case.input_set, order="backward")
    assert "backward" not in fwd.orders and "forward" not in bwd.orders
    c = random_c(case.x.shape[0], 4, case.seq(case.x).shape[1], 0)
    for other in ("auto", "patches"):  # patches: the receptive-field dual on convolutional prefixes
        dual = pt.DualNetwork(case.net, case.x, case.input_set, order=other)
        for (lf, uf), (lb, ub), (lo, uo) in zip(fwd.bounds, bwd.bounds, dual.bounds, strict=True):
            torch.testing.assert_close(lf, lb, atol=1e-9, rtol=1e-9)
            torch.testing.assert_close(uf, ub, atol=1e-9, rtol=1e-9)
            torch.testing.assert_close(lo, lb, atol=1e-9, rtol=1e-9)
            torch.testing.assert_close(uo, ub, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(dual.objective(c), bwd.objective(c), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(fwd.objective(c), bwd.objective(c), atol=1e-9, rtol=1e-9)


@given(cases(), st.sampled_from(["fixed", "adaptive"]))
@fast(15)
def test_zero_eps_collapses_onto_the_forward_pass(case, slopes):
    input_set = make_set(case.kind, 0.0)
    dual = pt.DualNetwork(case.net, case.x, input_set, slopes=slopes)
    with torch.no_grad():
        zs = pre_activations(case.seq, case.x)
        f = case.seq(case.x)
    for (lo, up), z in zip(dual.bounds, zs, strict=True):
        torch.testing.assert_close(lo.detach(), z, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(up.detach(), z, atol=1e-10, rtol=1e-10)
        assert not dual.index_sets(0).unstable.any()
    c = random_c(case.x.shape[0], 3, f.shape[1], 1)
    torch.testing.assert_close(dual.objective(c), torch.einsum("bmo,bo->bm", c, f), atol=1e-10, rtol=1e-10)


@given(cases(per_example=True, min_batch=2), st.sampled_from(["fixed", "adaptive"]))
@fast(12)
def test_per_example_eps_equals_separate_runs(case, slopes):
    joint = pt.DualNetwork(case.net, case.x, case.input_set, slopes=slopes)
    c = random_c(case.x.shape[0], 3, case.seq(case.x).shape[1], 2)
    j = joint.objective(c)
    for b, e in enumerate(case.eps.tolist()):
        alone = pt.DualNetwork(case.net, case.x[b : b + 1], make_set(case.kind, e), slopes=slopes)
        for (lj, uj), (la, ua) in zip(joint.bounds, alone.bounds, strict=True):
            torch.testing.assert_close(lj[b : b + 1], la, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(uj[b : b + 1], ua, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(j[b : b + 1], alone.objective(c[b : b + 1]), atol=1e-10, rtol=1e-10)


@given(cases(max_batch=2), seeds)
@fast(15)
def test_default_alpha_equals_explicit_alpha(case, seed):
    c = random_c(case.x.shape[0], 3, case.seq(case.x).shape[1], seed)
    fixed = pt.DualNetwork(case.net, case.x, case.input_set, slopes="fixed")
    adaptive = pt.DualNetwork(case.net, case.x, case.input_set, slopes="adaptive")
    # off I the slopes are ignored, so fill them with junk
    d = [torch.where((lo < 0) & (up > 0), up / (up - lo), 0.37) for lo, up in detached_bounds(fixed)]
    torch.testing.assert_close(fixed.objective(c), fixed.objective(c, d), atol=1e-10, rtol=1e-10)
    a = [torch.where((lo < 0) & (up > 0), (up >= -lo).to(DTYPE), 0.37) for lo, up in detached_bounds(adaptive)]
    torch.testing.assert_close(adaptive.objective(c), adaptive.objective(c, a), atol=1e-10, rtol=1e-10)
    # the same slopes given per objective
    a_m = [t.unsqueeze(1).expand(t.shape[0], 3, *t.shape[1:]).contiguous() for t in a]
    torch.testing.assert_close(adaptive.objective(c), adaptive.objective(c, a_m), atol=1e-10, rtol=1e-10)


@st.composite
def single_layer_cases(draw, kinds=("linf", "linf-box")):
    n_in, width, n_out = draw(st.integers(1, 5)), draw(st.integers(1, 7)), draw(st.integers(2, 4))
    seq = build_fc(n_in, [width], n_out, draw(seeds))
    gen = torch.Generator().manual_seed(draw(seeds))
    x = torch.rand((draw(st.integers(1, 2)), n_in), generator=gen, dtype=DTYPE)
    kind = draw(st.sampled_from(kinds))
    return seq, x, make_set(kind, unstable_eps(seq, x, kind, draw(st.floats(0.3, 0.9))))


@given(single_layer_cases(), seeds, st.sampled_from(["fixed", "adaptive", "random"]))
@fast(20)
def test_single_relu_layer_objective_equals_the_lp(problem, seed, mode):
    """One ReLU layer: ``J(c, alpha)`` is exactly the LP with lower line ``z >= alpha zhat``.

    With ``alpha = u / (u - l)`` (Theorem 1's fixed slopes) that LP is the relaxation of
    eq. (19) whose lower constraints are replaced by the parallel line.  J never exceeds
    the eq. (19) optimum, and reaches it at the slopes read off the LP's dual solution.
    """
    seq, x, input_set = problem
    net = pt.Network.from_torch(seq)
    dual = pt.DualNetwork(net, x, input_set, slopes="adaptive" if mode == "adaptive" else "fixed")
    segs = affine_segments(seq, x)
    n_out = segs[-1][0].shape[0]
    c = random_c(x.shape[0], 3, n_out, seed)
    lo_t, up_t = detached_bounds(dual)[0]
    d = torch.where((lo_t < 0) & (up_t > 0), up_t / (up_t - lo_t), 0.0)
    if mode == "fixed":
        alpha = d
    elif mode == "adaptive":
        alpha = (up_t >= -lo_t).to(DTYPE)
    else:
        alpha = torch.rand(up_t.shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    j = dual.objective(c, None if mode != "random" else [alpha]).detach()
    j_fixed = dual.objective(c, [d]).detach()
    for b in range(x.shape[0]):
        lo, hi = input_box(input_set, x, b)
        bounds = [(lo_t[b].numpy(), up_t[b].numpy())]
        for k in range(c.shape[1]):
            ck = c[b, k].numpy()
            lp_alpha, _ = relaxed_lp(segs, lo, hi, bounds, ck, lower="alpha", alpha=[alpha[b].numpy()])
            assert j[b, k].item() == pytest.approx(lp_alpha, rel=1e-7, abs=1e-7)
            lp19, best = relaxed_lp(segs, lo, hi, bounds, ck)
            assert j_fixed[b, k].item() <= lp19 + 1e-7 * (1 + abs(lp19))
            # strong duality (Theorem 1): some alpha in [0, 1] attains the eq. (19) optimum
            best_t = torch.tensor(best, dtype=DTYPE).unsqueeze(0).expand(x.shape[0], -1)
            attained = dual.objective(c[:, k : k + 1], [best_t])[b, 0].item()
            assert attained == pytest.approx(lp19, rel=1e-7, abs=1e-7)


@given(st.data())
@fast(10)
def test_fixed_slopes_equal_the_lp_of_algorithm_1_on_deeper_nets(data):
    """With ``alpha = d`` the bounds and ``J`` are exactly the LP over the relaxation whose ReLUs
    are the parallelograms ``d zhat <= z <= d (zhat - l)`` (Algorithm 1), given the bounds of
    the earlier layers; they never exceed the eq. (19) LP with the same bounds."""
    n_in = data.draw(st.integers(1, 4))
    widths = data.draw(st.lists(st.integers(1, 5), min_size=2, max_size=3))
    seq = build_fc(n_in, widths, data.draw(st.integers(2, 3)), data.draw(seeds))
    x = torch.rand((1, n_in), generator=torch.Generator().manual_seed(data.draw(seeds)), dtype=DTYPE)
    kind = data.draw(st.sampled_from(["linf", "linf-box"]))
    input_set = make_set(kind, unstable_eps(seq, x, kind, data.draw(st.floats(0.3, 0.8))))
    dual = pt.DualNetwork(
        pt.Network.from_torch(seq), x, input_set, order=data.draw(st.sampled_from(["forward", "backward"]))
    )
    segs = affine_segments(seq, x)
    lo, hi = input_box(input_set, x, 0)
    bounds = [(lo_t[0].numpy(), up_t[0].numpy()) for lo_t, up_t in detached_bounds(dual)]
    slopes = [np.where((lb < 0) & (ub > 0), ub / np.where(ub > lb, ub - lb, 1.0), 0.0) for lb, ub in bounds]
    for i in range(1, len(bounds)):
        sub = segs[: i + 1]  # the LP's output is zhat of ReLU layer i
        for j in range(widths[i]):
            e = np.eye(widths[i])[j]
            low, _ = relaxed_lp(sub, lo, hi, bounds[:i], e, lower="alpha", alpha=slopes[:i])
            high, _ = relaxed_lp(sub, lo, hi, bounds[:i], -e, lower="alpha", alpha=slopes[:i])
            assert bounds[i][0][j] == pytest.approx(low, rel=1e-7, abs=1e-7)
            assert bounds[i][1][j] == pytest.approx(-high, rel=1e-7, abs=1e-7)
    c = random_c(1, 3, segs[-1][0].shape[0], 0)
    j = dual.objective(c).detach()
    for k in range(3):
        lp, _ = relaxed_lp(segs, lo, hi, bounds, c[0, k].numpy(), lower="alpha", alpha=slopes)
        assert j[0, k].item() == pytest.approx(lp, rel=1e-7, abs=1e-7)
        lp19, _ = relaxed_lp(segs, lo, hi, bounds, c[0, k].numpy())
        assert j[0, k].item() <= lp19 + 1e-7 * (1 + abs(lp19))


# -- edge cases ----------------------------------------------------------------------------------


def _hand_net() -> nn.Sequential:
    """Two inputs, five hidden units with hand-set bounds at x = (0.5, 0.5), eps = 0.5 (l_inf):

    unit 0: x0          in [0, 1]   (l = 0: stable positive)
    unit 1: x0 - 1      in [-1, 0]  (u = 0: stable negative)
    unit 2: 0           in [0, 0]   (u = l = 0)
    unit 3: 0.3         in [0.3, 0.3] (u = l > 0)
    unit 4: x0 + x1 - 1 in [-1, 1]  (unstable)
    """
    seq = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)).to(DTYPE)
    first, second, last = seq[0], seq[2], seq[4]

    def t(values):
        return torch.tensor(values, dtype=DTYPE)

    with torch.no_grad():
        first.weight.copy_(t([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
        first.bias.copy_(t([0.0, -1.0, 0.0, 0.3, -1.0]))
        second.weight.copy_(t([[1.0, -2.0, 3.0, 1.0, -1.0], [-1.0, 1.0, 1.0, -1.0, 2.0], [0.5, 0.5, -0.5, 0.0, 1.0]]))
        second.bias.copy_(t([-0.4, 0.2, -0.6]))
        last.weight.copy_(t([[1.0, -1.0, 0.5], [-0.5, 1.0, 1.0]]))
        last.bias.copy_(t([0.1, -0.1]))
    return seq.eval()


@pytest.mark.parametrize("order", ["forward", "backward"])
@pytest.mark.parametrize("slopes", ["fixed", "adaptive"])
def test_hand_built_units_on_the_edges(order, slopes):
    if order == "forward" and slopes == "adaptive":
        pytest.skip("the forward order needs fixed slopes")
    seq = _hand_net()
    x = torch.tensor([[0.5, 0.5]], dtype=DTYPE)
    input_set = pt.LinfBall(0.5)
    dual = pt.DualNetwork(pt.Network.from_torch(seq), x, input_set, slopes=slopes, order=order)
    lo, up = dual.bounds[0]
    torch.testing.assert_close(lo, torch.tensor([[0.0, -1.0, 0.0, 0.3, -1.0]], dtype=DTYPE), atol=0, rtol=0)
    torch.testing.assert_close(up, torch.tensor([[1.0, 0.0, 0.0, 0.3, 1.0]], dtype=DTYPE), atol=0, rtol=0)
    neg, pos, uns = dual.index_sets(0)
    assert neg.tolist() == [[False, True, True, False, False]]
    assert pos.tolist() == [[True, False, False, True, False]]
    assert uns.tolist() == [[False, False, False, False, True]]
    # every unit is in exactly one set, in every layer
    for i in range(len(dual.bounds)):
        sets = torch.stack([s.to(torch.int64) for s in dual.index_sets(i)])
        assert (sets.sum(0) == 1).all()
    # layer 2 is the LP over the parallelogram relaxation of unit 4 (d = 1/2)
    segs = affine_segments(seq, x)
    lo_b, hi_b = input_box(input_set, x, 0)
    b1 = [(lo.detach()[0].numpy(), up.detach()[0].numpy())]
    if slopes == "fixed":
        for j in range(3):
            e = np.eye(3)[j]
            low, _ = relaxed_lp(segs[:2], lo_b, hi_b, b1, e, lower="alpha", alpha=[np.full(5, 0.5)])
            high, _ = relaxed_lp(segs[:2], lo_b, hi_b, b1, -e, lower="alpha", alpha=[np.full(5, 0.5)])
            assert dual.bounds[1][0][0, j].item() == pytest.approx(low, abs=1e-9)
            assert dual.bounds[1][1][0, j].item() == pytest.approx(-high, abs=1e-9)
    # soundness on the grid of the square and its corners
    g = torch.linspace(0, 1, 41, dtype=DTYPE)
    grid = torch.cartesian_prod(g, g)
    with torch.no_grad():
        zs = pre_activations(seq, grid)
        f = seq(grid)
    for (lb, ub), z in zip(detached_bounds(dual), zs, strict=True):
        assert_le(lb, z, what="lower")
        assert_le(z, ub, what="upper")
    c = random_c(1, 4, 2, 3)
    assert_le(dual.objective(c), torch.einsum("bmo,no->bmn", c, f).amin(2), what="J")


@pytest.mark.parametrize("kind", SET_KINDS)
def test_all_units_stable_gives_the_exact_minimum(kind):
    """With ``I`` empty in every layer the network is affine on the set and ``J`` is exact."""
    seq = build_fc(4, [6, 5], 3, seed=11)
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    input_set = make_set(kind, 1e-4)  # every |zhat| at x exceeds 0.005
    for order in ("forward", "backward"):
        dual = pt.DualNetwork(pt.Network.from_torch(seq), x, input_set, order=order)
        for i in range(len(dual.bounds)):
            assert not dual.index_sets(i).unstable.any()
        c = random_c(2, 3, 3, 4)
        # the affine map's gradient at x gives the exact minimum over the set (constant pattern)
        xg = x.clone().requires_grad_(True)
        out = torch.einsum("bmo,bo->bm", c, seq(xg))
        grads = torch.stack([torch.autograd.grad(out[:, k].sum(), xg, retain_graph=True)[0] for k in range(3)], 1)
        exact = out.detach() + input_set.min_linear(x, grads) - torch.einsum("bmn,bn->bm", grads, x)
        torch.testing.assert_close(dual.objective(c), exact, atol=1e-10, rtol=1e-10)


def test_dead_network_objective_is_the_output_bias():
    seq = build_fc(3, [4, 4], 2, seed=0)
    with torch.no_grad():
        seq[0].bias.fill_(-100.0)
    x = torch.rand(2, 3, dtype=DTYPE)
    dual = pt.DualNetwork(pt.Network.from_torch(seq), x, pt.LinfBall(0.1))
    assert dual.index_sets(0).negative.all()
    c = random_c(2, 3, 2, 0)
    with torch.no_grad():
        output = seq[4](seq[2].bias.relu())  # every first-layer unit is off: f(x') = W_3 ReLU(b_2) + b_3
    expected = torch.einsum("bmo,o->bm", c, output)
    torch.testing.assert_close(dual.objective(c), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("order", ["auto", "forward", "backward"])
def test_empty_batch(order):
    seq = build_fc(4, [6, 6, 5], 3, seed=1)
    x = torch.rand(0, 4, dtype=DTYPE)
    dual = pt.DualNetwork(pt.Network.from_torch(seq), x, pt.LinfBall(0.2), order=order)
    assert [lo.shape for lo, _ in dual.bounds] == [(0, 6), (0, 6), (0, 5)]
    assert dual.objective(torch.zeros(0, 2, 3, dtype=DTYPE)).shape == (0, 2)


# -- bad inputs --------------------------------------------------------------------------------


def _small():
    seq = build_fc(3, [4, 4], 2, seed=3)
    x = torch.rand(2, 3, dtype=DTYPE)
    return pt.Network.from_torch(seq), x


@pytest.mark.parametrize("shape", [(2, 1, 3), (2, 1), (2, 3, 2, 1), (3, 1, 2)])
def test_objective_of_wrong_shape_raises(shape):
    net, x = _small()
    dual = pt.DualNetwork(net, x, pt.LinfBall(0.1))
    with pytest.raises(pt.ShapeMismatchError):
        dual.objective(torch.zeros(shape, dtype=DTYPE))


@pytest.mark.parametrize("value", [-0.01, 1.01, float("nan")])
@pytest.mark.parametrize("slopes", ["fixed", "adaptive"])
def test_alpha_outside_unit_interval_raises(value, slopes):
    net, x = _small()
    dual = pt.DualNetwork(net, x, pt.LinfBall(0.3), slopes=slopes)
    alpha = [torch.full_like(lo, 0.5) for lo, _ in dual.bounds]
    alpha[1][0, 2] = value
    with pytest.raises(pt.InvalidInputError):
        dual.objective(torch.zeros(2, 1, 2, dtype=DTYPE), alpha)


def test_alpha_of_wrong_count_or_shape_raises():
    net, x = _small()
    dual = pt.DualNetwork(net, x, pt.LinfBall(0.3))
    c = torch.zeros(2, 1, 2, dtype=DTYPE)
    with pytest.raises(pt.ShapeMismatchError):
        dual.objective(c, [torch.full((2, 4), 0.5, dtype=DTYPE)])
    with pytest.raises(pt.ShapeMismatchError):
        dual.objective(c, [torch.full((2, 4), 0.5, dtype=DTYPE), torch.full((2, 5), 0.5, dtype=DTYPE)])


def test_bad_options_raise():
    net, x = _small()
    with pytest.raises(ValueError, match="slopes"):
        pt.DualNetwork(net, x, pt.LinfBall(0.1), slopes="bogus")
    with pytest.raises(ValueError, match="order"):
        pt.DualNetwork(net, x, pt.LinfBall(0.1), order="sideways")
    with pytest.raises(ValueError, match="forward"):
        pt.DualNetwork(net, x, pt.LinfBall(0.1), slopes="adaptive", order="forward")


@pytest.mark.parametrize("eps", [-1e-3, float("nan"), float("inf"), torch.tensor([0.1, 0.2, 0.3])])
def test_dual_rejects_bad_epsilon(eps):
    net, x = _small()
    with pytest.raises(pt.InvalidEpsilonError):
        pt.DualNetwork(net, x, pt.LinfBall(eps))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_dual_rejects_non_finite_input(bad):
    net, x = _small()
    x[0, 1] = bad
    with pytest.raises(pt.InvalidInputError):
        pt.DualNetwork(net, x, pt.LinfBall(0.1))


@pytest.mark.parametrize("shape", [(2, 4), (2, 1, 3), (3,)])
def test_dual_rejects_input_of_wrong_shape(shape):
    net, _ = _small()
    with pytest.raises(pt.ShapeMismatchError):
        pt.DualNetwork(net, torch.rand(shape, dtype=DTYPE), pt.LinfBall(0.1))


def test_dual_rejects_dtype_mismatch():
    net, x = _small()
    with pytest.raises(pt.PolytopeError, match="float32"):
        pt.DualNetwork(net, x.float(), pt.LinfBall(0.1))


# -- devices -----------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float32_matches_cpu():
    torch.manual_seed(0)
    seq = build_conv((2, 6, 6), [ConvSpec(3, 3, 2, 1, True)], [8], 3, seed=7).float()
    x = torch.rand(4, 2, 6, 6)
    eps = torch.tensor([0.01, 0.05, 0.1, 0.0])
    c = torch.randn(4, 3, 3)
    results = {}
    for device in ("cpu", "cuda"):
        s = seq.to(device)
        net = pt.Network.from_torch(s)
        for order in ("forward", "backward"):
            dual = pt.DualNetwork(net, x.to(device), pt.LinfBall(eps.to(device)), order=order)
            assert all(lo.device.type == device for lo, _ in dual.bounds)
            results[device, order] = [t.cpu() for pair in dual.bounds for t in pair] + [
                dual.objective(c.to(device)).cpu()
            ]
        loss, _ = pt.robust_loss(net, x.to(device), torch.zeros(4, dtype=torch.long, device=device), pt.LinfBall(0.05))
        results[device, "loss"] = [loss.detach().cpu()]
    for key in [("cpu", "forward"), ("cpu", "backward"), ("cpu", "loss")]:
        other = ("cuda", key[1])
        for a, b in zip(results[key], results[other], strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _two_conv_net(seed: int) -> nn.Sequential:
    """The paper's MNIST architecture in small: two stride-2 convolutions, then two dense layers."""
    gen = torch.Generator().manual_seed(seed)
    seq = nn.Sequential(
        nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 12), nn.ReLU(), nn.Linear(12, 5),
    ).to(DTYPE)
    with torch.no_grad():
        for p in seq.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE) * 0.5)
    return seq.eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_shortcut_with_slopes_matches_the_plain_backward_pass(seed):
    """Non-``d`` slopes on the conv prefix (per-unit bounds, sparse corrections, the kept pass) change no number
    or gradient."""
    net = pt.Network.from_torch(_two_conv_net(seed))
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.rand(3, 1, 12, 12, generator=gen, dtype=DTYPE)
    input_set = pt.LinfBall(0.15)
    c = torch.randn(3, 4, 5, generator=gen, dtype=DTYPE)
    shortcut = pt.DualNetwork(net, x, input_set, slopes="adaptive")
    plain = pt.DualNetwork(net, x, input_set, slopes="adaptive", order="backward")
    assert shortcut.orders == ["interval", "patches", "backward"] and plain.orders[1] == "backward"
    assert all(r.sets.unstable.any() for r in shortcut.relaxations)
    assert shortcut._slope_tail is not None and plain._slope_tail is None  # the objective finishes through it
    for (lo_s, up_s), (lo_p, up_p) in zip(shortcut.bounds, plain.bounds, strict=True):
        torch.testing.assert_close(lo_s, lo_p, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(up_s, up_p, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(shortcut.objective(c), plain.objective(c), atol=1e-12, rtol=1e-12)
    # custom slopes, differentiated through every layer's bounds
    shapes = [tuple(r.lower.shape) for r in shortcut.relaxations]
    alpha = [torch.rand(s, generator=gen, dtype=DTYPE).requires_grad_(True) for s in shapes]
    values, grads = [], []
    for order in ("auto", "backward"):
        j = pt.DualNetwork(net, x, input_set, slopes=alpha, order=order).objective(c)
        values.append(j.detach())
        grads.append(torch.autograd.grad((j * torch.linspace(0.5, 1.5, j.numel(), dtype=DTYPE).reshape(j.shape)).sum(),
                                         alpha))
    torch.testing.assert_close(values[0], values[1], atol=1e-12, rtol=1e-12)
    for g_s, g_p in zip(*grads, strict=True):
        torch.testing.assert_close(g_s, g_p, atol=1e-12, rtol=1e-12)
    assert grads[0][0].abs().sum() > 0  # the first layer's slopes do reach J
    # per-objective slopes (B, m, ...) through the shortcut
    per = [torch.rand((3, 4, *s[1:]), generator=gen, dtype=DTYPE) for s in shapes]
    torch.testing.assert_close(shortcut.objective(c, per), plain.objective(c, per), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", ["fc", "conv"])
@given(data=st.data())
@fast(12)
def test_recorded_linear_tail_changes_no_objective(kind, data):
    """With fixed slopes the objective finishes through the last bound pass's recorded maps; the
    same objective computed by a full pass through every layer must agree."""
    case = data.draw(cases(kind))
    dual = pt.DualNetwork(case.net, case.x, case.input_set, order=data.draw(st.sampled_from(["auto", "backward"])))
    c = random_c(case.x.shape[0], 3, case.seq(case.x).shape[1], data.draw(seeds))
    with_tail = dual.objective(c)
    if dual._tail is None:  # only a backward bound pass on the last hidden layer records one
        assert dual.orders[-1] != "backward"
        return
    dual._tail = None
    torch.testing.assert_close(with_tail, dual.objective(c), atol=1e-10, rtol=1e-10)


@given(cases(), st.sampled_from(["auto", "backward"]))
@fast(12)
def test_adaptive_layer_bounds_are_intervals_tightened_by_the_dual(case, order):
    """Slope modes other than fixed: each ReLU layer after the first gets the interval bounds from the
    box ``[relu(l), relu(u)]`` below it (computed here from dense maps); on a layer the receptive-field
    order applies to, the fixed-slope dual's on the units those leave unstable; then the mode's own
    dual's on the units still unstable (each dual run here on every unit)."""
    dual = pt.DualNetwork(case.net, case.x, case.input_set, slopes="adaptive", order=order)
    segments = affine_segments(case.seq, case.x)

    def tighten(lo, up, lo_d, up_d):
        open_ = (lo < 0) & (up > 0)
        return torch.where(open_, torch.maximum(lo, lo_d), lo), torch.where(open_, torch.minimum(up, up_d), up)

    for i in range(1, len(dual.bounds)):
        lo_prev, up_prev = (t.detach().flatten(1).clamp_min(0) for t in dual.bounds[i - 1])
        a, b = (torch.from_numpy(t) for t in segments[i])
        pos, neg = a.clamp_min(0), a.clamp_max(0)
        lo, up = lo_prev @ pos.T + up_prev @ neg.T + b, up_prev @ pos.T + lo_prev @ neg.T + b
        units = torch.arange(lo.shape[1]).expand(lo.shape[0], -1)
        if dual._patches_apply(i):
            lo, up = tighten(lo, up, *(t.detach() for t in dual._fixed_unit_bounds(i, units)))
        lo, up = tighten(lo, up, *(t.detach() for t in dual._unit_bounds(i, units, torch.ones_like(units).bool())))
        torch.testing.assert_close(dual.bounds[i][0].detach().flatten(1), lo, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(dual.bounds[i][1].detach().flatten(1), up, atol=1e-9, rtol=1e-9)


def test_interval_screen_skips_the_settled_units_of_a_dense_layer(monkeypatch):
    """The dense layer's dual pass runs over the units that the intervals do not prove inactive only."""
    net = pt.Network.from_torch(build_fc(6, [12, 40], 3, seed=7))
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    seen = []
    original = pt.DualNetwork._unit_bounds

    def spy(self, i, units, valid):
        seen.append((i, units.shape[1]))
        return original(self, i, units, valid)

    monkeypatch.setattr(pt.DualNetwork, "_unit_bounds", spy)
    dual = pt.DualNetwork(net, x, pt.LinfBall(0.05), slopes="adaptive")
    up = dual.bounds[1][1].flatten(1)
    assert len(seen) == 1 and seen[0][0] == 1
    assert int((up > 0).sum(1).max()) <= seen[0][1] < 40  # every unit not inactive, fewer than all
