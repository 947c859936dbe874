"""The main job on the embedded default: Figures 6, 3 and 7 and the ranges table (eq. 41-42).

    polytope reproduce main [--quick] [--out figures/] [--seed S]

Needs no download and no data directory: random 2-D networks and the synthetic toy problem
of Appendix B.1.  Runs each experiment in turn (Figure 7 uses the robust model of Figure 3).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from experiments._plot import run_experiment

#: The experiments of the main job, run by name in this order (Figure 7 reads Figure 3's model).
STEPS = ("fig6_polytopes", "ranges_table", "fig3_toy2d", "fig7_polytope_trained")


def main(argv: Sequence[str] | None = None) -> int:
    """Run every experiment of the main job; returns the first non-zero exit code, else 0."""
    parser = argparse.ArgumentParser(prog="polytope reproduce main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (for tests)")
    parser.add_argument("--out", default="figures", help="output directory (default: figures/)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    common = ["--out", args.out, "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
    for name in STEPS:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        code = run_experiment(name, common)
        print(f"== {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
