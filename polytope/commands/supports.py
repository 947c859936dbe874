"""``polytope supports``: what polytope's VNN-LIB 2.0 solver interface accepts (the standard's chapter 5).

One query per call, answered on stdout one item per line:

* ``--onnx-operators``: the ONNX operators :mod:`polytope.io.onnx_import` reads (its ``SUPPORTED_OPS``;
  ``Constant`` and ``Shape`` feed constants, folded at load time; ``Cast`` of the network's value only
  to a float type; Add, Sub, Sum and Concat of computed values or with constants, Concat not both);
* ``--onnx-opset-versions``: the lowest and highest opset (two lines);
* ``--vnnlib-versions``: the lowest and highest VNN-LIB version (two lines);
* ``--serialise-assignments``: ``true`` (a ``sat`` is followed by the assignment);
* ``--multiple-network-theories``: ``SNET`` (one network per query);
* ``--hidden-node-theories``: nothing (hidden-node constraints are not supported);
* ``--multiple-input-output-theories``: ``SIO`` (one input and one output tensor);
* ``--arithmetic-complexity-theories``: ``BND``, ``OUTC`` and ``LIN`` (linear combinations over the
  outputs; the inputs must form a box).
"""

from __future__ import annotations

import argparse

#: The lowest and highest ONNX opset the importer handles (Squeeze/Unsqueeze/Slice axes as attributes
#: before opset 13, as inputs from 13; Dropout's ratio input from 12).
OPSET_VERSIONS = (9, 22)
#: The VNN-LIB versions :mod:`polytope.io.vnnlib` parses.
VNNLIB_VERSIONS = ("1.0", "2.0")

_ANSWERS = {
    "onnx_opset_versions": lambda: [str(v) for v in OPSET_VERSIONS],
    "vnnlib_versions": lambda: list(VNNLIB_VERSIONS),
    "serialise_assignments": lambda: ["true"],
    "multiple_network_theories": lambda: ["SNET"],
    "hidden_node_theories": lambda: [],
    "multiple_input_output_theories": lambda: ["SIO"],
    "arithmetic_complexity_theories": lambda: ["BND", "OUTC", "LIN * linear combinations over outputs only; "
                                                              "inputs must be a box (or boxes)"],
}


def _operators() -> list[str]:
    from polytope.io.onnx_import import SUPPORTED_OPS

    return list(SUPPORTED_OPS)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``supports``."""
    parser = subparsers.add_parser("supports", help="capabilities of the VNN-LIB solver interface",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--onnx-operators", action="store_true", help="ONNX operators, one per line")
    for name in _ANSWERS:
        group.add_argument("--" + name.replace("_", "-"), action="store_true")
    parser.set_defaults(handler=run_supports)
    return parser


def run_supports(args: argparse.Namespace) -> int:
    """Print the answer to the one query asked."""
    lines = _operators() if args.onnx_operators else next(f() for name, f in _ANSWERS.items() if getattr(args, name))
    for line in lines:
        print(line)
    return 0
