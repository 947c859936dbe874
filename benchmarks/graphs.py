"""Two benchmark rows for ReLU graphs (issue 21): a residual network against the reference, and chains before/after.

    python benchmarks/graphs.py [--rows R,C] [--images 300] [--rounds 3] [--res-model runs/bench/res_mnist.pth]

Writes ``benchmarks/results_graph.md`` and ``benchmarks/results_graph.csv``.

* ``R``: certification throughput (eq. 6's margins with the paper's fixed slopes) of polytope against
  convex_adversarial 0.4.4 on ``res_mnist`` (``benchmarks/archs.py``: a residual MNIST network in
  the reference's ``DenseSequential`` layout; weights from ``benchmarks/train_archs.py``), both
  libraries in one process alternating call by call (``run.py``'s B1I rows, the convex_adversarial
  overlay of ``ref_env.py``), each at its own best batch size of 1/50/500.
* ``C``: chains are as fast as before: polytope on the released MNIST model at the commit before
  graphs (``--old``, default 59dcd9b, exported with ``git archive``) and at this tree, each in its own
  worker process, requests alternating batch by batch (``run.py``'s B1 rows with the old tree as the
  second side); certified sets and margins are compared as there.

The machine is shared: every row is measured ``--rounds`` times, R and C alternating within each
round, each round in fresh worker processes (one process keeps its own pace: the same two C workers
gave 0.65x in one run and 1.45x in the next, at the same batch size), and the report gives the
median over rounds and their range.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import ref_env  # noqa: E402  (benchmarks/ is not a package)
import run  # noqa: E402

SIDES = {"R": ("polytope", "convex_adversarial 0.4.4"), "C": ("now", "before graphs")}
RES_BATCH_NOTE = (
    "batch 500 is left out of the R rows: on the res_mnist weights of results_graph.md (about 45/89/39/103 "
    "unstable ReLUs per image in its four convolutional/linear ReLU layers at eps 0.1) convex_adversarial asked "
    "for another 2 GB at batch 200 past a 14 GB address-space cap, and polytope's forward order holds 784 input "
    "directions x 6,272 units (ReLUs plus the carried skip values) per image, about 10 GB at batch 500; the "
    "machine (23 GB) is shared"
)


@dataclass
class Series:
    """One row's measurements over the rounds: images/s per side and batch, the per-round checks."""

    rates: dict[int, dict[str, list[float]]] = field(default_factory=dict)  # batch -> side -> one per round
    checks: list[str] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)

    def add(self, bs: int, medians: dict[str, float], check: str, load: str) -> None:
        for side, med in medians.items():
            self.rates.setdefault(bs, {}).setdefault(side, []).append(1.0 / med)
        self.checks.append(f"bs={bs}: {check}")
        self.loads.append(load)

    def best(self) -> dict[str, list[tuple[int, float]]]:
        """Per side and round, ``(batch, images/s)`` at that round's fastest batch size."""
        rounds = min(len(r) for by_side in self.rates.values() for r in by_side.values())
        return {
            side: [max(((bs, self.rates[bs][side][k]) for bs in self.rates), key=lambda t: t[1]) for k in range(rounds)]
            for side in run.SIDES
        }


def spread(values: list[float]) -> str:
    """``median [min - max]`` of the rounds."""
    if len(values) == 1:
        return run.fmt(values[0])
    return f"{run.fmt(statistics.median(values))} [{run.fmt(min(values))} - {run.fmt(max(values))}]"


def ratio_spread(a: list[float], b: list[float]) -> str:
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    text = f"{statistics.median(ratios):.2f}x"
    return text if len(ratios) == 1 else f"{text} [{min(ratios):.2f} - {max(ratios):.2f}]"


def shown(path: str) -> str:
    """``path`` relative to the repository when it lies inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def old_tree(commit: str, tmp: Path) -> Path:
    """The ``polytope`` package of ``commit``, exported under ``tmp`` (no worktree, nothing in .git changes)."""
    dest = tmp / f"polytope-{commit}"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", commit, "polytope"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def suite(a: argparse.Namespace, tmp: Path, arch: str, model: str | None, images: int) -> run.Suite:
    """A ``run.Suite`` on the first ``images`` test images (its own ``args``: ``run.py``'s rows read ``images``)."""
    sub = tmp / arch
    sub.mkdir()
    args = argparse.Namespace(**{**vars(a), "images": images})
    return run.Suite(args, sub, run.prepare_data(sub, images, arch, model), None, "not used")


def chain_workers(s: run.Suite, old: Path) -> None:
    """Two polytope workers on the same data: this tree as ``polytope``, the old one as ``reference``."""
    a = s.args
    for key, root in (("polytope", ROOT), ("reference", old)):
        w = run.Worker("polytope", sys.executable, s.data, s.tmp, a.threads, root=root)
        s.workers[key] = w
        s.info[key] = w.request("info", 60)
        if not s.info[key]["polytope_file"].startswith(str(root)):
            raise RuntimeError(f"the {key} worker imported {s.info[key]['polytope_file']}, not the tree {root}")


def measure(a: argparse.Namespace, tmp: Path, wanted: set[str]) -> dict[str, Series]:
    series = {tag: Series() for tag in ("R", "C") if tag in wanted}
    suites: dict[str, run.Suite] = {}
    if "R" in wanted:
        sys.path.insert(0, str(ref_env.ensure_overlay(log=run.log)))  # res_mnist is built from its classes
        suites["R"] = suite(a, tmp, "res_mnist", a.res_model, a.res_images)
    if "C" in wanted:
        suites["C"] = suite(a, tmp, "mnist", None, a.images)
        old = old_tree(a.old, tmp)
    try:
        for k in range(a.rounds):
            for tag, s in suites.items():
                if tag == "C":  # fresh processes every round (R rows start theirs): a process's own pace varies
                    chain_workers(s, old)
                for bs in a.res_batch_sizes if tag == "R" else a.batch_sizes:
                    load = s.row_load = run.loadavg()
                    start = time.perf_counter()
                    rows = run.row_b1_interleaved(s, bs) if tag == "R" else run.row_b1(s, bs)
                    medians = s.b1_modes["interleaved"][bs] if tag == "R" else s.b1[bs]
                    series[tag].add(bs, medians, rows[0].check, load)
                    run.log(f"round {k + 1} {tag} bs={bs}: {rows[0].polytope} vs {rows[0].reference} images/s, "
                            f"{rows[0].ratio}, {rows[0].check} ({time.perf_counter() - start:.0f} s, load {load})")
                s.close()
    finally:
        for s in suites.values():
            s.close()
    return series


def report(a: argparse.Namespace, series: dict[str, Series], started: str, load_start: str, seconds: float) -> None:
    m = run.machine_info()
    lines = [
        "# ReLU graphs: a residual network against the reference, chains before and after (issue 21)",
        "",
        f"Generated by `python benchmarks/graphs.py{''.join(' ' + x for x in a.argv)}` on {started} "
        f"in {seconds / 60:.1f} min.",
        "",
        f"- CPU (lscpu \"Model name\"): {m['cpu']}; nproc = {m['nproc']}; memory {m['memory']}; {m['platform']}",
        f"- date: {started}; commit {run.git_rev()}; old commit (C rows) {a.old}",
        f"- load average (1/5/15 min) at start: {load_start}; at end: {run.loadavg()} (a machine shared with "
        "other jobs: compare the two sides of a row, measured alternately, not rows with each other)",
        f"- the first MNIST test images ({a.res_images} in R, {a.images} in C, {a.single_images} at batch 1; a batch "
        f"larger than the images is one batch of all), eps = {a.eps} (l_inf), {a.threads} torch "
        f"threads per worker; each batch timed once plus {a.repeats} repeat(s) of the first; figures are the "
        f"median over {a.rounds} round(s) with the range over rounds in brackets",
        "",
        "| row | batch | side A (images/s) | side B (images/s) | A / B | checks (every round) |",
        "|---|---|---|---|---|---|",
    ]
    notes = {
        "R": f"R: res_mnist (`{shown(a.res_model)}`), A = polytope, B = convex_adversarial 0.4.4, both in one process "
             "(B1I layout: alternating call by call, the first side alternating too)",
        "C": f"C: the released MNIST model, A = polytope now, B = polytope at {a.old}, two worker processes "
             "(B1 layout: requests alternating batch by batch), new ones every round",
    }
    rows_csv = []
    for tag, ser in series.items():
        for bs in sorted(ser.rates):
            ra, rb = (ser.rates[bs][side] for side in run.SIDES)
            checks = [c.split(": ", 1)[1] for c in ser.checks if c.startswith(f"bs={bs}:")]
            bad = [c for c in checks if not c.startswith("ok")]
            check = f"ok in all {len(checks)} rounds; last: {checks[-1][4:]}" if not bad else "; ".join(bad)
            lines.append(f"| {tag} | {bs} | {spread(ra)} | {spread(rb)} | {ratio_spread(ra, rb)} | {run.esc(check)} |")
            for k, (x, y) in enumerate(zip(ra, rb, strict=True)):
                rows_csv += [(tag, k + 1, bs, SIDES[tag][0], x), (tag, k + 1, bs, SIDES[tag][1], y)]
        best = ser.best()
        ba, bb = ([r for _, r in best[side]] for side in run.SIDES)
        where = {side: sorted({bs for bs, _ in best[side]}) for side in run.SIDES}
        lines.append(f"| {tag} best | A at {where['polytope']}, B at {where['reference']} | {spread(ba)} | "
                     f"{spread(bb)} | {ratio_spread(ba, bb)} | each side at its fastest batch of each round |")
        for k, (x, y) in enumerate(zip(ba, bb, strict=True)):
            rows_csv += [(tag, k + 1, "best", SIDES[tag][0], x), (tag, k + 1, "best", SIDES[tag][1], y)]
    lines += ["", *[f"- {notes[tag]}; loads at the rows' starts: {', '.join(ser.loads)}"
                    for tag, ser in series.items()]]
    if "R" in series and 500 not in a.res_batch_sizes:
        lines.append(f"- {RES_BATCH_NOTE}")
    lines.append("")
    (HERE / a.out).write_text("\n".join(lines))
    with (HERE / a.csv).open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["row", "round", "batch", "side", "images_per_s"])
        out.writerows((t, k, bs, side, f"{v:.6g}") for t, k, bs, side, v in rows_csv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="R,C", help="R (residual vs the reference), C (chains before/after)")
    p.add_argument("--images", type=int, default=500, help="MNIST test images of the C rows")
    p.add_argument("--res-images", type=int, default=200, help="MNIST test images of the R rows")
    p.add_argument("--single-images", type=int, default=20, help="images timed at batch 1")
    p.add_argument("--batch-sizes", default="500,50,1", help="batch sizes of the C rows")
    p.add_argument("--res-batch-sizes", default="50,1",
                   help="batch sizes of the R rows (500 does not fit: see RES_BATCH_NOTE)")
    p.add_argument("--repeats", type=int, default=1, help="extra timings of the first batch per row")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--eps", type=float, default=run.EPS)
    p.add_argument("--res-model", default=str(ROOT / "runs" / "bench" / "res_mnist.pth"),
                   help="res_mnist weights (python benchmarks/train_archs.py --arch res_mnist ...)")
    p.add_argument("--old", default="59dcd9b", help="the commit before graphs (C rows)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default="results_graph.md")
    p.add_argument("--csv", default="results_graph.csv")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    a.res_batch_sizes = [int(b) for b in a.res_batch_sizes.split(",")]
    a.malloc_tunables = False
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    wanted = {r.strip().upper() for r in a.rows.split(",") if r.strip()}
    started, load_start, t0 = dt.datetime.now().strftime("%Y-%m-%d %H:%M"), run.loadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="polytope-graphs-") as tmp:
        series = measure(a, Path(tmp), wanted)
    report(a, series, started, load_start, time.perf_counter() - t0)
    run.log(f"wrote {HERE / a.out} and {HERE / a.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
