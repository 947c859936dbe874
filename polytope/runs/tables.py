"""Tables over a data set, one row per example: certificates and verdicts (resumable in the
store of :mod:`polytope.runs.runner`) and certified radii; the commands and experiments print them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from polytope.model.network import Network
from polytope.model.sets import InputSet
from polytope.model.specs import worst_of
from polytope.runs.runner import (
    RunSpec,
    model_hash,
    run,
)
from polytope.verifiers.cascade import RUNGS, Cascade, Verdict
from polytope.verifiers.robust import certificate_margins, certified_radius

SOLVER_METHODS = ("lp", "lp-all", "bab", "milp", "cascade")
#: Methods whose algorithm changed since their first stored results: the revision joins the run
#: key, so old rows are never mixed with new ones (``optimized``: per-objective final slopes).
REVISIONS = {"optimized": 2, "cascade": 2}  # cascade 2: the bab rung before the MILP


def _save_counterexample(directory: str, verdict: Verdict) -> None:
    path = Path(directory) / f"{verdict.index}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x_adv=verdict.counterexample, label=verdict.label, rung=verdict.rung)
    os.replace(tmp, path)


def payload_network(payload: dict[str, Any], device: torch.device | str | None = None) -> Network:
    """The :class:`Network` of a run's ``model`` (on ``device``), for its inputs' shape (a graph needs it)."""
    model = payload["model"] if device is None else payload["model"].to(device)
    return Network.from_torch(model, tuple(payload["x"].shape[1:]))


def cascade_chunk(payload: dict[str, Any], indices: list[int]) -> pd.DataFrame:
    """Rows of ``certify --method lp|lp-all|bab|milp|cascade``: one verdict per example (with the ``bab`` rung's
    ``bab_domains``, ``bab_depth``, per-rung seconds and the deciding ``rung``)."""
    net = payload_network(payload)
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
    net = payload_network(payload, device)
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


def radius_rows(
    net: Network, x: torch.Tensor, y: torch.Tensor, input_set: InputSet, eps_max: float, tol: float,
    indices: list[int] | None = None, max_steps: int = 30,
) -> pd.DataFrame:
    """Rows ``index, label, prediction, correct, radius, newton_steps, seconds`` for one batch."""
    t0 = time.perf_counter()
    with torch.no_grad():
        pred = net.forward(x).argmax(1)
    radius, steps = certified_radius(net, x, input_set, y=None, eps_max=eps_max, tol=tol, max_steps=max_steps)
    seconds = (time.perf_counter() - t0) / max(len(x), 1)
    idx = list(range(len(x))) if indices is None else indices
    return pd.DataFrame({
        "index": idx, "label": y.tolist(), "prediction": pred.tolist(),
        "correct": (pred == y).tolist(), "radius": radius.detach().cpu().tolist(),
        "newton_steps": steps.cpu().tolist(), "seconds": seconds,
    })
