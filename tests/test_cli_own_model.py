"""Your own model and data from the command line (issue 17): ``--arch module:function`` or
``file.py:function`` for a state dict, ``--data PATH`` (``.npz``/``.pt``), and ``--mean/--std``
input normalisation composed into the first affine layer, so eps stays in raw input units.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import polytope as pt
from polytope.commands.main import main
from polytope.io import data
from polytope.model.errors import DatasetError

REPO_ROOT = Path(__file__).resolve().parents[1]
#: float64 throughout: two exactly equal networks give margins equal up to summation order.
TOL = 1e-9

ARCH_SOURCE = textwrap.dedent("""
    from torch import nn

    def build():
        return nn.Sequential(nn.Flatten(), nn.Linear(48, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                             nn.Linear(12, 4))

    def not_a_module():
        return [nn.Linear(2, 2)]

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(12, 4)

        def forward(self, x):
            h = x + torch.relu(self.conv(x))
            return self.fc(self.pool(torch.relu(h)).flatten(1))

    def residual():
        return Residual()
""").replace("from torch import nn", "import torch\nfrom torch import nn")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))


def _pixels(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Inputs in [0, 1] of shape (3, 4, 4) and labels in 0..3."""
    rng = np.random.default_rng(1)
    return rng.random((n, 3, 4, 4)), rng.integers(0, 4, n)


@pytest.fixture
def own(tmp_path: Path) -> dict[str, Path]:
    """A state dict, the file and module defining its architecture, and data as .npz and .pt."""
    (tmp_path / "my_arch.py").write_text(ARCH_SOURCE)
    torch.save(_mlp().state_dict(), tmp_path / "weights.pt")
    x, y = _pixels()
    np.savez(tmp_path / "data.npz", x=x, y=y)
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "data.pt")
    return {"dir": tmp_path, "arch": tmp_path / "my_arch.py", "weights": tmp_path / "weights.pt",
            "npz": tmp_path / "data.npz", "pt": tmp_path / "data.pt"}


def _certify(tmp_path: Path, *args: str | Path, name: str = "out") -> pd.DataFrame:
    out = tmp_path / f"{name}.csv"
    code = main(["certify", *map(str, args), "--float64", "--device", "cpu", "--no-progress",
                 "--store", str(tmp_path / "store"), "--out", str(out)])
    assert code == 0
    return pd.read_csv(out)


def _library_margins(seq: nn.Sequential, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    net = pt.Network.from_torch(seq.double().eval())
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y)
    return pt.worst_margin(net, xt, yt, pt.LinfBall(eps)).detach().numpy()


def test_state_dict_with_arch_file_and_npz_data_end_to_end(own):
    """The whole path through the real entry point in a subprocess; the CSV matches the library."""
    out = own["dir"] / "certify.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "polytope", "certify", "--model", str(own["weights"]),
         "--arch", f"{own['arch']}:build", "--data", str(own["npz"]), "--eps", "0.01", "--float64",
         "--device", "cpu", "--store", str(own["dir"] / "store"), "--out", str(out)],
        cwd=own["dir"], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "examples: 12" in proc.stdout
    df = pd.read_csv(out)
    assert list(df["index"]) == list(range(12))
    x, y = _pixels()
    assert list(df["label"]) == list(y)
    np.testing.assert_allclose(df["margin_lower"], _library_margins(_mlp(), x, y, 0.01), rtol=TOL, atol=TOL)
    assert (df["certified"] == (df["margin_lower"] > 0)).all()


def test_arch_as_module_function_and_pt_data(own, monkeypatch):
    monkeypatch.syspath_prepend(str(own["dir"]))
    by_module = _certify(own["dir"], "--model", own["weights"], "--arch", "my_arch:build", "--data", own["pt"],
                         "--eps", "0.01")
    by_file = _certify(own["dir"], "--model", own["weights"], "--arch", f"{own['arch']}:build", "--data",
                       own["npz"], "--eps", "0.01", name="file")
    np.testing.assert_allclose(by_module["margin_lower"], by_file["margin_lower"], rtol=TOL, atol=TOL)


def test_a_graph_model_with_a_skip_connection_and_max_pooling(own, monkeypatch):
    """A residual block with max pooling (a traced graph) through ``--arch``: the CSV matches the library."""
    monkeypatch.syspath_prepend(str(own["dir"]))
    import my_arch  # the fixture's file

    torch.manual_seed(3)
    model = my_arch.residual()
    torch.save(model.state_dict(), own["dir"] / "residual.pt")
    df = _certify(own["dir"], "--model", own["dir"] / "residual.pt", "--arch", "my_arch:residual", "--data",
                  own["npz"], "--eps", "0.01")
    x, y = _pixels()
    net = pt.Network.from_torch(model.double().eval(), input_shape=(3, 4, 4))
    assert net.is_graph
    expected = pt.worst_margin(net, torch.from_numpy(x).double(), torch.from_numpy(y), pt.LinfBall(0.01))
    np.testing.assert_allclose(df["margin_lower"], expected.detach().numpy(), rtol=TOL, atol=TOL)


@pytest.mark.parametrize(("arch", "message"), [
    ("absent.py:build", "file absent.py not found"),
    ("{arch}:nothing", "has no function 'nothing'"),
    ("{arch}:not_a_module", "returned a list, not an nn.Module"),
    ("no_such_module_xyz:build", "cannot import module"),
    ("cnn", "unknown architecture"),
    ("har", "keys do not match the architecture"),
])
def test_arch_errors_are_one_line(own, capsys, arch, message):
    code = main(["certify", "--model", str(own["weights"]), "--arch", arch.format(arch=own["arch"]),
                 "--data", str(own["npz"]), "--eps", "0.01", "--store", str(own["dir"] / "store")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (own["dir"] / "store").exists()


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((3, 3, 4, 4))}, "missing key(s) 'y'"),
    ({"x": np.zeros((3, 3, 4, 4), dtype=np.uint8), "y": np.zeros(3, dtype=int)}, "inputs must be floating point"),
    ({"x": np.zeros((3, 3, 4, 4)), "y": np.zeros(3)}, "labels must be integer"),
    ({"x": np.full((3, 3, 4, 4), np.nan), "y": np.zeros(3, dtype=int)}, "NaN"),
    ({"x": np.zeros((3, 3, 4, 4)), "y": np.zeros(2, dtype=int)}, "3 examples but 'y' has 2 labels"),
    ({"x": np.zeros((3, 3, 4, 4)), "y": -np.ones(3, dtype=int)}, "negative labels"),
])
def test_bad_data_files_are_named(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load_tensor_file(tmp_path / "bad.npz")


def test_data_that_does_not_fit_the_model_is_named_before_any_work(own, capsys):
    np.savez(own["dir"] / "small.npz", x=np.zeros((2, 1, 4, 4)), y=np.zeros(2, dtype=int))
    np.savez(own["dir"] / "labels.npz", x=np.zeros((2, 3, 4, 4)), y=np.array([0, 7]))
    for name, message in (("small", "inputs of shape (1, 4, 4) do not fit the model"),
                          ("labels", "labels go up to 7 but the model has 4 outputs")):
        code = main(["certify", "--model", str(own["weights"]), "--arch", f"{own['arch']}:build",
                     "--data", str(own["dir"] / f"{name}.npz"), "--eps", "0.01",
                     "--store", str(own["dir"] / "store")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (own["dir"] / "store").exists()


def _fold_by_hand(seq: nn.Sequential, mean: np.ndarray, std: np.ndarray) -> nn.Sequential:
    """``seq`` with ``(x - mean) / std`` folded into its first Linear or (unpadded) Conv2d by hand."""
    folded = copy.deepcopy(seq)
    first = next(m for m in folded if isinstance(m, nn.Linear | nn.Conv2d))
    m, s = torch.from_numpy(mean).double(), torch.from_numpy(std).double()
    with torch.no_grad():
        if isinstance(first, nn.Linear):
            per_input = first.in_features // len(s)
            s_in, m_in = s.repeat_interleave(per_input), m.repeat_interleave(per_input)
            first.bias -= first.weight @ (m_in / s_in)
            first.weight /= s_in
        else:
            first.bias -= (first.weight * (m / s).reshape(1, -1, 1, 1)).sum((1, 2, 3))
            first.weight /= s.reshape(1, -1, 1, 1)
    return folded


def _conv() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 4, 2, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(36, 4))


@pytest.mark.parametrize(("build", "eps"), [(_mlp, "0.06"), (_conv, "0.02")])
@pytest.mark.parametrize("method", ["dual", "lp"])
def test_mean_std_equals_normalisation_folded_into_the_first_layer_by_hand(tmp_path, build, eps, method):
    """certify --mean/--std on pixel data == certify of a network with the normalisation folded in by hand."""
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    x, _ = _pixels()
    folded_seq = _fold_by_hand(build().double(), mean, std)
    with torch.no_grad():  # labels: the predictions, so every example reaches the bound
        y = folded_seq(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "pixels.npz", x=x, y=y)
    torch.save(build().double(), tmp_path / "raw.pt")
    torch.save(folded_seq, tmp_path / "folded.pt")
    common = ("--data", tmp_path / "pixels.npz", "--eps", eps, "--method", method)
    normalised = _certify(tmp_path, "--model", tmp_path / "raw.pt", "--mean", *map(str, mean),
                          "--std", *map(str, std), *common, name="normalised")
    folded = _certify(tmp_path, "--model", tmp_path / "folded.pt", *common, name="folded")
    column = "margin_lower" if method == "dual" else f"{method}_margin"
    np.testing.assert_allclose(normalised[column], folded[column], rtol=1e-6, atol=1e-7)
    assert normalised["certified"].tolist() == folded["certified"].tolist()
    assert normalised["correct"].all()
    if method == "dual":  # eps chosen so that the table is not trivial
        assert 0 < normalised["certified"].sum() < len(x)


def test_eps_stays_in_raw_input_units(tmp_path):
    """With one std, eps pixels under --mean/--std is eps/std in the normalised space of the raw model."""
    mean, std, eps = 0.5, 0.25, 0.02
    x, y = _pixels()
    np.savez(tmp_path / "pixels.npz", x=x, y=y)
    np.savez(tmp_path / "normalised.npz", x=(x - mean) / std, y=y)
    torch.save(_mlp().double(), tmp_path / "raw.pt")
    pixels = _certify(tmp_path, "--model", tmp_path / "raw.pt", "--mean", str(mean), "--std", str(std),
                      "--data", tmp_path / "pixels.npz", "--eps", str(eps), name="pixels")
    scaled = _certify(tmp_path, "--model", tmp_path / "raw.pt", "--data", tmp_path / "normalised.npz",
                      "--eps", str(eps / std), name="scaled")
    np.testing.assert_allclose(pixels["margin_lower"], scaled["margin_lower"], rtol=1e-7, atol=1e-7)


def test_normalise_channel_count_must_match_the_data(own, capsys):
    code = main(["certify", "--model", str(own["weights"]), "--arch", f"{own['arch']}:build", "--data",
                 str(own["npz"]), "--eps", "0.01", "--mean", "0.1", "0.2", "--std", "0.3", "0.3",
                 "--store", str(own["dir"] / "store")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "expects 2 channels" in err, err
    code = main(["certify", "--model", str(own["weights"]), "--arch", f"{own['arch']}:build", "--data",
                 str(own["npz"]), "--eps", "0.01", "--mean", "0.1", "--store", str(own["dir"] / "store")])
    assert code == 2 and "--mean and --std go together" in capsys.readouterr().err


def test_normalize_layer_matches_torch_and_its_sparse_form():
    norm = pt.Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0]).double()
    seq = nn.Sequential(norm, *_conv().double())
    net = pt.Network.from_torch(seq)
    x = torch.from_numpy(_pixels(3)[0])
    torch.testing.assert_close(net.forward(x), seq(x), rtol=1e-12, atol=1e-12)
    from polytope.solvers.sparse_ops import op_matrix

    sparse = op_matrix(net.layers[0].ops[0], (3, 4, 4))
    dense = sparse.matrix @ x[0].numpy().ravel() + sparse.bias
    np.testing.assert_allclose(dense, norm(x)[0].numpy().ravel(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="std finite and positive"):
        pt.Normalize(0.0, 0.0)
