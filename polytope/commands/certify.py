"""``polytope certify``: Corollary 1 certificates over a data set, one row per example.

    polytope certify --model released:mnist --data mnist --eps 0.1 --out certify.csv

Columns: ``index, label, prediction, correct, certified, margin_lower`` where
``margin_lower = min_{j != y} J_j`` (eq. 15) is a lower bound on ``f_y - f_j`` over the ball:
the example is certified exactly when it is positive.  Runs are resumable (see
:mod:`polytope.runner`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from polytope.cascade import RUNGS, Cascade, Verdict
from polytope.commands import common
from polytope.network import Network
from polytope.robust import certificate_margins, worst_of
from polytope.runner import (
    RunSpec,
    add_runner_arguments,
    compute_device,
    model_hash,
    run,
    run_kwargs_from_args,
    write_csv,
)
from polytope.sets import InputSet

SOLVER_METHODS = ("lp", "lp-all", "milp", "cascade")
#: Methods whose algorithm changed since their first stored results: the revision joins the run
#: key, so old rows are never mixed with new ones (``optimized``: per-objective final slopes).
REVISIONS = {"optimized": 2}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``certify``."""
    parser = subparsers.add_parser(
        "certify", help="certify examples against norm-bounded perturbations (Corollary 1)",
        description=common.help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common.add_model_arguments(parser)
    common.add_data_arguments(parser)
    common.add_set_arguments(parser)
    common.add_device_arguments(parser)
    parser.add_argument("--method", default="dual", choices=("dual", "adaptive", "optimized", *SOLVER_METHODS),
                        help="dual: the paper's slopes alpha = u/(u-l); adaptive: 1 where u >= -l, else 0; "
                             "optimized: all layers' slopes by gradient ascent; lp, lp-all, milp: exact solvers; "
                             "cascade: attack, then each rung in turn while undecided")
    parser.add_argument("--time-limit", type=common.positive_float, default=60.0,
                        help="seconds per LP/MIP solve (default: 60)")
    parser.add_argument("--counterexamples", default=None, metavar="DIR",
                        help="save every verified counterexample as DIR/<index>.npz (solver methods)")
    add_runner_arguments(parser)
    parser.set_defaults(handler=run_certify)
    return parser


def _save_counterexample(directory: str, verdict: Verdict) -> None:
    path = Path(directory) / f"{verdict.index}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x_adv=verdict.counterexample, label=verdict.label, rung=verdict.rung)
    os.replace(tmp, path)


def cascade_chunk(payload: dict[str, Any], indices: list[int]) -> pd.DataFrame:
    """Rows of ``certify --method lp|lp-all|milp|cascade``: one verdict per example."""
    net = Network.from_torch(payload["model"])
    method = payload["method"]
    rungs = RUNGS if method == "cascade" else (method,)
    cascade = Cascade(net, payload["input_set"], rungs=rungs, time_limit=payload["time_limit"])
    rows = []
    batch = payload["batch_size"]
    for start in range(0, len(indices), batch):
        idx = indices[start:start + batch]
        x, y = payload["x"][idx], payload["y"][idx]
        with torch.no_grad():
            pred = net.forward(x).argmax(1).tolist()
        for v, p in zip(cascade.run(x, y, idx), pred, strict=True):
            if v.counterexample is not None and payload["counterexamples"]:
                _save_counterexample(payload["counterexamples"], v)
            rows.append({**v.row(), "prediction": p, "correct": p == v.label, "certified": v.verdict == "certified"})
    return pd.DataFrame(rows)


def certify_chunk(payload: dict[str, Any], indices: list[int]) -> pd.DataFrame:
    """Rows of :mod:`polytope.commands.certify` for the examples ``indices``."""
    if payload["method"] in SOLVER_METHODS:
        return cascade_chunk(payload, indices)
    device = payload["device"]
    seq = payload["model"].to(device)
    net = Network.from_torch(seq)
    x_all, y_all = payload["x"], payload["y"]
    rows = []
    batch = payload["batch_size"]
    for start in range(0, len(indices), batch):
        idx = torch.tensor(indices[start:start + batch])
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            pred = net.forward(x).argmax(1)
        margin = worst_of(certificate_margins(net, x, y, payload["input_set"], payload["method"]).detach(), y)
        seconds = (time.perf_counter() - t0) / len(idx)
        for i, lab, p, m in zip(idx.tolist(), y.tolist(), pred.tolist(), margin.tolist(), strict=True):
            rows.append({"index": i, "label": lab, "prediction": p, "correct": lab == p,
                         "certified": m > 0, "margin_lower": m, "seconds": seconds})
    return pd.DataFrame(rows)


def certify_table(
    seq: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, input_set: InputSet, *, method: str, data: str,
    options: dict[str, Any], batch_size: int = 50, time_limit: float = 60.0, device: str = "cpu",
    counterexamples: str | None = None, indices: list[int] | None = None, chunk_size: int = 100,
    **run_kwargs: Any,
) -> pd.DataFrame:
    """The rows of ``polytope certify`` for ``x[indices]`` (all by default), resumable in the store.

    ``input_set`` has one float ``eps``.  ``data`` names the data set (``"mnist:test"``) and
    ``options`` the settings of the input set and dtype (``norm``, ``clip``, ``dtype``); with
    ``method`` and ``time_limit`` they form the run key, so every caller with the same settings
    shares stored results.
    """
    spec = RunSpec(
        command="certify", model_hash=model_hash(seq), data=data, eps=float(input_set.eps),
        options={**options, "method": method, "time_limit": time_limit if method in SOLVER_METHODS else None,
                 **({"revision": REVISIONS[method]} if method in REVISIONS else {})},
        n_examples=len(x) if indices is None else None, indices=indices,
        chunk_size=max(chunk_size, batch_size),
    )
    payload = {"model": seq.cpu(), "x": x.cpu(), "y": y.cpu(), "input_set": input_set, "device": device,
               "method": method, "batch_size": batch_size, "time_limit": time_limit,
               "counterexamples": counterexamples}
    return run(spec, certify_chunk, payload=payload, **run_kwargs)


def run_certify(args: argparse.Namespace) -> int:
    """Run ``polytope certify``; prints the clean and robust error."""
    seq, _, x, y = common.load_model_and_data(args)
    input_set = common.input_set_arg(args)
    df = certify_table(
        seq, x, y, input_set, method=args.method, data=common.data_key(args),
        options={"norm": args.norm, "clip": args.clip, "dtype": "float64" if args.float64 else "float32"},
        batch_size=args.batch_size, time_limit=args.time_limit, device=compute_device(args, args.device),
        counterexamples=args.counterexamples, chunk_size=args.chunk_size, **run_kwargs_from_args(args),
    )
    if args.out is not None:
        write_csv(df, args.out)
    n = len(df)
    clean = 100.0 * (~df["correct"]).sum() / max(n, 1)
    robust = 100.0 * (~(df["certified"] & df["correct"])).sum() / max(n, 1)
    print(f"examples: {n}  clean error: {clean:.2f}%  robust error bound: {robust:.2f}%  "
          f"not certified: {int((~(df['certified'] & df['correct'])).sum())}", file=sys.stdout)
    if "verdict" in df:
        counts = ", ".join(f"{k}: {v}" for k, v in df["verdict"].value_counts().items())
        rungs = ", ".join(f"{k or 'none'}: {v}" for k, v in df["rung"].value_counts().items())
        print(f"verdicts: {counts}; deciding rungs: {rungs}", file=sys.stdout)
    return 0
