"""The cascade on the hard MNIST examples of ``figures/ladder_mnist.csv``: per-example wall and CPU seconds, verdicts.

    python benchmarks/bab_cascade.py --indices 578 3130 [--rungs attack,dual,...] [--time-limit 60]
    python benchmarks/bab_cascade.py --hard 12          # 12 hard examples spread over the ladder's difficulty

One JSON line per example on stdout: index, verdict, deciding rung, wall and CPU seconds, per-rung seconds, the
``bab`` rung's domains and depth, and the ladder's verdict (``agree``).  The released model is used as
``polytope certify --model released:mnist --data mnist --eps 0.1 --method cascade`` uses it (float32, l_inf
ball, no pixel clip, the cascade's default rungs and time limit unless given), one example at a time.  Run it
with the worktree first on ``PYTHONPATH`` (it imports ``polytope`` from there, so two checkouts can be compared
on the same instances, interleaved).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

import polytope as pt
from polytope.io.data import load_dataset
from polytope.io.models import load_released
from polytope.verifiers.cascade import RUNGS, Cascade

ROOT = Path(pt.__file__).resolve().parent.parent  # the checkout on PYTHONPATH
#: the ladder's deciding rungs of the examples that reach past the adaptive bound
HARD_RUNGS = ("milp", "milp-attack", "lp-all", "optimized", "adaptive")


def ladder_rows() -> dict[int, dict[str, str]]:
    """``figures/ladder_mnist.csv`` by example index."""
    with open(ROOT / "figures" / "ladder_mnist.csv", newline="") as f:
        return {int(r["index"]): r for r in csv.DictReader(f)}


def hard_sample(rows: dict[int, dict[str, str]], count: int,
                rungs: tuple[str, ...] = ("milp", "milp-attack")) -> list[int]:
    """``count`` examples decided by ``rungs`` in the ladder, spread evenly over their cascade seconds."""
    hard = sorted((float(r["cascade_seconds"]), i) for i, r in rows.items() if r["deciding_rung"] in rungs)
    if count >= len(hard):
        return [i for _, i in hard]
    step = (len(hard) - 1) / max(count - 1, 1)
    return [hard[round(k * step)][1] for k in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--indices", type=int, nargs="*", default=[])
    parser.add_argument("--hard", type=int, default=0, help="add this many milp/milp-attack examples of the ladder")
    parser.add_argument("--rungs", default=",".join(RUNGS))
    parser.add_argument("--time-limit", type=float, default=60.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = ladder_rows()
    indices = list(args.indices) + hard_sample(rows, args.hard) if args.hard else list(args.indices)
    net = pt.Network.from_torch(load_released("mnist"))
    x_all, y_all = load_dataset("mnist", "test", limit=max(indices) + 1)
    cascade = Cascade(net, pt.LinfBall(0.1), rungs=tuple(args.rungs.split(",")), time_limit=args.time_limit)
    for i in indices:
        wall, cpu = time.perf_counter(), time.process_time()
        (v,) = cascade.run(x_all[i:i + 1], y_all[i:i + 1], [i])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(json.dumps({"index": i, "verdict": v.verdict, "rung": v.rung, "wall": round(wall, 3),
                          "cpu": round(cpu, 3), "domains": v.domains, "depth": v.depth,
                          "seconds": {k: round(s, 3) for k, s in v.seconds.items()},
                          "ladder": rows[i]["verdict"], "agree": v.verdict == rows[i]["verdict"]}), flush=True)


if __name__ == "__main__":
    main()
