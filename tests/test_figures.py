"""The figures as a reader sees them: scales, ticks, reference lines, the plotted point, and ``--replot``.

``--replot`` redraws a figure from the CSV a full run committed under ``figures/``; these tests
copy those CSVs into a temporary folder, so they need neither models nor data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from experiments import fig5_radii, fig6_polytopes, fig7_polytope_trained, fig10_index_sets, ladder
from polytope import LinfBall, Network
from polytope.solvers.polygons import compare_polygons, random_network

FIGURES = Path(__file__).resolve().parents[1] / "figures"


def committed(tmp_path: Path, *names: str) -> Path:
    """Copy committed CSVs into ``tmp_path``; skip when a checkout lacks them."""
    for name in names:
        if not (FIGURES / name).is_file():
            pytest.skip(f"{FIGURES / name} not in this checkout")
        shutil.copy(FIGURES / name, tmp_path / name)
    return tmp_path


def replot(module, tmp_path: Path, stem: str, csv: str, *extra: str) -> None:
    """``--replot`` writes the PNG and leaves the CSV byte-identical."""
    before = (tmp_path / csv).read_bytes()
    assert module.main(["--replot", "--out", str(tmp_path), *extra]) == 0
    assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
    assert (tmp_path / csv).read_bytes() == before


# ---------------------------------------------------------------------------------------------
# --replot paths
# ---------------------------------------------------------------------------------------------
def test_fig5_replot(tmp_path: Path) -> None:
    replot(fig5_radii, committed(tmp_path, "fig5_radii.csv"), "fig5_radii", "fig5_radii.csv")


def test_fig10_replot(tmp_path: Path) -> None:
    replot(fig10_index_sets, committed(tmp_path, "fig10_index_sets.csv"), "fig10_index_sets", "fig10_index_sets.csv")


@pytest.mark.parametrize(
    ("stem", "extra"),
    [
        ("ladder_mnist", []),
        ("ladder_mnist_box", ["--clip", "0", "1"]),
        ("ladder_fashion_mnist", ["--dataset", "fashion_mnist"]),
    ],
)
def test_ladder_replot(stem: str, extra: list[str], tmp_path: Path) -> None:
    csv = f"{stem}_summary.csv"
    replot(ladder, committed(tmp_path, csv), stem, csv, *extra)


@pytest.mark.parametrize("module", [fig5_radii, fig10_index_sets, ladder])
def test_replot_without_csv_is_a_usage_error(module, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        module.main(["--replot", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--replot" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Figure 5: one y scale; misclassified points explained
# ---------------------------------------------------------------------------------------------
def test_fig5_panels_share_one_y_scale() -> None:
    table = pd.DataFrame(
        {
            "model": ["standard"] * 3 + ["robust"] * 3,
            "correct": [True, True, False, True, True, False],
            "radius": [0.01, 0.02, 0.005, 0.1, 0.12, 0.03],
        }
    )
    fig = fig5_radii.plot(table, "test")
    standard, robust = fig.axes[:2]
    assert standard.get_ylim() == robust.get_ylim()
    assert standard.get_ylim()[0] == 0.0 and standard.get_ylim()[1] >= 0.12
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert any("misclassified" in t and "Corollary 2" in t for t in labels)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Figure 10: each panel on its data's range
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("units", [100, 3136])
def test_fraction_bins_hold_every_value_between_grid_points(units: int) -> None:
    values = np.array([3, 5, 5, 9, 40]) / units
    edges = fig10_index_sets.fraction_bins(values, units)
    assert len(edges) - 1 <= fig10_index_sets.MAX_BINS
    counts, _ = np.histogram(values, bins=edges)
    assert counts.sum() == len(values)
    # no value k / units within a quarter grid step of an edge (edges lie halfway between)
    assert np.abs(values[:, None] - edges[None, :]).min() > 0.25 / units


def test_fig10_x_range_follows_the_data() -> None:
    rng = np.random.default_rng(0)
    unstable = rng.integers(0, 60, 50) / 3136
    table = pd.DataFrame(
        {
            "example": range(50),
            "layer": 1,
            "units": 3136,
            "negative": 0.7,
            "positive": 0.3 - unstable,
            "unstable": unstable,
        }
    )
    fig = fig10_index_sets.plot(table, "test")
    lo, hi = fig.axes[2].get_xlim()
    assert lo <= unstable.min() and hi >= unstable.max()
    assert hi - lo < 0.05  # was the whole [0, 1]
    assert "3136 units" in fig.axes[2].get_xlabel()
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the ladder: the run's own exact value, on a visible line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("csv", "clip", "exact"),
    [("ladder_mnist_summary.csv", None, "4.38%"), ("ladder_mnist_box_summary.csv", [0.0, 1.0], "4.30%")],
)
def test_ladder_marks_its_own_exact_value_on_a_line_of_its_own(csv: str, clip, exact: str, tmp_path: Path) -> None:
    summary = pd.read_csv(committed(tmp_path, csv) / csv)
    fig = ladder.plot(summary, "mnist", clip)
    ax = fig.axes[0]
    heights = [float(line.get_ydata()[0]) for line in ax.get_lines()]
    assert len(set(heights)) == len(heights), "two reference lines on top of each other"
    labels = [line.get_label() for line in ax.get_lines()]
    assert sum(label.startswith("exact robust error here") and label.endswith(exact) for label in labels) == 1
    assert not any("4.38" in label for label in labels if exact != "4.38%")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Figures 6 and 7
# ---------------------------------------------------------------------------------------------
def test_fig6_panels_to_scale_with_few_ticks() -> None:
    net, x = fig6_polytopes.random_case(0, 0)
    comps, rows = {}, []
    for eps in (0.05, 0.25):
        comp = compare_polygons(net, x, LinfBall(eps), k=16, n_side=41, n_boundary=200)
        comps[(0, eps)] = comp
        rows.append(fig6_polytopes.record(0, x, eps, comp, fig6_polytopes.n_unstable(net, x, eps)))
    fig = fig6_polytopes.plot(comps, pd.DataFrame(rows), seed=0, bins=40)
    fig.canvas.draw()
    for ax in fig.axes:
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        assert ax.get_aspect() == 1.0 and x1 - x0 == pytest.approx(y1 - y0, rel=1e-9)
        for ticks, (lo, hi) in ((ax.get_xticks(), (x0, x1)), (ax.get_yticks(), (y0, y1))):
            assert 2 <= ((ticks >= lo) & (ticks <= hi)).sum() <= fig6_polytopes.MAX_TICKS
    plt.close(fig)


def test_fig7_margin_model_maps_outputs_to_margin_coordinates() -> None:
    model = random_network((2, 20, 20, 2), seed=0)
    x = torch.rand(64, 2, dtype=torch.float64)
    for label in (0, 1):
        net_m = fig7_polytope_trained.margin_model(model, label)
        with torch.no_grad():
            z, zm = model(x), net_m.forward(x)
        margin = z[:, label] - z[:, 1 - label]
        torch.testing.assert_close(zm, torch.stack([margin, z.sum(1)], 1), rtol=1e-10, atol=1e-10)


def test_fig7_chooses_the_fullest_converged_point() -> None:
    rows = [
        {"point": 0, "lp_converged": False, "view_fill": 0.9},
        {"point": 1, "lp_converged": True, "view_fill": 0.01},
        {"point": 2, "lp_converged": True, "view_fill": 0.02},
    ]
    assert fig7_polytope_trained.choose_point(rows) == 2
    assert fig7_polytope_trained.choose_point([{**r, "lp_converged": False} for r in rows]) == 0


def test_fig7_view_fill_is_the_hull_share_of_the_square_view() -> None:
    net = Network.from_torch(random_network((2, 10, 2), seed=1, dtype=torch.float64))
    comp = compare_polygons(
        net, torch.tensor([0.4, 0.6], dtype=torch.float64), LinfBall(0.1), k=16, n_side=31, n_boundary=100
    )
    fill = fig7_polytope_trained.view_fill(comp)
    assert 0.0 < fill < 1.0
    side = np.ptp(np.concatenate([p.vertices for p in fig7_polytope_trained._plot.comparison_polygons(comp)]), 0).max()
    assert fill == pytest.approx(comp.true.area / (side * 1.08) ** 2, rel=1e-9)
