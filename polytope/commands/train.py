"""``polytope train``: standard or robust training (Theorem 2's loss, Appendix B schedules).

    polytope train --arch mnist --data mnist --eps 0.1 --eps-start 0.05 --epochs 100 --out runs/mnist_robust
    polytope train --arch digits_mlp --data digits --standard --epochs 20 --out runs/digits_std

Writes ``OUT/checkpoint.pt`` (every epoch), ``OUT/model.pth`` (state dict, loadable with
``--model OUT/model.pth --arch NAME``), ``OUT/log.csv`` and ``OUT/curves.png``.
``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import argparse

import torch

from polytope.commands import common
from polytope.io import data, models
from polytope.runs.runner import positive_int
from polytope.verifiers.train import TrainConfig, train


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train``."""
    parser = subparsers.add_parser("train", help="train a standard or provably robust model",
                                   description=common.help_text(__doc__),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=sorted(models.ARCHITECTURES), help="architecture")
    parser.add_argument("--data", required=True, choices=data.DATASETS, help="dataset")
    parser.add_argument("--data-dir", default=None, help=f"data directory (default: ${data.ENV_DATA_DIR}, ...)")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training examples")
    parser.add_argument("--eps", type=common.non_negative_float, default=0.1, help="target epsilon (default: 0.1)")
    parser.add_argument("--eps-start", type=float, default=None,
                        help="start epsilon, raised uniformly to --eps over the first half of the epochs")
    parser.add_argument("--standard", action="store_true", help="standard (non-robust) training")
    parser.add_argument("--epochs", type=int, default=100, help="epochs (default: 100, the paper's)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="minibatch size (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order")
    parser.add_argument("--eval-examples", type=int, default=1000, help="examples per evaluation (default: 1000)")
    parser.add_argument("--device", type=common.device_type, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train and draw the learning curves."""
    from polytope.commands.curves import plot_learning_curves

    torch.manual_seed(args.seed)
    model = models.build_arch(args.arch).to(args.device)
    train_data = data.load_dataset(args.data, "train", args.data_dir, args.limit)
    test_data = data.load_dataset(args.data, "test", args.data_dir)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, eps=args.eps,
                         eps_start=args.eps_start, robust=not args.standard, seed=args.seed,
                         eval_examples=args.eval_examples)
    log = train(model, train_data, test_data, config, args.out, resume=args.resume)
    plot_learning_curves(log, f"{args.out}/curves.png", title=f"{args.arch} on {args.data}")
    last = log.iloc[-1]
    print(f"test error {100 * last['test_error']:.2f}%  robust error bound {100 * last['test_robust_error']:.2f}% "
          f"(eps {args.eps}, first {args.eval_examples} test examples)")
    return 0
