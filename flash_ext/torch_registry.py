"""flash_ext as torch's own flash attention implementation.

torch (2.11 on) keeps a registry of flash attention implementations
(torch.nn.attention.register_flash_attention_impl). flash_ext registers itself
there under IMPL when imported, and does nothing more until activated:

    torch.nn.attention.activate_flash_attention_impl("flash_ext")
    ...  # SDPA's flash backend now runs on flash_ext's kernels, forward and backward
    torch.nn.attention.restore_flash_attention_impl()

Activated, the CUDA kernels of aten::_scaled_dot_product_flash_attention and
its backward are flash_ext's, so unchanged code that calls
torch.nn.functional.scaled_dot_product_attention runs on them whenever torch
picks its flash backend (no mask tensor, fp16/bf16, head dim a multiple of 8 up
to 256). torch may prefer another backend (cuDNN on the H100): pick flash with
torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION). Dropout and the
debug mask of that op are not supported and raise. With an older torch, use
flash_ext.route_sdpa() instead.
"""

import warnings

import torch

from . import interface, reference

IMPL = "flash_ext"


def available():
    """Whether the installed torch has the registry."""
    return hasattr(torch.nn.attention, "register_flash_attention_impl")


def _unsupported(what):
    return RuntimeError(f"flash_ext (activated as torch's flash attention implementation): {what} is not supported; "
                        f"torch.nn.attention.restore_flash_attention_impl() gives torch's own back")


def _kernel_inputs(*tensors):
    interface.check_inputs(*tensors[:3], False, None)
    return [interface._kernel_ready(x) for x in tensors]


def _flash_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """aten::_scaled_dot_product_flash_attention on CUDA: (B, H, N, D) inputs, the LSE for the backward.
    Causal is the op's own (FlashAttention's): bottom-right aligned; SDPA sends it only with Nq = Nk."""
    if dropout_p != 0.0:
        raise _unsupported("dropout")
    if return_debug_mask:
        raise _unsupported("return_debug_mask")
    q, k, v = _kernel_inputs(query, key, value)
    scale = reference.default_scale(query.shape[-1]) if scale is None else scale
    out, lse = interface._C.fwd(q, k, v, is_causal, scale)
    # No dropout: the random-number state the op returns for its backward is unused.
    seed = torch.zeros((2,), dtype=torch.uint64, device=query.device)
    offset = torch.zeros((), dtype=torch.uint64, device=query.device)
    debug_mask = torch.empty(0, dtype=query.dtype, device=query.device)
    return out, lse, None, None, query.shape[2], key.shape[2], seed, offset, debug_mask


def _flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                    is_causal, philox_seed, philox_offset, *, scale=None):
    """aten::_scaled_dot_product_flash_attention_backward on CUDA: dq, dk, dv."""
    if dropout_p != 0.0:
        raise _unsupported("dropout")
    q, k, v, o, do = _kernel_inputs(query, key, value, out, grad_out)
    scale = reference.default_scale(query.shape[-1]) if scale is None else scale
    deterministic = torch.are_deterministic_algorithms_enabled()
    return tuple(interface._C.bwd(do, q, k, v, o, logsumexp.contiguous(), None, is_causal, scale, deterministic))


class _Handle:
    """Keeps the override alive; remove() gives torch's kernels back."""

    def __init__(self, library):
        self.library = library

    def remove(self):
        if self.library is not None:
            self.library._destroy()
        self.library = None


def _activate():
    if interface._C is None:
        raise RuntimeError(f"flash_ext: the CUDA extension is not built ({interface._C_IMPORT_ERROR}); "
                           f"install with `pip install --no-build-isolation -e .`")
    library = torch.library.Library("aten", "IMPL", "CUDA")
    with warnings.catch_warnings():  # torch warns that a kernel is overridden: what activation asks for
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
        library.impl("_scaled_dot_product_flash_attention", _flash_forward, "CUDA")
        library.impl("_scaled_dot_product_flash_attention_backward", _flash_backward, "CUDA")
    return _Handle(library)


def register():
    """Register flash_ext in torch's registry (not activated). Returns whether torch has one."""
    if not available():
        return False
    torch.nn.attention.register_flash_attention_impl(IMPL, register_fn=_activate)
    return True
