"""Random ReLU graphs as torch modules, and an exact minimiser written without polytope.

A :class:`ProgramNet` interprets a *program*: a list of :class:`Step` s, each reading earlier
registers (register 0 is the input) and writing one new register; the last register is the
output.  ``forward`` branches only on the program (static Python data), so ``torch.fx`` traces
it into the residual additions, subtractions, scalings, concatenations, ReLUs, Linear / Conv2d /
BatchNorm layers, max / average pooling and flattens it spells -- each in several of the
spellings torch offers (``torch.relu``, ``F.relu``, ``nn.ReLU``, ``x.relu()``, ...).

Strategies
----------
* :func:`programs` -- ``(ProgramNet, in_shape)`` for ``kind`` ``"fc"``, ``"conv"`` or ``"any"``;
  ``tiny=True`` keeps graphs small enough for :func:`exact_min`.
* :func:`chain_program` -- a program that is a plain chain, and the ``nn.Sequential`` of the
  same module objects.

Exact minimum
-------------
:func:`exact_min` enumerates the linear pieces of the module over an l_inf box: every ReLU and
every max-pooling output is a choice among candidates (``max(0, v)``: two; a window: its taps),
each choice a polyhedron of the input; a depth-first search keeps the feasible choices
(scipy's ``linprog``) and minimises ``c^T f`` on every leaf.  The candidates are affine in the
input once the earlier choices are fixed, and are read off a forward pass at the box centre and
at unit steps (plain torch, no polytope code).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

DTYPE = torch.float64
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Step:
    """One instruction: ``op`` on registers ``args`` with parameters ``params``, spelt as ``style``."""

    op: str
    args: tuple[int, ...]
    params: tuple = ()
    style: int = 0


def _pair_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def step_shape(step: Step, shapes: list[Shape]) -> Shape:
    """The shape (one example) of the register ``step`` writes."""
    a = shapes[step.args[0]]
    if step.op == "linear":
        return (step.params[0],)
    if step.op == "conv":
        c, k, s, p = step.params
        return (c, _pair_out(a[1], k, s, p), _pair_out(a[2], k, s, p))
    if step.op in ("maxpool", "avgpool"):
        k, s, p = step.params
        return (a[0], _pair_out(a[1], k, s, p), _pair_out(a[2], k, s, p))
    if step.op == "adaptive":
        return (a[0], 1, 1)
    if step.op == "flatten":
        return (math.prod(a),)
    if step.op == "cat":
        b = shapes[step.args[1]]
        return (a[0] + b[0], *a[1:])
    return a  # relu, add, sub, scale, bn


class ProgramNet(nn.Module):
    """A torch module running a program of :class:`Step` s (see the module docstring)."""

    def __init__(self, program: list[Step], in_shape: Shape, seed: int, gain: float = 1.2) -> None:
        super().__init__()
        self.program = list(program)
        self.in_shape = tuple(in_shape)
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        shapes: list[Shape] = [self.in_shape]
        layers: dict[str, nn.Module] = {}
        for i, step in enumerate(self.program):
            module = _make_module(step, shapes, gen, gain)
            if module is not None:
                layers[str(i)] = module
            shapes.append(step_shape(step, shapes))
        self.shapes = shapes
        self.layers = nn.ModuleDict(layers)
        self.to(DTYPE).eval().requires_grad_(False)  # fixed weights: gradients only flow to inputs

    def extra_repr(self) -> str:
        steps = ",\n  ".join(map(repr, self.program))
        return f"in_shape={self.in_shape}, seed={self.seed}, program=[\n  {steps}]"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        regs = [x]
        for i, step in enumerate(self.program):
            regs.append(self._step(i, step, regs))
        return regs[-1]

    def _step(self, i: int, step: Step, regs: list[torch.Tensor]) -> torch.Tensor:
        a = regs[step.args[0]]
        op, style = step.op, step.style
        if op in ("linear", "conv", "bn"):
            return self.layers[str(i)](a)
        if op == "relu":
            if style == 0:
                return torch.relu(a)
            if style == 1:
                return F.relu(a)
            return self.layers[str(i)](a) if style == 2 else a.relu()
        if op in ("add", "sub"):
            b = regs[step.args[1]]
            if op == "add":
                return _add(a, b, style)
            return a - b if style == 0 else torch.sub(a, b)
        if op == "scale":
            return _scale(a, step.params[0], style)
        if op == "cat":
            b = regs[step.args[1]]
            dim = -len(self.shapes[step.args[0]]) if style == 2 else 1
            return torch.cat([a, b], dim) if style != 1 else torch.cat((a, b), dim=dim)
        if op == "maxpool":
            k, s, p = step.params
            if style == 0:
                return self.layers[str(i)](a)
            return F.max_pool2d(a, k, s, p) if style == 1 else F.max_pool2d(a, kernel_size=k, stride=s, padding=p)
        if op == "avgpool":
            k, s, p = step.params
            return self.layers[str(i)](a) if style == 0 else F.avg_pool2d(a, k, s, p)
        if op == "adaptive":
            return self.layers[str(i)](a) if style == 0 else F.adaptive_avg_pool2d(a, 1)
        if op == "flatten":
            if style == 0:
                return torch.flatten(a, 1)
            if style == 1:
                return a.view(a.size(0), -1)
            if style == 2:
                return self.layers[str(i)](a)
            return a.reshape(a.shape[0], -1) if style == 3 else a.flatten(1)
        raise ValueError(f"unknown step {step}")


def _add(a: torch.Tensor, b: torch.Tensor, style: int) -> torch.Tensor:
    if style == 0:
        return a + b
    return torch.add(a, b) if style == 1 else a.add(b)


def _scale(a: torch.Tensor, k: float, style: int) -> torch.Tensor:
    if style == 0:
        return a * k
    if style == 1:
        return k * a
    return a / k if style == 2 else -a


def _make_module(step: Step, shapes: list[Shape], gen: torch.Generator, gain: float) -> nn.Module | None:
    a = shapes[step.args[0]]
    if step.op == "linear":
        m = nn.Linear(a[0], step.params[0]).to(DTYPE)
        _init(m, gen, gain)
        return m
    if step.op == "conv":
        c, k, s, p = step.params
        m = nn.Conv2d(a[0], c, k, s, p).to(DTYPE)
        _init(m, gen, gain)
        return m
    if step.op == "bn":
        m = (nn.BatchNorm1d if len(a) == 1 else nn.BatchNorm2d)(a[0]).to(DTYPE)
        with torch.no_grad():
            m.running_mean.copy_(torch.randn(a[0], generator=gen, dtype=DTYPE) * 0.3)
            m.running_var.copy_(torch.rand(a[0], generator=gen, dtype=DTYPE) + 0.5)
            m.weight.copy_(torch.rand(a[0], generator=gen, dtype=DTYPE) + 0.5)
            m.bias.copy_(torch.randn(a[0], generator=gen, dtype=DTYPE) * 0.2)
        return m
    if step.op == "relu" and step.style == 2:
        return nn.ReLU()
    if step.op == "maxpool" and step.style == 0:
        return nn.MaxPool2d(*step.params)
    if step.op == "avgpool" and step.style == 0:
        return nn.AvgPool2d(*step.params)
    if step.op == "adaptive" and step.style == 0:
        return nn.AdaptiveAvgPool2d((1, 1))
    if step.op == "flatten" and step.style == 2:
        return nn.Flatten()
    return None


def _init(m: nn.Linear | nn.Conv2d, gen: torch.Generator, gain: float) -> None:
    fan_in = m.weight[0].numel()
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=DTYPE) * gain / math.sqrt(fan_in))
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=DTYPE) * 0.3)


# -- strategies -----------------------------------------------------------------------------------


class _Writer:
    """Appends steps to a program, tracking every register's shape."""

    def __init__(self, in_shape: Shape) -> None:
        self.shapes: list[Shape] = [in_shape]
        self.program: list[Step] = []

    def __call__(self, op: str, args: tuple[int, ...], params: tuple = (), style: int = 0) -> int:
        step = Step(op, args, params, style)
        self.shapes.append(step_shape(step, self.shapes))
        self.program.append(step)
        return len(self.shapes) - 1

    def recent(self, rank: int) -> list[int]:
        """The last three registers of this rank (1: vectors, 3: images)."""
        return [i for i, s in enumerate(self.shapes) if len(s) == rank][-3:]


_FC_BLOCKS = ("dense", "dense", "residual", "residual", "branches", "skip", "affine")
_CONV_BLOCKS = ("conv", "conv", "residual", "branches", "maxpool", "maxpool", "avgpool", "affine", "adaptive")


@st.composite
def _relu(draw: st.DrawFn, w: _Writer, src: int) -> int:
    return w("relu", (src,), (), draw(st.integers(0, 3)))


@st.composite
def _combine(draw: st.DrawFn, w: _Writer, a: int, b: int) -> int:
    """``a + b``, ``a - b`` or ``a + k b`` in one of their spellings."""
    how = draw(st.sampled_from(["add", "sub", "scaled"]))
    if how == "scaled":
        style = draw(st.integers(0, 3))
        b = w("scale", (b,), (-1.0 if style == 3 else draw(st.sampled_from([0.5, -0.75, 2.0, 3])),), style)
        how = "add"
    return w(how, (a, b), (), draw(st.integers(0, 2 if how == "add" else 1)))


@st.composite
def _fc_block(draw: st.DrawFn, w: _Writer, max_width: int) -> None:
    src = draw(st.sampled_from(w.recent(1)))
    n = w.shapes[src][0]
    block = draw(st.sampled_from(_FC_BLOCKS))
    width = st.integers(1, max_width)
    if block == "dense":
        draw(_relu(w, w("linear", (src,), (draw(width),))))
    elif block == "residual":  # src + f(src)
        h = draw(_relu(w, w("linear", (src,), (n,))))
        if draw(st.booleans()):
            h = w("linear", (h,), (n,))
        draw(_combine(w, src, h))
    elif block == "branches":  # cat(relu(A src), relu(B src)) or cat(src, relu(A src))
        a = draw(_relu(w, w("linear", (src,), (draw(width),))))
        b = src if draw(st.booleans()) else draw(_relu(w, w("linear", (src,), (draw(width),))))
        w("cat", (a, b), (), draw(st.integers(0, 2)))
    elif block == "skip":  # A src + B older, both of width m
        older = draw(st.sampled_from(w.recent(1)))
        m = draw(width)
        draw(_combine(w, w("linear", (src,), (m,)), w("linear", (older,), (m,))))
    else:
        draw(_elementwise(w, src))


@st.composite
def _elementwise(draw: st.DrawFn, w: _Writer, src: int) -> None:
    """An eval-mode batch norm or a scalar multiple (four spellings) of ``src``."""
    if draw(st.booleans()):
        w("bn", (src,))
    else:
        style = draw(st.integers(0, 3))
        w("scale", (src,), (-1.0 if style == 3 else draw(st.sampled_from([0.5, -2.0, 1.5])),), style)


@st.composite
def _conv_block(draw: st.DrawFn, w: _Writer, max_channels: int) -> None:
    src = draw(st.sampled_from(w.recent(3)))
    c, h, wd = w.shapes[src]
    size = min(h, wd)
    block = draw(st.sampled_from(_CONV_BLOCKS))
    channels = st.integers(1, max_channels)
    if block in ("maxpool", "avgpool") and size >= 2:
        k = draw(st.integers(2, min(3, size)))
        p = draw(st.integers(0, min(1, k // 2)))
        w(block, (src,), (k, draw(st.integers(1, 2)), p), draw(st.integers(0, 1 if block == "avgpool" else 2)))
    elif block == "conv" or (block in ("maxpool", "avgpool") and size < 2):
        p = draw(st.integers(0, 1))
        k = draw(st.integers(1, min(3, size + 2 * p)))
        draw(_relu(w, w("conv", (src,), (draw(channels), k, draw(st.integers(1, 2)), p))))
    elif block == "residual":  # src + f(src), f keeping the shape
        k = draw(st.sampled_from([1, 3]))
        f = draw(_relu(w, w("conv", (src,), (c, k, 1, k // 2))))
        if draw(st.booleans()):
            f = w("bn", (f,))
        draw(_combine(w, src, f))
    elif block == "branches":  # channel concatenation of two same-size branches
        k = draw(st.sampled_from([1, 3]))
        a = draw(_relu(w, w("conv", (src,), (draw(channels), k, 1, k // 2))))
        b = src if draw(st.booleans()) else w("conv", (src,), (draw(channels), 1, 1, 0))
        w("cat", (a, b), (), draw(st.integers(0, 2)))
    elif block == "adaptive":
        w("adaptive", (src,), (), draw(st.integers(0, 1)))
    else:
        draw(_elementwise(w, src))


@st.composite
def programs(draw: st.DrawFn, kind: str = "any", tiny: bool = False) -> tuple[ProgramNet, Shape]:
    """A random :class:`ProgramNet` of ``kind`` (``"fc"``, ``"conv"``, ``"any"``) and its input shape.

    Conv programs run 1-3 conv blocks, a flatten and 0-1 fc blocks; fc programs 1-3 fc blocks
    (``tiny``: 1-2 blocks of smaller widths).  A Linear head to 2-3 outputs ends every program.
    """
    kind = draw(st.sampled_from(["fc", "conv"])) if kind == "any" else kind
    max_width = 3 if tiny else 5
    if kind == "fc":
        w = _Writer((draw(st.integers(1, 3 if tiny else 4)),))
        for _ in range(draw(st.integers(1, 2 if tiny else 3))):
            draw(_fc_block(w, max_width))
    else:
        side = draw(st.integers(3, 4 if tiny else 5))
        w = _Writer((draw(st.integers(1, 1 if tiny else 2)), side, draw(st.integers(3, side))))
        for _ in range(draw(st.integers(1, 2 if tiny else 3))):
            draw(_conv_block(w, 2 if tiny else 3))
        w("flatten", (len(w.shapes) - 1,), (), draw(st.integers(0, 4)))
        for _ in range(draw(st.integers(0, 0 if tiny else 1))):
            draw(_fc_block(w, max_width))
    w("linear", (len(w.shapes) - 1,), (draw(st.integers(2, 3)),))
    return ProgramNet(w.program, w.shapes[0], draw(st.integers(0, 2**31 - 1))), w.shapes[0]


def chain_program(kind: str, seed: int) -> tuple[ProgramNet, nn.Sequential, Shape]:
    """A program that is a plain chain (the modules of one ``nn.Sequential``) and that Sequential."""
    if kind == "fc":
        in_shape: Shape = (4,)
        program = [Step("linear", (0,), (5,)), Step("relu", (1,), (), 2), Step("linear", (2,), (4,)),
                   Step("relu", (3,), (), 2), Step("linear", (4,), (3,))]
    else:
        in_shape = (2, 5, 5)
        program = [Step("conv", (0,), (3, 3, 1, 1)), Step("bn", (1,)), Step("relu", (2,), (), 2),
                   Step("conv", (3,), (2, 3, 2, 0)), Step("relu", (4,), (), 2), Step("flatten", (5,), (), 2),
                   Step("linear", (6,), (4,)), Step("relu", (7,), (), 2), Step("linear", (8,), (3,))]
    net = ProgramNet(program, in_shape, seed)
    seq = nn.Sequential(*(net.layers[str(i)] for i in range(len(program))))
    return net, seq, in_shape


# -- the exact minimum over an l_inf box, without polytope ------------------------------------------------


def _pieces(step: Step, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates ``(B, K, *out)`` and their validity ``(K, *out)`` of a ReLU or max-pooling step."""
    if step.op == "relu":
        return torch.stack([torch.zeros_like(a), a], 1), torch.ones((2, *a.shape[1:]), dtype=torch.bool)
    k, s, p = step.params
    b, c, h, w = a.shape
    oh, ow = _pair_out(h, k, s, p), _pair_out(w, k, s, p)
    cols = F.unfold(a, k, padding=p, stride=s).reshape(b, c, k * k, oh, ow).transpose(1, 2)
    ones = F.unfold(torch.ones((1, c, h, w), dtype=a.dtype), k, padding=p, stride=s)
    return cols, ones.reshape(c, k * k, oh, ow).transpose(0, 1) > 0.5


@torch.no_grad()
def forced(net: ProgramNet, x: torch.Tensor, choices: list[torch.Tensor]
           ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``net`` with its first ``len(choices)`` piecewise steps forced to the chosen candidates.

    Later piecewise steps take their true maximum.  Returns the output and every piecewise
    step's candidates and validity (:func:`_pieces`).
    """
    regs = [x]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, step in enumerate(net.program):
        if step.op not in ("relu", "maxpool"):
            regs.append(net._step(i, step, regs))
            continue
        cands, valid = _pieces(step, regs[step.args[0]])
        r = len(seen)
        seen.append((cands, valid))
        if r < len(choices):
            idx = choices[r].reshape(1, 1, *cands.shape[2:]).expand(cands.shape[0], 1, *cands.shape[2:])
            regs.append(cands.gather(1, idx)[:, 0])
        else:
            regs.append(cands.masked_fill(~valid, -math.inf).amax(1))
    return regs[-1], seen


@dataclass
class _Region:
    a_ub: list[np.ndarray]
    b_ub: list[float]


def exact_min(net: ProgramNet, x0: torch.Tensor, eps: float, c: torch.Tensor, budget: int = 400) -> float | None:
    """``min c^T net(x)`` over ``|x - x0|_inf <= eps`` by enumerating linear pieces (``None`` past ``budget`` LPs).

    ``x0``: one example ``(1, *in_shape)``; ``c: (n_out,)``.
    """
    n = x0[0].numel()
    eye = torch.eye(n, dtype=DTYPE).reshape(n, *x0.shape[1:])
    points = torch.cat([x0, x0 + eye])  # centre, then unit steps: affine maps are read off exactly
    box = [(-eps, eps)] * n
    n_calls = sum(step.op in ("relu", "maxpool") for step in net.program)
    lps = [0]

    def affine(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        flat = t.flatten(1).numpy()
        return flat[0], (flat[1:] - flat[0]).T  # value at the centre, Jacobian rows

    def feasible(region: _Region) -> bool:
        lps[0] += 1
        res = scipy.optimize.linprog(np.zeros(n), A_ub=np.array(region.a_ub), b_ub=np.array(region.b_ub),
                                     bounds=box, method="highs")
        return res.status == 0

    def leaf(choices: list[torch.Tensor], region: _Region) -> float:
        out, _ = forced(net, points, choices)
        a0, g = affine(out @ c.reshape(-1, 1))
        lps[0] += 1
        res = scipy.optimize.linprog(g[0], A_ub=np.array(region.a_ub) if region.a_ub else None,
                                     b_ub=np.array(region.b_ub) if region.b_ub else None, bounds=box, method="highs")
        return math.inf if res.status != 0 else float(res.fun + a0[0])

    def call(r: int, choices: list[torch.Tensor], region: _Region) -> float:
        if lps[0] > budget:
            raise _Budget
        if r == n_calls:
            return leaf(choices, region)
        _, seen = forced(net, points, choices)
        cands, valid = seen[r]
        k = cands.shape[1]
        vals = cands.reshape(cands.shape[0], k, -1)
        valid_flat = valid.reshape(k, -1).numpy()
        units = [affine(vals[:, j]) for j in range(k)]  # per candidate: centre values (U,), Jacobian (U, n)
        radius = [eps * np.abs(g).sum(1) for _, g in units]
        chosen = np.zeros(vals.shape[2], dtype=np.int64)
        shape = cands.shape[2:]

        def unit(u: int, region: _Region) -> float:
            if u == vals.shape[2]:
                return call(r + 1, [*choices, torch.from_numpy(chosen.copy()).reshape(shape)], region)
            opts = [j for j in range(k) if valid_flat[j, u]]
            lo = {j: units[j][0][u] - radius[j][u] for j in opts}
            hi = {j: units[j][0][u] + radius[j][u] for j in opts}
            best_lo = max(lo.values())
            live = [j for j in opts if hi[j] >= best_lo]
            result = math.inf
            for t in live:
                extra = _Region(list(region.a_ub), list(region.b_ub))
                if len(live) > 1:
                    for j in live:
                        if j != t:  # cand_j <= cand_t
                            extra.a_ub.append(units[j][1][u] - units[t][1][u])
                            extra.b_ub.append(units[t][0][u] - units[j][0][u])
                    if not feasible(extra):
                        continue
                chosen[u] = t
                result = min(result, unit(u + 1, extra))
            return result

        return unit(0, region)

    try:
        return call(0, [], _Region([], []))
    except _Budget:
        return None


class _Budget(Exception):
    pass


def jacobian_of(fn: Callable[[torch.Tensor], torch.Tensor], in_shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` of an affine ``fn`` on flattened tensors: ``fn`` at zero and at the basis vectors."""
    n = math.prod(in_shape)
    zero = torch.zeros((1, *in_shape), dtype=DTYPE)
    eye = torch.eye(n, dtype=DTYPE).reshape(n, *in_shape)
    b = fn(zero).flatten(1)
    return (fn(eye).flatten(1) - b).T, b[0]
