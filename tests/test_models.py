"""Tests of polytope.io.models: architectures, state-dict and pickled-model loading, errors,
and the released models' clean test error (paper Table 1)."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from polytope.io import data, models
from polytope.model.errors import DatasetError, ModelFileError, ModelModeError, UnsupportedLayerError

RELEASED_DIR = models.DEFAULT_MODELS_DIR
CONV_KEYS = ["0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias", "7.weight", "7.bias"]


@pytest.mark.parametrize(
    ("arch", "batch_shape", "n_out"),
    [
        ("mnist", (2, 1, 28, 28), 10),
        ("fashion_mnist", (2, 1, 28, 28), 10),
        ("svhn", (2, 3, 32, 32), 10),
        ("har", (2, 561), 6),
        ("mlp_784_500", (2, 1, 28, 28), 10),
        ("digits_mlp", (2, 64), 10),
    ],
)
def test_arch_shapes(arch: str, batch_shape: tuple[int, ...], n_out: int) -> None:
    model = models.build_arch(arch)
    assert isinstance(model, nn.Sequential)
    assert model(torch.zeros(batch_shape)).shape == (2, n_out)
    assert (2, *models.INPUT_SHAPES[arch]) == batch_shape


def test_conv_arch_indices_match_released_layout() -> None:
    for arch in ("mnist", "fashion_mnist", "svhn"):
        model = models.build_arch(arch)
        assert list(model.state_dict()) == CONV_KEYS
        assert isinstance(model[4], nn.Flatten)
        assert model[0].padding == (1, 1) and model[0].stride == (2, 2)
    assert list(models.build_arch("har").state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert models.build_arch("mlp_784_500")[1].in_features == 784
    assert models.build_arch("digits_mlp")[0].out_features == 500


def test_unknown_arch_lists_known() -> None:
    with pytest.raises(ModelFileError, match="known: mnist, fashion_mnist"):
        models.build_arch("resnet")


def test_state_dict_roundtrip(tmp_path: Path) -> None:
    source = models.build_arch("digits_mlp")
    path = tmp_path / "m.pth"
    torch.save(source.state_dict(), path)
    loaded = models.load_model(path, arch="digits_mlp")
    assert not loaded.training
    x = torch.rand(3, 64)
    assert torch.equal(loaded(x), source(x))


def test_checkpoint_wrapper_is_unwrapped(tmp_path: Path) -> None:
    source = models.build_arch("har")
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    loaded = models.load_model(path, arch="har")
    assert torch.equal(loaded[2].bias, source[2].bias)


def test_pickled_sequential(tmp_path: Path) -> None:
    source = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).train()
    path = tmp_path / "whole.pt"
    torch.save(source, path)
    loaded = models.load_model(path)
    assert isinstance(loaded, nn.Sequential) and not loaded.training
    x = torch.rand(5, 2, 2)
    assert torch.equal(loaded(x), source(x))


class Custom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_pickled_custom_class_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2), Custom()), path)
    with pytest.raises(ModelFileError, match=r"holds test_models\.Custom, which is not a tensor") as err:
        models.load_model(path)
    assert "trust" not in str(err.value)  # never suggest running an untrusted file to diagnose it
    loaded = models.load_model(path, trusted=True)
    assert isinstance(loaded[1], Custom)


def test_pickled_non_sequential_rejected(tmp_path: Path) -> None:
    path = tmp_path / "linear.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(ModelFileError, match=r"expected an nn\.Sequential"):
        models.load_model(path)


def test_state_dict_without_arch(tmp_path: Path) -> None:
    path = tmp_path / "sd.pth"
    torch.save(models.build_arch("har").state_dict(), path)
    with pytest.raises(ModelFileError, match=r"give its architecture \(--arch, arch=\)"):
        models.load_model(path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found") as info:
        models.load_model(tmp_path / "absent.pth", arch="mnist")
    assert str(tmp_path / "absent.pth") in str(info.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a torch file at all" * 10)
    with pytest.raises(ModelFileError) as info:
        models.load_model(junk, arch="mnist")
    assert str(junk) in str(info.value)


def test_key_mismatch_lists_keys(tmp_path: Path) -> None:
    state = OrderedDict(models.build_arch("har").state_dict())
    state["9.weight"] = state.pop("2.weight")
    path = tmp_path / "bad_keys.pth"
    torch.save(state, path)
    with pytest.raises(ModelFileError) as info:
        models.load_model(path, arch="har")
    message = str(info.value)
    assert "missing ['2.weight']" in message and "unexpected ['9.weight']" in message


def test_shape_mismatch_names_tensor_and_shapes(tmp_path: Path) -> None:
    state = models.build_arch("har").state_dict()
    state["0.weight"] = torch.zeros(500, 560)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(ModelFileError, match=r"'0.weight' has shape \(500, 560\).*\(500, 561\)"):
        models.load_model(path, arch="har")


def test_released_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert models.released_model_path("mnist", tmp_path) == tmp_path / "mnist.pth"
    monkeypatch.setenv(models.ENV_MODELS_DIR, str(tmp_path / "env"))
    assert models.released_model_path("har") == tmp_path / "env" / "har.pth"
    monkeypatch.delenv(models.ENV_MODELS_DIR)
    assert models.released_model_path("svhn") == RELEASED_DIR / "svhn.pth"
    with pytest.raises(ModelFileError, match="released: mnist"):
        models.released_model_path("cifar")


def _released(name: str) -> nn.Sequential:
    path = models.released_model_path(name, RELEASED_DIR)
    if not path.is_file():
        pytest.skip(f"released model {name} not found at {path}")
    return models.load_model(path, arch=name)


@pytest.mark.parametrize("name", models.RELEASED_MODELS)
def test_released_models_load(name: str) -> None:
    model = _released(name)
    assert not model.training
    x = torch.rand(2, *models.INPUT_SHAPES[name])
    assert torch.isfinite(model(x)).all()


def _clean_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) != y).float().mean())


@pytest.mark.data
def test_released_mnist_clean_error_is_1_80_percent() -> None:
    model = _released("mnist")
    if not (data.REPO_DEFAULT_DATA_DIR / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found in {data.REPO_DEFAULT_DATA_DIR / 'mnist'}")
    x, y = data.load_dataset("mnist", "test", data_dir=data.REPO_DEFAULT_DATA_DIR)
    assert len(y) == 10000
    assert _clean_error(model, x, y) == pytest.approx(0.0180, abs=5e-5)  # paper Table 1: 1.80%


@pytest.mark.data
def test_released_fashion_clean_error_is_21_73_percent(tmp_path: Path) -> None:
    model = _released("fashion_mnist")
    try:  # an empty data dir: the loader falls back to Debian's /usr/share/datasets/fashion-mnist
        x, y = data.load_dataset("fashion_mnist", "test", data_dir=tmp_path)
    except DatasetError as exc:
        pytest.skip(f"Fashion-MNIST not found: {str(exc).splitlines()[0]}")
    assert len(y) == 10000
    assert _clean_error(model, x, y) == pytest.approx(0.2173, abs=5e-5)  # paper Table 1: 21.73%


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"model": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError, match=r"holds (posix|os|nt)\.system, which is not a tensor") as err:
        models.load_model(tmp_path / "evil.pt")
    assert not marker.exists() and "trust" not in str(err.value)


def test_unsupported_torch_layer_is_named_with_its_index(tmp_path: Path) -> None:
    inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    torch.save(nn.Sequential(nn.Flatten(), inner, nn.ReLU(), nn.Linear(4, 2)), tmp_path / "tanh.pt")
    with pytest.raises(UnsupportedLayerError, match=r"unsupported layer Tanh at index 1\.1"):
        models.load_model(tmp_path / "tanh.pt")


def test_batch_norm_in_training_mode_is_switched_or_refused(tmp_path: Path) -> None:
    source = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).train()
    torch.save(source, tmp_path / "bn.pt")
    assert not models.load_model(tmp_path / "bn.pt").training
    with pytest.raises(ModelModeError, match=r"layer 1 \(BatchNorm1d\) was saved in training mode"):
        models.load_model(tmp_path / "bn.pt", refuse_training=True)


def test_random_bytes_are_not_a_torch_file(tmp_path: Path) -> None:
    (tmp_path / "noise.pt").write_bytes(bytes(range(7, 256)) * 8)
    with pytest.raises(ModelFileError, match="not a torch file"):
        models.load_model(tmp_path / "noise.pt")
