// FlashAttention forward for Hopper (sm_90a): warp-specialised, asynchronous.
//
// A thread block owns kBlockM query rows of one (batch, head) and has three
// warpgroups. The producer (warpgroup 0, few registers) loads Q once and the
// K and V tiles into a ring of kStages shared-memory stages with TMA, each
// copy completing on a "full" mbarrier; consumers free a stage's K and its V,
// each on its own "empty" mbarrier, once their products have read it. Each
// consumer warpgroup (64 query rows, many registers) computes S = Q Kᵀ and
// O += P V with wgmma and the online softmax in registers. With kOverlap, a
// consumer issues the next tile's S = Q Kᵀ and the last tile's O += P V
// together and runs the softmax while the second is in flight, and the two
// consumers take turns to issue (named barriers), so that one's softmax runs
// while the other's products keep the tensor cores busy. Key tiles are visited last first, the masked
// ones (causal diagonal, ragged tail) before the rest, as in the sm_80 kernel.
//
// Shared memory holds each tile as boxes of 64 columns (128 bytes a row, the
// 128-byte swizzle that TMA writes and wgmma's descriptors read); tensor maps
// of the 4-D (batch, heads, seqlen, head dim) tensors give TMA the strides
// and zero-fill rows past the sequence's end.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "ptx_sm90.cuh"
#include "tile_sm80.cuh"  // element types, reductions, key_tiles, launch helpers

namespace flash {

// One tile configuration of the Hopper forward.
template <int kHeadDim_, int kBlockN_, int kStages_>
struct FwdTileSm90 {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kConsumers = 2;                      // consumer warpgroups
    static constexpr int kWarpgroupRows = 64;                 // the M of one wgmma
    static constexpr int kBlockM = kConsumers * kWarpgroupRows;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kStages = kStages_;
    static constexpr int kThreads = (1 + kConsumers) * 128;   // producer + consumers
    static constexpr int kConsumerWarps = kConsumers * 4;
    static constexpr int kBoxCols = 64;                       // elements in one 128-byte swizzled row
    static constexpr int kBoxes = kHeadDim / kBoxCols;
    static constexpr int kQBytes = kBlockM * kHeadDim * 2;
    static constexpr int kKVBytes = kBlockN * kHeadDim * 2;  // one K or V tile
    static constexpr int kBarriers = 1 + 4 * kStages;         // Q full; K and V full and empty per stage
    // 1024 bytes of slack to align the tiles to the swizzle's 1024-byte period.
    static constexpr int kSmemBytes = 1024 + kQBytes + 2 * kStages * kKVBytes + 8 * kBarriers;
    // Register budgets per thread after setmaxnreg: 128·24 + 256·240 <= 64K registers.
    static constexpr int kProducerRegs = 24;
    static constexpr int kConsumerRegs = 240;

    static_assert(kHeadDim % kBoxCols == 0 && kHeadDim <= 256, "head dim: 64, 128, 192 or 256");
    static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "wgmma N");
    static_assert(kSmemBytes <= 227 * 1024, "shared memory");
    static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kConsumers <= 64 * 1024, "registers");
};

// The tile sizes of the Hopper forward per head dim: the one place they are chosen.
// S (kBlockN / 2 floats per thread) and O (kHeadDim / 2) live in registers, so the
// key tile shrinks as the head dim grows; two stages fill the shared memory at 256.
template <int kHeadDim>
struct FwdConfigSm90 {
    using Tile = FwdTileSm90<kHeadDim, (kHeadDim <= 128 ? 128 : 64), 2>;
};

// kOverlap: the softmax of tile j runs while O += P V of tile j - 1 is in flight.
template <typename T, typename Tile, bool kCausal, bool kOverlap>
__global__ void __launch_bounds__(Tile::kThreads, 1)
fwd_kernel_sm90(const __grid_constant__ FwdParams p, const __grid_constant__ CUtensorMap q_map,
                const __grid_constant__ CUtensorMap k_map, const __grid_constant__ CUtensorMap v_map,
                const __grid_constant__ CUtensorMap o_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace sm90;
    constexpr int kHeadDim = Tile::kHeadDim;
    constexpr int kBlockM = Tile::kBlockM;
    constexpr int kBlockN = Tile::kBlockN;
    constexpr int kStages = Tile::kStages;
    constexpr int kSwizzleRow = 128;             // bytes per swizzled row
    constexpr int kQSteps = kHeadDim / 16;       // k-steps of S = Q Kᵀ
    constexpr int kPSteps = kBlockN / 16;        // k-steps of O += P V

    extern __shared__ unsigned char smem_raw[];
    const uint32_t q_smem = (smem_addr(smem_raw) + 1023) & ~1023u;   // [kBoxes][kBlockM][64]
    const uint32_t k_smem = q_smem + Tile::kQBytes;                    // [kStages][kBoxes][kBlockN][64]
    const uint32_t v_smem = k_smem + kStages * Tile::kKVBytes;         // [kStages][kBoxes][kBlockN][64]
    const uint32_t barriers = v_smem + kStages * Tile::kKVBytes;
    const uint32_t q_full = barriers;
    auto k_full = [&](int stage) { return barriers + 8 * (1 + stage); };
    auto v_full = [&](int stage) { return barriers + 8 * (1 + kStages + stage); };
    auto k_empty = [&](int stage) { return barriers + 8 * (1 + 2 * kStages + stage); };
    auto v_empty = [&](int stage) { return barriers + 8 * (1 + 3 * kStages + stage); };

    const int m_block = kCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // causal: longest rows first
    const int head = blockIdx.y, batch = blockIdx.z;
    const int head_kv = head / (p.heads_q / p.heads_kv);
    const int m0 = m_block * kBlockM;
    // Query i sees keys j <= i + diag (causal, bottom-right aligned).
    const int diag = p.seqlen_k - p.seqlen_q;
    const KeyTiles keys = key_tiles<kBlockM, kBlockN, kCausal>(m0, diag, p.seqlen_k);
    const int n_tiles = keys.count, n_masked = keys.count - keys.masked_from;

    const int warpgroup = threadIdx.x / 128;
    if (threadIdx.x == 0) {
        mbarrier_init(q_full, 1);
        for (int stage = 0; stage < kStages; ++stage) {
            mbarrier_init(k_full(stage), 1);
            mbarrier_init(v_full(stage), 1);
            mbarrier_init(k_empty(stage), Tile::kConsumerWarps);
            mbarrier_init(v_empty(stage), Tile::kConsumerWarps);
        }
        fence_mbarrier_init();
    }
    __syncthreads();

    // ---- Producer: Q, then the key tiles from the last, each into the next free stage.
    if (warpgroup == 0) {
        setmaxnreg_dec<Tile::kProducerRegs>();
        if (threadIdx.x == 0) {
            mbarrier_arrive_expect_tx(q_full, Tile::kQBytes);
            for (int box = 0; box < Tile::kBoxes; ++box)
                tma_load_4d(q_smem + box * kBlockM * kSwizzleRow, &q_map, q_full, box * Tile::kBoxCols, m0, head,
                            batch);
            for (int it = 0; it < n_tiles; ++it) {
                const int tile = n_tiles - 1 - it, stage = it % kStages;
                // Round r of a stage waits for the consumers' release of round r - 1 (none before round 0).
                const int released = ((it / kStages) & 1) ^ 1;
                const uint32_t k_stage = k_smem + stage * Tile::kKVBytes, v_stage = v_smem + stage * Tile::kKVBytes;
                mbarrier_wait(k_empty(stage), released);
                mbarrier_arrive_expect_tx(k_full(stage), Tile::kKVBytes);
                for (int box = 0; box < Tile::kBoxes; ++box)
                    tma_load_4d(k_stage + box * kBlockN * kSwizzleRow, &k_map, k_full(stage), box * Tile::kBoxCols,
                                tile * kBlockN, head_kv, batch);
                mbarrier_wait(v_empty(stage), released);
                mbarrier_arrive_expect_tx(v_full(stage), Tile::kKVBytes);
                for (int box = 0; box < Tile::kBoxes; ++box)
                    tma_load_4d(v_stage + box * kBlockN * kSwizzleRow, &v_map, v_full(stage), box * Tile::kBoxCols,
                                tile * kBlockN, head_kv, batch);
            }
        }
        return;
    }

    // ---- Consumers: 64 query rows each; each warp 16 of them, each thread rows g and g + 8.
    setmaxnreg_inc<Tile::kConsumerRegs>();
    const int consumer = warpgroup - 1;
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int wg_row0 = consumer * Tile::kWarpgroupRows;       // the warpgroup's first row in the block
    const int row0 = m0 + wg_row0 + warp * 16 + lane / 4;       // this thread's rows: row0, row0 + 8
    const int col0 = 2 * (lane % 4);                            // and columns 8j + col0, + 1 of each 8

    // Descriptors of k-step s. Q, K: K-major, step s is 32 bytes into box s / 4. V: MN-major
    // (keys are the k index), 16 keys (rows) per step, boxes kBlockN rows apart.
    auto q_desc = [&](int s) {
        return smem_desc_sw128(q_smem + (s / 4) * kBlockM * kSwizzleRow + wg_row0 * kSwizzleRow + (s % 4) * 32, 16,
                               1024);
    };
    auto k_desc = [&](int stage, int s) {
        return smem_desc_sw128(k_smem + stage * Tile::kKVBytes + (s / 4) * kBlockN * kSwizzleRow + (s % 4) * 32, 16,
                               1024);
    };
    auto v_desc = [&](int stage, int s) {
        return smem_desc_sw128(v_smem + stage * Tile::kKVBytes + s * 16 * kSwizzleRow, kBlockN * kSwizzleRow, 1024);
    };

    // Accumulator element 4j + i of a thread: row row0 + 8·(i / 2), column 8j + col0 + i % 2.
    using Scores = float[kBlockN / 2];          // S, then P (float): 64 x kBlockN per warpgroup
    using Probs = uint32_t[kPSteps][4];         // P as wgmma A fragments, two elements per register
    float o_acc[kHeadDim / 2] = {};             // O: 64 x kHeadDim per warpgroup
    float row_max[2] = {-INFINITY, -INFINITY};  // m, of the raw scores Q Kᵀ
    float row_sum[2] = {0.f, 0.f};              // l, this thread's partial sums

    // S = Q Kᵀ, issued (one commit group).
    auto issue_qk = [&](Scores& s, int stage) {
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kQSteps; ++ks)
            Wgmma<kBlockN, T>::template ss<false>(s, q_desc(ks), k_desc(stage, ks), ks > 0);
        wgmma_commit();
    };
    // O += P V, issued (one commit group).
    auto issue_pv = [&](const Probs& pf, int stage) {
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kPSteps; ++ks) Wgmma<kHeadDim, T>::template rs<true>(o_acc, pf[ks], v_desc(stage, ks), 1);
        wgmma_commit();
    };
    // Every warp of both consumers arrives once its products are done with a stage's K or V.
    auto release = [&](uint32_t empty) {
        if (lane == 0) mbarrier_arrive(empty);
    };
    // Overlapped, the consumers take turns to issue their products, round robin: consumer
    // c waits on named barrier kTurn + c until consumer c - 1 has issued and arrived there.
    constexpr int kTurn = 1 + Tile::kConsumers;  // 1 .. kConsumers: the epilogue's per-warpgroup barriers
    const int next = (consumer + 1) % Tile::kConsumers;
    auto wait_turn = [&] { named_barrier_sync(kTurn + consumer, 256); };
    auto pass_turn = [&] { named_barrier_arrive(kTurn + next, 256); };

    // Masked scores become -inf; then the online softmax turns S into P in place:
    // m_new = max(m, rowmax S);  with c = scale·log2e:  α = exp2(c·(m - m_new)),
    // P = exp2(c·S - c·m_new),  l = α·l + rowsum P.
    auto softmax = [&](Scores& s, int tile, auto masked, float (&alpha)[2]) {
        if constexpr (decltype(masked)::value) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                // Row i sees the columns of this tile below min(Nk, i + diag + 1) - n0.
                int col_end = p.seqlen_k - tile * kBlockN - col0;
                if constexpr (kCausal) col_end = min(col_end, row0 + 8 * r + diag + 1 - tile * kBlockN - col0);
#pragma unroll
                for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
                    for (int c = 0; c < 2; ++c)
                        if (8 * j + c >= col_end) s[4 * j + 2 * r + c] = -INFINITY;
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float part[kBlockN / 8];  // reduced as a tree: short dependency chains
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) part[j] = fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]);
            float m_new = fmaxf(row_max[r], tree_reduce(part, MaxOp{}));
            m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffff, m_new, 1));
            m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffff, m_new, 2));
            // A row with no visible key so far keeps m = -inf; subtract 0 so P = 0, not NaN.
            const float m_scaled = m_new == -INFINITY ? 0.f : m_new * p.scale_log2;
            alpha[r] = exp2_approx(row_max[r] * p.scale_log2 - m_scaled);
            row_max[r] = m_new;
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    float& x = s[4 * j + 2 * r + c];
                    x = exp2_approx(fmaf(x, p.scale_log2, -m_scaled));
                }
                part[j] = s[4 * j + 2 * r] + s[4 * j + 2 * r + 1];
            }
            row_sum[r] = alpha[r] * row_sum[r] + tree_reduce(part, SumOp{});
        }
    };
    // O = α·O
    auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
        for (int i = 0; i < kHeadDim / 2; ++i) o_acc[i] *= alpha[(i % 4) / 2];
    };
    // P as A fragments: k-step ks takes S column tiles 2ks and 2ks + 1 (rows g, g + 8 of each).
    auto to_fragments = [&](const Scores& s, Probs& pf) {
#pragma unroll
        for (int ks = 0; ks < kPSteps; ++ks)
#pragma unroll
            for (int i = 0; i < 4; ++i) pf[ks][i] = pack2<T>(s[8 * ks + 2 * i], s[8 * ks + 2 * i + 1]);
    };

    mbarrier_wait(q_full, 0);
    auto tile_of = [&](int it) { return n_tiles - 1 - it; };
    auto phase_of = [&](int it) { return (it / kStages) & 1; };

    if constexpr (!kOverlap) {
        // One tile: S = Q Kᵀ; softmax; O = α·O; O += P V.
        auto step = [&](int it, auto masked) {
            const int stage = it % kStages;
            Scores s;
            mbarrier_wait(k_full(stage), phase_of(it));
            issue_qk(s, stage);
            wgmma_wait<0>();
            fence_operands(s);
            release(k_empty(stage));
            float alpha[2];
            softmax(s, tile_of(it), masked, alpha);
            rescale_o(alpha);
            Probs pf;
            to_fragments(s, pf);
            mbarrier_wait(v_full(stage), phase_of(it));
            issue_pv(pf, stage);
            wgmma_wait<0>();
            fence_operands(o_acc);
            release(v_empty(stage));
        };
        int it = 0;
        for (; it < n_masked; ++it) step(it, std::true_type{});
        for (; it < n_tiles; ++it) step(it, std::false_type{});
    } else if (n_tiles > 0) {
        // Tile 0's S and P first; then each step issues S of tile it and O += P V of tile it - 1,
        // and runs tile it's softmax while the latter is in flight. Consumer 0 issues first (the
        // last consumer passes it the first turn, and none after its last issue, so that every
        // wait has exactly one pass).
        const int issues = n_tiles + 1;
        int issued = 0;
        auto issue_done = [&] {
            if (consumer + 1 < Tile::kConsumers || ++issued < issues) pass_turn();
        };
        if (consumer + 1 == Tile::kConsumers) pass_turn();
        Probs pf;
        {
            Scores s;
            float alpha[2];
            mbarrier_wait(k_full(0), 0);
            wait_turn();
            issue_qk(s, 0);
            issue_done();
            wgmma_wait<0>();
            fence_operands(s);
            release(k_empty(0));
            if (n_masked > 0) softmax(s, tile_of(0), std::true_type{}, alpha);
            else softmax(s, tile_of(0), std::false_type{}, alpha);
            to_fragments(s, pf);  // O is still 0: α has nothing to scale
        }
        auto step = [&](int it, auto masked) {
            const int stage = it % kStages, prev = (it - 1) % kStages;
            Scores s;
            mbarrier_wait(k_full(stage), phase_of(it));
            mbarrier_wait(v_full(prev), phase_of(it - 1));
            wait_turn();
            issue_qk(s, stage);
            issue_pv(pf, prev);
            issue_done();
            wgmma_wait<1>();  // S has landed; O += P V still runs
            fence_operands(s);
            release(k_empty(stage));
            float alpha[2];
            softmax(s, tile_of(it), masked, alpha);
            wgmma_wait<0>();
            fence_operands(o_acc);
            release(v_empty(prev));
            rescale_o(alpha);
            to_fragments(s, pf);
        };
        int it = 1;
        for (; it < n_masked; ++it) step(it, std::true_type{});
        for (; it < n_tiles; ++it) step(it, std::false_type{});
        const int last = (n_tiles - 1) % kStages;
        mbarrier_wait(v_full(last), phase_of(n_tiles - 1));
        wait_turn();
        issue_pv(pf, last);
        issue_done();
        wgmma_wait<0>();
        fence_operands(o_acc);
        release(v_empty(last));
    }

    // O = O / l;  LSE = scale·m + ln l, the natural log of Σ exp(scale·S).
    // The warpgroup stages its O in its own rows of Q's boxes (its products are done
    // with them) in the swizzled layout, and one thread stores the boxes with TMA,
    // which leaves out the rows past seqlen_q.
    const int g = lane / 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_sum[r];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        const float inv_sum = l > 0.f ? 1.f / l : 0.f;
        const int row = row0 + 8 * r;
        if (lane % 4 == 0 && row < p.seqlen_q) {
            p.lse[(static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q + row] =
                l > 0.f ? row_max[r] * p.scale + logf(l) : -INFINITY;
        }
        const int smem_row = wg_row0 + warp * 16 + g + 8 * r;  // smem_row % 8 = g
#pragma unroll
        for (int j = 0; j < kHeadDim / 8; ++j) {
            const uint32_t addr = q_smem + (j / 8) * kBlockM * kSwizzleRow + smem_row * kSwizzleRow
                                  + (((j % 8) ^ g) * 16) + col0 * 2;
            st_shared_u32(addr, pack2<T>(o_acc[4 * j + 2 * r] * inv_sum, o_acc[4 * j + 2 * r + 1] * inv_sum));
        }
    }
    fence_proxy_async_shared();  // the stores above, before TMA reads them
    named_barrier_sync(1 + consumer, 128);
    if (threadIdx.x % 128 == 0) {
        for (int box = 0; box < Tile::kBoxes; ++box)
            tma_store_4d(&o_map, q_smem + box * kBlockM * kSwizzleRow + wg_row0 * kSwizzleRow, box * Tile::kBoxCols,
                         m0 + wg_row0, head, batch);
        bulk_commit();
        bulk_wait_read();  // the shared memory stays until TMA has read it
    }
#else
    __trap();  // compiled for a GPU without sm_90a's instructions: the launcher never picks it there
#endif
}

// The driver's cuTensorMapEncodeTiled, found once through the runtime (no link to libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found;
        check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found),
                   "cudaGetDriverEntryPointByVersion");
        if (found != cudaDriverEntryPointSuccess || fn == nullptr)
            throw std::runtime_error("flash_ext: the driver has no cuTensorMapEncodeTiled");
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }();
    return encode;
}

// A TMA map of a (batch, heads, seqlen, head_dim) tensor (strides in elements, unit in
// head_dim) with boxes of 64 columns x box_rows rows of one (batch, head), 128-byte
// swizzled. A dimension of size 1 gets a dense stride (its own may be anything).
template <typename T>
CUtensorMap make_tensor_map(const void* data, int batch, int heads, int seqlen, int head_dim, int64_t batch_stride,
                            int64_t head_stride, int64_t row_stride, int box_rows) {
    constexpr CUtensorMapDataType kType =
        std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(seqlen),
                                static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
    const int64_t row = seqlen > 1 ? row_stride : head_dim;
    const int64_t head = heads > 1 ? head_stride : row * seqlen;
    const int64_t bat = batch > 1 ? batch_stride : head * heads;
    const cuuint64_t strides[3] = {static_cast<cuuint64_t>(row) * sizeof(T), static_cast<cuuint64_t>(head) * sizeof(T),
                                   static_cast<cuuint64_t>(bat) * sizeof(T)};
    const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
    const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
    CUtensorMap map;
    const CUresult r = tensor_map_encoder()(&map, kType, 4, const_cast<void*>(data), dims, strides, box, elem_strides,
                                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
        throw std::runtime_error("flash_ext: cuTensorMapEncodeTiled failed (" + std::to_string(static_cast<int>(r)) +
                                 ")");
    return map;
}

template <typename Tag, int kHeadDim, bool kCausal>
void launch_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
    using T = typename DeviceType<Tag>::type;
    using Tile = typename FwdConfigSm90<kHeadDim>::Tile;
    const CUtensorMap q_map = make_tensor_map<T>(p.q, p.batch, p.heads_q, p.seqlen_q, kHeadDim, p.q_batch_stride,
                                                 p.q_head_stride, p.q_row_stride, Tile::kBlockM);
    const CUtensorMap k_map = make_tensor_map<T>(p.k, p.batch, p.heads_kv, p.seqlen_k, kHeadDim, p.k_batch_stride,
                                                 p.k_head_stride, p.k_row_stride, Tile::kBlockN);
    const CUtensorMap v_map = make_tensor_map<T>(p.v, p.batch, p.heads_kv, p.seqlen_k, kHeadDim, p.v_batch_stride,
                                                 p.v_head_stride, p.v_row_stride, Tile::kBlockN);
    const CUtensorMap o_map = make_tensor_map<T>(p.o, p.batch, p.heads_q, p.seqlen_q, kHeadDim, p.o_batch_stride,
                                                 p.o_head_stride, p.o_row_stride, Tile::kWarpgroupRows);
    auto kernel = sm90_overlap ? fwd_kernel_sm90<T, Tile, kCausal, true> : fwd_kernel_sm90<T, Tile, kCausal, false>;
    set_smem(kernel, Tile::kSmemBytes, "Hopper forward, head dim " + std::to_string(kHeadDim));
    const dim3 grid(ceil_div(p.seqlen_q, Tile::kBlockM), p.heads_q, p.batch);
    kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(p, q_map, k_map, v_map, o_map);
    check_cuda(cudaGetLastError(), "flash_ext Hopper forward launch");
}

}  // namespace flash
