"""The README's first command: the main job writes Figures 6, 3, 7 and the ranges table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from polytope.commands.main import main


def test_reproduce_main_quick_writes_every_figure(tmp_path: Path) -> None:
    assert main(["reproduce", "main", "--quick", "--out", str(tmp_path)]) == 0
    for name in ("fig6_polytopes", "ranges_table", "fig3_toy2d", "fig7_polytope_trained"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000, name
        assert len(pd.read_csv(tmp_path / f"{name}.csv")) > 0, name
    summary = pd.read_csv(tmp_path / "fig6_polytopes_summary.csv")
    # every outer bound contains the true polytope: area ratios of at least 1 (up to grid resolution)
    assert (summary["ratio_lp_outer_min"] >= 0.99).all()
    assert (summary["ratio_dual_min"] >= summary["ratio_lp_outer_min"] - 1e-9).all()
