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

from polytope.io.vnnlib import results_text
from polytope.model.errors import PolytopeError, UnsupportedPropertyError
from polytope.model.files import read_bytes

#: The first stdout line for each status of :class:`polytope.verifiers.property.VerifyResult`.
ANSWER = {"sat": "sat", "unsat": "unsat", "unknown": "unknown", "timeout": "timed-out"}
#: Seconds kept back from ``--timeout`` to print the answer.
OUTPUT_RESERVE = 0.5

_DECLARE = re.compile(r"\(\s*declare-(input|output)\s+([^\s()]+)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``verify``."""
    parser = subparsers.add_parser("verify", help="decide a VNN-LIB property on an ONNX network",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("property", metavar="PROP.vnnlib", nargs="?", default=None,
                        help="the VNN-LIB property (version 1.0 or 2.0); not with --instances")
    parser.add_argument("--network", action="append", default=None, metavar="[NAME=]NET.onnx",
                        help="the ONNX network (one; NAME is the network's name in the property)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="seconds for the whole run, start-up included (default: no limit)")
    parser.add_argument("--results", default=None, metavar="FILE", help="also write a VNN-COMP results file")
    parser.add_argument("--verbose", action="store_true", help="each rung's outcome on stderr")
    batch = parser.add_argument_group("many instances")
    batch.add_argument("--instances", type=Path, default=None, metavar="CSV",
                       help="a VNN-COMP instances.csv (onnx,vnnlib,timeout per line): every instance through the "
                       "resumable store, one row each (answer, method, seconds, counterexample), and a summary")
    batch.add_argument("--root", type=Path, default=None, metavar="DIR",
                       help="folder the CSV's paths are relative to (default: the CSV's folder)")
    batch.add_argument("--counterexamples", default=None, metavar="DIR",
                       help="with --instances: save each sat instance's results file as DIR/<index>.txt")
    from polytope.runs.runner import add_runner_arguments

    add_runner_arguments(parser)
    parser.set_defaults(handler=run_verify, chunk_size=1)  # one instance per chunk: each is saved as it ends
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


def _write_results(path: str | None, text: str) -> None:
    if path is not None:
        Path(path).write_text(text)


def run_instances(args: argparse.Namespace) -> int:
    """``polytope verify --instances CSV``: every instance, a table (``--out``) and a summary on stdout."""
    from polytope.runs.instances import verify_instances
    from polytope.runs.runner import run_kwargs_from_args, write_csv

    df = verify_instances(args.instances, args.root, args.counterexamples, chunk_size=args.chunk_size,
                          **run_kwargs_from_args(args))
    if args.out:
        write_csv(df, args.out)
    counts = ", ".join(f"{k}: {v}" for k, v in df["answer"].value_counts().items())
    print(f"instances: {len(df)}  {counts}  seconds: {df['seconds'].sum():.1f}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Run ``polytope verify``; see the module docstring."""
    if args.instances is not None:
        if args.property is not None or args.network:
            raise UnsupportedPropertyError("give either PROP.vnnlib --network NET.onnx or --instances CSV, not both")
        return run_instances(args)
    if args.property is None or not args.network:
        raise UnsupportedPropertyError("polytope verify needs PROP.vnnlib and --network NET.onnx (or --instances CSV)")
    start = time.perf_counter()
    try:
        return _verify(args, start)
    except PolytopeError as exc:
        print("unknown", flush=True)
        print(f"polytope verify: error: {exc}", file=sys.stderr)
        _write_results(args.results, results_text("error"))
        return 2


def _verify(args: argparse.Namespace, start: float) -> int:
    from polytope.runs.instances import verify_files

    name, onnx_path = _network_path(args.network)
    timeout = None if args.timeout is None else args.timeout - OUTPUT_RESERVE
    log = (lambda msg: print(msg, file=sys.stderr)) if args.verbose else None
    prop, result = verify_files(onnx_path, args.property, timeout, start, log)
    if name and prop.network and name != prop.network:
        print(f"polytope verify: note: network {name!r} given for the property's {prop.network!r}", file=sys.stderr)
    print(ANSWER[result.status], flush=True)
    if result.status == "sat":
        cex = result.counterexample
        text = read_bytes(args.property).decode()
        print("\n".join(assignment(prop, text, cex.x, cex.y)), flush=True)
        _write_results(args.results, results_text("sat", cex.x, cex.y))
    else:
        _write_results(args.results, results_text(result.status))
    print(f"polytope verify: {result.status} by {result.method or '-'} in {result.seconds:.2f} s "
          f"(total {time.perf_counter() - start:.2f} s)", file=sys.stderr)
    return 0
