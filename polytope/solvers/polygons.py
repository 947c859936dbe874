"""Output polygons of a 2-input, 2-output ReLU network (Appendix B.1, Figures 6 and 7).

For a network ``f: R^2 -> R^2`` and an l_inf ball ``S(x)`` the paper compares, in the output
plane:

* the true adversarial polytope ``Z = f(S(x))`` -- enumerated densely (:func:`true_polytope`):
  the image of a grid of at least ``10^6`` points of the box plus a denser sampling of the
  box's boundary; its convex hull is the smallest convex outer bound any method can reach;
* the convex outer polytope ``Z~`` of the relaxed LP (eq. 19, :mod:`polytope.solvers.lp`): from LP
  solves in ``K`` directions ``c_k`` (:func:`lp_polygon`), the supporting half-planes
  ``{z : c_k^T z >= LP(c_k)}`` intersect to an *outer* polygon and the optimal points
  ``z*(c_k)`` span an *inner* one; ``Z~`` lies between the two.  Further directions along the
  inner polygon's edge normals then close the gap (:func:`support_polygon`): once every inner
  edge is confirmed as a facet, inner = outer = ``Z~`` exactly;
* the dual polygon (:func:`dual_polygon`): the half-planes ``c_k^T z >= J(c_k)`` of Theorem 1
  (one batched objective call; ``grad_c J`` gives the supporting points, refined the same way);
  ``J <= LP`` so it contains the LP polygon;
* the naive layerwise box (eqs. 41-42, :mod:`polytope.bounds.layerwise`).

Half-planes are intersected by clipping a bounding box successively
(:func:`halfplane_polygon`).  Everything here refuses networks whose input or output is not
2-D with a :class:`~polytope.model.errors.ShapeMismatchError`.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linprog
from scipy.spatial import ConvexHull, QhullError
from torch import nn
from tqdm.auto import tqdm

from polytope.bounds.dual import DualNetwork
from polytope.bounds.layerwise import layerwise_bounds
from polytope.model.errors import InvalidInputError, ShapeMismatchError
from polytope.model.network import LinearOp, Network
from polytope.model.sets import InputSet

PointLike = torch.Tensor | np.ndarray | Sequence[float]

DEFAULT_DIRECTIONS = 256
DEFAULT_GRID_SIDE = 1001  # 1001^2 > 10^6 grid points
DEFAULT_BOUNDARY = 100_000  # points per edge of the box


# ---------------------------------------------------------------------------------------------
# Convex polygons and half-plane intersection
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Polygon:
    """A convex polygon, vertices ``(n, 2)`` in counter-clockwise order (``n = 0`` when empty)."""

    vertices: np.ndarray

    @property
    def area(self) -> float:
        """Shoelace area (0 for fewer than 3 vertices)."""
        v = self.vertices
        if len(v) < 3:
            return 0.0
        x, y = v[:, 0], v[:, 1]
        return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))

    @property
    def bbox(self) -> np.ndarray:
        """``[[xmin, ymin], [xmax, ymax]]``."""
        return np.stack([self.vertices.min(0), self.vertices.max(0)])

    def contains(self, points: np.ndarray, tol: float = 1e-9) -> np.ndarray:
        """Whether each point of ``(N, 2)`` lies in the polygon (within ``tol`` times its scale)."""
        points = np.atleast_2d(points)
        v = self.vertices
        if len(v) < 3:
            return np.zeros(len(points), dtype=bool)
        edges = np.roll(v, -1, axis=0) - v
        length = np.linalg.norm(edges, axis=1)
        keep = length > 0
        v, edges, length = v[keep], edges[keep], length[keep]
        # inward normal of a counter-clockwise edge (ex, ey) is (-ey, ex)
        normals = np.stack([-edges[:, 1], edges[:, 0]], axis=1) / length[:, None]
        dist = np.einsum("nd,kd->nk", points, normals) - np.einsum("kd,kd->k", v, normals)[None]
        scale = max(1.0, float(np.abs(v).max()))
        return (dist >= -tol * scale).all(1)


def convex_hull(points: np.ndarray) -> Polygon:
    """The convex hull of ``(N, 2)`` points (scipy/Qhull); an empty polygon if it is degenerate."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) < 3:
        return Polygon(np.zeros((0, 2)))
    try:
        hull = ConvexHull(points)
    except QhullError:
        return Polygon(np.zeros((0, 2)))
    return Polygon(points[hull.vertices])  # counter-clockwise for 2-D hulls


def diameter(polygon: Polygon) -> float:
    """Largest distance between two vertices (0 for an empty polygon)."""
    v = polygon.vertices
    if len(v) < 2:
        return 0.0
    return float(np.linalg.norm(v[:, None] - v[None], axis=-1).max())


def distance_to_polygon(points: np.ndarray, polygon: Polygon) -> np.ndarray:
    """Euclidean distance of each point of ``(N, 2)`` to a convex polygon (0 inside)."""
    points = np.atleast_2d(points)
    v = polygon.vertices
    if len(v) == 0:
        return np.full(len(points), np.inf)
    a, b = v, np.roll(v, -1, axis=0)
    ab = b - a
    denom = np.maximum(np.einsum("kd,kd->k", ab, ab), 1e-300)
    t = np.clip(np.einsum("nkd,kd->nk", points[:, None] - a[None], ab) / denom, 0.0, 1.0)
    nearest = a[None] + t[..., None] * ab[None]
    dist = np.linalg.norm(points[:, None] - nearest, axis=-1).min(1)
    if len(v) >= 3:
        dist[polygon.contains(points, tol=0.0)] = 0.0
    return dist


def hausdorff_gap(inner: Polygon, outer: Polygon) -> float:
    """``max_{z in outer} dist(z, inner)``: the Hausdorff distance when ``inner`` lies in ``outer``.

    For convex polygons the maximum is attained at a vertex of ``outer``.  Unlike an area ratio
    it stays meaningful for the thin, nearly one-dimensional polytopes of trained networks.
    """
    if len(outer.vertices) == 0:
        return 0.0
    return float(distance_to_polygon(outer.vertices, inner).max())


@dataclass(frozen=True)
class HalfPlanes:
    """The set ``{z : normals @ z >= offsets}``: ``normals (K, 2)``, ``offsets (K,)``."""

    normals: np.ndarray
    offsets: np.ndarray

    def slack(self, points: np.ndarray) -> np.ndarray:
        """``normals @ z - offsets`` for every point and half-plane, ``(N, K)``."""
        return np.atleast_2d(points) @ self.normals.T - self.offsets[None]

    def contains(self, points: np.ndarray, tol: float = 1e-9) -> np.ndarray:
        """Whether each point of ``(N, 2)`` satisfies every half-plane up to ``tol``."""
        return (self.slack(points) >= -tol).all(1)

    def polygon(self, box: np.ndarray | None = None) -> Polygon:
        """Their intersection (:func:`halfplane_polygon`)."""
        return halfplane_polygon(self.normals, self.offsets, box)


def _bounding_box(normals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``[[xmin, ymin], [xmax, ymax]]`` of ``{z : A z >= b}`` by four small LPs."""
    box = np.zeros((2, 2))
    for axis in range(2):
        for row, sign in ((0, 1.0), (1, -1.0)):
            c = np.zeros(2)
            c[axis] = sign
            res = linprog(c, A_ub=-normals, b_ub=-offsets, bounds=[(None, None)] * 2, method="highs")
            if res.status == 2:
                return np.full((2, 2), np.nan)  # infeasible: empty intersection
            if res.status != 0:
                raise ValueError(
                    "the half-planes do not bound a polygon (an LP over them is unbounded); "
                    "pass directions that surround the origin or an explicit box"
                )
            box[row, axis] = sign * res.fun
    return box


def clip_halfplane(vertices: np.ndarray, normal: np.ndarray, offset: float) -> np.ndarray:
    """Sutherland-Hodgman: the part of a convex polygon with ``normal @ z >= offset``."""
    if len(vertices) == 0:
        return vertices
    s = vertices @ normal - offset
    inside = s >= 0
    if inside.all():
        return vertices
    if not inside.any():
        return np.zeros((0, 2))
    nxt = np.roll(vertices, -1, axis=0)
    s_next = np.roll(s, -1)
    crossing = inside != np.roll(inside, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(crossing, s / (s - s_next), 0.0)
    cut = vertices + t[:, None] * (nxt - vertices)
    # per edge (v_i, v_{i+1}): emit v_i if inside, then the crossing point if the edge crosses
    candidates = np.stack([vertices, cut], axis=1).reshape(-1, 2)
    keep = np.stack([inside, crossing], axis=1).reshape(-1)
    out = candidates[keep]
    return _dedupe(out)


def _dedupe(vertices: np.ndarray, rel_tol: float = 1e-12) -> np.ndarray:
    """Drop consecutive (cyclic) duplicate vertices."""
    if len(vertices) < 2:
        return vertices
    scale = max(1.0, float(np.abs(vertices).max()))
    step = np.linalg.norm(vertices - np.roll(vertices, 1, axis=0), axis=1)
    keep = step > rel_tol * scale
    if not keep.any():
        return vertices[:1]
    return vertices[keep]


def halfplane_polygon(normals: np.ndarray, offsets: np.ndarray, box: np.ndarray | None = None) -> Polygon:
    """The polygon ``{z : normals @ z >= offsets}``, by clipping a box with every half-plane.

    ``box`` (``[[xmin, ymin], [xmax, ymax]]``) must contain the intersection; by default it is
    found by four LPs over the half-planes (a :class:`ValueError` if they are unbounded).
    An empty intersection gives a polygon without vertices.
    """
    normals = np.asarray(normals, dtype=np.float64).reshape(-1, 2)
    offsets = np.asarray(offsets, dtype=np.float64).reshape(-1)
    if len(normals) != len(offsets):
        raise ShapeMismatchError(f"{len(normals)} normals but {len(offsets)} offsets")
    if not (np.isfinite(normals).all() and np.isfinite(offsets).all()):
        raise InvalidInputError("half-planes must have finite normals and offsets")
    if box is None:
        box = _bounding_box(normals, offsets)
    box = np.asarray(box, dtype=np.float64)
    if not np.isfinite(box).all():
        return Polygon(np.zeros((0, 2)))
    # pad the start box so no half-plane coincides with its sides
    pad = 1e-6 * max(1.0, float(np.abs(box).max())) + 1e-3 * float((box[1] - box[0]).max())
    (x0, y0), (x1, y1) = box[0] - pad, box[1] + pad
    vertices = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    for a, b in zip(normals, offsets, strict=True):
        vertices = clip_halfplane(vertices, a, float(b))
        if len(vertices) == 0:
            break
    return Polygon(vertices)


def directions(k: int = DEFAULT_DIRECTIONS) -> np.ndarray:
    """``k`` unit vectors ``(cos t, sin t)`` at angles ``2 pi i / k`` (the axes when ``4 | k``)."""
    if k < 3:
        raise ValueError(f"need at least 3 directions to bound a polygon, got {k}")
    t = 2 * math.pi * np.arange(k) / k
    return np.stack([np.cos(t), np.sin(t)], axis=1)


# ---------------------------------------------------------------------------------------------
# The 2-D setting
# ---------------------------------------------------------------------------------------------
def planar_example(net: Network, x: PointLike) -> torch.Tensor:
    """Check that ``net`` maps R^2 to R^2 and return ``x`` as a batch ``(1, 2)``.

    Raises :class:`ShapeMismatchError` for any other network or a ``x`` that is not one point.
    """
    first = net.layers[0].ops[0]
    n_in = first.module.in_features if isinstance(first, LinearOp) else None
    n_out = None
    if n_in is not None:
        try:
            out_shape = net.shapes((n_in,))[-1]
            n_out = out_shape[0] if len(out_shape) == 1 else None
        except (ShapeMismatchError, RuntimeError):
            n_out = None
    if n_in != 2 or n_out != 2:
        got = f"{n_in or '?'} inputs and {n_out or '?'} outputs"
        raise ShapeMismatchError(
            f"output polygons need a network with 2 inputs and 2 outputs (a plane to a plane); this network has {got}"
        )
    weight = net.parameters_like()
    t = torch.as_tensor(x).detach().to(dtype=weight.dtype, device=weight.device)
    if t.numel() != 2:
        raise ShapeMismatchError(f"x must be one 2-D point, (2,) or (1, 2); got shape {tuple(t.shape)}")
    return t.reshape(1, 2)


def _check_linf(input_set: InputSet) -> None:
    if not input_set.is_box:
        raise InvalidInputError(
            f"enumerating the adversarial polytope needs an l_inf set (a box), got {type(input_set).__name__}"
        )


def box_grid(lo: torch.Tensor, hi: torch.Tensor, n_side: int) -> torch.Tensor:
    """The ``n_side x n_side`` grid of the box ``[lo, hi]`` (corners included), ``(n_side^2, 2)``."""
    axes = [torch.linspace(float(lo[i]), float(hi[i]), n_side, dtype=lo.dtype) for i in range(2)]
    gx, gy = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten()], dim=1).to(lo.device)


def box_boundary(lo: torch.Tensor, hi: torch.Tensor, n_edge: int) -> torch.Tensor:
    """``n_edge`` evenly spaced points on each of the box's four edges, ``(4 n_edge, 2)``."""
    t = torch.linspace(0.0, 1.0, n_edge, dtype=lo.dtype, device=lo.device)
    x = lo[0] + t * (hi[0] - lo[0])
    y = lo[1] + t * (hi[1] - lo[1])
    edges = [
        torch.stack([x, torch.full_like(x, float(lo[1]))], 1),
        torch.stack([x, torch.full_like(x, float(hi[1]))], 1),
        torch.stack([torch.full_like(y, float(lo[0])), y], 1),
        torch.stack([torch.full_like(y, float(hi[0])), y], 1),
    ]
    return torch.cat(edges)


@dataclass(frozen=True)
class TruePolytope:
    """The enumerated adversarial polytope ``f(S(x))``.

    ``grid_image`` is ``f`` of the ``n_side x n_side`` grid, ``(n_side^2, 2)``; ``boundary_image``
    is ``f`` of the boundary sampling; ``hull`` their convex hull; ``input_box`` the enumerated
    box ``[[lo_1, lo_2], [hi_1, hi_2]]`` of ``S(x)``.
    """

    grid_image: np.ndarray
    boundary_image: np.ndarray
    hull: Polygon
    n_side: int
    seconds: float
    input_box: np.ndarray

    @property
    def points(self) -> np.ndarray:
        """All enumerated output points, ``(N, 2)``."""
        return np.concatenate([self.grid_image, self.boundary_image])

    @property
    def area(self) -> float:
        """Area of the convex hull (the true polytope itself is usually not convex)."""
        return self.hull.area

    @property
    def ranges(self) -> np.ndarray:
        """``[[min z1, min z2], [max z1, max z2]]`` over the enumerated points (eq. 41)."""
        pts = self.points
        return np.stack([pts.min(0), pts.max(0)])


def _map_points(net: Network, pts: torch.Tensor, chunk: int, progress: bool, desc: str) -> np.ndarray:
    out = np.empty((pts.shape[0], 2), dtype=np.float64)
    starts = range(0, pts.shape[0], chunk)
    with torch.no_grad():
        for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
            out[s : s + chunk] = net.forward(pts[s : s + chunk]).double().cpu().numpy()
    return out


def true_polytope(
    net: Network,
    x: PointLike,
    input_set: InputSet,
    n_side: int = DEFAULT_GRID_SIDE,
    n_boundary: int = DEFAULT_BOUNDARY,
    chunk: int = 32768,
    progress: bool = False,
) -> TruePolytope:
    """Enumerate ``f(S(x))`` on an ``n_side^2`` grid and ``4 n_boundary`` boundary points.

    The grid includes the box's corners; every grid point lies in ``S(x)``, so the hull is an
    inner approximation of the convex hull of the true polytope (exact up to grid resolution).
    """
    start = time.perf_counter()
    x = planar_example(net, x)
    _check_linf(input_set)
    lo, hi = (t[0] for t in input_set.box(x))
    grid = _map_points(net, box_grid(lo, hi, n_side), chunk, progress, "grid")
    boundary = _map_points(net, box_boundary(lo, hi, n_boundary), chunk, progress, "boundary")
    hull = convex_hull(np.concatenate([grid, boundary]))
    box = torch.stack([lo, hi]).double().cpu().numpy()
    return TruePolytope(grid, boundary, hull, n_side, time.perf_counter() - start, box)


def _mark(occupancy: np.ndarray, points: np.ndarray, view: np.ndarray) -> None:
    bins = occupancy.shape[0]
    idx = np.floor((points - view[0]) / (view[1] - view[0]) * bins).astype(np.int64)
    ok = ((idx >= 0) & (idx < bins)).all(1)
    occupancy[idx[ok, 1], idx[ok, 0]] = True


def rasterize(
    net: Network,
    input_box: np.ndarray,
    view: np.ndarray,
    bins: int = 400,
    base: int = 101,
    max_split: int = 64,
    oversample: float = 1.5,
    chunk: int = 65536,
) -> np.ndarray:
    """Pixels of the view ``[[x0, y0], [x1, y1]]`` that ``f(box)`` covers, ``(bins, bins)`` booleans.

    A plain grid leaves gaps wherever ``f`` stretches the box.  Here each cell of a
    ``base x base`` grid whose image edges span ``s_u`` and ``s_v`` pixels is re-sampled
    (exact network evaluations, no interpolation) on a ``(n_u + 1) x (n_v + 1)`` sub-grid with
    ``n = ceil(oversample * s)``, so that samples lie at most ``1/oversample`` pixel apart.
    Row ``i`` of the result is the ``i``-th pixel row from the bottom (``imshow(..., origin="lower")``).
    """
    view = np.asarray(view, dtype=np.float64)
    input_box = np.asarray(input_box, dtype=np.float64)
    weight = net.parameters_like()
    lo = torch.as_tensor(input_box[0], dtype=weight.dtype, device=weight.device)
    hi = torch.as_tensor(input_box[1], dtype=weight.dtype, device=weight.device)
    occupancy = np.zeros((bins, bins), dtype=bool)
    image = _map_points(net, box_grid(lo, hi, base), chunk, False, "").reshape(base, base, 2)
    _mark(occupancy, image.reshape(-1, 2), view)
    pixel = (view[1] - view[0]) / bins

    def pixels(edge: np.ndarray) -> np.ndarray:
        return np.abs(edge / pixel).max(-1)

    # a cell's image is close to the parallelogram of its edges along the two input axes
    span_u = np.maximum(pixels(image[1:, :-1] - image[:-1, :-1]), pixels(image[1:, 1:] - image[:-1, 1:]))
    span_v = np.maximum(pixels(image[:-1, 1:] - image[:-1, :-1]), pixels(image[1:, 1:] - image[1:, :-1]))
    split_u = np.clip(np.ceil(oversample * span_u), 1, max_split).astype(np.int64)
    split_v = np.clip(np.ceil(oversample * span_v), 1, max_split).astype(np.int64)
    step = (input_box[1] - input_box[0]) / (base - 1)
    refine = (split_u > 1) | (split_v > 1)
    pairs = np.unique(np.stack([split_u[refine], split_v[refine]], 1), axis=0)
    for su, sv in pairs:
        cells = np.argwhere((split_u == su) & (split_v == sv)).astype(np.float64)  # lower-left corners
        tu, tv = np.linspace(0.0, 1.0, su + 1), np.linspace(0.0, 1.0, sv + 1)
        offsets = np.stack(np.meshgrid(tu, tv, indexing="ij"), -1).reshape(-1, 2)
        per_chunk = max(1, chunk // len(offsets))
        for start in range(0, len(cells), per_chunk):
            block = cells[start : start + per_chunk]
            pts = input_box[0] + (block[:, None, :] + offsets[None]) * step
            pts_t = torch.as_tensor(pts.reshape(-1, 2), dtype=weight.dtype, device=weight.device)
            _mark(occupancy, _map_points(net, pts_t, chunk, False, ""), view)
    return occupancy


Oracle = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, list[str]]]


@dataclass(frozen=True)
class SupportPolygon:
    """A convex set known through its support function ``h(c) = min_{z in Z} c^T z``.

    Every queried direction ``c`` gives a half-plane ``c^T z >= h(c)`` (``halfplanes``; their
    intersection ``outer`` contains ``Z``) and a minimiser ``z*(c) in Z`` (``points``; their hull
    ``inner`` lies in ``Z``).  ``converged`` means every edge of ``inner`` was confirmed as a
    facet of ``Z`` by a query in its normal direction: then ``inner = outer = Z`` (up to the
    tolerance).  ``statuses`` holds the solver status of each query.
    """

    halfplanes: HalfPlanes
    points: np.ndarray
    outer: Polygon
    inner: Polygon
    converged: bool
    statuses: tuple[str, ...]
    seconds: float

    @property
    def polygon(self) -> Polygon:
        """The outer polygon (the certified bound)."""
        return self.outer

    @property
    def area(self) -> float:
        return self.outer.area

    @property
    def inner_area(self) -> float:
        return self.inner.area

    @property
    def n_queries(self) -> int:
        return len(self.statuses)


def _edge_normals(polygon: Polygon, min_length: float) -> np.ndarray:
    """Unit inward normals of a counter-clockwise polygon's edges longer than ``min_length``."""
    v = polygon.vertices
    edges = np.roll(v, -1, axis=0) - v
    length = np.linalg.norm(edges, axis=1)
    keep = length > min_length
    return np.stack([-edges[keep, 1], edges[keep, 0]], axis=1) / length[keep, None]


def support_polygon(
    oracle: Oracle,
    k: int = DEFAULT_DIRECTIONS,
    max_extra: int | None = None,
    angle_tol: float = 1e-7,
    start: float | None = None,
) -> SupportPolygon:
    """Outer and inner polygons of a convex set from ``k`` uniform directions plus refinement.

    ``oracle(C)`` takes directions ``(m, 2)`` and returns the support values ``(m,)``, the
    minimisers ``(m, 2)`` (NaN where a query failed) and a status per query.  After the ``k``
    uniform directions, the inward normal of every edge of the current inner polygon is queried
    (the classical inner/outer refinement of a projected polytope): a minimiser beyond the edge
    enlarges the inner polygon, a value equal to the edge's offset confirms it as a facet.  This
    stops when no edge is left unconfirmed or ``max_extra`` more queries (default ``k``) are
    spent.
    """
    begin = time.perf_counter() if start is None else start
    budget = k if max_extra is None else max_extra
    dirs = directions(k)
    values, points, statuses = oracle(dirs)
    all_c, all_v, all_p, all_s = [dirs], [values], [points], list(statuses)
    converged = False
    spent = 0
    while True:
        c_cat, p_cat = np.concatenate(all_c), np.concatenate(all_p)
        inner = convex_hull(p_cat[np.isfinite(p_cat).all(1)])
        if len(inner.vertices) < 3:
            break
        scale = float(np.ptp(inner.vertices, axis=0).max())
        normals = _edge_normals(inner, 1e-9 * scale)
        # skip edges whose normal was queried already (within angle_tol)
        gap = 1.0 - normals @ c_cat.T / np.linalg.norm(c_cat, axis=1)[None]
        fresh = normals[(gap > angle_tol**2 / 2).all(1)]
        if len(fresh) == 0:
            converged = True
            break
        if spent >= budget:
            break
        fresh = fresh[: budget - spent]
        values, points, statuses = oracle(fresh)
        spent += len(fresh)
        all_c.append(fresh)
        all_v.append(values)
        all_p.append(points)
        all_s += list(statuses)
    c_cat, v_cat, p_cat = np.concatenate(all_c), np.concatenate(all_v), np.concatenate(all_p)
    ok = np.isfinite(v_cat)
    halfplanes = HalfPlanes(c_cat[ok], v_cat[ok])
    pts = p_cat[np.isfinite(p_cat).all(1)]
    return SupportPolygon(
        halfplanes,
        pts,
        halfplanes.polygon(),
        convex_hull(pts),
        converged,
        tuple(all_s),
        time.perf_counter() - begin,
    )


def dual_oracle(dual: DualNetwork) -> Oracle:
    """Support values ``J(c)`` of Theorem 1 and their minimisers ``z*(c) = grad_c J(c)``.

    With the paper's slopes ``alpha = d`` the dual network is linear in ``c`` and ``J(c)`` is
    concave and positively homogeneous, i.e. ``J(c) = min_{z in D} c^T z`` for the convex set
    ``D = {z : c^T z >= J(c) for all c}`` (the dual polygon); the gradient of ``J`` at ``c`` is a
    minimiser (one batched backward pass for all directions).
    """
    x = dual.x

    def oracle(dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        c = torch.as_tensor(dirs, dtype=x.dtype, device=x.device).clone().requires_grad_(True)
        with torch.enable_grad():
            values = dual.objective(c.unsqueeze(0))[0]
            (grad,) = torch.autograd.grad(values.sum(), c)
        return values.detach().double().cpu().numpy(), grad.double().cpu().numpy(), ["optimal"] * len(dirs)

    return oracle


def dual_polygon(
    net: Network,
    x: PointLike,
    input_set: InputSet,
    k: int = DEFAULT_DIRECTIONS,
    dual: DualNetwork | None = None,
    max_extra: int | None = None,
) -> SupportPolygon:
    """Theorem 1's outer polygon ``{z : c^T z >= J(c)}``: ``k`` directions in one batched call,
    then refined along the inner polygon's edge normals (:func:`support_polygon`)."""
    start = time.perf_counter()
    x = planar_example(net, x)
    if dual is None:
        dual = DualNetwork(net, x, input_set)
    return support_polygon(dual_oracle(dual), k, max_extra, start=start)


def lp_oracle(lp, progress: bool = False) -> Oracle:
    """The relaxed LP (eq. 19) as an oracle: sequential solves, each warm-started from the last."""

    def oracle(dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        values = np.full(len(dirs), np.nan)
        points = np.full((len(dirs), 2), np.nan)
        statuses = []
        for i, c in enumerate(tqdm(dirs, desc="LP directions", disable=not progress, leave=False)):
            res = lp.solve(c)
            statuses.append(res.status)
            if res.status == "optimal" and res.z_out is not None:
                values[i] = res.value
                points[i] = np.asarray(res.z_out, dtype=np.float64).reshape(2)
        return values, points, statuses

    return oracle


def lp_polygon(
    net: Network,
    x: PointLike,
    input_set: InputSet,
    k: int = DEFAULT_DIRECTIONS,
    bounds: str = "dual",
    max_extra: int | None = None,
    progress: bool = False,
) -> SupportPolygon:
    """The relaxed LP's polytope ``Z~`` (eq. 19) from ``k`` warm-started directions plus refinement.

    Outer polygon: the supporting half-planes ``c^T z >= LP(c)``; inner polygon: the hull of the
    optimal points ``z*(c) in Z~``.  Directions whose solve is not optimal give no half-plane
    (see ``statuses``).  ``max_extra=0`` keeps the ``k`` uniform directions only.
    """
    from polytope.solvers.lp import RelaxedLP  # the LP module needs highspy; import it on demand

    start = time.perf_counter()
    x = planar_example(net, x)
    lp = RelaxedLP(net, x, input_set, bounds=bounds)
    return support_polygon(lp_oracle(lp, progress), k, max_extra, start=start)


def layerwise_box(net: Network, x: PointLike, input_set: InputSet) -> Polygon:
    """The naive layerwise output box (eq. 42) as a rectangle."""
    x = planar_example(net, x)
    with torch.no_grad():
        lower, upper = layerwise_bounds(net, x, input_set).output
    (x0, y0), (x1, y1) = lower[0].double().cpu().numpy(), upper[0].double().cpu().numpy()
    return Polygon(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))


# ---------------------------------------------------------------------------------------------
# Everything for one (network, point, epsilon)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolygonComparison:
    """The true polytope and its outer bounds for one example, with their areas."""

    true: TruePolytope
    lp: SupportPolygon | None
    dual: SupportPolygon
    layerwise: Polygon

    def areas(self) -> dict[str, float]:
        """Areas of the true hull, LP outer / inner, dual outer / inner polygon and layerwise box."""
        return {
            "true_hull": self.true.area,
            "lp_outer": self.lp.area if self.lp is not None else math.nan,
            "lp_inner": self.lp.inner_area if self.lp is not None else math.nan,
            "dual": self.dual.area,
            "dual_inner": self.dual.inner_area,
            "layerwise": self.layerwise.area,
        }

    def ratios(self) -> dict[str, float]:
        """Each outer bound's area over the true hull's (1 is tight)."""
        a = self.areas()
        true = a["true_hull"]

        def ratio(v: float) -> float:
            return v / true if true > 0 else math.nan

        return {
            "lp_outer/true": ratio(a["lp_outer"]),
            "lp_inner/true": ratio(a["lp_inner"]),
            "dual/true": ratio(a["dual"]),
            "dual_inner/true": ratio(a["dual_inner"]),
            "layerwise/true": ratio(a["layerwise"]),
        }

    def gaps(self) -> dict[str, float]:
        """Hausdorff distance from each outer bound to the true hull, over the hull's diameter."""
        hull = self.true.hull
        size = diameter(hull)

        def gap(outer: Polygon | None) -> float:
            return hausdorff_gap(hull, outer) / size if outer is not None and size > 0 else math.nan

        return {
            "lp": gap(self.lp.outer if self.lp is not None else None),
            "dual": gap(self.dual.outer),
            "layerwise": gap(self.layerwise),
        }


def compare_polygons(
    net: Network,
    x: PointLike,
    input_set: InputSet,
    k: int = DEFAULT_DIRECTIONS,
    n_side: int = DEFAULT_GRID_SIDE,
    n_boundary: int = DEFAULT_BOUNDARY,
    with_lp: bool = True,
    max_extra: int | None = None,
    progress: bool = False,
) -> PolygonComparison:
    """True polytope, LP polygon (optional), dual polygon and layerwise box of one example.

    ``k`` uniform directions (then up to ``max_extra``, default ``k``, refining ones) for both
    the LP and the dual polygon.
    """
    x = planar_example(net, x)
    true = true_polytope(net, x, input_set, n_side, n_boundary, progress=progress)
    lp = lp_polygon(net, x, input_set, k, max_extra=max_extra, progress=progress) if with_lp else None
    dual = dual_polygon(net, x, input_set, k, max_extra=max_extra)
    return PolygonComparison(true, lp, dual, layerwise_box(net, x, input_set))


def random_network(
    widths: Sequence[int],
    seed: int | None = None,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A random ReLU MLP as in Figure 6: weights ``N(0, std = 1/sqrt(n_in))``, biases ``N(0, 1)``.

    The paper writes ``N(0, 1/sqrt(n_in))``; we read the second argument as the standard
    deviation (torch's ``normal_(mean, std)``), i.e. variance ``1/n_in``.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths):
        lin = nn.Linear(n_in, n_out).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n_out, n_in, generator=generator, dtype=dtype) / math.sqrt(n_in))
            lin.bias.copy_(torch.randn(n_out, generator=generator, dtype=dtype))
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])
