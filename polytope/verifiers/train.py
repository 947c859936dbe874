"""Standard and robust training (eq. 14), with the epsilon schedule of Appendix B.2.

Robust training minimises the robust loss of Theorem 2 with Adam.  Every epoch ends with
an evaluation (loss, error, robust loss, robust error on train and test subsets), a row in
``log.csv`` and an atomic checkpoint; ``resume=True`` continues from the last checkpoint
and gives the same result as an uninterrupted run (the data order of each epoch is drawn
from ``seed + epoch``).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from polytope.model.errors import InvalidEpsilonError, ModelFileError
from polytope.model.network import Network
from polytope.model.sets import LinfBall
from polytope.verifiers.robust import robust_loss


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the paper's MNIST ones (Appendix B.2)."""

    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 50
    eps: float = 0.1
    eps_start: float | None = None
    robust: bool = True
    seed: int = 0
    eval_examples: int = 1000
    eval_batch_size: int = 200

    def __post_init__(self) -> None:
        for name in ("eps", "eps_start"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and value < float("inf")):
                raise InvalidEpsilonError(f"{name} must be finite and >= 0, got {value}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")


def epsilon_at(epoch: int, config: TrainConfig) -> float:
    """Appendix B.2: uniform steps from ``eps_start`` to ``eps`` over the first half of the epochs."""
    if config.eps_start is None:
        return config.eps
    half = max(1, config.epochs // 2)
    if epoch >= half - 1:
        return config.eps
    return config.eps_start + (config.eps - config.eps_start) * epoch / (half - 1)


def _batch_loss(net: Network, x: torch.Tensor, y: torch.Tensor, eps: float, robust: bool) -> torch.Tensor:
    if robust and eps > 0:
        return robust_loss(net, x, y, LinfBall(eps))[0]
    return F.cross_entropy(net.forward(x), y)


def evaluate(net: Network, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int = 200) -> dict[str, float]:
    """Mean loss, error, robust loss and robust error (Corollary 1) of ``net`` on ``(x, y)``."""
    sums = {"loss": 0.0, "error": 0.0, "robust_loss": 0.0, "robust_error": 0.0}
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            logits = net.forward(xb)
            sums["loss"] += F.cross_entropy(logits, yb, reduction="sum").item()
            sums["error"] += (logits.argmax(1) != yb).sum().item()
            rl, re = robust_loss(net, xb, yb, LinfBall(eps))
            sums["robust_loss"] += rl.item() * len(xb)
            sums["robust_error"] += re.item() * len(xb)
    return {k: v / max(len(x), 1) for k, v in sums.items()}


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    model: nn.Sequential,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> pd.DataFrame:
    """Train ``model`` in place; writes ``checkpoint.pt``, ``model.pth`` and ``log.csv`` to ``out_dir``.

    ``stop_after`` ends this call after that many epochs (a time slice on a shared
    cluster); a later call with ``resume=True`` carries on.

    Returns the per-epoch log (``epoch, eps, seconds`` and the :func:`evaluate` metrics with
    ``train_``/``test_`` prefixes).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = Network.from_torch(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    rows: list[dict[str, float]] = []
    start_epoch = 0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated file is reported, not silently ignored
            raise ModelFileError(f"{ckpt_path}: cannot read checkpoint ({exc})") from exc
        if ckpt["config"] != asdict(config):
            raise ModelFileError(f"{ckpt_path}: written with different settings {ckpt['config']}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rows, start_epoch = ckpt["log"], ckpt["epoch"] + 1
    x_train, y_train = train_data
    device = next(model.parameters()).device
    n_eval = min(config.eval_examples, len(x_train))
    end_epoch = config.epochs if stop_after is None else min(config.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end_epoch):
        eps = epsilon_at(epoch, config)
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(config.seed + epoch))
        t0 = time.perf_counter()
        bar = tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, leave=False)
        for start in bar:
            idx = order[start:start + config.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            loss = _batch_loss(net, xb, yb, eps, config.robust)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        seconds = time.perf_counter() - t0
        row: dict[str, float] = {"epoch": epoch + 1, "eps": eps, "seconds": seconds}
        for prefix, (x, y) in (("train", (x_train[:n_eval], y_train[:n_eval])),
                               ("test", (test_data[0][:config.eval_examples], test_data[1][:config.eval_examples]))):
            metrics = evaluate(net, x.to(device), y.to(device), config.eps, config.eval_batch_size)
            row.update({f"{prefix}_{k}": v for k, v in metrics.items()})
        rows.append(row)
        _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                      "log": rows, "config": asdict(config)}, ckpt_path)
        _save_atomic(model.state_dict(), out / "model.pth")
        pd.DataFrame(rows).to_csv(out / "log.csv", index=False)
        if progress:
            tqdm.write(f"epoch {epoch + 1}: eps {eps:.4f}  test error {row['test_error']:.4f}  "
                       f"robust error {row['test_robust_error']:.4f}  ({seconds:.1f} s)")
    return pd.DataFrame(rows)
