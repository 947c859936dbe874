"""``polytope certify``: Corollary 1 certificates over a data set, one row per example.

    polytope certify --model released:mnist --data mnist --eps 0.1 --out certify.csv

Columns: ``index, label, prediction, correct, certified, margin_lower`` where
``margin_lower = min_{j != y} J_j`` (eq. 15) is a lower bound on ``f_y - f_j`` over the ball:
the example is certified exactly when it is positive.  Runs are resumable (see
:mod:`polytope.runs.runner`).
"""

from __future__ import annotations

import argparse
import sys

from polytope.commands import common
from polytope.runs.runner import (
    add_runner_arguments,
    compute_device,
    run_kwargs_from_args,
    write_csv,
)
from polytope.runs.tables import SOLVER_METHODS, certify_table


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``certify``."""
    parser = subparsers.add_parser(
        "certify", help="certify examples against norm-bounded perturbations (Corollary 1)",
        description=common.help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common.add_model_arguments(parser)
    common.add_data_arguments(parser)
    common.add_set_arguments(parser)
    common.add_device_arguments(parser)
    parser.add_argument("--method", default="dual", choices=("dual", "adaptive", "optimized", *SOLVER_METHODS),
                        help="dual: the paper's slopes alpha = u/(u-l); adaptive: 1 where u >= -l, else 0; "
                             "optimized: all layers' slopes by gradient ascent; lp, lp-all: LP relaxations; "
                             "bab: branch and bound on the dual (complete); milp: the exact MIP; "
                             "cascade: attack, then each rung in turn while undecided")
    parser.add_argument("--time-limit", type=common.positive_float, default=60.0,
                        help="seconds per LP/MIP solve (default: 60)")
    parser.add_argument("--counterexamples", default=None, metavar="DIR",
                        help="save every verified counterexample as DIR/<index>.npz (solver methods)")
    add_runner_arguments(parser)
    parser.set_defaults(handler=run_certify)
    return parser


def run_certify(args: argparse.Namespace) -> int:
    """Run ``polytope certify``; prints the clean and robust error."""
    seq, _, x, y = common.load_model_and_data(args)
    input_set = common.input_set_arg(args)
    df = certify_table(
        seq, x, y, input_set, method=args.method, data=common.data_key(args),
        options={"norm": args.norm, "clip": args.clip, "dtype": "float64" if args.float64 else "float32"},
        batch_size=args.batch_size, time_limit=args.time_limit, device=compute_device(args, args.device),
        counterexamples=args.counterexamples, chunk_size=args.chunk_size, **run_kwargs_from_args(args),
    )
    if args.out is not None:
        write_csv(df, args.out)
    n = len(df)
    clean = 100.0 * (~df["correct"]).sum() / max(n, 1)
    robust = 100.0 * (~(df["certified"] & df["correct"])).sum() / max(n, 1)
    print(f"examples: {n}  clean error: {clean:.2f}%  robust error bound: {robust:.2f}%  "
          f"not certified: {int((~(df['certified'] & df['correct'])).sum())}", file=sys.stdout)
    if "verdict" in df:
        counts = ", ".join(f"{k}: {v}" for k, v in df["verdict"].value_counts().items())
        rungs = ", ".join(f"{k or 'none'}: {v}" for k, v in df["rung"].value_counts().items())
        print(f"verdicts: {counts}; deciding rungs: {rungs}", file=sys.stdout)
    return 0
