// What the sm_80 kernels share: element types, mma shapes, the shared-memory
// tile layouts (swizzled or padded rows), asynchronous tile copies, ldmatrix
// lane addresses and warp reductions.
#pragma once

#include <algorithm>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>

#include "params.h"
#include "ptx.cuh"

namespace flash {

// The most shared memory a block can opt into on sm_80 and sm_90 (A100, H100).
constexpr int kMaxSmemBytes = 227 * 1024;

template <typename Tag> struct DeviceType;
template <> struct DeviceType<Fp16> { using type = __half; };
template <> struct DeviceType<Bf16> { using type = __nv_bfloat16; };

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarpSize = 32;
constexpr int kMmaM = 16;    // rows of one mma.m16n8k16 tile
constexpr int kMmaN = 8;     // columns of its accumulator
constexpr int kMmaK = 16;    // its reduction depth
constexpr int kChunk = 8;    // 16-byte chunk = 8 half-precision elements
constexpr int kMmasPerLoadGroup = 8;  // ldmatrix.x4 loads are issued in groups feeding this many mmas

// The largest group of loads, each feeding 2·m_tiles mmas, that divides n.
__host__ __device__ constexpr int load_group(int n, int m_tiles) {
    int g = kMmasPerLoadGroup / (2 * m_tiles);
    g = n < g ? n : g;
    while (n % g != 0) --g;
    return g;
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Element offset of (row, col) in a shared tile. Both layouts keep the 8 rows
// that one ldmatrix phase reads at the same chunk in 8 different 16-byte bank
// groups (no bank conflicts):
// - swizzled: the 16-byte chunk c of row r is stored at chunk c ^ (r % 8) of
//   that row. The 8 chunks of a 128-byte global line stay in one 128-byte line
//   of shared memory, so a warp's cp.async fills whole lines.
// - padded: each row is one chunk longer (an odd number of chunks). Each row
//   is shifted by 16 bytes against the 128-byte lines, which splits a warp's
//   cp.async of a line in two: twice the L1 wavefronts and L2 requests
//   (bench/PERFORMANCE.md, v10). But its ldmatrix addresses are a base plus
//   constants, with no XOR, and need fewer registers (see FwdConfigSm80).
// Tile is any type with kRowStride (elements per row) and kSwizzled; the copies
// below also read kHeadDim (elements copied per row) and kThreads.
// The row bases that the kernel adds are multiples of 8 rows, so r % 8 is the
// same whether r counts from the tile or from that base.
template <typename Tile>
__device__ __forceinline__ int smem_offset(int row, int col) {
    static_assert(kChunk == 8, "8 elements per chunk, 8 chunks per 128-byte line");
    if constexpr (Tile::kSwizzled) return row * Tile::kRowStride + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
    return row * Tile::kRowStride + col;
}

struct MaxOp {
    __device__ float operator()(float x, float y) const { return fmaxf(x, y); }
};
struct SumOp {
    __device__ float operator()(float x, float y) const { return x + y; }
};

// Reduce x[0..N) pairwise, ceil(log2(N)) deep; x is overwritten. Each level folds the
// live elements above the largest power of two below their count onto those under it
// (x[i] = op(x[i], x[i + W])), recursing at compile time, so x stays in registers
// wherever it is inlined.
constexpr int power_of_two_below(int n) { return n <= 2 ? 1 : 2 * power_of_two_below((n + 1) / 2); }

template <int kLive = 0, int N, typename Op>
__device__ __forceinline__ float tree_reduce(float (&x)[N], Op op) {
    constexpr int kCount = kLive == 0 ? N : kLive;  // x[0..kCount) still to reduce
    if constexpr (kCount == 1) {
        return x[0];
    } else {
        constexpr int kWidth = power_of_two_below(kCount);
#pragma unroll
        for (int i = 0; i < kCount - kWidth; ++i) x[i] = op(x[i], x[i + kWidth]);
        return tree_reduce<kWidth>(x, op);
    }
}

// Copy a (kRows x kHeadDim) tile, rows [0, rows_valid) and columns
// [0, head_dim) of it real, into shared memory; the rest zero-filled.
// Where a pass of the block covers whole rows, each thread keeps one column
// and steps down the rows, so its addresses are one base plus a constant:
// the swizzle of row row0 + pass·R is row0's when R is a multiple of 8, and
// alternates between two when R = 4 ((row0 + 4) % 8 = row0 % 8 ^ 4).
template <typename Tile, int kRows, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride,
                                                int rows_valid, int head_dim) {
    constexpr int kChunksPerRow = Tile::kHeadDim / kChunk;
    if constexpr (Tile::kThreads % kChunksPerRow == 0) {
        constexpr int kRowsPerPass = Tile::kThreads / kChunksPerRow;
        constexpr int kPassBytes = kRowsPerPass * Tile::kRowStride * 2;
        constexpr bool kAlternates = Tile::kSwizzled && kRowsPerPass % 8 != 0;
        static_assert(!kAlternates || kRowsPerPass == 4, "rows per pass: 4 or a multiple of 8");
        const int row0 = threadIdx.x / kChunksPerRow;
        const int col = (threadIdx.x % kChunksPerRow) * kChunk;
        const T* src = gmem + row0 * row_stride + col;
        const uint32_t dst_even = smem_addr(smem + smem_offset<Tile>(row0, col));
        const uint32_t dst_odd = smem_addr(smem + smem_offset<Tile>(row0 + kRowsPerPass, col)) - kPassBytes;
#pragma unroll
        for (int pass = 0; pass < ceil_div(kRows, kRowsPerPass); ++pass) {
            const int row = row0 + pass * kRowsPerPass;
            if (kRows % kRowsPerPass != 0 && row >= kRows) break;
            const bool valid = row < rows_valid && col < head_dim;
            const uint32_t dst = (kAlternates && pass % 2 == 1 ? dst_odd : dst_even) + pass * kPassBytes;
            cp_async_16(dst, valid ? src : gmem, valid);
            src += kRowsPerPass * row_stride;
        }
    } else {
        constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
        for (int pass = 0; pass < ceil_div(kChunks, Tile::kThreads); ++pass) {
            const int i = pass * Tile::kThreads + threadIdx.x;
            if (kChunks % Tile::kThreads != 0 && i >= kChunks) break;
            const int row = i / kChunksPerRow;
            const int col = (i % kChunksPerRow) * kChunk;
            const bool valid = row < rows_valid && col < head_dim;
            cp_async_16(smem_addr(smem + smem_offset<Tile>(row, col)), valid ? gmem + row * row_stride + col : gmem,
                        valid);
        }
    }
}

// One lane's ldmatrix addresses into a shared tile, as 32-bit shared-memory
// addresses. In every ldmatrix.x4 of the kernel a lane reads row lane_row + r
// and chunk c / 8 + b of a tile, where r (a multiple of 8) and c (a multiple
// of 16 elements, so c / 8 is even) are constants of the unrolled loops,
// lane_row % 8 = lane % 8, and b is 0 or 1. The base is the address of
// (lane_row, chunk b). Swizzled, it holds x = b ^ lane % 8 in bits 4-6 (rows
// start on 128-byte boundaries) and chunk (c / 8 + b) of the row is stored at
// (c / 8) ^ x, so the address is base ^ ((c / 8) % 8 << 4) plus a constant:
// one XOR per load, with a compile-time operand.
template <typename Tile>
struct LdmatrixLane {
    static constexpr int kRowBytes = Tile::kRowStride * 2;
    static_assert(!Tile::kSwizzled || kRowBytes % 128 == 0, "swizzled rows are whole 128-byte lines");
    uint32_t base;

    template <typename T>
    __device__ LdmatrixLane(const T* tile, int lane_row, int b)
        : base(smem_addr(tile + smem_offset<Tile>(lane_row, b * kChunk))) {}

    __device__ __forceinline__ uint32_t at(int r, int c) const {
        const int chunk = c / kChunk;
        if constexpr (Tile::kSwizzled) return (base ^ ((chunk & 7) << 4)) + r * kRowBytes + ((chunk & ~7) << 4);
        return base + r * kRowBytes + chunk * 16;
    }
};

// The key tiles of kBlockN keys that query rows [m0, m0 + kBlockM) visit:
// [0, count), of which those from masked_from on need the mask: the ragged
// tail, and, when causal (query i sees key j <= i + diag, diag = Nk - Nq),
// every tile reaching past the last key that row m0 sees.
struct KeyTiles {
    int count, masked_from;
};

template <int kBlockM, int kBlockN, bool kCausal>
__host__ __device__ __forceinline__ KeyTiles key_tiles(int m0, int diag, int seqlen_k) {
    const int n_end = kCausal ? max(0, min(seqlen_k, m0 + kBlockM + diag)) : seqlen_k;
    const int count = ceil_div(n_end, kBlockN);
    int masked_from = count * kBlockN > seqlen_k ? count - 1 : count;
    if (kCausal) masked_from = min(masked_from, max(0, (m0 + diag + 1) / kBlockN));
    return {count, masked_from};
}

// The order of the forward's query blocks (FwdParams::causal_head_group).
// Causal blocks differ in work (block m sees about (m + 1)·kBlockM keys): with
// many row blocks per head they go longest first, within groups of at least
// kLongestFirstMinHeads (batch, head) pairs, more while their K and V fit in
// kLongestFirstGroupBytes of L2 (see the sm_80 launcher).
constexpr int kLongestFirstMinBlocks = 16;
constexpr int kLongestFirstMinHeads = 32;
constexpr double kLongestFirstGroupBytes = 32.0 * 1024 * 1024;

// The causal launch's group of (batch, head) pairs; 0: head by head.
inline int causal_head_group(const FwdParams& p, int m_blocks) {
    const int pairs = p.batch * p.heads_q;
    const double kv_bytes_per_head = 4.0 * p.seqlen_k * p.head_dim / (p.heads_q / p.heads_kv);
    const int fitting = kv_bytes_per_head * pairs <= kLongestFirstGroupBytes
                            ? pairs
                            : static_cast<int>(kLongestFirstGroupBytes / kv_bytes_per_head);
    return m_blocks >= kLongestFirstMinBlocks ? std::min(pairs, std::max(kLongestFirstMinHeads, fitting)) : 0;
}

struct FwdBlock {
    int m_block, head, batch;
};

// Query block number `index` of m_blocks per head in launch order: head by head
// (the last row block first when causal), or longest first within groups of
// p.causal_head_group heads.
template <bool kCausal>
__device__ __forceinline__ FwdBlock fwd_block(const FwdParams& p, int m_blocks, int index) {
    if (kCausal && p.causal_head_group > 0) {
        const int first = index / (p.causal_head_group * m_blocks) * p.causal_head_group;
        const int group = min(p.causal_head_group, p.batch * p.heads_q - first);  // the last may be smaller
        const int i = index - first * m_blocks;                                   // position in the group
        const int pair = first + i % group;
        return {m_blocks - 1 - i / group, pair % p.heads_q, pair / p.heads_q};
    }
    const int i = index % m_blocks, pair = index / m_blocks;
    return {kCausal ? m_blocks - 1 - i : i, pair % p.heads_q, pair / p.heads_q};
}

// The key tiles of kBlockN keys that query rows [m0, m0 + kBlockM) visit under a
// band (query i sees keys i + diag - left .. i + diag + right, and none past
// seqlen_k): tiles [end - count, end), visited from the last. The first
// masked_hi of them need the mask (the band's upper edge, the ragged tail),
// the next unmasked do not, the rest need it again (the lower edge).
struct BandTiles {
    int end, count, masked_hi, unmasked;
};

template <int kBlockM, int kBlockN>
__host__ __device__ inline BandTiles band_tiles(int m0, int diag, int seqlen_k, int left, int right) {
    const int lo = max(0, m0 + diag - left);                                // the first key some row sees
    const int hi = min(seqlen_k, m0 + kBlockM - 1 + diag + right + 1);       // one past the last
    if (hi <= lo) return {0, 0, 0, 0};
    const int first = lo / kBlockN, end = ceil_div(hi, kBlockN);
    // Unmasked from above: every key of the tile at or below the first row's last, m0 + diag + right.
    int upper = min(end, max(first, (m0 + diag + right + 1) / kBlockN));
    if (end * kBlockN > seqlen_k) upper = min(upper, end - 1);
    // Unmasked from below: every key of the tile at or above the last row's first.
    const int lower = min(end, max(first, ceil_div(max(0, m0 + kBlockM - 1 + diag - left), kBlockN)));
    return {end, end - first, end - upper, max(0, upper - lower)};
}

// Whether query i sees key j (the backward's masked steps): never past
// seqlen_k; causal, j <= i + diag; band, i + diag - left <= j <= i + diag + right.
template <bool kCausal, bool kBand, typename Params>
__device__ __forceinline__ bool key_seen(const Params& p, int diag, int i, int j) {
    return j < p.seqlen_k && !(kCausal && j > i + diag)
           && !(kBand && (j > i + diag + p.window_right || j < i + diag - p.window_left));
}

// The query blocks of kBlockM rows that see keys [n0, n0 + kBlockN) under a
// band (as above): [first, end), of which [unmasked_begin, unmasked_end) see
// every key of the block, rows [seqlen_q, ...) of the last block aside
// (their L2 is +inf, so P = 0 there). The rest need the mask.
struct BandQueryBlocks {
    int first, end, unmasked_begin, unmasked_end;
};

template <int kBlockM, int kBlockN>
__host__ __device__ inline BandQueryBlocks band_query_blocks(int n0, int diag, int seqlen_q, int left, int right) {
    const int lo = max(0, n0 - diag - right);                          // the first query that sees key n0
    const int hi = min(seqlen_q, n0 + kBlockN - 1 - diag + left + 1);  // one past the last that sees some key
    if (hi <= lo) return {0, 0, 0, 0};
    const int first = lo / kBlockM, end = ceil_div(hi, kBlockM);
    // Every key of the block: up to n0 + kBlockN - 1 from the block's first row on, and from n0 up to its last.
    const int begin = min(end, max(first, ceil_div(max(0, n0 + kBlockN - 1 - diag - right), kBlockM)));
    const int unmasked_end = max(begin, min(end, max(0, n0 - diag + left + 1) / kBlockM));
    return {first, end, begin, unmasked_end};
}

// A warp writes a kRows x kCols tile that it staged in shared memory (in rows
// no other warp touches) to global memory in coalesced 16-byte chunks: the
// rows r with row0 + r < row_end and the columns below col_end, row r at
// gmem + r·row_stride.
template <typename Tile, int kRows, int kCols, typename T>
__device__ __forceinline__ void store_tile_warp(T* gmem, int64_t row_stride, const T* stage, int row0, int row_end,
                                                int col_end) {
    constexpr int kChunksPerRow = kCols / kChunk;
#pragma unroll
    for (int i = threadIdx.x % kWarpSize; i < kRows * kChunksPerRow; i += kWarpSize) {
        const int row = i / kChunksPerRow;
        const int col = (i % kChunksPerRow) * kChunk;
        if (row0 + row < row_end && col < col_end) {
            *reinterpret_cast<uint4*>(gmem + row * row_stride + col) =
                *reinterpret_cast<const uint4*>(stage + smem_offset<Tile>(row, col));
        }
    }
}

inline void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// The dynamic shared memory a block may opt into on the current GPU (or
// smem_cap_for_testing, when set and lower).
inline int smem_optin() {
    int device = 0, bytes = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute");
    return smem_cap_for_testing > 0 ? std::min(bytes, smem_cap_for_testing) : bytes;
}

// Opt a kernel into `bytes` of dynamic shared memory per block, or say that
// this GPU has too little (std::invalid_argument: a ValueError in Python).
template <typename Kernel>
void set_smem(Kernel kernel, int bytes, const std::string& what) {
    const int smem_optin = flash::smem_optin();
    if (bytes > smem_optin) {
        throw std::invalid_argument("flash_ext " + what + ": needs " + std::to_string(bytes) +
                                    " bytes of shared memory per block; this GPU offers " +
                                    std::to_string(smem_optin));
    }
    // Once per kernel, device and size: the attribute stays set, and setting it costs a call
    // into the driver, which eager calls on short rows notice.
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    static std::mutex mutex;
    static std::set<std::tuple<const void*, int, int>> done;
    const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, bytes);
    std::lock_guard<std::mutex> lock(mutex);
    if (done.count(key)) return;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute");
    done.insert(key);
}

}  // namespace flash
