"""Host time per eager call, in microseconds: flash_ext.attention (and the binding it ends
in, flash_ext._C.fwd) against SDPA's backends, on shapes small enough that the CPU, not
the GPU, sets the pace. Short attention calls are timed CUDA event to CUDA event; when the
host takes longer to issue a call than the GPU takes to run it, that time is the host's.

    python3 bench/host_time.py [--calls 2000] [--shape B H N D] ...
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_ext
from flash_ext import interface


def per_call_us(fn, calls):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def kernels_per_call(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name.split("(")[0][:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--shape", nargs=4, type=int, action="append", metavar=("B", "H", "N", "D"))
    args = parser.parse_args()
    shapes = args.shape or [(1, 1, 128, 64), (1, 8, 512, 128)]
    scale = 0.125
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {args.calls} calls, no grad")
    print("| B H N D | causal | flash_ext.attention | _C.fwd | SDPA cuDNN | SDPA flash |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for b, h, n, d in shapes:
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for causal in (False, True):
                fns = {"flash_ext": lambda: flash_ext.attention(q, k, v, causal=causal),
                       "_C.fwd": lambda: interface._C.fwd(q, k, v, causal, scale, -1, -1, 0.0)}
                cells = [f"{per_call_us(fn, args.calls):.1f}" for fn in fns.values()]
                for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
                    with sdpa_kernel(backend):
                        cells.append(f"{per_call_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), args.calls):.1f}")
                print(f"| {b} {h} {n} {d} | {int(causal)} | " + " | ".join(cells) + " |")
            if (b, h, n, d) == tuple(shapes[0]):
                print("kernels of one flash_ext.attention call:", kernels_per_call(fns["flash_ext"]))


if __name__ == "__main__":
    main()
