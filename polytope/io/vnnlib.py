"""VNN-LIB properties (versions 1.0 and 2.0) as boxes of inputs and linear unsafe regions of outputs.

A property is the conjunction of its assertions over the network's inputs ``X`` and outputs ``Y``;
a counterexample is an ``x`` satisfying it with ``y = f(x)``.  :func:`parse_vnnlib` brings it into
disjunctive normal form and splits every term into its ``X`` part, which must be a box, and its
``Y`` part, a conjunction of linear inequalities ``A y <= b``.  Terms with the same box share one
:class:`Case`, so the result is ``OR_k (x in box_k AND OR_j A_kj f(x) <= b_kj)``.

Version 1.0 is the VNN-COMP dialect: ``(declare-const X_i Real)``, ``(declare-const Y_j Real)``
and ``(assert ...)``.  Version 2.0 (the VNN-LIB 2.0 standard, ``(vnnlib-version <2.0>)``) declares
one network with ``(declare-network N (declare-input X type [shape] ["onnx name"])
(declare-output Y type [shape] ["onnx name"]))`` and references elements as ``X[i,j,...]`` (C order
over the declared shape, the flat index of the ONNX tensor).  Both accept ``<=``, ``>=``, ``<``,
``>`` (read as their closures: the unsafe set and the box only grow, so an ``unsat`` stays sound),
``=``/``==``, ``and``, ``or``, ``+``, ``-`` (negation and left-associative subtraction) and ``*``
with at most one non-constant factor.  Not covered (a named error): ``!=``, hidden-node
declarations, several networks, inputs or outputs, ``equal-to``/``isomorphic-to``.

The file is tokenised by one regular expression and parsed with an explicit stack (no recursion
per line), so 10^5 lines take well under a second.  Bounds computed with rounding are widened by
one ulp outwards, so the box and the unsafe region always contain the exact ones.
"""

from __future__ import annotations

import gc
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from polytope.model.errors import PropertyFileError, UnsupportedPropertyError
from polytope.model.files import read_bytes, resolve

#: The most DNF terms a property may expand to.
MAX_TERMS = 100_000

_TOKEN = re.compile(  # optional whitespace/comments, then one token (group 1); a lone '"', '[' or ']' is bad
    r"(?:\s+|;[^\n]*)*(\(|\)|\"[^\"]*\"|<\d+\.\d+>|\[[^\]]*\]|[^\s()\[\]\";]+(?:\[[^\]]*\])?|[\"\[\]])"
)
_NUMERIC_START = frozenset("0123456789.-+")
_BAD = frozenset(('"', "[", "]"))
_V1_NAME = re.compile(r"([XY])_(\d+)\Z")


class Halfspaces(NamedTuple):
    """The conjunction ``A y <= b``: ``A`` is ``(k, n_outputs)``, ``b`` is ``(k,)``."""

    A: np.ndarray
    b: np.ndarray


@dataclass(frozen=True, eq=False)
class Case:
    """One input box ``lo <= x <= hi`` and the unsafe outputs over it: ``OR_j A_j y <= b_j``."""

    lo: np.ndarray
    hi: np.ndarray
    unsafe: tuple[Halfspaces, ...]


@dataclass(frozen=True, eq=False)
class Property:
    """A parsed VNN-LIB property: ``OR_k (x in box_k AND y = f(x) in unsafe_k)`` is a counterexample.

    ``input_shape``/``output_shape`` are the declared tensor shapes (v2.0; ``(n,)`` for v1.0).
    Two properties are equal when they have the same sizes and the same cases (order included).
    """

    n_inputs: int
    n_outputs: int
    cases: tuple[Case, ...]
    version: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    network: str | None = None
    input_name: str | None = None
    output_name: str | None = None

    @property
    def boxes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The input region: a disjunction of boxes ``(lo, hi)``."""
        return [(c.lo, c.hi) for c in self.cases]

    @property
    def unsafe(self) -> tuple[Halfspaces, ...]:
        """The unsafe output region, when every box shares it (the usual VNN-COMP shape)."""
        first = self.cases[0].unsafe
        if any(not _same_unsafe(c.unsafe, first) for c in self.cases[1:]):
            raise UnsupportedPropertyError("the boxes of this property have different unsafe regions; use .cases")
        return first

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Property):
            return NotImplemented
        return (self.n_inputs, self.n_outputs, len(self.cases)) == (other.n_inputs, other.n_outputs,
                                                                    len(other.cases)) and all(
            np.array_equal(a.lo, b.lo) and np.array_equal(a.hi, b.hi) and _same_unsafe(a.unsafe, b.unsafe)
            for a, b in zip(self.cases, other.cases, strict=True))

    __hash__ = None  # type: ignore[assignment]


def _same_unsafe(a: tuple[Halfspaces, ...], b: tuple[Halfspaces, ...]) -> bool:
    return len(a) == len(b) and all(np.array_equal(p.A, q.A) and np.array_equal(p.b, q.b)
                                    for p, q in zip(a, b, strict=True))


def read_vnnlib(path: str | Path) -> Property:
    """Parse a VNN-LIB file; a missing file or bad content raises :class:`PropertyFileError`."""
    p = resolve(path)
    try:
        text = read_bytes(p).decode()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise PropertyFileError(f"cannot read VNN-LIB file {str(p)!r}: {exc}") from exc
    return parse_vnnlib(text, source=str(p))


def parse_vnnlib(text: str, source: str = "<string>") -> Property:
    """Parse VNN-LIB text (version 1.0 or 2.0) into a :class:`Property`."""
    was_enabled = gc.isenabled()
    gc.disable()  # the parse allocates ~10 containers per line and frees none: cyclic GC passes are pure cost
    try:
        return _Parser(text, source).run()
    finally:
        if was_enabled:
            gc.enable()


# ---------------------------------------------------------------------------------------------
# S-expressions
# ---------------------------------------------------------------------------------------------
class _List(list):
    """A parenthesised form with the offset of its ``(`` (for line numbers in errors)."""

    __slots__ = ("pos",)


class _Linear(NamedTuple):
    """``sum coefs[v] * v + const``; variable ``i >= 0`` is ``X_i`` and ``-1 - j`` is ``Y_j``."""

    coefs: dict[int, float]
    const: float
    exact: bool  # no rounding happened in computing ``const`` (from the numbers as read)


class _Atom(NamedTuple):
    """``expr <= 0`` from the comparison at offset ``pos``."""

    expr: _Linear
    pos: int


@dataclass
class _Parser:
    text: str
    source: str
    tokens: list[str] = field(default_factory=list)

    def run(self) -> Property:
        forms = self._forms()
        if forms and isinstance(forms[0], _List) and forms[0] and forms[0][0] == "vnnlib-version":
            version = self._version(forms[0])
            header, body = self._declarations_v2(forms[1:])
        else:
            version = "1.0"
            header, body = self._declarations_v1(forms)
        return self._property(version, header, body)

    # -- errors -------------------------------------------------------------------------------
    def line(self, pos: int) -> int:
        """The line of token number ``pos`` (found again by re-scanning: errors are rare)."""
        offset = len(self.text)
        for k, m in enumerate(_TOKEN.finditer(self.text)):
            if k == pos:
                offset = m.start(1)
                break
        return self.text.count("\n", 0, offset) + 1

    def error(self, pos: int, message: str, cls: type[PropertyFileError] = PropertyFileError) -> PropertyFileError:
        return cls(f"{self.source}, line {self.line(pos)}: {message}")

    # -- tokens to forms ----------------------------------------------------------------------
    def _forms(self) -> list:
        """The top-level forms; a form's ``pos`` is the index of its ``(`` among the tokens."""
        self.tokens = _TOKEN.findall(self.text)
        top: list = []
        stack: list[list] = [top]
        current = top
        for k, token in enumerate(self.tokens):
            if token == "(":
                node = _List()
                node.pos = k
                current.append(node)
                stack.append(node)
                current = node
            elif token == ")":
                if len(stack) == 1:
                    raise self.error(k, "unbalanced ')'")
                stack.pop()
                current = stack[-1]
            elif token in _BAD or current is top:
                raise self.error(k, f"unexpected character {token!r}" if token in _BAD
                                 else f"{token!r} outside parentheses")
            else:
                current.append(token)
        stack = stack[1:]
        if stack:
            raise self.error(stack[-1].pos, "this '(' is never closed")
        return top

    # -- declarations -------------------------------------------------------------------------
    def _version(self, form: _List) -> str:
        if len(form) != 2 or not isinstance(form[1], str) or not form[1].startswith("<"):
            raise self.error(form.pos, "expected (vnnlib-version <major.minor>)")
        version = form[1][1:-1]
        if version.split(".")[0] != "2":
            raise self.error(form.pos, f"VNN-LIB version {version} is not supported (1.0 and 2.x are)",
                             UnsupportedPropertyError)
        return version

    def _declarations_v1(self, forms: list) -> tuple[dict, list]:
        sizes = {"X": set(), "Y": set()}
        names: dict[str, int] = {}
        body = []
        for form in forms:
            head = self._head(form)
            if head in ("declare-const", "declare-fun"):
                if len(form) < 3 or not isinstance(form[1], str) or form[-1] != "Real":
                    raise self.error(form.pos, f"expected ({head} NAME Real)")
                m = _V1_NAME.match(form[1])
                if m is None:
                    raise self.error(form.pos, f"variable {form[1]!r}: VNN-LIB 1.0 names are X_i (inputs) and "
                                     "Y_j (outputs)", UnsupportedPropertyError)
                if form[1] in names:
                    raise self.error(form.pos, f"variable {form[1]!r} is declared twice")
                index = int(m.group(2))
                sizes[m.group(1)].add(index)
                names[form[1]] = index if m.group(1) == "X" else -1 - index
            elif head == "assert":
                body.append(form)
            else:
                raise self.error(form.pos, f"unknown command {head!r}")
        n = {}
        for kind in ("X", "Y"):
            n[kind] = len(sizes[kind])
            if sizes[kind] != set(range(n[kind])):
                missing = min(set(range(max(sizes[kind]) + 1)) - sizes[kind])
                raise self.error(0, f"{kind}_{missing} is not declared but a higher index is")
        header = {"names": names, "n_inputs": n["X"], "n_outputs": n["Y"],
                  "input_shape": (n["X"],), "output_shape": (n["Y"],)}
        return header, body

    def _declarations_v2(self, forms: list) -> tuple[dict, list]:
        networks = [f for f in forms if self._head(f) == "declare-network"]
        body = [f for f in forms if self._head(f) == "assert"]
        for form in forms:
            if self._head(form) not in ("declare-network", "assert"):
                raise self.error(form.pos, f"unknown command {self._head(form)!r}")
        if len(networks) != 1:
            raise self.error(networks[1].pos if networks else 0,
                             f"expected one declare-network, got {len(networks)}", UnsupportedPropertyError)
        net = networks[0]
        if len(net) < 2 or not isinstance(net[1], str):
            raise self.error(net.pos, "expected (declare-network NAME ...)")
        decls: dict[str, list[_List]] = {"declare-input": [], "declare-output": []}
        for item in net[2:]:
            head = self._head(item)
            if head not in decls:
                raise self.error(getattr(item, "pos", net.pos), f"{head!r} in a network declaration is not "
                                 "supported (one declare-input and one declare-output are)", UnsupportedPropertyError)
            decls[head].append(item)
        header: dict = {"network": net[1], "elements": {}, "names": {}}
        for head, kind in (("declare-input", "input"), ("declare-output", "output")):
            if len(decls[head]) != 1:
                raise self.error(net.pos, f"network {net[1]!r} has {len(decls[head])} {head} declarations; "
                                 "exactly one is supported", UnsupportedPropertyError)
            name, shape, onnx_name = self._tensor_declaration(decls[head][0])
            if name in header["elements"]:
                raise self.error(decls[head][0].pos, f"variable {name!r} is declared twice")
            header["elements"][name] = (kind, shape)
            header[f"{kind}_shape"] = shape
            header[f"{kind}_name"] = onnx_name
            header[f"n_{kind}s"] = math.prod(shape)
        return header, body

    def _tensor_declaration(self, form: _List) -> tuple[str, tuple[int, ...], str | None]:
        if len(form) not in (4, 5) or not all(isinstance(t, str) for t in form[1:]) \
                or not form[3].startswith("["):
            raise self.error(form.pos, f"expected ({form[0]} NAME TYPE [shape] [\"onnx name\"])")
        try:
            shape = tuple(int(s) for s in form[3][1:-1].replace(",", " ").split())
        except ValueError as exc:
            raise self.error(form.pos, f"bad tensor shape {form[3]}") from exc
        if any(s <= 0 for s in shape):
            raise self.error(form.pos, f"bad tensor shape {form[3]}")
        onnx_name = form[4].strip('"') if len(form) == 5 else None
        return form[1], shape, onnx_name

    def _head(self, form) -> str:
        if not isinstance(form, _List) or not form or not isinstance(form[0], str):
            pos = form.pos if isinstance(form, _List) else 0
            raise self.error(pos, "expected a command (keyword ...)")
        return form[0]

    # -- variables and linear expressions -----------------------------------------------------
    def _variable(self, token: str, header: dict, pos: int) -> int:
        """Variable index: ``i >= 0`` for input element ``i``, ``-1 - j`` for output element ``j``."""
        index = header["names"].get(token)
        if index is None:
            if "elements" not in header:
                raise self.error(pos, f"undeclared variable {token!r}")
            index = header["names"][token] = self._element(token, header, pos)
        return index

    def _element(self, token: str, header: dict, pos: int) -> int:
        """A v2.0 reference ``V`` or ``V[i,j,...]``: its flat C-order index in the declared tensor."""
        name, bracket, rest = token.partition("[")
        if name not in header["elements"] or (bracket and not rest.endswith("]")):
            raise self.error(pos, f"undeclared variable {token!r}")
        kind, shape = header["elements"][name]
        try:
            index = [int(i) for i in rest[:-1].replace(",", " ").split()]
        except ValueError:
            index = None
        if index is None or len(index) != len(shape) or any(not 0 <= i < n for i, n in zip(index, shape)):  # noqa: B905
            raise self.error(pos, f"{token!r} does not index {name} of shape {list(shape)}")
        flat = 0
        for i, n in zip(index, shape):  # noqa: B905 (equal lengths checked above)
            flat = flat * n + i
        return flat if kind == "input" else -1 - flat

    def _leaf(self, token: str, header: dict, pos: int) -> _Linear:
        """A number or a variable."""
        if token[0] in _NUMERIC_START:
            try:
                value = float(token)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise self.error(pos, f"{token!r} is not a finite number")
            return _Linear({}, value, True)
        return _Linear({self._variable(token, header, pos): 1.0}, 0.0, True)

    def _linear(self, node, header: dict, pos: int) -> _Linear:
        if type(node) is str:
            return self._leaf(node, header, pos)
        if not node or not isinstance(node[0], str):
            raise self.error(node.pos, "expected an arithmetic expression")
        op, args = node[0], [self._linear(a, header, node.pos) for a in node[1:]]
        if not args:
            raise self.error(node.pos, f"({op}) needs operands")
        if op == "+":
            return _add(args)
        if op == "-":
            if len(args) == 1:
                return _scale(args[0], -1.0)
            out = args[0]
            for a in args[1:]:
                out = _difference(out, a)
            return out
        if op == "*":
            variable = [a for a in args if a.coefs]
            if len(variable) > 1:
                raise self.error(node.pos, "a product of variables is not linear", UnsupportedPropertyError)
            constants = [a.const for a in args if not a.coefs]
            return _scale(variable[0] if variable else _Linear({}, 1.0, True), math.prod(constants))
        raise self.error(node.pos, f"unknown arithmetic operator {op!r}")

    # -- boolean structure to DNF ------------------------------------------------------------
    def _dnf(self, node, header: dict) -> list[list[_Atom]]:
        """The disjunctive normal form of a boolean expression: a list of terms (lists of atoms)."""
        if not isinstance(node, _List) or not node or not isinstance(node[0], str):
            pos = node.pos if isinstance(node, _List) else 0
            raise self.error(pos, "expected a boolean expression")
        op = node[0]
        if op in ("and", "or"):
            parts = [self._dnf(a, header) for a in node[1:]]
            if op == "or":
                return [t for p in parts for t in p]
            if all(len(p) == 1 for p in parts):
                return [[a for p in parts for a in p[0]]]
            terms: list[list[_Atom]] = [[]]
            for p in parts:
                terms = [t + u for t in terms for u in p]
                if len(terms) > MAX_TERMS:
                    raise self.error(node.pos, f"the property expands to more than {MAX_TERMS} cases",
                                     UnsupportedPropertyError)
            return terms
        if op in ("<=", ">=", "<", ">", "=", "=="):
            if len(node) != 3:
                raise self.error(node.pos, f"({op} a b) takes two operands, got {len(node) - 1}")
            x, y = node[1], node[2]
            a = self._leaf(x, header, node.pos) if type(x) is str else self._linear(x, header, node.pos)
            b = self._leaf(y, header, node.pos) if type(y) is str else self._linear(y, header, node.pos)
            if op in ("<=", "<"):
                return [[_Atom(_difference(a, b), node.pos)]]
            if op in (">=", ">"):
                return [[_Atom(_difference(b, a), node.pos)]]
            return [[_Atom(_difference(a, b), node.pos), _Atom(_difference(b, a), node.pos)]]
        if op == "!=":
            raise self.error(node.pos, "'!=' is not supported", UnsupportedPropertyError)
        raise self.error(node.pos, f"unknown boolean operator {op!r}")

    def _property(self, version: str, header: dict, body: list) -> Property:
        if not body:
            raise self.error(len(self.tokens), "the property has no assertion")
        common: list[_Atom] = []
        alternatives: list[list[list[_Atom]]] = []
        for form in body:
            if len(form) != 2:
                raise self.error(form.pos, "expected (assert EXPR)")
            terms = self._dnf(form[1], header)
            if len(terms) == 1:
                common.extend(terms[0])
            else:
                alternatives.append(terms)
        n_in, n_out = header["n_inputs"], header["n_outputs"]
        if n_in == 0 or n_out == 0:
            raise self.error(0, f"the property declares {n_in} inputs and {n_out} outputs; both must be positive")
        base_x, base_y = self._split(common)
        base = _box(self, base_x, np.full(n_in, -np.inf), np.full(n_in, np.inf))
        n_terms = math.prod(len(a) for a in alternatives)
        if n_terms > MAX_TERMS:
            raise self.error(body[0].pos, f"the property expands to {n_terms} cases (more than {MAX_TERMS})",
                             UnsupportedPropertyError)
        cases: dict[bytes, Case] = {}
        for combo in itertools.product(*alternatives) if base is not None else ():
            x_atoms, y_atoms = self._split([a for term in combo for a in term])
            box = _box(self, x_atoms, base[0].copy(), base[1].copy())
            if box is None:
                continue  # an infeasible case: no x satisfies it
            unsafe = _halfspaces(base_y + y_atoms, n_out)
            key = box[0].tobytes() + box[1].tobytes()
            previous = cases.get(key)
            cases[key] = Case(*box, (unsafe,)) if previous is None else \
                Case(previous.lo, previous.hi, (*previous.unsafe, unsafe))
        if not cases:
            raise self.error(body[0].pos, "the input region is empty (some lower bound exceeds its upper bound)")
        if all(h.A.shape[0] == 0 for case in cases.values() for h in case.unsafe):
            raise self.error(body[0].pos, "the property has no output constraint")
        for case in cases.values():
            unbounded = np.flatnonzero(~np.isfinite(case.lo) | ~np.isfinite(case.hi))
            if unbounded.size:
                raise self.error(0, f"input {unbounded[0]} has no finite lower and upper bound; the input "
                                 "region must be a box", UnsupportedPropertyError)
        return Property(n_in, n_out, tuple(cases.values()), version, header["input_shape"], header["output_shape"],
                        header.get("network"), header.get("input_name"), header.get("output_name"))

    def _split(self, atoms: list[_Atom]) -> tuple[list[_Atom], list[_Atom]]:
        """Input atoms and output atoms; an atom over both is refused."""
        xs, ys = [], []
        for atom in atoms:
            keys = atom.expr.coefs
            if not keys:
                if atom.expr.const > 0:
                    xs.append(atom)  # a false constant comparison: _box makes the case empty
                continue
            lo_key, hi_key = min(keys), max(keys)
            if lo_key >= 0:
                xs.append(atom)
            elif hi_key < 0:
                ys.append(atom)
            else:
                raise self.error(atom.pos, "a constraint mixes inputs and outputs", UnsupportedPropertyError)
        return xs, ys


def _add(terms: list[_Linear]) -> _Linear:
    coefs: dict[int, float] = {}
    exact, const = True, 0.0
    for t in terms:
        exact = exact and t.exact and _exact_sum(const, t.const)
        const += t.const
        for k, v in t.coefs.items():
            coefs[k] = coefs.get(k, 0.0) + v
    return _Linear({k: v for k, v in coefs.items() if v != 0.0}, const, exact)


def _difference(a: _Linear, b: _Linear) -> _Linear:
    """``a - b``."""
    coefs = dict(a.coefs)
    for k, v in b.coefs.items():
        coefs[k] = coefs.get(k, 0.0) - v
        if coefs[k] == 0.0:
            del coefs[k]
    return _Linear(coefs, a.const - b.const, a.exact and b.exact and _exact_sum(a.const, -b.const))


def _exact_sum(a: float, b: float) -> bool:
    """Whether ``a + b`` is exact in float64 (Knuth's TwoSum error term is zero)."""
    s = a + b
    bb = s - a
    return math.isfinite(s) and (a - (s - bb)) + (b - bb) == 0.0


def _scale(t: _Linear, factor: float) -> _Linear:
    exact = t.exact and (t.const == 0.0 or factor in (1.0, -1.0))
    return _Linear({k: v * factor for k, v in t.coefs.items() if v * factor != 0.0}, t.const * factor, exact)


def _box(parser: _Parser, atoms: list[_Atom], lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Intersect the box ``[lo, hi]`` with one-variable atoms; ``None`` when it is empty."""
    lows, highs = lo.tolist(), hi.tolist()
    for atom in atoms:
        coefs, const = atom.expr.coefs, atom.expr.const
        if not coefs:
            return None  # the constant comparison const <= 0 is false
        if len(coefs) != 1:
            raise parser.error(atom.pos, "an input constraint over several inputs is not a box",
                               UnsupportedPropertyError)
        ((i, a),) = coefs.items()
        bound = 0.0 - const / a  # a x + const <= 0
        exact = atom.expr.exact and a in (1.0, -1.0)
        if a > 0:
            highs[i] = min(highs[i], bound if exact else math.nextafter(bound, math.inf))
        else:
            lows[i] = max(lows[i], bound if exact else math.nextafter(bound, -math.inf))
    lo, hi = np.array(lows), np.array(highs)
    if np.any(lo > hi):
        return None
    return lo, hi


def _halfspaces(atoms: list[_Atom], n_out: int) -> Halfspaces:
    """``A y <= b`` from output atoms ``a.y + const <= 0`` (``b`` rounded up where it was rounded)."""
    a_rows = np.zeros((len(atoms), n_out))
    b = np.empty(len(atoms))
    for r, atom in enumerate(atoms):
        for k, v in atom.expr.coefs.items():
            a_rows[r, -1 - k] = v
        bound = 0.0 - atom.expr.const
        b[r] = bound if atom.expr.exact else np.nextafter(bound, np.inf)
    return Halfspaces(a_rows, b)


def results_text(status: str, x: np.ndarray | None = None, y: np.ndarray | None = None) -> str:
    """The VNN-COMP results file: the status word (``unsat``, ``unknown``, ``timeout``, ``error``), or ``sat``
    followed by the assignment ``((X_0 v) ... (Y_0 v) ...)`` of the counterexample ``x``, ``y``."""
    if status != "sat":
        return status + "\n"
    rows = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x)] + [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y)]
    return "sat\n(" + "\n ".join(rows) + ")\n"
