"""Results store for batch runs: a directory of Parquet part files, one per finished chunk.

Layout (one directory per run key, under the store root, ``./runs`` by default)::

    runs/
      certify-3f2a9c1e0b7d4a55/          <command>-<first 16 hex digits of the key digest>
        key.json                          the full key, for humans and as a collision check
        part-0000000-0000099-1a2b3c4d.parquet
        part-0000100-0000199-5e6f7a8b.parquet
        corrupt/                          parts that failed validation are moved here
        .tmp-<uuid>.parquet               a write in progress (or one killed mid-write)

Why Parquet parts rather than one SQLite file:

* **Atomic, lock-free commits.**  A chunk is written to a temporary file, fsynced and
  renamed into place with :func:`os.replace`; the rename is the commit.  A run killed at any
  instant leaves either the whole part or only a ``.tmp-*`` file that is never read.  Nothing
  is ever appended to or rewritten in place, so there is no journal to recover, no write lock
  to contend for and no single file whose corruption loses the whole run (SQLite's locking
  is also unreliable on the NFS/Lustre file systems that clusters share).
* **Damage stays local.**  A corrupt part costs only its own chunk: it is reported, moved to
  ``corrupt/`` and recomputed.
* **Typed, columnar, portable.**  Parts keep pandas dtypes exactly, and the directory can be
  read directly by pandas, pyarrow, Dask or DuckDB, copied, or merged with ``cp``.

Every part also records, in its Parquet schema metadata, the digest of its run key and the
example indices it covers (an example may legitimately produce no rows).  A part whose key
does not match the directory, that cannot be read, or whose rows fall outside its declared
indices is treated as corrupt, so results of a different command, model, data set, radius
or options are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

#: Version of the on-disk layout; part of every run key, so a format change never mixes.
STORE_FORMAT = 1
#: Schema-metadata key under which every part records its run key digest and indices.
PART_METADATA_KEY = b"polytope.part"
#: Name of the column that every result table must carry: the example index.
INDEX_COLUMN = "index"
#: Temporary files older than this (seconds) are left-overs of killed runs and are deleted.
STALE_TMP_SECONDS = 600.0


class StoreWarning(UserWarning):
    """A part file of the results store was unreadable or foreign and will be recomputed."""


def _json_default(obj: Any) -> Any:
    """Make numpy scalars/arrays, paths and sets JSON-able; anything else is an error."""
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays and scalars, tensors
        return obj.tolist()
    raise TypeError(f"run key values must be JSON-able, got {type(obj).__name__}: {obj!r}")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON text of ``obj`` (sorted keys, no whitespace) used to build run keys.

    Raises:
        TypeError: if ``obj`` holds a value that is not JSON-able (numpy values are converted).
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def key_digest(key: Mapping[str, Any]) -> str:
    """The sha256 hex digest of the canonical JSON of a run key."""
    return hashlib.sha256(canonical_json(key).encode("utf-8")).hexdigest()


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry (the rename of a part) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class PartInfo:
    """One valid part file: its path and the example indices it covers."""

    path: Path
    indices: frozenset[int]
    n_rows: int


@dataclass
class ScanResult:
    """What a scan of the store found: the valid parts and the examples they cover."""

    parts: list[PartInfo] = field(default_factory=list)
    done: set[int] = field(default_factory=set)


class ResultStore:
    """The part files of one run key, in ``root/<name>-<digest[:16]>/``.

    Args:
        root: the store root directory (created on :meth:`open`).
        key: the run key (JSON-able mapping); everything that changes the results.
        name: a readable prefix for the directory, usually the command name.
    """

    def __init__(self, root: str | os.PathLike[str], key: Mapping[str, Any], name: str = "run") -> None:
        self.root = Path(root)
        self.key = json.loads(canonical_json(dict(key)))
        self.digest = key_digest(self.key)
        self.path = self.root / f"{name}-{self.digest[:16]}"

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory (and ``key.json``), check the key, and drop stale temp files."""
        self.path.mkdir(parents=True, exist_ok=True)
        key_file = self.path / "key.json"
        record = {"digest": self.digest, "key": self.key}
        existing: dict[str, Any] | None = None
        if key_file.exists():
            try:
                existing = json.loads(key_file.read_text())
            except (OSError, ValueError):
                existing = None
            if existing is not None and existing.get("digest") != self.digest:
                raise RuntimeError(
                    f"results store {self.path} belongs to a different run key "
                    f"({existing.get('digest')}); refusing to mix results"
                )
        if existing is None:
            atomic_write_bytes(key_file, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        now = time.time()
        for tmp in self.path.glob(".tmp-*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    tmp.unlink()
            except OSError:
                pass

    def clear(self) -> None:
        """Delete every result of this run key (``--fresh``); other keys are untouched."""
        if self.path.exists():
            shutil.rmtree(self.path)

    # -- writing ---------------------------------------------------------------------------

    def write_part(self, df: pd.DataFrame, indices: Iterable[int]) -> Path:
        """Commit the rows of one finished chunk atomically and return the part's path.

        Args:
            df: the chunk's rows; must have an integer ``index`` column whose values are
                all in ``indices``.
            indices: every example index the chunk covered (examples may have no rows).

        Raises:
            ValueError: if ``df`` lacks the ``index`` column or has rows outside ``indices``.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        idx = sorted({int(i) for i in indices})
        if not idx:
            raise ValueError("a part must cover at least one example index")
        _check_rows(df, set(idx))
        table = pa.Table.from_pandas(df, preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[PART_METADATA_KEY] = json.dumps(
            {"format": STORE_FORMAT, "key": self.digest, "indices": idx}
        ).encode()
        table = table.replace_schema_metadata(meta)
        token = uuid.uuid4().hex
        final = self.path / f"part-{idx[0]:07d}-{idx[-1]:07d}-{token[:8]}.parquet"
        tmp = self.path / f".tmp-{token}.parquet"
        try:
            with open(tmp, "wb") as fh:
                pq.write_table(table, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path)
        return final

    # -- reading ---------------------------------------------------------------------------

    def _read_valid_parts(self, full: bool) -> list[tuple[PartInfo, pd.DataFrame | None]]:
        """Validate every part; move rejected ones to ``corrupt/`` with a :class:`StoreWarning`.

        ``full=False`` reads only each part's footer (schema, metadata and row count): a
        truncated or foreign file is caught there, cheaply, however many parts there are.
        ``full=True`` also reads and checks every row and returns the tables.
        """
        import pyarrow.parquet as pq

        good: list[tuple[PartInfo, pd.DataFrame | None]] = []
        if not self.path.is_dir():
            return good
        paths = []
        for path in self.path.glob("part-*.parquet"):
            with suppress(FileNotFoundError):
                paths.append((path.stat().st_mtime_ns, path.name, path))
        for _, _, path in sorted(paths):
            try:
                meta = pq.read_metadata(path)
                raw = (meta.schema.to_arrow_schema().metadata or {}).get(PART_METADATA_KEY)
                if raw is None:
                    raise ValueError("no polytope part metadata (not written by the runner)")
                info = json.loads(raw)
                if info.get("key") != self.digest:
                    raise ValueError(f"written for a different run key ({info.get('key')})")
                indices = frozenset(int(i) for i in info["indices"])
                df = None
                if full:
                    df = pq.read_table(path).to_pandas()
                    _check_rows(df, indices)
            except FileNotFoundError:
                continue  # removed by a concurrent --fresh
            except Exception as exc:
                self._quarantine(path, f"{type(exc).__name__}: {exc}")
                continue
            good.append((PartInfo(path, indices, meta.num_rows), df))
        return good

    def _quarantine(self, path: Path, reason: str) -> None:
        dest_dir = self.path / "corrupt"
        where = "deleted"
        try:
            dest_dir.mkdir(exist_ok=True)
            os.replace(path, dest_dir / path.name)
            where = f"moved to {dest_dir}"
        except OSError:
            path.unlink(missing_ok=True)
        warnings.warn(
            f"results store: part {path.name} is unusable ({reason}); {where}, "
            "its examples will be recomputed",
            StoreWarning,
            stacklevel=3,
        )

    def scan(self) -> ScanResult:
        """Return the valid parts and the example indices they cover.

        Reads only the part footers.  Unreadable (e.g. truncated) or foreign parts are
        reported with a :class:`StoreWarning`, moved to ``corrupt/`` and left out, so their
        examples count as not done.  Damage inside a part with an intact footer is caught
        by :meth:`load`, which reads every row.
        """
        result = ScanResult()
        for info, _ in self._read_valid_parts(full=False):
            result.parts.append(info)
            result.done |= info.indices
        return result

    def load(self, indices: Iterable[int] | None = None) -> tuple[pd.DataFrame, set[int]]:
        """Assemble the stored rows, sorted by example index.

        Args:
            indices: restrict to these example indices (default: everything stored).

        Returns:
            ``(df, covered)``: the rows, and the requested indices that the store covers.
            If two parts cover the same example (two runs raced), the older part wins.
        """
        wanted = None if indices is None else {int(i) for i in indices}
        good = self._read_valid_parts(full=True)
        seen: set[int] = set()
        frames: list[pd.DataFrame] = []
        columns_template: pd.DataFrame | None = None
        for info, df in good:
            assert df is not None
            take = info.indices - seen if wanted is None else (info.indices & wanted) - seen
            if columns_template is None:
                columns_template = df.iloc[:0]
            if take:
                sub = df if take == info.indices else df[df[INDEX_COLUMN].isin(take)]
                if len(sub):
                    frames.append(sub)
            seen |= take
        if frames:
            out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].copy()
        elif columns_template is not None:
            out = columns_template.copy()
        else:
            out = pd.DataFrame({INDEX_COLUMN: pd.Series([], dtype="int64")})
        out = out.sort_values(INDEX_COLUMN, kind="stable").reset_index(drop=True)
        return out, seen


def _check_rows(df: Any, indices: Iterable[int]) -> None:
    """Check that ``df`` is a DataFrame with an ``index`` column inside ``indices``."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if INDEX_COLUMN not in df.columns:
        raise ValueError(f"result table has no {INDEX_COLUMN!r} column (columns: {list(df.columns)})")
    allowed = indices if isinstance(indices, (set, frozenset)) else set(indices)
    values = df[INDEX_COLUMN]
    if values.isna().any():
        raise ValueError(f"result table has missing values in the {INDEX_COLUMN!r} column")
    stray = sorted({int(v) for v in pd.unique(values)} - allowed)
    if stray:
        raise ValueError(f"result table has rows for examples outside its chunk: {stray[:10]}")
