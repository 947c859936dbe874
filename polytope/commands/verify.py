"""``polytope verify PROP.vnnlib --network [NAME=]NET.onnx [--timeout S]``: decide a VNN-LIB property.

The VNN-LIB 2.0 solver interface (the standard's chapter 5): the first line on stdout is ``sat``,
``unsat``, ``unknown`` or ``timed-out``; a ``sat`` is followed by the assignment, one ``(NAME[i,j,...] v)``
per input and output element inside one pair of parentheses (``X_i``/``Y_j`` for a VNN-LIB 1.0 file).
Diagnostics go to stderr.  Exit status 0 for every answer; a bad input (missing or unreadable file,
unsupported operator, input/output counts that do not match the property, malformed VNN-LIB) prints
``unknown`` on stdout, one line naming the problem on stderr, and exits with status 2.

The network is checked and bounded in float64 (``docs/float_policy.md``); a ``sat`` is printed only for
a counterexample replayed in onnxruntime on the original file.  ``--results FILE`` also writes the
VNN-COMP results file: ``unsat``, ``sat`` and ``((X_0 v) ... (Y_0 v) ...)``, ``timeout``, ``unknown`` or
``error``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

from polytope.model.errors import PolytopeError, UnsupportedPropertyError

#: The first stdout line for each status of :class:`polytope.verifiers.property.VerifyResult`.
ANSWER = {"sat": "sat", "unsat": "unsat", "unknown": "unknown", "timeout": "timed-out"}
#: The VNN-COMP results-file word for each status.
RESULT_WORD = {"sat": "sat", "unsat": "unsat", "unknown": "unknown", "timeout": "timeout"}
#: Seconds kept back from ``--timeout`` to print the answer.
OUTPUT_RESERVE = 0.5

_DECLARE = re.compile(r"\(\s*declare-(input|output)\s+([^\s()]+)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``verify``."""
    parser = subparsers.add_parser("verify", help="decide a VNN-LIB property on an ONNX network",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("property", metavar="PROP.vnnlib", help="the VNN-LIB property (version 1.0 or 2.0)")
    parser.add_argument("--network", action="append", required=True, metavar="[NAME=]NET.onnx",
                        help="the ONNX network (one; NAME is the network's name in the property)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="seconds for the whole run, start-up included (default: no limit)")
    parser.add_argument("--results", default=None, metavar="FILE", help="also write a VNN-COMP results file")
    parser.add_argument("--verbose", action="store_true", help="each rung's outcome on stderr")
    parser.set_defaults(handler=run_verify)
    return parser


def _network_path(specs: list[str]) -> tuple[str | None, Path]:
    if len(specs) != 1:
        raise UnsupportedPropertyError(f"polytope verifies one network per query, got {len(specs)} --network")
    name, sep, path = specs[0].partition("=")
    return (name, Path(path)) if sep else (None, Path(specs[0]))


def _names(text: str, version: str) -> tuple[str, str]:
    if version == "1.0":
        return "X", "Y"
    found = dict((kind, name) for kind, name in _DECLARE.findall(text))
    return found.get("input", "X"), found.get("output", "Y")


def _labels(name: str, shape: tuple[int, ...], n: int, version: str) -> list[str]:
    if version == "1.0":
        return [f"{name}_{i}" for i in range(n)]
    shape = shape if int(np.prod(shape)) == n else (n,)
    return [f"{name}[{','.join(str(int(k)) for k in np.unravel_index(i, shape))}]" for i in range(n)]


def assignment(prop, text: str, x: np.ndarray, y: np.ndarray) -> list[str]:
    """The ``sat`` assignment in the standard's syntax: ``(`` then one ``(NAME v)`` per element, then ``)``."""
    xn, yn = _names(text, prop.version)
    pairs = list(zip(_labels(xn, tuple(prop.input_shape), x.size, prop.version), x, strict=True))
    pairs += list(zip(_labels(yn, tuple(prop.output_shape), y.size, prop.version), y, strict=True))
    return ["(", *(f"  ({label} {float(v)!r})" for label, v in pairs), ")"]


def results_text(status: str, x: np.ndarray | None = None, y: np.ndarray | None = None) -> str:
    """The VNN-COMP results file for ``status`` (``"error"`` included)."""
    if status != "sat":
        return RESULT_WORD.get(status, status) + "\n"
    rows = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x)] + [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y)]
    return "sat\n(" + "\n ".join(rows) + ")\n"


def _write_results(path: str | None, text: str) -> None:
    if path is not None:
        Path(path).write_text(text)


def run_verify(args: argparse.Namespace) -> int:
    """Run ``polytope verify``; see the module docstring."""
    start = time.perf_counter()
    try:
        return _verify(args, start)
    except PolytopeError as exc:
        print("unknown", flush=True)
        print(f"polytope verify: error: {exc}", file=sys.stderr)
        _write_results(args.results, "error\n")
        return 2


def _verify(args: argparse.Namespace, start: float) -> int:
    from polytope.io.onnx_import import read_onnx
    from polytope.io.vnnlib import read_vnnlib
    from polytope.verifiers.property import check_property, verify

    name, onnx_path = _network_path(args.network)
    prop = read_vnnlib(args.property)
    text = Path(args.property).read_text()
    import torch

    onx = read_onnx(onnx_path, dtype=torch.float64)
    if name and prop.network and name != prop.network:
        print(f"polytope verify: note: network {name!r} given for the property's {prop.network!r}", file=sys.stderr)
    check_property(onx.network, prop, onx.in_shape)
    timeout = None if args.timeout is None else max(args.timeout - (time.perf_counter() - start) - OUTPUT_RESERVE, 0.0)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.verbose else None
    result = verify(onx.network, prop, timeout=timeout, onnx_path=onnx_path, in_shape=onx.in_shape, log=log)
    print(ANSWER[result.status], flush=True)
    if result.status == "sat":
        cex = result.counterexample
        print("\n".join(assignment(prop, text, cex.x, cex.y)), flush=True)
        _write_results(args.results, results_text("sat", cex.x, cex.y))
    else:
        _write_results(args.results, results_text(result.status))
    print(f"polytope verify: {result.status} by {result.method or '-'} in {result.seconds:.2f} s "
          f"(total {time.perf_counter() - start:.2f} s)", file=sys.stderr)
    return 0
