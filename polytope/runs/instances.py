"""A VNN-COMP ``instances.csv`` (``onnx,vnnlib,timeout`` per line) through the resumable store.

Each instance is one "example" of a batch run (:mod:`polytope.runs.runner`): finished instances are
committed as they complete, an interrupted run resumes without redoing them, and ``--workers N`` runs
instances in parallel.  One row per instance: ``answer`` (``sat``, ``unsat``, ``unknown``, ``timeout``
or ``error``), the deciding ``method``, ``seconds``, the path of the saved ``counterexample`` (the
VNN-COMP results file, for ``sat``) and an error ``message``.  Paths in the CSV are relative to
``root`` (default: the CSV's folder); ``NAME.gz`` is read where ``NAME`` is missing.
"""

from __future__ import annotations

import csv
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from polytope.io.onnx_import import read_onnx
from polytope.io.vnnlib import Property, read_vnnlib, results_text
from polytope.model.errors import InvalidInputError, PolytopeError
from polytope.model.files import resolve
from polytope.runs.runner import RunSpec, run
from polytope.verifiers.property import VerifyResult, check_property, verify


@dataclass(frozen=True)
class Instance:
    """One line of ``instances.csv``: the network, the property and the time limit in seconds."""

    onnx: Path
    vnnlib: Path
    timeout: float


def read_instances(path: str | Path, root: str | Path | None = None) -> list[Instance]:
    """The instances of a VNN-COMP CSV; :class:`InvalidInputError` names a malformed line before any run."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read instances file {str(path)!r}: {exc}") from exc
    out = []
    for number, row in enumerate(csv.reader(lines), start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 3:
            raise InvalidInputError(f"{path}:{number}: expected 'onnx,vnnlib,timeout', got {','.join(row)!r}")
        try:
            timeout = float(row[2])
        except ValueError:
            timeout = math.nan
        if not math.isfinite(timeout) or timeout <= 0:
            raise InvalidInputError(f"{path}:{number}: the timeout must be a positive number, got {row[2]!r}")
        onnx, vnnlib = (resolve(base / cell.strip()) for cell in row[:2])
        for kind, file in (("network", onnx), ("property", vnnlib)):
            if not file.is_file():
                raise InvalidInputError(f"{path}:{number}: the {kind} file {str(file)!r} does not exist")
        out.append(Instance(onnx, vnnlib, timeout))
    if not out:
        raise InvalidInputError(f"{path} lists no instance")
    return out


def _fingerprint(instances: list[Instance]) -> str:
    """A digest of every listed file's path, size and modification time (a changed file is a new run key)."""
    h = hashlib.sha256(b"polytope-instances-v1\0")
    for inst in instances:
        for file in (inst.onnx, inst.vnnlib):
            stat = file.stat()
            h.update(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        h.update(f"{inst.timeout!r}\0".encode())
    return h.hexdigest()


def verify_files(onnx: str | Path, vnnlib: str | Path, timeout: float | None, start: float,
                 log: Callable[[str], None] | None = None) -> tuple[Property, VerifyResult]:
    """Read an ONNX network (in float64) and a VNN-LIB property, check they fit, and :func:`verify` them with the
    ``timeout`` seconds left since ``start`` (``time.perf_counter()``; ``None``: no limit)."""
    import torch

    onx = read_onnx(onnx, dtype=torch.float64)
    prop = read_vnnlib(vnnlib)
    check_property(onx.network, prop, onx.in_shape)
    left = None if timeout is None else max(timeout - (time.perf_counter() - start), 0.0)
    return prop, verify(onx.network, prop, timeout=left, onnx_path=onnx, in_shape=onx.in_shape, log=log)


def decide(inst: Instance) -> dict[str, Any]:
    """Verify one instance (float64, replayed in onnxruntime before any ``sat``); bad input is ``error``."""
    start = time.perf_counter()
    try:
        _, result = verify_files(inst.onnx, inst.vnnlib, inst.timeout, start)
    except PolytopeError as exc:
        return {"answer": "error", "method": "", "seconds": time.perf_counter() - start,
                "message": f"{type(exc).__name__}: {exc}", "result": results_text("error")}
    cex = result.counterexample
    return {"answer": result.status, "method": result.method, "seconds": time.perf_counter() - start,
            "message": "", "result": results_text(result.status, *((cex.x, cex.y) if cex is not None else ()))}


def instances_chunk(payload: dict[str, Any], indices: list[int]) -> pd.DataFrame:
    """Rows of :func:`verify_instances` for the instances ``indices``."""
    rows = []
    for i in indices:
        inst = payload["instances"][i]
        row = decide(inst)
        path = ""
        if row["answer"] == "sat" and payload["counterexamples"]:
            folder = Path(payload["counterexamples"])
            folder.mkdir(parents=True, exist_ok=True)
            path = str(folder / f"{i}.txt")
            Path(path).write_text(row["result"])
        rows.append({"index": i, "onnx": str(inst.onnx), "vnnlib": str(inst.vnnlib), "timeout": inst.timeout,
                     "answer": row["answer"], "method": row["method"], "seconds": row["seconds"],
                     "counterexample": path, "message": row["message"], "status": row["answer"]})
    return pd.DataFrame(rows)


def verify_instances(csv_path: str | Path, root: str | Path | None = None, counterexamples: str | None = None,
                     chunk_size: int = 1, **run_kwargs: Any) -> pd.DataFrame:
    """Every instance of ``csv_path`` through :func:`polytope.runs.runner.run`, one row each (module docstring)."""
    instances = read_instances(csv_path, root)
    spec = RunSpec(command="verify-instances", model_hash=_fingerprint(instances), data=str(Path(csv_path).resolve()),
                   options={"counterexamples": bool(counterexamples)}, n_examples=len(instances),
                   chunk_size=chunk_size)
    payload = {"instances": instances, "counterexamples": counterexamples}
    return run(spec, instances_chunk, payload=payload, **run_kwargs)
