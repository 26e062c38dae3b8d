// Tile-size sweep for the sm_80 forward, without torch: every candidate tile
// of one head dim is compiled into this program and timed on the same inputs,
// in the same process, and its output is compared with the first candidate's.
// It picks tile sizes; the figures that count come from bench/bench.py.
//
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -Icsrc \
//        -DTUNE_HEAD_DIM=128 bench/tune_fwd_sm80.cu -o tune && ./tune
#include <algorithm>
#include <cstdio>
#include <vector>

#include "fwd_sm80.cuh"

#ifndef TUNE_HEAD_DIM
#define TUNE_HEAD_DIM 128
#endif

using namespace flash;
using T = __nv_bfloat16;
constexpr int kD = TUNE_HEAD_DIM;

__global__ void fill_random(T* x, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
        x[i] = __float2bfloat16((h & 0xffff) / 32768.f - 1.f);  // uniform in [-1, 1)
    }
}

struct Problem {
    int batch, heads, seqlen;
    bool causal;
};

FwdParams make_params(const Problem& pr, const T* q, const T* k, const T* v, T* o, float* lse) {
    FwdParams p{};
    p.q = q; p.k = k; p.v = v; p.o = o; p.lse = lse;
    const int64_t row = kD, head = int64_t(pr.seqlen) * kD, batch = head * pr.heads;
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = batch;
    p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = head;
    p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = row;
    p.batch = pr.batch; p.heads_q = p.heads_kv = pr.heads;
    p.seqlen_q = p.seqlen_k = pr.seqlen; p.head_dim = kD;
    p.scale = 1.f / sqrtf(float(kD));
    p.scale_log2 = p.scale * kLog2e;
    return p;
}

template <typename Tile>
void run(const FwdParams& p, bool causal) {
    if (causal) launch_fwd_sm80_tile<Bf16, Tile, true>(p, nullptr);
    else launch_fwd_sm80_tile<Bf16, Tile, false>(p, nullptr);
}

template <typename Tile>
void time_tile(const Problem& pr, std::vector<FwdParams>& sets, std::vector<float>& first_out, bool first) {
    for (auto& p : sets) run<Tile>(p, pr.causal);  // warm-up
    cudaEvent_t start, stop;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    std::vector<float> ms;
    for (int rep = 0; rep < 30; ++rep) {
        cudaEventRecord(start);
        run<Tile>(sets[rep % sets.size()], pr.causal);
        cudaEventRecord(stop);
        cudaEventSynchronize(stop);
        float t = 0;
        cudaEventElapsedTime(&t, start, stop);
        ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    const double t = ms[ms.size() / 2];
    const double t_min = ms.front(), t_max = ms.back();
    const double flops = 4.0 * pr.batch * pr.heads * double(pr.seqlen) * pr.seqlen * kD / (pr.causal ? 2 : 1);

    // Compare the first input set's output with the first candidate's.
    const size_t n = size_t(pr.batch) * pr.heads * pr.seqlen * kD;
    std::vector<T> host(n);
    run<Tile>(sets[0], pr.causal);
    cudaMemcpy(host.data(), sets[0].o, n * sizeof(T), cudaMemcpyDeviceToHost);
    float diff = 0;
    if (first) first_out.resize(n);
    for (size_t i = 0; i < n; ++i) {
        const float x = __bfloat162float(host[i]);
        if (first) first_out[i] = x;
        diff = std::max(diff, std::fabs(x - first_out[i]));
        if (x != x) diff = INFINITY;
    }
    printf("  BM=%3d BN=%3d mtiles=%d q_in_regs=%d stages=%d minblocks=%d swizzled=%d warps=%d smem=%6d B: %7.3f ms (min %.3f, max %.3f) %6.1f TFLOP/s  maxdiff %.2e\n",
           Tile::kBlockM, Tile::kBlockN, Tile::kMTiles, int(Tile::kQInRegs), Tile::kStages, Tile::kMinBlocks, int(Tile::kSwizzled), Tile::kWarps,
           Tile::kSmemBytes, t, t_min, t_max, flops / t * 1e-9, diff);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
}

template <typename... Tiles>
void sweep(const Problem& pr) {
    const size_t n = size_t(pr.batch) * pr.heads * pr.seqlen * kD;
    constexpr int kSets = 3;  // rotate inputs so the 50 MB L2 does not flatter
    std::vector<FwdParams> sets;
    for (int s = 0; s < kSets; ++s) {
        T *q, *k, *v, *o;
        float* lse;
        cudaMalloc(&q, n * sizeof(T)); cudaMalloc(&k, n * sizeof(T)); cudaMalloc(&v, n * sizeof(T));
        cudaMalloc(&o, n * sizeof(T)); cudaMalloc(&lse, n / kD * sizeof(float));
        fill_random<<<1024, 256>>>(q, n, 3 * s + 1);
        fill_random<<<1024, 256>>>(k, n, 3 * s + 2);
        fill_random<<<1024, 256>>>(v, n, 3 * s + 3);
        sets.push_back(make_params(pr, q, k, v, o, lse));
    }
    printf("d=%d N=%d b=%d h=%d causal=%d\n", kD, pr.seqlen, pr.batch, pr.heads, int(pr.causal));
    std::vector<float> first_out;
    bool first = true;
    ((time_tile<Tiles>(pr, sets, first_out, first), first = false), ...);
    for (auto& p : sets) {
        cudaFree(const_cast<void*>(p.q)); cudaFree(const_cast<void*>(p.k)); cudaFree(const_cast<void*>(p.v));
        cudaFree(p.o); cudaFree(p.lse);
    }
}

// Candidate tiles <head dim, BM, BN, m-tiles per warp, Q in registers, K/V stages, min blocks per SM,
// swizzled rows>; the first two are the current choices (full, causal), each timed on both kinds of
// problem. Edit the lists to try others.
#define CURRENT(D) typename FwdConfigSm80<D, false>::Tile, typename FwdConfigSm80<D, true>::Tile
#if TUNE_HEAD_DIM <= 64
#define CANDIDATES(D) CURRENT(D), FwdTileSm80<D, 128, 64, 2, false, 1, 3, true>, FwdTileSm80<D, 128, 64, 2, false, 2, 3>
#elif TUNE_HEAD_DIM <= 128
#define CANDIDATES(D) CURRENT(D), FwdTileSm80<D, 128, 64, 2, false, 2>, FwdTileSm80<D, 128, 32, 2, false, 1>
#else
#define CANDIDATES(D) CURRENT(D), FwdTileSm80<D, 128, 64, 1, false, 1>, FwdTileSm80<D, 64, 64, 1, false, 1, 1, false>
#endif

int main() {
    for (int seqlen : {512, 1024, 4096, 16384}) {
        for (bool causal : {false, true}) {
            const Problem pr{16384 / seqlen, 2048 / kD, seqlen, causal};
            sweep<CANDIDATES(kD)>(pr);
        }
    }
    const cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess) {
        printf("CUDA error: %s\n", cudaGetErrorString(err));
        return 1;
    }
    return 0;
}
