"""Attacks: FGSM and PGD (lower bounds on the robust error).

Conventions follow the paper's evaluation code: both attacks ascend the cross-entropy
loss, FGSM takes one step of size ``eps`` along the gradient sign, PGD takes ``steps``
signed steps of size ``step_size`` and projects back onto the l_inf ball after each one,
returning the last iterate.  By default neither clips to a data domain (as in the
paper); pass ``clip=(lo, hi)`` to stay inside a box such as ``[0, 1]``.
:func:`pgd_in_set` runs PGD inside any :class:`~polytope.model.sets.InputSet` (l_inf, the clipped
l_inf ball, l2, l1) with a step rule fitting its norm and the set's own projection.

All tensors stay on the device and dtype of ``x``; the model is any callable module
mapping ``(B, *in)`` to logits ``(B, classes)``.  Parameter gradients are never touched
(gradients are taken with respect to the input only) and the model's train/eval mode is
left as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from polytope.model.errors import InvalidEpsilonError, InvalidInputError, ShapeMismatchError
from polytope.model.sets import InputSet

Model = Callable[[torch.Tensor], torch.Tensor]
Bound = float | torch.Tensor
Box = tuple[Bound, Bound]


def _check_eps(eps: Bound, x: torch.Tensor) -> torch.Tensor:
    """``eps`` as a tensor broadcastable to ``x``: a scalar, or one radius per example."""
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if not bool(torch.isfinite(eps_t).all()) or bool((eps_t < 0).any()):
        raise InvalidEpsilonError(f"eps must be finite and non-negative, got {eps}")
    if eps_t.dim() == 1 and eps_t.numel() == x.shape[0]:
        eps_t = eps_t.reshape(-1, *([1] * (x.dim() - 1)))
    try:
        torch.broadcast_shapes(eps_t.shape, x.shape)
    except RuntimeError as exc:
        raise InvalidEpsilonError(
            f"eps of shape {tuple(eps_t.shape)} does not broadcast to inputs of shape {tuple(x.shape)}"
        ) from exc
    return eps_t


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ShapeMismatchError(f"x must be batched (B, *shape), got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ShapeMismatchError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInputError("x holds NaN or infinite values")


def _check_clip(clip: Box | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The box as tensors on ``x``'s device; ``x`` itself must lie inside it."""
    if clip is None:
        return None
    lo, hi = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in clip)
    if bool((lo > hi).any()):
        raise InvalidInputError(f"clip box has lo > hi: {clip}")
    if bool((x < lo).any()) or bool((x > hi).any()):
        raise InvalidInputError("x lies outside the clip box; clipping would leave the eps-ball")
    return lo, hi


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, box: tuple | None) -> torch.Tensor:
    """Nearest point of ``{|x' - x|_inf <= eps} ∩ box`` to ``x_adv`` (coordinate-wise clamps)."""
    x_adv = torch.maximum(torch.minimum(x_adv, x + eps), x - eps)
    if box is not None:
        x_adv = torch.maximum(torch.minimum(x_adv, box[1]), box[0])
    return x_adv


def _loss_and_grad(model: Model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example cross-entropy at ``x`` and its gradient with respect to ``x``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        losses = F.cross_entropy(model(x), y, reduction="none")
        (grad,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach(), grad


def fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, eps: Bound, clip: Box | None = None) -> torch.Tensor:
    """Fast gradient sign method: ``x + eps * sign(grad_x CE(model(x), y))``, then clipped to ``clip``."""
    _check_inputs(x, y)
    eps_t = _check_eps(eps, x)
    box = _check_clip(clip, x)
    x = x.detach()
    _, grad = _loss_and_grad(model, x, y)
    return _project(x + eps_t * grad.sign(), x, eps_t, box).detach()


Step = Callable[[torch.Tensor], torch.Tensor]


def _ascend(model: Model, y: torch.Tensor, steps: int, step_size: float, start: torch.Tensor,
            direction: Step, project: Step) -> torch.Tensor:
    """``steps`` steps ``x' <- project(x' + step_size * direction(grad CE))`` from ``start``; the last iterate."""
    x_adv = start
    for _ in range(steps):
        _, grad = _loss_and_grad(model, x_adv, y)
        x_adv = project(x_adv + step_size * direction(grad))
    return x_adv


def _best_run(model: Model, x: torch.Tensor, y: torch.Tensor, restarts: int,
              run: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """``run(0), ..., run(restarts - 1)``; each example keeps a misclassifying run, else its highest loss."""
    best = None
    for r in range(restarts):
        x_adv = run(r)
        if restarts == 1:
            return x_adv.detach()
        mis, loss = _score(model, x_adv, y)
        if best is None:
            best, best_mis, best_loss = x_adv, mis, loss
            continue
        better = (mis & ~best_mis) | ((mis == best_mis) & (loss > best_loss))
        mask = better.reshape(-1, *([1] * (x.dim() - 1)))
        best = torch.where(mask, x_adv, best)
        best_mis, best_loss = best_mis | mis, torch.where(better, loss, best_loss)
    return best.detach()


def _check_pgd(steps: int, step_size: float, restarts: int) -> None:
    if steps < 0 or step_size <= 0 or not math.isfinite(step_size) or restarts < 1:
        raise ValueError(
            f"need steps >= 0, finite step_size > 0, restarts >= 1; got {steps}, {step_size}, {restarts}"
        )


def _random_start(x: torch.Tensor, eps: torch.Tensor, box: tuple | None, generator) -> torch.Tensor:
    noise = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    return _project(x + (2 * noise - 1) * eps, x, eps, box)


@torch.no_grad()
def _score(model: Model, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x_adv)
    return logits.argmax(dim=1) != y, F.cross_entropy(logits, y, reduction="none")


def pgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Bound,
    steps: int = 100,
    step_size: float = 0.01,
    random_start: bool = False,
    clip: Box | None = None,
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy inside the l_inf ball (and ``clip`` box).

    Each run takes ``steps`` steps ``x' <- proj(x' + step_size * sign(grad))`` from ``x``
    (or, with ``random_start``, from a uniform point of the ball) and keeps the last
    iterate.  With ``restarts > 1`` the extra runs always start at random points, and each
    example keeps the run that misclassifies it, or failing that the one with the highest
    loss.  ``generator`` seeds the random starts.
    """
    _check_inputs(x, y)
    _check_pgd(steps, step_size, restarts)
    eps_t = _check_eps(eps, x)
    box = _check_clip(clip, x)
    x = x.detach()

    def run(r: int) -> torch.Tensor:
        start = _random_start(x, eps_t, box, generator) if (random_start or r > 0) else x
        return _ascend(model, y, steps, step_size, start, torch.sign, lambda z: _project(z, x, eps_t, box))

    return _best_run(model, x, y, restarts, run)


def steepest_direction(grad: torch.Tensor, p: float, l1_fraction: float = 0.05) -> torch.Tensor:
    """A unit step (in the l_p norm) along which ``<grad, d>`` is largest, for each example.

    ``p = inf``: ``sign(grad)``; ``p = 2``: ``grad / ||grad||_2``; ``p = 1``: a sparse step -- the
    signs of the ``ceil(l1_fraction * n)`` largest ``|grad|`` coordinates, each ``1/k`` (the exact
    steepest l1 step moves one coordinate; spreading over a few makes progress on wide inputs).
    """
    if p == math.inf:
        return grad.sign()
    g = grad.flatten(1)
    if p == 2:
        d = g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    elif p == 1:
        k = max(1, math.ceil(l1_fraction * g.shape[1]))
        top = g.abs().topk(k, dim=1).indices
        d = torch.zeros_like(g).scatter(1, top, g.gather(1, top).sign() / k)
    else:
        raise ValueError(f"no steepest step for the l_{p} norm")
    return d.reshape(grad.shape)


def pgd_in_set(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    input_set: InputSet,
    steps: int = 100,
    step_size: float = 0.01,
    random_start: bool = False,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """PGD inside an :class:`~polytope.model.sets.InputSet`: steepest steps for its norm, then its own projection.

    Each step is ``x' <- input_set.project(x, x' + step_size * d)`` with ``d`` from
    :func:`steepest_direction` for the set's norm (``step_size`` is measured in that norm), so
    every iterate lies in the actual set -- the l2 or l1 ball, or the l_inf ball clipped to its
    domain box -- not in a bounding box.  Random starts are points of
    :meth:`~polytope.model.sets.InputSet.sample`; restarts are scored as in :func:`pgd`.  For a
    :class:`~polytope.model.sets.LinfBall` a run from ``x`` takes the same steps as :func:`pgd` (random starts
    differ: a sample of the set instead of uniform noise).  ``start``: the first run's starting points, shaped
    like ``x`` (projected on the set first; default ``x``).
    """
    _check_inputs(x, y)
    _check_pgd(steps, step_size, restarts)
    input_set.validate(x)
    x = x.detach()
    if start is not None and start.shape != x.shape:
        raise ShapeMismatchError(f"start must have the shape of x, {tuple(x.shape)}, got {tuple(start.shape)}")
    first = x if start is None else input_set.project(x, start.detach().to(x.dtype))

    def run(r: int) -> torch.Tensor:
        begin = input_set.sample(x, 1, generator)[:, 0] if (random_start or r > 0) else first
        return _ascend(model, y, steps, step_size, begin, lambda g: steepest_direction(g, input_set.p),
                       lambda z: input_set.project(x, z))

    return _best_run(model, x, y, restarts, run)


@torch.no_grad()
def attack_error(
    model: Model, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, include_clean: bool = True
) -> torch.Tensor:
    """Per-example bool: the attack found an error in the ball.

    That is ``x_adv`` misclassified, or -- with ``include_clean`` (default) -- ``x`` itself
    misclassified, since ``x`` lies in the ball too.  The paper's tables count
    ``x_adv`` alone (``include_clean=False``); the two differ only on the rare examples
    that are wrong at ``x`` but that the attack moves to the right class.
    """
    _check_inputs(x, y)
    if x_adv.shape != x.shape:
        raise ShapeMismatchError(f"x_adv has shape {tuple(x_adv.shape)}, x has {tuple(x.shape)}")
    wrong = model(x_adv).argmax(dim=1) != y
    if include_clean:
        wrong |= model(x).argmax(dim=1) != y
    return wrong
