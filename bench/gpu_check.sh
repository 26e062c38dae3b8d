#!/usr/bin/env bash
# Everything a kernel change is checked with on a GPU, in one call: build, the tests (GPU ones
# included), compute-sanitizer, and the side-by-side benchmark, with logs and
# results under OUT_DIR and a short summary printed last.
#   bash bench/gpu_check.sh OUT_DIR [bench.py options; default --mode fwd, the forward sweep]
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT_DIR [bench.py options]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"

python3 -m pip install --no-build-isolation -e . > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
python3 -m pytest tests -q -p no:cacheprovider > "$out/tests.log" 2>&1
tail -n 3 "$out/tests.log"
bash tests/sanitize.sh > "$out/sanitize.log" 2>&1
echo "compute-sanitizer exit code $?"
grep SUMMARY "$out/sanitize.log"
bench_args=("$@")
[ ${#bench_args[@]} -eq 0 ] && bench_args=(--mode fwd)
python3 bench/bench.py --out "$out/results" "${bench_args[@]}" > "$out/bench.log" 2> "$out/bench_progress.log"
for json in "$out"/results/bench_*.json; do
    python3 bench/summary.py "$json"
done
