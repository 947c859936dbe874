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


class UnsupportedOperatorError(PolytopeError, TypeError):
    """An ONNX operator (or attribute of one) that polytope cannot import; names its type and node."""


class UnsupportedGraphError(PolytopeError, TypeError):
    """An ONNX graph polytope cannot read as a ReLU graph of one input to one output (or with a dynamic shape)."""


class PropertyFileError(PolytopeError, ValueError):
    """A VNN-LIB property that is missing or malformed (the message names the line)."""


class UnsupportedPropertyError(PropertyFileError):
    """A well-formed VNN-LIB property outside what polytope verifies (e.g. non-box input constraints)."""


class PropertyMismatchError(PolytopeError, ValueError):
    """A property whose input or output count does not match the network, or that has no output constraint."""


class InvalidObjectiveError(InvalidInputError):
    """An objective ``c`` or a cutoff that holds NaN or inf."""


class InvalidSlopesError(InvalidInputError):
    """Lower slopes ``alpha`` that hold NaN or lie outside ``[0, 1]`` (Theorem 1 needs ``0 <= alpha <= 1``)."""


class UnknownOptionError(PolytopeError, ValueError):
    """A ``method``, ``slopes``, ``order``, ``bounds`` or rung name that is not one of the choices (or a
    combination of them that is not supported)."""


class DeviceError(PolytopeError, ValueError):
    """A torch device name that is malformed or names a device this machine does not have."""


class UnsupportedSetError(InvalidInputError):
    """An input set that a method cannot handle (e.g. input splitting of an l2 or l1 ball)."""
