// FlashAttention-2 forward for sm_80 and later: mma.sync tensor cores,
// cp.async double buffering, online softmax in registers.
//
// A thread block owns kBlockM query rows of one (batch, head); each warp owns
// 16 of them. The block walks the key/value tiles that its rows can see, last
// tile first, so the tiles that need a mask (the causal diagonal and the
// ragged tail) are done first and the rest run unmasked.
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "params.h"
#include "ptx.cuh"

namespace flash {

template <typename Tag> struct DeviceType;
template <> struct DeviceType<Fp16> { using type = __half; };
template <> struct DeviceType<Bf16> { using type = __nv_bfloat16; };

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarpSize = 32;
constexpr int kMmaM = 16;    // rows of one mma.m16n8k16 tile
constexpr int kMmaN = 8;     // columns of its accumulator
constexpr int kMmaK = 16;    // its reduction depth
constexpr int kChunk = 8;    // 16-byte chunk = 8 half-precision elements

// Tile sizes of the sm_80 forward: the one place they are chosen.
template <int kHeadDim_>
struct FwdTileSm80 {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = 128;
    static constexpr int kBlockN = kHeadDim <= 64 ? 128 : (kHeadDim <= 128 ? 64 : 32);
    static constexpr int kWarps = kBlockM / kMmaM;
    static constexpr int kThreads = kWarps * kWarpSize;
    // Q fragments stay in registers when they fit beside the O accumulator.
    static constexpr bool kQInRegs = kHeadDim <= 128;
    static constexpr int kStages = 2;
    // Each shared-memory row is padded by one 16-byte chunk: kHeadDim/8 + 1
    // chunks is odd, so the 8 rows one ldmatrix phase reads start in 8
    // different 16-byte bank groups: no bank conflicts.
    static constexpr int kRowStride = kHeadDim + kChunk;
    static constexpr int kQElems = kBlockM * kRowStride;
    static constexpr int kKVElems = kBlockN * kRowStride;
    static constexpr int kSmemBytes = (kQElems + 2 * kStages * kKVElems) * 2;

    static_assert(kHeadDim % kMmaK == 0 && kHeadDim <= 256, "head dim");
    static_assert(kBlockN % kMmaK == 0 && kBlockM % kMmaM == 0, "tile");
    static_assert((kHeadDim / kChunk) % 2 == 0, "padding needs an even chunk count per row");
    static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Copy a (kRows x kHeadDim) tile, rows [0, rows_valid) and columns
// [0, head_dim) of it real, into padded shared memory; the rest zero-filled.
template <typename Tile, int kRows, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride,
                                                int rows_valid, int head_dim) {
    constexpr int kChunksPerRow = Tile::kHeadDim / kChunk;
    constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
    for (int pass = 0; pass < ceil_div(kChunks, Tile::kThreads); ++pass) {
        const int i = pass * Tile::kThreads + threadIdx.x;
        if (kChunks % Tile::kThreads != 0 && i >= kChunks) break;
        const int row = i / kChunksPerRow;
        const int col = (i % kChunksPerRow) * kChunk;
        const bool valid = row < rows_valid && col < head_dim;
        const T* src = valid ? gmem + row * row_stride + col : gmem;
        cp_async_16(smem + row * Tile::kRowStride + col, src, valid);
    }
}

// A-operand fragment (16x16) of rows [0,16) and columns [col, col+16) of a
// padded shared tile whose first row is `smem`.
template <typename Tile, typename T>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* smem, int col) {
    const int lane = threadIdx.x % kWarpSize;
    ldmatrix_x4(a, smem + (lane % 16) * Tile::kRowStride + col + (lane / 16) * kChunk);
}

template <typename Tag, int kHeadDim, bool kCausal>
__global__ void __launch_bounds__(FwdTileSm80<kHeadDim>::kThreads, 1)
fwd_kernel_sm80(const __grid_constant__ FwdParams p) {
    using T = typename DeviceType<Tag>::type;
    using Tile = FwdTileSm80<kHeadDim>;
    constexpr int kBlockM = Tile::kBlockM;
    constexpr int kBlockN = Tile::kBlockN;
    constexpr int kRowStride = Tile::kRowStride;
    constexpr int kNTiles = kBlockN / kMmaN;     // 8-wide column tiles of S
    constexpr int kDTiles = kHeadDim / kMmaN;    // 8-wide column tiles of O
    constexpr int kDSteps = kHeadDim / kMmaK;    // k-steps of S = Q Kᵀ
    constexpr int kNSteps = kBlockN / kMmaK;     // k-steps of O += P V

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* q_smem = reinterpret_cast<T*>(smem_raw);                 // [kBlockM][kRowStride]
    T* k_smem = q_smem + Tile::kQElems;                          // [kStages][kBlockN][kRowStride]
    T* v_smem = k_smem + Tile::kStages * Tile::kKVElems;         // [kStages][kBlockN][kRowStride]

    const int m_block = gridDim.x - 1 - blockIdx.x;  // longest (causal) rows first
    const int head = blockIdx.y;
    const int batch = blockIdx.z;
    const int head_kv = head / (p.heads_q / p.heads_kv);
    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    const int m0 = m_block * kBlockM;

    const T* q_g = static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride
                   + m0 * p.q_row_stride;
    const T* k_g = static_cast<const T*>(p.k) + batch * p.k_batch_stride + head_kv * p.k_head_stride;
    const T* v_g = static_cast<const T*>(p.v) + batch * p.v_batch_stride + head_kv * p.v_head_stride;

    // Query i sees keys j <= i + diag (causal, bottom-right aligned).
    const int diag = p.seqlen_k - p.seqlen_q;
    const int n_end = kCausal ? max(0, min(p.seqlen_k, m0 + kBlockM + diag)) : p.seqlen_k;
    const int n_tiles = ceil_div(n_end, kBlockN);
    // Tiles from n_masked_from on need the mask: the ragged tail, and, when
    // causal, every tile reaching past the last key the block's first row sees.
    int n_masked_from = n_tiles * kBlockN > p.seqlen_k ? n_tiles - 1 : n_tiles;
    if (kCausal) n_masked_from = min(n_masked_from, max(0, (m0 + diag + 1) / kBlockN));

    auto load_kv = [&](int tile, int stage) {
        const int n0 = tile * kBlockN;
        load_tile_async<Tile, kBlockN>(k_smem + stage * Tile::kKVElems, k_g + n0 * p.k_row_stride,
                                       p.k_row_stride, p.seqlen_k - n0, p.head_dim);
        load_tile_async<Tile, kBlockN>(v_smem + stage * Tile::kKVElems, v_g + n0 * p.v_row_stride,
                                       p.v_row_stride, p.seqlen_k - n0, p.head_dim);
    };

    if (n_tiles > 0) {
        load_tile_async<Tile, kBlockM>(q_smem, q_g, p.q_row_stride, p.seqlen_q - m0, p.head_dim);
        load_kv(n_tiles - 1, 0);
    }
    cp_async_commit();

    const T* q_warp = q_smem + warp * kMmaM * kRowStride;  // this warp's 16 query rows
    uint32_t q_frag[Tile::kQInRegs ? kDSteps : 1][4];        // [k-step][A fragment]

    // Per thread: rows g = lane / 4 and g + 8 of the warp's 16 (index r = 0, 1).
    float o_acc[kDTiles][4] = {};  // O, 16 x kHeadDim per warp
    float row_max[2] = {-INFINITY, -INFINITY};  // m, of the scores already scaled by scale·log2e
    float row_sum[2] = {0.f, 0.f};              // l, this thread's partial sum

    const int row_in_block = warp * kMmaM + lane / 4;
    const int col_in_tile = (lane % 4) * 2;

    auto step = [&](int it, auto masked) {
        constexpr bool kMasked = decltype(masked)::value;
        const int tile = n_tiles - 1 - it;
        const int stage = it % Tile::kStages;
        if (it + 1 < n_tiles) load_kv(tile - 1, (it + 1) % Tile::kStages);
        cp_async_commit();
        cp_async_wait<1>();  // this tile's copies (and Q's) have landed
        __syncthreads();

        if constexpr (Tile::kQInRegs) {
            if (it == 0) {
#pragma unroll
                for (int ks = 0; ks < kDSteps; ++ks) load_a_frag<Tile>(q_frag[ks], q_warp, ks * kMmaK);
            }
        }

        // S = Q Kᵀ: 16 x kBlockN per warp, float32
        const T* k_tile = k_smem + stage * Tile::kKVElems;
        float s[kNTiles][4] = {};
#pragma unroll
        for (int ks = 0; ks < kDSteps; ++ks) {
            uint32_t a[4];
            if constexpr (Tile::kQInRegs) {
#pragma unroll
                for (int i = 0; i < 4; ++i) a[i] = q_frag[ks][i];
            } else {
                load_a_frag<Tile>(a, q_warp, ks * kMmaK);
            }
#pragma unroll
            for (int nt = 0; nt < kNTiles; nt += 2) {
                // Kᵀ fragments of column tiles nt, nt + 1: matrices (n 0-7 | 8-15) x (k lo | hi)
                uint32_t b[4];
                ldmatrix_x4(b, k_tile + (nt * kMmaN + (lane / 16) * 8 + lane % 8) * kRowStride
                                   + ks * kMmaK + ((lane / 8) % 2) * 8);
                mma_16816<T>(s[nt], a, b[0], b[1]);
                mma_16816<T>(s[nt + 1], a, b[2], b[3]);
            }
        }

        // Scale into the exp2 domain; masked scores become -inf.
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[nt][e] *= p.scale_log2;
                if constexpr (kMasked) {
                    const int row = m0 + row_in_block + (e / 2) * 8;
                    const int col = tile * kBlockN + nt * kMmaN + col_in_tile + e % 2;
                    const bool visible = col < p.seqlen_k && (!kCausal || col <= row + diag);
                    if (!visible) s[nt][e] = -INFINITY;
                }
            }
        }

        // m_new = max(m, rowmax S);  α = exp2(m - m_new);  P = exp2(S - m_new);  l = α·l + rowsum P
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float m_new = row_max[r];
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt) m_new = fmaxf(m_new, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffff, m_new, 1));
            m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffff, m_new, 2));
            // A row with no visible key so far keeps m = -inf; subtract 0 so P = 0, not NaN.
            const float m_use = m_new == -INFINITY ? 0.f : m_new;
            alpha[r] = exp2_approx(row_max[r] - m_use);
            row_max[r] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt) {
                s[nt][2 * r] = exp2_approx(s[nt][2 * r] - m_use);
                s[nt][2 * r + 1] = exp2_approx(s[nt][2 * r + 1] - m_use);
                sum += s[nt][2 * r] + s[nt][2 * r + 1];
            }
            row_sum[r] = alpha[r] * row_sum[r] + sum;
        }

        // O = α·O, skipped when no row of the warp raised its max.
        if (__any_sync(0xffffffff, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
            for (int dt = 0; dt < kDTiles; ++dt) {
                o_acc[dt][0] *= alpha[0];
                o_acc[dt][1] *= alpha[0];
                o_acc[dt][2] *= alpha[1];
                o_acc[dt][3] *= alpha[1];
            }
        }

        // O += P V, with P taken straight from the S accumulators as A fragments.
        const T* v_tile = v_smem + stage * Tile::kKVElems;
#pragma unroll
        for (int ks = 0; ks < kNSteps; ++ks) {
            const uint32_t a[4] = {pack2<T>(s[2 * ks][0], s[2 * ks][1]),
                                   pack2<T>(s[2 * ks][2], s[2 * ks][3]),
                                   pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                                   pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
            for (int dt = 0; dt < kDTiles; dt += 2) {
                // V fragments of column tiles dt, dt + 1: matrices (n lo | hi) x (d 0-7 | 8-15), transposed
                uint32_t b[4];
                ldmatrix_x4_trans(b, v_tile + (ks * kMmaK + ((lane / 8) % 2) * 8 + lane % 8) * kRowStride
                                         + dt * kMmaN + (lane / 16) * 8);
                mma_16816<T>(o_acc[dt], a, b[0], b[1]);
                mma_16816<T>(o_acc[dt + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    };

    int it = 0;
    for (; it < n_tiles - n_masked_from; ++it) step(it, std::true_type{});
    for (; it < n_tiles; ++it) step(it, std::false_type{});
    cp_async_wait<0>();

    // O = O / l;  LSE = m·ln2 + ln l (natural log of the unscaled-exp sum)
    float inv_sum[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_sum[r];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        inv_sum[r] = l > 0.f ? 1.f / l : 0.f;
        const int row = m0 + row_in_block + r * 8;
        if (lane % 4 == 0 && row < p.seqlen_q) {
            const float lse = l > 0.f ? row_max[r] * kLn2 + logf(l) : -INFINITY;
            p.lse[(static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q + row] = lse;
        }
    }

    // Stage this warp's 16 rows of O in its own rows of q_smem (no other warp
    // reads them), then write them out in coalesced 16-byte chunks.
    T* o_stage = q_smem + warp * kMmaM * kRowStride;
    __syncwarp();
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            *reinterpret_cast<uint32_t*>(o_stage + (lane / 4 + r * 8) * kRowStride + dt * kMmaN + col_in_tile) =
                pack2<T>(o_acc[dt][2 * r] * inv_sum[r], o_acc[dt][2 * r + 1] * inv_sum[r]);
        }
    }
    __syncwarp();
    T* o_g = static_cast<T*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride
             + (m0 + warp * kMmaM) * p.o_row_stride;
    constexpr int kChunksPerRow = kHeadDim / kChunk;
#pragma unroll
    for (int i = lane; i < kMmaM * kChunksPerRow; i += kWarpSize) {
        const int row = i / kChunksPerRow;
        const int col = (i % kChunksPerRow) * kChunk;
        if (m0 + warp * kMmaM + row < p.seqlen_q && col < p.head_dim) {
            *reinterpret_cast<uint4*>(o_g + row * p.o_row_stride + col) =
                *reinterpret_cast<const uint4*>(o_stage + row * kRowStride + col);
        }
    }
}

inline void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename Tag, int kHeadDim, bool kCausal>
void launch_fwd_sm80(const FwdParams& p, cudaStream_t stream) {
    using Tile = FwdTileSm80<kHeadDim>;
    auto kernel = fwd_kernel_sm80<Tag, kHeadDim, kCausal>;
    int device = 0, smem_optin = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute");
    if (Tile::kSmemBytes > smem_optin) {
        throw std::invalid_argument("flash_ext forward: head dim " + std::to_string(kHeadDim) + " needs " +
                                    std::to_string(Tile::kSmemBytes) + " bytes of shared memory per block; "
                                    "this GPU offers " + std::to_string(smem_optin));
    }
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes),
               "cudaFuncSetAttribute");
    const dim3 grid(ceil_div(p.seqlen_q, Tile::kBlockM), p.heads_q, p.batch);
    kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "flash_ext forward launch");
}

}  // namespace flash
