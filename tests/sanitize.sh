#!/usr/bin/env bash
# Run the kernels under compute-sanitizer: memcheck, racecheck, synccheck, initcheck.
# Needs a GPU and compute-sanitizer on PATH. Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in memcheck racecheck synccheck; do
    echo "== compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 1 python3 tests/sanitize_cases.py
done
# initcheck does not count a TMA store (the Hopper forward's O) as a
# write, and reports every element of it read afterwards: there the outputs are NaN-filled
# first, and an element no kernel writes fails the cases' NaN check instead.
echo "== compute-sanitizer --tool initcheck"
compute-sanitizer --tool initcheck --error-exitcode 1 python3 tests/sanitize_cases.py --poison
