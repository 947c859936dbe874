"""Tests of the resumable batch runner (polytope.runs.runner) and its Parquet results store.

The compute functions live at the top level of this module so that spawned pool processes
and Dask workers can import them (``test_runner`` is importable from ``tests/``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polytope as pt
from polytope.model.errors import ShapeMismatchError
from polytope.runs.runner import (
    FailedChunk,
    RunFailedError,
    RunSpec,
    add_runner_arguments,
    compute_device,
    model_hash,
    run,
    run_kwargs_from_args,
    summarize,
    write_csv,
)
from polytope.runs.store import ResultStore, StoreWarning

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
N_TARGETS = 2


# ----------------------------------------------------------------------------------------
# A toy batch command: picklable payload and compute function with fault injection
# ----------------------------------------------------------------------------------------


@dataclass
class Payload:
    """Payload of the toy command; records each unpickling (to count shipments)."""

    scale: float = 1.0
    log: str | None = None  # every computed index is appended here (one line each)
    sleep: float = 0.0  # seconds per chunk
    unpickle_log: str | None = None
    exit_once: tuple[int, str] | None = None  # (index, marker): os._exit on the first attempt
    exit_always: int | None = None  # os._exit whenever this index is in the chunk
    fail_index: int | None = None  # raise ValueError whenever this index is in the chunk
    bad_input_index: int | None = None  # raise ShapeMismatchError (deterministic) on this index
    bad_table: bool = False  # return a table without an index column
    hang_at: int | None = None  # block forever (until killed) on the chunk holding this index
    interrupt_at: int | None = None  # raise KeyboardInterrupt (Ctrl-C) on this index

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.unpickle_log:
            with open(self.unpickle_log, "a") as fh:
                fh.write(f"{os.getpid()}\n")


def toy_chunk(payload: Payload, indices: list[int]) -> pd.DataFrame:
    """One row per (example, target); examples ``i % 7 == 6`` have no rows (skipped)."""
    if payload.log:
        with open(payload.log, "a") as fh:
            fh.write("".join(f"{i}\n" for i in indices))
    if payload.exit_once is not None:
        index, marker = payload.exit_once
        if index in indices and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(3)
    if payload.exit_always is not None and payload.exit_always in indices:
        os._exit(3)
    if payload.hang_at is not None and payload.hang_at in indices:
        while True:
            time.sleep(1)
    if payload.interrupt_at is not None and payload.interrupt_at in indices:
        raise KeyboardInterrupt
    if payload.fail_index is not None and payload.fail_index in indices:
        raise ValueError(f"cannot compute example {payload.fail_index}")
    if payload.bad_input_index is not None and payload.bad_input_index in indices:
        raise ShapeMismatchError(f"example {payload.bad_input_index} does not fit the network")
    if payload.sleep:
        time.sleep(payload.sleep)
    if payload.bad_table:
        return pd.DataFrame({"value": [1.0]})
    return _rows(indices, payload.scale)


def _rows(indices: list[int], scale: float = 1.0) -> pd.DataFrame:
    rows = [
        {
            "index": i,
            "target": t,
            "bound": scale * i - t / 4,
            "status": "infeasible" if i % 5 == 0 else "optimal",
        }
        for i in indices
        if i % 7 != 6
        for t in range(N_TARGETS)
    ]
    return pd.DataFrame(rows, columns=["index", "target", "bound", "status"])


def expected(indices, scale: float = 1.0) -> pd.DataFrame:
    """The table an uninterrupted run must produce."""
    return _rows(sorted(indices), scale).reset_index(drop=True)


def spec_for(n: int = 20, chunk_size: int = 4, eps: float = 0.1, **options) -> RunSpec:
    return RunSpec(
        command="toy", model_hash="m" * 64, data="toy:test", eps=eps,
        options={"solver": "fake", **options}, n_examples=n, chunk_size=chunk_size,
    )


def logged(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def assert_same(df: pd.DataFrame, ref: pd.DataFrame) -> None:
    if ref.empty and list(df.columns) == ["index"]:
        assert df.empty  # nothing was ever computed: the store cannot know the columns
        return
    pd.testing.assert_frame_equal(df.reset_index(drop=True), ref, check_dtype=False)


# ----------------------------------------------------------------------------------------
# Run key, spec validation, helpers
# ----------------------------------------------------------------------------------------


def test_model_hash_tracks_weights_and_architecture():
    import torch
    from torch import nn

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    b = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    b.load_state_dict(a.state_dict())
    assert model_hash(a) == model_hash(b)
    assert len(model_hash(a)) == 64
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-6
    assert model_hash(a) != model_hash(b)
    c1 = nn.Sequential(nn.Conv2d(1, 2, 3, stride=1))
    c2 = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2))
    c2.load_state_dict(c1.state_dict())
    assert model_hash(c1) != model_hash(c2)  # same weights, different stride


def test_run_key_covers_results_not_execution():
    base = spec_for()
    assert base.key_digest() == spec_for(n=500, chunk_size=50).key_digest()
    for other in (
        spec_for(eps=0.2),
        spec_for(norm="l2"),
        RunSpec(command="other", model_hash="m" * 64, data="toy:test", eps=0.1,
                options={"solver": "fake"}, n_examples=20),
        RunSpec(command="toy", model_hash="x" * 64, data="toy:test", eps=0.1,
                options={"solver": "fake"}, n_examples=20),
        RunSpec(command="toy", model_hash="m" * 64, data="toy:train", eps=0.1,
                options={"solver": "fake"}, n_examples=20),
    ):
        assert other.key_digest() != base.key_digest()
    # key order does not matter; numpy scalars are accepted
    import numpy as np

    s1 = RunSpec(command="toy", model_hash="h", data="d", options={"a": 1, "b": 2.5}, n_examples=1)
    s2 = RunSpec(command="toy", model_hash="h", data="d", options={"b": np.float64(2.5), "a": 1},
                 n_examples=1)
    assert s1.key_digest() == s2.key_digest()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"options": {"f": object()}, "n_examples": 3}, TypeError),
        ({"n_examples": None}, ValueError),
        ({"n_examples": 3, "indices": [1]}, ValueError),
        ({"indices": [1, 1]}, ValueError),
        ({"indices": [-1]}, ValueError),
        ({"n_examples": -1}, ValueError),
        ({"n_examples": 3, "chunk_size": 0}, ValueError),
        ({"n_examples": 3, "command": "../evil"}, ValueError),
    ],
)
def test_spec_rejects_bad_input(kwargs, error):
    base = {"command": "toy", "model_hash": "h", "data": "d"}
    with pytest.raises(error):
        RunSpec(**{**base, **kwargs})


def test_summarize_counts_statuses():
    text = summarize(expected(range(10)))
    assert text.startswith("18 row(s) for 9 example(s)")  # example 6 has no rows
    assert "infeasible 4" in text  # examples 0 and 5, two targets each


def test_cli_arguments_to_run_kwargs(tmp_path):
    parser = add_runner_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--store", str(tmp_path), "--fresh", "--workers", "3", "--chunk-size", "7"])
    assert run_kwargs_from_args(args) == {
        "store_dir": tmp_path, "fresh": True, "workers": 3, "dask_scheduler": None, "retries": 2,
        "progress": True,
    }
    assert run_kwargs_from_args(parser.parse_args(["--no-progress"]))["progress"] is False
    assert args.chunk_size == 7 and args.out is None
    assert compute_device(args, "cuda") == "cpu"
    defaults = parser.parse_args([])
    assert defaults.store == Path("runs") and defaults.workers == 1 and not defaults.fresh
    assert compute_device(defaults, "cpu") == "cpu"
    if torch.cuda.is_available():
        assert compute_device(defaults, "cuda") == "cuda"
    else:  # a device of this machine must exist here (a Dask worker's is the workers' to check)
        with pytest.raises(pt.DeviceError, match="CUDA is not available"):
            compute_device(defaults, "cuda")
    remote = parser.parse_args(["--dask-scheduler", "tcp://h:8786", "--worker-device", "cuda:0"])
    assert run_kwargs_from_args(remote)["dask_scheduler"] == "tcp://h:8786"
    assert compute_device(remote, "cpu") == "cuda:0"
    with pytest.raises(ValueError, match="exclusive"):
        run_kwargs_from_args(parser.parse_args(["--workers", "2", "--dask-scheduler", "tcp://h:1"]))
    for bad in (["--workers", "0"], ["--chunk-size", "x"], ["--retries", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_write_csv_is_atomic_and_complete(tmp_path):
    out = write_csv(expected(range(5)), tmp_path / "sub" / "out.csv")
    assert_same(pd.read_csv(out), expected(range(5)))
    assert [p.name for p in out.parent.iterdir()] == ["out.csv"]


# ----------------------------------------------------------------------------------------
# In-process runs: resume, fresh, keys, corrupt parts, failures
# ----------------------------------------------------------------------------------------


def test_in_process_run_resumes_and_computes_only_missing(tmp_path):
    log = tmp_path / "log"
    payload = Payload(log=str(log))
    df = run(spec_for(n=10), toy_chunk, payload=payload, store_dir=tmp_path / "store", progress=False)
    assert_same(df, expected(range(10)))
    assert sorted(logged(log)) == list(range(10))
    assert df.attrs["polytope_run"]["computed"] == 10

    # same run again: nothing computed
    again = run(spec_for(n=10), toy_chunk, payload=payload, store_dir=tmp_path / "store", progress=False)
    assert_same(again, expected(range(10)))
    assert len(logged(log)) == 10

    # more examples, another chunk size: only the new ones are computed
    more = run(spec_for(n=25, chunk_size=6), toy_chunk, payload=payload, store_dir=tmp_path / "store",
               progress=False)
    assert_same(more, expected(range(25)))
    assert sorted(logged(log)) == list(range(25))

    # a subset is assembled from the store, in index order
    sub = RunSpec(command="toy", model_hash="m" * 64, data="toy:test", eps=0.1,
                  options={"solver": "fake"}, indices=[9, 3, 20], chunk_size=2)
    assert_same(run(sub, toy_chunk, payload=payload, store_dir=tmp_path / "store", progress=False),
                expected([3, 9, 20]))
    assert len(logged(log)) == 25

    # --fresh recomputes everything of this key
    run(spec_for(n=10), toy_chunk, payload=payload, store_dir=tmp_path / "store", fresh=True, progress=False)
    assert len(logged(log)) == 35


def test_in_process_run_skips_what_another_process_committed(tmp_path):
    """Two processes on one store: chunks the other one committed meanwhile are not recomputed."""
    log = tmp_path / "log"
    payload = Payload(log=str(log))
    store = tmp_path / "store"
    other = RunSpec(command="toy", model_hash="m" * 64, data="toy:test", eps=0.1,
                    options={"solver": "fake"}, indices=list(range(5, 10)), chunk_size=5)

    def first_chunk_meanwhile(payload: Payload, indices: list[int]) -> pd.DataFrame:
        if indices[0] == 0:  # while this chunk runs, "another process" finishes examples 5..9
            run(other, toy_chunk, payload=payload, store_dir=store, progress=False)
        return toy_chunk(payload, indices)

    df = run(spec_for(n=10), first_chunk_meanwhile, payload=payload, store_dir=store, progress=False)
    assert_same(df, expected(range(10)))
    assert sorted(logged(log)) == list(range(10))  # 4 (of chunk 4..7) once, 5..9 by the other run only
    assert df.attrs["polytope_run"]["computed"] == 5


def test_progress_bar_and_summary_go_to_stderr(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run(spec_for(n=10), toy_chunk, payload=Payload(), store_dir=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "10/10" in err and ("ex/s" in err or "s/ex" in err)
    assert err.count("\n") == err.rstrip().count("\n") + 1  # ends with one newline
    final = [part for part in err.replace("\r", "\n").splitlines() if "10/10" in part]
    assert len(final) == 1, final  # the final state of the bar is printed once
    assert "status: optimal" in err and "infeasible" in err


def test_no_progress_bar_without_a_terminal(tmp_path, capsys):
    run(spec_for(n=10), toy_chunk, payload=Payload(), store_dir=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "ex/s" not in err and "s/ex" not in err and "\r" not in err
    assert "status: optimal" in err  # the summary line stays
    run(spec_for(n=10), toy_chunk, payload=Payload(), store_dir=tmp_path, progress=False)
    assert capsys.readouterr().err == ""


def test_other_options_never_mix(tmp_path):
    log = tmp_path / "log"
    run(spec_for(n=8), toy_chunk, payload=Payload(log=str(log)), store_dir=tmp_path, progress=False)
    df = run(spec_for(n=8, eps=0.3), toy_chunk, payload=Payload(log=str(log), scale=2.0),
             store_dir=tmp_path, progress=False)
    assert_same(df, expected(range(8), scale=2.0))
    assert len(logged(log)) == 16  # recomputed, not reused
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(dirs) == 2 and all(d.startswith("toy-") for d in dirs)


def test_foreign_and_corrupt_parts_are_reported_and_recomputed(tmp_path):
    log = tmp_path / "log"
    root = tmp_path / "store"
    run(spec_for(n=12), toy_chunk, payload=Payload(log=str(log)), store_dir=root, progress=False)
    other = spec_for(n=12, eps=0.5)
    run(other, toy_chunk, payload=Payload(scale=9.0), store_dir=root, progress=False)
    store = ResultStore(root, spec_for().key(), name="toy")
    foreign_store = ResultStore(root, other.key(), name="toy")
    parts = sorted(store.path.glob("part-*.parquet"))
    assert len(parts) == 3

    # truncate one part (a non-atomic writer or a disk fault), replace another by a foreign
    # part carrying the same file name, and leave a fresh temp file from a killed write
    data = parts[0].read_bytes()
    parts[0].write_bytes(data[: len(data) // 2])
    foreign = sorted(foreign_store.path.glob("part-*.parquet"))[1]
    parts[1].write_bytes(foreign.read_bytes())
    (store.path / ".tmp-deadbeef.parquet").write_bytes(data[:100])
    log.unlink()

    with pytest.warns(StoreWarning) as record:
        df = run(spec_for(n=12), toy_chunk, payload=Payload(log=str(log)), store_dir=root, progress=False)
    assert_same(df, expected(range(12)))
    assert sorted(logged(log)) == list(range(8))  # exactly the two bad chunks
    messages = " ".join(str(w.message) for w in record)
    assert "different run key" in messages and parts[0].name in messages
    assert {p.name for p in (store.path / "corrupt").iterdir()} == {parts[0].name, parts[1].name}


def test_stale_temp_files_are_removed(tmp_path):
    store = ResultStore(tmp_path, spec_for().key(), name="toy")
    store.open()
    stale = store.path / ".tmp-old.parquet"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    store.open()
    assert not stale.exists()


def test_interrupted_write_leaves_no_part(tmp_path, monkeypatch):
    store = ResultStore(tmp_path, spec_for().key(), name="toy")
    store.open()

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr("polytope.runs.store.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write_part(expected([0, 1]), [0, 1])
    monkeypatch.undo()
    assert [p.name for p in store.path.iterdir()] == ["key.json"]
    assert store.scan().done == set()


@pytest.mark.parametrize("workers", [1, 2])
def test_deterministic_errors_are_never_retried(tmp_path, workers):
    log = tmp_path / "log"
    with pytest.raises(RunFailedError) as info:
        run(spec_for(n=8), toy_chunk, payload=Payload(log=str(log), bad_input_index=5), store_dir=tmp_path,
            workers=workers, retries=2, progress=False)
    assert logged(log).count(5) == 1  # one attempt, not 1 + retries
    (failed,) = info.value.failed
    assert failed.deterministic and failed.attempts == 1 and "ShapeMismatchError" in failed.error
    assert "re-running will not help" in str(info.value) and "Re-run" not in str(info.value)


def test_failed_chunk_is_reported_and_rerun_retries_only_it(tmp_path):
    log = tmp_path / "log"
    with pytest.raises(RunFailedError) as info:
        run(spec_for(n=12), toy_chunk, payload=Payload(log=str(log), fail_index=5), store_dir=tmp_path,
            retries=1, progress=False)
    err = info.value
    assert err.failed == [FailedChunk((4, 5, 6, 7), "ValueError: cannot compute example 5", 2)]
    assert "examples 4-7 (2 attempts): ValueError: cannot compute example 5" in str(err)
    assert_same(err.df, expected([0, 1, 2, 3, 8, 9, 10, 11]))
    assert sorted(logged(log)) == sorted([*range(12), 4, 5, 6, 7])  # retried once

    log.unlink()
    df = run(spec_for(n=12), toy_chunk, payload=Payload(log=str(log)), store_dir=tmp_path, progress=False)
    assert_same(df, expected(range(12)))
    assert sorted(logged(log)) == [4, 5, 6, 7]


def test_ctrl_c_keeps_committed_chunks(tmp_path, capsys):
    log = tmp_path / "log"
    with pytest.raises(KeyboardInterrupt):
        run(spec_for(n=20), toy_chunk, payload=Payload(log=str(log), interrupt_at=9), store_dir=tmp_path)
    assert "interrupted: 2 chunk(s) committed" in capsys.readouterr().err
    log.unlink()
    df = run(spec_for(n=20), toy_chunk, payload=Payload(log=str(log)), store_dir=tmp_path, progress=False)
    assert_same(df, expected(range(20)))
    assert sorted(logged(log)) == list(range(8, 20))


@settings(max_examples=10, deadline=None)
@given(
    first=st.lists(st.integers(0, 40), unique=True, max_size=25),
    n=st.integers(0, 40),
    sizes=st.tuples(st.integers(2, 9), st.integers(2, 9)),
)
def test_resume_computes_each_example_once(first, n, sizes):
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "log"
        spec1 = RunSpec(command="toy", model_hash="h", data="d", indices=first, chunk_size=sizes[0])
        assert_same(run(spec1, toy_chunk, payload=Payload(log=str(log)), store_dir=d, progress=False),
                    expected(first))
        spec2 = RunSpec(command="toy", model_hash="h", data="d", n_examples=n, chunk_size=sizes[1])
        assert_same(run(spec2, toy_chunk, payload=Payload(log=str(log)), store_dir=d, progress=False),
                    expected(range(n)))
        computed = logged(log)
        assert len(computed) == len(set(computed)) == len(set(first) | set(range(n)))


def test_bad_result_table_is_a_failed_chunk(tmp_path):
    with pytest.raises(RunFailedError, match=r"bad result table.*'index'"):
        run(spec_for(n=4), toy_chunk, payload=Payload(bad_table=True), store_dir=tmp_path, progress=False)


def test_run_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        run(spec_for(), toy_chunk, store_dir=tmp_path, workers=0)
    with pytest.raises(ValueError):
        run(spec_for(), toy_chunk, store_dir=tmp_path, workers=2, dask_scheduler="tcp://h:1")
    with pytest.raises(ValueError):
        run(spec_for(), toy_chunk, store_dir=tmp_path, retries=-1)


# ----------------------------------------------------------------------------------------
# SIGKILL mid-run, then resume
# ----------------------------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    from test_runner import Payload, spec_for, toy_chunk
    from polytope.runs.runner import run
    run(spec_for(n=40, chunk_size=4), toy_chunk, payload=Payload(log={log!r}, sleep=0.05, hang_at=13),
        store_dir={store!r}, progress=False)
    """
)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    """kill -9 while a chunk is in flight (it hangs on example 13 until killed), then re-run."""
    store_root, log1, log2 = tmp_path / "store", tmp_path / "log1", tmp_path / "log2"
    script = KILL_SCRIPT.format(tests=str(TESTS_DIR), repo=str(REPO_ROOT), log=str(log1),
                                store=str(store_root))
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    try:
        while 13 not in logged(log1):  # chunks 0-2 are committed, chunk 3 is in flight
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    store = ResultStore(store_root, spec_for().key(), name="toy")
    done_before = store.scan().done
    assert done_before == set(range(12))  # the chunk in flight (12-15) is the only loss
    assert sorted(logged(log1)) == list(range(16))

    df = run(spec_for(n=40, chunk_size=4), toy_chunk, payload=Payload(log=str(log2)), store_dir=store_root,
             progress=False)
    assert_same(df, expected(range(40)))
    after = logged(log2)
    assert len(after) == len(set(after)), "an example was computed twice after the restart"
    assert set(after) == set(range(12, 40))


# ----------------------------------------------------------------------------------------
# Local process pool
# ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_process_pool_matches_in_process_and_ships_payload_once(tmp_path):
    log, unpickled = tmp_path / "log", tmp_path / "unpickled"
    payload = Payload(log=str(log), unpickle_log=str(unpickled))
    df = run(spec_for(n=30, chunk_size=3), toy_chunk, payload=payload, store_dir=tmp_path, workers=2,
             progress=False)
    assert_same(df, expected(range(30)))
    assert sorted(logged(log)) == list(range(30))
    shipments = unpickled.read_text().split()
    assert len(shipments) == len(set(shipments)) <= 2  # once per worker process, not per chunk


@pytest.mark.slow
def test_process_pool_worker_death_is_retried(tmp_path):
    log = tmp_path / "log"
    payload = Payload(log=str(log), exit_once=(9, str(tmp_path / "marker")))
    df = run(spec_for(n=16), toy_chunk, payload=payload, store_dir=tmp_path / "s", workers=2, progress=False)
    assert_same(df, expected(range(16)))
    assert (tmp_path / "marker").exists()
    assert logged(log).count(9) == 2


@pytest.mark.slow
def test_process_pool_chunk_that_always_kills_its_worker_fails_alone(tmp_path):
    payload = Payload(exit_always=6)
    with pytest.raises(RunFailedError) as info:
        run(spec_for(n=12), toy_chunk, payload=payload, store_dir=tmp_path, workers=2, retries=1,
            progress=False)
    [failed] = info.value.failed
    assert failed.indices == (4, 5, 6, 7) and failed.attempts == 2
    assert "BrokenProcessPool" in failed.error
    assert_same(info.value.df, expected([0, 1, 2, 3, 8, 9, 10, 11]))


# ----------------------------------------------------------------------------------------
# Dask distributed
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        silence_logs=logging.CRITICAL,
    )
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.mark.slow
def test_dask_cluster_matches_in_process(dask_cluster, tmp_path):
    log, unpickled = tmp_path / "log", tmp_path / "unpickled"
    reference = run(spec_for(n=24, chunk_size=3), toy_chunk, payload=Payload(), store_dir=tmp_path / "ref",
                    progress=False)
    payload = Payload(log=str(log), unpickle_log=str(unpickled))
    df = run(spec_for(n=24, chunk_size=3), toy_chunk, payload=payload, store_dir=tmp_path / "dask",
             dask_scheduler=dask_cluster.scheduler_address, progress=False)
    pd.testing.assert_frame_equal(df, reference)
    assert sorted(logged(log)) == list(range(24))
    # scattered once: deserialized on each worker, not once per chunk (8 chunks here)
    assert len(unpickled.read_text().split()) <= 4


@pytest.mark.slow
def test_dask_worker_killed_mid_chunk_is_retried(dask_cluster, tmp_path):
    log = tmp_path / "log"
    payload = Payload(log=str(log), exit_once=(5, str(tmp_path / "marker")))
    df = run(spec_for(n=12), toy_chunk, payload=payload, store_dir=tmp_path,
             dask_scheduler=dask_cluster.scheduler_address, progress=False)
    assert_same(df, expected(range(12)))
    assert (tmp_path / "marker").exists()
    assert logged(log).count(5) == 2  # killed once, computed again elsewhere


@pytest.mark.slow
def test_dask_failing_chunk_is_reported_after_retries(dask_cluster, tmp_path):
    log = tmp_path / "log"
    with pytest.raises(RunFailedError) as info:
        run(spec_for(n=8), toy_chunk, payload=Payload(log=str(log), fail_index=2), store_dir=tmp_path,
            dask_scheduler=dask_cluster.scheduler_address, retries=1, progress=False)
    [failed] = info.value.failed
    assert failed.indices == (0, 1, 2, 3) and "cannot compute example 2" in failed.error
    assert logged(log).count(2) == 2
    assert_same(info.value.df, expected([4, 5, 6, 7]))


class _FakeFuture:
    def __init__(self, status: str, value=None):
        self.status, self.value = status, value

    def result(self):
        return self.value

    def exception(self):
        return None

    def release(self):
        pass


class _FakeAsCompleted:
    def __init__(self, futures):
        self.queue = list(futures)

    def add(self, fut):
        self.queue.append(fut)

    def __iter__(self):
        while self.queue:
            yield self.queue.pop(0)


class _LossyClient:
    """A stand-in Dask client that runs tasks inline; its first ``lose`` submissions find the
    payload lost with its workers (Dask then cancels the tasks waiting on it)."""

    def __init__(self, lose: int):
        self.lose, self.scatters, self.submits = lose, 0, 0

    def scatter(self, data, broadcast, hash):
        assert broadcast
        self.scatters += 1
        return [_FakeFuture("finished", data[0])]

    def submit(self, fn, ref, indices, key, retries, pure):
        self.submits += 1
        if self.lose > 0:
            self.lose -= 1
            ref.status = "cancelled"
            return _FakeFuture("cancelled")
        return _FakeFuture("finished", fn(ref.value, indices))

    def cancel(self, futures):
        pass


def test_dask_payload_lost_with_all_workers_is_scattered_again(tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    monkeypatch.setattr(distributed, "as_completed", _FakeAsCompleted)
    client = _LossyClient(lose=3)
    df = run(spec_for(n=20), toy_chunk, payload=Payload(), store_dir=tmp_path / "a", dask_scheduler=client,
             progress=False)
    assert_same(df, expected(range(20)))
    assert client.scatters == 2 and client.submits == 5 + 3

    monkeypatch.setattr("polytope.runs.runner.MAX_PAYLOAD_RESCATTERS", 2)
    client = _LossyClient(lose=10**6)
    with pytest.raises(RunFailedError, match="lost the payload 3 times"):
        run(spec_for(n=20), toy_chunk, payload=Payload(), store_dir=tmp_path / "b", dask_scheduler=client,
            progress=False)
    assert client.scatters == 3
