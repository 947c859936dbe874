"""``polytope tightness``: every dual bound beside the exact LP it bounds (Figure 11, App. B.2).

    polytope tightness --model released:mnist --data mnist --eps 0.1 --n 100 --out tightness.csv

One row per (example, target ``j != y``): the bound on ``f_y - f_j`` over the ball from the
dual (``alpha = u/(u-l)``), optimised alpha (``--alpha-steps``), the LP of eq. (19) with the
dual's layer bounds, the LP with LP-tightened bounds (``--lp-all``), the exact MILP
(``--milp``), and the margin at a PGD point (an upper bound on the exact minimum), with each
solver's status and seconds.  Ends with a summary of the gaps.  Resumable (``--store``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pandas as pd
import torch

from polytope.commands import common
from polytope.runs.runner import (
    RunSpec,
    add_runner_arguments,
    model_hash,
    non_negative_int,
    positive_int,
    run,
    run_kwargs_from_args,
    write_csv,
)
from polytope.runs.tables import payload_network
from polytope.verifiers.attacks import pgd
from polytope.verifiers.tightness import tightness_rows


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``tightness``."""
    parser = subparsers.add_parser("tightness", help="dual bounds against the exact LP and MILP (Figure 11)",
                                   description=common.help_text(__doc__),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_arguments(parser)
    common.add_data_arguments(parser)
    common.add_set_arguments(parser)
    parser.add_argument("--n", type=positive_int, default=100, help="number of examples (default: 100)")
    parser.add_argument("--lp-all", action="store_true", help="also solve the LP with LP-tightened layer bounds")
    parser.add_argument("--milp", action="store_true", help="also solve the exact MILP (small networks)")
    parser.add_argument("--alpha-steps", type=non_negative_int, default=0,
                        help="steps of alpha optimisation (default: 0, off)")
    parser.add_argument("--time-limit", type=common.positive_float, default=None, help="seconds per LP/MILP solve")
    add_runner_arguments(parser)
    parser.set_defaults(handler=run_tightness, device="cpu", float64=True, batch_size=1)
    return parser


def tightness_chunk(payload: dict[str, Any], indices: list[int]) -> pd.DataFrame:
    """Rows of ``polytope tightness`` for the examples ``indices``."""
    seq = payload["model"]
    net = payload_network(payload)
    rows = []
    for i in indices:
        x, y = payload["x"][i:i + 1], payload["y"][i:i + 1]
        found = tightness_rows(net, x, int(y), payload["input_set"], lp_all=payload["lp_all"], milp=payload["milp"],
                               alpha_steps=payload["alpha_steps"], time_limit=payload["time_limit"])
        x_adv = pgd(seq, x, y, payload["input_set"].eps, clip=payload["clip"])
        with torch.no_grad():
            f_adv, f_clean = seq(x_adv)[0], seq(x)[0]
        for row in found:
            j = row["target"]
            row["attack"] = float(min(f_adv[int(y)] - f_adv[j], f_clean[int(y)] - f_clean[j]))
            rows.append({"index": i, **row})
    return pd.DataFrame(rows)


def summarize_gaps(df: pd.DataFrame) -> str:
    """Median and max of ``LP - dual`` (absolute and relative to ``|LP|``) over solved rows."""
    ok = df[df["lp_status"] == "optimal"]
    gap = ok["lp"] - ok["dual"]
    rel = gap / ok["lp"].abs().clip(lower=1e-12)
    return (f"LP - dual over {len(ok)} solved rows: median {gap.median():.3g}, max {gap.max():.3g}; "
            f"relative median {rel.median():.3g}, max {rel.max():.3g}")


def run_tightness(args: argparse.Namespace) -> int:
    """Run ``polytope tightness``."""
    args.limit = args.n if args.limit is None else min(args.limit, args.n)
    seq, _, x, y = common.load_model_and_data(args)
    input_set = common.input_set_arg(args)
    spec = RunSpec(
        command="tightness", model_hash=model_hash(seq), data=common.data_key(args), eps=args.eps,
        options={"norm": args.norm, "clip": args.clip, "lp_all": args.lp_all, "milp": args.milp,
                 "alpha_steps": args.alpha_steps, "time_limit": args.time_limit},
        n_examples=len(x), chunk_size=min(args.chunk_size, 10),
    )
    payload = {"model": seq, "x": x, "y": y, "input_set": input_set, "lp_all": args.lp_all, "milp": args.milp,
               "alpha_steps": args.alpha_steps, "time_limit": args.time_limit,
               "clip": None if args.clip is None else tuple(args.clip)}
    df = run(spec, tightness_chunk, payload=payload, **run_kwargs_from_args(args))
    if args.out is not None:
        write_csv(df, args.out)
    print(summarize_gaps(df), file=sys.stdout)
    return 0
