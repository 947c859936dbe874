#!/usr/bin/env bash
# VNN-COMP install_tool.sh for polytope: one argument, the version string "v1".
# Creates a virtual environment beside the repository and installs polytope with its ONNX extra.
set -euo pipefail
if [ "${1:-}" != "v1" ]; then
    echo "install_tool.sh: expected the version string 'v1' as the first argument, got '${1:-}'" >&2
    exit 1
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${POLYTOPE_PYTHON:-python3}"
"$PYTHON" -m venv "$ROOT/.venv"
"$ROOT/.venv/bin/python" -m pip install -q --upgrade pip
"$ROOT/.venv/bin/python" -m pip install -q torch==2.13.0
"$ROOT/.venv/bin/python" -m pip install -q -e "$ROOT[onnx]"
"$ROOT/.venv/bin/python" -m polytope --help >/dev/null
echo "polytope installed in $ROOT/.venv"
