"""Arguments shared by the batch commands: model, data, input set, device."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from polytope.io import data, models
from polytope.model.errors import InvalidEpsilonError, InvalidInputError
from polytope.model.network import Network
from polytope.model.sets import BoxedLinfBall, InputSet, L1Ball, L2Ball, LinfBall


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model PATH``, ``--arch NAME``."""
    parser.add_argument("--model", required=True,
                        help="a state dict (with --arch) or a whole pickled nn.Sequential; "
                             "'released:NAME' for the paper's released weights (mnist, fashion_mnist, har, svhn)")
    parser.add_argument("--arch", default=None, choices=sorted(models.ARCHITECTURES),
                        help="architecture of a state dict (the paper's; default: none, a pickled model)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary pickled models (can run code: only for files you trust)")


def add_data_arguments(parser: argparse.ArgumentParser, default_limit: int | None = None) -> None:
    """``--data NAME``, ``--data-dir``, ``--split``, ``--limit``."""
    parser.add_argument("--data", required=True, choices=data.DATASETS, help="dataset")
    parser.add_argument("--data-dir", default=None,
                        help=f"data directory (default: ${data.ENV_DATA_DIR}, ../shared/data, ~/.polytope/data)")
    parser.add_argument("--split", default="test", choices=("train", "test"), help="dataset split (default: test)")
    parser.add_argument("--limit", type=int, default=default_limit, help="use the first N examples only")


def add_set_arguments(parser: argparse.ArgumentParser) -> None:
    """``--eps``, ``--norm``, ``--clip LO HI``."""
    parser.add_argument("--eps", type=float, required=True, help="radius of the perturbation ball")
    parser.add_argument("--norm", default="linf", choices=("linf", "l2", "l1"), help="ball norm (default: linf)")
    parser.add_argument("--clip", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                        help="intersect the l_inf ball with the domain box [LO, HI] (e.g. 0 1 for pixels)")


def add_device_arguments(parser: argparse.ArgumentParser, batch_size: int = 50) -> None:
    """``--device``, ``--batch-size``, ``--float64``."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"examples per batch (default: {batch_size})")
    parser.add_argument("--float64", action="store_true", help="compute in float64 (default: float32)")


def load_model_arg(args: argparse.Namespace) -> nn.Sequential:
    """The model named by ``--model``/``--arch``, in eval mode, on ``--device`` in the chosen dtype."""
    if args.model.startswith("released:"):
        seq = models.load_released(args.model.split(":", 1)[1])
    else:
        seq = models.load_model(args.model, arch=args.arch, trusted=args.trust_pickle)
    dtype = torch.float64 if args.float64 else torch.float32
    return seq.to(device=args.device, dtype=dtype).eval()


def load_network_arg(args: argparse.Namespace) -> tuple[nn.Sequential, Network]:
    """The model and its validated :class:`Network`."""
    seq = load_model_arg(args)
    return seq, Network.from_torch(seq)


def load_data_arg(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of ``--data`` (first ``--limit`` examples) on ``--device``."""
    if args.limit is not None and args.limit < 1:
        raise InvalidInputError(f"--limit must be a positive integer, got {args.limit}")
    x, y = data.load_dataset(args.data, split=args.split, data_dir=args.data_dir, limit=args.limit)
    dtype = torch.float64 if args.float64 else torch.float32
    return x.to(device=args.device, dtype=dtype), y.to(args.device)


def input_set_arg(args: argparse.Namespace, eps: float | None = None) -> InputSet:
    """The perturbation set of ``--eps``/``--norm``/``--clip``."""
    eps = args.eps if eps is None else eps
    if not eps >= 0:
        raise InvalidEpsilonError(f"--eps must be a number >= 0, got {eps}")
    if args.clip is not None:
        if args.norm != "linf":
            raise InvalidInputError("--clip is only supported with --norm linf")
        return BoxedLinfBall(eps, lo=args.clip[0], hi=args.clip[1])
    return {"linf": LinfBall, "l2": L2Ball, "l1": L1Ball}[args.norm](eps)
