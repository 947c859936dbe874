"""The ladder experiment on the released MNIST model: every rung sound, the chain ordered, the cascade decisive."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from experiments import ladder
from polytope.io.data import load_dataset
from polytope.io.models import load_released, released_model_path
from polytope.model.errors import DatasetError

#: 8: PGD finds a counterexample; 18: misclassified; 211: the optimised slopes certify it;
#: 359: only the exact MILP does (dual, adaptive, optimized, LP and LP-all all fail).
INDICES = (0, 8, 18, 211, 359)


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not released_model_path("mnist").exists():
        pytest.skip(f"released MNIST model not found at {released_model_path('mnist')}")
    try:
        load_dataset("mnist", "test", limit=1)
    except DatasetError as exc:
        pytest.skip(f"MNIST test set not installed: {exc}")
    out, store = tmp_path_factory.mktemp("fig"), tmp_path_factory.mktemp("store")
    argv = ["--indices", ",".join(map(str, INDICES)), "--out", str(out), "--store", str(store), "--no-progress"]
    assert ladder.main(argv) == 0
    return out, store


def test_counts_follow_the_ladder(ladder_run: tuple[Path, Path]) -> None:
    out, _ = ladder_run
    summary = pd.read_csv(out / "ladder_mnist_5examples_summary.csv").set_index("method")
    nc = summary["not_certified"]
    assert nc["dual"] >= nc["lp"] >= nc["lp-all"] >= nc["cascade"]
    assert nc["optimized"] <= min(nc["dual"], nc["adaptive"])
    assert nc["optimized"] >= nc["cascade"]
    assert summary.loc["cascade", "verdict_not_robust"] == nc["cascade"]  # nothing left undecided
    assert (out / "ladder_mnist_5examples.png").stat().st_size > 10_000


def test_per_example_verdicts_are_consistent(ladder_run: tuple[Path, Path]) -> None:
    out, store = ladder_run
    rows = pd.read_csv(out / "ladder_mnist_5examples.csv").set_index("index")
    assert list(rows.index) == list(INDICES)
    assert set(rows["verdict"]) <= {"certified", "not_robust"}
    for method in ("dual", "adaptive", "optimized"):
        # a positive lower bound and a counterexample never meet
        assert not ((rows[f"{method}_margin"] > 0) & (rows["verdict"] == "not_robust")).any()
        assert ((rows[f"{method}_margin"] <= 0) | (rows["verdict"] == "certified")).all()
    # decided by branch and bound since the bab rung precedes the MILP (exact too; the MILP decided it before)
    assert rows.loc[359, "deciding_rung"] == "bab" and rows.loc[359, "verdict"] == "certified"
    assert rows.loc[211, "optimized_margin"] > 0 >= max(rows.loc[211, "dual_margin"], rows.loc[211, "adaptive_margin"])
    assert rows.loc[359, "lp-all_margin"] <= 0 and rows.loc[359, "lp_margin"] <= rows.loc[359, "lp-all_margin"] + 1e-9
    model = load_released("mnist").double().eval()
    x, y = load_dataset("mnist", "test", limit=max(INDICES) + 1)
    for index in rows.index[(rows["verdict"] == "not_robust") & (rows["deciding_rung"] != "clean")]:
        saved = np.load(store / "counterexamples" / "ladder_mnist" / f"{index}.npz")
        point = torch.from_numpy(saved["x_adv"]).reshape(1, 1, 28, 28)
        assert (point - x[index].double()).abs().max() <= 0.1 + 1e-12
        assert model(point).argmax(1).item() != int(y[index])


def test_escalating_retry_limits_parse() -> None:
    assert ladder.parse_args(["--retry-time-limit", "120", "1200"]).retry_time_limit == [120.0, 1200.0]
    assert ladder.parse_args(["--retry-time-limit", "0"]).retry_time_limit == []  # no retry


@pytest.mark.parametrize("argv", [["--eps", "-1"], ["--eps", "nan"], ["--limit", "0"], ["--indices", "1,x"],
                                  ["--methods", "dual,foo"], ["--retry-time-limit", "120", "-5"]])
def test_bad_arguments_are_named(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ladder.parse_args(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err
