// FlashAttention forward for Hopper (sm_90a): warp-specialised, asynchronous, persistent.
//
// One thread block per SM takes query blocks of kBlockM rows of one (batch,
// head) from a scheduler (an atomic counter over the blocks in launch order:
// head by head, or longest first within groups of heads when causal; see
// fwd_block; the last take of a launch sets it back to zero) until none are
// left. It has 1 + kConsumers warpgroups. The
// producer (warpgroup 0, few registers) takes the next block, loads its Q and
// its K and V tiles into a ring of kStages shared-memory stages with TMA, each
// copy completing on a "full" mbarrier; the consumers free a stage's K and its V,
// each on its own "empty" mbarrier, once their products have read it, and Q's
// buffer once their last S = Q Kᵀ of the block is done. So the next block's Q and
// first K and V load while the consumers finish the last block, whose O they
// store by TMA from a buffer of its own (at head dim 256, where none fits, from
// the block's last K and V stage, which they free after the store). Each consumer
// warpgroup (64 query rows, many registers) computes S = Q Kᵀ and O += P V with
// wgmma and the online softmax in registers. With kOverlap, a consumer issues
// the next tile's S = Q Kᵀ and the last tile's O += P V together and runs the
// softmax while the second is in flight, and the consumers take turns to issue
// (named barriers), so that one's softmax runs while the others' products keep
// the tensor cores busy. Key tiles are visited last first, the masked ones
// (causal diagonal, ragged tail) before the rest, as in the sm_80 kernel; with a
// window, only the tiles of its band, those at its lower edge masked last.
//
// Shared memory holds each tile as boxes of 64 columns (128 bytes a row, the
// 128-byte swizzle that TMA writes and wgmma's descriptors read); tensor maps
// of the 4-D (batch, heads, seqlen, head dim) tensors give TMA the strides
// and zero-fill rows past the sequence's end.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <climits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "ptx_sm90.cuh"
#include "tile_sm80.cuh"  // element types, reductions, key_tiles, fwd_block, launch helpers

// Diagnostics (bench/trace_fwd_sm90.cu): a build that defines these records when the
// first thread of each warpgroup reaches the points below; otherwise they are nothing.
#ifndef FWD_SM90_TRACE
#define FWD_SM90_TRACE_INIT
#define FWD_SM90_TRACE(event)
#endif

namespace flash {

// One tile configuration of the Hopper forward.
template <int kHeadDim_, int kBlockN_, int kStages_, int kConsumers_, int kProducerRegs_>
struct FwdTileSm90 {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kConsumers = kConsumers_;            // consumer warpgroups
    static constexpr int kWarpgroupRows = 64;                 // the M of one wgmma
    static constexpr int kBlockM = kConsumers * kWarpgroupRows;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kStages = kStages_;                  // K and V tiles in flight
    static constexpr int kThreads = (1 + kConsumers) * 128;   // producer + consumers
    static constexpr int kConsumerWarps = kConsumers * 4;
    static constexpr int kBoxCols = 64;                       // elements in one 128-byte swizzled row
    static constexpr int kBoxes = kHeadDim / kBoxCols;
    static constexpr int kQBytes = kBlockM * kHeadDim * 2;
    static constexpr int kKVBytes = kBlockN * kHeadDim * 2;  // one K or V tile
    // kSumByMma: the softmax's row sums l come out of O += P V, as 8 more columns of O whose
    // B is all ones (N = kHeadDim + 8), so the softmax adds up no P itself. Each V stage is
    // followed by a block of ones laid out as one more column box (kBlockN rows of 128
    // bytes: the wgmma reads its first 8 columns wherever the swizzle puts them).
    static constexpr bool kSumByMma = kHeadDim <= 128;
    static constexpr int kPVN = kHeadDim + (kSumByMma ? 8 : 0);  // the N of O += P V
    static constexpr int kOnesBytes = kSumByMma ? kBlockN * 128 : 0;
    static constexpr int kVStageBytes = kKVBytes + kOnesBytes;
    static constexpr int kBarriers = 2 + 4 * kStages;         // Q full and empty; K and V full and empty per stage
    // 1024 bytes of slack to align the tiles to the swizzle's 1024-byte period; Q and the
    // K and V stages; the barriers, then the scheduler's answer (an int).
    static constexpr int kBaseBytes = 1024 + kQBytes + kStages * (kKVBytes + kVStageBytes) + 8 * kBarriers + 8;
    // O is staged in shared memory (laid out as Q) and stored by TMA: in a buffer of its own
    // where one fits beside the tiles; otherwise (head dim 256), with two consumers, in the
    // block's last key tile's stage: consumer 0's rows in its K, consumer 1's in its V.
    static constexpr bool kStageO = kBaseBytes + kQBytes <= kMaxSmemBytes;
    static constexpr bool kStageOInKV = !kStageO && kConsumers == 2 && kWarpgroupRows * kHeadDim * 2 <= kKVBytes;
    static constexpr int kSmemBytes = kBaseBytes + (kStageO ? kQBytes : 0);
    static_assert(kStageO || kStageOInKV, "O's staging: a buffer of its own or the last K and V stage");
    // Register budgets per thread after setmaxnreg (multiples of 8, at most 240). The block
    // owns what it was launched with, kThreads x the launch-bound count (168 for 384 threads):
    // setmaxnreg.inc takes only registers the producer's .dec gave back, and waits forever
    // for more. The consumers get what the producer leaves.
    static constexpr int kLaunchRegs = 64 * 1024 / kThreads / 8 * 8;
    static constexpr int kProducerRegs = kProducerRegs_;
    static constexpr int kConsumerRegs =
        std::min(240, (kLaunchRegs * kThreads - 128 * kProducerRegs) / (128 * kConsumers) / 8 * 8);

    static_assert(kHeadDim % kBoxCols == 0 && kHeadDim <= 256, "head dim: 64, 128, 192 or 256");
    static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "wgmma N");
    static_assert(kBlockM <= 256, "TMA box rows");
    static_assert(kSmemBytes <= kMaxSmemBytes, "shared memory");
};

// The tile sizes of the Hopper forward per head dim: the one place they are chosen.
// S (kBlockN / 2 floats per thread) and O (kHeadDim / 2) live in registers, so the
// key tile shrinks as the head dim grows; two stages fill the shared memory at 256.
// At 256, kBlockN = 80 rather than 64: S = Q Kᵀ at N = 64 reads as many shared-memory
// bytes per cycle as the tensor cores take (bench/PERFORMANCE.md, H5); its registers
// need the consumers at 240, the producer at 24, where its one thread keeps a few values
// on the stack. Below 256 the producer keeps 56 (no spills; 24 measured slower there).
//
// AltTile, where it differs, is taken instead of Tile where it computes enough fewer
// scores (score_area, the masked ones included), weighed by what each costs per score:
// - at 256 a key tile of 64, for the lengths that 80 divides badly. At 512, 80 computes
//   560 key columns a query block (a last tile of 32 keys) where 64 computes 512; causal,
//   the diagonal cuts tiles of 80 at a different place in each block (1440 columns a head
//   at 512, 1280 with 64). 64's steady loop runs ~4% slower (2k and 4k without a mask), so
//   it is taken where it saves more than 1/19 of the scores: measured (bench/PERFORMANCE.md,
//   H9), it won where it saved 9-11% (512: +5-6%) and 5.6% (causal 1k, +2.9%), and lost
//   where it saved 5.1% (causal 1050, -2.4%).
// - at 64 three consumer warpgroups (query blocks of 192), ~7% faster per score at long
//   rows (H8, H9) but with more of each causal block masked and fewer, larger blocks: taken
//   where its scores x 14 < the two warpgroups' x 15. 512 threads leave a consumer 160
//   registers beside a producer at 32, and both spill a few values they reload once a
//   key tile (16-60 bytes; measured faster all the same). With a band window the spills
//   grow to 52-180 bytes, and that was not measured: band keeps two warpgroups.
template <int kHeadDim, bool kBand>
struct FwdConfigSm90 {
    using Tile = std::conditional_t<(kHeadDim <= 128), FwdTileSm90<kHeadDim, 128, 2, 2, 56>,
                                    FwdTileSm90<kHeadDim, 80, 2, 2, 24>>;
    using AltTile = std::conditional_t<
        kHeadDim == 64 && !kBand, FwdTileSm90<kHeadDim, 128, 2, 3, 32>,
        std::conditional_t<kHeadDim == 256, FwdTileSm90<kHeadDim, 64, 2, 2, 24>, Tile>>;
    // AltTile is taken when its score area x kAltCost < Tile's x kTileCost.
    static constexpr int kAltCost = kHeadDim == 64 ? 14 : 19, kTileCost = kHeadDim == 64 ? 15 : 18;
};

// The scores that the query blocks of one (batch, head) compute with Tile: its tiles x
// kBlockM x kBlockN, the masked ones included.
template <typename Tile, bool kCausal, bool kBand>
int64_t score_area(const FwdParams& p) {
    const int diag = p.seqlen_k - p.seqlen_q;
    int64_t tiles = 0;
    for (int m0 = 0; m0 < p.seqlen_q; m0 += Tile::kBlockM) {
        if constexpr (kBand)
            tiles += band_tiles<Tile::kBlockM, Tile::kBlockN>(m0, diag, p.seqlen_k, p.window_left, p.window_right).count;
        else
            tiles += key_tiles<Tile::kBlockM, Tile::kBlockN, kCausal>(m0, diag, p.seqlen_k).count;
    }
    return tiles * Tile::kBlockM * Tile::kBlockN;
}

// kBand: a sliding window (p.window_left, p.window_right; causal is a band kernel with
// kCausal false then), as in the sm_80 kernel. kSoftcap (band kernels only): the
// scores are soft-capped before the softmax. kOverlap: the softmax of tile j runs
// while O += P V of tile j - 1 is in flight.
template <typename T, typename Tile, bool kCausal, bool kBand, bool kSoftcap, bool kOverlap>
__global__ void __launch_bounds__(Tile::kThreads, 1)
fwd_kernel_sm90(const __grid_constant__ FwdParams p, const __grid_constant__ CUtensorMap q_map,
                const __grid_constant__ CUtensorMap k_map, const __grid_constant__ CUtensorMap v_map,
                const __grid_constant__ CUtensorMap o_map) {
    static_assert(!(kCausal && kBand), "a band kernel covers causal");
    static_assert(!kSoftcap || kBand, "soft-capping comes with the band kernel");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace sm90;
    constexpr int kHeadDim = Tile::kHeadDim;
    constexpr int kBlockM = Tile::kBlockM;
    constexpr int kBlockN = Tile::kBlockN;
    constexpr int kStages = Tile::kStages;
    constexpr int kConsumers = Tile::kConsumers;
    constexpr int kSwizzleRow = 128;             // bytes per swizzled row
    constexpr int kQSteps = kHeadDim / 16;       // k-steps of S = Q Kᵀ
    constexpr int kPSteps = kBlockN / 16;        // k-steps of O += P V

    extern __shared__ unsigned char smem_raw[];
    const uint32_t q_smem = (smem_addr(smem_raw) + 1023) & ~1023u;   // [kBoxes][kBlockM][64]
    const uint32_t k_smem = q_smem + Tile::kQBytes;                    // [kStages][kBoxes][kBlockN][64]
    const uint32_t v_smem = k_smem + kStages * Tile::kKVBytes;         // [kStages][kBoxes (+ ones)][kBlockN][64]
    const uint32_t o_smem = v_smem + kStages * Tile::kVStageBytes;     // [kBoxes][kBlockM][64] if kStageO
    const uint32_t barriers = o_smem + (Tile::kStageO ? Tile::kQBytes : 0);
    const uint32_t q_full = barriers, q_empty = barriers + 8;
    auto k_full = [&](int stage) { return barriers + 8 * (2 + stage); };
    auto v_full = [&](int stage) { return barriers + 8 * (2 + kStages + stage); };
    auto k_empty = [&](int stage) { return barriers + 8 * (2 + 2 * kStages + stage); };
    auto v_empty = [&](int stage) { return barriers + 8 * (2 + 3 * kStages + stage); };
    const uint32_t taken = barriers + 8 * Tile::kBarriers;  // the block the producer took last

    // Query block `index` (launch order) and the key tiles it visits: [end - n_tiles, end),
    // from the last; the first masked_hi of them masked (causal diagonal or the band's upper
    // edge, ragged tail), the next `unmasked` not, the rest masked (the band's lower edge).
    const int m_blocks = ceil_div(p.seqlen_q, kBlockM);
    const int n_blocks = m_blocks * p.heads_q * p.batch;
    const int diag = p.seqlen_k - p.seqlen_q;  // query i sees keys j <= i + diag (causal, bottom-right aligned)
    struct Work {
        int m0, head, batch, end, n_tiles, masked_hi, unmasked;
    };
    auto work_of = [&](int index) {
        const FwdBlock block = fwd_block<kCausal>(p, m_blocks, index);
        const int m0 = block.m_block * kBlockM;
        if constexpr (kBand) {
            const BandTiles band = band_tiles<kBlockM, kBlockN>(m0, diag, p.seqlen_k, p.window_left, p.window_right);
            return Work{m0, block.head, block.batch, band.end, band.count, band.masked_hi, band.unmasked};
        } else {
            const KeyTiles keys = key_tiles<kBlockM, kBlockN, kCausal>(m0, diag, p.seqlen_k);
            return Work{m0, block.head, block.batch, keys.count, keys.count, keys.count - keys.masked_from,
                        keys.masked_from};
        }
    };

    const int warpgroup = threadIdx.x / 128;
    FWD_SM90_TRACE_INIT;
    if (threadIdx.x == 0) {
        mbarrier_init(q_full, 1);
        mbarrier_init(q_empty, kConsumers * 128);  // every consumer thread: each has read `taken`
        for (int stage = 0; stage < kStages; ++stage) {
            mbarrier_init(k_full(stage), 1);
            mbarrier_init(v_full(stage), 1);
            mbarrier_init(k_empty(stage), Tile::kConsumerWarps);
            mbarrier_init(v_empty(stage), Tile::kConsumerWarps);
        }
        fence_mbarrier_init();
    }
    if constexpr (Tile::kSumByMma) {
        // The ones after each V stage, for the async proxy (wgmma) to read.
        const uint32_t one2 = std::is_same_v<T, __nv_bfloat16> ? 0x3F803F80u : 0x3C003C00u;  // two 1.0s
        for (int stage = 0; stage < kStages; ++stage)
            for (int i = threadIdx.x; i < Tile::kOnesBytes / 4; i += Tile::kThreads)
                st_shared_u32(v_smem + stage * Tile::kVStageBytes + Tile::kKVBytes + 4 * i, one2);
        fence_proxy_async_shared();
    }
    __syncthreads();

    // ---- Producer: per block, Q, then the key tiles from the last, each into the next free stage.
    if (warpgroup == 0) {
        setmaxnreg_dec<Tile::kProducerRegs>();
        if (threadIdx.x == 0) {
            // Hand the consumers block `index` (or the end) and load its Q, once they are
            // done with the last block's.
            auto start_block = [&](int round, int index, const Work& w) {
                if (round > 0) mbarrier_wait(q_empty, (round - 1) & 1);
                FWD_SM90_TRACE(12);
                st_shared_u32(taken, index);  // read by the consumers after q_full
                if (index >= n_blocks) return mbarrier_arrive(q_full);
                mbarrier_arrive_expect_tx(q_full, Tile::kQBytes);
                for (int box = 0; box < Tile::kBoxes; ++box)
                    tma_load_4d(q_smem + box * kBlockM * kSwizzleRow, &q_map, q_full, box * Tile::kBoxCols, w.m0,
                                w.head, w.batch);
            };
            int stage = 0, released = 1;  // the ring's next stage; the parity of its last release
            // Key tile `tile` of K or V into the ring's stage, once its last round is released.
            auto load_kv = [&](const CUtensorMap* map, uint32_t full, uint32_t empty, uint32_t dst, int tile,
                               int head_kv, int batch) {
                mbarrier_wait(empty, released);
                FWD_SM90_TRACE(map == &k_map ? 11 : 13);
                mbarrier_arrive_expect_tx(full, Tile::kKVBytes);
                for (int box = 0; box < Tile::kBoxes; ++box)
                    tma_load_4d(dst + box * kBlockN * kSwizzleRow, map, full, box * Tile::kBoxCols, tile * kBlockN,
                                head_kv, batch);
            };
            for (int round = 0;; ++round) {
                const int index = atomicAdd(p.block_counter, 1);
                FWD_SM90_TRACE(10);
                const bool done = index >= n_blocks;
                const Work w = work_of(done ? 0 : index);
                const int head_kv = w.head / (p.heads_q / p.heads_kv);
                const int n_tiles = done ? 0 : w.n_tiles;
                // The block's first K tile loads while the consumers finish the last block.
                for (int it = 0; it < n_tiles; ++it) {
                    const int tile = w.end - 1 - it;
                    load_kv(&k_map, k_full(stage), k_empty(stage), k_smem + stage * Tile::kKVBytes, tile, head_kv,
                            w.batch);
                    if (it == 0) start_block(round, index, w);
                    load_kv(&v_map, v_full(stage), v_empty(stage), v_smem + stage * Tile::kVStageBytes, tile, head_kv,
                            w.batch);
                    // Round r of a stage waits for the consumers' release of round r - 1 (none before round 0).
                    if (++stage == kStages) stage = 0, released ^= 1;
                }
                if (n_tiles == 0) start_block(round, index, w);  // no keys to load, or no block left
                if (done) {
                    // Each thread block takes one index past the end, so the last of those is the
                    // launch's last take: it leaves the counter at zero for the next launch.
                    if (index == n_blocks + static_cast<int>(gridDim.x) - 1) atomicExch(p.block_counter, 0);
                    break;
                }
            }
        }
        return;
    }

    // ---- Consumers: 64 query rows each; each warp 16 of them, each thread rows g and g + 8.
    setmaxnreg_inc<Tile::kConsumerRegs>();
    const int consumer = warpgroup - 1;
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int wg_row0 = consumer * Tile::kWarpgroupRows;       // the warpgroup's first row in the block
    const int col0 = 2 * (lane % 4);                            // this thread's columns: 8j + col0, + 1 of each 8
    int row0 = 0;                                               // and rows: row0, row0 + 8 (set per block)

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
        return smem_desc_sw128(v_smem + stage * Tile::kVStageBytes + s * 16 * kSwizzleRow, kBlockN * kSwizzleRow, 1024);
    };

    // Accumulator element 4j + i of a thread: row row0 + 8·(i / 2), column 8j + col0 + i % 2.
    using Scores = float[kBlockN / 2];          // S, then P (float): 64 x kBlockN per warpgroup
    using Probs = uint32_t[kPSteps][4];         // P as wgmma A fragments, two elements per register
    float o_acc[Tile::kPVN / 2];                // O: 64 x kHeadDim per warpgroup (then l, kSumByMma)
    float row_max[2];                           // m, of the raw scores Q Kᵀ
    float row_sum[2];                           // l, this thread's partial sums (unless kSumByMma)

    // S = Q Kᵀ, issued (one commit group).
    auto issue_qk = [&](Scores& s, int stage) {
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kQSteps; ++ks)
            Wgmma<kBlockN, T>::template ss<false>(s, q_desc(ks), k_desc(stage, ks), ks > 0);
        wgmma_commit();
    };
    // kCutTail: the O += P V of a ragged tail (tile 0, masked) skips the k-steps wholly past
    // the sequence's end, whose P is 0. Only at head dim 256 without a mask: ptxas makes each
    // k-step that may be skipped a branch around its wgmma, with a fence before it, and in
    // the kernels at head dims 64 and 128 and the causal ones that serialised every wgmma of
    // the kernel (bench/PERFORMANCE.md, H15).
    constexpr bool kCutTail = kHeadDim == 256 && !kCausal && !kBand;
    // O += P V, issued (one commit group); _cut: over the tile's first 16·steps keys only.
    auto issue_pv = [&](const Probs& pf, int stage) {
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kPSteps; ++ks)
            Wgmma<Tile::kPVN, T>::template rs<true>(o_acc, pf[ks], v_desc(stage, ks), 1);
        wgmma_commit();
    };
    auto issue_pv_cut = [&](const Probs& pf, int stage, int steps) {
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kPSteps; ++ks)
            Wgmma<Tile::kPVN, T>::template rs_if<true>(o_acc, pf[ks], v_desc(stage, ks), 1, ks < steps);
        wgmma_commit();
    };
    // Every warp of the consumers arrives once its products are done with a stage's K or V.
    auto release = [&](uint32_t empty) {
        if (lane == 0) mbarrier_arrive(empty);
    };
    // Overlapped, the consumers take turns to issue their products, round robin: consumer
    // c waits on named barrier kTurn + c until consumer c - 1 has issued and arrived there.
    // The last consumer passes consumer 0 the first turn; consumer 0 takes the last consumer's
    // final pass after the last block, so that every pass has its wait.
    constexpr int kTurn = 1;  // named barriers 1 .. kConsumers (0 is __syncthreads)
    const int next = (consumer + 1) % kConsumers;
    auto wait_turn = [&] { named_barrier_sync(kTurn + consumer, 256); };
    // Named barrier kTurn + kConsumers + c: the 128 threads of consumer c, around O's staging.
    auto sync_consumer = [&] { named_barrier_sync(kTurn + kConsumers + consumer, 128); };
    // Named barrier kStaging (O staged in the last K and V stage), of both consumers.
    constexpr int kStaging = kTurn + 2 * kConsumers;
    const bool o_issuer = threadIdx.x % 128 == 0;  // the consumer's thread that stores O by TMA
    auto pass_turn = [&] { named_barrier_arrive(kTurn + next, 256); };

    // Soft-capped, a raw score x becomes softcap_out · tanh(softcap_in · x) (FwdParams).
    // Masked scores become -inf; then the online softmax turns S into P in place:
    // m_new = max(m, rowmax S);  with c = scale·log2e:  α = exp2(c·(m - m_new)),
    // P = exp2(c·S - c·m_new),  l = α·l + rowsum P.
    auto softmax = [&](Scores& s, int tile, auto masked, float (&alpha)[2]) {
        if constexpr (kSoftcap) {
#pragma unroll
            for (int i = 0; i < kBlockN / 2; ++i) s[i] = p.softcap_out * tanh_approx(s[i] * p.softcap_in);
        }
        if constexpr (decltype(masked)::value) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                // Row i sees the columns of this tile below min(Nk, i + diag + 1) - n0; in a
                // band, those of [i + diag - left, i + diag + right] - n0.
                const int row_key0 = row0 + 8 * r + diag - tile * kBlockN - col0;
                int col_end = p.seqlen_k - tile * kBlockN - col0;
                if constexpr (kCausal) col_end = min(col_end, row_key0 + 1);
                if constexpr (kBand) col_end = min(col_end, row_key0 + p.window_right + 1);
                const int col_begin = kBand ? row_key0 - p.window_left : INT_MIN;
#pragma unroll
                for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
                    for (int c = 0; c < 2; ++c)
                        if (8 * j + c >= col_end || (kBand && 8 * j + c < col_begin)) s[4 * j + 2 * r + c] = -INFINITY;
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
                if constexpr (!Tile::kSumByMma) part[j] = s[4 * j + 2 * r] + s[4 * j + 2 * r + 1];
            }
            if constexpr (!Tile::kSumByMma) row_sum[r] = alpha[r] * row_sum[r] + tree_reduce(part, SumOp{});
        }
    };
    // O = α·O
    auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
        for (int i = 0; i < Tile::kPVN / 2; ++i) o_acc[i] *= alpha[(i % 4) / 2];
    };
    // P as A fragments: k-step ks takes S column tiles 2ks and 2ks + 1 (rows g, g + 8 of each).
    auto to_fragments = [&](const Scores& s, Probs& pf) {
#pragma unroll
        for (int ks = 0; ks < kPSteps; ++ks)
#pragma unroll
            for (int i = 0; i < 4; ++i) pf[ks][i] = pack2<T>(s[8 * ks + 2 * i], s[8 * ks + 2 * i + 1]);
    };

    // One block's rows: O and the softmax statistics over its key tiles, whose K and V
    // tiles are the ring's loads `ring` on.
    auto attend = [&](const Work& w, int ring) {
        if constexpr (Tile::kStageOInKV) ring = __shfl_sync(0xffffffff, ring, 0);  // see `index` below
        auto stage_of = [&](int it) { return (ring + it) % kStages; };
        auto phase_of = [&](int it) { return ((ring + it) / kStages) & 1; };
        auto tile_of = [&](int it) { return w.end - 1 - it; };
        // step(it, masked) for it = first, ..., n_tiles - 1, masked a compile-time bool.
        // Without a band the unmasked tiles run to n_tiles, the same count: bounded by the
        // sum, the plain kernels' steady loop came out scheduled otherwise and 2-3% slower
        // at d=256 (bench/PERFORMANCE.md, H6).
        auto visit = [&](int first, auto step) {
            const int unmasked_end = kBand ? w.masked_hi + w.unmasked : w.n_tiles;
            int it = first;
            for (; it < w.masked_hi; ++it) step(it, std::true_type{});
            for (; it < unmasked_end; ++it) step(it, std::false_type{});
            if constexpr (kBand) {
                for (; it < w.n_tiles; ++it) step(it, std::true_type{});
            }
        };
        // S = Q Kᵀ of tile it is done: its K stage is free, and after the last tile Q's buffer.
        // Where O is staged in the last tile's K and V stage, the store frees that stage.
        constexpr bool keep_last = Tile::kStageOInKV;
        auto release_k = [&](int it) {
            if (!(keep_last && it == w.n_tiles - 1)) release(k_empty(stage_of(it)));
            if (it == w.n_tiles - 1) mbarrier_arrive(q_empty);
        };
        if (w.n_tiles == 0) mbarrier_arrive(q_empty);  // no S = Q Kᵀ: Q's buffer is free now
        if constexpr (!kOverlap) {
            // One tile: S = Q Kᵀ; softmax; O = α·O; O += P V.
            auto step = [&](int it, auto masked) {
                const int stage = stage_of(it);
                Scores s;
                mbarrier_wait(k_full(stage), phase_of(it));
                issue_qk(s, stage);
                wgmma_wait<0>();
                fence_operands(s);
                release_k(it);
                float alpha[2];
                softmax(s, tile_of(it), masked, alpha);
                rescale_o(alpha);
                Probs pf;
                to_fragments(s, pf);
                mbarrier_wait(v_full(stage), phase_of(it));
                issue_pv(pf, stage);
                wgmma_wait<0>();
                fence_operands(o_acc);
                if (!(keep_last && it == w.n_tiles - 1)) release(v_empty(stage));
            };
            visit(0, step);
        } else if (w.n_tiles > 0) {
            // Tile 0's S and P first; then each step issues S of tile it and O += P V of tile
            // it - 1, and runs tile it's softmax while the latter is in flight.
            // Tile 0's k-steps of O += P V: with kCutTail, those of its keys before the sequence's
            // end (broadcast as `index` below, the same in every lane).
            int steps0 = kPSteps;
            if (kCutTail && w.masked_hi > 0)
                steps0 = __shfl_sync(0xffffffff, ceil_div(p.seqlen_k - tile_of(0) * kBlockN, 16), 0);
            Probs pf;
            {
                Scores s;
                float alpha[2];
                mbarrier_wait(k_full(stage_of(0)), phase_of(0));
                wait_turn();
                FWD_SM90_TRACE(2);
                issue_qk(s, stage_of(0));
                pass_turn();
                wgmma_wait<0>();
                fence_operands(s);
                FWD_SM90_TRACE(3);
                release_k(0);
                // Tile 0 is masked if it is at the top edge, or (in a band) at the lower edge with
                // none unmasked. Written so that the plain kernels test only the first: testing
                // both there changed the steady loop's schedule at d=64 (bench/PERFORMANCE.md, H6).
                if (w.masked_hi > 0 || (kBand && w.unmasked == 0)) softmax(s, tile_of(0), std::true_type{}, alpha);
                else softmax(s, tile_of(0), std::false_type{}, alpha);
                to_fragments(s, pf);  // O is still 0: α has nothing to scale
                FWD_SM90_TRACE(4);
            }
            // pv_cut (step 1 only): tile 0's O += P V over its first 16·steps0 keys.
            auto step = [&](int it, auto masked, auto pv_cut) {
                const int stage = stage_of(it), prev = stage_of(it - 1);
                Scores s;
                mbarrier_wait(k_full(stage), phase_of(it));
                mbarrier_wait(v_full(prev), phase_of(it - 1));
                wait_turn();
                FWD_SM90_TRACE(2);
                issue_qk(s, stage);
                if constexpr (decltype(pv_cut)::value) issue_pv_cut(pf, prev, steps0);
                else issue_pv(pf, prev);
                pass_turn();
                wgmma_wait<1>();  // S has landed; O += P V still runs
                fence_operands(s);
                FWD_SM90_TRACE(3);
                release_k(it);
                float alpha[2];
                softmax(s, tile_of(it), masked, alpha);
                FWD_SM90_TRACE(4);
                wgmma_wait<0>();
                fence_operands(o_acc);
                FWD_SM90_TRACE(5);
                release(v_empty(prev));
                rescale_o(alpha);
                to_fragments(s, pf);
            };
            // With kCutTail, step 1, which issues tile 0's O += P V, runs before the loop (tile 1
            // is unmasked: without a mask or a band only a ragged tail is masked).
            const auto uncut = [&](int it, auto masked) { step(it, masked, std::false_type{}); };
            if constexpr (kCutTail) {
                if (w.n_tiles > 1) step(1, std::false_type{}, std::true_type{});
                visit(2, uncut);
            } else {
                visit(1, uncut);
            }
            const int last = stage_of(w.n_tiles - 1);
            mbarrier_wait(v_full(last), phase_of(w.n_tiles - 1));
            wait_turn();
            FWD_SM90_TRACE(6);
            if (kCutTail && w.n_tiles == 1) issue_pv_cut(pf, last, steps0);
            else issue_pv(pf, last);
            pass_turn();
            wgmma_wait<0>();
            fence_operands(o_acc);
            FWD_SM90_TRACE(5);
            if (!keep_last) release(v_empty(last));
        }
    };

    // l of row row0 + 8r: the ones columns of O (kSumByMma), or the quad's partial sums added.
    auto row_total = [&](int r) {
        if constexpr (Tile::kSumByMma) {
            return o_acc[4 * (kHeadDim / 8) + 2 * r];
        } else {
            float l = row_sum[r];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            return l + __shfl_xor_sync(0xffffffff, l, 2);
        }
    };
    // O = O / l;  LSE = scale·m + ln l, the natural log of Σ exp(scale·S). O goes through
    // shared memory: each thread writes its words into column box b at o_box(b), laid out
    // as Q's (the 128-byte swizzle: 16-byte chunk c of row r at c ^ (r % 8)), and one thread
    // per consumer stores the consumer's 64 rows by TMA (rows past the end are not written).
    auto store_staged = [&](const Work& w, auto o_box) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float l = row_total(r);
            const float inv_sum = l > 0.f ? 1.f / l : 0.f;
            const int row = row0 + 8 * r;
            if (row < p.seqlen_q && lane % 4 == 0) {
                p.lse[(static_cast<int64_t>(w.batch) * p.heads_q + w.head) * p.seqlen_q + row] =
                    l > 0.f ? row_max[r] * p.scale + logf(l) : -INFINITY;
            }
            const int block_row = wg_row0 + warp * 16 + lane / 4 + 8 * r;
#pragma unroll
            for (int j = 0; j < kHeadDim / 8; ++j) {
                const uint32_t chunk = (j % 8) ^ (block_row % 8);
                st_shared_u32(o_box(j / 8) + block_row * kSwizzleRow + chunk * 16 + (lane % 4) * 4,
                              pack2<T>(o_acc[4 * j + 2 * r] * inv_sum, o_acc[4 * j + 2 * r + 1] * inv_sum));
            }
        }
        fence_proxy_async_shared();
        sync_consumer();
        if (o_issuer) {
            for (int box = 0; box < Tile::kBoxes; ++box)
                tma_store_4d(&o_map, o_box(box) + wg_row0 * kSwizzleRow, box * Tile::kBoxCols, w.m0 + wg_row0,
                             w.head, w.batch);
            bulk_commit_group();
        }
    };
    // A block with no key tiles (causal, more queries than keys): O = 0 and LSE = -inf,
    // written directly (16 bytes a store; the binding's O is 16-byte aligned: empty_like(q),
    // so q's strides, which TMA took, or contiguous).
    auto store_empty = [&](const Work& w) {
        T* o = static_cast<T*>(p.o) + w.batch * p.o_batch_stride + w.head * p.o_head_stride;
        for (int r = 0; r < 2; ++r) {
            const int row = row0 + 8 * r;
            if (row >= p.seqlen_q) continue;
            if (lane % 4 == 0) p.lse[(static_cast<int64_t>(w.batch) * p.heads_q + w.head) * p.seqlen_q + row] = -INFINITY;
            for (int chunk = lane % 4; chunk < kHeadDim / 8; chunk += 4)
                *reinterpret_cast<uint4*>(o + row * p.o_row_stride + 8 * chunk) = make_uint4(0, 0, 0, 0);
        }
    };
    // In O's own buffer (kStageO), the consumer goes on without waiting for the store; before
    // the buffer is written again, the issuing thread waits until the last block's store has
    // read it. In the last K and V stage (kStageOInKV), each consumer its half once the other
    // consumer's products are done with it: overlapped, consumer 0 writes K's once every
    // consumer's last S = Q Kᵀ is done (Q's empty barrier completes its phase) and tells
    // consumer 1 its own products are done (kStaging), without waiting; the turns keep it from
    // arriving there again before consumer 1 has waited (its next block's last O += P V
    // waits for consumer 1's turn in that block). Without the overlap both wait for both.
    // The issuing thread frees its half for the producer (every warp's arrival) once the
    // store has read it. A block with no key tiles has no such stage.
    auto store = [&](const Work& w, int ring, int round) {
        if constexpr (Tile::kStageO) {
            if (o_issuer) bulk_wait_group_read<0>();
            sync_consumer();
            store_staged(w, [&](int box) { return o_smem + box * kBlockM * kSwizzleRow; });
        } else {
            if (w.n_tiles == 0) return store_empty(w);
            const int last = (ring + w.n_tiles - 1) % kStages;
            if (kOverlap && consumer == 0) {
                named_barrier_arrive(kStaging, 256);
                mbarrier_wait(q_empty, round & 1);
            } else {
                named_barrier_sync(kStaging, 256);
            }
            // The consumer's 64 rows of box b at half + b x 64 rows; o_box is where row 0 of the
            // block would be, so that row wg_row0 + i lands at row i.
            const uint32_t half = consumer == 0 ? k_smem + last * Tile::kKVBytes : v_smem + last * Tile::kVStageBytes;
            store_staged(w, [&](int box) { return half + (box * Tile::kWarpgroupRows - wg_row0) * kSwizzleRow; });
            if (o_issuer) {
                bulk_wait_group_read<0>();
                mbarrier_arrive(consumer == 0 ? k_empty(last) : v_empty(last), Tile::kConsumerWarps);
            }
        }
    };

    if (kOverlap && consumer + 1 == kConsumers) pass_turn();
    int ring = 0;  // K and V tiles consumed so far
    for (int round = 0;; ++round) {
        mbarrier_wait(q_full, round & 1);
        int index = static_cast<int>(ld_shared_u32(taken));
        // The same in every lane: said so (a broadcast, and of `ring` in attend), ptxas keeps the
        // steady loop's stage and phase arithmetic in uniform registers at head dim 256, where
        // the code after the loop otherwise tips it into ordinary ones (R2UR before every
        // wgmma) or spills a value in the loop (bench/sass_loops.py, tests/test_sm90.py).
        if constexpr (Tile::kStageOInKV) index = __shfl_sync(0xffffffff, index, 0);
        if (index >= n_blocks) break;
        FWD_SM90_TRACE(1);
        const Work w = work_of(index);
        row0 = w.m0 + wg_row0 + warp * 16 + lane / 4;
#pragma unroll
        for (int i = 0; i < Tile::kPVN / 2; ++i) o_acc[i] = 0.f;
        for (int r = 0; r < 2; ++r) row_max[r] = -INFINITY, row_sum[r] = 0.f;
        attend(w, ring);
        store(w, ring, round);
        FWD_SM90_TRACE(7);
        ring += w.n_tiles;
    }
    if (kOverlap && consumer == 0) wait_turn();
    if (Tile::kStageO && o_issuer) bulk_wait_group_read<0>();  // the last O read before the block exits
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

template <typename Tag, typename Tile, bool kCausal, bool kBand, bool kSoftcap>
void launch_fwd_sm90_tile(const FwdParams& p, cudaStream_t stream) {
    using T = typename DeviceType<Tag>::type;
    constexpr int kHeadDim = Tile::kHeadDim;
    const CUtensorMap q_map = make_tensor_map<T>(p.q, p.batch, p.heads_q, p.seqlen_q, kHeadDim, p.q_batch_stride,
                                                 p.q_head_stride, p.q_row_stride, Tile::kBlockM);
    const CUtensorMap k_map = make_tensor_map<T>(p.k, p.batch, p.heads_kv, p.seqlen_k, kHeadDim, p.k_batch_stride,
                                                 p.k_head_stride, p.k_row_stride, Tile::kBlockN);
    const CUtensorMap v_map = make_tensor_map<T>(p.v, p.batch, p.heads_kv, p.seqlen_k, kHeadDim, p.v_batch_stride,
                                                 p.v_head_stride, p.v_row_stride, Tile::kBlockN);
    const CUtensorMap o_map = make_tensor_map<T>(p.o, p.batch, p.heads_q, p.seqlen_q, kHeadDim, p.o_batch_stride,
                                                 p.o_head_stride, p.o_row_stride, Tile::kWarpgroupRows);
    auto kernel = sm90_overlap ? fwd_kernel_sm90<T, Tile, kCausal, kBand, kSoftcap, true>
                               : fwd_kernel_sm90<T, Tile, kCausal, kBand, kSoftcap, false>;
    set_smem(kernel, Tile::kSmemBytes, "Hopper forward, head dim " + std::to_string(kHeadDim));
    // Persistent: one block per SM (or per query block, if fewer) takes query blocks in
    // the sm_80 launch order (fwd_block) from p.block_counter.
    const int m_blocks = ceil_div(p.seqlen_q, Tile::kBlockM);
    FwdParams params = p;
    params.causal_head_group = kCausal ? causal_head_group(p, m_blocks) : 0;
    int device = 0, sms = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    const int grid = std::min(sms, m_blocks * p.heads_q * p.batch);
    kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(params, q_map, k_map, v_map, o_map);
    check_cuda(cudaGetLastError(), "flash_ext Hopper forward launch");
}

template <typename Tag, int kHeadDim, bool kCausal, bool kBand, bool kSoftcap>
void launch_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
    using Config = FwdConfigSm90<kHeadDim, kBand>;
    using Tile = typename Config::Tile;
    using AltTile = typename Config::AltTile;
    if constexpr (!std::is_same_v<Tile, AltTile>) {
        if (score_area<AltTile, kCausal, kBand>(p) * Config::kAltCost <
            score_area<Tile, kCausal, kBand>(p) * Config::kTileCost)
            return launch_fwd_sm90_tile<Tag, AltTile, kCausal, kBand, kSoftcap>(p, stream);
    }
    launch_fwd_sm90_tile<Tag, Tile, kCausal, kBand, kSoftcap>(p, stream);
}

}  // namespace flash
