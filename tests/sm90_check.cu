// The Hopper wrappers of csrc/ptx_sm90.cuh on a GPU of compute capability 9.0, against
// a float64 product on the host: TMA loads (two 64-column boxes per tile, 128-byte
// swizzle) completing on an mbarrier, then one warpgroup's wgmma m64n128k16 over K = 128:
//   1. S = Q Kᵀ: A and B K-major from shared memory (descriptors stepped along K);
//   2. O = P V: A K-major, B (V, keys x columns) MN-major;
//   3. O = P V with P in registers (the A fragments of each warp's 16 rows).
// Random bf16 inputs; outputs NaN-filled first. Prints one line per check and exits 1 on
// any failure. Built and run by tests/test_sm90.py.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "ptx_sm90.cuh"

using namespace flash::sm90;
using T = __nv_bfloat16;

constexpr int kM = 64, kN = 128, kK = 128;  // rows of the warpgroup, columns, reduction
constexpr int kAtom = 64;                   // elements per 128-byte swizzled row
constexpr int kABytes = kM * kK * 2, kBBytes = kN * kK * 2;

#define CHECK_CUDA(x)                                                                   \
    do {                                                                                \
        cudaError_t err_ = (x);                                                         \
        if (err_ != cudaSuccess) {                                                      \
            std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(err_), __FILE__, __LINE__); \
            std::exit(1);                                                               \
        }                                                                               \
    } while (0)

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ void store_acc(const float (&c)[kN / 2], float* out) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    for (int j = 0; j < kN / 8; ++j)
        for (int i = 0; i < 4; ++i) out[(16 * warp + g + 8 * (i / 2)) * kN + 8 * j + 2 * t + i % 2] = c[4 * j + i];
}

__global__ void __launch_bounds__(128) check_kernel(const __grid_constant__ CUtensorMap map_a,
                                                    const __grid_constant__ CUtensorMap map_b,
                                                    const __grid_constant__ CUtensorMap map_v, const T* p_global,
                                                    float* out) {
    extern __shared__ unsigned char smem_raw[];
    const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;  // the 128-byte swizzle repeats every 1024 bytes
    // Each tile as two boxes of 64 columns, one after the other.
    const uint32_t a = base, b = a + kABytes, v = b + kBBytes, bar = v + kBBytes;
    if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(bar, kABytes + 2 * kBBytes);
        for (int box = 0; box < kK / kAtom; ++box) {
            tma_load_2d(a + box * kM * 128, &map_a, bar, box * kAtom, 0);
            tma_load_2d(b + box * kN * 128, &map_b, bar, box * kAtom, 0);
            tma_load_2d(v + box * kK * 128, &map_v, bar, box * kAtom, 0);
        }
    }
    mbarrier_wait(bar, 0);

    // K-major: k-step s is in box s / 4, 32 bytes along its rows per step.
    auto k_major = [](uint32_t tile, int rows, int s) {
        return smem_desc_sw128(tile + (s / 4) * rows * 128 + (s % 4) * 32, 16, 1024);
    };
    // V MN-major: rows are keys (K), 16 of them per step; its boxes of 64 columns are kK·128 bytes apart.
    auto v_desc = [&](int s) { return smem_desc_sw128(v + s * 16 * 128, kK * 128, 1024); };

    float c[kN / 2];
    wgmma_fence();
    for (int s = 0; s < kK / 16; ++s) Wgmma<kN, T>::ss<false>(c, k_major(a, kM, s), k_major(b, kN, s), s > 0);
    wgmma_commit();
    wgmma_wait<0>();
    store_acc(c, out);

    wgmma_fence();
    for (int s = 0; s < kK / 16; ++s) Wgmma<kN, T>::ss<true>(c, k_major(a, kM, s), v_desc(s), s > 0);
    wgmma_commit();
    wgmma_wait<0>();
    store_acc(c, out + kM * kN);

    // P in registers: rows g, g + 8 of the warp's 16, columns 2t, 2t + 1 (+ 8) of each k-step.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    uint32_t frag[kK / 16][4];
    for (int s = 0; s < kK / 16; ++s)
        for (int i = 0; i < 4; ++i) {
            const T* p = p_global + (16 * warp + g + 8 * (i % 2)) * kK + 16 * s + 2 * t + 8 * (i / 2);
            frag[s][i] = *reinterpret_cast<const uint32_t*>(p);
        }
    wgmma_fence();
    for (int s = 0; s < kK / 16; ++s) Wgmma<kN, T>::rs<true>(c, frag[s], v_desc(s), s > 0);
    wgmma_commit();
    wgmma_wait<0>();
    store_acc(c, out + 2 * kM * kN);
}

// A (rows x cols) bf16 row-major tensor map with 64-column boxes of all rows, 128-byte swizzle.
CUtensorMap make_map(PFN_cuTensorMapEncodeTiled_v12000 encode, void* data, int rows, int cols) {
    CUtensorMap map;
    const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
    const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};
    const cuuint32_t box[2] = {kAtom, static_cast<cuuint32_t>(rows)};
    const cuuint32_t elem_strides[2] = {1, 1};
    const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, data, dims, strides, box, elem_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        std::printf("cuTensorMapEncodeTiled failed: %d\n", static_cast<int>(r));
        std::exit(1);
    }
    return map;
}

int main() {
    int major = 0;
    CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
    if (major != 9) {
        std::printf("SKIP: needs compute capability 9.0, got %d.x\n", major);
        return 0;
    }
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    CHECK_CUDA(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) {
        std::printf("cuTensorMapEncodeTiled not found\n");
        return 1;
    }
    auto encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);

    std::mt19937 gen(1234);
    std::normal_distribution<float> normal;
    auto random_bf16 = [&](int n) {
        std::vector<T> x(n);
        for (auto& e : x) e = __float2bfloat16(normal(gen));
        return x;
    };
    const std::vector<T> q = random_bf16(kM * kK), k = random_bf16(kN * kK), vv = random_bf16(kK * kN);
    T *dq, *dk, *dv;
    float* dout;
    CHECK_CUDA(cudaMalloc(&dq, q.size() * 2));
    CHECK_CUDA(cudaMalloc(&dk, k.size() * 2));
    CHECK_CUDA(cudaMalloc(&dv, vv.size() * 2));
    CHECK_CUDA(cudaMalloc(&dout, 3 * kM * kN * 4));
    CHECK_CUDA(cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dv, vv.data(), vv.size() * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemset(dout, 0xFF, 3 * kM * kN * 4));  // NaN everywhere: every output must be written

    const CUtensorMap map_a = make_map(encode, dq, kM, kK), map_b = make_map(encode, dk, kN, kK),
                      map_v = make_map(encode, dv, kK, kN);
    const int smem = 1024 + kABytes + 2 * kBBytes + 8;
    CHECK_CUDA(cudaFuncSetAttribute(check_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    check_kernel<<<1, 128, smem>>>(map_a, map_b, map_v, dq, dout);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<float> out(3 * kM * kN);
    CHECK_CUDA(cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost));

    auto f = [](T x) { return static_cast<double>(__bfloat162float(x)); };
    const char* names[3] = {"S = Q K^T (K-major A and B)", "O = P V (B MN-major)", "O = P V (A in registers)"};
    int failures = 0;
    for (int check = 0; check < 3; ++check) {
        double worst = 0, scale = 0;
        bool nan = false;
        for (int i = 0; i < kM; ++i)
            for (int j = 0; j < kN; ++j) {
                double ref = 0;
                for (int kk = 0; kk < kK; ++kk)
                    ref += f(q[i * kK + kk]) * (check == 0 ? f(k[j * kK + kk]) : f(vv[kk * kN + j]));
                const float got = out[check * kM * kN + i * kN + j];
                nan |= std::isnan(got);
                worst = std::fmax(worst, std::fabs(got - ref));
                scale = std::fmax(scale, std::fabs(ref));
            }
        const bool ok = !nan && worst <= 1e-4 * scale;
        failures += !ok;
        std::printf("%s %s: max |error| %.3e of max |ref| %.3e%s\n", ok ? "PASS" : "FAIL", names[check], worst, scale,
                    nan ? " (NaN)" : "");
    }
    return failures != 0;
}
