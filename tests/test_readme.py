"""The README runs as written: its quick start, its examples, and its two commands at the top.

Code blocks are found by the HTML comment in front of them (``<!-- readme-quickstart -->``,
``<!-- readme-example -->``, ...), so the test reads exactly what a reader copies.  A Python block of
the "verify your own model" example starts with ``# NAME.py`` and is saved under that name; a
``console`` block is a list of ``$ command`` lines, each followed by the output it printed when the
README was written.  The commands run in a temporary directory (the entry point as
``python -m polytope``, with this checkout first on the path) and must succeed and print the same
lines up to numbers and run hashes: the float digits of a training run may differ between machines,
the structure may not.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from polytope.io import data, models

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
#: Seconds a README command may take here (the example trains for about 20 s on one thread).
COMMAND_TIMEOUT = 600


def marked_blocks(marker: str, text: str | None = None) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block right after ``<!-- marker -->``, in order."""
    text = README.read_text() if text is None else text
    pattern = re.compile(rf"<!-- {re.escape(marker)} -->\s*\n```(\w*)\n(.*?)\n```", re.S)
    return pattern.findall(text)


def console_steps(body: str) -> list[tuple[str, list[str]]]:
    """``(command, expected output lines)`` of a console block."""
    steps: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return steps


def shape(line: str) -> str:
    """``line`` with run hashes and numbers masked: what must not change between machines."""
    line = re.sub(r"\b[0-9a-f]{16}\b", "HASH", line.strip())
    return re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", line)


def as_local(command: str) -> str:
    """A README command as this interpreter runs it (``polytope`` is ``python -m polytope``)."""
    python = shlex.quote(sys.executable)
    command = re.sub(r"^polytope\b", f"{python} -m polytope", command)
    return re.sub(r"^python\b", python, command)


def run_console(body: str, cwd: Path) -> None:
    """Run every command of a console block in ``cwd``; check its exit status and its output's shape."""
    # this checkout first; one thread, as the README's runs were made (and kind to a shared machine)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for command, expected in console_steps(body):
        done = subprocess.run(as_local(command), shell=True, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"README command failed: {command}\n{output}"
        got = {shape(line) for line in output.splitlines()}
        missing = [line for line in expected if shape(line) not in got]
        assert not missing, f"{command}: README lines not printed (up to numbers): {missing}\n{output}"
        for line in expected:  # the number of examples is no rounding matter
            if line.startswith("examples: "):
                count = line.split()[1]
                assert f"examples: {count} " in output, f"{command}: expected {count} examples\n{output}"


def test_readme_marks_its_examples() -> None:
    kinds = [language for language, _ in marked_blocks("readme-example")]
    assert kinds == ["python", "python", "console"]
    assert [language for language, _ in marked_blocks("readme-quickstart")] == ["python"]
    assert [language for language, _ in marked_blocks("readme-graph")] == ["python"]
    assert len(marked_blocks("readme-main-command")) == len(marked_blocks("readme-test-command")) == 1


def test_marked_blocks_and_shapes() -> None:
    text = "x\n<!-- m -->\n\n```console\n$ echo 1\n1\n```\n```python\nnot marked\n```\n"
    assert marked_blocks("m", text) == [("console", "$ echo 1\n1")]
    assert console_steps("$ a\nout 1\n$ b\n") == [("a", ["out 1"]), ("b", [])]
    masked = shape("store runs/certify-0a35426311dd63ed: 0/297, 27.95%  e -1.2e-05")
    assert masked == "store runs/certify-HASH: N/N, N%  e N"


def test_quick_start_runs_and_its_comments_hold() -> None:
    """The quick start, run as one script; then what its comments state."""
    ((_, code),) = marked_blocks("readme-quickstart")
    scope: dict[str, object] = {"__name__": "readme_quickstart"}
    exec(compile(code, "README.md (quick start)", "exec"), scope)
    x, y, J, lp, milp = (scope[name] for name in ("x", "y", "J", "lp", "milp"))
    lower, upper = scope["lower"], scope["upper"]
    assert lower.shape == upper.shape == (4, 50) and J.shape == (4, 3)
    assert int(y[0]) == 1
    assert bool(scope["pt"].certify(scope["net"], x, scope["ball"], y=y).all())
    assert lp.status == "optimal" and milp.status == "optimal"
    # J <= LP <= MILP: J in float32 (tolerance 1e-5 on values near 0.14), LP and MILP in float64
    assert J[0, 2].item() <= lp.value + 1e-5 and lp.value <= milp.value + 1e-7
    assert all(param.grad is not None for param in scope["model"].parameters())
    assert bool((scope["radius"] > 0).all()) and scope["err"].item() == 0.0


def test_graph_example_runs_and_its_comments_hold(capsys: pytest.CaptureFixture[str]) -> None:
    """The residual-and-pooling example: every example certified, J <= LP <= MILP as printed."""
    ((_, code),) = marked_blocks("readme-graph")
    scope: dict[str, object] = {"__name__": "readme_graph"}
    exec(compile(code, "README.md (graphs)", "exec"), scope)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "tensor([True, True, True])"
    J, lp, milp = (scope[name] for name in ("J", "lp", "milp"))
    assert scope["net"].is_graph and lp.status == "optimal" and milp.status == "optimal"
    assert J.item() <= lp.value + 1e-9 <= milp.value + 2e-9  # float64 throughout
    assert f"# {printed[1]}" in code  # the values the comment states


@pytest.mark.slow
def test_verify_your_own_model_runs_verbatim(tmp_path: Path) -> None:
    """The example's files saved as the reader would, then its commands run in that directory."""
    *files, (_, console) = marked_blocks("readme-example")
    for _, body in files:
        name = re.match(r"# (\S+\.py)\n", body)
        assert name, "each Python block of the example starts with '# NAME.py'"
        (tmp_path / name.group(1)).write_text(body)
    run_console(console, tmp_path)
    assert (tmp_path / "certify.csv").read_text().startswith("index,label,prediction,correct,certified,margin_lower")


def test_quick_start_command_line_on_the_released_model(tmp_path: Path) -> None:
    if not models.released_model_path("mnist").exists():
        pytest.skip(f"released MNIST model not found at {models.released_model_path('mnist')} (set $POLYTOPE_MODELS)")
    if not data.dataset_info("mnist").present:
        pytest.skip(f"MNIST not found (set ${data.ENV_DATA_DIR})")
    ((_, console),) = marked_blocks("readme-released")
    run_console(console, tmp_path)


# -- the two commands at the top -------------------------------------------------------------------

def readme_steps(marker: str) -> list[str]:
    """The ``&&``-separated steps of the one-line command after ``marker``."""
    ((_, body),) = marked_blocks(marker)
    assert "\n" not in body.strip(), f"{marker}: one line"
    return [step.strip() for step in body.split("&&")]


def ci_steps() -> list[str]:
    """The commands ``.ci/run`` runs from the virtual environment on, in README spelling.

    ``python -m pip install -q`` is written ``pip install`` in the README and the pip self-upgrade
    is left out; ``--durations`` only adds a timing report.
    """
    lines = CI_RUN.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("python3 -m venv"))
    steps = []
    for line in lines[start:]:
        line = line.strip()
        if not line or line.startswith("#") or line == "python -m pip install -q --upgrade pip":
            continue
        line = re.sub(r"^python -m pip install -q\b", "pip install", line)
        steps.append(re.sub(r" --durations=\d+", "", line))
    return steps


def test_test_command_is_what_ci_runs() -> None:
    assert readme_steps("readme-test-command") == ci_steps()


def test_main_command_is_the_test_setup_then_the_main_job() -> None:
    test = readme_steps("readme-test-command")
    install = test.index('pip install -e ".[test]"')
    assert readme_steps("readme-main-command") == [*test[:install], "pip install -e .", "polytope reproduce main"]
    # `polytope` is the installed script of the one entry point that test_main_job runs
    assert 'polytope = "polytope.commands.main:main"' in (ROOT / "pyproject.toml").read_text()


def test_ci_steps_reads_the_ci_script() -> None:
    steps = ci_steps()
    assert steps[0] == "python3 -m venv .venv" and steps[-1] == "python -m pytest -q"
    assert any(step.startswith("pip install torch==") for step in steps), "the torch pin"


def test_default_directories_are_beside_the_repository() -> None:
    """The README's defaults: ``../shared/data`` and ``../shared/models/wong_kolter_2018`` next to the checkout."""
    assert ROOT.parent / "shared" / "data" == data.REPO_DEFAULT_DATA_DIR
    assert ROOT.parent / "shared" / "models" / "wong_kolter_2018" == models.DEFAULT_MODELS_DIR
