#!/usr/bin/env bash
# VNN-COMP run_instance.sh for polytope: v1 CATEGORY ONNX_FILE VNNLIB_FILE RESULTS_FILE TIMEOUT.
# Writes the results file (sat with the assignment, unsat, timeout, unknown or error).
set -uo pipefail
if [ "${1:-}" != "v1" ] || [ "$#" -ne 6 ]; then
    echo "run_instance.sh: usage: run_instance.sh v1 CATEGORY ONNX_FILE VNNLIB_FILE RESULTS_FILE TIMEOUT" >&2
    exit 1
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
ONNX_FILE=$3
VNNLIB_FILE=$4
RESULTS_FILE=$5
TIMEOUT=$6
rm -f "$RESULTS_FILE"
"$PY" -m polytope verify "$VNNLIB_FILE" --network "$ONNX_FILE" --timeout "$TIMEOUT" --results "$RESULTS_FILE"
status=$?
if [ ! -s "$RESULTS_FILE" ]; then
    echo "error" > "$RESULTS_FILE"
fi
exit $status
