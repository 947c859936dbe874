"""``polytope verify --instances``: a VNN-COMP instances.csv through the resumable store, and vnncomp/ scripts."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from torch import nn

from polytope.model.errors import InvalidInputError
from polytope.runs.instances import read_instances, verify_instances

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _benchmark(tmp_path: Path) -> Path:
    """A 2-4-2 ReLU network and three properties: unsat, sat (the network's output can reach it) and a gzipped unsat.

    The network computes y = W2 relu(W1 x + b1) + b2; its range over [0, 1]^2 is sampled to choose thresholds that
    are clearly unreachable (unsat) or reached (sat).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    (tmp_path / "onnx").mkdir()
    (tmp_path / "vnnlib").mkdir()
    torch.onnx.export(model, torch.zeros(1, 2), tmp_path / "onnx" / "net.onnx", dynamo=False)
    grid = torch.rand(20000, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = model(grid)[:, 0]
    top, reached = float(y0.max()), float(y0.quantile(0.9))

    def prop(threshold: float) -> str:
        return ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n"
                "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
                "(assert (>= X_0 0.0))\n(assert (<= X_0 1.0))\n(assert (>= X_1 0.0))\n(assert (<= X_1 1.0))\n"
                f"(assert (>= Y_0 {threshold!r}))\n")

    (tmp_path / "vnnlib" / "unsat.vnnlib").write_text(prop(top + 1.0))
    (tmp_path / "vnnlib" / "sat.vnnlib").write_text(prop(reached))
    (tmp_path / "vnnlib" / "packed.vnnlib.gz").write_bytes(gzip.compress(prop(top + 2.0).encode()))
    csv = tmp_path / "instances.csv"
    csv.write_text("onnx/net.onnx,vnnlib/unsat.vnnlib,30\nonnx/net.onnx,vnnlib/sat.vnnlib,30\n"
                   "onnx/net.onnx,vnnlib/packed.vnnlib,30\n")
    return csv


def _replays(onnx_path: Path, result_file: Path, threshold_file: Path) -> bool:
    """The saved assignment's X, run through onnxruntime, lies in the box and satisfies Y_0 >= threshold."""
    values = dict(line.strip(" ()\n").split() for line in result_file.read_text().splitlines()[1:] if line.strip(" ()"))
    x = np.array([float(values["X_0"]), float(values["X_1"])], dtype=np.float32).reshape(1, 2)
    session = ort.InferenceSession(str(onnx_path))
    y = session.run(None, {session.get_inputs()[0].name: x})[0]
    threshold = float(threshold_file.read_text().split("(>= Y_0 ")[1].split(")")[0])
    return bool((x >= 0).all() and (x <= 1).all() and y[0, 0] >= threshold)


def test_instances_through_the_cli_give_each_answer_and_replayable_counterexamples(tmp_path: Path) -> None:
    csv = _benchmark(tmp_path)
    out, cex = tmp_path / "results.csv", tmp_path / "cex"
    proc = subprocess.run([sys.executable, "-m", "polytope", "verify", "--instances", str(csv), "--out", str(out),
                           "--store", str(tmp_path / "store"), "--counterexamples", str(cex), "--no-progress"],
                          capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    df = pd.read_csv(out).sort_values("index")
    assert df["answer"].tolist() == ["unsat", "sat", "unsat"]
    assert "instances: 3" in proc.stdout
    saved = Path(df.loc[df["answer"] == "sat", "counterexample"].item())
    assert saved.read_text().startswith("sat\n")
    assert _replays(tmp_path / "onnx" / "net.onnx", saved, tmp_path / "vnnlib" / "sat.vnnlib")


def test_a_second_run_resumes_from_the_store(tmp_path: Path) -> None:
    csv = _benchmark(tmp_path)
    first = verify_instances(csv, store_dir=tmp_path / "store", progress=False)
    again = verify_instances(csv, store_dir=tmp_path / "store", progress=False)
    assert again.attrs["polytope_run"]["computed"] == 0
    assert again.sort_values("index")["answer"].tolist() == first.sort_values("index")["answer"].tolist()


@pytest.mark.parametrize(("line", "names"), [("onnx/net.onnx,vnnlib/unsat.vnnlib", "expected"),
                                             ("onnx/net.onnx,vnnlib/unsat.vnnlib,-3", "timeout"),
                                             ("onnx/missing.onnx,vnnlib/unsat.vnnlib,30", "does not exist")])
def test_malformed_instance_lines_are_named_before_any_run(tmp_path: Path, line: str, names: str) -> None:
    csv = _benchmark(tmp_path)
    csv.write_text(csv.read_text() + line + "\n")
    with pytest.raises(InvalidInputError, match=names) as info:
        read_instances(csv)
    assert ":4:" in str(info.value)


def test_vnncomp_run_instance_writes_the_results_file(tmp_path: Path) -> None:
    csv = _benchmark(tmp_path)
    results = tmp_path / "out.txt"
    script = ROOT / "vnncomp" / "run_instance.sh"
    proc = subprocess.run(["bash", str(script), "v1", "test", str(tmp_path / "onnx" / "net.onnx"),
                           str(tmp_path / "vnnlib" / "unsat.vnnlib"), str(results), "30"],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert results.read_text() == "unsat\n"
    bad = subprocess.run(["bash", str(script), "v2", "test"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "usage" in bad.stderr
    assert csv.exists()


def test_onnx_and_vnnlib_are_read_gzipped(tmp_path: Path) -> None:
    """A VNN-COMP repository's .onnx.gz / .vnnlib.gz files, named with or without .gz."""
    from polytope.io.onnx_import import read_onnx
    from polytope.io.vnnlib import read_vnnlib

    csv = _benchmark(tmp_path)
    net = tmp_path / "onnx" / "net.onnx"
    packed = tmp_path / "onnx" / "packed.onnx.gz"
    packed.write_bytes(gzip.compress(net.read_bytes()))
    x = torch.rand(3, 2, dtype=torch.float64)
    plain, zipped = read_onnx(net, dtype=torch.float64), read_onnx(tmp_path / "onnx" / "packed.onnx")
    torch.testing.assert_close(plain.network.forward(x), zipped.network.forward(x.float()).double(), rtol=1e-6,
                               atol=1e-6)
    assert read_vnnlib(tmp_path / "vnnlib" / "packed.vnnlib").n_inputs == 2
    assert csv.exists()
