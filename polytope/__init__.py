"""polytope: provable robustness of ReLU networks by linear programming (Wong & Kolter 2018).

The public names load on first use (PEP 562), so ``python -m polytope verify`` and ``supports`` start
without importing the solvers, pandas or the training code they do not need.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Where each public name lives.
_EXPORTS: dict[str, str] = {
    "BaBOptions": "polytope.verifiers.bab",
    "BaBResult": "polytope.verifiers.bab",
    "Box": "polytope.model.sets",
    "BoxedLinfBall": "polytope.model.sets",
    "DatasetError": "polytope.model.errors",
    "DeviceError": "polytope.model.errors",
    "DualNetwork": "polytope.bounds.dual",
    "ExactMILP": "polytope.solvers.milp",
    "Graph": "polytope.model.graph",
    "IndexSets": "polytope.bounds.dual",
    "InputSet": "polytope.model.sets",
    "InvalidEpsilonError": "polytope.model.errors",
    "InvalidInputError": "polytope.model.errors",
    "InvalidObjectiveError": "polytope.model.errors",
    "InvalidSlopesError": "polytope.model.errors",
    "L1Ball": "polytope.model.sets",
    "L2Ball": "polytope.model.sets",
    "LinfBall": "polytope.model.sets",
    "ModelFileError": "polytope.model.errors",
    "ModelModeError": "polytope.model.errors",
    "Network": "polytope.model.network",
    "Normalize": "polytope.model.network",
    "OptimizedSlopes": "polytope.bounds.slopes",
    "PolytopeError": "polytope.model.errors",
    "PropertyMismatchError": "polytope.model.errors",
    "Relaxation": "polytope.bounds.dual",
    "RelaxedLP": "polytope.solvers.lp",
    "ShapeMismatchError": "polytope.model.errors",
    "SolverError": "polytope.model.errors",
    "UnknownOptionError": "polytope.model.errors",
    "UnsupportedLayerError": "polytope.model.errors",
    "VerifyResult": "polytope.verifiers.property",
    "certified_radius": "polytope.verifiers.robust",
    "certify": "polytope.verifiers.robust",
    "index_sets": "polytope.bounds.dual",
    "margin_bounds": "polytope.verifiers.robust",
    "margin_objective": "polytope.model.specs",
    "optimize_alpha": "polytope.bounds.alpha",
    "optimize_slopes": "polytope.bounds.slopes",
    "robust_loss": "polytope.verifiers.robust",
    "tightness_rows": "polytope.verifiers.tightness",
    "verify": "polytope.verifiers.property",
    "verify_bab": "polytope.verifiers.bab",
    "worst_margin": "polytope.verifiers.robust",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'polytope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "BaBOptions",
    "BaBResult",
    "Box",
    "BoxedLinfBall",
    "DatasetError",
    "DeviceError",
    "DualNetwork",
    "ExactMILP",
    "Graph",
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
    "verify_bab",
    "worst_margin",
]
