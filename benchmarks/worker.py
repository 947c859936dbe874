"""One side of the benchmark suite, run as a long-lived subprocess by ``benchmarks/run.py``.

``python benchmarks/worker.py --side polytope|reference|both --data FILE.pt [--threads N]``

``--side polytope`` runs in the project's environment; ``--side reference`` runs in the
separate ``benchmarks/.venv-ref`` where ``convex_adversarial`` is installed (polytope is not
importable there, and this file imports it only on the polytope side); ``--side both`` imports
both libraries in one process (the project's environment plus a convex_adversarial overlay,
see ``ref_env.ensure_overlay``) and alternates them call by call.  The data file holds the
model's architecture name (``archs.py``), its state dict and the test images (``arch``,
``state_dict``, ``x``, ``y``) so that both sides compute on the very same tensors.

Protocol: one JSON request per line on stdin, one JSON answer per line on the original stdout
(anything a library prints is sent to stderr instead).  Every answer has ``ok``; a failure
answers ``{"ok": false, "error": ...}`` and the worker stays up.  Times are measured here, in
the worker, around the computation only (``time.perf_counter``).  Nothing runs between two
requests: no memory trimming or other clean-up changes either side's state between timed calls.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
import traceback
from typing import Any

import archs  # benchmarks/archs.py (this script's directory is on sys.path)
import torch

EPS_DEFAULT = 0.1


def margin_c(y: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``c = e_y 1^T - I`` as ``(B, n, n)``: row ``j`` is ``e_y - e_j``."""
    eye = torch.eye(n, dtype=dtype, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def maxrss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_rate(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Dense float32 ``n x n`` matmul rate: ``2 n^3`` flops over the median time."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    return {"n": n, "seconds": med, "gflops": 2.0 * n**3 / med / 1e9}


class Side:
    """What both sides share: the model, the data, timing of one batch."""

    name = "abstract"
    flops_with_grad = False

    def __init__(self, data: str, device: str = "cpu") -> None:
        blob = torch.load(data, map_location="cpu", weights_only=True)
        self.device = torch.device(device)
        self.model = archs.build(blob.get("arch", "mnist"))
        self.model.load_state_dict(blob["state_dict"])
        self.model.eval().to(self.device)
        self.x = blob["x"].to(self.device)
        self.y = blob["y"].to(self.device)

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[start:stop], self.y[start:stop]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- to be provided per side -------------------------------------------------------------
    def margins(self, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        """``(B, 10)`` lower bounds ``J`` on ``f_y - f_j`` (no autograd)."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        """The robust cross-entropy loss (with autograd)."""
        raise NotImplementedError

    # -- commands ----------------------------------------------------------------------------
    def cmd_certify(self, req: dict[str, Any]) -> dict[str, Any]:
        x, y = self.batch(req["start"], req["stop"])
        eps = req.get("eps", EPS_DEFAULT)
        self.sync()
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            j = self.margins(x, y, eps)
        self.sync()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        if req.get("out"):
            torch.save(j.detach().cpu(), req["out"])
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "n": int(x.shape[0])}

    def cmd_train_step(self, req: dict[str, Any]) -> dict[str, Any]:
        x, y = self.batch(req["start"], req["stop"])
        eps = req.get("eps", EPS_DEFAULT)
        for p in self.model.parameters():
            p.grad = None
        self.sync()
        start, cpu = time.perf_counter(), time.process_time()
        loss = self.loss(x, y, eps)
        loss.backward()
        self.sync()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        if req.get("out"):
            grads = {k: p.grad.detach().cpu().clone() for k, p in self.model.named_parameters()}
            torch.save({"loss": loss.detach().cpu(), "grads": grads}, req["out"])
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "loss": float(loss)}

    def cmd_flops(self, req: dict[str, Any]) -> dict[str, Any]:
        from torch.utils.flop_counter import FlopCounterMode

        x, y = self.batch(req["start"], req["stop"])
        counter = FlopCounterMode(display=False)
        # FlopCounterMode's module tracker trips over convex_adversarial's modules under no_grad
        # ("Expected gradient function to be set"); recording the graph changes no op counted.
        with torch.set_grad_enabled(self.flops_with_grad), counter:
            self.margins(x, y, req.get("eps", EPS_DEFAULT))
        per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
        return {"flops": int(counter.get_total_flops()), "per_op": per_op}

    def cmd_matmul(self, req: dict[str, Any]) -> dict[str, Any]:
        return matmul_rate(req.get("n", 2048), req.get("repeats", 5))

    def cmd_maxrss(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"maxrss_mib": maxrss_mib()}

    def cmd_info(self, req: dict[str, Any]) -> dict[str, Any]:
        return {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
            "device": str(self.device),
        }


class Reference(Side):
    """convex_adversarial 0.4.4 (Wong & Kolter's released code)."""

    name = "reference"
    flops_with_grad = True

    def __init__(self, data: str, device: str = "cpu") -> None:
        super().__init__(data, device)
        import convex_adversarial

        self.ca = convex_adversarial

    def margins(self, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        # DualNetwork(c) is J(x, g(c)) itself (RobustBounds returns -DualNetwork(c)).
        dual = self.ca.DualNetwork(self.model, x, eps)
        return dual(margin_c(y, 10, x.dtype))

    def loss(self, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        loss, _err = self.ca.robust_loss(self.model, eps, x, y)
        return loss

    def cmd_info(self, req: dict[str, Any]) -> dict[str, Any]:
        info = super().cmd_info(req)
        try:
            from importlib.metadata import version

            info["convex_adversarial"] = version("convex_adversarial")
            info["numpy"] = version("numpy")
        except Exception as exc:  # metadata is informative only
            info["convex_adversarial"] = f"? ({exc})"
        return info


class Polytope(Side):
    """This project."""

    name = "polytope"

    def __init__(self, data: str, device: str = "cpu") -> None:
        super().__init__(data, device)
        import polytope as pt

        self.pt = pt
        # a graph (res_mnist) needs its input shape; a chain is read as before (older polytope has no input_shape)
        shape = {} if archs.is_chain(self.model) else {"input_shape": tuple(self.x.shape[1:])}
        self.net = pt.Network.from_torch(self.model, **shape)

    def margins(self, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        return self.pt.margin_bounds(self.net, x, y, self.pt.LinfBall(eps))

    def loss(self, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        loss, _err = self.pt.robust_loss(self.net, x, y, self.pt.LinfBall(eps))
        return loss

    def cmd_info(self, req: dict[str, Any]) -> dict[str, Any]:
        info = super().cmd_info(req)
        info["polytope_file"] = self.pt.__file__
        return info

    def cmd_ladder(self, req: dict[str, Any]) -> dict[str, Any]:
        """``pt.certify`` with one ``method`` over ``[start, stop)`` in batches; per-batch times."""
        pt = self.pt
        eps = req.get("eps", EPS_DEFAULT)
        bs = req["batch"]
        times, not_certified, n = [], 0, 0
        for lo in range(req["start"], req["stop"], bs):
            x, y = self.batch(lo, min(lo + bs, req["stop"]))
            self.sync()
            start = time.perf_counter()
            ok = pt.certify(self.net, x, pt.LinfBall(eps), y=y, method=req["method"])
            self.sync()
            times.append(time.perf_counter() - start)
            not_certified += int((~ok).sum())
            n += int(x.shape[0])
        return {"times": times, "not_certified": not_certified, "n": n}

    def cmd_profile(self, req: dict[str, Any]) -> dict[str, Any]:
        """torch.profiler over one certification batch: the top ops by self CPU time."""
        from torch.profiler import ProfilerActivity, profile

        x, y = self.batch(req["start"], req["stop"])
        eps = req.get("eps", EPS_DEFAULT)
        with torch.no_grad():
            self.margins(x, y, eps)  # warm-up at this batch size
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                self.margins(x, y, eps)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: req.get("top", 12)]
        top = [
            {
                "op": e.key,
                "calls": int(e.count),
                "self_ms": e.self_cpu_time_total / 1000.0,
                "share": e.self_cpu_time_total / total,
            }
            for e in rows
        ]
        return {"total_ms": total / 1000.0, "top": top, "functions": self._cprofile(x, y, eps, req.get("top", 12))}

    def _cprofile(self, x: torch.Tensor, y: torch.Tensor, eps: float, top: int) -> list[dict[str, Any]]:
        """cProfile over the same call: polytope's own functions by cumulative time."""
        import cProfile
        import pstats

        prof = cProfile.Profile()
        with torch.no_grad():
            prof.enable()
            self.margins(x, y, eps)
            prof.disable()
        stats = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tottime, cumtime, callers)}
        total = max((v[3] for v in stats.values()), default=1.0) or 1.0
        mine = [(k, v) for k, v in stats.items() if f"{os.sep}polytope{os.sep}" in k[0] and "benchmarks" not in k[0]]
        mine.sort(key=lambda kv: kv[1][3], reverse=True)
        return [
            {
                "function": f"{k[0].split(os.sep + 'polytope' + os.sep)[-1]}:{k[1]} {k[2]}",
                "calls": int(v[1]),
                "cum_s": v[3],
                "self_s": v[2],
                "share": v[3] / total,
            }
            for k, v in mine[:top]
        ]

    def cmd_lp(self, req: dict[str, Any]) -> dict[str, Any]:
        """B3: the exact relaxed LP (eq. 19) for all non-true targets of one example, four ways, and LP-all."""
        import numpy as np

        from polytope.model.network import as_float64
        from polytope.solvers import lp as lpmod
        pt = self.pt
        idx = req.get("index", 0)
        eps = req.get("eps", EPS_DEFAULT)
        x, y = self.batch(idx, idx + 1)
        label = int(y[0])
        targets = [j for j in range(10) if j != label]
        eye = torch.eye(10, dtype=torch.float64)
        c_rows = torch.stack([eye[label] - eye[j] for j in targets])
        ball = pt.LinfBall(eps)
        with torch.no_grad():
            j_dual = pt.margin_bounds(as_float64(self.net), x.double(), y, ball)[0]
        out: dict[str, Any] = {"label": label, "targets": targets, "J": [float(j_dual[j]) for j in targets]}
        paths = req.get("paths", ["highs_warm", "highs_cold", "cvxpy", "linprog", "highs_lp_all"])

        def highs(warm: bool, bounds: str = "dual") -> dict[str, Any]:
            start = time.perf_counter()
            model = lpmod.RelaxedLP(self.net, x, ball, bounds=bounds, warm_start=warm)
            build = time.perf_counter() - start
            start = time.perf_counter()
            res = model.solve_many(c_rows, warm_start=warm)
            solve = time.perf_counter() - start
            return {
                "build_s": build,
                "solve_s": solve,
                "values": [r.value for r in res],
                "status": [r.status for r in res],
                "iterations": [r.iterations for r in res],
                "n_unstable": list(model.n_unstable),
                "model": model,
            }

        # Untimed warm-up on the next image: first-call costs (HiGHS's first instance, torch kernels) stay out.
        x_next, y_next = self.batch(idx + 1, idx + 2)
        lpmod.RelaxedLP(self.net, x_next, ball).solve(eye[int(y_next[0])] - eye[(int(y_next[0]) + 1) % 10])
        results: dict[str, Any] = {}
        for path in paths:
            try:
                if path == "highs_warm":
                    results[path] = highs(True)
                elif path == "highs_cold":
                    results[path] = highs(False)
                elif path == "highs_lp_all":
                    results[path] = highs(True, "lp-all")
                elif path == "cvxpy":
                    start = time.perf_counter()
                    model = lpmod.RelaxedLPCvxpy(self.net, x, ball, bounds="dual")
                    build = time.perf_counter() - start
                    start = time.perf_counter()
                    res = [model.solve(c) for c in c_rows]
                    results[path] = {
                        "build_s": build,
                        "solve_s": time.perf_counter() - start,
                        "values": [r.value for r in res],
                        "status": [r.status for r in res],
                    }
                elif path == "linprog":
                    results[path] = linprog_path(self.net, x, ball, c_rows, lpmod, np)
                else:
                    results[path] = {"error": f"unknown path {path}"}
            except Exception as exc:
                results[path] = {"error": f"{type(exc).__name__}: {exc}"}
        for r in results.values():
            r.pop("model", None)
        out["paths"] = results
        out["maxrss_mib"] = maxrss_mib()
        return out

    def cmd_polygon(self, req: dict[str, Any]) -> dict[str, Any]:
        """B4: Figure 6's outer polygons of a random 2-100-100-100-2 network, K directions."""
        from polytope.solvers import polygons
        k = req.get("k", 360)
        eps = req.get("eps", EPS_DEFAULT)
        gen = torch.Generator().manual_seed(req.get("seed", 0))
        seq = polygons.random_network((2, 100, 100, 100, 2), generator=gen, dtype=torch.float64)
        x = torch.rand(1, 2, generator=gen, dtype=torch.float64)
        net = self.pt.Network.from_torch(seq)
        ball = self.pt.LinfBall(eps)
        polygons.dual_polygon(net, x, ball, k=8)  # warm-up of the torch path
        dual_times = []
        for _ in range(req.get("dual_repeats", 3)):
            start = time.perf_counter()
            dual = polygons.dual_polygon(net, x, ball, k=k)
            dual_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        lp = polygons.lp_polygon(net, x, ball, k=k)
        lp_seconds = time.perf_counter() - start
        return {
            "k": k,
            "eps": eps,
            "lp_s": lp_seconds,
            "lp_area": lp.area,
            "lp_inner_area": lp.inner_area,
            "lp_not_optimal": sum(s != "optimal" for s in lp.statuses),
            "dual_s": statistics.median(dual_times),
            "dual_area": dual.area,
        }


def linprog_path(net: Any, x: torch.Tensor, ball: Any, c_rows: torch.Tensor, lpmod: Any, np: Any) -> dict[str, Any]:
    """The same LP handed to ``scipy.optimize.linprog`` (HiGHS dual simplex, no warm start).

    The model is read back from polytope's HiGHS builder (``getLp``) and rewritten in
    linprog's ``A_ub x <= b_ub, A_eq x = b_eq, bounds`` form; the build time counts both.
    """
    import scipy.sparse as sp
    from scipy.optimize import linprog

    start = time.perf_counter()
    model = lpmod.RelaxedLP(net, x, ball, bounds="dual")
    lp = model.model.h.getLp()
    n_cols, n_rows = lp.num_col_, lp.num_row_
    a = lp.a_matrix_
    parts = (np.asarray(a.value_), np.asarray(a.index_), np.asarray(a.start_))
    rowwise = a.format_ == type(a.format_).kRowwise  # rows added by addRows are stored row-wise
    mat = (sp.csr_matrix if rowwise else sp.csc_matrix)(parts, shape=(n_rows, n_cols)).tocsr()
    row_lo, row_hi = np.asarray(lp.row_lower_), np.asarray(lp.row_upper_)
    inf = 1e30  # HiGHS's infinity is kHighsInf = inf; anything beyond 1e30 is treated as none
    eq = np.isclose(row_lo, row_hi) & (np.abs(row_lo) < inf)
    has_hi = ~eq & (row_hi < inf)
    has_lo = ~eq & (row_lo > -inf)
    a_ub = sp.vstack([mat[has_hi], -mat[has_lo]]).tocsr()
    b_ub = np.concatenate([row_hi[has_hi], -row_lo[has_lo]])
    a_eq, b_eq = mat[eq], row_lo[eq]
    col_lo, col_hi = np.asarray(lp.col_lower_), np.asarray(lp.col_upper_)
    bounds = np.column_stack([np.where(col_lo <= -inf, -np.inf, col_lo), np.where(col_hi >= inf, np.inf, col_hi)])
    out_cols = model.cols.zhat[-1]
    build = time.perf_counter() - start
    values, status = [], []
    start = time.perf_counter()
    for c in c_rows:
        cost = np.zeros(n_cols)
        cost[out_cols] = c.numpy()
        res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs-ds")
        values.append(float(res.fun) if res.status == 0 else math.nan)
        status.append("optimal" if res.status == 0 else f"status {res.status}: {res.message}")
    return {"build_s": build, "solve_s": time.perf_counter() - start, "values": values, "status": status}


class Both:
    """Both libraries in one process (issue 20's in-process cross-check): alternating calls, same batches."""

    name = "both"

    def __init__(self, data: str, device: str = "cpu") -> None:
        self.sides: dict[str, Side] = {"polytope": Polytope(data, device), "reference": Reference(data, device)}

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sides["polytope"].batch(start, stop)

    def margins(self, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        """Warm-up of both sides (the value returned is polytope's)."""
        self.sides["reference"].margins(x, y, eps)
        return self.sides["polytope"].margins(x, y, eps)

    def cmd_certify(self, req: dict[str, Any]) -> dict[str, Any]:
        """One batch on each side, in ``req["order"]``; ``req["out"]`` maps a side to its output file."""
        outs = req.get("out") or {}
        return {side: self.sides[side].cmd_certify({**req, "out": outs.get(side)}) for side in req["order"]}

    def cmd_maxrss(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"maxrss_mib": maxrss_mib()}

    def cmd_info(self, req: dict[str, Any]) -> dict[str, Any]:
        return {side: s.cmd_info(req) for side, s in self.sides.items()}


SIDES: dict[str, type[Side] | type[Both]] = {"polytope": Polytope, "reference": Reference, "both": Both}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=tuple(SIDES), required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    # Answers go to the original stdout; anything else printed goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        side: Side | Both = SIDES[args.side](args.data, args.device)
        with torch.no_grad():  # warm-up: first-call costs (allocator, kernels) stay out of timings
            side.margins(*side.batch(0, 2), EPS_DEFAULT)
        proto.write(json.dumps({"ok": True, "ready": True, "maxrss_mib": maxrss_mib()}) + "\n")
    except Exception as exc:
        traceback.print_exc()
        proto.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if req["cmd"] == "quit":
                break
            handler = getattr(side, f"cmd_{req['cmd']}", None)
            if handler is None:
                raise ValueError(f"{side.name} has no command {req['cmd']!r}")
            answer = {"ok": True, **handler(req)}
        except Exception as exc:
            traceback.print_exc()
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
