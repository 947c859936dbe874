"""Exact LP speed (eq. 19) on the released MNIST model: seconds per example, all 9 targets.

    python benchmarks/lp_speed.py --images 20 --lp-all-images 3 --label after

For each of the first ``--images`` MNIST test images (eps 0.1, l_inf) it times
``RelaxedLP(net, x, ball)`` (the build, including Algorithm 1's bounds) plus ``solve_many`` of the
nine targets ``c = e_y - e_j``; for the first ``--lp-all-images`` it does the same with
``bounds="lp-all"`` (every intermediate bound by LPs).  It appends a section to
``benchmarks/results_lp.md`` (machine, date, commit, medians) and writes every optimum to
``benchmarks/results_lp_<label>.json`` so that two runs (before / after a change) can be compared
with ``--compare OTHER.json`` (largest relative difference of the optima).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polytope.io.data import load_dataset  # noqa: E402
from polytope.io.models import load_released  # noqa: E402
from polytope.model.network import Network  # noqa: E402
from polytope.model.sets import LinfBall  # noqa: E402
from polytope.solvers.lp import RelaxedLP  # noqa: E402

HERE = Path(__file__).resolve().parent


def cpu_model() -> str:
    """The CPU model from ``lscpu`` (``platform.processor()`` if lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def commit() -> str:
    """The checkout's commit (``+dirty`` when the tree has changes)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--", "polytope") else "")


def time_example(net: Network, x: torch.Tensor, y: int, bounds: str) -> tuple[float, list[float], list[int]]:
    """``(seconds, optima, unstable per layer)`` for the build plus the 9 targets of one example."""
    eye = torch.eye(10, dtype=torch.float64)
    c_rows = torch.stack([eye[y] - eye[j] for j in range(10) if j != y])
    start = time.perf_counter()
    lp = RelaxedLP(net, x, LinfBall(0.1), bounds=bounds)
    results = lp.solve_many(c_rows)
    seconds = time.perf_counter() - start
    if not all(r.success for r in results):
        raise RuntimeError(f"not all optimal: {[r.status for r in results]}")
    return seconds, [r.value for r in results], list(lp.n_unstable)


def compare(a: dict, b: dict) -> float:
    """Largest relative difference ``|a - b| / max(1, |b|)`` between the optima of two runs."""
    worst = 0.0
    for key in ("dual", "lp-all"):
        for va, vb in zip(a[key]["values"], b[key]["values"], strict=False):
            for p, q in zip(va, vb, strict=True):
                worst = max(worst, abs(p - q) / max(1.0, abs(q)))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--lp-all-images", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (HiGHS's simplex is serial)")
    parser.add_argument("--label", default="run")
    parser.add_argument("--compare", type=Path, help="a results_lp_<label>.json of another run")
    parser.add_argument("--out", type=Path, default=HERE / "results_lp.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = Network.from_torch(load_released("mnist").double())
    x, y = load_dataset("mnist", "test", limit=max(args.images, args.lp_all_images))
    x = x.double()
    time_example(net, x[:1], int(y[0]), "dual")  # warm-up (imports, first HiGHS instance)
    record: dict = {"cpu": cpu_model(), "date": datetime.date.today().isoformat(), "commit": commit()}
    for key, n in (("dual", args.images), ("lp-all", args.lp_all_images)):
        runs = [time_example(net, x[i : i + 1], int(y[i]), key) for i in range(n)]
        record[key] = {
            "seconds": [r[0] for r in runs],
            "values": [r[1] for r in runs],
            "n_unstable": [r[2] for r in runs],
        }
    (HERE / f"results_lp_{args.label}.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"\n## {args.label}: {record['date']}, commit {record['commit']}, {record['cpu']}, "
        f"{args.threads} torch thread(s)\n",
        "| bounds | images | median s / example (build + 9 targets) | mean | max |",
        "|---|---|---|---|---|",
    ]
    for key in ("dual", "lp-all"):
        s = record[key]["seconds"]
        if s:
            lines.append(f"| {key} | {len(s)} | {statistics.median(s):.3f} | {statistics.mean(s):.3f} | {max(s):.3f} |")
    if args.compare:
        worst = compare(record, json.loads(args.compare.read_text()))
        lines.append(f"\nLargest relative difference of the optima against `{args.compare.name}`: {worst:.2e}")
    text = "\n".join(lines) + "\n"
    with args.out.open("a") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
