"""polytope: provable robustness of ReLU networks by linear programming (Wong & Kolter 2018)."""

from polytope.bounds.alpha import optimize_alpha
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
    PropertyMismatchError,
    ShapeMismatchError,
    SolverError,
    UnknownOptionError,
    UnsupportedLayerError,
)
from polytope.model.network import Network, Normalize
from polytope.model.sets import Box, BoxedLinfBall, InputSet, L1Ball, L2Ball, LinfBall
from polytope.model.specs import margin_objective
from polytope.solvers.lp import RelaxedLP
from polytope.solvers.milp import ExactMILP
from polytope.verify.property import VerifyResult, verify
from polytope.verify.robust import (
    certified_radius,
    certify,
    margin_bounds,
    robust_loss,
    worst_margin,
)
from polytope.verify.tightness import tightness_rows

__all__ = [
    "Box",
    "BoxedLinfBall",
    "DatasetError",
    "DeviceError",
    "DualNetwork",
    "ExactMILP",
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
    "Normalize",
    "OptimizedSlopes",
    "PolytopeError",
    "PropertyMismatchError",
    "Relaxation",
    "RelaxedLP",
    "ShapeMismatchError",
    "SolverError",
    "UnknownOptionError",
    "UnsupportedLayerError",
    "VerifyResult",
    "certified_radius",
    "certify",
    "index_sets",
    "margin_bounds",
    "margin_objective",
    "optimize_alpha",
    "optimize_slopes",
    "robust_loss",
    "tightness_rows",
    "verify",
    "worst_margin",
]
