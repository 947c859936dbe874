"""``polytope radius``: the largest certified radius of every example (eq. 17), one row per example.

    polytope radius --model released:mnist --data mnist --limit 1000 --out radii.csv

For each example this finds the largest ``eps`` with ``min_{j != f(x)} J_eps(x, g(e_f(x) 1^T - I))_j >= 0``
by the safeguarded Newton iteration of :func:`polytope.verifiers.robust.certified_radius` (the paper's
Figure 5).  The radius is certified for the *predicted* class (Corollary 2); for a correctly
classified example that is the label.  Columns: ``index, label, prediction, correct, radius,
newton_steps`` (and ``seconds`` per example).  Runs are resumable (see :mod:`polytope.runs.runner`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pandas as pd
import torch

from polytope.commands import common
from polytope.model.errors import InvalidInputError
from polytope.model.sets import L1Ball, L2Ball, LinfBall
from polytope.runs.runner import (
    RunSpec,
    add_runner_arguments,
    compute_device,
    model_hash,
    run,
    run_kwargs_from_args,
    write_csv,
)
from polytope.runs.tables import payload_network, radius_rows

NORMS: dict[str, type] = {"linf": LinfBall, "l2": L2Ball, "l1": L1Ball}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``radius``."""
    parser = subparsers.add_parser(
        "radius", help="largest certified radius of each example (eq. 17, Figure 5)",
        description=common.help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common.add_model_arguments(parser)
    common.add_data_arguments(parser)
    parser.add_argument("--norm", default="linf", choices=tuple(NORMS), help="ball norm (default: linf)")
    parser.add_argument("--eps-max", type=float, default=1.0,
                        help="largest radius searched; examples certified there report it (default: 1)")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative bracket tolerance (default: 1e-4)")
    parser.add_argument("--max-steps", type=int, default=30,
                        help="Newton/bisection steps per example; the radius returned is certified either way, "
                             "fewer steps may leave it below the largest (default: 30)")
    common.add_device_arguments(parser)
    add_runner_arguments(parser)
    parser.set_defaults(handler=run_radius)
    return parser


def radius_chunk(payload: dict[str, Any], indices: list[int]) -> pd.DataFrame:
    """Rows of :mod:`polytope.commands.radius` for the examples ``indices``."""
    device = payload["device"]
    net = payload_network(payload, device)
    x_all, y_all = payload["x"], payload["y"]
    parts = []
    batch = payload["batch_size"]
    for start in range(0, len(indices), batch):
        chunk = indices[start:start + batch]
        idx = torch.tensor(chunk)
        parts.append(radius_rows(net, x_all[idx].to(device), y_all[idx].to(device), payload["input_set"],
                                 payload["eps_max"], payload["tol"], chunk, payload["max_steps"]))
    return pd.concat(parts, ignore_index=True)


def _median(s: pd.Series) -> str:
    return f"{s.median():.4g}" if len(s) else "n/a"


def run_radius(args: argparse.Namespace) -> int:
    """Run ``polytope radius``; prints the median radius of correct and wrong examples."""
    if not (args.eps_max > 0 and args.tol > 0 and args.max_steps >= 1):
        raise InvalidInputError(f"--eps-max, --tol and --max-steps must be positive, got "
                                f"{args.eps_max}, {args.tol}, {args.max_steps}")
    seq, _, x, y = common.load_model_and_data(args)
    device = compute_device(args, args.device)
    spec = RunSpec(
        command="radius", model_hash=model_hash(seq), data=common.data_key(args), eps=None,
        options={"norm": args.norm, "eps_max": args.eps_max, "tol": args.tol, "max_steps": args.max_steps,
                 "dtype": "float64" if args.float64 else "float32"},
        n_examples=len(x), chunk_size=max(args.chunk_size, args.batch_size),
    )
    payload = {"model": seq.cpu(), "x": x.cpu(), "y": y.cpu(), "input_set": NORMS[args.norm](0.0),
               "device": device, "batch_size": args.batch_size, "eps_max": args.eps_max, "tol": args.tol,
               "max_steps": args.max_steps}
    df = run(spec, radius_chunk, payload=payload, **run_kwargs_from_args(args))
    if args.out is not None:
        write_csv(df, args.out)
    correct = df[df["correct"]]
    wrong = df[~df["correct"]]
    print(f"examples: {len(df)}  median radius: correct {_median(correct['radius'])} ({len(correct)}), "
          f"wrong {_median(wrong['radius'])} ({len(wrong)})  newton steps: mean {df['newton_steps'].mean():.2f}, "
          f"max {int(df['newton_steps'].max()) if len(df) else 0}", file=sys.stdout)
    return 0
