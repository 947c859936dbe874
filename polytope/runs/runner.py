"""Resumable, chunked batch runs, in-process, on a local process pool, or on a Dask cluster.

Every batch command (``certify``, ``tightness``, ``radius``) is written as

* a :class:`RunSpec` -- *what* is computed: the command, the model hash, the data set, the
  radius and every option that changes the results (together the **run key**), plus the
  examples to cover and the chunk size;
* a top-level, picklable ``compute_chunk(payload, indices) -> pandas.DataFrame`` that
  computes the rows of a list of example indices (one row per example, or per
  ``(example, target)``), with an integer ``index`` column, and optionally a ``status``
  column (solver status) that the end-of-run summary counts;
* a ``payload`` (model, data, device, ...) shipped to each worker once, not per chunk;

and then calls :func:`run`, which splits the missing examples into chunks, executes them,
commits each finished chunk at once to the :class:`~polytope.runs.store.ResultStore` (one Parquet
part per chunk, written atomically), and finally assembles the table from the store::

    # in the command's module, at top level (workers import it by name):
    def certify_chunk(payload, indices):
        ...  # -> DataFrame with columns index, target, bound, status, ...

    # in the command (its parser went through add_runner_arguments):
    spec = RunSpec(command="certify", model_hash=model_hash(model), data="mnist:test",
                   eps=0.1, options={"norm": "linf", "solver": "highs"},
                   n_examples=10_000, chunk_size=args.chunk_size)
    payload = {"model": model, "data": data, "device": compute_device(args, "cuda")}
    try:
        df = run(spec, certify_chunk, payload=payload, **run_kwargs_from_args(args))
    except RunFailedError as err:
        print(err, file=sys.stderr)  # names the failed chunks; err.df has the rest
        return 1
    if args.out:
        write_csv(df, args.out)

Re-running the same spec computes only the examples the store does not hold yet
(``fresh=True`` deletes this key's results first).  An interruption (Ctrl-C, ``kill -9``,
pre-emption) loses at most the chunks in flight.  Chunks whose computation keeps failing
(an exception, or a worker process that dies) are retried ``retries`` times and then
reported: the run finishes everything else and raises :class:`RunFailedError`, which
carries the completed table and the failed chunks.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm import tqdm

from polytope.model.checks import check_device
from polytope.model.errors import InvalidInputError, PolytopeError
from polytope.runs.store import (
    INDEX_COLUMN,
    STORE_FORMAT,
    ResultStore,
    canonical_json,
    key_digest,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_RETRIES",
    "DEFAULT_STORE",
    "ComputeChunk",
    "FailedChunk",
    "RunFailedError",
    "RunSpec",
    "add_runner_arguments",
    "compute_device",
    "model_hash",
    "non_negative_int",
    "positive_int",
    "run",
    "run_kwargs_from_args",
    "summarize",
    "write_csv",
]

#: Default results store root (gitignored).
DEFAULT_STORE = Path("runs")
#: Default number of examples per chunk.
DEFAULT_CHUNK_SIZE = 100
#: Default number of retries of a failing chunk (so at most ``1 + retries`` attempts).
DEFAULT_RETRIES = 2

#: ``compute_chunk(payload, indices) -> DataFrame`` with an ``index`` column.
ComputeChunk = Callable[[Any, list[int]], pd.DataFrame]

_COMMAND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------------
# Run key and errors
# ----------------------------------------------------------------------------------------


def model_hash(module: nn.Module) -> str:
    """A sha256 hex digest identifying a model's weights and architecture.

    Hashes every state-dict entry (name, dtype, shape and raw bytes, buffers such as
    batch-norm statistics included) and the module's ``repr``, which holds the layer
    hyper-parameters that have no weights (conv stride and padding, activations): two
    models that differ only there compute different results and must not share a key.
    """
    import torch

    h = hashlib.sha256()
    h.update(b"polytope-model-v1\0")
    h.update(repr(module).encode("utf-8"))
    for name, value in module.state_dict().items():
        h.update(f"\0{name}\0".encode())
        if not isinstance(value, torch.Tensor):
            h.update(repr(value).encode("utf-8"))
            continue
        t = value.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class RunSpec:
    """What a batch run computes.

    The **run key** -- ``command``, ``model_hash``, ``data``, ``eps`` and ``options`` -- names
    the results in the store: runs with the same key share (and resume) results, runs with
    any difference never see each other's rows.  ``n_examples``/``indices`` and
    ``chunk_size`` are *not* part of the key: a longer run reuses a shorter run's examples,
    and the chunk size may change between restarts.

    Attributes:
        command: the batch command, e.g. ``"certify"`` (letters, digits, ``_.-``).
        model_hash: :func:`model_hash` of the model.
        data: the data set, e.g. ``"mnist:test"`` (add a file hash for custom files).
        options: every other setting that changes the results (norm, solver, targets,
            tolerances...); JSON-able (numpy scalars/arrays are converted).  Settings that
            do not change results (device, verbosity) must stay out of it.
        eps: the perturbation radius (a float, a list of floats or ``None``).
        n_examples: compute examples ``0 .. n_examples-1`` ...
        indices: ... or exactly these example indices (give one of the two).
        chunk_size: examples per chunk (the unit of work, retry and commit).
    """

    command: str
    model_hash: str
    data: str
    options: Mapping[str, Any] = field(default_factory=dict)
    eps: float | Sequence[float] | None = None
    n_examples: int | None = None
    indices: Sequence[int] | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.command, str) or not _COMMAND_RE.match(self.command):
            raise ValueError(f"command must be a plain name (letters, digits, _.-), got {self.command!r}")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if (self.n_examples is None) == (self.indices is None):
            raise ValueError("give exactly one of n_examples and indices")
        if self.n_examples is not None and (
            not isinstance(self.n_examples, int) or isinstance(self.n_examples, bool) or self.n_examples < 0
        ):
            raise ValueError(f"n_examples must be a non-negative integer, got {self.n_examples!r}")
        if self.indices is not None:
            idx = [int(i) for i in self.indices]
            if any(i < 0 for i in idx):
                raise ValueError("example indices must be non-negative")
            if len(set(idx)) != len(idx):
                raise ValueError("example indices must be unique")
            object.__setattr__(self, "indices", tuple(idx))
        # a canonical private copy: JSON-able now (TypeError otherwise, not mid-run), and
        # later changes to the caller's dict cannot change the key
        object.__setattr__(self, "options", json.loads(canonical_json(dict(self.options))))
        object.__setattr__(self, "eps", json.loads(canonical_json(self.eps)))

    def key(self) -> dict[str, Any]:
        """The run key as a JSON-able dict (includes the store format version)."""
        return {
            "format": STORE_FORMAT,
            "command": self.command,
            "model_hash": self.model_hash,
            "data": self.data,
            "eps": self.eps,
            "options": dict(self.options),
        }

    def key_digest(self) -> str:
        """sha256 hex digest of :meth:`key` (names the store directory)."""
        return key_digest(self.key())

    def example_indices(self) -> list[int]:
        """The example indices this run covers, in order."""
        if self.indices is not None:
            return list(self.indices)
        assert self.n_examples is not None
        return list(range(self.n_examples))


@dataclass(frozen=True)
class FailedChunk:
    """A chunk that failed on every attempt.

    Attributes:
        indices: the chunk's example indices.
        error: the last error, ``"ExceptionType: message"``.
        attempts: how many attempts were made (``None`` where the engine does not say).
        deterministic: the error was a :class:`~polytope.model.errors.PolytopeError` (bad input, not
            bad luck): it was not retried, and re-running will not help.
    """

    indices: tuple[int, ...]
    error: str
    attempts: int | None = None
    deterministic: bool = False

    def describe(self) -> str:
        """``"examples 100-199 (3 attempts): ValueError: ..."``."""
        lo, hi = min(self.indices), max(self.indices)
        span = f"example {lo}" if lo == hi else f"examples {lo}-{hi}"
        tries = "" if self.attempts is None else f" ({self.attempts} attempt{'s' * (self.attempts != 1)})"
        return f"{span}{tries}: {self.error}"


class RunFailedError(PolytopeError, RuntimeError):
    """Some chunks failed after all retries; everything else was computed and stored.

    Attributes:
        df: the table of every example that was completed (from the store).
        failed: the chunks that failed, with their last error.
        missing: requested example indices absent from the table and not in a failed chunk
            (normally empty; non-empty only if the store was tampered with during the run).
    """

    def __init__(self, df: pd.DataFrame, failed: Sequence[FailedChunk], missing: Sequence[int] = ()) -> None:
        self.df = df
        self.failed = list(failed)
        self.missing = list(missing)
        lines = [f"{len(self.failed)} chunk(s) failed:"] + [f"  {c.describe()}" for c in self.failed]
        if self.missing:
            lines.append(f"  {len(self.missing)} example(s) missing from the store: {self.missing[:20]}")
        if all(c.deterministic for c in self.failed) and not self.missing:
            lines.append("These errors come from the input, not from the run: re-running will not help.")
        else:
            lines.append("Re-run the same command to retry only these examples.")
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------
# Executors: generators of outcomes, one per chunk
# ----------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    chunk: tuple[int, ...]
    df: pd.DataFrame | None = None
    error: str | None = None
    attempts: int | None = None
    skipped: bool = False  # another process committed these examples meanwhile
    deterministic: bool = False  # a PolytopeError: never retried


def _deterministic(exc: BaseException) -> bool:
    """Errors of the input (polytope's own named errors) fail the same way every time: never retried."""
    return isinstance(exc, PolytopeError)


def _describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _run_in_process(
    fn: ComputeChunk, payload: Any, chunks: Sequence[tuple[int, ...]], retries: int,
    done: Callable[[], set[int]] | None = None,
) -> Iterator[_Outcome]:
    """Compute the chunks one by one; ``done()`` (the store's finished examples, re-read before
    each chunk) lets several processes share one store without recomputing each other's work."""
    for full in chunks:
        finished = done() if done is not None else set()
        chunk = tuple(i for i in full if i not in finished)
        if not chunk:
            yield _Outcome(full, skipped=True)
            continue
        attempts = 0
        while True:
            attempts += 1
            try:
                df = fn(payload, list(chunk))
            except Exception as exc:
                if attempts > retries or _deterministic(exc):
                    outcome = _Outcome(chunk, error=_describe_error(exc), attempts=attempts,
                                       deterministic=_deterministic(exc))
                    break
                continue
            outcome = _Outcome(chunk, df=df, attempts=attempts)
            break
        yield outcome


# Process-pool worker state: the payload, unpickled once per worker process.
_WORKER_PAYLOAD: Any = None


def _limit_threads(n: int) -> None:
    """Keep each worker's BLAS/OpenMP/torch thread pools to ``n`` threads (best effort)."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except Exception:
        pass
    if "torch" in sys.modules:
        with suppress(Exception):
            sys.modules["torch"].set_num_threads(n)


def _pool_init(payload_bytes: bytes, threads: int) -> None:
    """Process-pool initializer: limit threads, then unpickle the payload once."""
    global _WORKER_PAYLOAD
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    _WORKER_PAYLOAD = pickle.loads(payload_bytes)
    _limit_threads(threads)


def _pool_call(fn: ComputeChunk, indices: list[int]) -> pd.DataFrame:
    return fn(_WORKER_PAYLOAD, indices)


def _pool_context(fn: ComputeChunk) -> multiprocessing.context.BaseContext:
    """The start method for pool workers: ``forkserver`` where available, else ``spawn``.

    Never plain ``fork``: the submitting process may hold threads (torch, tqdm, Dask) that a
    forked child would inherit in a locked state.  The fork server is started once per
    process with the main module, the runner and ``fn``'s module pre-imported, so workers
    (and the pools rebuilt after a worker dies) start in milliseconds instead of each
    re-importing torch.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    module = getattr(fn, "__module__", None)
    preload = ["__main__", "polytope.runs.runner"] + ([module] if module and module != "__main__" else [])
    ctx.set_forkserver_preload(preload)  # only takes effect if the server is not running yet
    return ctx


def _run_process_pool(
    fn: ComputeChunk, payload: Any, chunks: Sequence[tuple[int, ...]], retries: int, workers: int
) -> Iterator[_Outcome]:
    """Run chunks on a pool of ``workers`` local processes (see :func:`_pool_context`).

    At most ``workers`` chunks are in flight.  When a worker dies, Python's pool breaks and
    fails every chunk in flight; the culprit cannot be told apart, so if several were in
    flight they are re-run one at a time ("suspects"), uncharged, and only a chunk that
    breaks the pool on its own is charged an attempt.  A pool that keeps breaking before it
    finishes anything (e.g. a payload that cannot be unpickled) fails the remaining chunks.
    """
    payload_bytes = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = _pool_context(fn)
    queue: deque[tuple[int, ...]] = deque(chunks)
    suspects: deque[tuple[int, ...]] = deque()
    attempts: dict[tuple[int, ...], int] = {}
    in_flight: dict[cf.Future[pd.DataFrame], tuple[int, ...]] = {}
    executor: cf.ProcessPoolExecutor | None = None
    finished_in_pool = 0
    sterile_breaks = 0  # consecutive pools that broke before finishing any chunk
    last_break = ""

    def retry_or_fail(chunk: tuple[int, ...], error: str, deterministic: bool = False) -> _Outcome | None:
        attempts[chunk] = attempts.get(chunk, 0) + 1
        if attempts[chunk] > retries or deterministic:
            return _Outcome(chunk, error=error, attempts=attempts[chunk], deterministic=deterministic)
        queue.append(chunk)
        return None

    try:
        while queue or suspects or in_flight:
            if executor is None:
                executor = cf.ProcessPoolExecutor(
                    max_workers=workers, mp_context=ctx, initializer=_pool_init,
                    initargs=(payload_bytes, threads),
                )
                finished_in_pool = 0
            try:
                if suspects:
                    if not in_flight:
                        in_flight[executor.submit(_pool_call, fn, list(suspects[0]))] = suspects[0]
                        suspects.popleft()
                else:
                    while queue and len(in_flight) < workers:
                        in_flight[executor.submit(_pool_call, fn, list(queue[0]))] = queue[0]
                        queue.popleft()
            except cf.process.BrokenProcessPool:
                # a worker died since the last check: the chunk was not submitted and stays
                # queued; the futures in flight (if any) report the break below
                pool_broke = True
            else:
                pool_broke = False
            done = set(in_flight)
            if in_flight and not pool_broke:
                done, _ = cf.wait(list(in_flight), return_when=cf.FIRST_COMPLETED)
            if pool_broke or any(isinstance(f.exception(), cf.process.BrokenProcessPool) for f in done):
                pool_broke = True
                last_break = "worker process died (BrokenProcessPool)"
                cf.wait(list(in_flight))  # a broken pool fails all its futures promptly
                done = set(in_flight)
            broken: list[tuple[int, ...]] = []
            for fut in done:
                chunk = in_flight.pop(fut)
                exc = fut.exception()
                if exc is None:
                    finished_in_pool += 1
                    yield _Outcome(chunk, df=fut.result(), attempts=attempts.get(chunk, 0) + 1)
                elif isinstance(exc, cf.process.BrokenProcessPool):
                    broken.append(chunk)
                else:
                    outcome = retry_or_fail(chunk, _describe_error(exc), _deterministic(exc))
                    if outcome is not None:
                        yield outcome
            if pool_broke:
                executor.shutdown(wait=True, cancel_futures=True)
                executor = None
                sterile_breaks = 0 if finished_in_pool else sterile_breaks + 1
                if sterile_breaks > retries + 1:
                    for chunk in [*broken, *suspects, *queue]:
                        yield _Outcome(
                            chunk,
                            error=f"{last_break}; the process pool broke {sterile_breaks} times in a row "
                            "without finishing a chunk",
                            attempts=attempts.get(chunk, 0),
                        )
                    suspects.clear()
                    queue.clear()
                elif len(broken) == 1:
                    outcome = retry_or_fail(broken[0], last_break)
                    if outcome is not None:
                        yield outcome
                elif broken:
                    suspects.extend(sorted(broken))
    finally:
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


#: How many times a Dask run re-scatters a payload that the cluster lost (all its holders died).
MAX_PAYLOAD_RESCATTERS = 10
#: How long (seconds) to wait for workers to come back before re-scattering a lost payload.
WAIT_FOR_WORKERS_S = 600.0


def _run_dask(
    fn: ComputeChunk,
    payload: Any,
    chunks: Sequence[tuple[int, ...]],
    retries: int,
    scheduler: Any,
    command: str,
) -> Iterator[_Outcome]:
    """Run chunks as Dask tasks; the payload is scattered (broadcast) to the workers once.

    Exceptions are retried by Dask (``retries``); a task whose worker dies is rescheduled by
    the scheduler up to its ``distributed.scheduler.allowed-failures`` (default 3) before it
    fails with ``KilledWorker``.  If every worker holding the payload dies (a whole cluster
    pre-empted), Dask cancels the tasks waiting on it; the payload is then scattered again
    and those chunks resubmitted (at most :data:`MAX_PAYLOAD_RESCATTERS` times per run).
    """
    try:
        from distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "running on a Dask cluster needs dask[distributed]: pip install 'polytope[dask]'"
        ) from exc

    own_client = isinstance(scheduler, str)
    client = Client(scheduler) if own_client else scheduler
    futures: dict[Any, tuple[tuple[int, ...], int]] = {}  # future -> (chunk, payload generation)
    run_id = uuid.uuid4().hex[:8]
    n_submitted = 0

    def scatter(wait_s: float = 0.0) -> Any:
        """Broadcast the payload; retry for up to ``wait_s`` seconds while no worker is up."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return client.scatter([payload], broadcast=True, hash=False)[0]
            except (TimeoutError, OSError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)

    def submit(chunk: tuple[int, ...], ref: Any, generation: int) -> Any:
        nonlocal n_submitted
        n_submitted += 1
        fut = client.submit(
            fn, ref, list(chunk), key=f"polytope-{command}-{chunk[0]}-{run_id}-{n_submitted}",
            retries=retries, pure=False,
        )
        futures[fut] = (chunk, generation)
        return fut

    try:
        payload_ref, generation = scatter(), 0
        lost = ""
        pending = as_completed([submit(chunk, payload_ref, generation) for chunk in chunks])
        for fut in pending:
            chunk, fut_generation = futures.pop(fut)
            status = fut.status
            if status == "finished":
                try:
                    df = fut.result()
                except Exception as exc:  # lost between completion and fetch
                    yield _Outcome(chunk, error=_describe_error(exc))
                else:
                    yield _Outcome(chunk, df=df)
            elif status == "cancelled" and (fut_generation < generation or payload_ref.status != "finished"):
                # the payload was lost with its workers: not the chunk's fault
                if fut_generation == generation and generation < MAX_PAYLOAD_RESCATTERS and not lost:
                    try:
                        payload_ref, generation = scatter(wait_s=WAIT_FOR_WORKERS_S), generation + 1
                    except Exception as exc:
                        lost = f"the cluster lost the payload and it could not be sent again: {_describe_error(exc)}"
                if fut_generation < generation:
                    pending.add(submit(chunk, payload_ref, generation))
                else:
                    yield _Outcome(chunk, error=lost or f"the cluster lost the payload {generation + 1} times")
            else:
                try:
                    exc = fut.exception()
                    error = _describe_error(exc) if exc is not None else f"task {status}"
                except Exception as inner:
                    error = _describe_error(inner)
                attempts = None if "KilledWorker" in error else retries + 1
                yield _Outcome(chunk, error=error, attempts=attempts)
            fut.release()
        del payload_ref
    finally:
        if futures:
            with suppress(Exception):
                client.cancel(list(futures))
        if own_client:
            client.close()


# ----------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------


def _nothing() -> Iterator[_Outcome]:
    yield from ()


def _chunks(indices: Sequence[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(indices[i : i + size]) for i in range(0, len(indices), size)]


def summarize(df: pd.DataFrame) -> str:
    """A one-line summary: rows, examples and, when there is a ``status`` column, counts by status."""
    n_ex = int(df[INDEX_COLUMN].nunique()) if INDEX_COLUMN in df.columns else 0
    text = f"{len(df)} row(s) for {n_ex} example(s)"
    if "status" in df.columns and len(df):
        counts = df["status"].astype("object").fillna("<missing>").value_counts()
        text += "; status: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    return text


def run(
    spec: RunSpec,
    compute_chunk: ComputeChunk,
    *,
    payload: Any = None,
    store_dir: str | os.PathLike[str] = DEFAULT_STORE,
    workers: int = 1,
    dask_scheduler: Any = None,
    fresh: bool = False,
    retries: int = DEFAULT_RETRIES,
    progress: bool = True,
) -> pd.DataFrame:
    """Compute ``spec``'s examples that the store lacks, commit each chunk, return the table.

    Args:
        spec: what to compute (the run key, the examples and the chunk size).
        compute_chunk: top-level picklable ``f(payload, indices) -> DataFrame``; the frame
            has an integer ``index`` column with values in ``indices`` (an example may have
            zero, one or several rows) and optionally a ``status`` column.
        payload: read-only data every chunk needs (model, data set, device...); shipped to
            each worker once: unpickled once per pool process, scattered once to Dask.
        store_dir: root of the results store (default ``./runs``).
        workers: ``1`` computes in this process; ``N > 1`` uses a pool of N local processes
            (started by a fork server, or spawned where there is none: either way the calling
            script needs an ``if __name__ == "__main__":`` guard).
        dask_scheduler: a Dask scheduler address (``"tcp://host:8786"``) or an existing
            ``distributed.Client``; workers need polytope installed (and the module that
            defines ``compute_chunk`` importable).  Exclusive with ``workers > 1``.
        fresh: delete this run key's stored results first (other keys are kept).
        retries: a failing chunk is retried this many times before it is reported; a
            :class:`~polytope.model.errors.PolytopeError` (bad input) is reported at once, never retried.
        progress: show a tqdm bar (examples done, rate, ETA; only when stderr is a terminal)
            and the store and summary lines on stderr.

    Returns:
        The rows of every example of ``spec``, sorted by ``index`` (stable within an example),
        assembled from the store.

    Raises:
        RunFailedError: some chunks failed after all retries; ``.df`` holds the rest.
        ValueError: invalid arguments.
        KeyboardInterrupt: re-raised after reporting what was saved; re-run to resume.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if dask_scheduler is not None and workers > 1:
        raise ValueError("give either workers > 1 (local processes) or dask_scheduler, not both")
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
    if not callable(compute_chunk):
        raise TypeError("compute_chunk must be callable")

    store = ResultStore(store_dir, spec.key(), name=spec.command)
    if fresh:
        store.clear()
    store.open()
    wanted = spec.example_indices()
    done = store.scan().done
    todo = [i for i in wanted if i not in done]
    chunks = _chunks(todo, spec.chunk_size)

    if not chunks:
        outcomes: Iterator[_Outcome] = _nothing()
        where = "nothing to compute"
    elif dask_scheduler is not None:
        outcomes = _run_dask(compute_chunk, payload, chunks, retries, dask_scheduler, spec.command)
        address = dask_scheduler if isinstance(dask_scheduler, str) else getattr(
            getattr(dask_scheduler, "scheduler", None), "address", "client"
        )
        where = f"Dask scheduler {address}"
    elif workers > 1 and len(chunks) > 1:
        outcomes = _run_process_pool(compute_chunk, payload, chunks, retries, min(workers, len(chunks)))
        where = f"{min(workers, len(chunks))} local processes"
    else:
        outcomes = _run_in_process(compute_chunk, payload, chunks, retries, lambda: store.scan().done)
        where = "in-process"

    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)
    log(
        f"[{spec.command}] store {store.path}: {len(wanted) - len(todo)}/{len(wanted)} examples done, "
        f"{len(todo)} to compute in {len(chunks)} chunk(s) ({where})"
    )
    failed: list[FailedChunk] = []
    committed = 0  # chunks
    computed = 0  # examples
    bar = tqdm(
        total=len(wanted), initial=len(wanted) - len(todo), unit="ex", desc=spec.command,
        disable=not (progress and sys.stderr.isatty()), file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
    )
    try:
        with closing(outcomes):
            for outcome in outcomes:
                if outcome.skipped:
                    bar.update(len(outcome.chunk))
                    continue
                if outcome.df is not None:
                    try:
                        store.write_part(outcome.df, outcome.chunk)
                    except (ValueError, TypeError, NotImplementedError) as exc:
                        error = f"bad result table: {_describe_error(exc)}"
                        outcome = _Outcome(outcome.chunk, error=error, attempts=outcome.attempts)
                    else:
                        committed += 1
                        computed += len(outcome.chunk)
                        bar.update(len(outcome.chunk))
                        continue
                failed.append(FailedChunk(outcome.chunk, outcome.error or "unknown error", outcome.attempts,
                                          outcome.deterministic))
                log(f"[{spec.command}] chunk failed: {failed[-1].describe()}")
    except KeyboardInterrupt:
        bar.close()
        log(
            f"[{spec.command}] interrupted: {committed} chunk(s) committed this run to {store.path}; "
            "re-run the same command to resume"
        )
        raise
    finally:
        bar.close()

    df, covered = store.load(wanted)
    df.attrs["polytope_run"] = {
        "store": str(store.path), "key": store.digest,
        "computed": computed, "reused": len(wanted) - len(todo),
    }
    failed_idx = {i for c in failed for i in c.indices}
    missing = sorted(set(wanted) - covered - failed_idx)
    log(f"[{spec.command}] {summarize(df)}")
    if failed or missing:
        raise RunFailedError(df, sorted(failed, key=lambda c: c.indices), missing)
    return df


# ----------------------------------------------------------------------------------------
# Command-line helpers shared by the batch commands
# ----------------------------------------------------------------------------------------


def _int_at_least(minimum: int, kind: str):
    """An ``argparse`` type: an integer ``>= minimum`` (``kind`` names it in the message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1, "positive")
"""An ``argparse`` type: an integer >= 1."""
non_negative_int = _int_at_least(0, "non-negative")
"""An ``argparse`` type: an integer >= 0."""


def writable_file(text: str) -> Path:
    """An ``argparse`` type: a file that can be written (checked by creating a scratch file beside it)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name, e.g. {path / 'results.csv'}")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: directory {parent} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: the file is not writable")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: directory {parent} is not writable ({exc.strerror})") from None
    return path


def add_runner_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options every batch command shares, in an argument group "batch run".

    ``--out``, ``--store``, ``--fresh``, ``--workers``, ``--dask-scheduler``,
    ``--worker-device``, ``--chunk-size``, ``--no-progress`` and ``--retries``.  Turn the parsed namespace into
    :func:`run` keyword arguments with :func:`run_kwargs_from_args`, pick the device for
    the payload with :func:`compute_device`, and pass ``args.chunk_size`` to :class:`RunSpec`.
    """
    g = parser.add_argument_group("batch run")
    g.add_argument("--out", type=writable_file, default=None, metavar="CSV",
                   help="write the final table to this CSV file (its directory must exist and be writable)")
    g.add_argument("--store", type=Path, default=DEFAULT_STORE, metavar="DIR",
                   help="results store root; finished chunks are kept there and reused "
                   f"(default: {DEFAULT_STORE}/)")
    g.add_argument("--fresh", action="store_true",
                   help="discard this run's stored results and start over")
    g.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="local worker processes (default: 1, in this process)")
    g.add_argument("--dask-scheduler", default=None, metavar="ADDRESS",
                   help="run on an existing Dask cluster, e.g. tcp://host:8786")
    g.add_argument("--worker-device", default=None, metavar="DEVICE",
                   help="torch device on worker processes (default: cpu); e.g. cuda when workers have GPUs")
    g.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK_SIZE, metavar="N",
                   help=f"examples per chunk, the unit of work and of saving (default: {DEFAULT_CHUNK_SIZE})")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar or run summary on stderr (there is no bar anyway when stderr is "
                   "not a terminal)")
    g.add_argument("--retries", type=non_negative_int, default=DEFAULT_RETRIES, metavar="N",
                   help=f"retries of a failing chunk before it is reported (default: {DEFAULT_RETRIES})")
    return parser


def run_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for :func:`run` from a namespace parsed with :func:`add_runner_arguments`.

    Raises:
        InvalidInputError: if both ``--workers N>1`` and ``--dask-scheduler`` were given.
    """
    if args.dask_scheduler and args.workers > 1:
        raise InvalidInputError("--workers and --dask-scheduler are exclusive: pick one executor")
    return {
        "store_dir": args.store,
        "fresh": bool(args.fresh),
        "workers": args.workers,
        "dask_scheduler": args.dask_scheduler or None,
        "retries": args.retries,
        "progress": bool(getattr(args, "progress", True)),
    }


def compute_device(args: argparse.Namespace, local_device: str = "cpu") -> str:
    """The torch device chunks should compute on.

    In-process runs keep the submitting process's ``local_device``.  Chunks on pool or Dask
    workers use ``--worker-device`` if given, else ``"cpu"`` (workers may have no GPU, and
    several local processes should not contend for one).  A device of this machine (in-process
    or local pool workers) must exist here: :class:`~polytope.model.errors.DeviceError` otherwise; a
    Dask worker's device is the workers' to check.
    """
    if args.dask_scheduler:
        return args.worker_device or "cpu"
    device = (args.worker_device or "cpu") if args.workers > 1 else local_device
    check_device(device)
    return device


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` to a CSV file atomically (temp file, fsync, rename); returns the path."""
    from polytope.runs.store import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, df.to_csv(index=False).encode("utf-8"))
    return path
