// Thin wrappers for the Hopper (sm_90a) instructions the Hopper forward uses:
// mbarriers, the tensor-memory-accelerator copy (TMA, cp.async.bulk.tensor),
// warpgroup matrix products (wgmma) with shared-memory descriptors, and the
// proxy fence. Each says what it does; section numbers are the PTX ISA's (8.x).
// Device code only, compiled for sm_90a (wgmma needs the "a" target).
#pragma once

#include <cstdint>

#include <cuda.h>  // CUtensorMap (the type only: no driver call is made from device code)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace flash {
namespace sm90 {

// ---- mbarrier (9.7.13.15): a 64-bit shared-memory barrier that counts arrivals and
// transaction bytes; a phase completes when both reach zero, and its parity flips.

// Expect `arrivals` arrivals per phase.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals));
}

// Arrive once and announce `bytes` of copies (TMA) that will complete on this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Arrive once (a consumer releasing a buffer, say).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Arrive `count` times at once (one thread standing for several warps).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Block until the phase with this parity has completed (try_wait suspends the
// thread for a while in hardware before each retry).
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// Make an initialised mbarrier visible to the async proxy (TMA completes on it), before the barrier
// that lets other threads use it.
__device__ __forceinline__ void fence_mbarrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// ---- Proxy fences (9.7.12.4). Shared memory written by ordinary stores and read
// next by the async proxy (wgmma operands, TMA stores) needs this in the
// writing threads, before the barrier that orders them; so does an mbarrier
// initialised by ordinary stores before TMA completes on it.
__device__ __forceinline__ void fence_proxy_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- TMA (9.7.9.25): copy a box of a tensor described by a tensor map (built on
// the host with cuTensorMapEncodeTiled, passed as a __grid_constant__ kernel
// parameter) from global to shared memory, completing `bytes` on the mbarrier.
// Coordinates are in elements, innermost first; boxes past the tensor's end are
// zero-filled. One thread issues it.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
            dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
        : "memory");
}

__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
        "[%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
        : "memory");
}

// The other way (cp.async.bulk.tensor, shared::cta to global, bulk_group completion):
// a box from shared memory (written by ordinary stores, then fence_proxy_async_shared in
// the writing threads and a barrier) to global memory; rows past the tensor's end are
// not written. One thread issues it, then commits the group; before the shared memory
// is written again, that thread waits until the group has been read.
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, uint32_t src, int c0, int c1, int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
                     reinterpret_cast<uint64_t>(map)),
                 "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Wait until at most N committed groups have not yet read their shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}

// ---- 32-bit stores to and loads from shared memory at a shared-memory address
// (st.shared 9.7.9.9, ld.shared 9.7.9.8).
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t value) {
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(value) : "memory");
}

__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t addr) {
    uint32_t value;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(value) : "r"(addr) : "memory");
    return value;
}

// ---- Named barriers (9.7.13.1): bar.sync on barrier `id` (1-15; 0 is __syncthreads)
// waits until `threads` threads (a multiple of 32) have arrived; bar.arrive arrives
// without waiting. They let one warpgroup synchronise without the others.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- setmaxnreg (9.7.17.1): a warpgroup lowers or raises its per-thread register
// budget, so that warpgroups with little state (TMA producers) give registers to
// those with much (matrix-product consumers). All threads of the warpgroup execute it.
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---- wgmma (9.7.15): a warpgroup (4 consecutive warps, the first a multiple of 4)
// computes D (64 x N, float32, in registers) += A (64 x 16) B (16 x N), A from
// shared memory (a descriptor) or registers, B from shared memory. Asynchronous:
// fence before the first one touches the accumulators, commit a group, wait.

// Order earlier register and shared-memory accesses before the next wgmma.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// Close the group of wgmma issued since the last commit.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Wait until at most kPending committed groups are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Pin the registers of x at this point of the program: the compiler may neither
// move their reads and writes across it nor assume their values unchanged. Put
// after wgmma_wait (the accumulators of the finished products are ready here) and
// before issuing products on registers just written.
template <int N>
__device__ __forceinline__ void fence_operands(float (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(x[i])::"memory");
}

// Shared-memory matrix descriptor (9.7.15.5.1.2) of a tile in the 128-byte
// swizzle (what TMA's CU_TENSOR_MAP_SWIZZLE_128B writes): rows of 128 bytes,
// the 16-byte chunk c of row r stored at chunk c ^ (r % 8), from a 1024-byte
// aligned base. Fields: start address >> 4 (bits 0-13), leading-dimension
// byte offset >> 4 (16-29), stride-dimension byte offset >> 4 (32-45), swizzle
// mode (62-63; 1 = 128 bytes).
//   K-major (rows are the M or N index, the K elements contiguous): the stride
//   byte offset is the distance between groups of 8 rows (1024 bytes, dense);
//   the leading one is unused (1). A k-step of 16 elements advances the start
//   by 32 bytes within the 128-byte row.
//   MN-major (rows are the K index, the M or N elements contiguous): the stride
//   byte offset is the distance between groups of 8 K rows (1024 bytes), the
//   leading one between 64-element column blocks along M or N. A k-step of 16
//   advances the start by 16 rows (2048 bytes).
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr, uint32_t leading_bytes, uint32_t stride_bytes) {
    return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | static_cast<uint64_t>((leading_bytes & 0x3FFFF) >> 4) << 16
           | static_cast<uint64_t>((stride_bytes & 0x3FFFF) >> 4) << 32 | static_cast<uint64_t>(1) << 62;
}

}  // namespace sm90
}  // namespace flash

// The wgmma instructions themselves, Wgmma<N, T>::ss and ::rs: one per (N, element
// type), each naming its N/2 float accumulators per thread. In each warp's 16-row
// slice, accumulator 4j + i holds row g + 8·(i / 2) and column 8j + 2t + i % 2
// (g = lane / 4, t = lane % 4), as in mma.m16n8. scale_d = 0 overwrites D
// instead of adding to it; kTransB reads B MN-major.
#include "ptx_sm90_wgmma.inc"
