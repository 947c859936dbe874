"""polytope: provable robustness of ReLU networks by linear programming (Wong & Kolter 2018)."""

from polytope.dual import DualNetwork, IndexSets, Relaxation, index_sets
from polytope.errors import (
    DatasetError,
    InvalidEpsilonError,
    InvalidInputError,
    ModelFileError,
    ModelModeError,
    PolytopeError,
    ShapeMismatchError,
    SolverError,
    UnsupportedLayerError,
)
from polytope.network import Network, Normalize
from polytope.robust import (
    certified_radius,
    certify,
    margin_bounds,
    margin_objective,
    robust_loss,
    worst_margin,
)
from polytope.sets import BoxedLinfBall, InputSet, L1Ball, L2Ball, LinfBall
from polytope.slopes import OptimizedSlopes, optimize_slopes

__all__ = [
    "BoxedLinfBall",
    "DatasetError",
    "DualNetwork",
    "IndexSets",
    "InputSet",
    "InvalidEpsilonError",
    "InvalidInputError",
    "L1Ball",
    "L2Ball",
    "LinfBall",
    "ModelFileError",
    "ModelModeError",
    "Network",
    "Normalize",
    "OptimizedSlopes",
    "PolytopeError",
    "Relaxation",
    "ShapeMismatchError",
    "SolverError",
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
