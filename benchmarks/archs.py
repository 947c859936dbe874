"""The benchmark's architectures, as plain ``nn.Sequential`` builders (torch only).

Imported by ``worker.py`` on both sides (the reference environment has no polytope), by
``run.py`` and by ``train_archs.py``.  Module indices match the state dicts they load:

* ``mnist``: the released MNIST model of Wong & Kolter (2018), two stride-2 4x4 convolutions
  (16, 32 channels), 100 hidden units, 10 logits;
* ``fc_300_200_100``: a fully connected 784-300-200-100-10 network;
* ``fc_50x3``: a fully connected 784-50-50-50-10 network;
* ``conv_large``: the large MNIST model of Wong et al. (2018, "Scaling provable adversarial
  defenses"): convolutions 32 3x3 s1, 32 4x4 s2, 64 3x3 s1, 64 4x4 s2 (padding 1), then 512, 512, 10;
* ``res_mnist``: a residual MNIST network in that paper's ``DenseSequential`` layout (the released
  model's layers with one residual block ``z + conv(relu(conv(z)))`` after the first convolution);
  it needs convex_adversarial importable (its ``Dense`` classes), polytope reads the layout as a graph.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

from torch import nn


def _mnist() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(1568, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def _fc(*widths: int) -> nn.Sequential:
    """``Flatten`` then dense layers ``widths[0] -> ... -> widths[-1]`` with a ReLU between each pair."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(pairwise(widths)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def _conv_large() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def _res_mnist() -> nn.Sequential:
    from convex_adversarial.utils import Dense, DenseSequential  # the reference's layout classes

    return DenseSequential(
        Dense(nn.Conv2d(1, 16, 4, stride=2, padding=1)),
        nn.ReLU(),
        Dense(nn.Conv2d(16, 16, 3, padding=1)),
        nn.ReLU(),
        Dense(nn.Sequential(), None, nn.Conv2d(16, 16, 3, padding=1)),  # the block's input plus conv(relu(conv))
        nn.ReLU(),
        Dense(nn.Conv2d(16, 32, 4, stride=2, padding=1)),
        nn.ReLU(),
        nn.Flatten(),
        Dense(nn.Linear(1568, 100)),
        nn.ReLU(),
        Dense(nn.Linear(100, 10)),
    )


#: Per architecture, its layers that match the released MNIST model's: (own prefix, released prefix).
#: ``train_archs.py --init-released`` starts from those weights (the residual block from scratch).
RELEASED_LAYERS: dict[str, tuple[tuple[str, str], ...]] = {
    "res_mnist": (("0.Ws.0", "0"), ("6.Ws.0", "2"), ("9.Ws.0", "5"), ("11.Ws.0", "7")),
}


def is_chain(model: nn.Module) -> bool:
    """Whether ``model`` is a plain ``nn.Sequential`` (polytope needs no input shape for it)."""
    return type(model) is nn.Sequential


ARCHS: dict[str, Callable[[], nn.Sequential]] = {
    "mnist": _mnist,
    "fc_300_200_100": lambda: _fc(784, 300, 200, 100, 10),
    "fc_50x3": lambda: _fc(784, 50, 50, 50, 10),
    "conv_large": _conv_large,
    "res_mnist": _res_mnist,
}


def build(name: str) -> nn.Sequential:
    """A freshly initialised model of architecture ``name`` (one of :data:`ARCHS`)."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHS)}")
    return ARCHS[name]()
