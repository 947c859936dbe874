"""Certificates never rest on lower-precision rounding (the policy of ``docs/float_policy.md``).

A margin bound ``J`` computed in float32 (or half precision) differs from the exact ``J`` of the
same weights by rounding.  Every term of Theorem 1's ``J(c)`` (``-x^T nu_hat_1``, the norm term,
``-nu_{i+1}^T b_i``, ``l [nu]_+``) is bounded in magnitude by ``||c||_1`` times the *magnitude
bound* ``a_L`` of the outputs: ``a_0 = max(|lo|, |hi|)`` over the set's bounding box and
``a_{i+1} = |W_i| a_i + |b_i|`` (the slopes lie in ``[0, 1]``, so ``|nu_hat_i| <= |W_i^T| ... |c|``
and ``|l_i|, |u_i| <= a_i``).  So the rounding error of ``J`` is a small multiple of
``machine_eps(dtype) * max(a_L)``, whatever the size of the outputs (1 or 1000+).

The policy: for any dtype other than float64, every example whose worst margin bound lies within
``tau = ROUNDING_SAFETY * machine_eps(dtype) * max_j a_L[j]`` of zero is recomputed in float64 from
the same weights (a float64 copy of the network, the same inputs and the user's own ``eps``), and
the float64 value decides.  Outside that band the sign of the low-precision bound is the sign of
the float64 one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from polytope.model.network import Network, as_float64
from polytope.model.sets import InputSet
from polytope.model.specs import worst_of

ROUNDING_SAFETY = 64.0
"""``tau / (machine_eps * max a_L)``.  On the paper's MNIST model (eps = 0.1) the largest float32
error of a margin bound was 0.03 ``machine_eps * max a_L`` (2,000 times below ``tau``); on random
networks with outputs scaled from 1 to 1000 it stayed below 1 (the tests check this)."""

Recompute = Callable[[Network, torch.Tensor, torch.Tensor, torch.Tensor, InputSet], torch.Tensor]
"""``(net64, index, x64, y, input_set) -> (b, n)``: the same method's margin bounds in float64 for the
examples ``index`` of the batch (``x64 = x[index]`` in float64, ``y`` and the set theirs)."""


def magnitude_bound(net: Network, x: torch.Tensor, input_set: InputSet) -> torch.Tensor:
    """``max_j a_L[j]`` per example, ``(B,)`` in ``x``'s dtype: no unit, bound or term of ``J`` exceeds it.

    ``a_0 = max(|lo|, |hi|)`` of the set's bounding box, ``a_{i+1} = |W_i| a_i + |b_i|`` (a ReLU
    never increases a magnitude).
    """
    with torch.no_grad():
        lo, hi = input_set.box(x)
        a = torch.maximum(lo.abs(), hi.abs())
        for layer, shape in zip(net.layers, net.shapes(tuple(x.shape[1:])), strict=False):
            a = layer.abs_linear(a) + layer.bias(shape, a).abs()
        return a.flatten(1).amax(1)


def rounding_tolerance(net: Network, x: torch.Tensor, input_set: InputSet) -> torch.Tensor:
    """``tau = ROUNDING_SAFETY * machine_eps(x.dtype) * max_j a_L[j]``, ``(B,)``; zero in float64."""
    if x.dtype == torch.float64:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return ROUNDING_SAFETY * torch.finfo(x.dtype).eps * magnitude_bound(net, x, input_set)


def settle_in_float64(net: Network, x: torch.Tensor, y: torch.Tensor, input_set: InputSet,
                      margins: torch.Tensor, recompute: Recompute, net64: Network | None = None) -> torch.Tensor:
    """``margins`` ``(B, n)`` with every example near zero replaced by its float64 recomputation.

    An example is near zero when its worst margin ``min_{j != y} J_j`` satisfies ``|worst| <= tau``
    (:func:`rounding_tolerance`); its row becomes ``recompute(net64, index, x64, y, set)`` (cast back to
    ``margins``' dtype, which keeps every sign or rounds a positive value to 0: never a new
    certificate).  float64 margins are returned as they are.  The result is detached.
    """
    margins = margins.detach()
    if x.dtype == torch.float64 or x.shape[0] == 0:
        return margins
    tau = rounding_tolerance(net, x, input_set).to(margins.device)
    worst = worst_of(margins, y.to(margins.device))
    index = (worst.abs() <= tau).nonzero().flatten()
    if index.numel() == 0:
        return margins
    net64 = net64 if net64 is not None else as_float64(net)
    cpu = index.cpu()
    exact = recompute(net64, cpu, x[index].detach().cpu().double(), y[index].cpu(),
                      input_set.subset(x.shape[0], cpu))
    out = margins.clone()
    out[index] = exact.detach().to(dtype=out.dtype, device=out.device)
    return out
