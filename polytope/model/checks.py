"""Validation of the values every public entry point takes: objectives, cutoffs, slopes, labels,
option names and device names.  Each raises one named error from :mod:`polytope.model.errors` before
any work starts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from polytope.model.errors import (
    DeviceError,
    InvalidInputError,
    InvalidObjectiveError,
    InvalidSlopesError,
    UnknownOptionError,
)


def check_objective(c: torch.Tensor | np.ndarray, name: str = "c") -> None:
    """Raise :class:`InvalidObjectiveError` if the objective ``c`` (a tensor or an array) holds NaN or inf."""
    if not isinstance(c, torch.Tensor | np.ndarray):
        raise InvalidObjectiveError(f"the objective {name} must be a tensor, got {type(c).__name__}")
    finite = np.isfinite(c).all() if isinstance(c, np.ndarray) else bool(torch.isfinite(c).all())
    if not finite:
        raise InvalidObjectiveError(f"the objective {name} holds NaN or inf values")


def check_cutoff(cutoff: Any) -> float | None:
    """``cutoff`` as a float (``None`` kept); :class:`InvalidObjectiveError` unless it is a finite number."""
    if cutoff is None:
        return None
    if isinstance(cutoff, bool) or not isinstance(cutoff, int | float | np.floating | np.integer):
        raise InvalidObjectiveError(f"cutoff must be a finite number or None, got {cutoff!r}")
    if not math.isfinite(float(cutoff)):
        raise InvalidObjectiveError(f"cutoff must be a finite number or None, got {cutoff!r}")
    return float(cutoff)


def check_slopes(slopes: Sequence[torch.Tensor], name: str = "slopes") -> None:
    """Raise :class:`InvalidSlopesError` unless every tensor of ``slopes`` lies in ``[0, 1]`` (NaN does not)."""
    for i, a in enumerate(slopes):
        if not isinstance(a, torch.Tensor):
            raise InvalidSlopesError(f"{name}[{i}] must be a tensor, got {type(a).__name__}")
        if not bool(((a >= 0) & (a <= 1)).all()):
            raise InvalidSlopesError(f"{name}[{i}] must lie in [0, 1] (no NaN): Theorem 1 holds for 0 <= alpha <= 1")


def check_choice(value: Any, choices: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``choices``, else :class:`UnknownOptionError` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise UnknownOptionError(f"unknown {what} {value!r}: choose from {', '.join(map(repr, choices))}")
    return value


def check_labels(y: torch.Tensor, n_classes: int) -> None:
    """Integer labels in ``[0, n_classes)``: :class:`InvalidInputError` otherwise."""
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise InvalidInputError(f"labels must be an integer tensor (e.g. torch.long), got {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise InvalidInputError(f"labels must lie in [0, {n_classes}), got range [{int(y.min())}, {int(y.max())}]")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` that exists here, else :class:`DeviceError`.

    Catches a malformed name (``"gpu"``), a CUDA/MPS device on a machine without one, and a
    device index past the number of devices -- before anything is moved there.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"{device!r} is not a torch device name (e.g. 'cpu', 'cuda', 'cuda:1')") from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {str(dev)!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {str(dev)!r} requested but this machine has {count} CUDA device(s)")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {str(dev)!r} requested but MPS is not available on this machine")
        return dev
    raise DeviceError(f"device {str(dev)!r} is not supported: use 'cpu' or 'cuda'")
