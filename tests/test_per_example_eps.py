"""One eps per example: every method accepts it, and each example's result is the one it gets alone.

A mixed batch (zeros included) must give, example by example, what that example gets with its
own scalar eps: the set of a subset of a batch is taken by :meth:`InputSet.subset` everywhere.
"""

from __future__ import annotations

import math

import pytest
import torch
from strategies import build_fc, make_set

import polytope as pt
from polytope.bounds.slopes import optimize_slopes
from polytope.verifiers.cascade import RUNGS, Cascade
from polytope.verifiers.robust import certificate_margins, margin_objective

# per set kind: radii from 0 (the point itself) to wide enough that examples reach the LP and MILP rungs
# and some are not robust
EPS = {
    "linf": [0.0, 0.3, 0.5, 0.0, 0.8],
    "linf-box": [0.0, 0.3, 0.8, 0.0, 0.5],
    "l2": [0.0, 0.6, 1.0, 0.0, 0.3],
    "l1": [0.0, 0.9, 1.5, 0.0, 0.45],
}
SOLVER_RUNGS = ("lp", "lp-all", "milp")  # no HiGHS form of the l2 ball (RelaxedLP raises SolverError)
TOL = 1e-7  # float64 dual bounds and HiGHS solves (tolerance 1e-9) of the same problem
OPT_TOL = 1e-3  # optimised slopes: the same ascent per example, up to rounding amplified by the steps


def _case(kind: str) -> tuple[pt.Network, torch.Tensor, torch.Tensor, torch.Tensor]:
    net = pt.Network.from_torch(build_fc(4, [8, 8], 3, seed=7).double())
    x = torch.rand(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = net.forward(x).argmax(1)
    return net, x, y, torch.tensor(EPS[kind], dtype=torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    both_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    return bool((both_inf | ((a - b).abs() <= tol * (1 + b.abs()))).all())


def _sampled_margins(net: pt.Network, x: torch.Tensor, y: torch.Tensor, input_set: pt.InputSet) -> torch.Tensor:
    """``min f_y - f_j`` over 512 points of the set, per example and target: above every sound lower bound."""
    pts = input_set.sample(x, 512, generator=torch.Generator().manual_seed(0))
    f = net.forward(pts.flatten(0, 1)).reshape(*pts.shape[:2], -1)
    return (f.gather(2, y[:, None, None].expand(-1, pts.shape[1], 1)) - f).amin(1)


@pytest.mark.parametrize("kind", ["linf", "linf-box", "l2", "l1"])
@pytest.mark.parametrize("method", ["dual", "adaptive"])
def test_bound_methods_match_each_example_alone(kind: str, method: str) -> None:
    net, x, y, eps = _case(kind)
    batch = certificate_margins(net, x, y, make_set(kind, eps), method)
    assert batch.shape == (5, 3)
    for k in range(5):
        alone = certificate_margins(net, x[k:k + 1], y[k:k + 1], make_set(kind, float(eps[k])), method)
        assert _close(batch[k], alone[0], TOL), (k, batch[k], alone[0])


@pytest.mark.parametrize("kind", ["linf", "linf-box", "l2", "l1"])
def test_optimized_certificate_margins_use_each_examples_eps(kind: str) -> None:
    """``certify(method="optimized")`` stops an example on a stall (``patience``), which a rounding-level
    improvement can postpone in one batch composition and not in another, so its margins are not compared
    with the example alone (that is :func:`test_optimize_slopes_shrinking_batch`).  Each must lie between
    that example's own warm start (fixed and adaptive slopes at its eps) and sampled values of its own set."""
    net, x, y, eps = _case(kind)
    batch = certificate_margins(net, x, y, make_set(kind, eps), "optimized")
    for k in range(5):
        own = make_set(kind, float(eps[k]))
        xk, yk = x[k:k + 1], y[k:k + 1]
        start = torch.maximum(*(certificate_margins(net, xk, yk, own, m)[0] for m in ("dual", "adaptive")))
        assert bool((batch[k] >= start - TOL * (1 + start.abs())).all()), (k, batch[k], start)
        assert bool((batch[k] <= _sampled_margins(net, xk, yk, own)[0] + TOL).all()), k


@pytest.mark.parametrize("kind", ["linf", "l1"])
def test_optimize_slopes_shrinking_batch(kind: str) -> None:
    """Examples leave the batch at different steps (the zero radii at once, others once certified): the set
    shrinks with the batch.  ``patience = steps``: no example leaves on a stall, which a rounding-level
    improvement could postpone in one batch composition and not in another."""
    net, x, y, eps = _case(kind)
    c = margin_objective(y, 3, x.dtype)

    def run(x: torch.Tensor, c: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
        return optimize_slopes(net, x, make_set(kind, eps), c, steps=8, patience=8, until_positive=True)[0]

    j = run(x, c, eps)
    for k in range(5):
        alone = run(x[k:k + 1], c[k:k + 1], float(eps[k]))
        assert _close(j[k], alone[0], OPT_TOL), (k, j[k], alone[0])


def _verdicts(net: pt.Network, x: torch.Tensor, y: torch.Tensor, input_set: pt.InputSet,
              rungs: tuple[str, ...]) -> list:
    return Cascade(net, input_set, rungs=rungs, time_limit=30).run(x, y, list(range(len(x))))


@pytest.mark.parametrize("kind", ["linf", "linf-box", "l2", "l1"])
@pytest.mark.parametrize("method", ["lp", "lp-all", "bab", "milp", "cascade"])
def test_solver_methods_match_each_example_alone(kind: str, method: str) -> None:
    if kind == "l2" and method in SOLVER_RUNGS:
        pytest.skip("the LP and MILP have no l2 form")
    net, x, y, eps = _case(kind)
    rungs = RUNGS if method == "cascade" else (method,)
    certified = pt.certify(net, x, make_set(kind, eps), y, method=method)
    batch = _verdicts(net, x, y, make_set(kind, eps), rungs)
    for k in range(5):
        alone = _verdicts(net, x[k:k + 1], y[k:k + 1], make_set(kind, float(eps[k])), rungs)[0]
        assert batch[k].verdict == alone.verdict, (k, batch[k], alone)
        assert bool(certified[k]) == (alone.verdict == "certified")
        # PGD's step follows the batch; the optimised rung's stall rule is not batch-invariant (see above)
        for rung in (set(batch[k].margins) & set(alone.margins)) - {"attack", "optimized"}:
            a, b = batch[k].margins[rung], alone.margins[rung]
            assert (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= TOL * (1 + abs(b)), (k, rung, a, b)
    # the zero radii: the point itself, correctly classified, is certified by every method
    assert all(batch[k].verdict == "certified" for k in (0, 3))


def test_subset_indexes_per_example_eps_and_keeps_a_shared_one() -> None:
    per = pt.L1Ball(torch.tensor([0.0, 0.1, 0.2, 0.3]))
    assert per.subset(4, 2).eps.tolist() == pytest.approx([0.2])
    assert per.subset(4, [3, 0]).eps.tolist() == pytest.approx([0.3, 0.0])
    assert per.subset(4, torch.tensor([True, False, True, False])).eps.tolist() == pytest.approx([0.0, 0.2])
    assert per.subset(4, slice(1, 3)).eps.tolist() == pytest.approx([0.1, 0.2])
    assert per.rows(4, 1, 3).eps.tolist() == pytest.approx([0.1, 0.2])
    shared = pt.LinfBall(0.25)
    assert shared.subset(4, [1, 2]) is shared
