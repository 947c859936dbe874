"""Branch and bound against the project's MILP and Marabou, on the same instances, in one run.

    python benchmarks/bab.py [--quick] [--marabou /work/venv-marabou/bin/Marabou]

Writes ``benchmarks/results_bab.md``.  Instances:

* ``lowdim-*``: a network with 5 inputs, six hidden layers of 50 ReLUs and 5 outputs, trained (fixed seed,
  400 Adam steps, float32, then cast to float64) to tell which of 5 random centres in ``[-1, 1]^5`` is
  nearest; each instance is an l_inf box of half-width ``eps`` around a centre (the ACAS Xu shape: few
  inputs, wide boxes).  polytope decides it by input splitting (``split="auto"``).
* ``mnist-*``: the hardest examples of ``figures/ladder_mnist.csv`` among those decided by ``milp`` or
  ``milp-attack`` (longest cascade time: the hardest not robust one and the two hardest certified ones),
  released model, eps = 0.1 (l_inf ball, no pixel clip, as in the ladder); polytope uses ReLU splitting there.

Tools, each with a 60 s budget per instance (``--quick``: 5 s): polytope's BaB rung
(:func:`polytope.verifiers.bab.verify_bab`, default options), the project's MILP (:class:`ExactMILP` with LP-tightened
bounds, one MIP per target stopped at the threshold 0, time shared by the targets; build time counted),
and Marabou 2.0 (its binary, on the network exported as ONNX and one VNN-LIB 1.0 property per target:
``Y_t >= Y_y`` inside the box; ``sat`` for a target means not robust).  For the branching comparison,
ReLU splitting with the ``babsr`` and the ``width`` scores runs on every instance (15 s budget on the
low-dimensional network, 10 s on MNIST).
Every polytope ``not_robust`` carries a counterexample verified in float64; the table notes where the
tools disagree.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import polytope as pt  # noqa: E402
from polytope.io.data import load_dataset  # noqa: E402
from polytope.io.models import load_released  # noqa: E402
from polytope.solvers.milp import ExactMILP  # noqa: E402
from polytope.verifiers.bab import BaBOptions, verify_bab  # noqa: E402
from polytope.verifiers.cascade import verified_point  # noqa: E402


@dataclass
class Instance:
    name: str
    seq: nn.Sequential  # float64, eval mode
    x: torch.Tensor  # (1, *in_shape), float64
    label: int
    eps: float

    @property
    def input_set(self) -> pt.InputSet:
        return pt.LinfBall(self.eps)


def lowdim_network(seed: int = 0) -> tuple[nn.Sequential, torch.Tensor]:
    """5 -> 6 x 50 ReLU -> 5, trained to name the nearest of 5 random centres; returns ``(seq, centres)``."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(5, 5, generator=gen) * 2 - 1
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = 5
    for _ in range(6):
        layers += [nn.Linear(width, 50), nn.ReLU()]
        width = 50
    seq = nn.Sequential(*layers, nn.Linear(50, 5))
    points = torch.rand(4000, 5, generator=gen) * 2 - 1
    labels = torch.cdist(points, centres).argmin(1)
    opt = torch.optim.Adam(seq.parameters(), lr=3e-3)
    for _ in range(400):
        idx = torch.randint(0, len(points), (256,), generator=gen)
        loss = nn.functional.cross_entropy(seq(points[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return seq.double().eval(), centres.double()


def instances(quick: bool) -> list[Instance]:
    seq, centres = lowdim_network()
    out = []
    for k, eps in ((3, 0.2), (4, 0.4), (2, 0.28))[: 1 if quick else None]:
        x = centres[k:k + 1]
        out.append(Instance(f"lowdim-c{k}-eps{eps}", seq, x, int(seq(x).argmax()), eps))
    ladder = pd.read_csv(ROOT / "figures" / "ladder_mnist.csv")
    hard = ladder[ladder["deciding_rung"].isin(["milp", "milp-attack"])]
    certified = hard[hard["verdict"] == "certified"].nlargest(2, "cascade_seconds")
    refuted = hard[hard["verdict"] == "not_robust"].nlargest(1, "cascade_seconds")
    hard = refuted if quick else pd.concat([refuted, certified])
    mnist = load_released("mnist").double().eval()
    x_all, y_all = load_dataset("mnist", "test", limit=int(hard["index"].max()) + 1)
    for index in hard["index"].tolist():
        x = x_all[index:index + 1].double()
        out.append(Instance(f"mnist-{index}", mnist, x, int(y_all[index]), 0.1))
    return out


def run_bab(inst: Instance, budget: float, **kwargs) -> dict:
    net = pt.Network.from_torch(inst.seq)
    r = verify_bab(net, inst.x[0], inst.label, inst.input_set, options=BaBOptions(time_limit=budget, **kwargs))
    return {"verdict": r.status, "seconds": r.seconds, "domains": r.domains, "depth": r.depth, "split": r.split}


def run_milp(inst: Instance, budget: float) -> dict:
    start = time.perf_counter()
    net = pt.Network.from_torch(inst.seq)
    milp = ExactMILP(net, inst.x, inst.input_set, bounds="lp-all", time_limit=budget, max_unstable=10**6)
    n_out = milp.n_out
    verdict = "certified"
    for t in [j for j in range(n_out) if j != inst.label]:
        left = budget - (time.perf_counter() - start)
        if left <= 0:
            verdict = "timeout"
            break
        milp.time_limit = left
        c = torch.zeros(n_out, dtype=torch.float64)
        c[inst.label], c[t] = 1.0, -1.0
        res = milp.solve(c, cutoff=0.0)
        if res.status == "target" and res.z_in is not None:
            point = torch.from_numpy(res.z_in).reshape(inst.x.shape[1:])
            ok = verified_point(net, inst.x[0], point, inst.label, inst.input_set, 0)
            verdict = "not_robust" if ok is not None else "timeout"
            break
        if res.status != "cutoff":
            verdict = "timeout"
    return {"verdict": verdict, "seconds": time.perf_counter() - start, "unstable": sum(milp.n_unstable)}


def _vnnlib(lo: np.ndarray, hi: np.ndarray, n_out: int, label: int, target: int) -> str:
    lines = [f"(declare-const X_{i} Real)" for i in range(lo.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
        lines += [f"(assert (>= X_{i} {float(a)!r}))", f"(assert (<= X_{i} {float(b)!r}))"]
    lines.append(f"(assert (>= Y_{target} Y_{label}))")
    return "\n".join(lines) + "\n"


def run_marabou(inst: Instance, budget: float, binary: str, workdir: Path) -> dict:
    if not Path(binary).exists():
        return {"verdict": "not run", "seconds": math.nan, "note": f"no Marabou binary at {binary}"}
    start = time.perf_counter()
    onnx_path = workdir / f"{inst.name}.onnx"
    model = copy.deepcopy(inst.seq).float()  # Marabou reads float32 weights (exact: both models were float32)
    torch.onnx.export(model, inst.x.float(), str(onnx_path), dynamo=False, input_names=["x"], output_names=["y"])
    lo, hi = (t.flatten().numpy() for t in inst.input_set.box(inst.x))
    n_out = int(inst.seq(inst.x).shape[1])
    verdict, note = "certified", ""
    for t in [j for j in range(n_out) if j != inst.label]:
        left = budget - (time.perf_counter() - start)
        if left < 1:
            verdict = "timeout"
            break
        prop = workdir / f"{inst.name}-{t}.vnnlib"
        prop.write_text(_vnnlib(lo, hi, n_out, inst.label, t))
        try:
            proc = subprocess.run([binary, str(onnx_path), str(prop), "--timeout", str(int(left)), "--verbosity", "0"],
                                  capture_output=True, text=True, timeout=left + 5)
        except subprocess.TimeoutExpired:
            verdict = "timeout"
            break
        words = proc.stdout.split()
        if "sat" in words:
            verdict = "not_robust"
            break
        if "unsat" not in words:
            verdict = "timeout" if "TIMEOUT" in proc.stdout.upper() else "error"
            text = (proc.stdout + proc.stderr).strip()
            note = text.splitlines()[-1][:80] if text else ""
            break
    return {"verdict": verdict, "seconds": time.perf_counter() - start, "note": note}


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cell(r: dict) -> str:
    return f"{r['verdict']} ({r['seconds']:.1f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one instance per family, 5 s budgets (a smoke run)")
    parser.add_argument("--marabou", default="/work/venv-marabou/bin/Marabou", help="the Marabou binary")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results_bab.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    budget = 5.0 if args.quick else 60.0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for inst in instances(args.quick):
            branch_budget = 5.0 if args.quick else 15.0 if inst.name.startswith("lowdim") else 10.0
            row = {"instance": inst.name, "bab": run_bab(inst, budget), "branch_budget": branch_budget}
            print(inst.name, "bab", row["bab"], flush=True)
            for branching in ("babsr", "width"):
                row[branching] = run_bab(inst, branch_budget, split="relu", branching=branching)
                print(inst.name, branching, row[branching], flush=True)
            row["milp"] = run_milp(inst, budget)
            print(inst.name, "milp", row["milp"], flush=True)
            row["marabou"] = run_marabou(inst, budget, args.marabou, Path(tmp))
            print(inst.name, "marabou", row["marabou"], flush=True)
            rows.append(row)
    lines = [
        "# Branch and bound: polytope's BaB rung, the project's MILP and Marabou",
        "",
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores (shared), one torch thread; date "
        f"{dt.date.today().isoformat()}; commit {_git_commit()}; command `python benchmarks/bab.py"
        f"{' --quick' if args.quick else ''}`.",
        "",
        f"Budget per instance and tool: {budget:g} s (BaB, MILP, Marabou; the MILP's time includes building its "
        "LP-tightened bounds, which the budget does not cap). Verdicts: certified / not_robust / timeout / "
        "unknown (BaB stopped by a limit other than time) / error.",
        "",
        "| instance | polytope BaB | split, domains, depth | MILP (unstable units) | Marabou | agree |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdicts = [r[k]["verdict"] for k in ("bab", "babsr", "width", "milp", "marabou")]
        decided = {v for v in verdicts if v in ("certified", "not_robust")}
        agree = "yes" if len(decided) <= 1 else "**NO**"
        lines.append(f"| {r['instance']} | {_cell(r['bab'])} | {r['bab']['split']}, {r['bab']['domains']}, "
                     f"{r['bab']['depth']} | {_cell(r['milp'])} ({r['milp']['unstable']}) | {_cell(r['marabou'])}"
                     f"{' ' + r['marabou'].get('note', '') if r['marabou'].get('note') else ''} | {agree} |")
    lines += ["", "ReLU splitting forced, the two branching scores (verdict, seconds, domains explored, depth):", "",
              "| instance | budget | babsr | width |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['instance']} | {r['branch_budget']:g} s | " + " | ".join(
            f"{_cell(r[b])}, {r[b]['domains']} domains, depth {r[b]['depth']}" for b in ("babsr", "width")) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
