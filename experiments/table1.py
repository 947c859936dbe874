"""Table 1: test, FGSM, PGD error and the robust error bound of baseline and robust models.

Robust rows use the paper's released models; baseline rows use standard models trained here
(the paper's conv architecture, 2 epochs of Adam, lr 1e-3, batch 50 -- far shorter than the
paper's 100 epochs; cached under ``runs/models/`` and shared with :mod:`experiments.fig5_radii`).
Every model is evaluated on the same first ``--limit`` test examples: FGSM, PGD (100 steps of
size 0.01, no clipping: the paper's protocol) count ``x_adv`` misclassified; the robust bound
counts every example not certified by Corollary 1 (misclassified examples included).

Rows whose data set is not installed (HAR, SVHN here) say so.  Writes ``table1.png``,
``table1.csv`` (one row per model and metric: ``ours`` beside ``paper``) and ``table1.md``.

    python -m experiments.table1 [--quick] [--limit N] [--out figures/]

``--quick`` evaluates two tiny ``digits_mlp`` models on sklearn's digits.
"""

from __future__ import annotations

import sys
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from experiments._plot import (
    error_rates,
    model_experiment_parser,
    quick_robust_model,
    save_outputs,
    standard_model,
    summarize_errors,
)
from polytope.io.data import load_dataset
from polytope.io.models import load_released
from polytope.model.errors import DatasetError

NAME = "table1"
METRICS = ("test_error", "fgsm_error", "pgd_error", "robust_bound")
LABELS = {
    "test_error": "test error",
    "fgsm_error": "FGSM error",
    "pgd_error": "PGD error",
    "robust_bound": "robust error bound",
}
#: (problem, eps) in the paper's order.
PROBLEMS = (("mnist", 0.1), ("fashion_mnist", 0.1), ("har", 0.05), ("svhn", 0.01))
#: The paper's Table 1 (percent): (problem, robust) -> metric -> value.
PAPER: dict[tuple[str, bool], dict[str, float]] = {
    ("mnist", False): {"test_error": 1.07, "fgsm_error": 50.01, "pgd_error": 81.68, "robust_bound": 100.0},
    ("mnist", True): {"test_error": 1.80, "fgsm_error": 3.93, "pgd_error": 4.11, "robust_bound": 5.82},
    ("fashion_mnist", False): {"test_error": 9.36, "fgsm_error": 77.98, "pgd_error": 81.85, "robust_bound": 100.0},
    ("fashion_mnist", True): {"test_error": 21.73, "fgsm_error": 31.25, "pgd_error": 31.63, "robust_bound": 34.53},
    ("har", False): {"test_error": 4.95, "fgsm_error": 60.57, "pgd_error": 63.82, "robust_bound": 81.56},
    ("har", True): {"test_error": 7.80, "fgsm_error": 21.49, "pgd_error": 21.52, "robust_bound": 21.90},
    ("svhn", False): {"test_error": 16.01, "fgsm_error": 62.21, "pgd_error": 83.43, "robust_bound": 100.0},
    ("svhn", True): {"test_error": 20.38, "fgsm_error": 33.28, "pgd_error": 33.74, "robust_bound": 40.67},
}


def model_rows(
    problem: str, robust: bool, eps: float, model, x: torch.Tensor, y: torch.Tensor, model_note: str
) -> list[dict]:
    """Evaluate one model; one row per metric with ``ours`` and ``paper``."""
    t0 = time.perf_counter()
    summary = summarize_errors(error_rates(model, x, y, eps))
    seconds = time.perf_counter() - t0
    paper = PAPER.get((problem, robust), {})
    return [
        {
            "problem": problem,
            "robust": robust,
            "eps": eps,
            "n_examples": len(x),
            "metric": m,
            "ours": round(summary[m], 2),
            "paper": paper.get(m, np.nan),
            "model": model_note,
            "eval_seconds": round(seconds, 1),
        }
        for m in METRICS
    ]


def missing_rows(problem: str, eps: float, reason: str) -> list[dict]:
    """Rows for a data set that is not installed: the paper's values, ``ours`` empty."""
    return [
        {
            "problem": problem,
            "robust": robust,
            "eps": eps,
            "n_examples": 0,
            "metric": m,
            "ours": np.nan,
            "paper": PAPER[(problem, robust)][m],
            "model": f"data not available here ({reason})",
            "eval_seconds": 0.0,
        }
        for robust in (False, True)
        for m in METRICS
    ]


def markdown(table: pd.DataFrame, notes: list[str]) -> str:
    """The table as markdown, ``ours / paper`` per cell."""
    lines = [
        "| problem | robust | eps | N | " + " | ".join(f"{LABELS[m]} (ours / paper)" for m in METRICS) + " | model |",
        "|" + "---|" * (5 + len(METRICS)),
    ]
    for (problem, robust), df in table.groupby(["problem", "robust"], sort=False):
        df = df.set_index("metric")
        cells = []
        for m in METRICS:
            ours = df.loc[m, "ours"]
            ours_s = "n/a" if pd.isna(ours) else f"{ours:.2f}%"
            paper = df.loc[m, "paper"]
            cells.append(f"{ours_s} / {'-' if pd.isna(paper) else f'{paper:.2f}%'}")
        n = int(df["n_examples"].iloc[0])
        lines.append(
            f"| {problem} | {'yes' if robust else 'no'} | {df['eps'].iloc[0]:g} | {n or '-'} | "
            + " | ".join(cells)
            + f" | {df['model'].iloc[0]} |"
        )
    return "\n".join(
        ["# Table 1 (Wong & Kolter 2018) -- ours vs paper", "", *lines, "", *[f"- {n}" for n in notes], ""]
    )


def plot(table: pd.DataFrame) -> Figure:
    """One panel per evaluated model: ours vs paper bars for the four metrics."""
    groups = [(k, df) for k, df in table.groupby(["problem", "robust"], sort=False) if df["ours"].notna().any()]
    fig, axes = plt.subplots(
        1, max(len(groups), 1), figsize=(3.3 * max(len(groups), 1), 3.4), squeeze=False, layout="constrained"
    )
    pos = np.arange(len(METRICS))
    for ax, ((problem, robust), df) in zip(axes[0], groups, strict=False):
        df = df.set_index("metric").loc[list(METRICS)]
        ax.bar(pos - 0.2, df["ours"], 0.4, label="ours", color="#2b7bba")
        ax.bar(pos + 0.2, df["paper"], 0.4, label="paper", color="0.7")
        for p, v in zip(pos, df["ours"], strict=True):
            ax.text(p - 0.2, v + 1, f"{v:.1f}", ha="center", fontsize=6.5)
        ax.set_xticks(pos, ["test", "FGSM", "PGD", "bound"])
        ax.set_ylim(0, 110)
        ax.set_title(f"{problem} {'robust' if robust else 'baseline'} (N={int(df['n_examples'].iloc[0])})", fontsize=9)
        ax.set_ylabel("error (%)")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Table 1: error rates and robust error bound, ours vs paper")
    return fig


def main(argv: list[str] | None = None) -> int:
    """Evaluate every available problem; write ``table1.png``, ``table1.csv`` and ``table1.md``."""
    parser = model_experiment_parser(NAME, __doc__)
    parser.add_argument(
        "--limit", type=int, default=None, help="first N test examples per model (default: 200; --quick: 100)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    limit = args.limit or (100 if args.quick else 200)
    t0 = time.perf_counter()
    rows: list[dict] = []
    notes = [
        f"Each model is evaluated on the first {limit} test examples (CPU budget); the paper uses the full test sets.",
        "PGD: 100 steps of 0.01, no random start, no clipping to [0, 1] (the paper's protocol); "
        "the robust bound counts every example not certified by Corollary 1.",
    ]
    if args.quick:
        x, y = load_dataset("digits", "test", limit=limit)
        std, info = standard_model(quick=True, models_dir=args.models_dir, seed=args.seed)
        rob, _ = quick_robust_model(args.models_dir, args.seed)
        rows += model_rows("digits", False, 0.1, std, x, y, "digits_mlp, 4 standard epochs (quick)")
        rows += model_rows("digits", True, 0.1, rob, x, y, "digits_mlp, 4 robust epochs (quick)")
        notes.append("--quick: sklearn digits and tiny models; no paper values exist for these rows.")
    else:
        for problem, eps in PROBLEMS:
            try:
                x, y = load_dataset(problem, "test", limit=limit)
            except DatasetError as exc:
                print(f"{problem}: data not available here ({str(exc).splitlines()[0][:80]})")
                rows += missing_rows(problem, eps, "not installed")
                continue
            std, info = standard_model(
                dataset=problem, models_dir=args.models_dir, seed=args.seed, progress=not args.no_progress
            )
            cfg = info["config"]
            note = (
                f"{info['arch']} standard, {cfg['epochs']} epochs Adam lr {cfg['lr']:g} batch {cfg['batch_size']} "
                f"({info['seconds'] / 60:.1f} min wall, loaded machine)"
            )
            rows += model_rows(problem, False, eps, std, x, y, note)
            rows += model_rows(problem, True, eps, load_released(problem).eval(), x, y, f"released:{problem}")
            print(f"{problem}: done ({time.perf_counter() - t0:.0f} s)")
    table = pd.DataFrame(rows)
    notes.append("Baseline rows: standard models trained here for 2 epochs (the paper: 100 epochs).")
    md = markdown(table, notes)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.md").write_text(md)
    png, csv = save_outputs(plot(table), table, args.out, NAME)
    print(f"wrote {png}, {csv} and {args.out / f'{NAME}.md'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
