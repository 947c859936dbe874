"""Tests of polytope.io.data: directory resolution, every loader on synthetic files,
every validation error, checksum verification, unpacking, fetching, and the CLI."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from polytope.commands import data as data_cmd
from polytope.io import data
from polytope.model.errors import DatasetError

REAL_MNIST = data.REPO_DEFAULT_DATA_DIR / "mnist"
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------ helpers


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file for a uint8 array (header announcing its shape)."""
    magic = magic if magic is not None else (0x800 | array.ndim)
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image_stem, label_stem = data.IDX_FILES[split]
    (folder / f"{image_stem}.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (folder / f"{label_stem}.gz").write_bytes(gzip.compress(idx_bytes(labels)))


def synthetic_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


@pytest.fixture
def mnist_root(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    images, labels = synthetic_images(7)
    write_idx_split(tmp_path / "mnist", "test", images, labels)
    write_idx_split(tmp_path / "mnist", "train", *synthetic_images(5, seed=1))
    return tmp_path, images, labels


@pytest.fixture(autouse=True)
def no_system_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Synthetic tests must not see the machine's Debian copies unless they ask to."""
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"mnist": (), "fashion_mnist": ()})


# ------------------------------------------------------------------ data_dir


def test_data_dir_explicit_beats_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "env"))
    assert data.data_dir(tmp_path / "cli") == (tmp_path / "cli").resolve()
    assert data.data_dir(None) == (tmp_path / "env").resolve()


def test_data_dir_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    monkeypatch.setattr(data, "REPO_DEFAULT_DATA_DIR", tmp_path)
    assert data.data_dir(None) == tmp_path.resolve()
    monkeypatch.setattr(data, "REPO_DEFAULT_DATA_DIR", tmp_path / "absent")
    monkeypatch.setattr(data, "HOME_DEFAULT_DATA_DIR", tmp_path / "home")
    assert data.data_dir(None) == (tmp_path / "home").resolve()


# ------------------------------------------------------------------ IDX loaders


def test_mnist_synthetic_roundtrip(mnist_root: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, images, labels = mnist_root
    x, y = data.load_dataset("mnist", "test", data_dir=root)
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    np.testing.assert_allclose(x[:, 0].numpy(), images / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(y.numpy(), labels)
    x_train, _ = data.load_dataset("mnist", "train", data_dir=root)
    assert x_train.shape[0] == 5


def test_limit_keeps_first_examples(mnist_root: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, _, labels = mnist_root
    x, y = data.load_dataset("mnist", "test", data_dir=root, limit=3)
    assert x.shape[0] == 3
    np.testing.assert_array_equal(y.numpy(), labels[:3])
    with pytest.raises(DatasetError, match="limit"):
        data.load_dataset("mnist", "test", data_dir=root, limit=-1)


def test_uncompressed_idx_is_accepted(tmp_path: Path) -> None:
    images, labels = synthetic_images(4)
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    x, y = data.load_dataset("mnist", data_dir=tmp_path)
    assert x.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_unknown_name_and_split() -> None:
    with pytest.raises(DatasetError, match="known datasets: mnist"):
        data.load_dataset("cifar")
    with pytest.raises(DatasetError, match="split"):
        data.load_dataset("digits", split="validation")


def test_missing_file_names_places_and_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        data.load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz") in message
    assert "polytope data fetch mnist" in message


def test_fashion_falls_back_to_system_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "usr-share"
    images, labels = synthetic_images(6)
    write_idx_split(system, "test", images, labels)
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"mnist": (), "fashion_mnist": (system,)})
    x, y = data.load_dataset("fashion_mnist", data_dir=tmp_path / "data")
    assert x.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(y.numpy(), labels)
    # the data directory wins over the system copy
    write_idx_split(tmp_path / "data" / "fashion_mnist", "test", *synthetic_images(2, seed=3))
    assert data.load_dataset("fashion_mnist", data_dir=tmp_path / "data")[0].shape[0] == 2


def test_fashion_missing_lists_both_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "usr-share"
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"mnist": (), "fashion_mnist": (system,)})
    with pytest.raises(DatasetError) as info:
        data.load_dataset("fashion_mnist", data_dir=tmp_path / "data")
    message = str(info.value)
    assert str(tmp_path / "data" / "fashion_mnist") in message and str(system) in message
    assert "polytope data fetch fashion_mnist" in message


def _replace(root: Path, split: str, which: int, content: bytes) -> Path:
    path = root / "mnist" / f"{data.IDX_FILES[split][which]}.gz"
    path.write_bytes(content)
    return path


def test_bad_magic(mnist_root: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, images, _ = mnist_root
    path = _replace(root, "test", 0, gzip.compress(idx_bytes(images, magic=0x00000801 + 0x10)))
    with pytest.raises(DatasetError, match="magic") as info:
        data.load_dataset("mnist", data_dir=root)
    assert str(path) in str(info.value)


def test_truncated_gzip(mnist_root: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, images, _ = mnist_root
    blob = gzip.compress(idx_bytes(images))
    path = _replace(root, "test", 0, blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="gzip") as info:
        data.load_dataset("mnist", data_dir=root)
    assert str(path) in str(info.value)


def test_corrupt_gzip(mnist_root: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, images, _ = mnist_root
    blob = bytearray(gzip.compress(idx_bytes(images)))
    blob[20:40] = b"\xff" * 20
    _replace(root, "test", 0, bytes(blob))
    with pytest.raises(DatasetError, match="gzip"):
        data.load_dataset("mnist", data_dir=root)
    _replace(root, "test", 0, b"this is not gzip at all")
    with pytest.raises(DatasetError, match="not a gzip"):
        data.load_dataset("mnist", data_dir=root)


def test_truncated_payload(mnist_root: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, images, _ = mnist_root
    _replace(root, "test", 0, gzip.compress(idx_bytes(images)[:-100]))
    with pytest.raises(DatasetError, match="truncated"):
        data.load_dataset("mnist", data_dir=root)


def test_count_mismatch(mnist_root: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, _, labels = mnist_root
    path = _replace(root, "test", 1, gzip.compress(idx_bytes(labels[:-1])))
    with pytest.raises(DatasetError, match="7 examples but") as info:
        data.load_dataset("mnist", data_dir=root)
    assert str(path) in str(info.value)


def test_labels_out_of_range(mnist_root: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, _, labels = mnist_root
    bad = labels.copy()
    bad[2] = 10
    _replace(root, "test", 1, gzip.compress(idx_bytes(bad)))
    with pytest.raises(DatasetError, match="out of range"):
        data.load_dataset("mnist", data_dir=root)


def test_wrong_image_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 27, 28), dtype=np.uint8)
    write_idx_split(tmp_path / "mnist", "test", images, np.zeros(3, np.uint8))
    with pytest.raises(DatasetError, match="27x28"):
        data.load_dataset("mnist", data_dir=tmp_path)


# ------------------------------------------------------------------ SVHN


def write_svhn(root: Path, split: str, X: np.ndarray, y: np.ndarray) -> Path:
    folder = root / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}_32x32.mat"
    scipy.io.savemat(path, {"X": X, "y": y})
    return path


def test_svhn_layout_and_label_ten(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [5], [9], [10]], dtype=np.uint8)
    write_svhn(tmp_path, "test", X, y)
    x, labels = data.load_dataset("svhn", data_dir=tmp_path)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert labels.tolist() == [0, 1, 5, 9, 0]
    # pixel (row 4, col 7) of channel 2 of example 3
    assert x[3, 2, 4, 7].item() == pytest.approx(X[4, 7, 2, 3] / 255.0)


def test_svhn_errors(tmp_path: Path) -> None:
    X = np.zeros((32, 32, 3, 2), dtype=np.uint8)
    write_svhn(tmp_path, "test", X, np.array([[0], [3]], dtype=np.uint8))
    with pytest.raises(DatasetError, match="out of range"):
        data.load_dataset("svhn", data_dir=tmp_path)
    write_svhn(tmp_path, "test", np.zeros((28, 28, 3, 2), np.uint8), np.array([[1], [3]], np.uint8))
    with pytest.raises(DatasetError, match="expected \\(32, 32, 3, N\\)"):
        data.load_dataset("svhn", data_dir=tmp_path)
    write_svhn(tmp_path, "test", X, np.array([[1], [2], [3]], np.uint8))
    with pytest.raises(DatasetError, match="2 examples but"):
        data.load_dataset("svhn", data_dir=tmp_path)
    path = tmp_path / "svhn" / "test_32x32.mat"
    path.write_bytes(b"garbage" * 20)
    with pytest.raises(DatasetError, match="MATLAB") as info:
        data.load_dataset("svhn", data_dir=tmp_path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------ HAR


def write_har(root: Path, split: str, x: np.ndarray, y: np.ndarray) -> Path:
    folder = root / "har" / data.HAR_FOLDER / split
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["  " + " ".join(f"{v: .8e}" for v in row) for row in x]
    (folder / f"X_{split}.txt").write_text("\n".join(lines) + "\n")
    (folder / f"y_{split}.txt").write_text("\n".join(str(int(v)) for v in y) + "\n")
    return folder


def test_har_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(4, 561))
    write_har(tmp_path, "train", x, np.array([1, 6, 3, 2]))
    xt, yt = data.load_dataset("har", "train", data_dir=tmp_path)
    assert xt.shape == (4, 561) and xt.dtype == torch.float32
    assert yt.tolist() == [0, 5, 2, 1]
    np.testing.assert_allclose(xt.numpy(), x, rtol=1e-6)


def test_har_errors(tmp_path: Path) -> None:
    x = np.zeros((3, 561))
    folder = write_har(tmp_path, "test", x, np.array([1, 7, 2]))
    with pytest.raises(DatasetError, match="out of range"):
        data.load_dataset("har", data_dir=tmp_path)
    write_har(tmp_path, "test", x, np.array([1, 2]))
    with pytest.raises(DatasetError, match="3 examples but"):
        data.load_dataset("har", data_dir=tmp_path)
    write_har(tmp_path, "test", x, np.array([1, 2, 3]))
    with open(folder / "X_test.txt", "a") as handle:
        handle.write(" ".join(["0.5"] * 560) + "\n")
    with pytest.raises(DatasetError, match="line 4 has 560 values, expected 561"):
        data.load_dataset("har", data_dir=tmp_path)
    with pytest.raises(DatasetError, match="polytope data fetch har"):
        data.load_dataset("har", "train", data_dir=tmp_path)


# ------------------------------------------------------------------ digits


def test_digits_split_is_fixed_and_covers_all() -> None:
    x_train, y_train = data.load_dataset("digits", "train")
    x_test, y_test = data.load_dataset("digits", "test")
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
    assert float(x_train.min()) >= 0.0 and float(x_train.max()) <= 1.0
    assert float(x_train.max()) == 1.0
    again, _ = data.load_dataset("digits", "train")
    assert torch.equal(again, x_train)
    # together the two splits are exactly sklearn's 1797 examples
    from sklearn.datasets import load_digits

    both = torch.cat([x_train, x_test]).numpy() * 16
    reference = load_digits().data
    assert sorted(map(bytes, both.astype(np.uint8))) == sorted(map(bytes, reference.astype(np.uint8)))
    assert sorted(torch.cat([y_train, y_test]).tolist()) == sorted(load_digits().target.tolist())


# ------------------------------------------------------------------ real files


MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.data
def test_real_mnist_test_set() -> None:
    if not (REAL_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found in {REAL_MNIST}")
    x, y = data.load_dataset("mnist", "test", data_dir=REAL_MNIST.parent)
    assert x.shape == (10000, 1, 28, 28)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TEST_COUNTS


@pytest.mark.data
def test_real_fashion_mnist_from_debian_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not (REAL_FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not found in {REAL_FASHION} (apt-get install dataset-fashion-mnist)")
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"mnist": (), "fashion_mnist": (REAL_FASHION,)})
    x, y = data.load_dataset("fashion_mnist", "test", data_dir=tmp_path)
    assert x.shape == (10000, 1, 28, 28)
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10


# ------------------------------------------------------------------ checksums, unpacking, fetch


def test_verify_checksum_accepts_good_and_rejects_bad(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(b"polytope" * 100)
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    data.verify_checksum(path, md5=md5, sha256=sha)
    data.verify_checksum(path, md5=md5.upper())
    with pytest.raises(DatasetError, match="md5 checksum mismatch") as info:
        data.verify_checksum(path, md5="0" * 32)
    assert str(path) in str(info.value)
    with pytest.raises(DatasetError, match="sha256 checksum mismatch"):
        data.verify_checksum(path, md5=md5, sha256="f" * 64)
    with pytest.raises(DatasetError, match="not found"):
        data.verify_checksum(tmp_path / "absent", md5=md5)


def test_unpack_zip_and_refuse_traversal(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("UCI HAR Dataset/test/y_test.txt", "1\n2\n")
        zf.writestr("__MACOSX/UCI HAR Dataset/._junk", "x")
    files = data.unpack_zip(archive, tmp_path / "out")
    assert files == [tmp_path / "out" / "UCI HAR Dataset/test/y_test.txt"]
    assert (tmp_path / "out" / "UCI HAR Dataset" / "test" / "y_test.txt").read_text() == "1\n2\n"
    assert not (tmp_path / "out" / "__MACOSX").exists()

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escaped.txt", "x")
    with pytest.raises(DatasetError, match="outside"):
        data.unpack_zip(evil, tmp_path / "out2")
    assert not (tmp_path / "escaped.txt").exists()

    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DatasetError, match="corrupt zip"):
        data.unpack_zip(broken, tmp_path / "out3")


def test_download_file_url(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(b"abc" * 1000)
    dest = tmp_path / "dest.bin"
    data.download(source.as_uri(), dest)
    assert dest.read_bytes() == source.read_bytes()


def copying_downloader(sources: dict[str, Path]):
    """A downloader that serves URLs from local files (no network in tests)."""
    calls: list[str] = []

    def downloader(url: str, dest: Path) -> None:
        calls.append(url)
        if url not in sources:
            raise OSError(f"unreachable {url}")
        shutil.copyfile(sources[url], dest)

    downloader.calls = calls  # type: ignore[attr-defined]
    return downloader


def test_fetch_resources_verifies_and_falls_back_to_mirror(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    good.write_bytes(b"payload")
    md5 = hashlib.md5(b"payload").hexdigest()
    resource = data.Resource("f.bin", ("http://down/f.bin", "http://mirror/f.bin"), md5=md5)
    downloader = copying_downloader({"http://mirror/f.bin": good})
    dest = tmp_path / "dest"
    assert data.fetch_resources([resource], dest, downloader) == [dest / "f.bin"]
    assert (dest / "f.bin").read_bytes() == b"payload"
    assert downloader.calls == ["http://down/f.bin", "http://mirror/f.bin"]
    # a verified copy is not downloaded again
    data.fetch_resources([resource], dest, downloader)
    assert len(downloader.calls) == 2


def test_fetch_resources_rejects_bad_checksum_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"tampered")
    resource = data.Resource("f.bin", ("http://x/f.bin",), md5=hashlib.md5(b"payload").hexdigest())
    dest = tmp_path / "dest"
    with pytest.raises(DatasetError, match="checksum mismatch"):
        data.fetch_resources([resource], dest, copying_downloader({"http://x/f.bin": bad}))
    assert list(dest.iterdir()) == []


def test_fetch_resources_all_mirrors_down(tmp_path: Path) -> None:
    resource = data.Resource("f.bin", ("http://a/f.bin", "http://b/f.bin"), md5="0" * 32)
    with pytest.raises(DatasetError) as info:
        data.fetch_resources([resource], tmp_path, copying_downloader({}))
    assert "http://a/f.bin" in str(info.value) and "http://b/f.bin" in str(info.value)


def test_fetch_har_unpacks_and_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = tmp_path / "staging"
    for split, n in (("train", 3), ("test", 2)):
        write_har(staging, split, np.full((n, 561), 0.25), np.arange(1, n + 1))
    archive = tmp_path / "UCI HAR Dataset.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in (staging / "har").rglob("*.txt"):
            zf.write(path, path.relative_to(staging / "har").as_posix())
    monkeypatch.setattr(
        data,
        "RESOURCES",
        {**data.RESOURCES, "har": (data.Resource(archive.name, ("http://uci/har.zip",), unpack=True),)},
    )
    root = tmp_path / "data"
    dest = data.fetch("har", root, copying_downloader({"http://uci/har.zip": archive}))
    assert dest == root / "har"
    x, y = data.load_dataset("har", "train", data_dir=root)
    assert x.shape == (3, 561) and y.tolist() == [0, 1, 2]


@pytest.mark.data
def test_fetch_mnist_with_official_checksums(tmp_path: Path) -> None:
    """fetch('mnist') end to end: the 'download' serves the shared copies, which must
    match the official md5s hard-coded in RESOURCES."""
    if not (REAL_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found in {REAL_MNIST}")
    sources = {url: REAL_MNIST / r.filename for r in data.RESOURCES["mnist"] for url in r.urls}
    dest = data.fetch("mnist", tmp_path, copying_downloader(sources))
    assert sorted(p.name for p in dest.iterdir()) == sorted(r.filename for r in data.RESOURCES["mnist"])


def test_fetch_refuses_unwritable_dir(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if (locked / "probe").exists() or _can_write(locked):
            pytest.skip("running as a user that ignores directory permissions")
        with pytest.raises(DatasetError, match="not writable"):
            data.fetch("mnist", locked, copying_downloader({}))
    finally:
        locked.chmod(0o700)


def _can_write(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


def test_dataset_info(mnist_root: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, _, _ = mnist_root
    info = data.dataset_info("mnist", root)
    assert info.present and info.examples == {"test": 7, "train": 5}
    assert len(info.files) == 4 and info.total_bytes == sum(p.stat().st_size for p, _ in info.files)
    missing = data.dataset_info("svhn", root)
    assert not missing.present and "polytope data fetch svhn" in (missing.problem or "")


# ------------------------------------------------------------------ CLI


def make_cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polytope")
    data_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_info(mnist_root: tuple[Path, np.ndarray, np.ndarray], capsys: pytest.CaptureFixture) -> None:
    root, _, _ = mnist_root
    args = make_cli().parse_args(["data", "info", "--data-dir", str(root)])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    mnist_line = next(line for line in out.splitlines() if line.startswith("mnist"))
    assert "present" in mnist_line and "train 5" in mnist_line and "test 7" in mnist_line
    assert any(line.startswith("svhn") and "missing" in line for line in out.splitlines())
    assert str(root) in out


def test_cli_fetch_reports_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "download", copying_downloader({}))
    args = make_cli().parse_args(["data", "fetch", "svhn", "--data-dir", str(tmp_path)])
    assert data_cmd.run(args) == 1
    assert "could not download" in capsys.readouterr().err
    args = make_cli().parse_args(["data", "fetch", "digits", "--data-dir", str(tmp_path)])
    assert data_cmd.run(args) == 0
    with pytest.raises(SystemExit):
        make_cli().parse_args(["data", "fetch", "cifar"])
