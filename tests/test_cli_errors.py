"""The command line as a new user meets it (issue 16's table): every bad input is one line on stderr,
exit status 2, before any computation starts.

Each case runs the real entry point (``python -m polytope``) of this checkout in a subprocess.
"Before any computation" is checked by what is left behind: the results store (created as the
first step of a batch run) and the ``--out`` file must not exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from polytope.io import data

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Generous: a subprocess imports torch (seconds on a loaded machine); a computation would leave a store.
FAST_S = 60.0


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m polytope ARGS`` of this checkout, in ``cwd``, with stderr not a terminal."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "polytope", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_fails_fast(tmp_path: Path, *args: str | Path, names: str) -> str:
    """Run a batch command with a store and an output file in ``tmp_path``; return its one stderr line."""
    store, out = tmp_path / "store", tmp_path / "out.csv"
    t0 = time.monotonic()
    proc = run_cli(*args, "--store", store, *(() if "--out" in args else ("--out", out)), cwd=tmp_path)
    seconds = time.monotonic() - t0
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "error:" in lines[0]
    assert names.lower() in lines[0].lower(), lines[0]
    assert not store.exists() and not out.exists(), "the computation started"
    assert seconds < FAST_S
    assert proc.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models on 1x28x28 inputs and a matching ``.npz`` data set."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))
    paths = {name: root / f"{name}.pt" for name in ("mlp", "wrong_shape", "bn_train", "sigmoid", "random")}
    torch.save(mlp, paths["mlp"])
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(100, 8), nn.ReLU(), nn.Linear(8, 10)), paths["wrong_shape"])
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10)).train(),
               paths["bn_train"])
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Sigmoid(), nn.Linear(8, 10)),
               paths["sigmoid"])
    paths["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    rng = np.random.default_rng(0)
    paths["data"] = root / "data.npz"
    np.savez(paths["data"], x=rng.random((6, 1, 28, 28), dtype=np.float32), y=np.arange(6) % 10)
    return paths


def certify(files: dict[str, Path], *extra: str | Path, model: str = "mlp",
            data_file: Path | None = None) -> tuple[str | Path, ...]:
    """``certify`` of a tiny model on the tiny data set, at eps 0.01."""
    return ("certify", "--model", files[model], "--data", data_file or files["data"], "--eps", "0.01", *extra)


@pytest.mark.parametrize("size", ["0", "-1"])
def test_batch_size_must_be_positive(files, tmp_path, size):
    assert_fails_fast(tmp_path, *certify(files, "--batch-size", size), names="--batch-size")


def test_out_in_a_missing_directory(files, tmp_path):
    assert_fails_fast(tmp_path, *certify(files, "--out", tmp_path / "absent" / "x.csv"), names="does not exist")


def test_out_is_a_directory(files, tmp_path):
    (tmp_path / "dir").mkdir()
    assert_fails_fast(tmp_path, *certify(files, "--out", tmp_path / "dir"), names="is a directory")


def _unwritable_directory(tmp_path: Path) -> Path:
    """A directory this user cannot write to: a read-only one, or (as root) a read-only file system."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    for candidate in (locked, Path("/proc"), Path("/sys")):
        try:
            (candidate / "probe").touch()
        except OSError:
            return candidate
        (candidate / "probe").unlink()
    pytest.skip("no unwritable directory for this user")


def test_out_in_an_unwritable_directory(files, tmp_path):
    directory = _unwritable_directory(tmp_path)
    assert_fails_fast(tmp_path, *certify(files, "--out", directory / "x.csv"), names="is not writable")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(files, tmp_path):
    assert_fails_fast(tmp_path, *certify(files, "--device", "cuda"), names="CUDA is not available")


def test_nonsense_device(files, tmp_path):
    assert_fails_fast(tmp_path, *certify(files, "--device", "gpu7"), names="not a torch device")


def test_tightness_n_zero(files, tmp_path):
    assert_fails_fast(tmp_path, "tightness", "--model", files["mlp"], "--data", files["data"], "--eps", "0.01",
                      "--n", "0", names="--n")


@pytest.mark.parametrize("command", ["certify", "tightness"])
def test_negative_time_limit(files, tmp_path, command):
    args = certify(files, "--time-limit", "-1", "--method", "lp") if command == "certify" else (
        "tightness", "--model", files["mlp"], "--data", files["data"], "--eps", "0.01", "--time-limit", "-1")
    assert_fails_fast(tmp_path, *args, names="--time-limit")


@pytest.mark.parametrize("eps", ["inf", "nan", "-0.1", "-inf"])
def test_eps_must_be_finite_and_non_negative(files, tmp_path, eps):
    args = certify(files)
    assert_fails_fast(tmp_path, *args[:-1], eps, names="--eps")


def test_model_input_shape_does_not_match_the_data(files, tmp_path):
    line = assert_fails_fast(tmp_path, *certify(files, model="wrong_shape"), names="do not fit the model")
    assert "(1, 28, 28)" in line and "re-run" not in line.lower()


def test_batch_norm_saved_in_training_mode_is_refused_without_eval(files, tmp_path):
    line = assert_fails_fast(tmp_path, *certify(files, model="bn_train"), names="training mode")
    assert "BatchNorm1d" in line and "--eval" in line
    ok = run_cli(*certify(files, "--eval", "--no-progress", "--store", tmp_path / "s", model="bn_train"),
                 cwd=tmp_path)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr


def test_random_bytes_are_not_a_torch_file(files, tmp_path):
    line = assert_fails_fast(tmp_path, *certify(files, model="random"), names="not a torch file")
    assert "trust" not in line and "allow-list" not in line


def test_unsupported_layer_is_named_with_its_index(files, tmp_path):
    line = assert_fails_fast(tmp_path, *certify(files, model="sigmoid"), names="unsupported layer Sigmoid at index 3")
    assert "trust" not in line and "allow-list" not in line


def test_bad_data_file_is_named(files, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 1, 28, 28), dtype=np.float32))
    assert_fails_fast(tmp_path, *certify(files, data_file=bad), names="missing key(s) 'y'")


def test_mnist_with_a_model_of_the_wrong_shape(files, tmp_path):
    if not data.dataset_info("mnist").present:
        pytest.skip(f"MNIST not found (set ${data.ENV_DATA_DIR})")
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), tmp_path / "digits.pt")
    assert_fails_fast(tmp_path, "certify", "--model", tmp_path / "digits.pt", "--data", "mnist", "--limit", "5",
                      "--eps", "0.1", names="do not fit the model")


def test_progress_off_the_terminal_and_with_no_progress(files, tmp_path):
    base = certify(files, "--store", tmp_path / "store")
    quiet = run_cli(*base, "--no-progress", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == "" and "clean error" in quiet.stdout
    plain = run_cli(*base, "--fresh", cwd=tmp_path)
    assert plain.returncode == 0 and "\r" not in plain.stderr and "ex/s" not in plain.stderr
    assert len(plain.stderr.splitlines()) == 2  # the store line and the summary, each once


@pytest.mark.parametrize("command", ["certify", "radius", "tightness", "train", "reproduce"])
def test_help_has_no_restructured_text_markup(tmp_path, command):
    proc = run_cli(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for markup in ("``", ":func:", ":mod:", ":class:", ":meth:"):
        assert markup not in proc.stdout, markup
