// FlashAttention-2 forward for sm_80 and later: mma.sync tensor cores, K/V
// tiles staged in shared memory by cp.async while the previous tile computes,
// online softmax in registers.
//
// A thread block owns kBlockM query rows of one (batch, head); each warp owns
// kMTiles·16 of them. The block walks the key/value tiles that its rows can
// see, last tile first, so the tiles that need a mask (the causal diagonal and
// the ragged tail) are done first and the rest run unmasked.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "tile_sm80.cuh"

namespace flash {

// One tile configuration of the sm_80 forward. A warp owns kMTiles·16 query
// rows, so each K or V fragment it loads from shared memory feeds kMTiles mmas.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kMTiles_, bool kQInRegs_, int kStages_ = 2,
          int kMinBlocks_ = 1, bool kSwizzled_ = true>
struct FwdTileSm80 {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kMTiles = kMTiles_;
    static constexpr int kWarpRows = kMTiles * kMmaM;
    static constexpr int kWarps = kBlockM / kWarpRows;
    static constexpr int kThreads = kWarps * kWarpSize;
    static constexpr bool kQInRegs = kQInRegs_;
    // K/V buffers. 2: the next tile's K and V load while this one computes.
    // 1: V loads during S = Q Kᵀ and the softmax, the next K during O += P V.
    static constexpr int kStages = kStages_;
    // Blocks that must fit on an SM at once: caps the registers per thread.
    static constexpr int kMinBlocks = kMinBlocks_;
    // Shared-memory layout (see smem_offset). Swizzled: rows of whole 128-byte
    // lines (kHeadDim rounded up to 64 elements), chunks permuted within each
    // line. Padded: rows of kHeadDim + 8 elements, in place.
    static constexpr bool kSwizzled = kSwizzled_;
    static constexpr int kRowStride = kSwizzled ? (kHeadDim + 63) / 64 * 64 : kHeadDim + kChunk;
    static constexpr int kQElems = kBlockM * kRowStride;
    static constexpr int kKVElems = kBlockN * kRowStride;
    static constexpr int kSmemBytes = (kQElems + 2 * kStages * kKVElems) * 2;

    static_assert(kHeadDim % kMmaK == 0 && kHeadDim <= 256, "head dim");
    static_assert(kBlockN % kMmaK == 0 && kBlockM % kWarpRows == 0, "tile");
    static_assert(kSwizzled || (kHeadDim / kChunk) % 2 == 0, "padding needs an even chunk count per row");
    static_assert(kSmemBytes <= kMaxSmemBytes, "shared memory");
    static_assert(kStages == 1 || kStages == 2, "stages");
};

// The tile sizes of the sm_80 forward per head dim: the one place they are
// chosen (bench/tune_fwd_sm80.cu measures the candidates; bench/PERFORMANCE.md has
// the figures). Up to head dim 128 a warp owns 32 rows, two m-tiles, so each
// K/V fragment feeds two mmas, and two blocks of 4 warps share an SM (three
// up to head dim 64). Rows are swizzled where the registers allow: the
// swizzled addresses cost registers that the 168-register cap of the
// 3-block tile does not have, nor the causal kernel up to head dim 128 (its
// mask path already spills). Every choice fits the 99 KB of shared memory of
// sm_86/sm_89 as well.
template <int kHeadDim, bool kCausal>
struct FwdConfigSm80 {
    static constexpr bool kSwizzled = kHeadDim > 128 || (kHeadDim > 64 && !kCausal);
    using Tile = std::conditional_t<
        (kHeadDim <= 64), FwdTileSm80<kHeadDim, 128, 64, 2, false, 1, 3, kSwizzled>,
        std::conditional_t<(kHeadDim <= 128), FwdTileSm80<kHeadDim, 128, 64, 2, false, 1, 1, kSwizzled>,
                           FwdTileSm80<kHeadDim, 64, 64, 1, false, 1, 1, kSwizzled>>>;
    static_assert(Tile::kSmemBytes <= 99 * 1024, "fits every sm_8x GPU");
};


// kBand: a sliding window (p.window_left, p.window_right; causal is a band
// with window_right = 0), masked at both of its edges; kCausal is then false.
// kSoftcap (band kernels only): the scores are soft-capped before the softmax.
template <typename T, typename Tile, bool kCausal, bool kBand = false, bool kSoftcap = false>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks)
fwd_kernel_sm80(const __grid_constant__ FwdParams p) {
    static_assert(!(kCausal && kBand), "a band kernel covers causal");
    static_assert(!kSoftcap || kBand, "soft-capping comes with the band kernel");
    constexpr int kHeadDim = Tile::kHeadDim;
    constexpr int kBlockM = Tile::kBlockM;
    constexpr int kBlockN = Tile::kBlockN;
    constexpr int kMTiles = Tile::kMTiles;
    constexpr int kRowStride = Tile::kRowStride;
    constexpr int kNTiles = kBlockN / kMmaN;     // 8-wide column tiles of S
    constexpr int kDTiles = kHeadDim / kMmaN;    // 8-wide column tiles of O
    constexpr int kDSteps = kHeadDim / kMmaK;    // k-steps of S = Q Kᵀ
    constexpr int kNSteps = kBlockN / kMmaK;     // k-steps of O += P V

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* q_smem = reinterpret_cast<T*>(smem_raw);                 // [kBlockM][kRowStride]
    T* k_smem = q_smem + Tile::kQElems;                          // [kStages][kBlockN][kRowStride]
    T* v_smem = k_smem + Tile::kStages * Tile::kKVElems;         // [kStages][kBlockN][kRowStride]

    // Blocks start in grid order (the launcher picks it, see FwdParams): head
    // by head, or, for long causal rows, longest first within groups of heads.
    int m_block = kCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    int head = blockIdx.y, batch = blockIdx.z;
    if (kCausal && p.causal_head_group > 0) {
        const FwdBlock block = fwd_block<kCausal>(p, ceil_div(p.seqlen_q, kBlockM), blockIdx.x);
        m_block = block.m_block, head = block.head, batch = block.batch;
    }
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
    const KeyTiles keys = key_tiles<kBlockM, kBlockN, kCausal>(m0, diag, p.seqlen_k);
    const int n_tiles = keys.count, n_masked_from = keys.masked_from;
    // Band: the tiles [tiles_end - band.count, tiles_end), masked at both ends.
    const BandTiles band = kBand ? band_tiles<kBlockM, kBlockN>(m0, diag, p.seqlen_k, p.window_left, p.window_right)
                                 : BandTiles{};
    const int tiles_end = kBand ? band.end : n_tiles;
    const int tiles_count = kBand ? band.count : n_tiles;

    auto load_k = [&](int tile, int stage) {
        const int n0 = tile * kBlockN;
        load_tile_async<Tile, kBlockN>(k_smem + stage * Tile::kKVElems, k_g + n0 * p.k_row_stride,
                                       p.k_row_stride, p.seqlen_k - n0, p.head_dim);
    };
    auto load_v = [&](int tile, int stage) {
        const int n0 = tile * kBlockN;
        load_tile_async<Tile, kBlockN>(v_smem + stage * Tile::kKVElems, v_g + n0 * p.v_row_stride,
                                       p.v_row_stride, p.seqlen_k - n0, p.head_dim);
    };

    if (tiles_count > 0) {
        load_tile_async<Tile, kBlockM>(q_smem, q_g, p.q_row_stride, p.seqlen_q - m0, p.head_dim);
        load_k(tiles_end - 1, 0);
        if constexpr (Tile::kStages == 2) load_v(tiles_end - 1, 0);
    }
    cp_async_commit();

    const T* q_warp = q_smem + warp * Tile::kWarpRows * kRowStride;  // this warp's query rows
    // ldmatrix lanes: Q and V read rows lane % 16 at chunk bit lane / 16 (A
    // fragments of Q; V transposed), K rows (lane / 16)·8 + lane % 8 at chunk bit (lane / 8) % 2.
    const LdmatrixLane<Tile> q_lane(q_warp, lane % 16, lane / 16);
    const LdmatrixLane<Tile> k_lane(k_smem, (lane / 16) * 8 + lane % 8, (lane / 8) % 2);
    const LdmatrixLane<Tile> v_lane(v_smem, lane % 16, lane / 16);
    constexpr uint32_t kKVStageBytes = Tile::kKVElems * 2;
    uint32_t q_frag[kMTiles][Tile::kQInRegs ? kDSteps : 1][4];      // [m-tile][k-step][A fragment]

    // Per thread, in each 16-row m-tile: rows g = lane / 4 and g + 8 (r = 0, 1).
    float o_acc[kMTiles][kDTiles][4] = {};       // O, kWarpRows x kHeadDim per warp
    float row_max[kMTiles][2];                   // m, of the raw scores Q Kᵀ
    float row_sum[kMTiles][2];                   // l, this thread's partial sums
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
        row_max[mt][0] = row_max[mt][1] = -INFINITY;
        row_sum[mt][0] = row_sum[mt][1] = 0.f;
    }

    const int warp_m0 = m0 + warp * Tile::kWarpRows;  // the warp's first query row
    const int warp_row0 = warp_m0 + lane / 4;          // this thread's row in (mt = 0, r = 0)
    const int col_in_tile = (lane % 4) * 2;

    // S = Q Kᵀ for one K tile, masked; then the online softmax turns S into
    // P in place and returns whether any row of the warp raised its max.
    using Scores = float[kMTiles][kNTiles][4];  // S or P: kWarpRows x kBlockN per warp
    using RowScale = float[kMTiles][2];         // α per row
    auto scores_to_probs = [&](int stage, int tile, auto masked, Scores& s, RowScale& alpha) {
        constexpr bool kMasked = decltype(masked)::value;
#pragma unroll
        for (int ks = 0; ks < kDSteps; ++ks) {
            uint32_t a[kMTiles][4];
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                if constexpr (Tile::kQInRegs) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) a[mt][i] = q_frag[mt][ks][i];
                } else {
                    ldmatrix_x4(a[mt], q_lane.at(mt * kMmaM, ks * kMmaK));
                }
            }
            // Kᵀ fragments of column tiles 2j, 2j + 1: matrices (n 0-7 | 8-15) x (k lo | hi).
            // A group's loads all go before its mmas, so they are in flight
            // while the previous group's mmas run.
#pragma unroll
            for (int j0 = 0; j0 < kNTiles / 2; j0 += load_group(kNTiles / 2, kMTiles)) {
                constexpr int kGroup = load_group(kNTiles / 2, kMTiles);
                uint32_t b[kGroup][4];
#pragma unroll
                for (int j = 0; j < kGroup; ++j)
                    ldmatrix_x4(b[j], stage * kKVStageBytes + k_lane.at((j0 + j) * 2 * kMmaN, ks * kMmaK));
#pragma unroll
                for (int j = 0; j < kGroup; ++j) {
#pragma unroll
                    for (int mt = 0; mt < kMTiles; ++mt) {
                        mma_16816<T>(s[mt][2 * (j0 + j)], a[mt], b[j][0], b[j][1]);
                        mma_16816<T>(s[mt][2 * (j0 + j) + 1], a[mt], b[j][2], b[j][3]);
                    }
                }
            }
        }

        // Soft-capped, a raw score x becomes softcap_out · tanh(softcap_in · x):
        // scaled, softcap · tanh(scale · x / softcap) (FwdParams).
        if constexpr (kSoftcap) {
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) s[mt][nt][i] = p.softcap_out * tanh_approx(s[mt][nt][i] * p.softcap_in);
        }

        // Masked scores become -inf. Row i sees the columns of this tile
        // below min(Nk, i + diag + 1) - n0.
        if constexpr (kMasked) {
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    int col_end = p.seqlen_k - tile * kBlockN - col_in_tile;
                    if constexpr (kCausal) col_end = min(col_end, warp_row0 + mt * kMmaM + r * 8 + diag + 1
                                                                      - tile * kBlockN - col_in_tile);
                    // Band: the columns [col_begin, col_end) of the row's window.
                    const int row_key0 = warp_row0 + mt * kMmaM + r * 8 + diag - tile * kBlockN - col_in_tile;
                    if constexpr (kBand) col_end = min(col_end, row_key0 + p.window_right + 1);
                    const int col_begin = kBand ? row_key0 - p.window_left : INT_MIN;
#pragma unroll
                    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int col = nt * kMmaN + c;
                            if (col >= col_end || (kBand && col < col_begin)) s[mt][nt][2 * r + c] = -INFINITY;
                        }
                    }
                }
            }
        }

        // m_new = max(m, rowmax S) on the raw scores (scale > 0, see FwdParams);
        // with c = scale·log2e:  α = exp2(c·(m - m_new));  P = exp2(c·S - c·m_new);  l = α·l + rowsum P
        bool rescale = false;
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float part[kNTiles];  // reduced as a tree: short dependency chains
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt) part[nt] = fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]);
                float m_new = fmaxf(row_max[mt][r], tree_reduce(part, MaxOp{}));
                m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffff, m_new, 1));
                m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffff, m_new, 2));
                // A row with no visible key so far keeps m = -inf; subtract 0 so P = 0, not NaN.
                const float m_scaled = m_new == -INFINITY ? 0.f : m_new * p.scale_log2;
                alpha[mt][r] = exp2_approx(row_max[mt][r] * p.scale_log2 - m_scaled);
                rescale |= alpha[mt][r] != 1.f;
                row_max[mt][r] = m_new;
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        float& x = s[mt][nt][2 * r + c];
                        x = exp2_approx(fmaf(x, p.scale_log2, -m_scaled));
                    }
                    part[nt] = s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
                }
                row_sum[mt][r] = alpha[mt][r] * row_sum[mt][r] + tree_reduce(part, SumOp{});
            }
        }
        return __any_sync(0xffffffff, rescale);
    };

    // O = α·O (when some row raised its max);  O += P V, with P taken straight
    // from the S accumulators as A fragments.
    auto accumulate_pv = [&](int stage, bool rescale, const Scores& s, const RowScale& alpha) {
        if (rescale) {
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
                for (int dt = 0; dt < kDTiles; ++dt) {
                    o_acc[mt][dt][0] *= alpha[mt][0];
                    o_acc[mt][dt][1] *= alpha[mt][0];
                    o_acc[mt][dt][2] *= alpha[mt][1];
                    o_acc[mt][dt][3] *= alpha[mt][1];
                }
            }
        }
#pragma unroll
        for (int ks = 0; ks < kNSteps; ++ks) {
            uint32_t a[kMTiles][4];
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                a[mt][0] = pack2<T>(s[mt][2 * ks][0], s[mt][2 * ks][1]);
                a[mt][1] = pack2<T>(s[mt][2 * ks][2], s[mt][2 * ks][3]);
                a[mt][2] = pack2<T>(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
                a[mt][3] = pack2<T>(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
            }
            // V fragments of column tiles 2j, 2j + 1: matrices (n lo | hi) x (d 0-7 | 8-15), transposed
#pragma unroll
            for (int j0 = 0; j0 < kDTiles / 2; j0 += load_group(kDTiles / 2, kMTiles)) {
                constexpr int kGroup = load_group(kDTiles / 2, kMTiles);
                uint32_t b[kGroup][4];
#pragma unroll
                for (int j = 0; j < kGroup; ++j)
                    ldmatrix_x4_trans(b[j], stage * kKVStageBytes + v_lane.at(ks * kMmaK, (j0 + j) * 2 * kMmaN));
#pragma unroll
                for (int j = 0; j < kGroup; ++j) {
#pragma unroll
                    for (int mt = 0; mt < kMTiles; ++mt) {
                        mma_16816<T>(o_acc[mt][2 * (j0 + j)], a[mt], b[j][0], b[j][1]);
                        mma_16816<T>(o_acc[mt][2 * (j0 + j) + 1], a[mt], b[j][2], b[j][3]);
                    }
                }
            }
        }
    };

    // One key/value tile, with the copies and barriers of the K/V pipeline.
    auto step = [&](int it, auto masked) {
        constexpr bool kMasked = decltype(masked)::value;
        const int tile = tiles_end - 1 - it;
        const int stage = it % Tile::kStages;
        const bool more = it + 1 < tiles_count;
        if constexpr (Tile::kStages == 2) {
            if (more) {
                load_k(tile - 1, 1 - stage);
                load_v(tile - 1, 1 - stage);
            }
            cp_async_commit();
            cp_async_wait<1>();  // this tile's K and V (and Q) have landed
            __syncthreads();
        } else {
            cp_async_wait<0>();  // this tile's K (and Q) has landed
            __syncthreads();     // and every warp is done with the last V
            load_v(tile, 0);
            cp_async_commit();
        }
        if constexpr (Tile::kQInRegs) {
            if (it == 0) {
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
                    for (int ks = 0; ks < kDSteps; ++ks)
                        ldmatrix_x4(q_frag[mt][ks], q_lane.at(mt * kMmaM, ks * kMmaK));
            }
        }

        // On the causal diagonal, a warp whose rows all end before this tile
        // has nothing to add: it only keeps step with the barriers. (Band:
        // also one whose rows all start after it.)
        const bool warp_idle =
            (kCausal && kMasked && warp_m0 + Tile::kWarpRows - 1 + diag < tile * kBlockN)
            || (kBand && kMasked
                && (warp_m0 + Tile::kWarpRows - 1 + diag + p.window_right < tile * kBlockN
                    || warp_m0 + diag - p.window_left > tile * kBlockN + kBlockN - 1));
        Scores s = {};
        RowScale alpha;
        const bool rescale = !warp_idle && scores_to_probs(stage, tile, masked, s, alpha);

        if constexpr (Tile::kStages == 1) {
            cp_async_wait<0>();  // this tile's V has landed
            __syncthreads();     // and every warp is done with K
            if (more) load_k(tile - 1, 0);
            cp_async_commit();
        }
        if (!warp_idle) accumulate_pv(stage, rescale, s, alpha);
        if constexpr (Tile::kStages == 2) __syncthreads();  // every warp is done with this stage
    };

    int it = 0;
    if constexpr (kBand) {
        for (; it < band.masked_hi; ++it) step(it, std::true_type{});
        for (; it < band.masked_hi + band.unmasked; ++it) step(it, std::false_type{});
        for (; it < band.count; ++it) step(it, std::true_type{});
    } else {
        for (; it < n_tiles - n_masked_from; ++it) step(it, std::true_type{});
        for (; it < n_tiles; ++it) step(it, std::false_type{});
    }
    cp_async_wait<0>();

    // O = O / l;  LSE = scale·m + ln l, the natural log of Σ exp(scale·S).
    // Each warp stages its own rows of O in its own rows of q_smem (no other
    // warp reads them), then writes them out in coalesced 16-byte chunks.
    T* o_stage = q_smem + warp * Tile::kWarpRows * kRowStride;
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = row_sum[mt][r];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            const float inv_sum = l > 0.f ? 1.f / l : 0.f;
            const int row = warp_row0 + mt * kMmaM + r * 8;
            if (lane % 4 == 0 && row < p.seqlen_q) {
                const float lse = l > 0.f ? row_max[mt][r] * p.scale + logf(l) : -INFINITY;
                p.lse[(static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q + row] = lse;
            }
            const int stage_row = mt * kMmaM + lane / 4 + r * 8;
#pragma unroll
            for (int dt = 0; dt < kDTiles; ++dt) {
                *reinterpret_cast<uint32_t*>(o_stage + smem_offset<Tile>(stage_row, dt * kMmaN + col_in_tile)) =
                    pack2<T>(o_acc[mt][dt][2 * r] * inv_sum, o_acc[mt][dt][2 * r + 1] * inv_sum);
            }
        }
    }
    __syncwarp();
    T* o_g = static_cast<T*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride + warp_m0 * p.o_row_stride;
    store_tile_warp<Tile, Tile::kWarpRows, kHeadDim>(o_g, p.o_row_stride, o_stage, warp_m0, p.seqlen_q, p.head_dim);
}

template <typename Tag, typename Tile, bool kCausal, bool kBand = false, bool kSoftcap = false>
void launch_fwd_sm80_tile(const FwdParams& p, cudaStream_t stream) {
    auto kernel = fwd_kernel_sm80<typename DeviceType<Tag>::type, Tile, kCausal, kBand, kSoftcap>;
    set_smem(kernel, Tile::kSmemBytes, "forward, head dim " + std::to_string(Tile::kHeadDim));
    // Causal blocks differ in work (block m sees about (m + 1)·kBlockM keys).
    // Launched head by head, the last heads' longest blocks start late and run
    // alone at the end of the grid; with many row blocks per head, the longest
    // blocks go first instead. With few, head-by-head order measured faster:
    // the blocks that read the same K and V run together and find them in L2.
    // Longest first across all heads reads every head's K and V at once, from
    // DRAM when they exceed the L2 (d=64, 4k: 1.16 GB per call where 0.13 GB
    // is K and V), so it goes longest first within groups of heads whose K and
    // V fit in part of the L2, but never fewer than kLongestFirstMinHeads
    // (smaller groups measured slower). bench/PERFORMANCE.md, v9 and v12.
    const int m_blocks = ceil_div(p.seqlen_q, Tile::kBlockM);
    FwdParams params = p;
    params.causal_head_group = kCausal ? causal_head_group(p, m_blocks) : 0;
    const dim3 grid = params.causal_head_group > 0 ? dim3(p.batch * p.heads_q * m_blocks)
                                                   : dim3(m_blocks, p.heads_q, p.batch);
    kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(params);
    check_cuda(cudaGetLastError(), "flash_ext forward launch");
}

// kBand: the band kernel (windows; causal with a window; soft-capping), on the masked tiles' configuration.
template <typename Tag, int kHeadDim, bool kCausal, bool kBand = false, bool kSoftcap = false>
void launch_fwd_sm80(const FwdParams& p, cudaStream_t stream) {
    launch_fwd_sm80_tile<Tag, typename FwdConfigSm80<kHeadDim, kCausal || kBand>::Tile, kCausal, kBand, kSoftcap>(
        p, stream);
}

}  // namespace flash
