// The plain parameter structs that the binding fills and the kernels read.
// No torch and no CUDA device code here: this header is shared by both sides.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace flash {

// Element types, as tags the host side can name without CUDA's half headers.
struct Fp16 {};
struct Bf16 {};

// Head dims the kernels are compiled for; any multiple of 8 up to the largest
// runs on the next size up (the extra columns are zero-filled in shared memory).
inline constexpr int kHeadDims[] = {32, 64, 96, 128, 160, 192, 224, 256};

struct FwdParams {
    // (batch, heads, seqlen, head_dim) tensors with unit stride in head_dim;
    // the other strides are in elements.
    const void* q;
    const void* k;
    const void* v;
    void* o;
    float* lse;  // (batch, heads_q, seqlen_q), contiguous

    int64_t q_batch_stride, q_head_stride, q_row_stride;
    int64_t k_batch_stride, k_head_stride, k_row_stride;
    int64_t v_batch_stride, v_head_stride, v_row_stride;
    int64_t o_batch_stride, o_head_stride, o_row_stride;

    int batch, heads_q, heads_kv;  // heads_q = group · heads_kv
    int seqlen_q, seqlen_k;
    int head_dim;  // the tensors' own, <= the compiled kHeadDim

    // The kernels take row maxima of the raw scores Q Kᵀ, so the scale must be
    // positive: the binding moves a negative scale's sign onto q.
    float scale;       // softmax scale (> 0), for the LSE (natural log)
    float scale_log2;  // scale · log2(e): the kernels use exp2

    // Set by the launcher: 0 launches causal blocks head by head (grid = (row
    // blocks, heads, batch)); G > 0 launches them longest first within groups
    // of G (batch, head) pairs (a 1-D grid). The Hopper forward's scheduler hands
    // out the blocks in the same order (fwd_block).
    int causal_head_group;

    // The Hopper forward's block scheduler: a counter of the query blocks taken so
    // far, zero when the kernel starts; the kernel sets it back to zero when done, so
    // launches that run one after another can share one (the binding keeps one per
    // stream). Unused by the sm_80 kernel.
    int* block_counter;

    // Band kernels (sliding window, also with causal): query i sees keys
    // i + diag - window_left .. i + diag + window_right, diag = seqlen_k - seqlen_q;
    // kUnboundedWindow where a side has no bound.
    int window_left, window_right;
    // Soft-capping kernels: the raw score x becomes softcap_out · tanh(softcap_in · x),
    // softcap_in = scale / softcap, softcap_out = softcap / scale (scaled, the capped score).
    float softcap_in, softcap_out;
};

struct BwdParams {
    // Inputs, (batch, heads, seqlen, head_dim) with unit stride in head_dim;
    // strides in elements. q is the forward's (sign-adjusted, see FwdParams).
    const void* q;
    const void* k;
    const void* v;
    const void* o;
    const void* dout;
    const float* lse;   // (batch, heads_q, seqlen_q) from the forward, contiguous
    const float* dlse;  // its gradient, same shape, or nullptr
    // Outputs: dq like q, dk and dv like k and v (heads_kv heads).
    void* dq;
    void* dk;
    void* dv;
    // Workspace, float32, contiguous. Rows padded to seqlen_q_padded (a
    // multiple of every query block) so the kernels copy whole blocks:
    float* lse_log2;  // (batch, heads_q, seqlen_q_padded): LSE·log2(e); +inf for rows that see no key and padding
    float* delta;     // (batch, heads_q, seqlen_q_padded): D = rowsum(dO ∘ O) - dLSE; 0 for padding
    float* dq_accum;  // (batch, heads_q, seqlen_q_padded, compiled head dim ≥ head_dim): dQ / scale, summed by
                      // atomics (the padding takes zeros), each query block in the order of the dK/dV kernel's
                      // warps (BwdKVTileSm80::dq_accum_offset); nullptr if unused

    int64_t q_batch_stride, q_head_stride, q_row_stride;
    int64_t k_batch_stride, k_head_stride, k_row_stride;
    int64_t v_batch_stride, v_head_stride, v_row_stride;
    int64_t o_batch_stride, o_head_stride, o_row_stride;
    int64_t do_batch_stride, do_head_stride, do_row_stride;
    int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
    int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
    int64_t dv_batch_stride, dv_head_stride, dv_row_stride;

    int batch, heads_q, heads_kv;
    int seqlen_q, seqlen_k, seqlen_q_padded;
    int head_dim;

    float scale;       // > 0, as in FwdParams
    float scale_log2;  // scale · log2(e)
    float dq_scale;    // dQ = dq_scale · dS K: the scale, with the sign of the caller's (q's sign was flipped)

    int window_left, window_right;    // band kernels, as in FwdParams
    float softcap_in, softcap_out;    // soft-capping kernels, as in FwdParams
};

// Tests set this (bytes; 0: off) to run the kernels as on a GPU that offers
// only this much shared memory per block: the backward then takes its small tiles.
inline int smem_cap_for_testing = 0;

// Tests and benchmarks clear this to run the Hopper forward without its
// softmax / P·V overlap (both variants are built; see fwd_sm90.cuh).
inline bool sm90_overlap = true;

// A window side without a bound (far beyond any sequence, far from int overflow).
inline constexpr int kUnboundedWindow = 1 << 30;

// The query block of every backward kernel divides this (see seqlen_q_padded).
inline constexpr int kBwdRowPad = 128;

// Defined once per (type, head dim, variant) in a generated .cu file: full,
// causal, band (kCausal false: the window, causal or not, in the params), or
// band with soft-capping (kSoftcap; only with kBand, which covers every mask).
template <typename T, int kHeadDim, bool kCausal, bool kBand, bool kSoftcap>
void run_fwd_sm80(const FwdParams& params, cudaStream_t stream);

// deterministic: dQ from its own pass over the key blocks instead of atomic adds.
template <typename T, int kHeadDim, bool kCausal, bool kBand, bool kSoftcap>
void run_bwd_sm80(const BwdParams& params, bool deterministic, cudaStream_t stream);

// Head dims with a Hopper (sm_90a) forward; it runs where the tensors' head dim is
// exactly one of them (flash_api.cpp decides).
inline constexpr int kSm90HeadDims[] = {64, 128, 256};

constexpr bool is_sm90_head_dim(int head_dim) {
    for (int d : kSm90HeadDims) {
        if (d == head_dim) return true;
    }
    return false;
}

// Defined once per (type, head dim, variant, as run_fwd_sm80) in a generated .cu file when the
// build targets sm_90a.
template <typename T, int kHeadDim, bool kCausal, bool kBand, bool kSoftcap>
void run_fwd_sm90(const FwdParams& params, cudaStream_t stream);

}  // namespace flash
