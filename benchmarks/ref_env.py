"""The reference environment: ``benchmarks/.venv-ref`` with Wong & Kolter's ``convex_adversarial``.

``python benchmarks/ref_env.py [--force]`` creates it (``run.py`` calls :func:`ensure` itself):
a fresh virtual environment, ``pip install`` of :data:`REQUIREMENTS` from the package index,
then the install-time fixes of :data:`FIXES` applied to the installed package (none of its code
is copied into this project).  A stamp file records what was installed; a changed requirement
or fix list rebuilds the environment.

Fixes needed for convex_adversarial 0.4.4 on torch 2.13:

* ``numpy``: ``convex_adversarial/utils.py`` imports numpy at module level (its helpers for
  probabilistic bounds) but the package declares only ``torch`` as a dependency, and torch no
  longer pulls numpy in, so ``import convex_adversarial`` fails without it.  It is installed
  as an extra requirement.
* No source edits were needed: the l_inf dual network and ``robust_loss`` run unchanged on
  torch 2.13 (no errors, no deprecation warnings).  :data:`FIXES` stays available for
  ``(file, old, new)`` text edits should a later torch need them; each is checked to apply.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-ref"
STAMP = ".polytope-bench-stamp.json"
#: convex_adversarial alone (``pip install --no-deps --target``), for the in-process rows: put on
#: PYTHONPATH next to the project, it runs on the project's own torch and numpy.
OVERLAY = HERE / ".ca-overlay"
OVERLAY_REQUIREMENT = "convex_adversarial==0.4.4"

REQUIREMENTS: tuple[str, ...] = ("torch==2.13.0", "convex_adversarial==0.4.4", "numpy>=1.24,<3")

# (path inside the convex_adversarial package, exact old text, new text).
FIXES: tuple[tuple[str, str, str], ...] = ()

# What results.md lists under "reference fixes" (one line each).
FIX_NOTES: tuple[str, ...] = (
    "numpy installed explicitly: convex_adversarial/utils.py imports it at module level, "
    "but the package only declares torch (and torch 2.13 does not bring numpy), "
    "so `import convex_adversarial` fails without it",
    "no source edits: DualNetwork and robust_loss run unchanged on torch 2.13 (no errors, no warnings)",
)


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def _digest() -> str:
    blob = json.dumps({"requirements": REQUIREMENTS, "fixes": FIXES}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stamp_ok(venv: Path) -> bool:
    try:
        stamp = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("digest") == _digest() and venv_python(venv).exists()


def _package_dir(python: Path) -> Path:
    # find_spec locates the package without importing it (an import could fail before the fixes).
    code = "import importlib.util as u; print(list(u.find_spec('convex_adversarial').submodule_search_locations)[0])"
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def apply_fixes(python: Path) -> list[str]:
    """Apply :data:`FIXES` to the installed package; returns what was done (idempotent)."""
    if not FIXES:
        return []
    return _apply_fixes_at(_package_dir(python))


def _apply_fixes_at(pkg: Path) -> list[str]:
    """:data:`FIXES` applied to the convex_adversarial package directory ``pkg``."""
    done = []
    for rel, old, new in FIXES:
        path = pkg / rel
        text = path.read_text()
        if new in text and old not in text:
            done.append(f"{rel}: already applied")
            continue
        if text.count(old) != 1:
            raise RuntimeError(f"fix for {rel} does not apply: expected text found {text.count(old)} times")
        path.write_text(text.replace(old, new))
        done.append(f"{rel}: applied")
    return done


def ensure(venv: Path = VENV, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """The reference environment's python, creating the environment first when needed."""
    if not force and _stamp_ok(venv):
        return venv_python(venv)
    if venv.exists():
        log(f"reference env: rebuilding {venv}")
        shutil.rmtree(venv)
    log(f"reference env: creating {venv} (pip install {' '.join(REQUIREMENTS)}; a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv_python(venv)
    install_log = venv / "install.log"
    with install_log.open("w") as fh:
        proc = subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", *REQUIREMENTS],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0:
        tail = "\n".join(install_log.read_text().splitlines()[-15:])
        raise RuntimeError(f"pip install into {venv} failed (see {install_log}):\n{tail}")
    for line in apply_fixes(python):
        log(f"reference env: fix {line}")
    check = subprocess.run(
        [str(python), "-c", "import convex_adversarial, torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise RuntimeError(f"convex_adversarial does not import in {venv}:\n{check.stderr[-2000:]}")
    (venv / STAMP).write_text(json.dumps({"digest": _digest(), "requirements": REQUIREMENTS}, indent=1))
    log(f"reference env: ready (torch {check.stdout.strip()})")
    return python


def ensure_overlay(overlay: Path = OVERLAY, log: Callable[[str], None] = print) -> Path:
    """``overlay`` holding :data:`OVERLAY_REQUIREMENT` only, installed with this interpreter's pip; returns it.

    :data:`FIXES` are applied there too, so that both ways of running the reference see the same code.
    """
    stamp = overlay / STAMP
    try:
        if json.loads(stamp.read_text()).get("digest") == _digest():
            return overlay
    except (OSError, ValueError):
        pass
    if overlay.exists():
        shutil.rmtree(overlay)
    log(f"convex_adversarial overlay: pip install --no-deps --target {overlay} {OVERLAY_REQUIREMENT}")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "--target",
         str(overlay), OVERLAY_REQUIREMENT],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pip install --target {overlay} failed:\n{proc.stderr[-2000:]}")
    for line in _apply_fixes_at(overlay / "convex_adversarial"):
        log(f"convex_adversarial overlay: fix {line}")
    stamp.write_text(json.dumps({"digest": _digest(), "requirement": OVERLAY_REQUIREMENT}, indent=1))
    return overlay


def main() -> None:
    parser = argparse.ArgumentParser(description="Create benchmarks/.venv-ref with convex_adversarial.")
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    args = parser.parse_args()
    print(ensure(force=args.force))


if __name__ == "__main__":
    main()
