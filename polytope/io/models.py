"""The paper's architectures and its released robust weights.

Module indices match the state dicts released with locuslab/convex_adversarial:
conv models hold ``0, 2`` (convolutions), ``4`` (Flatten), ``5, 7`` (linear layers);
the HAR model holds ``0, 2``.  Inputs are raw ``[0, 1]`` pixels (no normalisation).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from polytope.model.errors import ModelFileError

ENV_MODELS_DIR = "POLYTOPE_MODELS"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS_DIR = REPO_ROOT.parent / "shared" / "models" / "wong_kolter_2018"
RELEASED_MODELS: tuple[str, ...] = ("mnist", "fashion_mnist", "svhn", "har")

# Module classes a whole pickled model may contain; anything else needs ``trusted=True``.
SAFE_MODULES: tuple[type, ...] = (
    nn.Sequential,
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
)


def _small_conv(in_channels: int, side: int) -> nn.Sequential:
    """Two stride-2 4x4 convolutions (16, 32 channels), then 100 hidden units and 10 logits."""
    flat = 32 * (side // 4) * (side // 4)
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def _mlp(n_in: int, hidden: int, n_out: int, flatten: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    layers += [nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out)]
    return nn.Sequential(*layers)


ARCHITECTURES: dict[str, Callable[[], nn.Sequential]] = {
    "mnist": lambda: _small_conv(1, 28),
    "fashion_mnist": lambda: _small_conv(1, 28),
    "svhn": lambda: _small_conv(3, 32),
    "har": lambda: _mlp(561, 500, 6),
    "mlp_784_500": lambda: _mlp(784, 500, 10, flatten=True),
    "digits_mlp": lambda: _mlp(64, 500, 10),
}

# Per-example input shape each architecture expects (matching polytope.io.data's loaders).
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "svhn": (3, 32, 32),
    "har": (561,),
    "mlp_784_500": (1, 28, 28),
    "digits_mlp": (64,),
}


def _check_arch(name: str) -> None:
    if name not in ARCHITECTURES:
        raise ModelFileError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")


def build_arch(name: str) -> nn.Sequential:
    """A freshly initialised model of architecture ``name`` (see :data:`ARCHITECTURES`)."""
    _check_arch(name)
    return ARCHITECTURES[name]()


def released_model_path(name: str, models_dir: str | Path | None = None) -> Path:
    """``<dir>/<name>.pth`` with ``dir`` = ``models_dir``, else ``$POLYTOPE_MODELS``,
    else ``../shared/models/wong_kolter_2018`` next to the repository.  Not checked for existence."""
    if name not in RELEASED_MODELS:
        raise ModelFileError(f"no released model {name!r}; released: {', '.join(RELEASED_MODELS)}")
    base = models_dir if models_dir is not None else os.environ.get(ENV_MODELS_DIR) or DEFAULT_MODELS_DIR
    return Path(base).expanduser() / f"{name}.pth"


def load_released(name: str, models_dir: str | Path | None = None) -> nn.Sequential:
    """The released robust model ``name`` (its architecture has the same name), in eval mode."""
    return load_model(released_model_path(name, models_dir), arch=name)


def _torch_load(path: Path, trusted: bool) -> object:
    """``torch.load`` on CPU: weights-only (tensors plus :data:`SAFE_MODULES`) unless trusted."""
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(list(SAFE_MODULES)):
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_file(path: Path, trusted: bool) -> object:
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        return _torch_load(path, trusted)
    except pickle.UnpicklingError as exc:
        if trusted:
            raise ModelFileError(f"{path}: cannot unpickle model file ({exc})") from exc
        raise ModelFileError(
            f"{path}: holds objects outside the weights-only allow-list "
            f"({str(exc).strip().splitlines()[-1]}); if you trust the file, load it with trusted=True"
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError, AttributeError, ImportError) as exc:
        raise ModelFileError(f"{path}: unreadable model file ({type(exc).__name__}: {exc})") from exc


def _as_state_dict(obj: object) -> Mapping[str, torch.Tensor] | None:
    """``obj`` as a state dict (also unwrapping ``{"state_dict": ...}``), or None if it is not one."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
        return obj
    return None


def check_state_dict(model: nn.Module, state: Mapping[str, object], source: str = "state dict") -> None:
    """Raise :class:`ModelFileError` unless ``state`` has exactly ``model``'s keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelFileError(
            f"{source}: keys do not match the architecture: missing {missing}, unexpected {unexpected}"
        )
    for key, tensor in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise ModelFileError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.shape != tensor.shape:
            raise ModelFileError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}, "
                f"the architecture needs {tuple(tensor.shape)}"
            )


def load_model(path: str | Path, arch: str | None = None, trusted: bool = False) -> nn.Sequential:
    """Load a model in eval mode.

    With ``arch``, ``path`` holds a state dict for :func:`build_arch` ``(arch)``; keys and
    shapes must match exactly.  Without ``arch``, ``path`` holds a whole pickled
    :class:`torch.nn.Sequential`.  Files are read weights-only (tensors and the standard
    layers in :data:`SAFE_MODULES`); ``trusted=True`` allows arbitrary pickles, which can
    run code -- only for files you trust.  Every failure raises :class:`ModelFileError`.
    """
    path = Path(path)
    if arch is not None:
        _check_arch(arch)
    obj = _read_file(path, trusted)
    state = _as_state_dict(obj)
    if arch is None:
        if state is not None:
            raise ModelFileError(f"{path}: holds a state dict; pass arch= one of {', '.join(ARCHITECTURES)}")
        if not isinstance(obj, nn.Sequential):
            raise ModelFileError(f"{path}: holds a {type(obj).__name__}, expected an nn.Sequential")
        return obj.eval()
    if state is None:
        raise ModelFileError(f"{path}: holds a {type(obj).__name__}, expected a state dict for {arch!r}")
    model = build_arch(arch)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state, strict=True)
    return model.eval()
