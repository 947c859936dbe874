"""Exceptions raised by polytope: every bad input gets a named error and a clear message."""

from __future__ import annotations


class PolytopeError(Exception):
    """Base class of every error polytope raises on purpose."""


class UnsupportedLayerError(PolytopeError, TypeError):
    """A module that is not a Linear, Conv2d, Flatten or ReLU (or a foldable eval-mode op)."""


class ModelModeError(PolytopeError, ValueError):
    """A model in training mode holds dropout or batch-norm behaviour we cannot bound."""


class ShapeMismatchError(PolytopeError, ValueError):
    """An input or objective whose shape does not fit the network."""


class InvalidEpsilonError(PolytopeError, ValueError):
    """A perturbation radius that is negative, NaN, infinite or of the wrong length."""


class InvalidInputError(PolytopeError, ValueError):
    """Input data holding NaN or inf values, or outside a required domain."""


class ModelFileError(PolytopeError, OSError):
    """A model file that is missing, unreadable or does not match its architecture."""


class DatasetError(PolytopeError, OSError):
    """A dataset that is missing, corrupt or malformed."""


class SolverError(PolytopeError, RuntimeError):
    """A solver that could not be run (the LP/MILP status itself is reported, not raised)."""
