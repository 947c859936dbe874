"""The paper's architectures and its released robust weights.

Module indices match the state dicts released with locuslab/convex_adversarial:
conv models hold ``0, 2`` (convolutions), ``4`` (Flatten), ``5, 7`` (linear layers);
the HAR model holds ``0, 2``.  Inputs are raw ``[0, 1]`` pixels (no normalisation).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from polytope.model.errors import ModelFileError, ModelModeError, UnsupportedLayerError

ENV_MODELS_DIR = "POLYTOPE_MODELS"
REPO_ROOT = Path(__file__).resolve().parents[2]  # polytope/io/<module>.py -> the repository
DEFAULT_MODELS_DIR = REPO_ROOT.parent / "shared" / "models" / "wong_kolter_2018"
RELEASED_MODELS: tuple[str, ...] = ("mnist", "fashion_mnist", "svhn", "har")

# Module classes a whole pickled model may contain when read weights-only (other torch layers are named
# in the error, anything else refused; ``trusted=True`` reads arbitrary pickles).
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


def build_arch(name: str) -> nn.Module:
    """A freshly initialised model of architecture ``name``.

    ``name`` is one of :data:`ARCHITECTURES`, or ``module:function`` / ``path/to/file.py:function``
    naming a function of no arguments that returns the user's model: an ``nn.Sequential`` or any
    module ``torch.fx`` can trace into a ReLU graph (the file is run as Python: it is the user's own code).
    """
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]()
    if ":" not in name:
        _check_arch(name)
    return _user_arch(name)


def _import_arch_module(spec: str, where: str) -> ModuleType:
    if not where.endswith(".py"):
        try:
            return importlib.import_module(where)
        except ImportError as exc:
            raise ModelFileError(f"--arch {spec}: cannot import module {where!r} ({exc})") from exc
    path = Path(where)
    if not path.is_file():
        raise ModelFileError(f"--arch {spec}: file {where} not found")
    module_spec = importlib.util.spec_from_file_location(f"_polytope_arch_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelFileError(f"--arch {spec}: running {where} raised {type(exc).__name__}: {exc}") from exc
    return module


def _user_arch(spec: str) -> nn.Module:
    """The model returned by the function that ``module:function`` or ``file.py:function`` names."""
    where, _, function = spec.rpartition(":")
    if not where or not function.isidentifier():
        raise ModelFileError(f"--arch {spec}: expected NAME, module:function or file.py:function")
    builder = getattr(_import_arch_module(spec, where), function, None)
    if not callable(builder):
        raise ModelFileError(f"--arch {spec}: {where} has no function {function!r}")
    try:
        model = builder()
    except Exception as exc:
        raise ModelFileError(f"--arch {spec}: {function}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"--arch {spec}: {function}() returned a {type(model).__name__}, not an nn.Module")
    return model


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


#: ``Unsupported global: GLOBAL torch.nn.modules.activation.Sigmoid was not an allowed global`` (or, for a
#: blocked module, ``Trying to load unsupported GLOBAL posix.system whose module posix is blocked``)
_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
#: Layer classes a pickled model may name beyond :data:`SAFE_MODULES`: read as placeholders only.
_LAYER_MODULE_PREFIX = "torch.nn.modules."
_MAX_PLACEHOLDERS = 32


class UnsupportedLayerPlaceholder(nn.Module):
    """Stands in, while a pickled model is read weights-only, for a torch layer outside :data:`SAFE_MODULES`.

    Nothing of the file is executed: the placeholder only records the layer's class name, so the
    error can say which layer (``Sigmoid``) at which index is unsupported.
    """

    layer_name = "?"


def _placeholder(full_name: str) -> tuple[type, str]:
    cls = type("UnsupportedLayerPlaceholder", (UnsupportedLayerPlaceholder,),
               {"layer_name": full_name.rsplit(".", 1)[-1]})
    return cls, full_name


def _not_a_torch_file(path: Path) -> bool:
    """Neither a zip archive (``torch.save``'s format) nor a pickle (the legacy format, opcode PROTO)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return not zipfile.is_zipfile(path) and not head.startswith(b"\x80")


def _torch_load(path: Path, trusted: bool) -> object:
    """``torch.load`` on CPU: weights-only (tensors plus :data:`SAFE_MODULES`) unless trusted.

    Other torch layers in a pickled model are read as :class:`UnsupportedLayerPlaceholder`
    (named later by :func:`_reject_placeholders`); any other global is refused.
    """
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    placeholders: list[tuple[type, str]] = []
    while True:
        with torch.serialization.safe_globals([*SAFE_MODULES, *placeholders]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                found = _UNSUPPORTED_GLOBAL.search(str(exc))
                if found is None:
                    raise ModelFileError(f"{path}: not a readable torch file ({_last_line(exc)})") from exc
                name = found.group(1)
                if not name.startswith(_LAYER_MODULE_PREFIX) or len(placeholders) >= _MAX_PLACEHOLDERS:
                    raise ModelFileError(
                        f"{path}: holds {name}, which is not a tensor or a supported torch layer "
                        "(save a state dict and pass --arch to build the model)"
                    ) from exc
                placeholders.append(_placeholder(name))


def _last_line(exc: BaseException) -> str:
    """The line of a torch.load error that names the problem (not its advice on ``weights_only``)."""
    boilerplate = ("weights_only", "Check the documentation", "file an issue", "load failed")
    lines = [line.strip() for line in str(exc).strip().splitlines()
             if line.strip() and not any(b in line for b in boilerplate)]
    return lines[-1] if lines else type(exc).__name__


def _reject_placeholders(path: Path, model: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` naming the first placeholder layer of ``model`` and its index."""
    for index, module in model.named_modules():
        if isinstance(module, UnsupportedLayerPlaceholder):
            raise UnsupportedLayerError(
                f"{path}: unsupported layer {module.layer_name} at index {index}; polytope bounds chains of "
                "Linear, Conv2d, Flatten, ReLU (and eval-mode BatchNorm, Dropout, polytope.Normalize)"
            )


def _read_file(path: Path, trusted: bool) -> object:
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if _not_a_torch_file(path):
        raise ModelFileError(
            f"{path}: not a torch file (neither a torch.save zip archive nor a pickle; corrupted or truncated?)"
        )
    try:
        return _torch_load(path, trusted)
    except ModelFileError:
        raise
    except pickle.UnpicklingError as exc:
        raise ModelFileError(f"{path}: cannot unpickle model file ({_last_line(exc)})") from exc
    except (OSError, RuntimeError, EOFError, ValueError, AttributeError, ImportError) as exc:
        raise ModelFileError(f"{path}: corrupted or unreadable torch file ({type(exc).__name__}: {exc})") from exc


def batch_norms_in_training(model: nn.Module) -> list[str]:
    """``"index (BatchNorm2d)"`` of every batch norm of ``model`` in training mode (it would use batch statistics)."""
    return [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


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


def load_model(
    path: str | Path, arch: str | None = None, trusted: bool = False, refuse_training: bool = False,
) -> nn.Sequential:
    """Load a model in eval mode.

    With ``arch`` (see :func:`build_arch`), ``path`` holds a state dict for ``build_arch(arch)``;
    keys and shapes must match exactly.  Without ``arch``, ``path`` holds a whole pickled
    :class:`torch.nn.Sequential`.  Files are read weights-only (tensors and the standard
    layers in :data:`SAFE_MODULES`; another torch layer is named in the error); ``trusted=True``
    allows arbitrary pickles, which can run code -- only for files you trust.  A pickled model
    whose batch norms were saved in training mode is switched to eval mode (running statistics),
    or refused with :class:`ModelModeError` if ``refuse_training``.  Every other failure raises
    :class:`ModelFileError` (or :class:`UnsupportedLayerError`).
    """
    path = Path(path)
    if arch is not None and arch not in ARCHITECTURES and ":" not in arch:
        _check_arch(arch)
    obj = _read_file(path, trusted)
    state = _as_state_dict(obj)
    if arch is None:
        if state is not None:
            raise ModelFileError(f"{path}: holds a state dict; give its architecture (--arch, arch=): one of "
                                 f"{', '.join(ARCHITECTURES)}, or module:function / file.py:function building it")
        if not isinstance(obj, nn.Sequential if not trusted else nn.Module):
            raise ModelFileError(f"{path}: holds a {type(obj).__name__}, expected an nn.Sequential"
                                 + ("" if trusted else " (a pickled graph model needs --trust-pickle)"))
        _reject_placeholders(path, obj)
        training = batch_norms_in_training(obj)
        if refuse_training and training:
            raise ModelModeError(
                f"{path}: batch norm layer {', '.join(training)} was saved in training mode (its output "
                "depends on the batch); pass --eval to use its running statistics, as model.eval() does"
            )
        return obj.eval()
    if state is None:
        raise ModelFileError(f"{path}: holds a {type(obj).__name__}, expected a state dict for {arch!r}")
    model = build_arch(arch)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state, strict=True)
    return model.eval()
