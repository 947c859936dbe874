"""Bad input gets one named error before any work starts; no NaN is ever reported as a proof.

Objectives, cutoffs and slopes are checked at every public entry point; an ``LPResult`` cannot be
built with a non-finite value under ``optimal`` or a non-finite bound under ``cutoff``; labels, radii,
option names and device names are checked; an empty batch gives empty per-example results.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from strategies import build_fc
from torch import nn

import polytope as pt
from polytope.bounds.alpha import optimize_alpha
from polytope.model.checks import check_device
from polytope.solvers.highs import LPResult
from polytope.solvers.lp import RelaxedLP, RelaxedLPCvxpy
from polytope.solvers.milp import ExactMILP
from polytope.verifiers.cascade import Cascade
from polytope.verifiers.tightness import tightness_rows

NAN = float("nan")
ROOT = Path(__file__).resolve().parents[1]


def _fc(dtype: torch.dtype = torch.float64) -> pt.Network:
    return pt.Network.from_torch(build_fc(4, [6, 6], 3, seed=1).to(dtype))


def _x(n: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.rand(n, 4, dtype=dtype, generator=torch.Generator().manual_seed(0))


def _conv() -> pt.Network:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    return pt.Network.from_torch(seq.double())


# -- objectives and cutoffs (NaN never reaches a solver) -------------------------------------------
NAN_C = [torch.tensor([1.0, NAN, 0.0]), torch.tensor([1.0, -1.0, math.inf]), np.array([NAN, 1.0, 0.0])]


def test_milp_nan_objective_is_refused_not_hung() -> None:
    """HiGHS hangs on a NaN cost (no signal interrupts it): the check runs in a child with a timeout."""
    code = textwrap.dedent("""
        import torch, polytope as pt
        from polytope.solvers.milp import ExactMILP
        net = pt.Network.from_torch(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(),
                                                        torch.nn.Linear(6, 3)).double())
        milp = ExactMILP(net, torch.full((4,), 0.5, dtype=torch.float64), pt.LinfBall(0.5))
        try:
            milp.solve(torch.tensor([1.0, float("nan"), -1.0]))
        except pt.InvalidObjectiveError:
            print("refused")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.strip() == "refused", out.stderr[-2000:]


@pytest.mark.parametrize("c", NAN_C, ids=["nan", "inf", "numpy-nan"])
def test_solvers_refuse_non_finite_objectives(c) -> None:
    net, x = _fc(), _x(1)[0]
    with pytest.raises(pt.InvalidObjectiveError):
        RelaxedLP(net, x, pt.LinfBall(0.3)).solve(c)
    with pytest.raises(pt.InvalidObjectiveError):
        RelaxedLP(net, x, pt.LinfBall(0.3)).solve_many(torch.stack([torch.tensor([1.0, -1.0, 0.0]),
                                                                    torch.as_tensor(c, dtype=torch.float32)]))
    with pytest.raises(pt.InvalidObjectiveError):
        RelaxedLPCvxpy(net, x, pt.LinfBall(0.3)).solve(c)


@pytest.mark.parametrize("cutoff", [NAN, math.inf, -math.inf, "0", True])
def test_milp_refuses_a_non_finite_cutoff(cutoff) -> None:
    """A NaN cutoff once came back as status ``cutoff``: the status that claims ``min >= cutoff`` is proven."""
    milp = ExactMILP(_fc(), _x(1)[0], pt.LinfBall(0.3))
    with pytest.raises(pt.InvalidObjectiveError, match="cutoff"):
        milp.solve(torch.tensor([1.0, -1.0, 0.0]), cutoff=cutoff)


def test_dual_and_slope_optimisers_refuse_non_finite_objectives() -> None:
    net, x = _fc(), _x()
    c = torch.tensor([[[1.0, NAN, 0.0]], [[1.0, -1.0, 0.0]]], dtype=torch.float64)
    dual = pt.DualNetwork(net, x, pt.LinfBall(0.3))
    with pytest.raises(pt.InvalidObjectiveError):
        dual.objective(c)
    with pytest.raises(pt.InvalidObjectiveError):
        pt.optimize_slopes(net, x, pt.LinfBall(0.3), c)
    with pytest.raises(pt.InvalidObjectiveError):
        optimize_alpha(dual, c, steps=2)


def test_lp_result_cannot_report_nan_as_a_proof() -> None:
    with pytest.raises(pt.SolverError):
        LPResult(NAN, "optimal", None, 0.0)
    with pytest.raises(pt.SolverError):
        LPResult(math.inf, "optimal", None, 0.0)
    with pytest.raises(pt.SolverError):
        LPResult(NAN, "cutoff", None, 0.0, bound=NAN)
    assert LPResult(NAN, "time_limit", None, 0.0).status == "time_limit"  # no claim, no check
    assert LPResult(NAN, "cutoff", None, 0.0, bound=0.0).bound == 0.0


def test_a_nan_optimum_from_the_solver_is_an_error_not_a_verdict(monkeypatch) -> None:
    """The guard where results are built: a solver that returns NaN at "optimal" raises SolverError, and the
    cascade's LP rung records an error instead of a bound."""
    net, x = _fc(), _x(1)
    lp = RelaxedLP(net, x[0], pt.LinfBall(0.3))
    monkeypatch.setattr(type(lp.model), "objective_value", lambda self: NAN)
    with pytest.raises(pt.SolverError, match="optimum"):
        lp.solve(torch.tensor([1.0, -1.0, 0.0]))
    y = net.forward(x).argmax(1)
    verdict = Cascade(net, pt.LinfBall(0.3), rungs=("lp",)).run(x, y, [0])[0]
    assert verdict.verdict == "error" and verdict.rung == "lp"


# -- slopes: one rule everywhere (reject outside [0, 1] and NaN) ----------------------------------
@pytest.mark.parametrize("value", [1.5, -0.25, NAN])
def test_slopes_outside_unit_interval_are_rejected_everywhere(value: float) -> None:
    """Custom slopes were clamped silently while ``alpha`` was rejected: both are rejected now."""
    net, x = _fc(), _x()
    bad = [torch.full((2, 6), value, dtype=torch.float64), torch.full((2, 6), 0.5, dtype=torch.float64)]
    with pytest.raises(pt.InvalidSlopesError):
        pt.DualNetwork(net, x, pt.LinfBall(0.3), slopes=bad)
    with pytest.raises(pt.InvalidSlopesError):
        pt.DualNetwork(net, x, pt.LinfBall(0.3)).objective(torch.eye(3, dtype=torch.float64), bad)


def test_slopes_at_the_ends_of_the_interval_are_accepted() -> None:
    net, x = _fc(), _x()
    ends = [torch.zeros(2, 6, dtype=torch.float64), torch.ones(2, 6, dtype=torch.float64)]
    j = pt.DualNetwork(net, x, pt.LinfBall(0.3), slopes=ends).objective(torch.eye(3, dtype=torch.float64))
    assert bool(torch.isfinite(j).all())


# -- option names ------------------------------------------------------------------------------
def test_unknown_options_name_their_choices() -> None:
    net, x = _fc(), _x()
    y = torch.tensor([0, 1])
    with pytest.raises(pt.UnknownOptionError, match="'dual', 'adaptive', 'optimized', 'lp', 'lp-all', 'bab', 'milp'"):
        pt.certify(net, x, pt.LinfBall(0.1), method="exact")
    with pytest.raises(pt.UnknownOptionError, match="'fixed', 'adaptive', 'optimized'"):
        pt.margin_bounds(net, x, y, pt.LinfBall(0.1), slopes="optimised")
    with pytest.raises(pt.UnknownOptionError, match="'fixed', 'adaptive'"):
        pt.DualNetwork(net, x, pt.LinfBall(0.1), slopes="optimized")
    with pytest.raises(pt.UnknownOptionError, match="'auto', 'forward', 'backward', 'patches'"):
        pt.DualNetwork(net, x, pt.LinfBall(0.1), order="sideways")
    with pytest.raises(pt.UnknownOptionError, match="'dual', 'lp-all'"):
        RelaxedLP(net, x[0], pt.LinfBall(0.1), bounds="milp")
    with pytest.raises(pt.UnknownOptionError, match="'dual', 'lp-all'"):
        ExactMILP(net, x[0], pt.LinfBall(0.1), bounds="exact")
    with pytest.raises(pt.UnknownOptionError, match="choose from"):
        Cascade(net, pt.LinfBall(0.1), rungs=("dual", "pgd"))
    with pytest.raises(pt.UnknownOptionError, match="'adam', 'sgd'"):
        optimize_alpha(pt.DualNetwork(net, x, pt.LinfBall(0.1)), torch.eye(3, dtype=torch.float64), optimizer="lbfgs")


@pytest.mark.parametrize("kwargs", [{"steps": -1}, {"steps": 2.5}, {"patience": 0}, {"patience": True}])
def test_optimize_slopes_checks_its_budget(kwargs) -> None:
    with pytest.raises(pt.InvalidInputError):
        pt.optimize_slopes(_fc(), _x(), pt.LinfBall(0.1), torch.eye(3, dtype=torch.float64), **kwargs)


def test_tightness_rows_checks_targets() -> None:
    with pytest.raises(pt.ShapeMismatchError, match="targets"):
        tightness_rows(_fc(), _x(1)[0], 0, pt.LinfBall(0.1), targets=[1, 3])


# -- labels and radii -------------------------------------------------------------------------------
@pytest.mark.parametrize("labels", [torch.tensor([0.0, 1.0]), torch.tensor([True, False])], ids=["float", "bool"])
def test_non_integer_labels_are_refused(labels: torch.Tensor) -> None:
    net, x = _fc(), _x()
    with pytest.raises(pt.InvalidInputError, match="integer"):
        pt.certify(net, x, pt.LinfBall(0.1), labels)
    with pytest.raises(pt.InvalidInputError, match="integer"):
        pt.robust_loss(net, x, labels, pt.LinfBall(0.1))
    with pytest.raises(pt.InvalidInputError, match="integer"):
        pt.margin_bounds(net, x, labels, pt.LinfBall(0.1))


@pytest.mark.parametrize("eps", ["0.1", True, torch.tensor([True, False]), torch.tensor([0.1 + 0j, 0.2])],
                         ids=["string", "bool", "bool-tensor", "complex-tensor"])
def test_eps_must_be_a_real_number(eps) -> None:
    with pytest.raises(pt.InvalidEpsilonError):
        pt.certify(_fc(), _x(), pt.LinfBall(eps))


@pytest.mark.parametrize("eps", [1e39, torch.tensor([1e39, 0.1], dtype=torch.float64)], ids=["float", "tensor"])
def test_eps_must_be_representable_in_the_dtype(eps) -> None:
    """1e39 overflows float32 (torch raised a bare RuntimeError for the float, inf for the tensor)."""
    with pytest.raises(pt.InvalidEpsilonError, match=r"not representable in torch\.float32"):
        pt.certify(_fc(torch.float32), _x(dtype=torch.float32), pt.LinfBall(eps))


def test_numpy_and_integer_radii_are_numbers() -> None:
    for eps in (np.float32(0.1), np.float64(0.1), 0, np.int64(0)):
        assert pt.LinfBall(eps).radius(_x()).shape == (2,)


# -- devices ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:99", "meta"])
def test_unknown_or_missing_devices_are_named(name: str) -> None:
    with pytest.raises(pt.DeviceError):
        check_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_device_error() -> None:
    with pytest.raises(pt.DeviceError, match="CUDA is not available"):
        check_device("cuda")


def test_cpu_is_a_device() -> None:
    assert check_device("cpu") == torch.device("cpu")


# -- empty batches: empty per-example results, a named error for the batch mean ------------------
METHODS = ["dual", "adaptive", "optimized", "lp", "lp-all", "milp", "cascade"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("with_labels", [False, True])
def test_empty_batch_on_a_conv_net_gives_empty_verdicts(method: str, with_labels: bool) -> None:
    net, x = _conv(), torch.rand(0, 1, 8, 8, dtype=torch.float64)
    y = torch.zeros(0, dtype=torch.long) if with_labels else None
    out = pt.certify(net, x, pt.LinfBall(0.1), y, method=method)
    assert out.shape == (0,) and out.dtype == torch.bool


@pytest.mark.parametrize("slopes", ["fixed", "adaptive", "optimized"])
def test_empty_batch_margins_and_dual(slopes: str) -> None:
    net, x, y = _conv(), torch.rand(0, 1, 8, 8, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    assert pt.margin_bounds(net, x, y, pt.LinfBall(0.1), slopes).shape == (0, 3)
    if slopes != "optimized":
        dual = pt.DualNetwork(net, x, pt.LinfBall(0.1), slopes=slopes)
        assert dual.objective(torch.zeros(0, 2, 3, dtype=torch.float64)).shape == (0, 2)


def test_robust_loss_of_an_empty_batch_is_refused() -> None:
    """Its mean over no examples was NaN (a NaN loss poisons training silently)."""
    net, x, y = _conv(), torch.rand(0, 1, 8, 8, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    with pytest.raises(pt.InvalidInputError, match="non-empty batch"):
        pt.robust_loss(net, x, y, pt.LinfBall(0.1))
