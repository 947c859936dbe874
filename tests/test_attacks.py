"""Tests of polytope.verifiers.attacks: constraint satisfaction, loss ascent, the analytic worst case
of a linear classifier, restarts, and input validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polytope.model.errors import InvalidEpsilonError, InvalidInputError, ShapeMismatchError
from polytope.model.sets import BoxedLinfBall, L1Ball, L2Ball, LinfBall
from polytope.verifiers import attacks


def small_convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).eval()


def batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def per_example_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


ATTACKS = {
    "fgsm": lambda m, x, y, eps, clip: attacks.fgsm(m, x, y, eps, clip=clip),
    "pgd": lambda m, x, y, eps, clip: attacks.pgd(m, x, y, eps, steps=20, step_size=0.02, clip=clip),
    "pgd_random": lambda m, x, y, eps, clip: attacks.pgd(
        m,
        x,
        y,
        eps,
        steps=10,
        step_size=0.02,
        random_start=True,
        clip=clip,
        restarts=2,
        generator=torch.Generator().manual_seed(0),
    ),
}


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_stays_in_ball_and_box(name: str, clip: tuple[float, float] | None) -> None:
    model, (x, y), eps = small_convnet(), batch(), 0.1
    x_adv = ATTACKS[name](model, x, y, eps, clip)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    if clip is None:
        # unclipped (paper convention): the attack does leave [0, 1] on some pixels
        assert float(x_adv.min()) < 0.0 or float(x_adv.max()) > 1.0
    else:
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_tensor_box_bounds() -> None:
    model, (x, y) = small_convnet(), batch()
    lo, hi = torch.full_like(x[0], 0.2), torch.full_like(x[0], 0.9)
    x = x.clamp(0.2, 0.9)
    x_adv = attacks.pgd(model, x, y, 0.3, steps=10, step_size=0.05, clip=(lo, hi))
    assert float(x_adv.min()) >= 0.2 - 1e-7 and float(x_adv.max()) <= 0.9 + 1e-7
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6


def test_per_example_eps() -> None:
    model, (x, y) = small_convnet(), batch(4)
    eps = torch.tensor([0.0, 0.05, 0.1, 0.2])
    x_adv = attacks.pgd(model, x, y, eps, steps=15, step_size=0.02)
    radii = (x_adv - x).abs().flatten(1).max(dim=1).values
    assert torch.all(radii <= eps + 1e-6)
    assert radii[0] == 0 and radii[3] > 0.1


def test_pgd_loss_at_least_clean_loss() -> None:
    model, (x, y) = small_convnet(), batch(32)
    clean = per_example_loss(model, x, y)
    adv = per_example_loss(model, attacks.pgd(model, x, y, 0.1, steps=30, step_size=0.01), y)
    fgsm = per_example_loss(model, attacks.fgsm(model, x, y, 0.1), y)
    assert torch.all(adv >= clean - 1e-6)
    assert float(adv.mean()) > float(clean.mean())
    assert float(adv.mean()) >= float(fgsm.mean()) - 1e-6


def linear_two_class(d: int = 6, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    model = nn.Linear(d, 2).double()
    with torch.no_grad():
        offset = torch.tensor([0.5, -1.0, 2.0, -0.3, 0.7, -1.5], dtype=torch.float64)
        model.weight[1] = model.weight[0] + offset
    return model


def analytic_worst_case(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Two-class linear model: CE is decreasing in the margin (w_y - w_o) . x, so the worst
    point of the l_inf ball is x - eps * sign(w_y - w_o)."""
    w = model.weight
    direction = w[y] - w[1 - y]
    return x - eps * direction.sign()


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_linear_model_analytic_worst_case(attack: str) -> None:
    model = linear_two_class()
    x = torch.rand(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1] * 5)
    eps = 0.1
    # pgd with its defaults: 100 steps of 0.01
    x_adv = attacks.fgsm(model, x, y, eps) if attack == "fgsm" else attacks.pgd(model, x, y, eps)
    expected = analytic_worst_case(model, x, y, eps)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-12)
    # no point of the ball has a higher loss: compare against random vertices
    signs = 2 * torch.randint(0, 2, (200, *x.shape), generator=torch.Generator().manual_seed(0)) - 1
    vertices = (x + eps * signs.double()).reshape(-1, x.shape[1])
    losses = per_example_loss(model, vertices, y.repeat(200)).reshape(200, -1)
    worst_random = losses.max(dim=0).values
    assert torch.all(per_example_loss(model, x_adv, y) >= worst_random - 1e-12)


def test_linear_model_worst_case_with_box() -> None:
    model = linear_two_class()
    x = torch.rand(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([1, 0] * 5)
    eps = 0.3
    x_adv = attacks.pgd(model, x, y, eps, clip=(0.0, 1.0))
    expected = analytic_worst_case(model, x, y, eps).clamp(0.0, 1.0)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-12)


def test_restarts_never_worse_than_single_run() -> None:
    model, (x, y) = small_convnet(seed=2), batch(32, seed=5)
    eps, kw = 0.15, {"steps": 10, "step_size": 0.03}
    single = attacks.pgd(model, x, y, eps, **kw)
    multi = attacks.pgd(model, x, y, eps, restarts=4, generator=torch.Generator().manual_seed(1), **kw)
    err_single = attacks.attack_error(model, x, y, single, include_clean=False)
    err_multi = attacks.attack_error(model, x, y, multi, include_clean=False)
    assert torch.all(err_multi >= err_single)
    both_right = ~err_single & ~err_multi
    loss_single, loss_multi = per_example_loss(model, single, y), per_example_loss(model, multi, y)
    assert torch.all(loss_multi[both_right] >= loss_single[both_right] - 1e-6)


def test_random_start_reproducible_with_generator() -> None:
    model, (x, y) = small_convnet(), batch(8)

    def run() -> torch.Tensor:
        return attacks.pgd(
            model, x, y, 0.1, steps=3, random_start=True, generator=torch.Generator().manual_seed(7)
        )

    assert torch.equal(run(), run())
    assert not torch.equal(run(), attacks.pgd(model, x, y, 0.1, steps=3))


def test_zero_steps_and_zero_eps() -> None:
    model, (x, y) = small_convnet(), batch(4)
    assert torch.equal(attacks.pgd(model, x, y, 0.1, steps=0), x)
    assert torch.equal(attacks.fgsm(model, x, y, 0.0), x)


def test_model_untouched() -> None:
    model, (x, y) = small_convnet(), batch(4)
    model.train()
    attacks.pgd(model, x, y, 0.1, steps=3)
    attacks.fgsm(model, x, y, 0.1)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_works_under_no_grad_and_float64() -> None:
    model, (x, y) = small_convnet().double(), batch(4)
    x = x.double()
    with torch.no_grad():
        x_adv = attacks.pgd(model, x, y, 0.1, steps=5)
    assert x_adv.dtype == torch.float64
    assert float((x_adv - x).abs().max()) > 0


def test_attack_error_semantics() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # predicts the larger coordinate
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    x_adv = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert attacks.attack_error(model, x, y, x_adv, include_clean=False).tolist() == [True, False, False]
    assert attacks.attack_error(model, x, y, x_adv).tolist() == [True, True, False]
    with pytest.raises(ShapeMismatchError):
        attacks.attack_error(model, x, y, x_adv[:2])


def test_invalid_arguments() -> None:
    model, (x, y) = small_convnet(), batch(4)
    for eps in (-0.1, float("nan"), float("inf")):
        with pytest.raises(InvalidEpsilonError):
            attacks.fgsm(model, x, y, eps)
    with pytest.raises(InvalidEpsilonError):
        attacks.pgd(model, x, y, torch.tensor([0.1, 0.2]))
    with pytest.raises(InvalidInputError, match="outside the clip box"):
        attacks.pgd(model, x + 2.0, y, 0.1, clip=(0.0, 1.0))
    with pytest.raises(InvalidInputError, match="lo > hi"):
        attacks.fgsm(model, x, y, 0.1, clip=(1.0, 0.0))
    with pytest.raises(ShapeMismatchError):
        attacks.fgsm(model, x, y[:3], 0.1)
    with pytest.raises(ValueError, match="restarts"):
        attacks.pgd(model, x, y, 0.1, restarts=0)
    with pytest.raises(InvalidInputError, match="NaN"):
        attacks.fgsm(model, x.masked_fill(x > 0.5, float("nan")), y, 0.1)


SETS = {
    "linf": lambda eps: LinfBall(eps),
    "linf-box": lambda eps: BoxedLinfBall(eps, 0.0, 1.0),
    "l2": lambda eps: L2Ball(eps),
    "l1": lambda eps: L1Ball(eps),
}


def _outside(kind: str, x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    """How far each ``x_adv`` lies outside the set (0 inside), from the norms directly."""
    d = (x_adv - x).double().flatten(1)
    order = {"linf": torch.inf, "linf-box": torch.inf, "l2": 2, "l1": 1}[kind]
    excess = (torch.linalg.vector_norm(d, ord=order, dim=1) - eps).clamp_min(0)
    if kind == "linf-box":
        flat = x_adv.double().flatten(1)
        excess = torch.maximum(excess, torch.maximum(-flat, flat - 1).amax(1).clamp_min(0))
    return excess


@pytest.mark.parametrize("kind", SETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pgd_in_set_stays_in_the_actual_set(kind: str, dtype: torch.dtype) -> None:
    """Every iterate is projected onto the set itself: an l2/l1 attack never reaches the bounding box's corners."""
    model, (x, y) = small_convnet(), batch()
    model, x, eps = model.to(dtype), x.to(dtype), 0.5
    x_adv = attacks.pgd_in_set(model, x, y, SETS[kind](eps), steps=20, step_size=eps / 4, restarts=2,
                               generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and x_adv.dtype == dtype and not x_adv.requires_grad
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(_outside(kind, x, x_adv, eps).max()) <= tol
    assert float(per_example_loss(model, x_adv, y).mean()) > float(per_example_loss(model, x, y).mean())


def test_pgd_in_set_on_the_linf_ball_is_pgd() -> None:
    model, (x, y) = small_convnet(), batch()
    model, x = model.double(), x.double()
    kw = {"steps": 10, "step_size": 0.02, "restarts": 3}
    plain = attacks.pgd(model, x, y, 0.1, generator=torch.Generator().manual_seed(4), **kw)
    in_set = attacks.pgd_in_set(model, x, y, LinfBall(0.1), generator=torch.Generator().manual_seed(4), **kw)
    single = attacks.pgd_in_set(model, x, y, LinfBall(0.1), steps=10, step_size=0.02)
    torch.testing.assert_close(single, attacks.pgd(model, x, y, 0.1, steps=10, step_size=0.02), rtol=0, atol=1e-12)
    # the random starts differ (a sample of the set vs uniform noise): compare the attacks' strength only
    assert float(per_example_loss(model, in_set, y).mean()) >= 0.9 * float(per_example_loss(model, plain, y).mean())


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_pgd_in_set_linear_model_analytic_worst_case(kind: str) -> None:
    """Two-class linear model: the worst point of the l2 ball is ``x - eps u / ||u||_2`` and of the l1 ball
    ``x - eps sign(u_k) e_k`` at ``k = argmax |u_k|``, with ``u = w_y - w_o``."""
    model = linear_two_class()
    x = torch.rand(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1] * 5)
    eps = 0.1
    u = model.weight[y] - model.weight[1 - y]
    if kind == "l2":
        expected = x - eps * u / u.norm(dim=1, keepdim=True)
    else:
        k = u.abs().argmax(1, keepdim=True)
        expected = x - eps * torch.zeros_like(u).scatter(1, k, 1.0) * u.sign()
    x_adv = attacks.pgd_in_set(model, x, y, SETS[kind](eps), steps=50, step_size=eps / 4)
    torch.testing.assert_close(x_adv, expected.detach(), rtol=0, atol=1e-9)
