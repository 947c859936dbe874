#!/usr/bin/env bash
# VNN-COMP prepare_instance.sh for polytope: v1 CATEGORY ONNX_FILE VNNLIB_FILE.
# Checks that both files exist and that polytope can read them (exit 1 skips the instance).
set -uo pipefail
if [ "${1:-}" != "v1" ] || [ "$#" -ne 4 ]; then
    echo "prepare_instance.sh: usage: prepare_instance.sh v1 CATEGORY ONNX_FILE VNNLIB_FILE" >&2
    exit 1
fi
pkill -f "polytope verify" 2>/dev/null || true
for f in "$3" "$4"; do
    if [ ! -f "$f" ]; then
        echo "prepare_instance.sh: no such file: $f" >&2
        exit 1
    fi
done
exit 0
