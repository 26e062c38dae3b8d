// The one file that talks to torch: checks tensors, fills the plain parameter
// structs, picks the device and stream, and calls the kernels' launchers.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "params.h"

#ifndef FLASH_EXT_HEAD_DIMS  // setup.py passes the head dims it built
#define FLASH_EXT_HEAD_DIMS 32, 64, 96, 128, 160, 192, 224, 256
#endif

namespace {

constexpr int kBuiltHeadDims[] = {FLASH_EXT_HEAD_DIMS};
constexpr int kAlignElems = 8;  // the kernels copy 16-byte chunks

// Tests set this so every output starts as NaN and must be written by the kernel.
bool g_poison_outputs = false;

#ifdef FLASH_EXT_SM90  // setup.py: the build targets sm_90a
constexpr bool kBuiltSm90 = true;
#else
constexpr bool kBuiltSm90 = false;
#endif

// FLASH_EXT_FORCE_SM80=1 (or set_force_sm80) runs the sm_80 forward on Hopper too.
bool g_force_sm80 = [] {
    const char* env = std::getenv("FLASH_EXT_FORCE_SM80");
    return env != nullptr && std::string(env) == "1";
}();

constexpr bool is_built(int head_dim) {
    for (int d : kBuiltHeadDims) {
        if (d == head_dim) return true;
    }
    return false;
}

// The smallest compiled head dim that holds head_dim, or -1.
int compiled_head_dim(int head_dim) {
    int best = -1;
    for (int d : kBuiltHeadDims) {
        if (d >= head_dim && (best < 0 || d < best)) best = d;
    }
    return best;
}

void check_operand(const at::Tensor& x, const char* name, const at::Tensor& q) {
    TORCH_CHECK_VALUE(x.is_cuda(), "flash_ext: ", name, " must be a CUDA tensor");
    TORCH_CHECK_VALUE(x.device() == q.device(), "flash_ext: ", name, " is on ", x.device(), " but q is on ", q.device());
    TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                     "flash_ext: ", name, " must be float16 or bfloat16, got ", x.scalar_type());
    TORCH_CHECK_TYPE(x.scalar_type() == q.scalar_type(), "flash_ext: ", name, " has dtype ", x.scalar_type(),
                     " but q has ", q.scalar_type());
    TORCH_CHECK_VALUE(x.dim() == 4, "flash_ext: ", name, " must be 4-D (batch, heads, seqlen, head_dim)");
    TORCH_CHECK_VALUE(x.size(3) == q.size(3), "flash_ext: ", name, " has head_dim ", x.size(3), " but q has ", q.size(3));
    TORCH_CHECK_VALUE(x.stride(3) == 1, "flash_ext: ", name, " must have unit stride in head_dim, got strides ",
                      x.strides());
    for (int i = 0; i < 3; ++i) {
        TORCH_CHECK_VALUE(x.stride(i) % kAlignElems == 0 || x.size(i) == 1, "flash_ext: ", name,
                          " strides must be multiples of 8 elements (16 bytes), got ", x.strides());
    }
    TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "flash_ext: ", name,
                      " must start on a 16-byte boundary");
}

// Runs launch.run<Tag, kHeadDim, kCausal>() for the runtime dtype, compiled head dim and mask.
template <int kHeadDim, typename Launch>
void run_typed(const Launch& launch, bool bf16, bool causal) {
    if (bf16) {
        causal ? launch.template run<flash::Bf16, kHeadDim, true>() : launch.template run<flash::Bf16, kHeadDim, false>();
    } else {
        causal ? launch.template run<flash::Fp16, kHeadDim, true>() : launch.template run<flash::Fp16, kHeadDim, false>();
    }
}

#define FLASH_HEAD_DIM_CASE(D)                                           \
    case D:                                                              \
        if constexpr (is_built(D)) return run_typed<D>(launch, bf16, causal); \
        break;

template <typename Launch>
void dispatch(const Launch& launch, int head_dim, bool bf16, bool causal) {
    switch (head_dim) {
        FLASH_HEAD_DIM_CASE(32)
        FLASH_HEAD_DIM_CASE(64)
        FLASH_HEAD_DIM_CASE(96)
        FLASH_HEAD_DIM_CASE(128)
        FLASH_HEAD_DIM_CASE(160)
        FLASH_HEAD_DIM_CASE(192)
        FLASH_HEAD_DIM_CASE(224)
        FLASH_HEAD_DIM_CASE(256)
    }
    TORCH_CHECK_VALUE(false, "flash_ext: no kernel built for head dim ", head_dim);
}

// Which kernel variant runs: a window or soft-capping takes the band kernel
// (the window in the params, causal included), otherwise full or causal.
struct Variant {
    bool band, softcap;
};

// Calls run(causal, band, softcap), each a std::bool_constant: the template flags of the
// variant's kernel (the band kernels take causal in their window, so their kCausal is off).
template <bool kCausal, typename Run>
void with_variant_flags(Variant variant, const Run& run) {
    using On = std::true_type;
    using Off = std::false_type;
    if (variant.softcap) return run(Off{}, On{}, On{});
    if (variant.band) return run(Off{}, On{}, Off{});
    run(std::bool_constant<kCausal>{}, Off{}, Off{});
}

// Whether the device is a Hopper GPU (compute capability 9.0), asked once per device.
bool is_hopper(const at::Device& device) {
    static std::array<int8_t, 64> known{};  // 0: not asked yet, 1: yes, -1: no
    const int index = device.index();
    if (index < 0 || index >= static_cast<int>(known.size())) return false;
    if (known[index] == 0) {
        int major = 0, minor = 0;
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index));
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index));
        known[index] = major == 9 && minor == 0 ? 1 : -1;
    }
    return known[index] == 1;
}

// The Hopper forward runs where it was built, on a Hopper GPU, at a head dim it was written
// for exactly (no zero-padded columns), and with keys to load; not while tests cap the
// shared memory (that stands for a smaller GPU, without sm_90a).
bool use_sm90(const at::Tensor& q, const at::Tensor& k, int kernel_head_dim) {
    return kBuiltSm90 && !g_force_sm80 && flash::smem_cap_for_testing == 0 && flash::is_sm90_head_dim(kernel_head_dim)
           && q.size(3) == kernel_head_dim && k.size(2) > 0 && is_hopper(q.device());
}

// The Hopper forward's block counter for a launch on `stream` (FwdParams::block_counter):
// zero when the kernel starts, and zero again when it ends, so the launches of one stream,
// which run one after another, share one and no call needs a memset first (a 4-byte memset
// and the gap after it take a few microseconds of the GPU's time). Kept for the life of the
// process, one per (device, stream; and host thread, for the per-thread default stream,
// one handle for every thread's own stream). A stream capturing a CUDA graph gets a counter
// of its own for the call, with a memset the graph replays: a replay may run beside
// anything, even beside the capturing stream's later work. The caller holds the tensor
// until the launch is made.
at::Tensor sm90_block_counter(const at::Tensor& q, cudaStream_t stream) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) {
        at::Tensor graph_counter = at::empty({1}, q.options().dtype(at::kInt));
        C10_CUDA_CHECK(cudaMemsetAsync(graph_counter.data_ptr<int>(), 0, sizeof(int), stream));
        return graph_counter;
    }
    using Key = std::tuple<int, cudaStream_t, std::thread::id>;
    const Key key{q.device().index(), stream,
                  stream == cudaStreamPerThread ? std::this_thread::get_id() : std::thread::id{}};
    static std::mutex mutex;
    static auto* counters = new std::map<Key, at::Tensor>();  // never destroyed: no CUDA call at exit
    const std::lock_guard<std::mutex> lock(mutex);
    auto found = counters->find(key);
    if (found == counters->end())  // zeroed on `stream`, before the launch that follows
        found = counters->emplace(key, at::zeros({1}, q.options().dtype(at::kInt))).first;
    return found->second;
}

struct FwdLaunch {
    const flash::FwdParams& p;
    Variant variant;
    bool sm90;  // use_sm90
    cudaStream_t stream;
    template <typename Tag, int kHeadDim, bool kCausal>
    void run() const {
        with_variant_flags<kCausal>(variant, [&](auto causal, auto band, auto softcap) {
            constexpr bool kC = decltype(causal)::value, kB = decltype(band)::value, kS = decltype(softcap)::value;
            if constexpr (kBuiltSm90 && flash::is_sm90_head_dim(kHeadDim)) {
                if (sm90) return flash::run_fwd_sm90<Tag, kHeadDim, kC, kB, kS>(p, stream);
            }
            flash::run_fwd_sm80<Tag, kHeadDim, kC, kB, kS>(p, stream);
        });
    }
};

struct BwdLaunch {
    const flash::BwdParams& p;
    Variant variant;
    bool deterministic;
    cudaStream_t stream;
    template <typename Tag, int kHeadDim, bool kCausal>
    void run() const {
        with_variant_flags<kCausal>(variant, [&](auto causal, auto band, auto softcap) {
            flash::run_bwd_sm80<Tag, kHeadDim, decltype(causal)::value, decltype(band)::value,
                                     decltype(softcap)::value>(p, deterministic, stream);
        });
    }
};

// Launch errors of the kernels' launchers become Python exceptions.
template <typename Launch>
void run_kernels(const Launch& launch, int head_dim, bool bf16, bool causal) {
    try {
        dispatch(launch, head_dim, bf16, causal);
    } catch (const std::invalid_argument& err) {
        TORCH_CHECK_VALUE(false, err.what());
    } catch (const std::runtime_error& err) {
        TORCH_CHECK(false, err.what());
    }
}

void set_strides(int64_t& batch, int64_t& head, int64_t& row, const at::Tensor& x) {
    batch = x.stride(0);
    head = x.stride(1);
    row = x.stride(2);
}

// The checks both directions make on q, k, v. Returns the compiled head dim that runs them.
int check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    check_operand(q, "q", q);
    check_operand(k, "k", q);
    check_operand(v, "v", q);
    const int64_t head_dim = q.size(3);
    TORCH_CHECK_VALUE(head_dim % kAlignElems == 0, "flash_ext: head_dim must be a multiple of 8, got ", head_dim);
    const int kernel_head_dim = compiled_head_dim(static_cast<int>(head_dim));
    TORCH_CHECK_VALUE(kernel_head_dim > 0, "flash_ext: head_dim ", head_dim, " is larger than the largest built (",
                      kBuiltHeadDims[sizeof(kBuiltHeadDims) / sizeof(int) - 1], ")");
    TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "flash_ext: k and v shapes differ: ", k.sizes(), " vs ", v.sizes());
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "flash_ext: k has batch ", k.size(0), " but q has ", q.size(0));
    TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "flash_ext: q heads (", q.size(1),
                      ") must be a multiple of k/v heads (", k.size(1), ")");
    TORCH_CHECK_VALUE(q.size(0) <= 65535 && q.size(1) <= 65535, "flash_ext: batch and heads must be at most 65535");
    return kernel_head_dim;
}

// The kernels need scale > 0: softmax(scale·q·kᵀ) = softmax(|scale|·(-q)·kᵀ),
// so a negative scale runs on -q (and dq changes sign). A zero scale becomes
// the smallest normal float, whose products with the scores flush to zero
// while masked -inf scores stay -inf.
struct PositiveScale {
    at::Tensor q;
    float scale;
};

PositiveScale positive_scale(const at::Tensor& q, double scale) {
    return {scale < 0 ? q.neg().contiguous() : q,
            std::max(static_cast<float>(std::fabs(scale)), std::numeric_limits<float>::min())};
}

// The fields FwdParams and BwdParams share: q (as run), k, v and the problem's sizes and scale.
template <typename Params>
void set_problem(Params& p, const PositiveScale& run, const at::Tensor& k, const at::Tensor& v) {
    const at::Tensor& q = run.q;
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    set_strides(p.q_batch_stride, p.q_head_stride, p.q_row_stride, q);
    set_strides(p.k_batch_stride, p.k_head_stride, p.k_row_stride, k);
    set_strides(p.v_batch_stride, p.v_head_stride, p.v_row_stride, v);
    p.batch = static_cast<int>(q.size(0));
    p.heads_q = static_cast<int>(q.size(1));
    p.heads_kv = static_cast<int>(k.size(1));
    p.seqlen_q = static_cast<int>(q.size(2));
    p.seqlen_k = static_cast<int>(k.size(2));
    p.head_dim = static_cast<int>(q.size(3));
    p.scale = run.scale;
    p.scale_log2 = run.scale * static_cast<float>(M_LOG2E);
}

// The mask and the cap, for FwdParams and BwdParams: window sides of -1 are
// unbounded (both -1: no window); softcap 0 is off. Returns the kernel variant.
template <typename Params>
Variant set_band(Params& p, bool causal, int64_t window_left, int64_t window_right, double softcap) {
    TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "flash_ext: window sides must be >= -1, got (",
                      window_left, ", ", window_right, ")");
    TORCH_CHECK_VALUE(softcap >= 0 && std::isfinite(softcap), "flash_ext: softcap must be a finite float >= 0, got ",
                      softcap);
    const auto side = [](int64_t w) {
        return w < 0 ? flash::kUnboundedWindow : static_cast<int>(std::min<int64_t>(w, flash::kUnboundedWindow));
    };
    p.window_left = side(window_left);
    p.window_right = causal ? std::min(side(window_right), 0) : side(window_right);
    // Where softcap / scale is beyond float range, scale·|score| / softcap is far below a float's
    // precision for any fp16/bf16 score, so the cap changes nothing: it is left off.
    const float out = static_cast<float>(softcap / p.scale);
    const bool capped = softcap > 0 && std::isfinite(out);
    p.softcap_in = capped ? static_cast<float>(p.scale / softcap) : 0.f;
    p.softcap_out = capped ? out : 0.f;
    return {window_left >= 0 || window_right >= 0 || capped, capped};
}

// Tests set g_poison_outputs: every output then starts as NaN.
void poison_if_testing(std::initializer_list<at::Tensor> outputs) {
    if (!g_poison_outputs) return;
    for (const at::Tensor& x : outputs) x.fill_(std::numeric_limits<float>::quiet_NaN());
}

// window_left, window_right: -1 for an unbounded side (both -1: no window); softcap 0: off.
std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                            double scale, int64_t window_left, int64_t window_right, double softcap) {
    const int kernel_head_dim = check_qkv(q, k, v);

    c10::cuda::CUDAGuard guard(q.device());
    const PositiveScale run = positive_scale(q, scale);
    at::Tensor o = at::empty_like(q);
    at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
    poison_if_testing({o, lse});
    if (o.numel() == 0) return {o, lse};

    flash::FwdParams p{};
    set_problem(p, run, k, v);
    p.o = o.data_ptr();
    p.lse = lse.data_ptr<float>();
    set_strides(p.o_batch_stride, p.o_head_stride, p.o_row_stride, o);
    const Variant variant = set_band(p, causal, window_left, window_right, softcap);

    const bool sm90 = use_sm90(q, k, kernel_head_dim);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const at::Tensor block_counter = sm90 ? sm90_block_counter(q, stream) : at::Tensor();
    if (sm90) p.block_counter = block_counter.data_ptr<int>();
    run_kernels(FwdLaunch{p, variant, sm90, stream}, kernel_head_dim, q.scalar_type() == at::kBFloat16, causal);
    return {o, lse};
}

void check_row_stats(const at::Tensor& x, const char* name, const at::Tensor& q) {
    TORCH_CHECK_VALUE(x.is_cuda() && x.device() == q.device(), "flash_ext: ", name, " must be on ", q.device());
    TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "flash_ext: ", name, " must be float32, got ", x.scalar_type());
    TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) == q.size(0) && x.size(1) == q.size(1) && x.size(2) == q.size(2),
                      "flash_ext: ", name, " must have shape (batch, heads_q, seqlen_q) = ",
                      at::IntArrayRef{q.size(0), q.size(1), q.size(2)}, ", got ", x.sizes());
    TORCH_CHECK_VALUE(x.is_contiguous(), "flash_ext: ", name, " must be contiguous");
}

// Gradients of attention: dq, dk, dv. lse is the forward's; dlse (optional)
// the gradient of the loss with respect to it.
std::vector<at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& o, const at::Tensor& lse, const c10::optional<at::Tensor>& dlse,
                            bool causal, double scale, bool deterministic, int64_t window_left,
                            int64_t window_right, double softcap) {
    const int kernel_head_dim = check_qkv(q, k, v);
    check_operand(o, "o", q);
    check_operand(dout, "dout", q);
    TORCH_CHECK_VALUE(o.sizes() == q.sizes() && dout.sizes() == q.sizes(), "flash_ext: o and dout must have q's shape ",
                      q.sizes(), ", got ", o.sizes(), " and ", dout.sizes());
    check_row_stats(lse, "lse", q);
    if (dlse.has_value()) check_row_stats(*dlse, "dlse", q);

    c10::cuda::CUDAGuard guard(q.device());
    const PositiveScale run = positive_scale(q, scale);
    at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    poison_if_testing({dq, dk, dv});
    if (q.numel() == 0 || k.numel() == 0) {  // no query, or no key: every gradient is zero
        dq.zero_();
        dk.zero_();
        dv.zero_();
        return {dq, dk, dv};
    }
    const int64_t padded = (q.size(2) + flash::kBwdRowPad - 1) / flash::kBwdRowPad * flash::kBwdRowPad;
    const auto f32 = q.options().dtype(at::kFloat);
    at::Tensor lse_log2 = at::empty({q.size(0), q.size(1), padded}, f32);
    at::Tensor delta = at::empty({q.size(0), q.size(1), padded}, f32);
    at::Tensor dq_accum = deterministic ? at::Tensor() : at::empty({q.size(0), q.size(1), padded, kernel_head_dim}, f32);

    flash::BwdParams p{};
    set_problem(p, run, k, v);
    p.o = o.data_ptr();
    p.dout = dout.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.dlse = dlse.has_value() ? dlse->data_ptr<float>() : nullptr;
    p.dq = dq.data_ptr();
    p.dk = dk.data_ptr();
    p.dv = dv.data_ptr();
    p.lse_log2 = lse_log2.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
    set_strides(p.o_batch_stride, p.o_head_stride, p.o_row_stride, o);
    set_strides(p.do_batch_stride, p.do_head_stride, p.do_row_stride, dout);
    set_strides(p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride, dq);
    set_strides(p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride, dk);
    set_strides(p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride, dv);
    p.seqlen_q_padded = static_cast<int>(padded);
    p.dq_scale = scale < 0 ? -run.scale : run.scale;
    const Variant variant = set_band(p, causal, window_left, window_right, softcap);

    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    run_kernels(BwdLaunch{p, variant, deterministic, stream}, kernel_head_dim, q.scalar_type() == at::kBFloat16,
                causal);
    return {dq, dk, dv};
}

std::vector<int> built_head_dims() {
    return std::vector<int>(std::begin(kBuiltHeadDims), std::end(kBuiltHeadDims));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "flash_ext CUDA kernels";
    m.def("fwd", &fwd, "Attention forward: returns [O, LSE]", py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("causal"), py::arg("scale"), py::arg("window_left") = -1, py::arg("window_right") = -1,
          py::arg("softcap") = 0.0);
    m.def("bwd", &bwd, "Attention backward: returns [dQ, dK, dV]", py::arg("dout"), py::arg("q"), py::arg("k"),
          py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("dlse"), py::arg("causal"), py::arg("scale"),
          py::arg("deterministic"), py::arg("window_left") = -1, py::arg("window_right") = -1,
          py::arg("softcap") = 0.0);
    m.def("built_head_dims", &built_head_dims, "Head dims the kernels were compiled for");
    m.def("set_poison_outputs", [](bool on) { g_poison_outputs = on; },
          "Testing: fill outputs with NaN before each kernel runs");
    m.def("built_sm90", [] { return kBuiltSm90; }, "Whether the Hopper (sm_90a) forward was built");
    m.def("set_force_sm80", [](bool on) { g_force_sm80 = on; },
          "Run the sm_80 forward on Hopper GPUs too (also FLASH_EXT_FORCE_SM80=1)");
    m.def("set_sm90_overlap", [](bool on) { flash::sm90_overlap = on; },
          "Testing: the Hopper forward with (default) or without its softmax / P V overlap");
    m.def("set_smem_cap", [](int bytes) { flash::smem_cap_for_testing = bytes; },
          "Testing: run as on a GPU that offers this much shared memory per block (0: the GPU's own)");
}
