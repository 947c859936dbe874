"""Bounds and verdicts on ReLU graphs (issue 21), against sampling, PGD and an exact enumeration.

Random graphs come from :mod:`graph_programs`; everything is float64.  Properties:

* Theorem 1's ``J`` (fixed, adaptive and optimised slopes) and Algorithm 1's layer bounds
  contain sampled values and PGD extremes of ``c^T f`` (and of every pre-activation);
* ``J <= LP (eq. 19) <= LP with LP-tightened bounds <= MILP <= sampled min``, and the MILP is
  the exact minimum that :func:`graph_programs.exact_min` finds by enumerating linear pieces;
* branch and bound (ReLU and input splitting) reaches the MILP's verdict, and every
  counterexample lies in the set and is misclassified by the torch module itself;
* ``pt.certify`` is nested across methods on graphs (a weaker certificate implies a stronger
  one) and never certifies what the MILP refutes.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from graph_programs import DTYPE, exact_min, jacobian_of, programs
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import SET_KINDS, dual_norm_rows, fast, fast_no_shrink, in_set, make_set, pgd_minimize, sample, seeds
from torch import nn

import polytope as pt
from polytope.verifiers.bab import BaBOptions, verify_bab
from polytope.verifiers.cascade import Cascade

SLACK = 1e-8
#: Worst margins closer to zero than this are skipped where a verdict is compared: a tie is decided by
#: rounding, and near one branch and bound needs thousands of domains (one such example took 5 s).
TIE = 1e-3


def _objectives(n_out: int, m: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.eye(n_out, dtype=DTYPE), torch.randn((m, n_out), generator=gen, dtype=DTYPE)])


def _eps(net: pt.Network, x: torch.Tensor, kind: str, fraction: float) -> float:
    """A radius leaving about ``fraction`` of the first ReLU layer's units unstable (0 < l, u), at most 1."""
    rows, bias = jacobian_of(net.layers[0].forward, tuple(x.shape[1:]))
    centre = x.flatten(1) @ rows.T + bias
    norms = dual_norm_rows(rows, kind)
    keep = norms > 1e-9  # units that do not depend on the input (a padded border) are never unstable
    mask = net.linear_mask(0) if net.n_relu else None
    if mask is not None:
        keep &= ~mask.flatten()
    if not keep.any():
        return 0.1
    ratio = centre[:, keep].abs() / norms[keep]
    return min(max(float(torch.quantile(ratio.flatten(), fraction)), 1e-3), 1.0)


@st.composite
def cases(draw, kind: str = "any", tiny: bool = False, set_kinds: tuple[str, ...] = SET_KINDS, batch: int = 2,
          unstable: tuple[float, float] = (0.2, 0.8)):
    """``(module, net, x, input_set)``: a random graph, inputs and a set leaving a share in ``unstable`` of its
    first ReLU layer unstable."""
    module, shape = draw(programs(kind, tiny))
    net = pt.Network.from_torch(module, shape)
    gen = torch.Generator().manual_seed(draw(seeds))
    set_kind = draw(st.sampled_from(set_kinds))
    x = torch.rand((batch, *shape), generator=gen, dtype=DTYPE)  # in the box [0, 1] of "linf-box"
    x = x if set_kind == "linf-box" else 4 * x - 2
    input_set = make_set(set_kind, _eps(net, x, set_kind, draw(st.floats(*unstable))))
    return module, net, x, input_set


def _sampled_min(module, x, input_set, c: torch.Tensor, n: int = 300) -> torch.Tensor:
    """``min c^T f`` over sampled points and PGD iterates of the set, ``(B, m)``."""
    pts = sample(input_set, x, n)
    vals = module(pts.flatten(0, 1)).reshape(*pts.shape[:2], -1) @ c.T
    pgd = pgd_minimize(lambda z: module(z) @ c.T, x, input_set, c.shape[0], steps=20, restarts=1)
    return torch.minimum(vals.amin(1), pgd)


# -- the dual network ----------------------------------------------------------------------------


@fast(20)
@given(cases(), st.sampled_from(["fixed", "adaptive"]), seeds)
def test_dual_bounds_contain_samples_and_pgd(case, slopes, seed):
    module, net, x, input_set = case
    c = _objectives(net.shapes(tuple(x.shape[1:]))[-1][0], 2, seed)
    dual = pt.DualNetwork(net, x, input_set, slopes=slopes)
    bound = dual.objective(c)
    assert (bound <= _sampled_min(module, x, input_set, c) + SLACK).all()
    pts = sample(input_set, x, 200, seed)
    assert in_set(input_set, x, pts).all()
    zhat = net.pre_activations(pts.flatten(0, 1))
    for (lo, hi), z in zip([*dual.bounds, dual.output_bounds()], zhat, strict=True):
        z = z.reshape(*pts.shape[:2], *z.shape[1:])
        assert (z >= lo.unsqueeze(1) - SLACK).all() and (z <= hi.unsqueeze(1) + SLACK).all()


@fast(15)
@given(cases(), seeds)
def test_contraction_orders_agree_on_graphs(case, seed):
    _, net, x, input_set = case
    c = _objectives(net.shapes(tuple(x.shape[1:]))[-1][0], 2, seed)
    duals = [pt.DualNetwork(net, x, input_set, order=order) for order in ("forward", "backward", "auto")]
    for other in duals[1:]:
        for (lo, hi), (lo_o, hi_o) in zip(duals[0].bounds, other.bounds, strict=True):
            torch.testing.assert_close(lo_o, lo, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(hi_o, hi, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(other.objective(c), duals[0].objective(c), rtol=1e-9, atol=1e-9)


@fast_no_shrink(10)
@given(cases(), seeds)
def test_optimized_slopes_are_sound_and_improve_on_both_starts(case, seed):
    module, net, x, input_set = case
    c = _objectives(net.shapes(tuple(x.shape[1:]))[-1][0], 1, seed)
    best, _ = pt.optimize_slopes(net, x, input_set, c, steps=5)
    start = torch.maximum(*(pt.DualNetwork(net, x, input_set, slopes=s).objective(c) for s in ("fixed", "adaptive")))
    assert (best >= start - SLACK).all()
    assert (best <= _sampled_min(module, x, input_set, c) + SLACK).all()


# -- LP and MILP ---------------------------------------------------------------------------------


@fast_no_shrink(12)
@given(cases(set_kinds=("linf", "linf-box"), batch=1), seeds)
def test_dual_lp_lp_all_milp_and_samples_are_ordered(case, seed):
    module, net, x, input_set = case
    c = _objectives(net.shapes(tuple(x.shape[1:]))[-1][0], 1, seed)
    dual = pt.DualNetwork(net, x, input_set).objective(c)[0]
    lp, lp_all = pt.RelaxedLP(net, x, input_set), pt.RelaxedLP(net, x, input_set, bounds="lp-all")
    assume(sum(lp_all.n_unstable) <= 40)
    milp = pt.ExactMILP(net, x, input_set, bounds="lp-all")
    sampled = _sampled_min(module, x, input_set, c)[0]
    for j in range(c.shape[0]):
        values = [float(dual[j]), lp.solve(c[j]).value, lp_all.solve(c[j]).value, milp.solve(c[j]).value,
                  float(sampled[j])]
        scale = 1e-7 * (1 + max(abs(v) for v in values))
        assert all(a <= b + scale for a, b in itertools.pairwise(values)), values
    for (lo, hi), (lo_all, hi_all) in zip(lp.layer_bounds(), lp_all.layer_bounds(), strict=True):
        assert (lo_all >= lo - SLACK).all() and (hi_all <= hi + SLACK).all()  # LP-all only tightens


@fast_no_shrink(15)
@given(cases(tiny=True, set_kinds=("linf",), batch=1, unstable=(0.1, 0.6)), seeds)
def test_milp_is_the_minimum_over_all_linear_pieces(case, seed):
    module, net, x, input_set = case
    c = _objectives(net.shapes(tuple(x.shape[1:]))[-1][0], 1, seed)[-1]
    milp = pt.ExactMILP(net, x, input_set)
    assume(sum(milp.n_unstable) <= 6)  # few pieces to enumerate
    exact = exact_min(module, x, float(input_set.eps), c)
    assume(exact is not None)
    value = milp.solve(c).value
    assert math.isclose(value, exact, rel_tol=1e-7, abs_tol=1e-7), (value, exact)


# -- branch and bound and certify ----------------------------------------------------------------


def _milp_margin(net: pt.Network, x: torch.Tensor, input_set: pt.InputSet, label: int) -> float:
    """The exact worst margin ``min_t min_x' f_label - f_t`` over the set."""
    milp = pt.ExactMILP(net, x, input_set)
    n_out = milp.n_out
    rows = torch.eye(n_out, dtype=DTYPE)[label] - torch.eye(n_out, dtype=DTYPE)
    return min(milp.solve(rows[t]).value for t in range(n_out) if t != label)


def _check_counterexample(module, x: torch.Tensor, input_set: pt.InputSet, label: int, point) -> None:
    point = torch.as_tensor(point, dtype=DTYPE).reshape(x.shape)
    assert in_set(input_set, x, point.unsqueeze(1)).all()
    out = module(point)[0]
    assert (torch.cat([out[:label], out[label + 1:]]) >= out[label]).any()  # misclassified in float64


@fast_no_shrink(12)
@given(cases(tiny=True, set_kinds=("linf", "linf-box"), batch=1), st.sampled_from(["relu", "input"]))
def test_bab_verdict_equals_the_milps(case, split):
    module, net, x, input_set = case
    label = int(module(x).argmax())
    margin = _milp_margin(net, x, input_set, label)
    assume(abs(margin) > TIE)
    result = verify_bab(net, x[0], label, input_set, options=BaBOptions(split=split, time_limit=20))
    assert result.status == ("certified" if margin > 0 else "not_robust"), (result, margin)
    if result.status == "not_robust":
        _check_counterexample(module, x, input_set, label, result.counterexample)
    else:
        assert result.bound <= margin + 1e-7


#: ``a`` certified implies ``b`` certified, on every example.
NESTED = [("dual", "optimized"), ("adaptive", "optimized"), ("dual", "lp"), ("lp", "milp"), ("bab", "milp"),
          ("milp", "bab"), ("cascade", "milp"), ("milp", "cascade")]


@fast_no_shrink(5)
@given(cases(tiny=True, set_kinds=("linf",), batch=2))
def test_certify_methods_are_nested_on_graphs(case):
    module, net, x, input_set = case
    y = module(x).argmax(1)
    margins = [_milp_margin(net, x[i:i + 1], input_set, int(y[i])) for i in range(len(x))]
    assume(all(abs(m) > TIE for m in margins))
    certified = {m: pt.certify(net, x, input_set, y, method=m) for m in ("dual", "adaptive", "optimized", "lp", "bab",
                                                                        "milp")}
    # certify(method="cascade") is this run of every rung; its verdicts also carry the counterexamples
    verdicts = Cascade(net, input_set).run(x, y, list(range(len(x))))
    certified["cascade"] = torch.tensor([v.verdict == "certified" for v in verdicts])
    for i, verdict in enumerate(verdicts):
        if verdict.verdict == "not_robust":
            _check_counterexample(module, x[i:i + 1], input_set, int(y[i]), verdict.counterexample)
    refuted = torch.tensor([m < 0 for m in margins])
    for method, verdict in certified.items():
        assert not (verdict & refuted).any(), method
    for a, b in NESTED:
        assert not (certified[a] & ~certified[b]).any(), (a, b)


class _Affine(nn.Module):
    """``A x + B x``: a graph without ReLU layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x) - 0.5 * self.b(x)


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(3, 2)), _Affine()], ids=["chain", "graph"])
def test_networks_without_relu_layers_are_bounded_exactly(model):
    model = model.to(DTYPE).requires_grad_(False)
    net = pt.Network.from_torch(model)
    x = torch.rand(2, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    y = model(x).argmax(1)
    c = torch.eye(2, dtype=DTYPE)
    best, _ = pt.optimize_slopes(net, x, pt.LinfBall(0.1), c, steps=3)
    torch.testing.assert_close(best, pt.DualNetwork(net, x, pt.LinfBall(0.1)).objective(c))
    for eps in (0.01, 5.0):
        expected = pt.certify(net, x, pt.LinfBall(eps), y, method="milp")
        assert torch.equal(pt.certify(net, x, pt.LinfBall(eps), y, method="optimized"), expected)
        for split, attack in itertools.product(("relu", "input"), (0, 20)):  # without PGD the bound decides
            options = BaBOptions(split=split, attack_steps=attack)
            status = verify_bab(net, x[0], int(y[0]), pt.LinfBall(eps), options=options).status
            assert status == ("certified" if expected[0] else "not_robust")


class _Edge(nn.Module):
    """``fn(self, x)`` over two Linear layers 3 -> 3 and a Conv2d 1 -> 2 (3x3, padding 1)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.fc1, self.fc2, self.conv = nn.Linear(3, 3), nn.Linear(3, 3), nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.fn(self, x)


#: Compilation corner cases: a ReLU or the input in the output, one value read by a ReLU and carried,
#: stacked ReLUs, a value added to itself, pooling with stride > kernel, kernel 1, padding, of the input.
EDGES = {
    "relu-output": (lambda s, x: torch.relu(s.fc1(x)), (3,)),
    "input-in-output": (lambda s, x: torch.cat([s.fc2(torch.relu(s.fc1(x))), x], 1), (3,)),
    "read-and-carried": (lambda s, x: s.fc2(torch.relu(s.fc1(x)) + s.fc1(x)), (3,)),
    "relu-of-relu": (lambda s, x: s.fc2(torch.relu(torch.relu(s.fc1(x))) - torch.relu(x)), (3,)),
    "self-sum": (lambda s, x: s.fc2(x + x) + x, (3,)),
    "residual-output": (lambda s, x: x + s.fc2(torch.relu(s.fc1(x))), (3,)),
    "pool-stride-3": (lambda s, x: F.max_pool2d(torch.relu(s.conv(x)), 2, 3).flatten(1), (1, 5, 5)),
    "pool-kernel-1": (lambda s, x: F.max_pool2d(s.conv(x), 1, 2).flatten(1), (1, 3, 3)),
    "pool-padded-relu-output": (lambda s, x: torch.relu(F.max_pool2d(s.conv(x), 3, 2, 1)).flatten(1), (1, 3, 4)),
    "pool-of-input": (lambda s, x: F.max_pool2d(s.conv(F.max_pool2d(x, 2, 1, 1)), 2).flatten(1), (1, 2, 3)),
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_compilation_corner_cases_are_bounded_and_decided_exactly(name):
    fn, shape = EDGES[name]
    gen = torch.Generator().manual_seed(1)
    module = _Edge(fn).to(DTYPE).requires_grad_(False)
    net = pt.Network.from_torch(module, shape)
    x = torch.rand((1, *shape), generator=gen, dtype=DTYPE) * 2 - 1
    input_set = pt.LinfBall(0.3 if len(shape) == 1 else 0.1)  # pooling trees of 9 taps: 4 ReLU layers
    out = module(x)
    torch.testing.assert_close(net.forward(x), out, rtol=1e-12, atol=1e-12)
    c = torch.randn((1, out.shape[1]), generator=gen, dtype=DTYPE)
    values = [float(pt.DualNetwork(net, x, input_set).objective(c)[0, 0]),
              pt.RelaxedLP(net, x, input_set).solve(c[0]).value,
              pt.RelaxedLP(net, x, input_set, bounds="lp-all").solve(c[0]).value,
              pt.ExactMILP(net, x, input_set).solve(c[0]).value, float(_sampled_min(module, x, input_set, c)[0, 0])]
    assert all(a <= b + 1e-8 for a, b in itertools.pairwise(values)), values
    label = int(out.argmax())
    margin = _milp_margin(net, x, input_set, label)
    for split in ("relu", "input"):
        result = verify_bab(net, x[0], label, input_set, options=BaBOptions(split=split))
        assert result.status == ("certified" if margin > 0 else "not_robust")
        if result.status == "not_robust":
            _check_counterexample(module, x, input_set, label, result.counterexample)
