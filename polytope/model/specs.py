"""Output specifications: the objectives ``c`` of Theorem 1 for a classifier's margins (eq. 15)."""

from __future__ import annotations

import torch

from polytope.model.checks import check_labels
from polytope.model.errors import ShapeMismatchError


def margin_objective(y: torch.Tensor, n_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``c = e_y 1^T - I`` as a batch of objectives ``(B, n, n)``: row ``j`` is ``e_y - e_j``.

    ``c_j^T f = f_y - f_j``, so ``J_j >= 0`` for all ``j`` proves class ``y`` wins (eq. 15).
    """
    if y.dim() != 1:
        raise ShapeMismatchError(f"labels must be a vector (B,), got shape {tuple(y.shape)}")
    check_labels(y, n_classes)
    eye = torch.eye(n_classes, dtype=dtype, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def worst_of(margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``min_{j != y} J_j`` of a ``(B, n)`` margin matrix, ``(B,)``."""
    return margins.scatter(1, y.unsqueeze(1), torch.inf).min(1).values
