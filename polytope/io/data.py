"""Datasets of the paper: MNIST, Fashion-MNIST, SVHN, HAR, and sklearn's bundled digits.

Every loader returns ``(x, y)``: ``x`` float32 -- images ``(N, C, H, W)`` in ``[0, 1]``,
HAR and digits flat ``(N, F)`` -- and ``y`` int64 class indices.  No normalisation is
applied: the released models of Wong & Kolter (2018) take raw ``[0, 1]`` pixels.

Files live under one data directory (see :func:`data_dir`), one sub-folder per dataset.
Every file is validated as it is read; anything missing, truncated or malformed raises
:class:`~polytope.model.errors.DatasetError` naming the file.

:func:`fetch` downloads the official files and verifies their checksums.  Downloading is
one thin function (:func:`download`); checksum verification (:func:`verify_checksum`),
safe archive unpacking (:func:`unpack_zip`) and installation (:func:`fetch_resources`)
are separate so that they can be tested on local files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from polytope.model.errors import DatasetError

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "svhn", "har", "digits")
SPLITS: tuple[str, ...] = ("train", "test")
ENV_DATA_DIR = "POLYTOPE_DATA"

REPO_ROOT = Path(__file__).resolve().parents[2]  # polytope/io/<module>.py -> the repository
REPO_DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
HOME_DEFAULT_DATA_DIR = Path("~/.polytope/data")

# Read-only system copies searched after the data directory (Debian's dataset packages).
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "mnist": (),
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

IDX_IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "svhn": (3, 32, 32)}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "svhn": 10, "har": 6, "digits": 10}

HAR_FOLDER = "UCI HAR Dataset"
HAR_FEATURES = 561
DIGITS_TRAIN_SIZE = 1437
DIGITS_SEED = 0


def data_dir(explicit: str | Path | None = None) -> Path:
    """The data directory: ``explicit`` (CLI ``--data-dir``), else ``$POLYTOPE_DATA``,
    else ``../shared/data`` next to the repository when it exists, else ``~/.polytope/data``.

    The directory need not exist (``fetch`` creates it); the result is absolute.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser().resolve()
    if REPO_DEFAULT_DATA_DIR.is_dir():
        return REPO_DEFAULT_DATA_DIR.resolve()
    return HOME_DEFAULT_DATA_DIR.expanduser().resolve()


def _root(explicit: str | Path | None) -> Path:
    return data_dir(explicit)


def dataset_dirs(name: str, root: str | Path | None = None) -> list[Path]:
    """Every folder searched for dataset ``name``, in order: ``<root>/<name>`` then system copies."""
    _check_name(name)
    return [_root(root) / name, *SYSTEM_DIRS.get(name, ())]


# --------------------------------------------------------------------------- loaders


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: str | Path | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``split`` of dataset ``name`` as ``(x, y)`` (float32 inputs, int64 labels).

    ``limit`` keeps the first ``limit`` examples (in file order).  Raises
    :class:`DatasetError` for an unknown name or split and for any missing or bad file.
    """
    _check_name(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DatasetError(f"limit must be a non-negative integer or None, got {limit!r}")
    x, y = _LOADERS[name](split, _root(data_dir))
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return (
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
    )


#: Suffixes of a user's own tensor file (``--data PATH``).
TENSOR_FILE_SUFFIXES: tuple[str, ...] = (".npz", ".pt", ".pth")


def _read_tensor_file(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` (``numpy.savez``) or ``.pt`` (``torch.save`` of a dict of tensors) file."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                return {k: arrays[k] for k in arrays.files}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DatasetError(f"{path}: not a readable {path.suffix} file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: holds a {type(obj).__name__}; expected a dict with tensors 'x' and 'y'")
    return {str(k): v.numpy() if isinstance(v, torch.Tensor) else v for k, v in obj.items()}


def _check_tensors(path: Path, x: object, y: object) -> None:
    """Named errors for the wrong kinds, dtypes, shapes or values of a tensor file's ``x`` and ``y``."""
    for key, value in (("x", x), ("y", y)):
        if not isinstance(value, np.ndarray):
            raise DatasetError(f"{path}: {key!r} is a {type(value).__name__}, not an array or tensor")
    if not np.issubdtype(x.dtype, np.floating):
        raise DatasetError(f"{path}: 'x' has dtype {x.dtype}; inputs must be floating point "
                           "(scale integer pixels yourself, e.g. x / 255)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: 'y' has dtype {y.dtype}; labels must be integer class indices")
    if x.ndim < 2 or y.ndim != 1:
        raise DatasetError(f"{path}: 'x' must be (N, *input_shape) and 'y' (N,), got {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise DatasetError(f"{path}: 'x' has {len(x)} examples but 'y' has {len(y)} labels")
    if not np.isfinite(x).all():
        raise DatasetError(f"{path}: 'x' holds {int((~np.isfinite(x)).sum())} NaN or infinite values")
    if len(y) and y.min() < 0:
        raise DatasetError(f"{path}: 'y' holds negative labels (min {y.min()})")


def load_tensor_file(path: str | Path, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's own data set: ``x`` (float, ``(N, *input_shape)``) and ``y`` (integer labels, ``(N,)``).

    ``path`` is a ``.npz`` file (``numpy.savez(path, x=x, y=y)``) or a ``.pt``/``.pth`` file
    (``torch.save({"x": x, "y": y}, path)``, read weights-only).  Returned like
    :func:`load_dataset` (float32, or float64 if stored so, and int64; the first ``limit`` examples); every problem
    (missing keys, wrong dtypes, NaN, mismatched lengths) raises :class:`DatasetError`.
    """
    path = Path(path)
    if path.suffix not in TENSOR_FILE_SUFFIXES:
        raise DatasetError(f"{path}: a data file must end with {', '.join(TENSOR_FILE_SUFFIXES)}")
    if not path.is_file():
        raise DatasetError(f"{path}: data file not found")
    arrays = _read_tensor_file(path)
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {', '.join(map(repr, missing))} (it has: "
                           f"{', '.join(map(repr, sorted(arrays))) or 'nothing'}); save it with x=..., y=...")
    x, y = arrays["x"], arrays["y"]
    _check_tensors(path, x, y)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return (
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
    )


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def _missing(name: str, what: str, looked: Sequence[Path]) -> DatasetError:
    places = "\n".join(f"  {p}" for p in looked)
    return DatasetError(
        f"{name}: {what} not found. Looked in:\n{places}\n"
        f"Fetch it with `polytope data fetch {name}` (or set --data-dir / ${ENV_DATA_DIR})."
    )


def _find_file(name: str, filenames: Sequence[str], root: Path) -> Path:
    """The first existing ``dir/filename`` over the dataset's folders and the given names."""
    looked = [d / f for d in dataset_dirs(name, root) for f in filenames]
    for path in looked:
        if path.is_file():
            return path
    raise _missing(name, filenames[0], looked)


# IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------


def _read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip; corrupt or truncated gzip is an error."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read file: {exc}") from exc
    if raw[:2] != b"\x1f\x8b":
        if path.suffix == ".gz":
            raise DatasetError(f"{path}: not a gzip file (bad gzip header)")
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes.

    Checks the magic number (``0x803`` images, ``0x801`` labels), that the payload holds
    exactly the number of bytes the header announces, and returns a uint8 array shaped
    by the header's dimensions.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{path}: file too short for an IDX header ({len(data)} bytes)")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DatasetError(f"{path}: bad IDX magic number 0x{found:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - header_len
    if payload != expected:
        kind = "truncated" if payload < expected else "has trailing bytes"
        raise DatasetError(
            f"{path}: {kind}: header {tuple(dims)} needs {expected} bytes of data, found {payload}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def _idx_candidates(stem: str) -> list[str]:
    return [f"{stem}.gz", stem]


def _load_idx_dataset(name: str, split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem = IDX_FILES[split]
    image_path = _find_file(name, _idx_candidates(image_stem), root)
    label_path = _find_file(name, _idx_candidates(label_stem), root)
    images = read_idx(image_path, IDX_IMAGE_MAGIC)
    labels = read_idx(label_path, IDX_LABEL_MAGIC)
    _, height, width = IMAGE_SHAPES[name]
    if images.shape[1:] != (height, width):
        raise DatasetError(
            f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, expected {height}x{width}"
        )
    _check_counts(image_path, label_path, len(images), len(labels))
    _check_labels(label_path, labels, NUM_CLASSES[name])
    x = images.astype(np.float32)[:, None, :, :] / 255.0
    return x, labels.astype(np.int64)


def _check_counts(x_path: Path, y_path: Path, n_x: int, n_y: int) -> None:
    if n_x != n_y:
        raise DatasetError(f"{x_path} holds {n_x} examples but {y_path} holds {n_y} labels")


def _check_labels(path: Path, labels: np.ndarray, num_classes: int, offset: int = 0) -> None:
    """Every label must lie in ``offset .. offset + num_classes - 1``."""
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < offset or hi >= offset + num_classes:
        raise DatasetError(
            f"{path}: labels out of range: found {lo}..{hi}, expected {offset}..{offset + num_classes - 1}"
        )


def _load_mnist(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    return _load_idx_dataset("mnist", split, root)


def _load_fashion_mnist(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    return _load_idx_dataset("fashion_mnist", split, root)


# SVHN ----------------------------------------------------------------------------------


def _load_svhn(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """``<root>/svhn/<split>_32x32.mat``: ``X`` (32, 32, 3, N) uint8, ``y`` (N, 1) in 1..10 (10 = digit 0)."""
    import scipy.io

    path = _find_file("svhn", [f"{split}_32x32.mat"], root)
    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises many types (ValueError, IndexError, ...) on bad files
        raise DatasetError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {exc})") from exc
    for key in ("X", "y"):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("_"))
            raise DatasetError(f"{path}: variable {key!r} missing (found {found})")
    images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DatasetError(f"{path}: X has shape {images.shape}, expected (32, 32, 3, N)")
    _check_counts(path, path, images.shape[3], labels.shape[0])
    _check_labels(path, labels.astype(np.int64), 10, offset=1)
    x = np.transpose(images, (3, 2, 0, 1)).astype(np.float32) / 255.0
    return x, labels.astype(np.int64) % 10


# HAR -----------------------------------------------------------------------------------


def _har_dirs(root: Path) -> list[Path]:
    return [d / HAR_FOLDER for d in dataset_dirs("har", root)]


def _find_har_file(split: str, stem: str, root: Path) -> Path:
    looked = [d / split / f"{stem}_{split}.txt" for d in _har_dirs(root)]
    for path in looked:
        if path.is_file():
            return path
    raise _missing("har", f"{stem}_{split}.txt", looked)


def _read_text(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read text file: {exc}") from exc
    return [line for line in text.splitlines() if line.strip()]


def _parse_rows(path: Path, lines: list[str], width: int) -> np.ndarray:
    """Whitespace-separated floats, exactly ``width`` per line."""
    for number, line in enumerate(lines, start=1):
        count = len(line.split())
        if count != width:
            raise DatasetError(f"{path}: line {number} has {count} values, expected {width}")
    try:
        values = np.array(" ".join(lines).split(), dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(f"{path}: non-numeric value ({exc})") from exc
    if not np.all(np.isfinite(values)):
        raise DatasetError(f"{path}: holds NaN or infinite values")
    return values.reshape(len(lines), width)


def _load_har(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """``UCI HAR Dataset/<split>/X_<split>.txt`` (561 features) and ``y_<split>.txt`` (1..6)."""
    x_path = _find_har_file(split, "X", root)
    y_path = _find_har_file(split, "y", root)
    x = _parse_rows(x_path, _read_text(x_path), HAR_FEATURES)
    y_float = _parse_rows(y_path, _read_text(y_path), 1).reshape(-1)
    if np.any(y_float != np.round(y_float)):
        raise DatasetError(f"{y_path}: labels must be integers")
    y = y_float.astype(np.int64)
    _check_counts(x_path, y_path, len(x), len(y))
    _check_labels(y_path, y, NUM_CLASSES["har"], offset=1)
    return x.astype(np.float32), y - 1


# digits --------------------------------------------------------------------------------


def _load_digits(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled 8x8 digits, flat (N, 64) in [0, 1]; a fixed permutation (seed 0)
    gives the first 1437 examples to ``train`` and the remaining 360 to ``test``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(DIGITS_SEED).permutation(len(bunch.target))
    chosen = order[:DIGITS_TRAIN_SIZE] if split == "train" else order[DIGITS_TRAIN_SIZE:]
    x = bunch.data[chosen].astype(np.float32) / 16.0
    return x, bunch.target[chosen].astype(np.int64)


_LOADERS: dict[str, Callable[[str, Path], tuple[np.ndarray, np.ndarray]]] = {
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "svhn": _load_svhn,
    "har": _load_har,
    "digits": _load_digits,
}


# --------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class Resource:
    """One file to download: its name, mirror URLs (tried in order), checksums, whether to unzip.

    A resource with no checksum (UCI HAR publishes none) is validated by loading the
    dataset after it is installed.
    """

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None
    unpack: bool = False


def _mirrored(filename: str, bases: Sequence[str], md5: str | None) -> Resource:
    return Resource(filename, tuple(base + filename for base in bases), md5=md5)


_MNIST_BASES = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_BASES = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_SVHN_BASES = ("http://ufldl.stanford.edu/housenumbers/",)
_HAR_URLS = (
    "https://archive.ics.uci.edu/ml/machine-learning-databases/00240/UCI%20HAR%20Dataset.zip",
    "https://d396qusza40orc.cloudfront.net/getdata%2Fprojectfiles%2FUCI%20HAR%20Dataset.zip",
)

# Official md5 checksums: MNIST (LeCun's site), Fashion-MNIST (its GitHub README),
# SVHN (the cropped-digit .mat files as distributed by Stanford).
RESOURCES: dict[str, tuple[Resource, ...]] = {
    "mnist": (
        _mirrored("train-images-idx3-ubyte.gz", _MNIST_BASES, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        _mirrored("train-labels-idx1-ubyte.gz", _MNIST_BASES, "d53e105ee54ea40749a09fcbcd1e9432"),
        _mirrored("t10k-images-idx3-ubyte.gz", _MNIST_BASES, "9fb629c4189551a2d022fa330f9573f3"),
        _mirrored("t10k-labels-idx1-ubyte.gz", _MNIST_BASES, "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    "fashion_mnist": (
        _mirrored("train-images-idx3-ubyte.gz", _FASHION_BASES, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        _mirrored("train-labels-idx1-ubyte.gz", _FASHION_BASES, "25c81989df183df01b3e8a0aad5dffbe"),
        _mirrored("t10k-images-idx3-ubyte.gz", _FASHION_BASES, "bef4ecab320f06d8554ea6380940ec79"),
        _mirrored("t10k-labels-idx1-ubyte.gz", _FASHION_BASES, "bb300cfdad3c16e7a12a480ee83cd310"),
    ),
    "svhn": (
        _mirrored("train_32x32.mat", _SVHN_BASES, "e26dedcc434d2e4c54c9b2d4a06d8373"),
        _mirrored("test_32x32.mat", _SVHN_BASES, "eb5a983be6a315427106f1b164d9cef3"),
    ),
    "har": (Resource("UCI HAR Dataset.zip", _HAR_URLS, md5=None, unpack=True),),
    "digits": (),
}

Downloader = Callable[[str, Path], None]


def download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Copy ``url`` (http, https or file) to ``dest``, streaming; no verification."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def file_digest(path: str | Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: str | Path, md5: str | None = None, sha256: str | None = None) -> None:
    """Raise :class:`DatasetError` naming ``path`` unless every given checksum matches."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found, cannot verify its checksum")
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        found = file_digest(path, algorithm)
        if found != expected.lower():
            raise DatasetError(f"{path}: {algorithm} checksum mismatch: expected {expected}, got {found}")


def unpack_zip(archive: str | Path, dest: str | Path) -> list[Path]:
    """Extract ``archive`` into ``dest`` and return the extracted files.

    Members that would land outside ``dest`` (absolute paths, ``..``) are refused, and
    macOS ``__MACOSX`` metadata is skipped.  A bad archive raises :class:`DatasetError`.
    """
    archive, dest = Path(archive), Path(dest).resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.filename.startswith("__MACOSX")]
            for member in members:
                target = (dest / member.filename).resolve()
                if not target.is_relative_to(dest):
                    raise DatasetError(f"{archive}: member {member.filename!r} would extract outside {dest}")
            zf.extractall(dest, members=members)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DatasetError(f"{archive}: corrupt zip archive ({exc})") from exc
    return [dest / m.filename for m in members if not m.is_dir()]


def _resource_ok(path: Path, resource: Resource) -> bool:
    """An existing file with matching checksums (with none published, existing is enough:
    :func:`fetch` validates the dataset by loading it)."""
    if not path.is_file():
        return False
    try:
        verify_checksum(path, resource.md5, resource.sha256)
    except DatasetError:
        return False
    return True


def _download_any(resource: Resource, part: Path, downloader: Downloader) -> None:
    """Try each mirror in turn; raise :class:`DatasetError` listing every failure."""
    errors = []
    for url in resource.urls:
        try:
            downloader(url, part)
            return
        except (OSError, ValueError) as exc:  # URLError is an OSError
            errors.append(f"  {url}: {exc}")
    part.unlink(missing_ok=True)
    raise DatasetError(f"could not download {resource.filename}:\n" + "\n".join(errors))


def fetch_resource(resource: Resource, dest_dir: Path, downloader: Downloader | None = None) -> Path:
    """Download one resource into ``dest_dir`` (unless a verified copy is there), check its
    checksums, and unpack it when it is an archive.  A failed download or checksum leaves
    no partial file behind.  ``downloader(url, dest)`` defaults to :func:`download`."""
    downloader = downloader or download
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / resource.filename
    if not _resource_ok(target, resource):
        part = dest_dir / (resource.filename + ".part")
        _download_any(resource, part, downloader)
        try:
            verify_checksum(part, resource.md5, resource.sha256)
        except DatasetError as exc:
            part.unlink(missing_ok=True)
            raise DatasetError(f"{resource.filename} from {resource.urls}: {exc}") from exc
        os.replace(part, target)
    if resource.unpack:
        unpack_zip(target, dest_dir)
    return target


def fetch_resources(
    resources: Sequence[Resource], dest_dir: str | Path, downloader: Downloader | None = None
) -> list[Path]:
    """:func:`fetch_resource` for each resource; returns the installed files."""
    return [fetch_resource(r, Path(dest_dir), downloader) for r in resources]


def fetch(name: str, data_dir: str | Path | None = None, downloader: Downloader | None = None) -> Path:
    """Download dataset ``name`` into ``<data_dir>/<name>/``, verify it, and return that folder.

    Files already present with the right checksum are not downloaded again.  After
    installation both splits are loaded once, so a structurally bad download is
    reported here rather than at first use.  ``digits`` ships with scikit-learn and
    needs no download.
    """
    _check_name(name)
    root = _root(data_dir)
    dest = root / name
    if RESOURCES[name]:
        _ensure_writable(root)
        fetch_resources(RESOURCES[name], dest, downloader)
    for split in SPLITS:
        _LOADERS[name](split, root)
    return dest


def _ensure_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create data directory {root}: {exc}") from exc
    if not os.access(root, os.W_OK):
        raise DatasetError(
            f"data directory {root} is not writable; choose another with --data-dir or ${ENV_DATA_DIR}"
        )


# --------------------------------------------------------------------------- inventory


@dataclass
class DatasetInfo:
    """What is installed of one dataset: the files found, their sizes, examples per split."""

    name: str
    present: bool
    files: list[tuple[Path, int]] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)
    problem: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def _idx_count(path: Path) -> int:
    """The example count from an IDX header (reads only the first bytes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(8)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read IDX header ({exc})") from exc
    if len(header) < 8:
        raise DatasetError(f"{path}: file too short for an IDX header")
    return struct.unpack(">I", header[4:8])[0]


def _count_examples(name: str, split: str, root: Path) -> tuple[list[Path], int]:
    """The files of one split and its example count, read cheaply (headers, not payloads)."""
    if name in ("mnist", "fashion_mnist"):
        paths = [_find_file(name, _idx_candidates(stem), root) for stem in IDX_FILES[split]]
        return paths, _idx_count(paths[0])
    if name == "svhn":
        import scipy.io

        path = _find_file("svhn", [f"{split}_32x32.mat"], root)
        try:
            shapes = {var: shape for var, shape, _ in scipy.io.whosmat(path)}
        except Exception as exc:  # scipy raises many types on bad files
            raise DatasetError(f"{path}: not a readable MATLAB file ({exc})") from exc
        if "X" not in shapes or len(shapes["X"]) != 4:
            raise DatasetError(f"{path}: no 4-D variable 'X'")
        return [path], int(shapes["X"][3])
    if name == "har":
        paths = [_find_har_file(split, stem, root) for stem in ("X", "y")]
        return paths, len(_read_text(paths[1]))
    return [], DIGITS_TRAIN_SIZE if split == "train" else 1797 - DIGITS_TRAIN_SIZE


def dataset_info(name: str, data_dir: str | Path | None = None) -> DatasetInfo:
    """Which files of ``name`` are present and how many examples each split holds."""
    _check_name(name)
    root = _root(data_dir)
    info = DatasetInfo(name=name, present=True)
    for split in SPLITS:
        try:
            paths, count = _count_examples(name, split, root)
        except DatasetError as exc:
            info.present = False
            info.problem = str(exc)
            continue
        info.examples[split] = count
        info.files.extend((p, p.stat().st_size) for p in paths)
    return info
