"""polytope: provable robustness of ReLU networks by linear programming (Wong & Kolter 2018)."""

from polytope.bounds.dual import DualNetwork, IndexSets, Relaxation, index_sets
from polytope.bounds.slopes import OptimizedSlopes, optimize_slopes
from polytope.model.errors import (
    DatasetError,
    DeviceError,
    InvalidEpsilonError,
    InvalidInputError,
    InvalidObjectiveError,
    InvalidSlopesError,
    ModelFileError,
    ModelModeError,
    PolytopeError,
    ShapeMismatchError,
    SolverError,
    UnknownOptionError,
    UnsupportedLayerError,
)
from polytope.model.network import Network
from polytope.model.sets import BoxedLinfBall, InputSet, L1Ball, L2Ball, LinfBall
from polytope.verify.robust import (
    certified_radius,
    certify,
    margin_bounds,
    margin_objective,
    robust_loss,
    worst_margin,
)

__all__ = [
    "BoxedLinfBall",
    "DatasetError",
    "DeviceError",
    "DualNetwork",
    "IndexSets",
    "InputSet",
    "InvalidEpsilonError",
    "InvalidInputError",
    "InvalidObjectiveError",
    "InvalidSlopesError",
    "L1Ball",
    "L2Ball",
    "LinfBall",
    "ModelFileError",
    "ModelModeError",
    "Network",
    "OptimizedSlopes",
    "PolytopeError",
    "Relaxation",
    "ShapeMismatchError",
    "SolverError",
    "UnknownOptionError",
    "UnsupportedLayerError",
    "certified_radius",
    "certify",
    "index_sets",
    "margin_bounds",
    "margin_objective",
    "optimize_slopes",
    "robust_loss",
    "worst_margin",
]
