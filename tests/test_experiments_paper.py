"""The paper-table experiments (Figures 5, 10, Tables 1, 2) and their invariants on the released MNIST model."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import polytope as pt
from polytope.io.data import load_dataset
from polytope.io.models import load_released, released_model_path
from polytope.model.errors import DatasetError
from polytope.verifiers.attacks import attack_error, pgd

torch.set_num_threads(1)

EXPERIMENTS = ("fig5_radii", "fig10_index_sets", "table1", "table2")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for all quick runs, so the tiny digits models are trained once."""
    return tmp_path_factory.mktemp("models")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_quick_writes_png_and_csv(name: str, tmp_path: Path, models_dir: Path) -> None:
    module = importlib.import_module(f"experiments.{name}")
    argv = ["--quick", "--no-progress", "--out", str(tmp_path), "--models-dir", str(models_dir)]
    if name != "table2":
        argv += ["--limit", "30"]
    assert module.main(argv) == 0
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / f"{name}.csv").stat().st_size > 0
    if name == "table1":
        assert "ours / paper" in (tmp_path / "table1.md").read_text()


@pytest.fixture(scope="module")
def released_mnist() -> tuple[torch.nn.Sequential, torch.Tensor, torch.Tensor]:
    if not released_model_path("mnist").exists():
        pytest.skip(f"released MNIST model not found at {released_model_path('mnist')}")
    try:
        x, y = load_dataset("mnist", "test", limit=200)
    except DatasetError as exc:
        pytest.skip(f"MNIST test set not installed: {exc}")
    return load_released("mnist").eval(), x, y


def test_bound_dominates_pgd_per_example(released_mnist) -> None:
    """A certified example is never attacked successfully: PGD error <= robust bound, per example."""
    model, x, y = released_mnist
    net = pt.Network.from_torch(model)
    cert = pt.certify(net, x, pt.LinfBall(0.1), y=y)
    attacked = attack_error(model, x, y, pgd(model, x, y, 0.1), include_clean=True)
    assert not (cert & attacked).any()
    bound, pgd_err = (~cert).float().mean().item(), attacked.float().mean().item()
    assert bound >= pgd_err >= 0
    assert bound < 0.15  # the released model: 5.82% on the full test set


def test_certified_radius_is_tight(released_mnist) -> None:
    """The certificate holds at the radius and fails just beyond it (radius * 1.05 + 1e-4)."""
    model, x, _ = released_mnist
    net = pt.Network.from_torch(model)
    xb = x[:4]
    with torch.no_grad():
        pred = model(xb).argmax(1)
    radius, steps = pt.certified_radius(net, xb, pt.LinfBall(0.0))
    assert (radius > 0).all() and (steps >= 1).all()
    assert pt.certify(net, xb, pt.LinfBall(radius), y=pred).all()
    assert not pt.certify(net, xb, pt.LinfBall(radius * 1.05 + 1e-4), y=pred).any()


def test_certification_is_monotone_in_eps(released_mnist) -> None:
    """Certified at eps implies certified at every smaller eps (20 examples, 6 radii)."""
    model, x, y = released_mnist
    net = pt.Network.from_torch(model)
    certs = torch.stack([pt.certify(net, x[:20], pt.LinfBall(e), y=y[:20]) for e in (0.0, 0.02, 0.05, 0.1, 0.12,
                                                                                      0.2)])
    assert (certs[1:] <= certs[:-1]).all()


def test_fig11_quick_points_lie_below_the_diagonal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Figure 11 (quick, digits): three panels, and every dual bound is <= its LP optimum."""
    import pandas as pd

    from experiments import fig11_tightness

    monkeypatch.chdir(tmp_path)  # the digits models are cached under ./runs/models
    assert fig11_tightness.main(["--quick", "--no-progress", "--out", str(tmp_path), "--n", "2"]) == 0
    assert (tmp_path / "fig11_tightness.png").stat().st_size > 1000
    table = pd.read_csv(tmp_path / "fig11_tightness.csv")
    solved = table[table["lp_status"] == "optimal"]
    assert len(solved) == len(table) > 0
    assert (solved["dual"] <= solved["lp"] + 1e-6).all()
    assert set(table["model"].str.split(" ").str[0]) == {"robust", "random", "standard"}
