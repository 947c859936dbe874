"""Robust training of a benchmark architecture for the B1 rows on other networks (issue 20).

    python benchmarks/train_archs.py --arch fc_300_200_100 --eps 0.1 --epochs 1 --out runs/bench/fc_300_200_100.pth

Theorem 2's robust loss (``pt.robust_loss``, l_inf ball, fixed slopes), Adam (lr 1e-3), batch 50;
eps rises linearly from ``eps / 10`` to ``eps`` over the first half of the steps and stays there
(the schedule of Appendix B, compressed into the run).  At the end, the certified fraction of the
first ``--eval`` test images is printed at each of ``--eval-eps``.

``--init-released`` starts the layers of ``archs.RELEASED_LAYERS`` from the released MNIST model's
weights and scales the other layers' initial weights by ``--init-scale`` (for ``res_mnist``: the
residual block starts near the identity, so the first robust steps see few unstable ReLUs instead
of the thousands of a random network, whose bounds take gigabytes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import archs  # noqa: E402  (benchmarks/ is not a package)

import polytope as pt  # noqa: E402
from polytope.io.data import load_dataset  # noqa: E402


def eps_at(step: int, total: int, eps: float) -> float:
    """Linear ramp from ``eps / 10`` to ``eps`` over the first half of ``total`` steps."""
    ramp = max(total // 2, 1)
    return eps * (0.1 + 0.9 * min(step / ramp, 1.0))


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, epochs: int, bs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = x.shape[0]
    total = epochs * (n // bs)
    gen = torch.Generator().manual_seed(0)
    step, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n - bs + 1, bs):
            idx = order[lo : lo + bs]
            net = pt.Network.from_torch(model, input_shape=tuple(x.shape[1:]))
            loss, err = pt.robust_loss(net, x[idx], y[idx], pt.LinfBall(eps_at(step, total, eps)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 200 == 0:
                print(f"step {step}/{total}: loss {float(loss):.3f}, robust error {float(err):.2f}, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)


def init_released(model: torch.nn.Module, arch: str, scale: float) -> None:
    """The layers shared with the released MNIST model take its weights; the others are scaled by ``scale``."""
    from polytope.io.models import load_released

    released = load_released("mnist").state_dict()
    own = model.state_dict()
    pairs = archs.RELEASED_LAYERS.get(arch)
    if pairs is None:
        raise SystemExit(f"--init-released: no layers of {arch} match the released model (archs.RELEASED_LAYERS)")
    copied = set()
    for mine, theirs in pairs:
        for kind in ("weight", "bias"):
            own[f"{mine}.{kind}"] = released[f"{theirs}.{kind}"].clone()
            copied.add(f"{mine}.{kind}")
    for key in own.keys() - copied:
        own[key] = own[key] * scale
    model.load_state_dict(own)


def certified_share(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    net = pt.Network.from_torch(model.eval(), input_shape=tuple(x.shape[1:]))
    with torch.no_grad():
        ok = torch.cat([pt.certify(net, x[i : i + 500], pt.LinfBall(eps), y=y[i : i + 500])
                        for i in range(0, x.shape[0], 500)])
    return float(ok.float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True, choices=sorted(archs.ARCHS))
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--limit", type=int, help="train on the first N training images")
    p.add_argument("--eval", type=int, default=1000, help="test images for the certified fraction")
    p.add_argument("--eval-eps", default="0.05,0.1", help="comma-separated eps values to evaluate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-released", action="store_true", help="start from the released MNIST model's layers")
    p.add_argument("--init-scale", type=float, default=0.1, help="with --init-released: scale of the other layers")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    model = archs.build(a.arch)
    if a.init_released:
        init_released(model, a.arch, a.init_scale)
    x, y = load_dataset("mnist", "train", limit=a.limit)
    start = time.perf_counter()
    train(model, x, y, a.eps, a.epochs, a.batch_size)
    print(f"trained {a.arch} in {time.perf_counter() - start:.0f} s", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    xt, yt = load_dataset("mnist", "test", limit=a.eval)
    for e in (float(v) for v in a.eval_eps.split(",")):
        print(f"{a.arch}: certified at eps {e:g}: {certified_share(model, xt, yt, e):.3f} of {a.eval}", flush=True)


if __name__ == "__main__":
    main()
