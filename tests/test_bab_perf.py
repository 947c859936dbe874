"""The branch and bound shortcuts: compact multipliers, re-derivation of reached units only, attacks from guesses.

Each shortcut must leave the bounds sound and the verdicts exact: compact ``alpha``/``beta`` give the dense pass's
``J``; a unit outside :meth:`SplitDual.reach` has the parent's ``J(e_u)``; every ``rederive`` mode decides tiny
networks as brute-force enumeration and the MILP do (the tests of ``test_bab.py`` with the modes drawn).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import DTYPE, build_fc, conv_nets, fast, fast_no_shrink, seeds
from test_bab import assert_exact_verdict, tiny_fc

import polytope as pt
from polytope.bounds.dual import DualNetwork, index_sets
from polytope.bounds.splits import SplitDual
from polytope.model.errors import ShapeMismatchError, UnknownOptionError
from polytope.verifiers.attacks import pgd_in_set
from polytope.verifiers.bab import REDERIVE, BaBOptions, margin_rows


def _root(seq: torch.nn.Module, x: torch.Tensor, eps: float) -> tuple[pt.Network, list, pt.InputSet]:
    net, input_set = pt.Network.from_torch(seq), pt.LinfBall(eps)
    with torch.no_grad():
        bounds = [(a.flatten(1), b.flatten(1)) for a, b in DualNetwork(net, x, input_set).bounds]
    return net, bounds, input_set


def _random_splits(bounds: list, gen: torch.Generator, fraction: float) -> list[torch.Tensor]:
    return [torch.where((a < 0) & (b > 0) & (torch.rand(a.shape, generator=gen) < fraction),
                        torch.where(torch.rand(a.shape, generator=gen) < 0.5, 1, -1), 0).to(torch.int8)
            for a, b in bounds]


@fast(25)
@given(conv_nets(), seeds, st.floats(0.05, 0.5), st.floats(0.0, 1.0))
def test_compact_multipliers_give_the_dense_bound(case, seed: int, eps: float, fraction: float) -> None:
    """``J`` with ``alpha``/``beta`` on the root's unstable units equals ``J`` with them scattered densely
    (``d`` and 0 elsewhere), to 1e-9 relative."""
    seq, in_shape = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, *in_shape, generator=gen, dtype=DTYPE)
    net, bounds, input_set = _root(seq, x, eps)
    signs = _random_splits(bounds, gen, fraction)
    index = [index_sets(a[0], b[0]).unstable.nonzero().flatten() for a, b in bounds]
    n_out = net.shapes(in_shape)[-1][0]
    c = margin_rows(0, list(range(1, n_out)), n_out).unsqueeze(0)
    m = c.shape[1]
    alpha = [torch.rand(1, m, len(i), generator=gen, dtype=DTYPE) for i in index]
    beta = [3 * torch.rand(1, m, len(i), generator=gen, dtype=DTYPE) for i in index]
    compact = SplitDual(net, x, input_set, bounds, signs, index)
    dense = SplitDual(net, x, input_set, bounds, signs)
    alpha_d = [r.upper_slope.unsqueeze(1).expand(-1, m, -1).index_copy(2, i, a)
               for r, i, a in zip(dense.relax, index, alpha, strict=True)]
    beta_d = [torch.zeros(1, m, a.shape[1], dtype=DTYPE).index_copy(2, i, b)
              for (a, _), i, b in zip(bounds, index, beta, strict=True)]
    depth = len(net.layers)
    with torch.no_grad():
        j_compact = compact.backward(c, depth, alpha, beta).value
        j_dense = dense.backward(c, depth, alpha_d, beta_d).value
    assert torch.allclose(j_compact, j_dense, rtol=1e-9, atol=1e-9 * (1 + float(j_dense.abs().max())))


@fast(25)
@given(conv_nets(max_convs=2, max_fc=1), seeds, st.floats(0.05, 0.5))
def test_units_outside_the_reach_of_a_split_keep_their_bound(case, seed: int, eps: float) -> None:
    """Split one unstable unit: every later unit whose ``J(e_u)``, ``J(-e_u)`` changed is in :meth:`SplitDual.reach`
    (so re-deriving the reached units only loses nothing against re-deriving every unit)."""
    seq, in_shape = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, *in_shape, generator=gen, dtype=DTYPE)
    net, bounds, input_set = _root(seq, x, eps)
    unstable = [((a < 0) & (b > 0))[0].nonzero().flatten() for a, b in bounds[:-1]]
    layers = [i for i, u in enumerate(unstable) if len(u)]
    assume(layers)
    layer = layers[int(torch.randint(len(layers), (1,), generator=gen))]
    unit = int(unstable[layer][torch.randint(len(unstable[layer]), (1,), generator=gen)])
    zeros = [torch.zeros_like(a, dtype=torch.int8) for a, _ in bounds]
    signs = [s.clone() for s in zeros]
    signs[layer][0, unit] = 1
    changed = [s != 0 for s in signs]
    parent = SplitDual(net, x, input_set, bounds, zeros)
    child = SplitDual(net, x, input_set, bounds, signs)
    reach = child.reach(changed)
    assert not bool(reach[layer][0, unit]) or layer > 0  # a unit never reaches itself through its own layer
    for i in range(layer + 1, len(bounds)):
        n = bounds[i][0].shape[1]
        eye = torch.eye(n, dtype=DTYPE).unsqueeze(0)
        c = torch.cat([eye, -eye], 1)
        with torch.no_grad():
            diff = (child.backward(c, i + 1).value - parent.backward(c, i + 1).value).abs()[0]
        moved = (diff[:n] > 1e-12) | (diff[n:] > 1e-12)
        assert bool((~moved | reach[i][0]).all()), (i, moved, reach[i])


@fast_no_shrink(12)
@given(tiny_fc(), st.sampled_from(REDERIVE), st.booleans())
def test_every_rederive_mode_is_exact(case, rederive: str, attack: bool) -> None:
    """ReLU splitting with each ``rederive`` mode, with and without the attacks: the enumeration's verdict."""
    assert_exact_verdict(case, BaBOptions(split="relu", time_limit=20, rederive=rederive,
                                          attack_steps=20 if attack else 0))


def test_bad_rederive_is_a_named_error() -> None:
    with pytest.raises(UnknownOptionError, match="rederive"):
        BaBOptions(rederive="some")


def test_pgd_starts_from_the_given_points_inside_the_set() -> None:
    """``start`` is projected on the set and is the first run's start (0 steps: returned as projected)."""
    seq = build_fc(3, [4], 2, 0)
    x = torch.zeros(2, 3, dtype=DTYPE)
    start = torch.tensor([[0.05, -0.3, 0.0], [2.0, 0.0, -2.0]], dtype=DTYPE)
    out = pgd_in_set(seq, x, torch.zeros(2, dtype=torch.long), pt.LinfBall(0.1), steps=0, start=start)
    assert torch.allclose(out, start.clamp(-0.1, 0.1))
    with pytest.raises(ShapeMismatchError, match="start"):
        pgd_in_set(seq, x, torch.zeros(2, dtype=torch.long), pt.LinfBall(0.1), steps=1, start=start[:1])
