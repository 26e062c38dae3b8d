"""flash_ext.attention: input checks, the custom ops and their autograd.

The forward and backward are torch.library custom ops (flash_ext::fwd,
flash_ext::bwd). CUDA tensors (fp16/bf16) run the compiled kernels; CPU
tensors run the tiled reference in flash_ext.reference.
"""

import numbers

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import reference

try:
    from . import _C
except ImportError as err:  # not built: the reference serves every call
    _C = None
    _C_IMPORT_ERROR = err
else:
    _C_IMPORT_ERROR = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"flash_ext.attention: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"flash_ext.attention: {name} must be 4-D (batch, heads, seqlen, head_dim), "
            f"got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"flash_ext.attention: {name} has dtype {x.dtype}; expected one of "
            f"float16, bfloat16 (the kernels), float32 or float64 (the reference)")
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(
            f"flash_ext.attention: {name} must be contiguous in its last dim (head_dim stride 1), "
            f"got strides {x.stride()}; call .contiguous() first")


def _window_pair(window):
    """window as (left, right), -1 for an unbounded side; None: (-1, -1)."""
    if window is None:
        return -1, -1
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < -1 for w in window)):
        raise ValueError(f"flash_ext.attention: window must be None or (left, right), integers >= -1 "
                         f"(-1: unbounded on that side), got {window!r}")
    return int(window[0]), int(window[1])


def _softcap_value(softcap):
    """softcap as a float, 0.0 for off (None or 0)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap >= 0 \
            or softcap == float("inf"):
        raise ValueError(f"flash_ext.attention: softcap must be None or a finite float >= 0 (0: off), got {softcap!r}")
    return float(softcap)


def check_inputs(q, k, v, causal, scale, deterministic=False, window=None, softcap=None):
    """Raise a clear error naming the argument for every input flash_ext cannot take. Returns the
    window and cap as the ops take them: (window_left, window_right, softcap)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"flash_ext.attention: {name} has dtype {x.dtype} but q has {q.dtype}; all three must match")
        if x.device != q.device:
            raise ValueError(f"flash_ext.attention: {name} is on {x.device} but q is on {q.device}; all three must match")
        if x.shape[0] != q.shape[0]:
            raise ValueError(f"flash_ext.attention: {name} has batch {x.shape[0]} but q has batch {q.shape[0]}")
        if x.shape[3] != q.shape[3]:
            raise ValueError(f"flash_ext.attention: {name} has head_dim {x.shape[3]} but q has head_dim {q.shape[3]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"flash_ext.attention: v has {v.shape[1]} heads but k has {k.shape[1]}; they must match")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"flash_ext.attention: v has seqlen {v.shape[2]} but k has seqlen {k.shape[2]}; they must match")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"flash_ext.attention: q has {hq} heads, which is not a multiple of the {hkv} heads of k and v "
            f"(grouped-query attention needs Hq = G·Hkv)")
    if not isinstance(causal, bool):
        raise TypeError(f"flash_ext.attention: causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"flash_ext.attention: scale must be a float or None, got {type(scale).__name__}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"flash_ext.attention: deterministic must be a bool, got {type(deterministic).__name__}")
    band = (*_window_pair(window), _softcap_value(softcap))
    if q.is_cuda:
        _check_cuda_inputs(q, k, v)
    return band


KERNEL_MAX_HEAD_DIM = 256
# Read once here: torch.compile traces constants, not calls into the extension.
BUILT_HEAD_DIMS = tuple(_C.built_head_dims()) if _C is not None else ()
KERNEL_ALIGN = 8  # elements: the kernels copy 16-byte chunks


def _aligned_strides(x):
    """The kernels copy 16-byte chunks: batch, head and seqlen strides in multiples of 8 elements
    (a dim of size 1 has no stride to speak of)."""
    return all(x.stride(i) % KERNEL_ALIGN == 0 or x.shape[i] == 1 for i in range(3))


def _check_cuda_inputs(q, k, v):
    """What the CUDA kernels need beyond the general checks."""
    if _C is None:
        raise RuntimeError(
            f"flash_ext.attention: got CUDA tensors but the extension flash_ext._C is not built "
            f"({_C_IMPORT_ERROR}); install with `pip install --no-build-isolation -e .`")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"flash_ext.attention: the CUDA kernels take float16 or bfloat16, got {q.dtype}; cast the inputs "
            f"(e.g. q.bfloat16()), or pass CPU tensors to run the {q.dtype} reference")
    d = q.shape[-1]
    if d % KERNEL_ALIGN != 0 or d > KERNEL_MAX_HEAD_DIM or d == 0:
        raise ValueError(
            f"flash_ext.attention: head_dim {d} is not supported on CUDA; expected a multiple of "
            f"{KERNEL_ALIGN} from {KERNEL_ALIGN} to {KERNEL_MAX_HEAD_DIM} (pad the head dim, or use CPU tensors)")
    if d > max(BUILT_HEAD_DIMS):
        raise ValueError(
            f"flash_ext.attention: head_dim {d} needs a kernel built for head dims up to at least {d}; "
            f"this build has {list(BUILT_HEAD_DIMS)} (rebuild without FLASH_EXT_HEAD_DIMS, or with a larger one)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not _aligned_strides(x):
            raise ValueError(
                f"flash_ext.attention: {name} strides {x.stride()} must be multiples of {KERNEL_ALIGN} elements "
                f"(16 bytes) in batch, heads and seqlen; call .contiguous() first")
        # Under torch.compile the data pointer is unknown while tracing; the
        # binding checks it again at run time.
        if x.numel() > 0 and not torch.compiler.is_compiling() and x.data_ptr() % 16 != 0:
            raise ValueError(f"flash_ext.attention: {name} must start on a 16-byte boundary; call .contiguous() first")


def implementation(device):
    """Which code flash_ext.attention runs for tensors on `device`: "kernel" or "reference",
    for the forward and the backward, the head dims the kernels were built for, and whether
    the Hopper (sm_90a) forward was built."""
    kernels = torch.device(device).type == "cuda" and _C is not None
    return {
        "forward": "kernel" if kernels else "reference",
        "backward": "kernel" if kernels else "reference",
        "built_head_dims": _C.built_head_dims() if _C is not None else None,
        "built_sm90_forward": _C.built_sm90() if _C is not None else None,
    }


def _fwd_cuda(q, k, v, causal, scale, window_left, window_right, softcap):
    """The forward kernel: (O, LSE)."""
    o, lse = _C.fwd(q, k, v, causal, scale, window_left, window_right, softcap)
    return o, lse


def _op_adds_nothing(q, k, v):
    """True where the custom op flash_ext::fwd would only dispatch to _fwd_cuda: CUDA tensors of
    the plain type, no gradient to record, no torch.compile tracing, and no dispatch or function
    mode (FakeTensorMode, FlopCounterMode, torch.device(...)) that should see the op. There the
    kernel is called directly: the op's dispatch costs an eager call more host time than the
    kernel's own launch (bench/host_time.py; bench/PERFORMANCE.md, H9)."""
    return (q.is_cuda and type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None and not torch._C._is_torch_function_mode_enabled())


@torch.library.custom_op("flash_ext::fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
         deterministic: bool = False, window_left: int = -1, window_right: int = -1, softcap: float = 0.0
         ) -> tuple[torch.Tensor, torch.Tensor]:
    # deterministic only matters to the backward; the forward is deterministic.
    if q.is_cuda:
        return _fwd_cuda(q, k, v, causal, scale, window_left, window_right, softcap)
    o, lse = reference.attention_forward(q, k, v, causal=causal, scale=scale, window=(window_left, window_right),
                                         softcap=softcap)
    return torch.empty_like(q).copy_(o), lse


@_fwd.register_fake
def _fwd_fake(q, k, v, causal, scale, deterministic=False, window_left=-1, window_right=-1, softcap=0.0):
    b, hq, nq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, nq), dtype=reference.compute_dtype(q.dtype))


def _kernel_ready(x):
    """x as the kernels take it: unit stride in head_dim, 16-byte aligned rows and start."""
    if x.stride(-1) == 1 and _aligned_strides(x) and x.data_ptr() % 16 == 0:
        return x
    return x.contiguous()


@torch.library.custom_op("flash_ext::bwd", mutates_args=())
def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
         lse: torch.Tensor, dlse: torch.Tensor | None, causal: bool, scale: float, deterministic: bool = False,
         window_left: int = -1, window_right: int = -1, softcap: float = 0.0
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dlse: the gradient of the LSE output, or None where the LSE was not used."""
    if q.is_cuda:
        # dO arrives in whatever layout autograd made (expanded, say); dlse as well.
        dlse = None if dlse is None else dlse.contiguous()
        dq, dk, dv = _C.bwd(_kernel_ready(do), q, k, v, o, lse, dlse, causal, scale, deterministic, window_left,
                            window_right, softcap)
        return dq, dk, dv
    dq, dk, dv = reference.attention_backward(do, q, k, v, o, lse, causal=causal, scale=scale,
                                              window=(window_left, window_right), softcap=softcap, dlse=dlse)
    return torch.empty_like(q).copy_(dq), torch.empty_like(k).copy_(dk), torch.empty_like(v).copy_(dv)


@_bwd.register_fake
def _bwd_fake(do, q, k, v, o, lse, dlse, causal, scale, deterministic=False, window_left=-1, window_right=-1,
              softcap=0.0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, deterministic, window_left, window_right, softcap = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.options = causal, scale, deterministic, window_left, window_right, softcap
    ctx.set_materialize_grads(False)  # an unused LSE's gradient stays None: no zeros to allocate and read


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _bwd(do, q, k, v, o, lse, dlse, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, *, causal=False, scale=None, window=None, softcap=None, return_lse=False,
              deterministic=False):
    """Exact softmax attention, softmax(scale · Q Kᵀ) V, without an N×N buffer.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq a multiple of Hkv. Any
    batch/head/seqlen strides; the last dim must be contiguous.
    causal: query i sees keys j <= i + Nk - Nq (aligned to the bottom-right
        corner); a row that sees no key gives output 0 and LSE -inf.
    scale: defaults to 1/sqrt(D).
    window: (left, right): query i sees keys i + Nk - Nq - left to
        i + Nk - Nq + right, -1 leaving a side unbounded (with causal, both hold).
    softcap: scaled scores s become softcap · tanh(s / softcap) before the
        softmax (Gemma-2 style); None or 0: off.
    return_lse: also return the log-sum-exp of each row's scaled scores,
        (B, Hq, Nq), natural log, float32 (float64 for float64 inputs).
    deterministic: bitwise-identical gradients run after run (dQ from its own
        pass instead of atomic adds); also on under
        torch.use_deterministic_algorithms(True).
    """
    band = check_inputs(q, k, v, causal, scale, deterministic, window, softcap)
    scale = reference.default_scale(q.shape[-1]) if scale is None else float(scale)
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    if _op_adds_nothing(q, k, v):
        o, lse = _fwd_cuda(q, k, v, causal, scale, *band)
    else:
        o, lse = _fwd(q, k, v, causal, scale, deterministic, *band)
    return (o, lse) if return_lse else o
