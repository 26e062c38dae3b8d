// FlashAttention-2 backward for sm_80 and later: mma.sync tensor cores,
// Q/dO blocks staged in shared memory by cp.async while the previous block
// computes. With O, the forward's row log-sum-exps L and dO:
//   D = rowsum(dO ∘ O) − dL                               (bwd_preprocess_kernel)
//   P = exp(scale·Q Kᵀ − L),  dP = dO Vᵀ,  dS = P ∘ (dP − D)
//   dV = Pᵀ dO,  dK = scale · dSᵀ Q,  dQ = scale · dS K
//
// bwd_kv_kernel_sm80: a block owns kBlockN keys of one (batch, kv head) and
// walks the query blocks that see them, for every query head of the group
// (GQA), dK and dV accumulating in registers. The warps that share a group
// of keys split the queries of Sᵀ = K Qᵀ and dPᵀ = V dOᵀ between them and the
// columns of dK and dV: Pᵀ and dSᵀ go through shared memory, where they are
// the A operands of dV += Pᵀ dO and dK += dSᵀ Q (rows: keys, as the warps
// own them). dQ is either summed in float32 by atomic adds (dS read back as
// query rows), or, deterministic, computed by bwd_dq_kernel_sm80, which owns
// a query block and walks the key blocks (recomputing S and dP), like the
// forward.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "tile_sm80.cuh"

namespace flash {

// The tiles of the dK/dV kernel. kBlockN keys, kKeyGroups groups of
// kKeyTiles·16, meet kBlockM queries at a time. kSplit warps share each group
// of keys: each computes Sᵀ and dPᵀ for the group's keys and kBlockM / kSplit
// of the queries, and dK, dV for all queries and kHeadDim / kSplit of the
// columns, exchanging Pᵀ and dSᵀ through shared memory. (kSplit = 1, with Pᵀ
// and dSᵀ taken straight from the accumulators as in the forward's P V,
// measured slower: bench/PERFORMANCE.md, b1-b3.) kKeyTiles = 2 lets each B
// fragment of Q and dO feed two mma pairs (half the shared-memory reads per mma).
// kQStages = 2: the next query block loads while this one computes; 1 (less
// shared memory): it loads once dK += dSᵀ Q is done, during dQ += dS K.
template <int kHeadDim_, int kBlockM_, int kKeyGroups_, int kKeyTiles_, int kSplit_, int kDqMTiles_,
          int kMinBlocks_, int kQStages_ = 2>
struct BwdKVTileSm80 {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_;
    static constexpr int kKeyGroups = kKeyGroups_;
    static constexpr int kKeyTiles = kKeyTiles_;
    static constexpr int kSplit = kSplit_;
    static constexpr int kWarps = kKeyGroups * kSplit;
    static constexpr int kThreads = kWarps * kWarpSize;
    static constexpr int kWarpKeys = kKeyTiles * kMmaM;  // rows of Sᵀ, dK, dV per warp
    static constexpr int kBlockN = kKeyGroups * kWarpKeys;
    static constexpr int kWarpQueries = kBlockM / kSplit;  // columns of Sᵀ, dPᵀ per warp
    static constexpr int kWarpCols = kHeadDim / kSplit;    // columns of dK, dV per warp
    static constexpr int kMinBlocks = kMinBlocks_;
    static constexpr int kQStages = kQStages_;
    static constexpr bool kSwizzled = true;
    static constexpr int kRowStride = (kHeadDim + 63) / 64 * 64;
    // Pᵀ and dSᵀ in shared memory, kBlockN rows (keys) of kBlockM queries.
    struct PLayout {
        static constexpr bool kSwizzled = true;
        static constexpr int kRowStride = (kBlockM + 63) / 64 * 64;
    };
    static constexpr int kQElems = kBlockM * kRowStride;    // Q or dO, one stage
    static constexpr int kKVElems = kBlockN * kRowStride;   // K or V
    static constexpr int kPElems = kBlockN * PLayout::kRowStride;
    static constexpr int kSmemBytes =
        (2 * kKVElems + 2 * kQStages * kQElems + 2 * kPElems) * 2 + 2 * kQStages * kBlockM * 4;

    static_assert(kQStages == 1 || kQStages == 2, "query block stages");
    static_assert(kSplit >= 2, "Pᵀ and dSᵀ are exchanged through shared memory");
    static_assert(kHeadDim % kMmaK == 0 && kWarpCols % kMmaK == 0, "head dim");
    static_assert(kBlockM % kMmaK == 0 && kWarpQueries % kMmaK == 0 && kBwdRowPad % kBlockM == 0, "query block");
    // dQ += dS K: warp w takes the kDqMTiles·16 query rows w % kDqRowGroups of
    // the block and the kDqCols columns w / kDqRowGroups.
    static constexpr int kDqMTiles = kDqMTiles_;
    static constexpr int kDqRowGroups = kBlockM / (kDqMTiles * kMmaM);
    static constexpr int kDqCols = kHeadDim * kDqRowGroups / kWarps;
    static constexpr int kDqTiles = kDqCols / kMmaN;  // 8-wide column tiles of dQ per warp
    static_assert(kWarps % kDqRowGroups == 0 && kDqCols % kMmaK == 0, "dQ warp layout");
    static_assert(2 * kBlockM / 4 <= kThreads, "one 16-byte chunk of L or D per thread");
    static_assert(kSmemBytes <= kMaxSmemBytes, "shared memory");

    // The dQ accumulator of one query block, kBlockM x kHeadDim floats, is
    // stored in the order the warps add to it, not row by row: a thread adds
    // kDqAdds float pairs, the pair (row g + 8r, columns 2t, 2t + 1) of each
    // of its mma tiles (mt, nt), g = lane / 4, t = lane % 4; pair j = (2·mt + r)·kDqTiles + nt
    // of lane l in warp w is at ((w·kDqAdds + j)·32 + l)·2, so each atomic
    // instruction of a warp covers 256 contiguous bytes (row by row it would
    // touch 8 rows, 8 cache lines: b6). The 8 columns of an 8-wide tile stay
    // together, in order.
    static constexpr int kDqAdds = kDqMTiles * 2 * kDqTiles;
    __device__ static constexpr int dq_accum_offset(int warp, int j, int lane) {
        return ((warp * kDqAdds + j) * kWarpSize + lane) * 2;
    }
    // Where element (row, col) of the block is.
    __device__ static constexpr int dq_accum_offset_of(int row, int col) {
        constexpr int kWarpRows = kDqMTiles * kMmaM;
        const int warp = col / kDqCols * kDqRowGroups + row / kWarpRows;
        const int mt = row % kWarpRows / kMmaM, r = row % kMmaM / 8, g = row % 8;
        const int nt = col % kDqCols / kMmaN, t = col % kMmaN / 2;
        return dq_accum_offset(warp, (2 * mt + r) * kDqTiles + nt, g * 4 + t) + col % 2;
    }
};

// The tiles of the deterministic dQ kernel: a warp owns 16 query rows, the
// block walks kBlockN keys at a time, K and V double-buffered.
template <int kHeadDim_, int kWarps_, int kBlockN_, int kMinBlocks_>
struct BwdDqTileSm80 {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kWarps = kWarps_;
    static constexpr int kThreads = kWarps * kWarpSize;
    static constexpr int kBlockM = kWarps * kMmaM;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kMinBlocks = kMinBlocks_;
    static constexpr bool kSwizzled = true;
    static constexpr int kRowStride = (kHeadDim + 63) / 64 * 64;
    static constexpr int kQElems = kBlockM * kRowStride;
    static constexpr int kKVElems = kBlockN * kRowStride;
    static constexpr int kSmemBytes = (2 * kQElems + 4 * kKVElems) * 2;

    static_assert(kBlockN % kMmaK == 0 && kBwdRowPad % kBlockM == 0, "tile");
    static_assert(kSmemBytes <= kMaxSmemBytes, "shared memory");
};

// A dK/dV tile and a dQ tile for the deterministic pass.
template <typename KVTile_, typename DqTile_>
struct BwdTilesSm80 {
    using KVTile = KVTile_;
    using DqTile = DqTile_;
    static constexpr int kSmemBytes = std::max(KVTile::kSmemBytes, DqTile::kSmemBytes);
};

// The backward's tile sizes per head dim: the one place they are chosen.
// Fast: the H100's tiles (161-209 KB of shared memory per block; the A100
// has 163 KB, sm_86/sm_89 99 KB). Small: within 99 KB, for the GPUs that do
// not offer the fast tiles' shared memory (chosen at launch).
template <int kHeadDim>
struct BwdConfigSm80 {
    // <head dim, kBlockM, kKeyGroups, kKeyTiles, kSplit, kDqMTiles, kMinBlocks(, kQStages)>. The
    // head dims that are multiples of 64 split evenly into the wider warp tiles.
    static constexpr bool kEven = kHeadDim % 64 == 0;
    static constexpr int kDqMTiles = kEven ? 2 : 1;
    using Fast = BwdTilesSm80<
        std::conditional_t<(kHeadDim <= 64), BwdKVTileSm80<kHeadDim, 128, 4, 2, 2, kDqMTiles, 1>,
                           std::conditional_t<(kHeadDim <= 128), BwdKVTileSm80<kHeadDim, 64, 4, 2, 2, kDqMTiles, 1>,
                                              std::conditional_t<kEven, BwdKVTileSm80<kHeadDim, 64, 2, 2, 4, 2, 1>,
                                                                 BwdKVTileSm80<kHeadDim, 64, 4, 1, 2, 1, 1>>>>,
        std::conditional_t<(kHeadDim <= 128), BwdDqTileSm80<kHeadDim, 4, 64, 2>, BwdDqTileSm80<kHeadDim, 4, 32, 1>>>;
    // Small: 32 query rows and, above head dim 128, 32 keys and one query-block stage (dQ pass: 16 keys).
    using Small = BwdTilesSm80<
        std::conditional_t<(kHeadDim <= 64), BwdKVTileSm80<kHeadDim, 64, 4, 2, 2, kDqMTiles, 1>,
                           std::conditional_t<(kHeadDim <= 128), BwdKVTileSm80<kHeadDim, 32, 2, 2, 2, kDqMTiles, 1>,
                                              BwdKVTileSm80<kHeadDim, 32, 2, 1, 2, 1, 1, 1>>>,
        std::conditional_t<(kHeadDim <= 128), BwdDqTileSm80<kHeadDim, 4, 64, 2>, BwdDqTileSm80<kHeadDim, 4, 16, 1>>>;
    static_assert(Small::kSmemBytes <= 99 * 1024, "the small tiles fit every sm_8x GPU");
};

// A warp per query row (padding rows included):
//   D = rowsum(dO ∘ O) − dL;  L2 = L·log2(e), +inf where L = −inf (a row that
//   sees no key) and for padding, so P = exp2(c·S − L2) is 0 there;
// and kHeadDim floats of the dQ accumulator zeroed (the row's share of its
// query block, which is stored in another order: BwdKVTileSm80).
constexpr int kPreprocessRows = 8;  // rows per block of bwd_preprocess_kernel, a warp each

template <typename T, int kHeadDim>
__global__ void bwd_preprocess_kernel(const __grid_constant__ BwdParams p) {
    constexpr int kRowsPerBlock = kPreprocessRows;
    const int lane = threadIdx.x % kWarpSize;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
    const int64_t bh = row / p.seqlen_q_padded;  // batch · heads_q + head
    const int i = static_cast<int>(row % p.seqlen_q_padded);
    if (bh >= static_cast<int64_t>(p.batch) * p.heads_q) return;
    const int batch = static_cast<int>(bh / p.heads_q), head = static_cast<int>(bh % p.heads_q);
    const bool real = i < p.seqlen_q;

    float dot = 0.f;
    if (real) {
        const T* o = static_cast<const T*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride + i * p.o_row_stride;
        const T* dout = static_cast<const T*>(p.dout) + batch * p.do_batch_stride + head * p.do_head_stride
                        + i * p.do_row_stride;
        for (int c = lane * kChunk; c < p.head_dim; c += kWarpSize * kChunk) {
            const uint4 o8 = *reinterpret_cast<const uint4*>(o + c);
            const uint4 do8 = *reinterpret_cast<const uint4*>(dout + c);
            const uint32_t* o2 = reinterpret_cast<const uint32_t*>(&o8);
            const uint32_t* do2 = reinterpret_cast<const uint32_t*>(&do8);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 a = unpack2<T>(o2[j]), b = unpack2<T>(do2[j]);
                dot = fmaf(a.x, b.x, fmaf(a.y, b.y, dot));
            }
        }
#pragma unroll
        for (int w = kWarpSize / 2; w >= 1; w /= 2) dot += __shfl_xor_sync(0xffffffff, dot, w);
    }
    if (p.dq_accum != nullptr) {
        float* acc = p.dq_accum + row * kHeadDim;
        for (int c = lane * 4; c < kHeadDim; c += kWarpSize * 4) *reinterpret_cast<float4*>(acc + c) = float4{};
    }
    if (lane == 0) {
        const int64_t at = bh * p.seqlen_q_padded + i;
        const float lse = real ? p.lse[bh * p.seqlen_q + i] : -INFINITY;
        p.delta[at] = real ? dot - (p.dlse != nullptr ? p.dlse[bh * p.seqlen_q + i] : 0.f) : 0.f;
        p.lse_log2[at] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    }
}

// dQ = dq_scale · dQ accumulator, in the input type, 8 elements (8
// consecutive floats of the accumulator, see BwdKVTileSm80) per thread.
template <typename T, typename Tile>
__global__ void bwd_convert_dq_kernel(const __grid_constant__ BwdParams p) {
    constexpr int kHeadDim = Tile::kHeadDim;
    const int chunks_per_row = p.head_dim / kChunk;
    const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t row = chunk / chunks_per_row;  // (batch · heads_q + head) · seqlen_q + i
    if (row >= static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q) return;
    const int c = static_cast<int>(chunk % chunks_per_row) * kChunk;
    const int i = static_cast<int>(row % p.seqlen_q);
    const int head = static_cast<int>(row / p.seqlen_q % p.heads_q);
    const int batch = static_cast<int>(row / p.seqlen_q / p.heads_q);
    const int64_t block = (row / p.seqlen_q * p.seqlen_q_padded + i) / Tile::kBlockM;  // its query block
    const float4* acc = reinterpret_cast<const float4*>(p.dq_accum + block * Tile::kBlockM * kHeadDim
                                                        + Tile::dq_accum_offset_of(i % Tile::kBlockM, c));
    const float4 lo = acc[0], hi = acc[1];
    uint4 out;
    out.x = pack2<T>(lo.x * p.dq_scale, lo.y * p.dq_scale);
    out.y = pack2<T>(lo.z * p.dq_scale, lo.w * p.dq_scale);
    out.z = pack2<T>(hi.x * p.dq_scale, hi.y * p.dq_scale);
    out.w = pack2<T>(hi.z * p.dq_scale, hi.w * p.dq_scale);
    T* dq = static_cast<T*>(p.dq) + batch * p.dq_batch_stride + head * p.dq_head_stride + i * p.dq_row_stride + c;
    *reinterpret_cast<uint4*>(dq) = out;
}

// C (16·kMTiles x 8·kNTiles per warp, mma accumulators) += A B over kKSteps
// k-steps of 16, where the A fragment of m-tile mt comes from a_frag(ks, mt, a)
// and B's from shared memory via one ldmatrix.x4 (trans or not) per pair of
// 8-column tiles, at b_lane.at(row, col) with (row, col) = b_at(ks, j) for the
// pair j. Each B fragment feeds kMTiles mma pairs; the loads of a group go
// before its mmas (see load_group).
template <typename T, int kKSteps, int kMTiles, int kNTiles, bool kTrans, typename Tile, typename AFrag, typename BAt>
__device__ __forceinline__ void warp_mma(float (&c)[kMTiles][kNTiles][4], AFrag a_frag,
                                         const LdmatrixLane<Tile>& b_lane, uint32_t b_offset, BAt b_at) {
    constexpr int kPairs = kNTiles / 2;
    constexpr int kGroup = load_group(kPairs, kMTiles);
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) a_frag(ks, mt, a[mt]);
#pragma unroll
        for (int j0 = 0; j0 < kPairs; j0 += kGroup) {
            uint32_t b[kGroup][4];
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
                const auto [row, col] = b_at(ks, j0 + j);
                if constexpr (kTrans) {
                    ldmatrix_x4_trans(b[j], b_offset + b_lane.at(row, col));
                } else {
                    ldmatrix_x4(b[j], b_offset + b_lane.at(row, col));
                }
            }
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt) {
                    mma_16816<T>(c[mt][2 * (j0 + j)], a[mt], b[j][0], b[j][1]);
                    mma_16816<T>(c[mt][2 * (j0 + j) + 1], a[mt], b[j][2], b[j][3]);
                }
            }
        }
    }
}

// The A fragment of k-step ks taken from mma accumulators x (16 x 8·n per
// warp): the 16 columns 16·ks.. in the input type (the forward's P V trick).
template <typename T, int kN>
__device__ __forceinline__ void acc_to_a(const float (&x)[kN][4], int ks, uint32_t (&a)[4]) {
    a[0] = pack2<T>(x[2 * ks][0], x[2 * ks][1]);
    a[1] = pack2<T>(x[2 * ks][2], x[2 * ks][3]);
    a[2] = pack2<T>(x[2 * ks + 1][0], x[2 * ks + 1][1]);
    a[3] = pack2<T>(x[2 * ks + 1][2], x[2 * ks + 1][3]);
}

struct RowCol {
    int row, col;
};

// kBand, kSoftcap: as in the forward (fwd_kernel_sm80).
template <typename T, typename Tile, bool kCausal, bool kBand, bool kSoftcap, bool kAtomicDq>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks)
bwd_kv_kernel_sm80(const __grid_constant__ BwdParams p) {
    static_assert(!(kCausal && kBand) && (!kSoftcap || kBand), "the band kernel covers causal and soft-capping");
    constexpr int kHeadDim = Tile::kHeadDim;
    constexpr int kBlockM = Tile::kBlockM;
    constexpr int kBlockN = Tile::kBlockN;
    constexpr int kKeyTiles = Tile::kKeyTiles;           // 16-row (key) tiles of Sᵀ, dK, dV per warp
    constexpr int kSTiles = Tile::kWarpQueries / kMmaN;  // 8-wide column (query) tiles of Sᵀ, dPᵀ per warp
    constexpr int kDSteps = kHeadDim / kMmaK;            // k-steps of Sᵀ = K Qᵀ and dPᵀ = V dOᵀ
    constexpr int kMSteps = kBlockM / kMmaK;             // k-steps of dV += Pᵀ dO and dK += dSᵀ Q
    constexpr int kNSteps = kBlockN / kMmaK;             // k-steps of dQ += dS K
    constexpr int kOutTiles = Tile::kWarpCols / kMmaN;   // 8-wide column tiles of dK, dV per warp
    using PLayout = typename Tile::PLayout;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* k_smem = reinterpret_cast<T*>(smem_raw);      // [kBlockN][kRowStride]
    T* v_smem = k_smem + Tile::kKVElems;              // [kBlockN][kRowStride]
    T* q_smem = v_smem + Tile::kKVElems;              // [kQStages][kBlockM][kRowStride]
    T* do_smem = q_smem + Tile::kQStages * Tile::kQElems;   // [kQStages][kBlockM][kRowStride]
    T* pt_smem = do_smem + Tile::kQStages * Tile::kQElems;  // [kBlockN][PLayout::kRowStride]: Pᵀ
    T* ds_smem = pt_smem + Tile::kPElems;             // [kBlockN][PLayout::kRowStride]: dSᵀ
    float* lse_smem = reinterpret_cast<float*>(ds_smem + Tile::kPElems);  // [kQStages][kBlockM]: L·log2(e)
    float* delta_smem = lse_smem + Tile::kQStages * kBlockM;               // [kQStages][kBlockM]: D

    const int n_block = blockIdx.x, head_kv = blockIdx.y, batch = blockIdx.z;
    const int group = p.heads_q / p.heads_kv;
    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    const int n0 = n_block * kBlockN;
    const int key_group = warp % Tile::kKeyGroups;           // the warp's kWarpKeys keys
    const int warp_n0 = n0 + key_group * Tile::kWarpKeys;
    const int q_col0 = warp / Tile::kKeyGroups * Tile::kWarpQueries;  // its queries in Sᵀ, dPᵀ
    const int d_col0 = warp / Tile::kKeyGroups * Tile::kWarpCols;     // its columns of dK, dV

    // Query i sees key j <= i + diag (causal, bottom-right aligned): the query
    // blocks before m_first see none of this block's keys; from m_unmasked on
    // they see all of them.
    // Band: the query blocks [m_first, m_blocks) see some of its keys, those of
    // [m_unmasked, band.unmasked_end) all of them.
    const int diag = p.seqlen_k - p.seqlen_q;
    const BandQueryBlocks band =
        kBand ? band_query_blocks<kBlockM, kBlockN>(n0, diag, p.seqlen_q, p.window_left, p.window_right)
              : BandQueryBlocks{};
    const int m_blocks = kBand ? band.end : ceil_div(p.seqlen_q, kBlockM);  // one past the last query block
    const int m_first = kBand ? band.first : kCausal ? min(m_blocks, max(0, n0 - diag) / kBlockM) : 0;
    const int m_unmasked = kBand     ? band.unmasked_begin
                           : kCausal ? max(m_first, ceil_div(max(0, n0 + kBlockN - 1 - diag), kBlockM))
                                     : 0;
    const bool key_tail = n0 + kBlockN > p.seqlen_k;  // the ragged last key block: masked throughout
    const int m_count = max(0, m_blocks - m_first);
    const int steps = group * m_count;               // (query head, query block) pairs

    const T* k_g = static_cast<const T*>(p.k) + batch * p.k_batch_stride + head_kv * p.k_head_stride;
    const T* v_g = static_cast<const T*>(p.v) + batch * p.v_batch_stride + head_kv * p.v_head_stride;

    // The steps walk query blocks m_first.. of query head head_kv·group, then
    // of the group's next head, and so on (counted, not divided out of the step).
    struct QueryBlock {
        int head, m_block;
    };
    const QueryBlock first_block{head_kv * group, m_first};
    auto next_block = [&](QueryBlock b) {
        return b.m_block + 1 < m_blocks ? QueryBlock{b.head, b.m_block + 1} : QueryBlock{b.head + 1, m_first};
    };
    auto load_q_do = [&](QueryBlock b, int stage) {
        const int head = b.head, m0 = b.m_block * kBlockM;
        const T* q_g = static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride
                       + m0 * p.q_row_stride;
        const T* do_g = static_cast<const T*>(p.dout) + batch * p.do_batch_stride + head * p.do_head_stride
                        + m0 * p.do_row_stride;
        load_tile_async<Tile, kBlockM>(q_smem + stage * Tile::kQElems, q_g, p.q_row_stride, p.seqlen_q - m0,
                                       p.head_dim);
        load_tile_async<Tile, kBlockM>(do_smem + stage * Tile::kQElems, do_g, p.do_row_stride, p.seqlen_q - m0,
                                       p.head_dim);
        // L2 and D of the block's rows: padded buffers, whole 16-byte chunks.
        constexpr int kChunksPerVec = kBlockM / 4;
        if (threadIdx.x < 2 * kChunksPerVec) {
            const bool is_lse = threadIdx.x < kChunksPerVec;
            const int c = (threadIdx.x % kChunksPerVec) * 4;
            const int64_t at = (static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q_padded + m0 + c;
            float* dst = (is_lse ? lse_smem : delta_smem) + stage * kBlockM + c;
            cp_async_16(smem_addr(dst), (is_lse ? p.lse_log2 : p.delta) + at, true);
        }
    };

    if (steps > 0) {
        load_tile_async<Tile, kBlockN>(k_smem, k_g + n0 * p.k_row_stride, p.k_row_stride, p.seqlen_k - n0, p.head_dim);
        load_tile_async<Tile, kBlockN>(v_smem, v_g + n0 * p.v_row_stride, p.v_row_stride, p.seqlen_k - n0, p.head_dim);
        load_q_do(first_block, 0);
    }
    cp_async_commit();

    // ldmatrix lanes. A fragments (rows lane % 16, chunk bit lane / 16): the
    // warp's K and V rows, and its rows of Pᵀ, dSᵀ. B fragments,
    // not transposed (rows (lane / 16)·8 + lane % 8, chunk bit (lane / 8) % 2):
    // Q and dO as Qᵀ, dOᵀ. B transposed (as the A pattern): dO, Q for dV, dK
    // and K for dQ. dS read as the A fragment of dS from dSᵀ: the
    // non-transposed B pattern, transposed.
    const int key_row = key_group * Tile::kWarpKeys;  // the warp's first row in k_smem, v_smem, pt_smem, ds_smem
    const LdmatrixLane<Tile> k_a(k_smem + key_row * Tile::kRowStride, lane % 16, lane / 16);
    const LdmatrixLane<Tile> v_a(v_smem + key_row * Tile::kRowStride, lane % 16, lane / 16);
    const LdmatrixLane<PLayout> pt_a(pt_smem + key_row * PLayout::kRowStride, lane % 16, lane / 16);
    const LdmatrixLane<PLayout> dst_a(ds_smem + key_row * PLayout::kRowStride, lane % 16, lane / 16);
    const int dq_row0 = warp % Tile::kDqRowGroups * Tile::kDqMTiles * kMmaM;  // dQ: the warp's queries
    const int dq_col0 = warp / Tile::kDqRowGroups * Tile::kDqCols;  // and its columns
    const LdmatrixLane<Tile> q_b(q_smem, (lane / 16) * 8 + lane % 8, (lane / 8) % 2);
    const LdmatrixLane<Tile> do_b(do_smem, (lane / 16) * 8 + lane % 8, (lane / 8) % 2);
    const LdmatrixLane<Tile> q_bt(q_smem, lane % 16, lane / 16);
    const LdmatrixLane<Tile> do_bt(do_smem, lane % 16, lane / 16);
    const LdmatrixLane<Tile> k_bt(k_smem, lane % 16, lane / 16);
    const LdmatrixLane<PLayout> ds_at(ds_smem, (lane / 16) * 8 + lane % 8, (lane / 8) % 2);
    constexpr uint32_t kQStageBytes = Tile::kQElems * 2;

    // Per thread: keys g = lane / 4 and g + 8 (r = 0, 1) of each of the
    // warp's 16-key tiles; queries 2t, 2t + 1 (t = lane % 4) of each 8-wide column tile.
    float dv_acc[kKeyTiles][kOutTiles][4] = {};  // dV, kWarpKeys x kWarpCols per warp
    float dk_acc[kKeyTiles][kOutTiles][4] = {};  // dK / scale, the same
    const int key_row0 = warp_n0 + lane / 4;
    const int col_in_tile = (lane % 4) * 2;

    // x (kWarpKeys x kWarpQueries, mma accumulators) into the warp's rows and columns of a shared tile.
    using KeyScores = float[kKeyTiles][kSTiles][4];
    auto store_t = [&](T* tile, const KeyScores& x) {
#pragma unroll
        for (int mt = 0; mt < kKeyTiles; ++mt) {
#pragma unroll
            for (int nt = 0; nt < kSTiles; ++nt) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int row = key_row + mt * kMmaM + lane / 4 + 8 * r;
                    *reinterpret_cast<uint32_t*>(tile + smem_offset<PLayout>(row, q_col0 + nt * kMmaN + col_in_tile)) =
                        pack2<T>(x[mt][nt][2 * r], x[mt][nt][2 * r + 1]);
                }
            }
        }
    };

    auto step = [&](int it, QueryBlock block, QueryBlock next, auto masked) {
        constexpr bool kMasked = decltype(masked)::value;
        const int stage = it % Tile::kQStages;
        const int m0 = block.m_block * kBlockM;
        cp_async_wait<0>();  // this step's Q, dO, L2, D (and K, V) have landed
        __syncthreads();     // and every warp is done with the previous step
        if constexpr (Tile::kQStages == 2) {
            if (it + 1 < steps) load_q_do(next, 1 - stage);
            cp_async_commit();
        }

        const uint32_t q_off = stage * kQStageBytes;
        const float* lse_s = lse_smem + stage * kBlockM + q_col0;
        const float* delta_s = delta_smem + stage * kBlockM + q_col0;
        // B fragments of Qᵀ, dOᵀ (the warp's queries) and of dO, Q (its columns of dK, dV).
        auto query_cols = [&](int ks, int j) { return RowCol{q_col0 + j * 2 * kMmaN, ks * kMmaK}; };
        auto out_cols = [&](int ks, int j) { return RowCol{ks * kMmaK, d_col0 + j * 2 * kMmaN}; };

        // Sᵀ = K Qᵀ (soft-capped: x → softcap_out · tanh(softcap_in · x), keeping 1 − tanh² for dSᵀ);
        // Pᵀ = exp2(c·Sᵀ − L2), masked to 0 where a key is not seen.
        KeyScores s = {};  // Sᵀ, then Pᵀ: kWarpKeys x kWarpQueries per warp
        warp_mma<T, kDSteps, kKeyTiles, kSTiles, false>(
            s, [&](int ks, int mt, uint32_t(&a)[4]) { ldmatrix_x4(a, k_a.at(mt * kMmaM, ks * kMmaK)); }, q_b, q_off,
            query_cols);
        float cap_grad[kSoftcap ? kKeyTiles : 1][kSoftcap ? kSTiles : 1][4];
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt) {
            const float2 lse = *reinterpret_cast<const float2*>(lse_s + nt * kMmaN + col_in_tile);
#pragma unroll
            for (int mt = 0; mt < kKeyTiles; ++mt) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        float& x = s[mt][nt][2 * r + c];
                        if constexpr (kSoftcap) {
                            const float th = tanh_approx(x * p.softcap_in);
                            cap_grad[mt][nt][2 * r + c] = 1.f - th * th;
                            x = p.softcap_out * th;
                        }
                        x = exp2_approx(fmaf(x, p.scale_log2, -(c == 0 ? lse.x : lse.y)));
                        if constexpr (kMasked) {
                            const int key = key_row0 + mt * kMmaM + 8 * r;
                            const int query = m0 + q_col0 + nt * kMmaN + col_in_tile + c;
                            if (!key_seen<kCausal, kBand>(p, diag, query, key)) x = 0.f;
                        }
                    }
                }
            }
        }

        // dPᵀ = V dOᵀ;  dSᵀ = Pᵀ ∘ (dPᵀ − D) (∘ (1 − tanh²), soft-capped)
        KeyScores dp = {};  // dPᵀ, then dSᵀ
        warp_mma<T, kDSteps, kKeyTiles, kSTiles, false>(
            dp, [&](int ks, int mt, uint32_t(&a)[4]) { ldmatrix_x4(a, v_a.at(mt * kMmaM, ks * kMmaK)); }, do_b, q_off,
            query_cols);
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt) {
            const float2 delta = *reinterpret_cast<const float2*>(delta_s + nt * kMmaN + col_in_tile);
#pragma unroll
            for (int mt = 0; mt < kKeyTiles; ++mt) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    dp[mt][nt][i] = s[mt][nt][i] * (dp[mt][nt][i] - (i % 2 == 0 ? delta.x : delta.y));
                    if constexpr (kSoftcap) dp[mt][nt][i] *= cap_grad[mt][nt][i];
                }
            }
        }

        // Pᵀ and dSᵀ to shared memory, for every warp of the key group (and dS for dQ).
        store_t(pt_smem, s);
        store_t(ds_smem, dp);
        __syncthreads();

        // dV += Pᵀ dO;  dK += dSᵀ Q (the scale is applied once, at the end)
        auto pt_frag = [&](int ks, int mt, uint32_t(&a)[4]) {
            ldmatrix_x4(a, pt_a.at(mt * kMmaM, ks * kMmaK));
        };
        auto dst_frag = [&](int ks, int mt, uint32_t(&a)[4]) {
            ldmatrix_x4(a, dst_a.at(mt * kMmaM, ks * kMmaK));
        };
        warp_mma<T, kMSteps, kKeyTiles, kOutTiles, true>(dv_acc, pt_frag, do_bt, q_off, out_cols);
        warp_mma<T, kMSteps, kKeyTiles, kOutTiles, true>(dk_acc, dst_frag, q_bt, q_off, out_cols);
        if constexpr (Tile::kQStages == 1) {
            __syncthreads();  // every warp is done with Q, dO, L2 and D
            if (it + 1 < steps) load_q_do(next, 0);
            cp_async_commit();
        }

        if constexpr (kAtomicDq) {
            // dQ += dS K, each warp on kDqMTiles·16 query rows and kDqCols columns (see BwdKVTileSm80).
            constexpr int kDqMTiles = Tile::kDqMTiles;
            constexpr int kDqTiles = Tile::kDqTiles;
            float dq[kDqMTiles][kDqTiles][4] = {};  // dQ / scale, kDqMTiles·16 queries x kDqCols per warp
            warp_mma<T, kNSteps, kDqMTiles, kDqTiles, true>(
                dq,
                [&](int ks, int mt, uint32_t(&a)[4]) {
                    ldmatrix_x4_trans(a, ds_at.at(ks * kMmaK, dq_row0 + mt * kMmaM));
                },
                k_bt, 0, [&](int ks, int j) { return RowCol{ks * kMmaK, dq_col0 + j * 2 * kMmaN}; });
            // The accumulator's padding rows and columns take the zeros of
            // the padding queries and of K's padding: no bounds to check.
            float* acc = p.dq_accum
                         + ((static_cast<int64_t>(batch) * p.heads_q + block.head) * p.seqlen_q_padded + m0) * kHeadDim
                         + Tile::dq_accum_offset(warp, 0, lane);
#pragma unroll
            for (int mt = 0; mt < kDqMTiles; ++mt) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
#pragma unroll
                    for (int nt = 0; nt < kDqTiles; ++nt) {
                        const int j = (2 * mt + r) * kDqTiles + nt;
                        atomic_add2(acc + Tile::dq_accum_offset(0, j, 0), dq[mt][nt][2 * r], dq[mt][nt][2 * r + 1]);
                    }
                }
            }
        }
    };

    QueryBlock block = first_block;
    for (int it = 0; it < steps; ++it) {
        const QueryBlock next = next_block(block);
        if (key_tail || ((kCausal || kBand) && block.m_block < m_unmasked)
            || (kBand && block.m_block >= band.unmasked_end)) {
            step(it, block, next, std::true_type{});
        } else {
            step(it, block, next, std::false_type{});
        }
        block = next;
    }
    cp_async_wait<0>();

    // dK = scale · dK, dV: each warp stages its kWarpKeys rows and kWarpCols
    // columns in the same place of k_smem and v_smem, then writes them out in
    // coalesced 16-byte chunks.
    __syncthreads();  // every warp is done reading K and V
    T* dk_stage = k_smem + key_row * Tile::kRowStride;
    T* dv_stage = v_smem + key_row * Tile::kRowStride;
#pragma unroll
    for (int mt = 0; mt < kKeyTiles; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = mt * kMmaM + lane / 4 + 8 * r;
#pragma unroll
            for (int nt = 0; nt < kOutTiles; ++nt) {
                const int col = d_col0 + nt * kMmaN + col_in_tile;
                *reinterpret_cast<uint32_t*>(dk_stage + smem_offset<Tile>(row, col)) =
                    pack2<T>(dk_acc[mt][nt][2 * r] * p.scale, dk_acc[mt][nt][2 * r + 1] * p.scale);
                *reinterpret_cast<uint32_t*>(dv_stage + smem_offset<Tile>(row, col)) =
                    pack2<T>(dv_acc[mt][nt][2 * r], dv_acc[mt][nt][2 * r + 1]);
            }
        }
    }
    __syncwarp();
    T* dk_g = static_cast<T*>(p.dk) + batch * p.dk_batch_stride + head_kv * p.dk_head_stride
              + warp_n0 * p.dk_row_stride;
    T* dv_g = static_cast<T*>(p.dv) + batch * p.dv_batch_stride + head_kv * p.dv_head_stride
              + warp_n0 * p.dv_row_stride;
    constexpr int kChunksPerRow = Tile::kWarpCols / kChunk;
#pragma unroll
    for (int i = lane; i < Tile::kWarpKeys * kChunksPerRow; i += kWarpSize) {
        const int row = i / kChunksPerRow;
        const int col = d_col0 + (i % kChunksPerRow) * kChunk;
        if (warp_n0 + row < p.seqlen_k && col < p.head_dim) {
            *reinterpret_cast<uint4*>(dk_g + row * p.dk_row_stride + col) =
                *reinterpret_cast<const uint4*>(dk_stage + smem_offset<Tile>(row, col));
            *reinterpret_cast<uint4*>(dv_g + row * p.dv_row_stride + col) =
                *reinterpret_cast<const uint4*>(dv_stage + smem_offset<Tile>(row, col));
        }
    }
}

// Deterministic dQ: a block owns kBlockM query rows of one (batch, head), a
// warp 16 of them, and walks the key blocks its rows see:
//   S = Q Kᵀ;  P = exp2(c·S − L2);  dP = dO Vᵀ;  dS = P ∘ (dP − D);  dQ += dS K.
template <typename T, typename Tile, bool kCausal, bool kBand, bool kSoftcap>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks)
bwd_dq_kernel_sm80(const __grid_constant__ BwdParams p) {
    static_assert(!(kCausal && kBand) && (!kSoftcap || kBand), "the band kernel covers causal and soft-capping");
    constexpr int kBlockM = Tile::kBlockM;
    constexpr int kBlockN = Tile::kBlockN;
    constexpr int kNTiles = kBlockN / kMmaN;          // 8-wide column (key) tiles of S
    constexpr int kDSteps = Tile::kHeadDim / kMmaK;   // k-steps of S = Q Kᵀ and dP = dO Vᵀ
    constexpr int kNSteps = kBlockN / kMmaK;          // k-steps of dQ += dS K
    constexpr int kDTiles = Tile::kHeadDim / kMmaN;   // 8-wide column tiles of dQ

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* q_smem = reinterpret_cast<T*>(smem_raw);       // [kBlockM][kRowStride]
    T* do_smem = q_smem + Tile::kQElems;               // [kBlockM][kRowStride]
    T* k_smem = do_smem + Tile::kQElems;               // [2][kBlockN][kRowStride]
    T* v_smem = k_smem + 2 * Tile::kKVElems;           // [2][kBlockN][kRowStride]

    const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
    const int head_kv = head / (p.heads_q / p.heads_kv);
    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    const int m0 = m_block * kBlockM;
    const int warp_m0 = m0 + warp * kMmaM;

    const T* q_g = static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride + m0 * p.q_row_stride;
    const T* do_g = static_cast<const T*>(p.dout) + batch * p.do_batch_stride + head * p.do_head_stride
                    + m0 * p.do_row_stride;
    const T* k_g = static_cast<const T*>(p.k) + batch * p.k_batch_stride + head_kv * p.k_head_stride;
    const T* v_g = static_cast<const T*>(p.v) + batch * p.v_batch_stride + head_kv * p.v_head_stride;

    // The key tiles [tile_first, tile_end): unmasked [unmasked_from, masked_from), the rest masked.
    const int diag = p.seqlen_k - p.seqlen_q;
    const KeyTiles keys = key_tiles<kBlockM, kBlockN, kCausal>(m0, diag, p.seqlen_k);
    const BandTiles band = kBand ? band_tiles<kBlockM, kBlockN>(m0, diag, p.seqlen_k, p.window_left, p.window_right)
                                 : BandTiles{};
    const int tile_end = kBand ? band.end : keys.count;
    const int tile_first = kBand ? band.end - band.count : 0;
    const int masked_from = kBand ? band.end - band.masked_hi : keys.masked_from;
    const int unmasked_from = kBand ? masked_from - band.unmasked : 0;

    auto load_kv = [&](int tile, int stage) {
        const int n0 = tile * kBlockN;
        load_tile_async<Tile, kBlockN>(k_smem + stage * Tile::kKVElems, k_g + n0 * p.k_row_stride, p.k_row_stride,
                                       p.seqlen_k - n0, p.head_dim);
        load_tile_async<Tile, kBlockN>(v_smem + stage * Tile::kKVElems, v_g + n0 * p.v_row_stride, p.v_row_stride,
                                       p.seqlen_k - n0, p.head_dim);
    };
    if (tile_end > tile_first) {
        load_tile_async<Tile, kBlockM>(q_smem, q_g, p.q_row_stride, p.seqlen_q - m0, p.head_dim);
        load_tile_async<Tile, kBlockM>(do_smem, do_g, p.do_row_stride, p.seqlen_q - m0, p.head_dim);
        load_kv(tile_first, tile_first % 2);
    }
    cp_async_commit();

    const LdmatrixLane<Tile> q_a(q_smem + warp * kMmaM * Tile::kRowStride, lane % 16, lane / 16);
    const LdmatrixLane<Tile> do_a(do_smem + warp * kMmaM * Tile::kRowStride, lane % 16, lane / 16);
    const LdmatrixLane<Tile> k_b(k_smem, (lane / 16) * 8 + lane % 8, (lane / 8) % 2);
    const LdmatrixLane<Tile> v_b(v_smem, (lane / 16) * 8 + lane % 8, (lane / 8) % 2);
    const LdmatrixLane<Tile> k_bt(k_smem, lane % 16, lane / 16);
    constexpr uint32_t kKVStageBytes = Tile::kKVElems * 2;

    // Per thread: rows g = lane / 4 and g + 8 (r = 0, 1) of the warp's 16.
    const int row0 = warp_m0 + lane / 4;
    const int col_in_tile = (lane % 4) * 2;
    float lse_log2[2], delta[2];
    const int64_t bh_row = (static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q_padded;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        lse_log2[r] = p.lse_log2[bh_row + row0 + 8 * r];
        delta[r] = p.delta[bh_row + row0 + 8 * r];
    }
    float dq_acc[1][kDTiles][4] = {};  // dQ / scale, 16 queries x kHeadDim per warp

    auto step = [&](int tile, auto masked) {
        constexpr bool kMasked = decltype(masked)::value;
        const int stage = tile % 2;
        cp_async_wait<0>();  // this tile's K and V (and Q, dO) have landed
        __syncthreads();     // and every warp is done with the previous tile
        if (tile + 1 < tile_end) load_kv(tile + 1, 1 - stage);
        cp_async_commit();
        const uint32_t kv_off = stage * kKVStageBytes;
        const int n0 = tile * kBlockN;

        // B fragments of Kᵀ and Vᵀ: the tile's keys.
        auto key_cols = [](int ks, int j) { return RowCol{j * 2 * kMmaN, ks * kMmaK}; };
        // S = Q Kᵀ (soft-capped, keeping 1 − tanh²);  P = exp2(c·S − L2), masked to 0
        float s[1][kNTiles][4] = {};  // S, then P: 16 queries x kBlockN keys per warp
        warp_mma<T, kDSteps, 1, kNTiles, false>(
            s, [&](int ks, int, uint32_t(&a)[4]) { ldmatrix_x4(a, q_a.at(0, ks * kMmaK)); }, k_b, kv_off, key_cols);
        float cap_grad[kSoftcap ? kNTiles : 1][4];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float& x = s[0][nt][i];
                if constexpr (kSoftcap) {
                    const float th = tanh_approx(x * p.softcap_in);
                    cap_grad[nt][i] = 1.f - th * th;
                    x = p.softcap_out * th;
                }
                x = exp2_approx(fmaf(x, p.scale_log2, -lse_log2[i / 2]));
                if constexpr (kMasked) {
                    const int key = n0 + nt * kMmaN + col_in_tile + i % 2;
                    const int query = row0 + 8 * (i / 2);
                    if (!key_seen<kCausal, kBand>(p, diag, query, key)) x = 0.f;
                }
            }
        }
        // dP = dO Vᵀ;  dS = P ∘ (dP − D) (∘ (1 − tanh²), soft-capped)
        float dp[1][kNTiles][4] = {};
        warp_mma<T, kDSteps, 1, kNTiles, false>(
            dp, [&](int ks, int, uint32_t(&a)[4]) { ldmatrix_x4(a, do_a.at(0, ks * kMmaK)); }, v_b, kv_off, key_cols);
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                dp[0][nt][i] = s[0][nt][i] * (dp[0][nt][i] - delta[i / 2]);
                if constexpr (kSoftcap) dp[0][nt][i] *= cap_grad[nt][i];
            }
        }
        // dQ += dS K
        warp_mma<T, kNSteps, 1, kDTiles, true>(
            dq_acc, [&](int ks, int, uint32_t(&a)[4]) { acc_to_a<T>(dp[0], ks, a); }, k_bt, kv_off,
            [](int ks, int j) { return RowCol{ks * kMmaK, j * 2 * kMmaN}; });
    };

    int tile = tile_first;
    for (; tile < unmasked_from; ++tile) step(tile, std::true_type{});
    for (; tile < masked_from; ++tile) step(tile, std::false_type{});
    for (; tile < tile_end; ++tile) step(tile, std::true_type{});
    cp_async_wait<0>();

    // dQ = dq_scale · dQ, staged in the warp's own rows of q_smem (no other
    // warp reads them), then written in coalesced 16-byte chunks.
    T* dq_stage = q_smem + warp * kMmaM * Tile::kRowStride;
    __syncwarp();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
            *reinterpret_cast<uint32_t*>(dq_stage + smem_offset<Tile>(lane / 4 + 8 * r, dt * kMmaN + col_in_tile)) =
                pack2<T>(dq_acc[0][dt][2 * r] * p.dq_scale, dq_acc[0][dt][2 * r + 1] * p.dq_scale);
        }
    }
    __syncwarp();
    T* dq_g = static_cast<T*>(p.dq) + batch * p.dq_batch_stride + head * p.dq_head_stride + warp_m0 * p.dq_row_stride;
    store_tile_warp<Tile, kMmaM, Tile::kHeadDim>(dq_g, p.dq_row_stride, dq_stage, warp_m0, p.seqlen_q, p.head_dim);
}

template <typename Tag, typename Tiles, bool kCausal, bool kBand, bool kSoftcap>
void launch_bwd_sm80_tiles(const BwdParams& p, bool deterministic, cudaStream_t stream) {
    using T = typename DeviceType<Tag>::type;
    using KVTile = typename Tiles::KVTile;
    using DqTile = typename Tiles::DqTile;
    constexpr int kHeadDim = KVTile::kHeadDim;
    constexpr int kPreRows = kPreprocessRows;
    const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q_padded;
    bwd_preprocess_kernel<T, kHeadDim><<<static_cast<unsigned>((rows + kPreRows - 1) / kPreRows),
                                         kPreRows * kWarpSize, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "flash_ext backward preprocess launch");

    const dim3 kv_grid(ceil_div(p.seqlen_k, KVTile::kBlockN), p.heads_kv, p.batch);
    if (deterministic) {
        auto kv_kernel = bwd_kv_kernel_sm80<T, KVTile, kCausal, kBand, kSoftcap, false>;
        set_smem(kv_kernel, KVTile::kSmemBytes, "backward, head dim " + std::to_string(kHeadDim));
        kv_kernel<<<kv_grid, KVTile::kThreads, KVTile::kSmemBytes, stream>>>(p);
        check_cuda(cudaGetLastError(), "flash_ext backward dK/dV launch");
        auto dq_kernel = bwd_dq_kernel_sm80<T, DqTile, kCausal, kBand, kSoftcap>;
        set_smem(dq_kernel, DqTile::kSmemBytes, "backward dQ, head dim " + std::to_string(kHeadDim));
        const dim3 dq_grid(ceil_div(p.seqlen_q, DqTile::kBlockM), p.heads_q, p.batch);
        dq_kernel<<<dq_grid, DqTile::kThreads, DqTile::kSmemBytes, stream>>>(p);
        check_cuda(cudaGetLastError(), "flash_ext backward dQ launch");
    } else {
        auto kv_kernel = bwd_kv_kernel_sm80<T, KVTile, kCausal, kBand, kSoftcap, true>;
        set_smem(kv_kernel, KVTile::kSmemBytes, "backward, head dim " + std::to_string(kHeadDim));
        kv_kernel<<<kv_grid, KVTile::kThreads, KVTile::kSmemBytes, stream>>>(p);
        check_cuda(cudaGetLastError(), "flash_ext backward dK/dV/dQ launch");
        constexpr int kConvertThreads = 256;
        const int64_t chunks = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q * (p.head_dim / kChunk);
        bwd_convert_dq_kernel<T, KVTile><<<static_cast<unsigned>((chunks + kConvertThreads - 1) / kConvertThreads),
                                           kConvertThreads, 0, stream>>>(p);
        check_cuda(cudaGetLastError(), "flash_ext backward dQ conversion launch");
    }
}

// The fast tiles where the GPU offers their shared memory, the small ones otherwise.
// kBand, kSoftcap: the band kernels (windows; causal with a window; soft-capping).
template <typename Tag, int kHeadDim, bool kCausal, bool kBand = false, bool kSoftcap = false>
void launch_bwd_sm80(const BwdParams& p, bool deterministic, cudaStream_t stream) {
    using Config = BwdConfigSm80<kHeadDim>;
    if (Config::Fast::kSmemBytes <= smem_optin()) {
        launch_bwd_sm80_tiles<Tag, typename Config::Fast, kCausal, kBand, kSoftcap>(p, deterministic, stream);
    } else {
        launch_bwd_sm80_tiles<Tag, typename Config::Small, kCausal, kBand, kSoftcap>(p, deterministic, stream);
    }
}

}  // namespace flash
