#!/usr/bin/env bash
# Run the kernels under compute-sanitizer: memcheck, racecheck, synccheck, initcheck.
# Needs a GPU and compute-sanitizer on PATH. Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in memcheck racecheck synccheck initcheck; do
    echo "== compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 1 python3 tests/sanitize_cases.py
done
