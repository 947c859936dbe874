"""The tightness ladder on a released model: each bound's certified error and its price.

For the paper's released MNIST (or Fashion-MNIST) model at ``eps = 0.1`` every method of
``polytope certify --method`` runs over the test set, through the resumable runner (the
results are the very rows of ``polytope certify`` and share its store):

* ``dual`` (the paper's bound), ``adaptive`` and ``optimized`` slopes: every example;
* ``cascade``: attack, then each rung while undecided, up to the exact MILP -- every example
  ends certified or with a verified counterexample (or ``timeout``, counted apart);
* ``lp`` (eq. 19 with the dual's layer bounds) only where the dual fails: the LP optimum is at
  least the dual bound (``J`` is a feasible value of the LP's dual), so the dual's certificates
  are the LP's too; ``lp-all`` likewise only where the LP fails.  Their times are the cost of
  reaching their count that way (dual, then LP on the rest, then LP-all on the rest).  Examples
  with a verified counterexample (from the cascade) are skipped: no sound bound certifies them.

Outputs ``ladder_<dataset>[_box].png`` (certified error against total seconds, log scale, with
the paper's bound and PGD error marked, and the exact robust error of the run's own setting:
the cascade's verified counterexamples when it decided every example, else a lower bound),
``..._summary.csv`` (one row per method) and ``....csv`` (one row per example: label, each
method's margin lower bound, the cascade's verdict, deciding rung and seconds).  ``--clip 0 1``
intersects the ball with the pixel box (``BoxedLinfBall``), as the exact results in the
literature do; the figure quotes the literature's value in a note, beside (not as) its own.

    python -m experiments.ladder [--dataset mnist] [--clip 0 1] [--methods ...] [--limit N] [--quick]
    python -m experiments.ladder [--dataset mnist] [--clip 0 1] --replot   # redraw from the summary CSV
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from experiments import _plot
from polytope.io.data import load_dataset
from polytope.io.models import load_released
from polytope.model.network import Network, as_float64
from polytope.model.sets import BoxedLinfBall, InputSet, LinfBall
from polytope.runs.tables import certify_table
from polytope.verifiers.cascade import CounterexampleError, verified_point

METHODS = ("dual", "adaptive", "cascade", "optimized", "lp", "lp-all")
#: Which cheaper method's certificates a method inherits (it runs only where that one fails).
AFTER = {"lp": "dual", "lp-all": "lp"}
#: Published percentages at eps = 0.1 (Table 1 of the paper), drawn as reference lines.
PUBLISHED = {
    "mnist": {"paper's dual bound (Table 1)": 5.82, "paper's PGD (Table 1)": 4.11},
    "fashion_mnist": {"paper's dual bound (Table 1)": 34.53, "paper's PGD (Table 1)": 31.63},
}
#: The literature's exact value, quoted in a note: its setting (the box) need not be the figure's.
LITERATURE = {"mnist": "literature: Tjeng et al. 2019 report 4.38% exact (MILP, box [0, 1])"}
EXACT_COLOR = "#7a0019"
EMPTY = {"index": "int64", "label": "int64", "prediction": "int64", "correct": "bool", "certified": "bool",
         "margin": "float64", "seconds": "float64"}
DISPLAY = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
COLORS = {"dual": "#1f4e9c", "adaptive": "#4a90d9", "optimized": "#7b3fb0", "lp": "#1b7a1b",
          "lp-all": "#5fb35f", "cascade": "#b03030"}


def parse_args(argv: list[str] | None):
    parser = _plot.experiment_parser("ladder", __doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist", choices=sorted(PUBLISHED), help="released model and its data")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $POLYTOPE_DATA, ../shared/data)")
    parser.add_argument("--eps", type=float, default=0.1, help="l_inf radius")
    parser.add_argument("--clip", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                        help="intersect the ball with the box [LO, HI] (e.g. 0 1)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--limit", type=int, default=None, help="first N test images (default: all; quick: 30)")
    parser.add_argument("--indices", default=None, help="comma-separated test indices instead of --limit")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per LP/MIP solve")
    parser.add_argument("--retry-time-limit", type=float, nargs="+", default=[120.0], metavar="SECONDS",
                        help="seconds per MIP when the cascade's timeouts are retried; several values retry "
                             "what still times out with each limit in turn (0: no retry)")
    parser.add_argument("--batch-size", type=int, default=50, help="examples per batch")
    parser.add_argument("--store", default="runs", help="results store (shared with polytope certify)")
    parser.add_argument("--counterexamples", default=None, metavar="DIR",
                        help="where the cascade saves counterexamples (default: STORE/counterexamples/ladder_...)")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes of the runner")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    _plot.add_replot_option(parser, "the <stem>_summary.csv of the same --dataset/--clip/--limit/--indices")
    args = parser.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    args.methods = tuple(m for m in METHODS if m in methods)  # dependency order
    try:
        args.indices = None if args.indices is None else sorted({int(i) for i in args.indices.split(",") if i})
    except ValueError:
        parser.error(f"--indices must be comma-separated integers, got {args.indices!r}")
    if args.indices is not None and (not args.indices or args.indices[0] < 0):
        parser.error("--indices must name test examples (integers >= 0)")
    if not (math.isfinite(args.eps) and args.eps >= 0):
        parser.error(f"--eps must be a finite number >= 0, got {args.eps}")
    if any(not (math.isfinite(t) and t >= 0) for t in args.retry_time_limit):
        parser.error(f"--retry-time-limit: seconds must be finite and >= 0, got {args.retry_time_limit}")
    args.retry_time_limit = [t for t in args.retry_time_limit if t > 0]
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive integer, got {args.limit}")
    if args.quick and args.limit is None and args.indices is None:
        args.limit = 30
    if args.replot:
        _plot.check_replot_source(parser, args.out / f"{stem(args)}_summary.csv")
    return args


def stem(args) -> str:
    """``ladder_<dataset>[_box][_first<N> | _<k>examples]``: subsets never overwrite the full run's files."""
    name = f"ladder_{args.dataset}" + ("" if args.clip is None else "_box")
    if args.indices is not None:
        return f"{name}_{len(args.indices)}examples"
    return name if args.limit is None else f"{name}_first{args.limit}"


def run_methods(args, seq: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                input_set: InputSet) -> dict[str, pd.DataFrame]:
    """Each method's ``polytope certify`` rows (LP rungs on their subsets only)."""
    box = "" if args.clip is None else "_box"
    cex = Path(args.counterexamples or Path(args.store) / "counterexamples" / f"ladder_{args.dataset}{box}")
    common = {"data": f"{args.dataset}:test", "options": {"norm": "linf", "clip": args.clip, "dtype": "float32"},
              "batch_size": args.batch_size, "time_limit": args.time_limit, "store_dir": args.store,
              "progress": not args.no_progress, "workers": args.workers}
    tables: dict[str, pd.DataFrame] = {}
    for method in args.methods:
        indices = args.indices
        if method in AFTER:
            before = tables.get(AFTER[method])
            if before is None:
                raise SystemExit(f"--methods: {method} needs {AFTER[method]} (it runs where {AFTER[method]} fails)")
            refuted = set()
            if "cascade" in tables:
                c = tables["cascade"]
                refuted = set(c.loc[c["verdict"] == "not_robust", "index"])
            indices = sorted(set(before.loc[~(before["certified"] & before["correct"]), "index"]) - refuted)
        print(f"{method}: {len(x) if indices is None else len(indices)} examples", flush=True)
        if indices == []:
            tables[method] = pd.DataFrame({c: pd.Series(dtype=t) for c, t in EMPTY.items()}).rename(
                columns={"margin": f"{method}_margin"})
            continue
        start = time.perf_counter()
        tables[method] = certify_table(seq, x, y, input_set, method=method, indices=indices,
                                       counterexamples=str(cex) if method == "cascade" else None, **common)
        if method == "cascade":
            for limit in args.retry_time_limit:  # escalating limits: each retries what is still open
                tables[method] = retry_timeouts(tables[method], limit, seq, x, y, input_set, cex, common)
            checked = verify_counterexamples(tables[method], as_float64(Network.from_torch(seq)), x, input_set, cex)
            print(f"cascade: {checked} counterexamples re-checked by a float64 forward pass", flush=True)
        print(f"{method}: done in {time.perf_counter() - start:.1f} s (wall, this call)", flush=True)
    return tables


def verify_counterexamples(table: pd.DataFrame, net64: Network, x: torch.Tensor, input_set: InputSet,
                           cex: Path) -> int:
    """Re-check every saved counterexample in float64 (clamped into the set); raise on any that fails."""
    checked = 0
    for index, label in table.loc[(table["verdict"] == "not_robust") & (table["rung"] != "clean"),
                                  ["index", "label"]].itertuples(index=False):
        path = cex / f"{index}.npz"
        if not path.exists():
            raise CounterexampleError(f"example {index}: not robust, but {path} is missing")
        with np.load(path) as saved:
            point = torch.from_numpy(saved["x_adv"])
        if verified_point(net64, x[index], point, int(label), input_set, int(index)) is None:
            raise CounterexampleError(f"example {index}: the saved counterexample {path} is not misclassified")
        checked += 1
    return checked


def retry_timeouts(table: pd.DataFrame, time_limit: float, seq: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                   input_set: InputSet, cex: Path, common: dict) -> pd.DataFrame:
    """Re-run the cascade's ``timeout`` examples with a longer limit per MIP; their rows replace the first ones.

    ``seconds`` of a retried example adds all its passes; ``retried`` marks it.
    """
    timed_out = table.loc[table["verdict"] == "timeout", "index"].tolist()
    if "retried" not in table:
        table = table.assign(retried=False)
    if not timed_out:
        return table
    print(f"cascade: retrying {len(timed_out)} timeout(s) with {time_limit:g} s per MIP", flush=True)
    # one example per chunk: each finished retry is saved at once
    again = certify_table(seq, x, y, input_set, method="cascade", indices=timed_out, counterexamples=str(cex),
                          **{**common, "time_limit": time_limit, "batch_size": 1}, chunk_size=1).set_index("index")
    first = table.set_index("index")
    again["seconds"] = again["seconds"] + first.loc[again.index, "seconds"]
    again["retried"] = True
    first.loc[again.index, again.columns] = again
    return first.reset_index()


def summarize(tables: dict[str, pd.DataFrame], n: int) -> pd.DataFrame:
    """One row per method: not certified (of ``n``), the percentage and the total seconds."""
    rows, totals, certified = [], {}, {}
    for method, df in tables.items():
        certified[method] = int((df["certified"] & df["correct"]).sum())
        seconds = float(df["seconds"].sum())
        if method in AFTER:
            certified[method] += certified[AFTER[method]]
            seconds += totals[AFTER[method]]
        totals[method] = seconds
        not_certified = n - certified[method]
        row = {"method": method, "examples_run": len(df), "not_certified": not_certified,
               "certified_error_pct": 100.0 * not_certified / n, "seconds_total": seconds}
        if method == "cascade":
            counts = df["verdict"].value_counts()
            row.update({f"verdict_{k}": int(v) for k, v in counts.items()})
            row["note"] = "exact when no timeout: " + ", ".join(
                f"{k} {v}" for k, v in df["rung"].value_counts().items())
        elif method in AFTER:
            row["note"] = f"run where {AFTER[method]} fails; seconds include {AFTER[method]}'s"
        rows.append(row)
    return pd.DataFrame(rows)


def per_example(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per example: every method's worst-margin lower bound and seconds, the cascade's verdict."""
    base = next(iter(tables.values()))[["index", "label", "prediction", "correct"]]
    out = base.set_index("index")
    for method, df in tables.items():
        d = df.set_index("index")
        if method == "cascade":
            out = out.join(d[["verdict", "rung", "status", "seconds"]].rename(
                columns={"rung": "deciding_rung", "seconds": "cascade_seconds"}))
            continue
        margin = d["margin_lower"] if "margin_lower" in d else d[f"{method}_margin"]
        out[f"{method}_margin"] = margin
        out[f"{method}_seconds"] = d["seconds"]
    return out.reset_index().sort_values("index")


def examples_of(summary: pd.DataFrame) -> int:
    """The number of test images: the examples run by a method that runs on all (not ``lp``/``lp-all``)."""
    return int(summary.loc[~summary["method"].isin(list(AFTER)), "examples_run"].max())


def exact_line(summary: pd.DataFrame, n: int) -> tuple[float, int] | None:
    """The cascade's refuted percentage (verified counterexamples) and its timeouts; None without a cascade.

    With no timeout this is the exact robust error of the run's setting (every example decided).
    """
    cascade = summary[summary["method"] == "cascade"]
    if cascade.empty:
        return None
    row = cascade.iloc[0]

    def count(column: str) -> int:
        value = row.get(column, 0)
        return int(value) if pd.notna(value) else 0

    return 100.0 * count("verdict_not_robust") / n, count("verdict_timeout")


def plot(summary: pd.DataFrame, dataset: str, clip: list[float] | None) -> Figure:
    """Certified error against seconds per method, the paper's values and the run's own exact robust error."""
    n = examples_of(summary)
    fig, ax = plt.subplots(figsize=(7.2, 4.6), layout="constrained")
    points = []
    for _, r in summary.sort_values("seconds_total").iterrows():
        pct, seconds = r["certified_error_pct"], r["seconds_total"]
        label = f"{r['method']}: {int(r['not_certified'])} ({pct:.2f}%), {seconds:,.0f} s"
        if r["method"] == "cascade":
            timeouts = r.get("verdict_timeout", 0)
            timeouts = int(timeouts) if pd.notna(timeouts) else 0
            label += " -- exact" if timeouts == 0 else f" -- {timeouts} timeout(s), the rest exact"
        points.append(
            ax.scatter(seconds, pct, s=60, color=COLORS[r["method"]], zorder=4, label=label, ec="white", lw=0.6)
        )
    lines = []
    styles = iter(["--", "-.", ":"])
    for name, pct in PUBLISHED[dataset].items():
        lines.append(ax.axhline(pct, color="0.4", ls=next(styles), lw=1, zorder=2, label=f"{name}: {pct:.2f}%"))
    box = "" if clip is None else f", box [{clip[0]:g}, {clip[1]:g}]"
    exact = exact_line(summary, n)
    if exact is not None:
        refuted, timeouts = exact
        label = (
            f"exact robust error here (l_inf{box or ', no box'}; cascade decided every example): {refuted:.2f}%"
            if timeouts == 0
            else f"verified counterexamples here (a lower bound on the exact error): {refuted:.2f}%"
        )
        lines.append(ax.axhline(refuted, color=EXACT_COLOR, lw=1.6, zorder=3, label=label))
    if dataset in LITERATURE:
        ax.text(0.98, 0.02, LITERATURE[dataset], transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                color="0.3")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} s"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("total compute seconds for the test set (one thread; log scale)")
    ax.set_ylabel("certified robust error (% not certified)")
    ax.set_title(f"Tightness ladder: released {DISPLAY[dataset]} model, eps = 0.1 (l_inf{box}), {n} test images",
                 fontsize=10)
    first = ax.legend(handles=lines, fontsize=7.5, loc="upper right", frameon=False)
    ax.add_artist(first)
    title = "not certified, total time"
    if summary["method"].isin(list(AFTER)).any():
        title += " (lp runs after dual, lp-all after lp)"
    ax.legend(handles=points, fontsize=7.5, loc="lower left", framealpha=0.9, title_fontsize=7, title=title)
    ax.grid(alpha=0.3, which="both")
    marked = [*PUBLISHED[dataset].values(), *([exact[0]] if exact is not None else [])]
    lo = min(summary["certified_error_pct"].min(), *marked)
    hi = max(summary["certified_error_pct"].max(), *marked)
    ax.set_ylim(lo - 0.6 * (hi - lo) - 0.1, hi + 0.35 * (hi - lo) + 0.1)
    x_lo, x_hi = summary["seconds_total"].min(), summary["seconds_total"].max()
    ax.set_xlim(x_lo / 2, x_hi * 6)
    return fig


def replot(args) -> int:
    """``--replot``: redraw ``<stem>.png`` from ``<stem>_summary.csv`` in ``--out``; nothing is computed."""
    path = args.out / f"{stem(args)}_summary.csv"  # parse_args checked that it exists
    png = _plot.save_figure(plot(pd.read_csv(path), args.dataset, args.clip), args.out, stem(args))
    print(f"wrote {png} from {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    torch.set_num_threads(args.threads)
    seq = load_released(args.dataset).float().eval()
    limit = args.limit if args.indices is None else args.indices[-1] + 1
    x, y = load_dataset(args.dataset, split="test", data_dir=args.data_dir, limit=limit)
    if len(x) < (limit or 0):
        raise SystemExit(f"--indices: the {args.dataset} test set has {len(x)} examples")
    x = x.float()
    input_set = LinfBall(args.eps) if args.clip is None else BoxedLinfBall(args.eps, lo=args.clip[0], hi=args.clip[1])
    tables = run_methods(args, seq, x, y, input_set)
    n = len(x) if args.indices is None else len(args.indices)
    summary = summarize(tables, n)
    name = stem(args)
    png, _ = _plot.save_outputs(plot(summary, args.dataset, args.clip), per_example(tables), args.out, name)
    summary.to_csv(args.out / f"{name}_summary.csv", index=False)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(summary.to_string(index=False))
    print(f"wrote {png}, {args.out / (name + '.csv')}, {args.out / (name + '_summary.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
