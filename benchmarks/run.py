"""polytope side by side with the reference implementation (convex_adversarial 0.4.4).

    python benchmarks/run.py [--quick] [--rows B1,B2,...]      (or: make bench)

Writes ``benchmarks/results.md`` and ``benchmarks/results.csv``.  The reference runs in its own
virtual environment, ``benchmarks/.venv-ref``, created on first use (``benchmarks/ref_env.py``);
polytope runs in the interpreter that runs this script.  Each side is a long-lived worker
subprocess (``benchmarks/worker.py``) that loads the same model and images from one temporary
file and times its own computation; requests alternate between the two sides batch by batch,
so that a change in machine load hits both alike, and figures are medians.

Fairness (issue 20): no harness step runs between timed calls (no memory trimming; the glibc
MALLOC_* tunables only with ``--malloc-tunables``); ``B1A`` times each side alone in a fresh
process, ``B1I`` both libraries in one process, alternating call by call; each ``best`` row takes
each side at its own fastest batch size.  ``--arch``/``--model`` run the B1 rows on another
network of ``benchmarks/archs.py`` (weights from ``benchmarks/train_archs.py``); ``--wait-load``
waits for a quiet machine before each row.

Rows: B1 certification throughput (batch 1, 50, 500), B2 one robust-training step, B3 the
exact LP of one example four ways, B4 a Figure-6 outer polygon, B5 peak memory, B6 arithmetic
rate against the machine's matmul rate, B7 GPU, L* the certify ladder (dual / adaptive /
optimized slopes), P a torch.profiler breakdown of polytope on B1 at batch 50.  A row that
fails is reported as failed, with its error, and the suite goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import math
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import archs  # noqa: E402  (benchmarks/ is not a package)
import ref_env  # noqa: E402

EPS = 0.1
TARGETS = {"B1": 10.0, "B2": 3.0}
#: Issue 9: each certify method's throughput against the reference's best (its dual bound).
LADDER_TARGETS = {"adaptive": 10.0, "optimized": 0.4}


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------
class WorkerError(RuntimeError):
    pass


MALLOC_TUNABLES = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
"""glibc malloc settings, given to every worker only with ``--malloc-tunables`` (default off: a user
does not set them, and issue 20 asks for each side in the state a user would see).  With glibc's
defaults a fresh process hands freed buffers of a few MB back to the kernel and page-faults them in
again on the next call; these settings keep them mapped."""


class Worker:
    """A ``worker.py`` subprocess spoken to by JSON lines."""

    def __init__(
        self,
        side: str,
        python: str,
        data: Path,
        logdir: Path,
        threads: int,
        device: str = "cpu",
        malloc_tunables: bool = False,
        root: Path = ROOT,
    ) -> None:
        """``root``: the tree whose ``polytope`` package the polytope side imports (another commit's, say)."""
        self.side = side
        self.log_path = logdir / f"{side}-{device}-{int(time.time() * 1000)}.log"
        self._log = self.log_path.open("w")
        env = dict(os.environ)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if side == "polytope":
            paths.insert(0, str(root))
        elif side == "both":  # the project's environment plus the convex_adversarial overlay
            paths[:0] = [str(root), str(ref_env.OVERLAY)]
        else:  # the reference environment must not see the project
            paths = [p for p in paths if Path(p).resolve() != ROOT]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if malloc_tunables:
            env.update(MALLOC_TUNABLES)
        cmd = [python, str(HERE / "worker.py"), "--side", side, "--data", str(data), "--threads", str(threads)]
        cmd += ["--device", device]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=str(ROOT), env=env
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self._answer(timeout=900)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _stderr_tail(self, n: int = 6) -> str:
        try:
            lines = self.log_path.read_text().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-n:])

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.close(kill=True)
            raise WorkerError(f"{self.side} worker timed out after {timeout:.0f} s") from None
        if line is None:
            self.proc.wait()
            raise WorkerError(f"{self.side} worker died (exit {self.proc.returncode}): {self._stderr_tail()}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise WorkerError(f"{self.side}: {answer.get('error')}")
        return answer

    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, cmd: str, timeout: float, **kwargs: Any) -> dict[str, Any]:
        if not self.alive():
            raise WorkerError(f"{self.side} worker is not running: {self._stderr_tail()}")
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def close(self, kill: bool = False) -> None:
        if self.alive():
            if kill:
                self.proc.kill()
            else:
                try:
                    assert self.proc.stdin is not None
                    self.proc.stdin.write('{"cmd": "quit"}\n')
                    self.proc.stdin.flush()
                    self.proc.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.kill()
        self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    rid: str
    what: str
    polytope: str = ""
    reference: str = ""
    ratio: str = ""
    target: str = ""
    check: str = ""
    notes: str = ""
    status: str = "ok"  # ok | failed | skipped


@dataclass
class Suite:
    args: argparse.Namespace
    tmp: Path
    data: Path
    ref_python: str | None
    ref_error: str | None
    overlay_error: str | None = None
    rows: list[Row] = field(default_factory=list)
    metrics: list[tuple[str, str, str, float, str]] = field(default_factory=list)
    workers: dict[str, Worker] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    b1: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> side -> median s/image
    #: the same for the fairness rows: mode ("alone", "interleaved") -> batch -> side -> median s/image
    b1_modes: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    row_load: str = "unknown"  # the load average when the current row started
    flops_detail: dict[str, Any] = field(default_factory=dict)

    def metric(self, row: str, name: str, side: str, value: float, unit: str) -> None:
        self.metrics.append((row, name, side, float(value), unit))

    # -- workers ---------------------------------------------------------------------------
    def python_for(self, side: str) -> str:
        if side == "polytope":
            return sys.executable
        if side == "both":
            if self.overlay_error:
                raise WorkerError(f"convex_adversarial overlay unavailable: {self.overlay_error}")
            return sys.executable
        if self.ref_python is None:
            raise WorkerError(f"reference environment unavailable: {self.ref_error}")
        return self.ref_python

    def fresh(self, side: str, device: str = "cpu") -> Worker:
        """A new worker process (for peak-memory figures that must not include earlier rows)."""
        a = self.args
        return Worker(side, self.python_for(side), self.data, self.tmp, a.threads, device, a.malloc_tunables)

    def worker(self, side: str) -> Worker:
        w = self.workers.get(side)
        if w is None or not w.alive():
            w = self.fresh(side)
            self.workers[side] = w
            if side not in self.info:
                self.info[side] = w.request("info", 60)
        return w

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
        self.workers.clear()


def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    if mag >= digits:
        return f"{x:,.0f}"
    return f"{x:.{max(digits - 1 - mag, 0)}f}"


def log(msg: str) -> None:
    print(msg, flush=True)


def certified(j: Any, y: Any) -> Any:
    """Corollary 1 on a ``(B, n)`` margin matrix: every ``J_j > 0`` for ``j != y``."""
    from polytope.verifiers.robust import certified_by_margins

    return certified_by_margins(j, y)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def describe_failure(exc: Exception) -> str:
    text = str(exc)
    if "exit -9" in text:
        return f"killed by SIGKILL (out of memory?): {text}"
    return text


SIDES = ("polytope", "reference")
MODES = {
    "paired": "two worker processes, requests alternating batch by batch",
    "alone": "each side alone in a fresh process (nothing else of the harness running)",
    "interleaved": "both libraries in one process, alternating call by call on the same batches",
}


def b1_batches(a: argparse.Namespace, bs: int) -> tuple[int, list[tuple[int, int]]]:
    """The images of a B1 row at batch ``bs`` and its batches (the first batch is timed ``repeats`` more times)."""
    n = min(a.single_images if bs == 1 else a.images, a.images)
    return n, [(lo, min(lo + bs, n)) for lo in range(0, n, bs)]


@dataclass
class B1Timings:
    """What a B1 row measured, per side: seconds per image of each timed call, the J files, failures."""

    per_image: dict[str, list[float]] = field(default_factory=lambda: {side: [] for side in SIDES})
    cpu_image: dict[str, list[float]] = field(default_factory=lambda: {side: [] for side in SIDES})
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SIDES, 0.0))
    out: dict[str, list[Path]] = field(default_factory=lambda: {side: [] for side in SIDES})
    failed: dict[str, str] = field(default_factory=dict)
    peak: dict[str, float] = field(default_factory=dict)
    base: dict[str, float] = field(default_factory=dict)

    def add(self, side: str, answer: dict[str, Any], size: int, path: Path | None) -> None:
        self.per_image[side].append(answer["seconds"] / size)
        self.cpu_image[side].append(answer["cpu_seconds"] / size)
        if path is not None:
            self.totals[side] += answer["seconds"]
            self.out[side].append(path)


def certify_request(s: Suite, w: Worker | None, t: B1Timings, side: str, lo: int, hi: int, path: Path | None) -> None:
    """One timed B1 call of ``side`` on ``[lo, hi)``; a failure is recorded and ends that side's row."""
    if side in t.failed:
        return
    try:
        r = w.request("certify", s.args.timeout, start=lo, stop=hi, eps=s.args.eps, out=str(path) if path else None)
    except WorkerError as exc:
        t.failed[side] = f"batch [{lo}, {hi}): {describe_failure(exc)}"
        return
    t.add(side, r, hi - lo, path)  # w is set whenever side has not failed


def b1_schedule(a: argparse.Namespace, bs: int) -> list[tuple[int, int, int, bool]]:
    """``(lo, hi, index, saved)`` for each timed call: every batch once (saved), then ``repeats`` of the first."""
    _n, batches = b1_batches(a, bs)
    calls = [(lo, hi, i, True) for i, (lo, hi) in enumerate(batches)]
    return calls + [(*batches[0], len(batches) + k, False) for k in range(a.repeats)]


def row_b1(s: Suite, bs: int, memory: bool = False) -> list[Row]:
    """Certification throughput at batch ``bs``: two long-lived workers on the same batches, alternating.

    A side that fails (say, killed for memory at a large batch) is reported as failed in the
    row; the other side's figures are still reported.
    """
    if memory:  # fresh processes, so the peak belongs to this row
        for side in SIDES:
            if side in s.workers:
                s.workers.pop(side).close()
    t = B1Timings()
    workers: dict[str, Worker] = {}
    for side in SIDES:
        try:
            workers[side] = s.worker(side)
        except WorkerError as exc:
            t.failed[side] = describe_failure(exc)
    for lo, hi, i, saved in b1_schedule(s.args, bs):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            path = s.tmp / f"J-paired-{side}-{bs}-{i}.pt" if saved else None
            certify_request(s, workers.get(side), t, side, lo, hi, path)
    if memory:
        for side in SIDES:
            if side not in t.failed:
                t.peak[side] = workers[side].request("maxrss", 60)["maxrss_mib"]
                t.base[side] = workers[side].ready["maxrss_mib"]
    return b1_rows(s, "paired", bs, t)


def row_b1_alone(s: Suite, bs: int) -> list[Row]:
    """B1 at batch ``bs`` with each side alone: a fresh worker, its batches, closed before the other starts.

    No other worker of the harness is alive meanwhile, so any effect of the harness or of the
    other side (memory, caches, threads) is absent; the peak RSS of each process is this row's.
    """
    s.close()
    t = B1Timings()
    for side in SIDES:
        try:
            w = s.fresh(side)
        except WorkerError as exc:
            t.failed[side] = describe_failure(exc)
            continue
        try:
            if side not in s.info:
                s.info[side] = w.request("info", 60)
            for lo, hi, i, saved in b1_schedule(s.args, bs):
                certify_request(s, w, t, side, lo, hi, s.tmp / f"J-alone-{side}-{bs}-{i}.pt" if saved else None)
            if side not in t.failed:
                t.peak[side] = w.request("maxrss", 60)["maxrss_mib"]
                t.base[side] = w.ready["maxrss_mib"]
        finally:
            w.close()
    return b1_rows(s, "alone", bs, t)


def row_b1_interleaved(s: Suite, bs: int) -> list[Row]:
    """B1 at batch ``bs`` with both libraries in one process, alternating which goes first on each batch."""
    s.close()
    t = B1Timings()
    try:
        w = s.fresh("both")
    except WorkerError as exc:
        raise WorkerError(f"in-process worker: {describe_failure(exc)}") from exc
    try:
        if "both" not in s.info:
            s.info["both"] = w.request("info", 60)
        for lo, hi, i, saved in b1_schedule(s.args, bs):
            order = list(SIDES if i % 2 == 0 else SIDES[::-1])
            outs = {side: str(s.tmp / f"J-inproc-{side}-{bs}-{i}.pt") for side in SIDES} if saved else None
            r = w.request("certify", s.args.timeout, start=lo, stop=hi, eps=s.args.eps, order=order, out=outs)
            for side in SIDES:
                t.add(side, r[side], hi - lo, Path(outs[side]) if outs else None)
    finally:
        w.close()
    return b1_rows(s, "interleaved", bs, t)


def b1_rows(s: Suite, mode: str, bs: int, t: B1Timings) -> list[Row]:
    """The row (and, with peaks, the B5 row) of a B1 measurement; certified sets and J are compared."""
    import torch

    a = s.args
    n, _batches = b1_batches(a, bs)
    ok_sides = [side for side in SIDES if side not in t.failed]
    if not ok_sides:
        raise WorkerError("; ".join(f"{side}: {msg}" for side, msg in t.failed.items()))
    med = {side: statistics.median(t.per_image[side]) for side in ok_sides}
    cpu_med = {side: statistics.median(t.cpu_image[side]) for side in ok_sides}
    (s.b1 if mode == "paired" else s.b1_modes.setdefault(mode, {}))[bs] = med
    rate = {side: 1.0 / med[side] for side in ok_sides}
    y = torch.load(s.data)["y"][:n]
    j = {side: torch.cat([torch.load(p) for p in t.out[side]]) for side in ok_sides}
    n_cert = {side: int(certified(j[side], y).sum()) for side in ok_sides}
    tag = {"paired": "B1", "alone": "B1A", "interleaved": "B1I"}[mode]
    with contextlib.suppress(ValueError, IndexError):  # "unknown" load: no metric
        s.metric(f"{tag}-bs{bs}", "load_1min_at_start", "machine", float(s.row_load.split()[0]), "")
    for side in ok_sides:
        s.metric(f"{tag}-bs{bs}", "throughput", side, rate[side], "images/s")
        s.metric(f"{tag}-bs{bs}", "median_s_per_image", side, med[side], "s")
        s.metric(f"{tag}-bs{bs}", "total_s", side, t.totals[side], "s")
        s.metric(f"{tag}-bs{bs}", "certified", side, n_cert[side], "images")

    def cell(side: str) -> str:
        return fmt(rate[side]) if side in rate else f"FAILED ({t.failed[side]})"

    row = Row(f"{tag} bs={bs}", f"certify, eps={a.eps}, {n} images, batch {bs}, {MODES[mode]} (images/s)",
              cell("polytope"), cell("reference"))
    timings = f"{len(t.per_image[ok_sides[0]])} timings per side (each batch once + {a.repeats} repeat(s) of the first)"
    load = f"load average at the row's start {s.row_load}"
    if len(ok_sides) == 2:
        speedup = rate["polytope"] / rate["reference"]
        cpu_speedup = cpu_med["reference"] / cpu_med["polytope"]
        diff = float((j["polytope"] - j["reference"]).abs().max())
        same = bool(torch.equal(certified(j["polytope"], y), certified(j["reference"], y)))
        ok = same and diff <= 1e-4
        s.metric(f"{tag}-bs{bs}", "speedup", "polytope/reference", speedup, "x")
        s.metric(f"{tag}-bs{bs}", "cpu_time_speedup", "polytope/reference", cpu_speedup, "x")
        s.metric(f"{tag}-bs{bs}", "max_abs_dJ", "both", diff, "")
        row.ratio = f"{speedup:.2f}x"
        row.check = (
            f"{'ok' if ok else 'MISMATCH'}: certified sets {'identical' if same else 'DIFFER'} "
            f"({n_cert['polytope']}/{n} vs {n_cert['reference']}/{n}), max|dJ| = {diff:.1e}"
        )
        row.notes = (
            f"{timings}; CPU-time speed-up {cpu_speedup:.2f}x; total over the {n} images: "
            f"{fmt(t.totals['polytope'])} s vs {fmt(t.totals['reference'])} s; {load}"
        )
    else:
        side = ok_sides[0]
        row.check = f"no comparison; {side}: {n_cert[side]}/{n} certified"
        row.notes = f"{timings}; {side} total over the {n} images: {fmt(t.totals[side])} s; {load}"
    rows = [row]
    if t.peak:
        rows.append(b5_row(s, f"{tag} bs={bs}", bs, t))
    return rows


def b5_row(s: Suite, rid: str, bs: int, t: B1Timings) -> Row:
    """Peak RSS of the processes of a B1 row (fresh processes only)."""
    for side, peak in t.peak.items():
        s.metric(f"B5-{rid.replace(' ', '-')}", "maxrss", side, peak, "MiB")
        s.metric(f"B5-{rid.replace(' ', '-')}", "maxrss_increase", side, peak - t.base[side], "MiB")

    def mem(side: str) -> str:
        if side in t.peak:
            return f"{fmt(t.peak[side])} (+{fmt(t.peak[side] - t.base[side])})"
        return f"FAILED ({t.failed.get(side, 'no figure')})"

    ratio = ""
    if len(t.peak) == 2:
        p, r = t.peak["polytope"], t.peak["reference"]
        ratio = f"polytope uses {r / p:.2f}x less" if p <= r else f"polytope uses {p / r:.2f}x more"
    return Row(
        f"B5 {rid}",
        f"peak RSS of a fresh process running B1 at batch {bs} (MiB)",
        mem("polytope"),
        mem("reference"),
        ratio,
        notes="ru_maxrss of the worker process; (+x) is the increase over the same process "
        "after import, model and data load and a 2-image warm-up",
    )


def row_b1_best(s: Suite, mode: str = "paired") -> list[Row]:
    """The issue's B1 figure: each side at its own best batch size (from the B1 rows of ``mode``)."""
    table = s.b1 if mode == "paired" else s.b1_modes.get(mode, {})
    best = {}
    for side in SIDES:
        rates = {bs: 1.0 / med[side] for bs, med in table.items() if side in med}
        if not rates:
            raise WorkerError(f"no B1 timing for {side} ({mode})")
        best[side] = max(rates.items(), key=lambda kv: kv[1])
    speedup = best["polytope"][1] / best["reference"][1]
    tag = {"paired": "B1", "alone": "B1A", "interleaved": "B1I"}[mode]
    s.metric(f"{tag}-best", "speedup", "polytope/reference", speedup, "x")
    row = Row(
        f"{tag} best",
        f"certify, each side at its own best batch size of {', '.join(map(str, sorted(table)))}; "
        f"{MODES[mode]} (images/s)",
        f"{fmt(best['polytope'][1])} (batch {best['polytope'][0]})",
        f"{fmt(best['reference'][1])} (batch {best['reference'][0]})",
    )
    row.ratio = f"{speedup:.2f}x"
    row.target = f">= {TARGETS['B1']:g}x: {'met' if speedup >= TARGETS['B1'] else 'NOT met'}"
    row.notes = f"from the {tag} rows' medians; the issue compares each side at its own best batch size"
    return [row]


def row_b2(s: Suite) -> list[Row]:
    import torch

    a = s.args
    bs = 50
    batches = [(lo, lo + bs) for lo in range(0, min(a.train_batches * bs, a.images), bs)]
    sides = ("polytope", "reference")
    workers = {side: s.worker(side) for side in sides}
    times: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    losses: dict[str, list[float]] = {side: [] for side in sides}
    for i, (lo, hi) in enumerate(batches):
        for side in sides if i % 2 == 0 else sides[::-1]:
            out = str(s.tmp / f"grad-{side}.pt") if i == 0 else None
            r = workers[side].request("train_step", a.timeout, start=lo, stop=hi, eps=a.eps, out=out)
            times[side].append(r["seconds"])
            cpu[side].append(r["cpu_seconds"])
            losses[side].append(r["loss"])
    med = {side: statistics.median(times[side]) for side in sides}
    speedup = med["reference"] / med["polytope"]
    cpu_speedup = statistics.median(cpu["reference"]) / statistics.median(cpu["polytope"])
    s.metric("B2", "cpu_time_speedup", "polytope/reference", cpu_speedup, "x")
    g = {side: torch.load(s.tmp / f"grad-{side}.pt") for side in sides}
    gdiff = max(
        float(
            (g["polytope"]["grads"][k] - g["reference"]["grads"][k]).abs().max()
            / g["reference"]["grads"][k].abs().max().clamp_min(1e-12)
        )
        for k in g["reference"]["grads"]
    )
    ldiff = max(abs(p - r) for p, r in zip(losses["polytope"], losses["reference"], strict=True))
    ok = ldiff <= 1e-4 and gdiff <= 1e-3
    for side in sides:
        s.metric("B2", "median_step_s", side, med[side], "s")
    s.metric("B2", "speedup", "polytope/reference", speedup, "x")
    return [
        Row(
            "B2",
            f"one robust-training step (forward + backward), batch {bs} (s/step)",
            fmt(med["polytope"]),
            fmt(med["reference"]),
            f"{speedup:.2f}x",
            f">= {TARGETS['B2']:g}x: {'met' if speedup >= TARGETS['B2'] else 'NOT met'}",
            f"{'ok' if ok else 'MISMATCH'}: max|dloss| = {ldiff:.1e}, max rel. grad diff = {gdiff:.1e}",
            f"median of {len(batches)} step(s) per side (batches of the first {len(batches) * bs} images); "
            f"CPU-time speed-up {cpu_speedup:.2f}x",
        )
    ]


def row_b3(s: Suite) -> list[Row]:
    w = s.fresh("polytope")  # fresh: its peak RSS is B3's
    try:
        r = w.request("lp", s.args.timeout, index=s.args.lp_index, eps=s.args.eps)
    finally:
        w.close()
    j = r["J"]
    paths = r["paths"]
    ref_vals = next((p["values"] for p in paths.values() if "values" in p), None)
    rows = []
    labels = {
        "highs_warm": "HiGHS (highspy), warm start",
        "highs_cold": "HiGHS (highspy), cold start",
        "cvxpy": "cvxpy -> HiGHS",
        "linprog": "scipy linprog (highs-ds)",
        "highs_lp_all": "HiGHS, warm start, every intermediate bound by LPs (LP-all)",
    }
    for name, p in paths.items():
        if "error" in p:
            rows.append(Row(f"B3 {name}", labels.get(name, name), status="failed", notes=p["error"]))
            continue
        vals = p["values"]
        n_opt = sum(st == "optimal" for st in p["status"])
        agree = max(abs(v - rv) for v, rv in zip(vals, ref_vals, strict=True)) if ref_vals else math.nan
        below_j = max(jj - v for jj, v in zip(j, vals, strict=True))
        if name == "highs_lp_all":  # tighter bounds: LP-all >= LP, not equal to it
            below_lp = max(rv - v for v, rv in zip(vals, ref_vals, strict=True)) if ref_vals else math.nan
            agree_text = f"LP-all >= LP: {'yes' if below_lp <= 1e-6 else f'NO (by {below_lp:.1e})'}"
        else:
            agree_text = f"max |LP - HiGHS warm| = {agree:.1e}"
        total = p["build_s"] + p["solve_s"]
        s.metric(f"B3-{name}", "build_s", "polytope", p["build_s"], "s")
        s.metric(f"B3-{name}", "solve_9_s", "polytope", p["solve_s"], "s")
        s.metric(f"B3-{name}", "total_s", "polytope", total, "s")
        extra = f"; unstable units per layer {p['n_unstable']}" if "n_unstable" in p else ""
        its = f"; simplex iterations {sum(p['iterations'])}" if "iterations" in p else ""
        rows.append(
            Row(
                f"B3 {name}",
                f"exact LP (eq. 19), {len(vals)} targets of test image {s.args.lp_index}: {labels.get(name, name)} (s)",
                f"{fmt(total)} (build {fmt(p['build_s'])} + solves {fmt(p['solve_s'])})",
                "n/a (no LP in the reference)",
                check=f"{n_opt}/{len(vals)} optimal; {agree_text}; "
                f"LP >= J: {'yes' if below_j <= 1e-4 else f'NO (by {below_j:.1e})'}",
                notes=f"LP values {[round(v, 4) for v in vals]}{extra}{its}",
            )
        )
    s.metric("B5-B3", "maxrss", "polytope", r["maxrss_mib"], "MiB")
    rows.append(
        Row(
            "B5 B3",
            "peak RSS of a fresh process running B3, all its paths (MiB)",
            fmt(r["maxrss_mib"]),
            "n/a",
            notes="ru_maxrss of the worker process (includes torch and the 1,000 images)",
        )
    )
    return rows


def row_b4(s: Suite) -> list[Row]:
    r = s.worker("polytope").request("polygon", s.args.timeout, k=s.args.directions, eps=EPS, seed=0)
    contains = r["dual_area"] >= r["lp_area"] * (1 - 1e-9)
    s.metric("B4", "lp_polygon_s", "polytope", r["lp_s"], "s")
    s.metric("B4", "dual_polygon_s", "polytope", r["dual_s"], "s")
    return [
        Row(
            "B4 LP",
            f"Figure-6 outer polygon, random 2-100-100-100-2 net, eps={EPS}, K={r['k']} LPs (s)",
            fmt(r["lp_s"]),
            "n/a",
            check=f"{r['k'] - r['lp_not_optimal']}/{r['k']} optimal; outer area {r['lp_area']:.4g}, "
            f"inner {r['lp_inner_area']:.4g}",
        ),
        Row(
            "B4 dual",
            f"same polygon from the dual bound J (one batched call of K={r['k']} objectives) (s)",
            fmt(r["dual_s"]),
            "n/a",
            check=f"area {r['dual_area']:.4g} (contains the LP polygon's area: {'yes' if contains else 'NO'})",
            notes="median of 3",
        ),
    ]


def row_b6(s: Suite) -> list[Row]:
    a = s.args
    bs = 50 if 50 in s.b1 else min(s.b1) if s.b1 else None
    if bs is None:
        raise RuntimeError("needs B1 timings (run B1 first)")
    mm = s.worker("polytope").request("matmul", 300, n=2048, repeats=5)
    s.metric("B6", "matmul_gflops", "machine", mm["gflops"], "GFLOP/s")
    vals: dict[str, tuple[float, float]] = {}
    for side in ("polytope", "reference"):
        if side not in s.b1[bs]:
            s.flops_detail[side] = {"error": "no B1 timing"}
            continue
        try:
            f = s.worker(side).request("flops", a.timeout, start=0, stop=bs, eps=a.eps)
        except WorkerError as exc:
            s.flops_detail[side] = {"error": str(exc)}
            continue
        per_image = f["flops"] / bs
        gflops = per_image / s.b1[bs][side] / 1e9
        vals[side] = (per_image, gflops)
        s.flops_detail[side] = f["per_op"]
        s.metric("B6", "flops_per_image", side, per_image, "FLOP")
        s.metric("B6", "achieved_gflops", side, gflops, "GFLOP/s")
        s.metric("B6", "fraction_of_matmul", side, gflops / mm["gflops"], "")

    def cell(side: str) -> str:
        if side not in vals:
            return "n/a"
        per_image, gflops = vals[side]
        return f"{gflops / mm['gflops'] * 100:.1f}% ({fmt(gflops)} GFLOP/s; {fmt(per_image / 1e6)} MFLOP/image)"

    return [
        Row(
            "B6",
            f"arithmetic rate of B1 (batch {bs}) as % of dense fp32 matmul ({fmt(mm['gflops'])} GFLOP/s, n=2048)",
            cell("polytope"),
            cell("reference"),
            notes="FLOPs (2 per multiply-add) counted by torch.utils.flop_counter.FlopCounterMode on the first "
            f"{bs} images (matmul/conv/bmm only; elementwise ops are not counted), over the B1 median time",
        )
    ]


def row_b7(s: Suite) -> list[Row]:
    """B1 at batch 500 on CUDA: polytope, and the reference too when its environment has CUDA."""
    info = s.info.get("polytope") or s.worker("polytope").request("info", 60)
    if not info.get("cuda"):
        return [Row("B7", "GPU rows (B1 at batch 500 on CUDA)", status="skipped", notes="no CUDA device here")]
    a = s.args
    sides = ["polytope"]
    ref_note = "n/a (its environment's torch has no CUDA)"
    try:
        if (s.info.get("reference") or s.worker("reference").request("info", 60)).get("cuda"):
            sides.append("reference")
    except WorkerError as exc:
        ref_note = f"n/a ({exc})"
    bs = min(500, a.images)
    batches = [(lo, min(lo + bs, a.images)) for lo in range(0, a.images, bs)]
    times: dict[str, list[float]] = {side: [] for side in sides}
    for side in sides:  # one CPU worker of each side may be alive; close them to free memory
        if side in s.workers:
            s.workers.pop(side).close()
    workers = {side: s.fresh(side, device="cuda") for side in sides}
    try:
        for i, (lo, hi) in enumerate(batches + batches[:1] * a.repeats):
            for side in sides if i % 2 == 0 else sides[::-1]:
                r = workers[side].request("certify", a.timeout, start=lo, stop=hi, eps=a.eps)
                times[side].append(r["seconds"] / (hi - lo))
    finally:
        for w in workers.values():
            w.close()
    rate = {side: 1.0 / statistics.median(times[side]) for side in sides}
    for side in sides:
        s.metric("B7", "throughput_cuda", side, rate[side], "images/s")
    cpu = 1.0 / s.b1[bs]["polytope"] if bs in s.b1 else math.nan
    ratio = f"{rate['polytope'] / rate['reference']:.2f}x" if "reference" in rate else ""
    return [
        Row(
            "B7",
            f"certify on CUDA ({info.get('gpu', 'GPU')}), batch {bs}, {a.images} images (images/s)",
            fmt(rate["polytope"]),
            fmt(rate["reference"]) if "reference" in rate else ref_note,
            ratio,
            notes=f"polytope on CUDA is {rate['polytope'] / cpu:.1f}x its CPU rate (B1)" if math.isfinite(cpu) else "",
        )
    ]


def row_ladder(s: Suite) -> list[Row]:
    """One row per method at its best batch size of ``--ladder-batches`` (the others in the notes)."""
    a = s.args
    w = s.worker("polytope")
    rows = []
    for method, n in (("dual", a.ladder_images), ("adaptive", a.ladder_images), ("optimized", a.optimized_images)):
        n = min(n, a.images)
        runs = {}
        try:
            for bs in a.ladder_batches:
                runs[bs] = w.request("ladder", a.timeout, method=method, start=0, stop=n, batch=bs, eps=a.eps)
        except WorkerError as exc:
            rows.append(Row(f"L {method}", f"pt.certify(method='{method}')", status="failed", notes=str(exc)))
            continue
        rates = {bs: r["n"] / sum(r["times"]) for bs, r in runs.items()}
        bs = max(rates, key=rates.get)
        r, rate = runs[bs], rates[bs]
        s.metric(f"L-{method}", "throughput", "polytope", rate, "images/s")
        s.metric(f"L-{method}", "not_certified", "polytope", r["not_certified"], "images")
        ref_bs, ref_rate = reference_best_rate(s)
        ratio, target = "", ""
        if ref_rate is not None:
            ratio = f"{rate / ref_rate:.2f}x"
            s.metric(f"L-{method}", "speedup", "polytope/reference", rate / ref_rate, "x")
            if method in LADDER_TARGETS:
                met = "met" if rate / ref_rate >= LADDER_TARGETS[method] else "NOT met"
                target = f">= {LADDER_TARGETS[method]:g}x: {met}"
        others = "; ".join(f"batch {b}: {fmt(v)} images/s" for b, v in rates.items() if b != bs)
        counts = {runs[b]["not_certified"] for b in runs}
        rows.append(
            Row(
                f"L {method}",
                f"pt.certify(method='{method}'), eps={a.eps}, batch {min(bs, r['n'])} (its best of "
                f"{', '.join(map(str, a.ladder_batches))}), {r['n']} image(s) (images/s)",
                fmt(rate),
                "n/a" if ref_rate is None else f"{fmt(ref_rate)} (dual bound, B1 at batch {ref_bs})",
                ratio, target,
                check=f"not certified: {r['not_certified']}/{r['n']}"
                + ("" if len(counts) == 1 else f" (other batch sizes: {sorted(counts)})"),
                notes=f"total {fmt(sum(r['times']))} s{'; ' + others if others else ''}; the reference column is "
                "its best B1 rate (it has no such method)",
            )
        )
    return rows


def reference_best_rate(s: Suite) -> tuple[int | None, float | None]:
    """The reference's best B1 throughput in this run (images/s) and its batch size, if B1 ran."""
    rates = {bs: 1.0 / sides["reference"] for bs, sides in s.b1.items() if sides.get("reference")}
    if not rates:
        return None, None
    bs = max(rates, key=rates.get)
    return bs, rates[bs]


def row_profile(s: Suite) -> list[Row]:
    s.profile = s.worker("polytope").request("profile", s.args.timeout, start=0, stop=50, eps=s.args.eps, top=12)
    return []


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """``lscpu``'s "Model name" (``/proc/cpuinfo``'s "model name" where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
        if names:
            return names[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return models[0] if models else "unknown"


def machine_info() -> dict[str, str]:
    info = {"nproc": str(os.cpu_count()), "platform": platform.platform(), "cpu": cpu_model()}
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory"] = f"{int(mem) / 1024**2:.1f} GiB"
    except (OSError, IndexError, ValueError):
        info["memory"] = "unknown"
    return info


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def wait_for_quiet(limit: float, max_wait_s: float, poll_s: float = 60.0) -> str:
    """Sleep (``poll_s`` at a time, ``max_wait_s`` at most) until the 1-minute load average is below ``limit``.

    The machine is shared; a timed row started under load measures the other processes as much
    as the two libraries.  Returns the load average when the wait ended (``limit <= 0``: no wait).
    """
    waited = 0.0
    while limit > 0 and waited < max_wait_s:
        try:
            one = float(loadavg().split()[0])
        except (ValueError, IndexError):
            break
        if one < limit:
            break
        log(f"    load average {loadavg()} >= {limit:g}: waiting {poll_s:.0f} s")
        time.sleep(poll_s)
        waited += poll_s
    return loadavg() + (f" (after {waited:.0f} s of waiting)" if waited else "")


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "polytope"], cwd=ROOT, capture_output=True, text=True
        )
        return rev.stdout.strip() + (" (polytope/ has uncommitted changes)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def esc(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def in_process_line(s: Suite) -> str:
    both = s.info.get("both")
    if s.overlay_error:
        return f"UNAVAILABLE: {s.overlay_error}"
    if not both:
        return "not run"
    ref = both.get("reference", {})
    return (f"polytope and convex_adversarial {ref.get('convex_adversarial', '?')} (from `benchmarks/.ca-overlay`) in "
            f"one process of the project's python {ref.get('python', '?')}, torch {ref.get('torch', '?')}, "
            f"numpy {ref.get('numpy', '?')}, {ref.get('threads', '?')} torch threads")


def write_report(s: Suite, started: str, load_start: str, seconds: float) -> None:
    a = s.args
    m = machine_info()
    both = s.info.get("both", {})
    pinfo, rinfo = s.info.get("polytope", both.get("polytope", {})), s.info.get("reference", both.get("reference", {}))
    lines = [
        "# Benchmarks: polytope vs the reference implementation",
        "",
        f"Generated by `python benchmarks/run.py{''.join(' ' + arg for arg in a.argv)}` "
        f"on {started} in {seconds / 60:.1f} min "
        f"({'quick smoke run' if a.quick else 'full suite'}).",
        "",
        "## Machine",
        "",
        f"- CPU (lscpu \"Model name\"): {m['cpu']}; nproc = {m['nproc']}; memory {m['memory']}; {m['platform']}",
        f"- date: {started}; commit {git_rev()}",
        f"- load average (1/5/15 min) at start: {load_start}; at end: {loadavg()}"
        + (f"; each group of timed rows (B1A, B1I, B1, ...) waited for a 1-minute load below {a.wait_load:g} (up "
           f"to {a.wait_max / 60:.0f} min; the load at each row's start is in its notes)" if a.wait_load > 0 else ""),
        "- glibc malloc tunables: "
        + (", ".join(f"`{k}={v}`" for k, v in MALLOC_TUNABLES.items()) if a.malloc_tunables else "glibc defaults "
           "(`--malloc-tunables` not given)"),
        f"- torch threads per worker: {pinfo.get('threads', '?')} (polytope), {rinfo.get('threads', '?')} (reference)",
        f"- polytope: torch {pinfo.get('torch', '?')}, python {pinfo.get('python', '?')}, commit {git_rev()}",
        f"- reference: convex_adversarial {rinfo.get('convex_adversarial', '?')}, torch {rinfo.get('torch', '?')}, "
        f"numpy {rinfo.get('numpy', '?')}, python {rinfo.get('python', '?')} (in `benchmarks/.venv-ref`)"
        + (f" -- UNAVAILABLE: {s.ref_error}" if s.ref_error else ""),
        f"- in-process rows (B1I): {in_process_line(s)}",
        f"- CUDA: {'yes' if pinfo.get('cuda') else 'no'}",
        "",
        "## Results",
        "",
        f"Model: {model_description(a)}; eps = {a.eps} (l_inf); images: the first "
        f"{a.images} MNIST test images (batch 1 uses the first {min(a.single_images, a.images)}). "
        "Speed-ups are polytope over the reference (> 1: polytope is faster), from medians.",
        "",
        "| Row | Measure | polytope | reference | speed-up | target | check | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in s.rows:
        if r.status == "ok":
            cells = [r.rid, r.what, r.polytope, r.reference, r.ratio, r.target, r.check, r.notes]
        else:
            cells = [r.rid, r.what, r.status.upper(), "", "", "", "", r.notes]
        lines.append("| " + " | ".join(esc(c) for c in cells) + " |")
    if s.profile:
        p = s.profile
        lines += [
            "",
            "## Where polytope's time goes (B1, batch 50, torch.profiler)",
            "",
            f"Self CPU time over all ops: {fmt(p['total_ms'])} ms for 50 images.",
            "",
            "| op | calls | self CPU (ms) | share |",
            "| --- | --- | --- | --- |",
        ]
        for t in p["top"]:
            lines.append(f"| {esc(t['op'])} | {t['calls']} | {fmt(t['self_ms'])} | {t['share'] * 100:.1f}% |")
        if p.get("functions"):
            lines += [
                "",
                "polytope's own functions by cumulative time (cProfile, same batch; share of the whole call):",
                "",
                "| function | calls | cumulative (s) | self (s) | share |",
                "| --- | --- | --- | --- | --- |",
            ]
            for f in p["functions"]:
                lines.append(
                    f"| {esc(f['function'])} | {f['calls']} | {fmt(f['cum_s'])} | {fmt(f['self_s'])} "
                    f"| {f['share'] * 100:.1f}% |"
                )
    if s.flops_detail:
        lines += ["", "## FLOPs by op (B6, FlopCounterMode, first batch)", ""]
        for side, d in s.flops_detail.items():
            if "error" in d:
                text = f"not counted ({d['error']})"
            else:
                text = ", ".join(f"{k}: {v / 1e9:.2f} G" for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:6])
            lines.append(f"- {side}: {esc(text)}")
    lines += ["", "## Reference fixes (applied at install time in `benchmarks/.venv-ref`)", ""]
    lines += [f"- {note}" for note in ref_env.FIX_NOTES]
    lines += [
        "",
        "## Method",
        "",
        "- Each side is a long-lived worker subprocess (`benchmarks/worker.py`) that loads the same model "
        "state dict and image tensors from one temporary file; polytope runs in the project's environment, "
        "convex_adversarial in `benchmarks/.venv-ref`. Times are taken inside the worker around the "
        "computation alone (`time.perf_counter`), after a 2-image warm-up. Nothing runs in a worker between "
        "two requests (no memory trimming, no clean-up): each side stays in the state a user's process would "
        "be in. The glibc malloc tunables are set only with `--malloc-tunables` (off by default).",
        "- Fairness rows (issue 20): `B1A` times each side alone in a fresh process (the other side's "
        "process is not running), `B1I` runs both libraries in one process (the project's environment plus "
        "convex_adversarial from `benchmarks/.ca-overlay`), alternating call by call on the same batches; "
        "each `best` row takes each side at its own fastest batch size.",
        "- B1: both sides process the same batches, alternating which side goes first, then repeat the first "
        "batch; throughput is 1 / median(seconds per image). polytope: `pt.margin_bounds(net, x, y, "
        "pt.LinfBall(eps))` under `torch.no_grad()`; reference: `DualNetwork(model, x, eps)(c)` with "
        "c = e_y 1^T - I (what its `robust_loss` computes). Certified: every J_j > 0 for j != y, on both "
        "J matrices. The check compares the (B, 10) matrices entry by entry (tolerance 1e-4).",
        "- B2: `pt.robust_loss` vs `convex_adversarial.robust_loss`, forward + `backward()` to the model's "
        "parameters; losses and gradients are compared.",
        "- B3: polytope's LP builders (`polytope/solvers/lp.py`), HiGHS via highspy (warm: the basis is kept between "
        "targets; cold: cleared; columns only for the input, the unstable units and the output), cvxpy (every unit "
        "a variable: an independent formulation), and scipy's linprog on the same matrices read back from HiGHS; "
        "float64; bounds l, u from the dual network (LP-all: every intermediate bound by LPs).",
        "- B5: `ru_maxrss` of a fresh worker process (B1 row: the fresh processes that run B1 at the largest "
        "batch first).",
        "- CPU-time speed-ups (in the notes) divide process CPU time (all threads) instead of wall-clock time; "
        "they are less sensitive to other processes on a busy machine.",
        "- Timings on a loaded machine are noisy: compare rows measured in the same run only.",
        "",
    ]
    (HERE / a.out).write_text("\n".join(lines))


def write_csv(s: Suite) -> None:
    path = HERE / s.args.csv
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["row", "metric", "side", "value", "unit"])
        for rid, name, side, value, unit in s.metrics:
            out.writerow([rid, name, side, f"{value:.6g}", unit])
        for r in s.rows:
            if r.status != "ok":
                out.writerow([r.rid, r.status, "", "", r.notes])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def model_description(a: argparse.Namespace) -> str:
    if a.model is None:
        return "the released MNIST model of Wong & Kolter (2018)"
    return f"architecture `{a.arch}` (`benchmarks/archs.py`) with the weights of `{a.model}`"


def prepare_data(tmp: Path, n: int, arch: str = "mnist", model_path: str | None = None) -> Path:
    """The model's architecture name and state dict and the first ``n`` MNIST test images, in one file.

    Without ``model_path`` the model is the released MNIST model (architecture ``mnist``).
    """
    import torch

    sys.path.insert(0, str(ROOT))
    from polytope.io.data import load_dataset
    from polytope.io.models import load_released

    if model_path is None:
        if arch != "mnist":
            raise ValueError(f"--arch {arch} needs --model (a state dict, e.g. from benchmarks/train_archs.py)")
        model = load_released("mnist")
    else:
        model = archs.build(arch)
        model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    x, y = load_dataset("mnist", "test", limit=n)
    path = tmp / "data.pt"
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"arch": arch, "state_dict": state, "x": x.contiguous(), "y": y.contiguous()}, path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="polytope vs convex_adversarial benchmarks")
    p.add_argument("--quick", action="store_true", help="a fast smoke run (100 images, small counts)")
    p.add_argument("--rows", default="", help="comma-separated subset: B1,B1A,B1I,B2,B3,B4,B5,B6,B7,L,P (default: all; "
                   "B1A: each side alone in a fresh process, B1I: both in one process, interleaved)")
    p.add_argument("--arch", default="mnist", choices=sorted(archs.ARCHS), help="architecture (benchmarks/archs.py)")
    p.add_argument("--model", help="state dict of --arch (default: the released MNIST model)")
    p.add_argument("--eps", type=float, default=EPS, help=f"l_inf radius (default {EPS})")
    p.add_argument("--malloc-tunables", action="store_true",
                   help="give every worker the glibc MALLOC_* settings of MALLOC_TUNABLES (default: glibc defaults)")
    p.add_argument("--wait-load", type=float, default=0.0,
                   help="before each timed row, wait until the 1-minute load average is below this (0: no wait)")
    p.add_argument("--wait-max", type=float, default=900.0, help="seconds to wait for --wait-load at most, per row")
    p.add_argument("--images", type=int, help="MNIST test images for B1 (default 1000; quick 100)")
    p.add_argument("--single-images", type=int, help="images timed at batch 1 (default 100; quick 10)")
    p.add_argument("--batch-sizes", help="B1, B1A, B1I batch sizes (default 500,50,1; quick 100,50,1)")
    p.add_argument("--repeats", type=int, help="extra timings of the first batch per B1 row (default 2; quick 1)")
    p.add_argument("--train-batches", type=int, help="B2 steps per side (default 5; quick 1)")
    p.add_argument("--ladder-images", type=int, help="images for the dual/adaptive ladder rows (1000; quick 50)")
    p.add_argument("--optimized-images", type=int, help="images for method='optimized' (1000; quick 50)")
    p.add_argument("--ladder-batches", type=lambda v: [int(b) for b in v.split(",")], default=[500, 50],
                   help="batch sizes of the L rows; each row reports its best (default 500,50)")
    p.add_argument("--lp-index", type=int, default=0, help="test image of B3")
    p.add_argument("--directions", type=int, default=360, help="K of B4")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in each worker")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed for one worker request")
    p.add_argument("--ref-venv", default=str(ref_env.VENV), help="the reference virtual environment")
    p.add_argument("--out", default="results.md", help="report file, relative to benchmarks/")
    p.add_argument("--csv", default="results.csv", help="CSV file, relative to benchmarks/")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    quick = a.quick
    defaults = {
        "images": 100 if quick else 1000,
        "single_images": 10 if quick else 100,
        "batch_sizes": "100,50,1" if quick else "500,50,1",
        "repeats": 1 if quick else 2,
        "train_batches": 1 if quick else 5,
        "ladder_images": 50 if quick else 1000,
        "optimized_images": 50 if quick else 1000,
    }
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.batch_sizes = [int(b) for b in str(a.batch_sizes).split(",") if b.strip()]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    wanted = {r.strip().upper() for r in a.rows.split(",") if r.strip()} or {
        "B1",
        "B1A",
        "B1I",
        "B2",
        "B3",
        "B4",
        "B5",
        "B6",
        "B7",
        "L",
        "P",
    }
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_start = loadavg()
    t0 = time.perf_counter()
    log(
        f"benchmarks: {'quick' if a.quick else 'full'} run, {a.images} images, batch sizes {a.batch_sizes}, "
        f"{a.threads} threads per worker; load average {load_start}"
    )

    ref_python, ref_error = None, None
    if wanted & {"B1", "B1A", "B2", "B5", "B6"}:
        try:
            ref_python = str(ref_env.ensure(Path(a.ref_venv), log=log))
        except Exception as exc:
            ref_error = f"{type(exc).__name__}: {exc}"
            log(f"reference env: FAILED: {ref_error}")
    overlay_error = None
    if "B1I" in wanted:
        try:
            ref_env.ensure_overlay(log=log)
        except Exception as exc:
            overlay_error = f"{type(exc).__name__}: {exc}"
            log(f"convex_adversarial overlay: FAILED: {overlay_error}")

    with tempfile.TemporaryDirectory(prefix="polytope-bench-") as tmpdir:
        tmp = Path(tmpdir)
        data = prepare_data(tmp, a.images, a.arch, a.model)
        s = Suite(a, tmp, data, ref_python, ref_error, overlay_error)

        def run(rid: str, fn: Callable[[], list[Row]], what: str, wait: bool = True) -> None:
            # --wait-load: once per group of rows (the workers' own load would hold up the next row)
            s.row_load = wait_for_quiet(a.wait_load, a.wait_max) if wait else loadavg()
            start = time.perf_counter()
            try:
                rows = fn()
            except Exception as exc:
                traceback.print_exc()
                rows = [Row(rid, what, status="failed", notes=f"{type(exc).__name__}: {exc}")]
            s.rows.extend(rows)
            for r in rows:
                if r.status == "ok":
                    log(f"[{r.rid}] polytope {r.polytope} | reference {r.reference} | {r.ratio} {r.check}".rstrip())
                else:
                    log(f"[{r.rid}] {r.status.upper()}: {r.notes}")
            log(f"    ({time.perf_counter() - start:.0f} s; {(time.perf_counter() - t0) / 60:.1f} min so far)")
            write_report(s, started, load_start, time.perf_counter() - t0)  # a partial report survives a crash
            write_csv(s)

        try:
            sizes = sorted(a.batch_sizes, reverse=True)
            for tag, fn in (("B1A", row_b1_alone), ("B1I", row_b1_interleaved)):
                if tag in wanted:
                    mode = "alone" if tag == "B1A" else "interleaved"
                    for k, bs in enumerate(sizes):
                        run(f"{tag} bs={bs}", lambda fn=fn, bs=bs: fn(s, bs), f"certify, batch {bs}, {MODES[mode]}",
                            wait=k == 0)
                    if len(sizes) > 1:
                        run(f"{tag} best", lambda mode=mode: row_b1_best(s, mode), "best batch size per side", False)
            if "B1" in wanted or "B5" in wanted:
                for i, bs in enumerate(sizes):
                    run(
                        f"B1 bs={bs}",
                        lambda bs=bs, i=i: row_b1(s, bs, memory=(i == 0 and "B5" in wanted)),
                        f"certify, batch {bs}",
                        wait=i == 0,
                    )
                if len(sizes) > 1:
                    run("B1 best", lambda: row_b1_best(s), "best batch size per side", False)
            if "B6" in wanted:
                run("B6", lambda: row_b6(s), "arithmetic rate")
            if "P" in wanted:
                run("P", lambda: row_profile(s), "profile")
            if "B2" in wanted:
                run("B2", lambda: row_b2(s), "robust-training step")
            if "B3" in wanted:
                run("B3", lambda: row_b3(s), "exact LP")
            if "B4" in wanted:
                run("B4", lambda: row_b4(s), "Figure-6 polygon")
            if "L" in wanted:
                run("L", lambda: row_ladder(s), "certify ladder")
            if "B7" in wanted:
                run("B7", lambda: row_b7(s), "GPU")
        finally:
            s.close()
        write_report(s, started, load_start, time.perf_counter() - t0)
        write_csv(s)
    failed = [r.rid for r in s.rows if r.status == "failed"]
    log(
        f"wrote {HERE / a.out} and {HERE / a.csv} in {(time.perf_counter() - t0) / 60:.1f} min"
        + (f"; failed rows: {', '.join(failed)}" if failed else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
