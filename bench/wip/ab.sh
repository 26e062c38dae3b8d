#!/usr/bin/env bash
# Untested work on the Hopper forward, kept as patches (bench/PERFORMANCE.md, open leads):
#   1_q_halves.patch  Q in one part per consumer warpgroup, each loaded and freed on its own
#                     barrier pair; the trace harness prints a hash of O and the LSE.
#   2_o_by_tma.patch  (on top of 1) O staged in shared memory and stored by TMA where it fits.
# A/B in the trace harness (no extension build), run on the GPU machine from the repository
# root after, here:
#   mkdir ab_main && git archive HEAD csrc | tar -x -C ab_main
#   git apply bench/wip/1_q_halves.patch && mkdir ab_half && cp -r csrc ab_half/
#   git apply bench/wip/2_o_by_tma.patch
# Every row's output hash must equal main's (N=1050: a Q half wholly past the end; a hang
# there means TMA does not complete a box wholly out of bounds).
set -u
export PATH=/usr/local/cuda/bin:$PATH
NV="nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -DNO_TRACE -o"
$NV /tmp/main_t -Iab_main/csrc bench/trace_fwd_sm90.cu &
$NV /tmp/half_t -Iab_half/csrc bench/trace_fwd_sm90.cu &
$NV /tmp/tma_t -Icsrc bench/trace_fwd_sm90.cu &
wait
for cfg in "128 1050 4 16 0" "128 1050 4 16 1" "256 1050 4 8 1" "64 1050 4 32 0" "256 512 32 8 0" "256 512 32 8 1" \
           "256 1024 16 8 1" "256 2048 8 8 0" "256 2048 8 8 1" "128 512 32 16 0" "128 512 32 16 1" "128 2048 8 16 0" \
           "64 512 32 32 0" "64 1024 16 32 1" "64 2048 8 32 1"; do
  for rep in 1 2; do for b in main_t half_t tma_t; do
    echo "$b $(timeout 20 /tmp/$b $cfg /tmp/x.bin 2>&1 | tr '\n' ' ')"
  done; done
done
