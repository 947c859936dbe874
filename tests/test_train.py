"""Robust training: the schedule, that training lowers the robust error bound, and exact resume."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch
from torch import nn

from polytope.model.errors import InvalidEpsilonError, ModelFileError
from polytope.verifiers.train import TrainConfig, epsilon_at, train


def _toy(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two separable Gaussian blobs in 4-D."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) * 0.3 + (2 * y[:, None] - 1) * 0.8
    return x, y


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def test_schedule_is_linear_over_first_half() -> None:
    cfg = TrainConfig(epochs=10, eps=0.1, eps_start=0.05)
    eps = [epsilon_at(e, cfg) for e in range(10)]
    assert eps[0] == pytest.approx(0.05)
    assert eps[4:] == [pytest.approx(0.1)] * 6
    assert all(a < b for a, b in itertools.pairwise(eps[:5]))
    assert epsilon_at(3, TrainConfig(epochs=10, eps=0.1)) == 0.1


def test_bad_epsilon_is_refused() -> None:
    with pytest.raises(InvalidEpsilonError):
        TrainConfig(eps=-0.1)
    with pytest.raises(InvalidEpsilonError):
        TrainConfig(eps=float("nan"))


def test_robust_training_reduces_robust_error_bound(tmp_path) -> None:
    data = _toy()
    model = _model()
    cfg = TrainConfig(epochs=6, lr=1e-2, batch_size=50, eps=0.3, robust=True, eval_examples=300)
    log = train(model, data, data, cfg, tmp_path, progress=False)
    assert log["train_robust_error"].iloc[-1] < log["train_robust_error"].iloc[0]
    assert log["train_robust_error"].iloc[-1] < 0.2
    # the robust loss bounds the clean loss at every evaluation (Theorem 2 at x itself)
    assert (log["train_robust_loss"] >= log["train_loss"] - 1e-6).all()
    assert (tmp_path / "model.pth").exists()
    assert pd.read_csv(tmp_path / "log.csv").shape[0] == 6


def test_resume_equals_uninterrupted(tmp_path) -> None:
    data = _toy()
    cfg = TrainConfig(epochs=4, lr=1e-2, batch_size=40, eps=0.2, eps_start=0.05, robust=True, eval_examples=100)
    full = _model()
    log_full = train(full, data, data, cfg, tmp_path / "full", progress=False)
    part = _model()
    train(part, data, data, cfg, tmp_path / "part", progress=False, stop_after=2)
    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    log_resumed = train(resumed, data, data, cfg, tmp_path / "part", resume=True, progress=False)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    cols = [c for c in log_full.columns if c != "seconds"]
    pd.testing.assert_frame_equal(log_full[cols], log_resumed[cols])


def test_resume_with_other_settings_is_refused(tmp_path) -> None:
    data = _toy(60)
    cfg = TrainConfig(epochs=2, batch_size=30, eps=0.1, eval_examples=20)
    train(_model(), data, data, cfg, tmp_path, progress=False, stop_after=1)
    with pytest.raises(ModelFileError, match="different settings"):
        train(_model(), data, data, TrainConfig(epochs=2, batch_size=30, eps=0.2, eval_examples=20), tmp_path,
              resume=True, progress=False)
