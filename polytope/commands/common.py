"""Arguments shared by the batch commands (model, data, input set, device) and their up-front checks.

Every check here runs before any computation starts: a bad argument is one line on stderr and
exit status 2 (an ``argparse`` error, or a :class:`~polytope.model.errors.PolytopeError` turned into
one line by :func:`polytope.commands.main.main`).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from polytope.io import data, models
from polytope.model.errors import InvalidEpsilonError, InvalidInputError, ShapeMismatchError
from polytope.model.network import Network, Normalize
from polytope.model.sets import BoxedLinfBall, InputSet, L1Ball, L2Ball, LinfBall
from polytope.runs.runner import positive_int

#: What ``eps`` means, for the ``--help`` of every command that takes it.
EPS_HELP = ("radius of the perturbation ball, in the units of the data as given to --data (e.g. pixels in "
            "[0, 1]); with --mean/--std still in those raw units, since the normalisation becomes part of "
            "the network's first layer (see docs/normalisation.md)")

_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def help_text(doc: str | None) -> str:
    """A module docstring as plain text for ``--help``: ``:func:`a.b``` -> ``a.b``, ````x```` -> ``x``."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), doc or "")
    return _LITERAL.sub(r"\1", text)


def _number_type(ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An ``argparse`` type: a float for which ``ok`` holds (NaN and inf fail every check below)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


#: ``--eps``: a finite number >= 0.
non_negative_float = _number_type(lambda v: v >= 0, "a finite number >= 0")
#: ``--time-limit`` and friends: a finite number > 0.
positive_float = _number_type(lambda v: v > 0, "a finite number > 0")
finite_float = _number_type(lambda v: True, "a finite number")


def device_type(text: str) -> str:
    """An ``argparse`` type: a torch device that exists on this machine."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use --device cpu")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise argparse.ArgumentTypeError(f"{text!r} cannot be used on this machine ({reason})") from None
    return text


def data_type(text: str) -> str:
    """An ``argparse`` type: a named data set or a ``.npz``/``.pt`` file of the user's own tensors."""
    if text in data.DATASETS or Path(text).suffix in data.TENSOR_FILE_SUFFIXES:
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a data set ({', '.join(data.DATASETS)}) nor a "
        f"{'/'.join(data.TENSOR_FILE_SUFFIXES)} file"
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model PATH``, ``--arch NAME|module:function|file.py:function``, ``--eval``, ``--mean/--std``."""
    parser.add_argument("--model", required=True,
                        help="a state dict (with --arch) or a whole pickled nn.Sequential saved with torch.save; "
                             "'released:NAME' for the paper's released weights (mnist, fashion_mnist, har, svhn)")
    parser.add_argument("--arch", default=None, metavar="ARCH",
                        help="architecture of a state dict: one of the paper's "
                             f"({', '.join(sorted(models.ARCHITECTURES))}), or module:function or "
                             "path/to/file.py:function, a function of no arguments returning your nn.Sequential "
                             "(default: none, --model is a pickled model)")
    parser.add_argument("--eval", action="store_true",
                        help="accept a pickled model whose batch norms were saved in training mode and use their "
                             "running statistics, as model.eval() does (without it such a model is refused)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary pickled models (can run code: only for files you trust)")
    parser.add_argument("--mean", type=finite_float, nargs="+", default=None, metavar="M",
                        help="input normalisation (x - mean) / std to put in front of the model, one value per "
                             "channel or one for all; it is composed into the first affine layer, so --eps stays "
                             "in the raw input units (pixels), not in normalised units")
    parser.add_argument("--std", type=positive_float, nargs="+", default=None, metavar="S",
                        help="the standard deviations of --mean's normalisation (per channel or one for all)")


def add_data_arguments(parser: argparse.ArgumentParser, default_limit: int | None = None) -> None:
    """``--data NAME|PATH``, ``--data-dir``, ``--split``, ``--limit``."""
    parser.add_argument("--data", required=True, type=data_type, metavar="DATA",
                        help=f"a data set ({', '.join(data.DATASETS)}) or your own tensors: a .npz file "
                             "(numpy.savez(PATH, x=x, y=y)) or a .pt file (torch.save({'x': x, 'y': y}, PATH)) "
                             "with float inputs x of shape (N, *input_shape) and integer labels y of shape (N,)")
    parser.add_argument("--data-dir", default=None,
                        help=f"data directory (default: ${data.ENV_DATA_DIR}, ../shared/data, ~/.polytope/data)")
    parser.add_argument("--split", default="test", choices=("train", "test"),
                        help="dataset split of a named data set (default: test)")
    parser.add_argument("--limit", type=positive_int, default=default_limit, help="use the first N examples only")


def add_set_arguments(parser: argparse.ArgumentParser) -> None:
    """``--eps``, ``--norm``, ``--clip LO HI``."""
    parser.add_argument("--eps", type=non_negative_float, required=True, help=EPS_HELP)
    parser.add_argument("--norm", default="linf", choices=("linf", "l2", "l1"), help="ball norm (default: linf)")
    parser.add_argument("--clip", type=finite_float, nargs=2, metavar=("LO", "HI"), default=None,
                        help="intersect the l_inf ball with the domain box [LO, HI] (e.g. 0 1 for pixels)")


def add_device_arguments(parser: argparse.ArgumentParser, batch_size: int = 50) -> None:
    """``--device``, ``--batch-size``, ``--float64``."""
    parser.add_argument("--device", type=device_type, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help=f"examples per batch (default: {batch_size})")
    parser.add_argument("--float64", action="store_true", help="compute in float64 (default: float32)")


def with_normalisation(seq: nn.Module, mean: list[float] | None, std: list[float] | None) -> nn.Module:
    """``seq`` behind a :class:`~polytope.model.network.Normalize` layer when ``--mean``/``--std`` are given."""
    if mean is None and std is None:
        return seq
    if mean is None or std is None:
        raise InvalidInputError("--mean and --std go together: give both or neither")
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise InvalidInputError(f"--mean has {len(mean)} values but --std has {len(std)}")
    return nn.Sequential(Normalize(mean, std), *(seq if isinstance(seq, nn.Sequential) else [seq]))


def load_model_arg(args: argparse.Namespace, input_shape: tuple[int, ...]) -> nn.Module:
    """The model named by ``--model``/``--arch`` (behind ``--mean/--std``), in eval mode, on ``--device``.

    ``input_shape`` (one example's) is what a graph model is traced for."""
    if args.model.startswith("released:"):
        seq = models.load_released(args.model.split(":", 1)[1])
    else:
        seq = models.load_model(args.model, arch=args.arch, trusted=args.trust_pickle, refuse_training=not args.eval)
    Network.from_torch(seq, input_shape)  # layer errors name the user's own layer indices
    seq = with_normalisation(seq, args.mean, args.std)
    dtype = torch.float64 if args.float64 else torch.float32
    return seq.to(device=args.device, dtype=dtype).eval()


def load_data_arg(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of ``--data`` (first ``--limit`` examples) on ``--device``."""
    if args.data in data.DATASETS:
        x, y = data.load_dataset(args.data, split=args.split, data_dir=args.data_dir, limit=args.limit)
    else:
        x, y = data.load_tensor_file(args.data, limit=args.limit)
    dtype = torch.float64 if args.float64 else torch.float32
    return x.to(device=args.device, dtype=dtype), y.to(args.device)


def data_key(args: argparse.Namespace) -> str:
    """The data set in the run key: ``mnist:test``, or ``file:<sha256 of the file>`` for a tensor file."""
    if args.data in data.DATASETS:
        return f"{args.data}:{args.split}"
    return f"file:{hashlib.sha256(Path(args.data).read_bytes()).hexdigest()}"


def check_fits(seq: nn.Module, net: Network, x: torch.Tensor, y: torch.Tensor) -> None:
    """Name a mismatch of model and data before any work: one example through both forward passes.

    :meth:`Network.check_input` checks the shapes layer by layer; the torch model's own forward
    pass catches what the canonical chain does not see; labels must index the model's outputs.
    """
    if len(x) == 0:
        raise InvalidInputError("the data holds no examples")
    try:
        shapes = net.check_input(x[:1])
    except ShapeMismatchError as exc:
        raise ShapeMismatchError(f"the data's inputs of shape {tuple(x.shape[1:])} do not fit the model: "
                                 f"{str(exc).split(' does not fit the network: ')[-1]}") from exc
    try:
        with torch.no_grad():
            seq(x[:1])
    except RuntimeError as exc:
        raise ShapeMismatchError(
            f"the model cannot run on inputs of shape {tuple(x.shape[1:])}: {str(exc).strip().splitlines()[0]}"
        ) from exc
    n_out = shapes[-1][0]
    if int(y.max()) >= n_out:
        raise ShapeMismatchError(f"labels go up to {int(y.max())} but the model has {n_out} outputs")


def load_model_and_data(args: argparse.Namespace) -> tuple[nn.Module, Network, torch.Tensor, torch.Tensor]:
    """Model, network and data of the arguments, checked against each other (:func:`check_fits`)."""
    x, y = load_data_arg(args)
    seq = load_model_arg(args, tuple(x.shape[1:]))
    net = Network.from_torch(seq, tuple(x.shape[1:]))
    check_fits(seq, net, x, y)
    return seq, net, x, y


def input_set_arg(args: argparse.Namespace, eps: float | None = None) -> InputSet:
    """The perturbation set of ``--eps``/``--norm``/``--clip``."""
    eps = args.eps if eps is None else eps
    if not (math.isfinite(eps) and eps >= 0):
        raise InvalidEpsilonError(f"--eps must be a finite number >= 0, got {eps}")
    if args.clip is not None:
        if args.norm != "linf":
            raise InvalidInputError("--clip is only supported with --norm linf")
        if not args.clip[0] <= args.clip[1]:
            raise InvalidInputError(f"--clip LO HI needs LO <= HI, got {args.clip[0]} {args.clip[1]}")
        return BoxedLinfBall(eps, lo=args.clip[0], hi=args.clip[1])
    return {"linf": LinfBall, "l2": L2Ball, "l1": L1Ball}[args.norm](eps)
