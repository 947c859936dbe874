"""Tests of polytope.solvers.polygons (Appendix B.1, Figures 6-7) and the experiments' quick runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import polytope as pt
from polytope.model.errors import ShapeMismatchError
from polytope.solvers import polygons as pg

SMALL = (2, 40, 40, 2)


@pytest.fixture(scope="module")
def case() -> tuple[pt.Network, torch.Tensor, pt.LinfBall, pg.PolygonComparison]:
    """A random 2-40-40-2 network at eps = 0.15: several unstable ReLUs, a non-convex polytope."""
    net = pt.Network.from_torch(pg.random_network(SMALL, seed=3))
    x = torch.tensor([0.3, 0.6], dtype=torch.float64)
    s = pt.LinfBall(0.15)
    comp = pg.compare_polygons(net, x, s, k=48, n_side=161, n_boundary=2000)
    return net, x, s, comp


def test_case_is_not_trivial(case) -> None:
    net, x, s, comp = case
    dual = pt.DualNetwork(net, x.reshape(1, 2), s)
    assert sum(int(dual.index_sets(i).unstable.sum()) for i in range(net.n_relu)) >= 3
    assert comp.lp is not None and comp.lp.area > 1.01 * comp.true.area


def test_enumerated_points_inside_lp_and_dual(case) -> None:
    _, _, _, comp = case
    pts = comp.true.points
    assert comp.true.n_side**2 + 4 * 2000 == len(pts)
    scale = float(np.abs(pts).max())
    assert comp.lp.halfplanes.contains(pts, tol=1e-7 * scale).all()
    assert comp.dual.halfplanes.contains(pts, tol=1e-7 * scale).all()
    assert comp.lp.polygon.contains(comp.true.hull.vertices, tol=1e-7).all()


def test_lp_inside_dual_inside_layerwise(case) -> None:
    _, _, _, comp = case
    scale = float(np.abs(comp.dual.outer.vertices).max())
    # J(c) <= LP(c) for every c: the LP polygon's vertices satisfy all dual half-planes
    assert comp.dual.halfplanes.contains(comp.lp.outer.vertices, tol=1e-7 * scale).all()
    assert comp.layerwise.contains(comp.dual.outer.vertices).all()
    a = comp.areas()
    assert a["true_hull"] <= a["lp_outer"] * (1 + 1e-6)
    assert a["lp_outer"] <= a["dual"] * (1 + 1e-6)
    assert a["dual"] < a["layerwise"]


def test_refinement_closes_the_gap(case) -> None:
    """With edge-normal refinement the inner and outer polygons meet: the exact LP polytope."""
    _, _, _, comp = case
    for poly in (comp.lp, comp.dual):
        assert poly.converged
        assert poly.inner_area == pytest.approx(poly.area, rel=1e-6)
        assert all(s == "optimal" for s in poly.statuses)
        # the supporting points lie in their own polygon
        assert poly.halfplanes.contains(poly.points, tol=1e-7).all()


def test_dual_gradient_points_attain_the_bound() -> None:
    """Euler's identity for the positively homogeneous J: ``c^T grad J(c) = J(c)``."""
    net = pt.Network.from_torch(pg.random_network(SMALL, seed=4))
    x = torch.rand(1, 2, dtype=torch.float64)
    dual = pt.DualNetwork(net, x, pt.LinfBall(0.2))
    dirs = pg.directions(16)
    values, points, _ = pg.dual_oracle(dual)(dirs)
    np.testing.assert_allclose(np.einsum("kd,kd->k", dirs, points), values, rtol=1e-9, atol=1e-9)


def test_stable_network_polygon_is_exact() -> None:
    """No unstable ReLU on the box: f is affine there, the polytope a parallelogram, the LP exact."""
    net = pt.Network.from_torch(pg.random_network(SMALL, seed=5))
    x = torch.tensor([0.5, 0.5], dtype=torch.float64)
    s = pt.LinfBall(1e-3)
    dual = pt.DualNetwork(net, x.reshape(1, 2), s)
    assert all(int(dual.index_sets(i).unstable.sum()) == 0 for i in range(net.n_relu))
    comp = pg.compare_polygons(net, x, s, k=32, n_side=21, n_boundary=10)
    assert len(comp.true.hull.vertices) == 4
    assert comp.lp.area == pytest.approx(comp.true.area, rel=1e-6)
    assert comp.dual.area == pytest.approx(comp.true.area, rel=1e-6)
    # without refinement, 32 uniform directions overshoot the corners a little
    coarse = pg.lp_polygon(net, x, s, k=32, max_extra=0)
    assert comp.true.area <= coarse.area <= 1.5 * comp.true.area


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)),
        nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)),
        nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2)),
    ],
    ids=["3-in", "3-out", "conv"],
)
def test_refuses_non_planar_networks(model: nn.Sequential) -> None:
    net = pt.Network.from_torch(model.double())
    with pytest.raises(ShapeMismatchError, match="2 inputs and 2 outputs"):
        pg.true_polytope(net, torch.zeros(2, dtype=torch.float64), pt.LinfBall(0.1))
    with pytest.raises(ShapeMismatchError, match="2 inputs and 2 outputs"):
        pg.dual_polygon(net, torch.zeros(2, dtype=torch.float64), pt.LinfBall(0.1))
    with pytest.raises(ShapeMismatchError, match="2 inputs and 2 outputs"):
        pg.lp_polygon(net, torch.zeros(2, dtype=torch.float64), pt.LinfBall(0.1))


def test_refuses_bad_point_and_non_box_set() -> None:
    net = pt.Network.from_torch(pg.random_network(SMALL, seed=0))
    with pytest.raises(ShapeMismatchError, match="one 2-D point"):
        pg.true_polytope(net, torch.zeros(2, 2, dtype=torch.float64), pt.LinfBall(0.1))
    with pytest.raises(pt.PolytopeError, match="l_inf"):
        pg.true_polytope(net, torch.zeros(2, dtype=torch.float64), pt.L2Ball(0.1))


# ---------------------------------------------------------------------------------------------
# half-plane geometry
# ---------------------------------------------------------------------------------------------
def test_halfplane_polygon_square_and_regular_polygon() -> None:
    square = pg.halfplane_polygon(np.array([[1, 0], [-1, 0], [0, 1], [0, -1]]), np.array([-1, -1, -2, -2]))
    assert square.area == pytest.approx(2 * 4)
    k = 64
    dirs = pg.directions(k)
    poly = pg.HalfPlanes(dirs, -np.ones(k)).polygon()  # circumscribes the unit disc
    assert poly.area == pytest.approx(k * np.tan(np.pi / k), rel=1e-9)
    assert poly.contains(np.array([[0.0, 0.0], [0.99, 0.0]])).all()
    assert not poly.contains(np.array([[1.01, 0.0]])).any()


def test_halfplane_polygon_empty_and_unbounded() -> None:
    empty = pg.halfplane_polygon(np.array([[1.0, 0.0], [-1.0, 0.0], [0, 1], [0, -1]]), np.array([1.0, 0.0, 0, 0]))
    assert empty.area == 0.0
    with pytest.raises(ValueError, match="unbounded"):
        pg.halfplane_polygon(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0.0, 0.0]))


def test_hausdorff_gap_of_nested_squares() -> None:
    def square(h: float) -> pg.Polygon:
        return pg.Polygon(np.array([[-h, -h], [h, -h], [h, h], [-h, h]]))

    assert pg.hausdorff_gap(square(1.0), square(2.0)) == pytest.approx(np.sqrt(2.0))
    assert pg.hausdorff_gap(square(1.0), square(1.0)) == pytest.approx(0.0, abs=1e-12)
    assert pg.diameter(square(1.0)) == pytest.approx(2 * np.sqrt(2.0))
    np.testing.assert_allclose(pg.distance_to_polygon(np.array([[0.0, 0.0], [3.0, 0.0]]), square(1.0)), [0.0, 2.0])


def test_gaps_are_consistent(case) -> None:
    _, _, _, comp = case
    gaps = comp.gaps()
    assert 0 <= gaps["lp"] <= gaps["dual"] + 1e-9 <= gaps["layerwise"] + 2e-9


def test_support_polygon_recovers_a_point_set_hull() -> None:
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(40, 2)) * [3.0, 0.05]  # thin: uniform directions alone are poor

    def oracle(dirs: np.ndarray):
        scores = dirs @ pts.T
        best = scores.argmin(1)
        return scores.min(1), pts[best], ["optimal"] * len(dirs)

    hull = pg.convex_hull(pts)
    coarse = pg.support_polygon(oracle, k=8, max_extra=0)
    refined = pg.support_polygon(oracle, k=8, max_extra=200)
    assert coarse.area > 1.05 * hull.area
    assert refined.converged
    assert refined.area == pytest.approx(hull.area, rel=1e-9)
    assert refined.inner_area == pytest.approx(hull.area, rel=1e-9)


def test_rasterize_covers_grid_image(case) -> None:
    net, _, _, comp = case
    view = np.stack([comp.dual.outer.vertices.min(0), comp.dual.outer.vertices.max(0)])
    occ = pg.rasterize(net, comp.true.input_box, view, bins=60, base=21)
    idx = np.floor((comp.true.grid_image - view[0]) / (view[1] - view[0]) * 60).astype(int).clip(0, 59)
    # samples lie <= 2/3 pixel apart along each cell's edges: a pixel may still slip through a kink
    assert occ[idx[:, 1], idx[:, 0]].mean() > 0.99
    assert 0 < occ.mean() < 1


# ---------------------------------------------------------------------------------------------
# the experiments' --quick runs
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_experiment_quick_runs(tmp_path: Path) -> None:
    from experiments import fig3_toy2d, fig6_polytopes, fig7_polytope_trained, ranges_table

    modules = {
        "fig6_polytopes": fig6_polytopes,
        "ranges_table": ranges_table,
        "fig3_toy2d": fig3_toy2d,
        "fig7_polytope_trained": fig7_polytope_trained,  # reuses fig3's saved model
    }
    extra = {"fig6_polytopes": ["--nets", "1"]}  # one column of panels keeps the test short
    for name, module in modules.items():
        assert module.main(["--quick", "--no-progress", "--out", str(tmp_path), *extra.get(name, [])]) == 0
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
        assert (tmp_path / f"{name}.csv").stat().st_size > 0
    assert (tmp_path / "fig3_toy2d_robust.pt").exists()


@pytest.mark.parametrize("name", ["fig6_polytopes", "ranges_table", "fig3_toy2d", "fig7_polytope_trained"])
def test_experiment_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    module = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out
