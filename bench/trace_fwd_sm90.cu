// A timeline of the Hopper forward: the first thread of each warpgroup records the SM
// clock at the kernel's trace points (FWD_SM90_TRACE in csrc/fwd_sm90.cuh), and
// bench/trace_fwd_sm90.py reads the file and says where a block's time goes.
//
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -Icsrc -o trace bench/trace_fwd_sm90.cu
//   ./trace HEAD_DIM SEQLEN BATCH HEADS CAUSAL OUT.bin
//
// bf16, no window, the overlapped kernel (the library's default; the trace points are on
// its path only); -DNO_TRACE times the kernel as the library builds it, and writes to
// OUT.bin, instead of a trace, O and the LSE of the first (batch, head): N x D bf16, then
// N floats. It prints the time and a hash of all of O and the LSE: two builds that
// compute the same numbers print the same hash (an A/B of kernel changes checks them bit
// for bit, or compares the samples where they differ).
// Events: consumers 1 block start (its Q has landed), 2 turn taken (S or S + P V issued
// next), 3 S landed, 4 softmax done, 5 P V done, 6 turn taken for the last P V, 7 O
// stored (at head dim <= 128: its TMA store issued); producer 10 block taken, 11 K load
// issued, 12 Q load issued, 13 V load issued.
#include <cstdio>
#include <cstdlib>
#include <vector>

constexpr int kTraceCap = 1 << 14;  // events per warpgroup
__device__ unsigned long long* g_trace;
#ifdef NO_TRACE  // -DNO_TRACE: the kernel as built for flash_ext, timed only
constexpr bool kTraced = false;
#else
constexpr bool kTraced = true;
#define FWD_SM90_TRACE_INIT int trace_n_ = 0
#define FWD_SM90_TRACE(event)                                                                                \
    do {                                                                                                     \
        if (threadIdx.x % 128 == 0 && trace_n_ < kTraceCap)                                                  \
            g_trace[(blockIdx.x * 4 + threadIdx.x / 128) * kTraceCap + trace_n_++] =                         \
                (static_cast<unsigned long long>(clock64()) << 8) | (event);                                 \
    } while (0)
#endif

#include "fwd_sm90.cuh"

using namespace flash;

// Q, K, V (and O, before the kernel writes it) uniform in [-1, 1): element i of tensor
// `seed` from an integer hash of both, made on the GPU (a host loop over the 100M elements
// of a bench shape took longer than the timed launches).
__global__ void fill_uniform(__nv_bfloat16* x, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        uint32_t h = static_cast<uint32_t>(i) ^ (static_cast<uint32_t>(i >> 32) * 0x9E3779B9u) ^ (seed * 0x85EBCA6Bu);
        h ^= h >> 16, h *= 0x7FEB352Du, h ^= h >> 15, h *= 0x846CA68Bu, h ^= h >> 16;  // a 32-bit mixer
        x[i] = __float2bfloat16(static_cast<float>(h >> 8) / (1 << 24) * 2.f - 1.f);
    }
}

template <int kHeadDim, bool kCausal>
float run(FwdParams& p, int* counter, int reps) {
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    cudaEventRecord(a);
    for (int i = 0; i < reps; ++i) {
        cudaMemsetAsync(counter, 0, sizeof(int));
        launch_fwd_sm90<Bf16, kHeadDim, kCausal, false, false>(p, nullptr);
    }
    cudaEventRecord(b);
    check_cuda(cudaEventSynchronize(b), "run");
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    return ms / reps;
}

int main(int argc, char** argv) {
    if (argc != 7) {
        std::fprintf(stderr, "usage: trace HEAD_DIM SEQLEN BATCH HEADS CAUSAL OUT.bin\n");
        return 2;
    }
    const int d = std::atoi(argv[1]), n = std::atoi(argv[2]), batch = std::atoi(argv[3]), heads = std::atoi(argv[4]);
    const bool causal = std::atoi(argv[5]) != 0;
    const size_t elems = static_cast<size_t>(batch) * heads * n * d;
    void *q, *k, *v, *o;
    float* lse;
    int* counter;
    uint32_t seed = 0;
    for (void** t : {&q, &k, &v, &o}) {
        check_cuda(cudaMalloc(t, elems * 2), "cudaMalloc");
        fill_uniform<<<1024, 256>>>(static_cast<__nv_bfloat16*>(*t), elems, ++seed);  // O too: every element is written
    }
    check_cuda(cudaGetLastError(), "fill_uniform");
    check_cuda(cudaMalloc(&lse, static_cast<size_t>(batch) * heads * n * 4), "cudaMalloc");
    check_cuda(cudaMalloc(&counter, sizeof(int)), "cudaMalloc");
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    const size_t trace_words = kTraced ? static_cast<size_t>(sms) * 4 * kTraceCap : 0;
    unsigned long long* trace = nullptr;
    if (kTraced) {
        check_cuda(cudaMalloc(&trace, trace_words * 8), "cudaMalloc");
        check_cuda(cudaMemset(trace, 0, trace_words * 8), "cudaMemset");
        check_cuda(cudaMemcpyToSymbol(g_trace, &trace, sizeof(trace)), "cudaMemcpyToSymbol");
    }

    FwdParams p{};
    p.q = q, p.k = k, p.v = v, p.o = o, p.lse = lse;
    const int64_t row = d, head = static_cast<int64_t>(n) * d, bat = head * heads;
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = bat;
    p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = head;
    p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = row;
    p.batch = batch, p.heads_q = p.heads_kv = heads, p.seqlen_q = p.seqlen_k = n, p.head_dim = d;
    p.scale = 1.f / std::sqrt(static_cast<float>(d));
    p.scale_log2 = p.scale * 1.4426950408889634f;
    p.block_counter = counter;
    p.window_left = p.window_right = kUnboundedWindow;

    auto go = [&](int reps) {
        if (d == 64) return causal ? run<64, true>(p, counter, reps) : run<64, false>(p, counter, reps);
        if (d == 128) return causal ? run<128, true>(p, counter, reps) : run<128, false>(p, counter, reps);
        return causal ? run<256, true>(p, counter, reps) : run<256, false>(p, counter, reps);
    };
    go(5);
    float ms = go(20);
    for (int i = 0; i < 4; ++i) ms = std::min(ms, go(20));
    const double flop = 4.0 * batch * heads * n * static_cast<double>(n) * d / (causal ? 2 : 1);
    std::printf("d=%d N=%d batch=%d heads=%d causal=%d: %.4f ms, %.0f TFLOP/s (%s)\n", d, n, batch, heads,
                causal, ms, flop / ms / 1e9, kTraced ? "traced" : "not traced");
    // A hash of O and the LSE: builds that should compute the same numbers print the same.
    std::vector<unsigned char> bytes(elems * 2 + static_cast<size_t>(batch) * heads * n * 4);
    check_cuda(cudaMemcpy(bytes.data(), o, elems * 2, cudaMemcpyDeviceToHost), "cudaMemcpy");
    check_cuda(cudaMemcpy(bytes.data() + elems * 2, lse, bytes.size() - elems * 2, cudaMemcpyDeviceToHost),
               "cudaMemcpy");
    unsigned long long hash = 14695981039346656037ull;  // FNV-1a
    for (unsigned char b : bytes) hash = (hash ^ b) * 1099511628211ull;
    std::printf("output hash %016llx\n", hash);
    FILE* f = std::fopen(argv[6], "wb");
    if (f == nullptr) {
        std::fprintf(stderr, "cannot write %s\n", argv[6]);
        return 1;
    }
    if (!kTraced) {
        std::fwrite(bytes.data(), 2, static_cast<size_t>(n) * d, f);          // O of batch 0, head 0
        std::fwrite(bytes.data() + elems * 2, 4, static_cast<size_t>(n), f);  // and its LSE
        std::fclose(f);
        return 0;
    }
    check_cuda(cudaMemset(trace, 0, trace_words * 8), "cudaMemset");
    go(1);  // the traced launch
    std::vector<unsigned long long> out(trace_words);
    check_cuda(cudaMemcpy(out.data(), trace, trace_words * 8, cudaMemcpyDeviceToHost), "cudaMemcpy");
    const int header[4] = {sms, 4, kTraceCap, 0};
    std::fwrite(header, sizeof(header), 1, f);
    std::fwrite(out.data(), 8, out.size(), f);
    std::fclose(f);
    return 0;
}
