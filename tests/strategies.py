"""Hypothesis strategies and helpers for the engine tests (dual bounds, certificates, sets).

Everything is built in float64 from a seed drawn by hypothesis, so a failing example
shrinks to a small architecture and replays exactly.

Strategies
----------
* :func:`fc_nets`, :func:`conv_nets`, :func:`nets` -- ``(seq, in_shape)``: a random
  ``nn.Sequential`` with 1-3 ReLU layers (fully connected, or 1-2 convolutions with random
  stride 1-2, padding 0-1 and bias on/off followed by linear layers) and its input shape.
* :func:`seq_and_x` -- ``(seq, x)``: such a network and a batch of inputs in ``[0, 1]``.
* :func:`cases` -- a :class:`Case`: network, inputs and an input set whose radius makes
  a good share (roughly 20-80 %) of the first layer's units unstable.

Helpers
-------
* :func:`make_set` -- one of the four input sets by name (:data:`SET_KINDS`).
* :func:`first_layer_rows` -- the first affine map ``x -> A x + b`` of a ``Sequential``
  as an explicit matrix (computed by torch on basis vectors, independent of polytope).
* :func:`in_set` -- membership test of points in a set, written from the norms directly.
* :func:`project` -- Euclidean projection onto a set, written independently of polytope.
* :func:`pgd_minimize` -- a small projected-gradient minimiser of several objectives at
  once; used to find near-extreme points that a sound lower bound must not exceed.
* :func:`pre_activations` -- the pre-ReLU values of a ``Sequential`` at a batch of points.
* :func:`single_thread` -- run torch on one thread (use it in an autouse fixture).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from torch import nn

import polytope as pt

DTYPE = torch.float64

#: Names of the input sets, as accepted by :func:`make_set`.
SET_KINDS = ("linf", "linf-box", "l2", "l1")

#: Settings for property tests that build and bound a network per example.
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fast(n: int) -> settings:
    """:data:`FAST` with ``max_examples=n``."""
    return settings(FAST, max_examples=n)


def fast_no_shrink(n: int) -> settings:
    """:func:`fast` without the shrink phase, for tests whose examples cost a PGD run each.

    A failure is then reported as found (not minimised), instead of after minutes of shrinking.
    """
    return settings(fast(n), phases=[Phase.explicit, Phase.reuse, Phase.generate])


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the previous count.

    The engine tests work on tiny tensors, where extra threads only add overhead, and on a
    busy 2-core machine they oversubscribe it badly (a 10x slowdown was observed).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# -- networks ---------------------------------------------------------------------------------


def _init(module: nn.Module, gen: torch.Generator, gain: float, bias_scale: float) -> None:
    """Gaussian weights of variance ``gain^2 / fan_in`` and Gaussian biases, from ``gen``."""
    w = module.weight
    fan_in = w[0].numel()
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * gain / math.sqrt(fan_in))
        if module.bias is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen, dtype=w.dtype) * bias_scale)


def build_fc(n_in: int, widths: list[int], n_out: int, seed: int, gain: float = 1.3) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` with hidden ``widths`` (one ReLU per width), float64."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    sizes = [n_in, *widths]
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], n_out))
    seq = nn.Sequential(*layers).to(DTYPE)
    for m in seq:
        if isinstance(m, nn.Linear):
            _init(m, gen, gain, 0.3)
    return seq.eval()


Pair = int | tuple[int, int]


def _along(value: Pair, axis: int) -> int:
    return value if isinstance(value, int) else value[axis]


@dataclass(frozen=True)
class ConvSpec:
    """One convolution: ``out_channels``, ``kernel``, ``stride``, ``padding`` (an int, or one per
    axis as in ``nn.Conv2d``), ``bias``."""

    out_channels: int
    kernel: Pair
    stride: Pair
    padding: Pair
    bias: bool


def conv_out(n: int, spec: ConvSpec, axis: int = 0) -> int:
    """Output size of ``spec`` along ``axis`` (0: height, 1: width) for an input of size ``n``."""
    k, s, p = (_along(v, axis) for v in (spec.kernel, spec.stride, spec.padding))
    return (n + 2 * p - k) // s + 1


def build_conv(
    in_shape: tuple[int, int, int],
    convs: list[ConvSpec],
    widths: list[int],
    n_out: int,
    seed: int,
    gain: float = 1.3,
) -> nn.Sequential:
    """``Conv2d -> ReLU`` per spec, ``Flatten``, then ``Linear -> ReLU`` per width and a final Linear."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = in_shape
    layers: list[nn.Module] = []
    for spec in convs:
        layers += [
            nn.Conv2d(c, spec.out_channels, spec.kernel, spec.stride, spec.padding, bias=spec.bias),
            nn.ReLU(),
        ]
        c, h, w = spec.out_channels, conv_out(h, spec, 0), conv_out(w, spec, 1)
    layers.append(nn.Flatten())
    sizes = [c * h * w, *widths]
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], n_out))
    seq = nn.Sequential(*layers).to(DTYPE)
    for m in seq:
        if isinstance(m, nn.Linear | nn.Conv2d):
            _init(m, gen, gain, 0.3)
    return seq.eval()


seeds = st.integers(0, 2**31 - 1)


@st.composite
def fc_nets(
    draw: st.DrawFn,
    min_hidden: int = 1,
    max_hidden: int = 3,
    max_in: int = 6,
    max_width: int = 8,
    max_out: int = 4,
) -> tuple[nn.Sequential, tuple[int, ...]]:
    """A fully connected ReLU net with ``min_hidden..max_hidden`` hidden layers and its input shape."""
    n_in = draw(st.integers(1, max_in))
    widths = draw(st.lists(st.integers(1, max_width), min_size=min_hidden, max_size=max_hidden))
    n_out = draw(st.integers(2, max_out))
    return build_fc(n_in, widths, n_out, draw(seeds)), (n_in,)


@st.composite
def conv_specs(draw: st.DrawFn, size: int) -> ConvSpec:
    """A convolution that fits an input of spatial size ``size``; kernel, stride and padding may
    differ between the two axes (such convolutions take other code paths than square ones)."""

    def pair(values: st.SearchStrategy[int]) -> Pair:
        if draw(st.booleans()):
            return draw(values)
        return draw(values), draw(values)

    padding = pair(st.integers(0, 1))
    kernel = pair(st.integers(1, min(3, size + 2 * min(_along(padding, 0), _along(padding, 1)))))
    return ConvSpec(draw(st.integers(1, 3)), kernel, pair(st.integers(1, 2)), padding, draw(st.booleans()))


@st.composite
def conv_nets(
    draw: st.DrawFn, max_convs: int = 2, max_fc: int = 1, max_size: int = 6
) -> tuple[nn.Sequential, tuple[int, ...]]:
    """1-``max_convs`` convolutions then 0-``max_fc`` hidden linear layers (at most 3 ReLU layers)."""
    in_shape = (draw(st.integers(1, 2)), draw(st.integers(3, max_size)), draw(st.integers(3, max_size)))
    specs: list[ConvSpec] = []
    h, w = in_shape[1:]
    for _ in range(draw(st.integers(1, max_convs))):
        spec = draw(conv_specs(min(h, w)))
        specs.append(spec)
        h, w = conv_out(h, spec, 0), conv_out(w, spec, 1)
    widths = draw(st.lists(st.integers(1, 6), min_size=0, max_size=min(max_fc, 3 - len(specs))))
    n_out = draw(st.integers(2, 4))
    return build_conv(in_shape, specs, widths, n_out, draw(seeds)), in_shape


def nets(kind: str = "any") -> st.SearchStrategy[tuple[nn.Sequential, tuple[int, ...]]]:
    """``(seq, in_shape)`` of the given ``kind``: ``"fc"``, ``"conv"`` or ``"any"``."""
    if kind == "fc":
        return fc_nets()
    if kind == "conv":
        return conv_nets()
    return st.one_of(fc_nets(), conv_nets())


@st.composite
def seq_and_x(
    draw: st.DrawFn, kind: str = "any", min_batch: int = 1, max_batch: int = 3
) -> tuple[nn.Sequential, torch.Tensor]:
    """A network of ``kind`` (see :func:`nets`) and a float64 batch of inputs uniform in ``[0, 1]``."""
    seq, in_shape = draw(nets(kind))
    batch = draw(st.integers(min_batch, max_batch))
    gen = torch.Generator().manual_seed(draw(seeds))
    return seq, torch.rand((batch, *in_shape), generator=gen, dtype=DTYPE)


# -- input sets -----------------------------------------------------------------------------


def make_set(kind: str, eps: float | torch.Tensor) -> pt.InputSet:
    """The input set named ``kind`` (one of :data:`SET_KINDS`); the box of ``linf-box`` is ``[0, 1]``."""
    if kind == "linf":
        return pt.LinfBall(eps)
    if kind == "linf-box":
        return pt.BoxedLinfBall(eps, 0.0, 1.0)
    if kind == "l2":
        return pt.L2Ball(eps)
    if kind == "l1":
        return pt.L1Ball(eps)
    raise ValueError(f"unknown set kind {kind!r}")


def dual_norm_rows(rows: torch.Tensor, kind: str) -> torch.Tensor:
    """Dual norm of each row of ``rows: (..., n)``: l1 for l_inf sets, l2 for l2, l_inf for l1."""
    if kind in ("linf", "linf-box"):
        return rows.abs().sum(-1)
    if kind == "l2":
        return rows.norm(dim=-1)
    return rows.abs().amax(-1)


def first_layer_rows(seq: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, b)`` with ``A: (n_hidden, n_in)`` such that the first pre-activation is ``A x + b``.

    The modules before the first ReLU are applied to the zero vector and to the basis vectors
    (plain torch, no polytope code).
    """
    prefix = []
    for m in _flat_modules(seq):
        if isinstance(m, nn.ReLU):
            break
        prefix.append(m)
    f = nn.Sequential(*prefix)
    n_in = x[0].numel()
    with torch.no_grad():
        b = f(torch.zeros((1, *x.shape[1:]), dtype=x.dtype)).flatten()
        eye = torch.eye(n_in, dtype=x.dtype).reshape(n_in, *x.shape[1:])
        cols = f(eye).flatten(1) - b
    return cols.T.contiguous(), b


def _flat_modules(seq: nn.Module) -> list[nn.Module]:
    out = []
    for m in seq.children():
        out.extend(_flat_modules(m) if isinstance(m, nn.Sequential) else [m])
    return out


def pre_activations(seq: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every ReLU of ``seq`` (nested Sequentials flattened) at the batch ``x``."""
    out = []
    z = x
    for m in _flat_modules(seq):
        if isinstance(m, nn.ReLU):
            out.append(z)
        z = m(z)
    return out


def unstable_eps(seq: nn.Sequential, x: torch.Tensor, kind: str, fraction: float) -> float:
    """A radius at which about ``fraction`` of the first layer's units are unstable (0 < l, u)."""
    a, b = first_layer_rows(seq, x)
    centre = x.flatten(1) @ a.T + b
    radius = dual_norm_rows(a, kind).clamp_min(1e-12)
    ratio = (centre.abs() / radius).flatten()
    eps = float(torch.quantile(ratio, fraction))
    return max(eps, 1e-3)


@dataclass(frozen=True)
class Case:
    """A network, a batch ``x`` and an input set ``input_set`` of kind ``kind``."""

    seq: nn.Sequential
    x: torch.Tensor
    input_set: pt.InputSet
    kind: str

    @property
    def net(self) -> pt.Network:
        return pt.Network.from_torch(self.seq)

    @property
    def eps(self) -> torch.Tensor:
        """The radius as a ``(B,)`` tensor."""
        e = self.input_set.eps
        if isinstance(e, torch.Tensor):
            return e.to(self.x.dtype).reshape(-1).expand(self.x.shape[0])
        return torch.full((self.x.shape[0],), float(e), dtype=self.x.dtype)


@st.composite
def cases(
    draw: st.DrawFn,
    kind: str = "any",
    set_kinds: tuple[str, ...] = SET_KINDS,
    per_example: bool = False,
    min_batch: int = 1,
    max_batch: int = 3,
) -> Case:
    """A :class:`Case` whose radius makes roughly 20-80 % of the first layer unstable.

    ``per_example=True`` gives every example its own radius (a ``(B,)`` tensor).
    """
    seq, x = draw(seq_and_x(kind, min_batch, max_batch))
    set_kind = draw(st.sampled_from(set_kinds))
    if per_example:
        eps: float | torch.Tensor = torch.tensor(
            [unstable_eps(seq, x[i : i + 1], set_kind, draw(st.floats(0.2, 0.8))) for i in range(len(x))],
            dtype=DTYPE,
        )
    else:
        eps = unstable_eps(seq, x, set_kind, draw(st.floats(0.2, 0.8)))
    return Case(seq, x, make_set(set_kind, eps), set_kind)


# -- independent set geometry, sampling and PGD ---------------------------------------------


def _kind_of(input_set: pt.InputSet) -> str:
    if isinstance(input_set, pt.BoxedLinfBall):
        return "linf-box"
    if isinstance(input_set, pt.LinfBall):
        return "linf"
    if isinstance(input_set, pt.L2Ball):
        return "l2"
    if isinstance(input_set, pt.L1Ball):
        return "l1"
    raise TypeError(f"unknown input set {input_set!r}")


def _eps_view(input_set: pt.InputSet, x: torch.Tensor) -> torch.Tensor:
    e = input_set.eps
    e = e.to(x.dtype).reshape(-1) if isinstance(e, torch.Tensor) else torch.tensor([float(e)], dtype=x.dtype)
    e = e.expand(x.shape[0]) if e.numel() == 1 else e
    return e.reshape(-1, *([1] * (x.dim() - 1)))


def in_set(input_set: pt.InputSet, x: torch.Tensor, pts: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """``(B, n)`` booleans: is ``pts[b, k]`` in the set around ``x[b]`` (up to ``tol``)?"""
    kind = _kind_of(input_set)
    eps = _eps_view(input_set, x).flatten()
    d = (pts - x.unsqueeze(1)).flatten(2)
    if kind == "l2":
        return d.norm(dim=2) <= eps[:, None] * (1 + tol) + tol
    if kind == "l1":
        return d.abs().sum(2) <= eps[:, None] * (1 + tol) + tol
    ok = d.abs().amax(2) <= eps[:, None] * (1 + tol) + tol
    if kind == "linf-box":
        flat = pts.flatten(2)
        ok &= (flat >= input_set.lo - tol).all(2) & (flat <= input_set.hi + tol).all(2)
    return ok


def project(input_set: pt.InputSet, x: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``pts: (B, n, *in_shape)`` onto the set around ``x: (B, *in_shape)``.

    Written from the definitions (l1 by sorting for the soft-threshold), not with polytope.
    """
    kind = _kind_of(input_set)
    eps = _eps_view(input_set, x).flatten()[:, None, None]
    shape = pts.shape
    d = (pts - x.unsqueeze(1)).flatten(2)
    if kind in ("linf", "linf-box"):
        d = torch.maximum(torch.minimum(d, eps), -eps)
        out = x.unsqueeze(1).flatten(2) + d
        if kind == "linf-box":
            out = out.clamp(input_set.lo, input_set.hi)
        return out.reshape(shape)
    if kind == "l2":
        norm = d.norm(dim=2, keepdim=True).clamp_min(1e-300)
        d = d * torch.clamp(eps / norm, max=1.0)
    else:
        # soft-thresholding at the theta that makes the l1 norm eps (Duchi et al. 2008)
        a = d.abs()
        s, _ = a.sort(dim=2, descending=True)
        excess = s.cumsum(2) - eps
        k = torch.arange(1, a.shape[2] + 1, dtype=a.dtype)
        count = (s * k > excess).sum(2, keepdim=True).clamp_min(1)
        theta = excess.gather(2, count - 1) / count
        inside = a.sum(2, keepdim=True) <= eps
        d = torch.where(inside, d, d.sign() * (a - theta).clamp_min(0))
    return (x.unsqueeze(1).flatten(2) + d).reshape(shape)


def sample(input_set: pt.InputSet, x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` points of the set per example, ``(B, n, *in_shape)``, drawn without polytope.

    Uniform points of the bounding box (a quarter of them box corners) projected onto the set;
    the centre ``x`` itself (projected, for a clipped box) is the first point.
    """
    gen = torch.Generator().manual_seed(seed)
    eps = _eps_view(input_set, x).unsqueeze(1)
    u = torch.rand((x.shape[0], n, *x.shape[1:]), generator=gen, dtype=x.dtype) * 2 - 1
    u[:, 1 : 1 + n // 4] = u[:, 1 : 1 + n // 4].sign()
    pts = project(input_set, x, x.unsqueeze(1) + eps * u)
    pts[:, 0] = project(input_set, x, x.unsqueeze(1))[:, 0]
    return pts


def pgd_minimize(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    input_set: pt.InputSet,
    m: int,
    steps: int = 50,
    restarts: int = 2,
    seed: int = 0,
) -> torch.Tensor:
    """Approximately ``min_{x' in S(x)} fn(x')[:, j]`` for every ``j < m``; returns ``(B, m)``.

    ``fn`` maps points ``(N, *in_shape)`` to ``(N, m)``.  Every objective gets its own iterate:
    steepest-descent steps for the set's norm (sign of the gradient for l_inf, the normalised
    gradient for l2, the largest coordinate for l1) of decreasing size, each followed by the
    projection.  The first run starts at ``x``, later ones at random points of the set.
    The value returned is the smallest seen, at a point of the set, so it is an *upper*
    bound on the true minimum that any sound lower bound must not exceed.
    """
    kind = _kind_of(input_set)
    batch = x.shape[0]
    eps = _eps_view(input_set, x).flatten()
    idx = torch.arange(m)
    best = torch.full((batch, m), math.inf, dtype=x.dtype)
    for run in range(restarts):
        if run == 0:
            start = x.unsqueeze(1).expand(batch, m, *x.shape[1:]).clone()
            start = project(input_set, x, start)
        else:
            start = sample(input_set, x, m + 1, seed=seed + run)[:, 1:]
        xp = start
        for t in range(steps + 1):
            xp = xp.detach().requires_grad_(True)
            with torch.enable_grad():
                vals = fn(xp.flatten(0, 1)).reshape(batch, m, m)[:, idx, idx]
                (grad,) = torch.autograd.grad(vals.sum(), xp)
            best = torch.minimum(best, vals.detach())
            if t == steps:
                break
            size = (2.0 * (1 - t / steps) + 0.05) * eps[:, None, None] / math.sqrt(steps)
            g = grad.flatten(2)
            if kind in ("linf", "linf-box"):
                step = g.sign()
            elif kind == "l2":
                step = g / g.norm(dim=2, keepdim=True).clamp_min(1e-300)
            else:
                step = torch.zeros_like(g).scatter(2, g.abs().argmax(2, keepdim=True), 1.0) * g.sign()
            xp = project(input_set, x, (xp.detach().flatten(2) - size * step).reshape(xp.shape))
    return best
