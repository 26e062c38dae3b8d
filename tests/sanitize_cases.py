"""A few small forward and backward calls for compute-sanitizer (tests/sanitize.sh):
ragged tiles, causal with Nq != Nk, GQA, several head dims, the backward with
atomic and deterministic dQ, with its fast tiles and with the small ones (the
shared memory capped at 99 KB); the band kernels (windows, soft-capping). On a
Hopper GPU the forward also runs as each of its kernels: the sm_90a one with and
without its softmax overlap, and the sm_80 one. `--forward`: the forward calls only
(quicker under racecheck); `--head-dim D`: only the cases of head dim D; `--poison`: the
outputs NaN-filled before each kernel (for initcheck, which does not count the Hopper
forward's TMA stores of O as writes: an element no kernel writes stays NaN and fails
here instead). Exits non-zero on a bad result, NaN included."""

import argparse
import sys

import torch

import flash_ext
from flash_ext import reference

CASES = [  # (b, hq, hkv, nq, nk, d, causal, dtype, window, softcap)
    (1, 2, 2, 17, 17, 64, False, torch.bfloat16, None, None),
    (1, 2, 1, 129, 77, 128, True, torch.float16, None, None),
    (2, 4, 2, 77, 200, 32, True, torch.bfloat16, None, None),
    (1, 1, 1, 300, 100, 256, True, torch.bfloat16, None, None),
    (1, 2, 2, 5, 140, 96, False, torch.float16, None, None),
    (1, 2, 1, 129, 77, 128, False, torch.bfloat16, (20, 5), None),
    (1, 2, 2, 100, 300, 64, True, torch.float16, (50, -1), 30.0),
    (1, 1, 1, 200, 130, 256, False, torch.bfloat16, None, 20.0),
    (1, 2, 2, 300, 700, 64, False, torch.float16, None, None),  # more key tiles than stages
    (1, 2, 1, 257, 600, 256, True, torch.bfloat16, None, None),
    (1, 2, 2, 300, 700, 256, False, torch.float16, None, None),  # ragged last key tile of 80
    (1, 2, 1, 130, 50, 256, False, torch.bfloat16, None, None),  # one key tile, ragged
    (2, 9, 3, 1000, 1100, 128, False, torch.bfloat16, None, None),  # more query blocks than SMs
    (1, 2, 2, 380, 300, 64, False, torch.bfloat16, None, None),  # Hopper: three consumer warpgroups
    (1, 2, 1, 380, 700, 64, True, torch.float16, None, None),  # the same, causal
]
# Forward kernel choices on Hopper: (force the sm_80 kernel, the sm_90a kernel's overlap).
FORWARD_KERNELS = [(False, True), (False, False), (True, True)]


def error(got, want, scale=1.0):
    """The largest difference over scale; infinite where any element is NaN."""
    diff = (got.float() - want).abs()
    return float("inf") if torch.isnan(diff).any() else diff.max().item() / scale


def main(forward_only, head_dim, poison):
    flash_ext.interface._C.set_poison_outputs(poison)
    errors = [0.0]
    cases = [case for case in CASES if head_dim is None or case[5] == head_dim]
    for b, hq, hkv, nq, nk, d, causal, dtype, window, softcap in cases:
        band = dict(causal=causal, window=window, softcap=softcap)
        q = torch.randn(b, hq, nq, d, device="cuda").to(dtype)
        k = torch.randn(b, hkv, nk, d, device="cuda").to(dtype)
        v = torch.randn(b, hkv, nk, d, device="cuda").to(dtype)
        do = torch.randn(b, hq, nq, d, device="cuda").to(dtype)
        ref, lse = reference.attention_forward(q.float(), k.float(), v.float(), **band)
        for force_sm80, overlap in FORWARD_KERNELS:
            flash_ext.interface._C.set_force_sm80(force_sm80)
            flash_ext.interface._C.set_sm90_overlap(overlap)
            errors.append(error(flash_ext.attention(q, k, v, **band), ref))
        flash_ext.interface._C.set_force_sm80(False)
        flash_ext.interface._C.set_sm90_overlap(True)
        if forward_only:
            continue
        want = reference.attention_backward(do.float(), q.float(), k.float(), v.float(), ref, lse, **band)
        for smem_cap in (0, 99 * 1024):
            flash_ext.interface._C.set_smem_cap(smem_cap)
            for deterministic in (False, True):
                leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                out = flash_ext.attention(*leaves, deterministic=deterministic, **band)
                for g, w in zip(torch.autograd.grad(out, leaves, do), want):
                    errors.append(error(g, w, max(1.0, w.abs().max().item())))
        flash_ext.interface._C.set_smem_cap(0)
    torch.cuda.synchronize()
    worst = max(errors)
    print(f"sanitize cases: {len(cases)} run {'forward' if forward_only else 'forward and backward'}, "
          f"worst max error {worst:.2e}")
    return 0 if worst < 5e-2 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Small flash_ext calls for compute-sanitizer.")
    parser.add_argument("--forward", action="store_true", help="the forward calls only")
    parser.add_argument("--head-dim", type=int, help="only the cases of this head dim")
    parser.add_argument("--poison", action="store_true", help="NaN-fill the outputs before each kernel")
    args = parser.parse_args()
    sys.exit(main(args.forward, args.head_dim, args.poison))
