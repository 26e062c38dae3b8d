"""flash_ext.scaled_dot_product_attention: torch's SDPA, signature and semantics,
run on flash_ext's kernels where they apply and on torch's own SDPA elsewhere,
with a warning (once per reason) that says why. route_sdpa() makes unchanged
code that calls torch.nn.functional.scaled_dot_product_attention take this path.

Masks: is_causal is torch's, aligned to the top-left corner (query i sees keys
j <= i); for Nq == Nk that is flash_ext's causal. torch's causal_lower_right
bias (torch.nn.attention.bias) is flash_ext's causal for any Nq, Nk.
"""

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, CausalVariant

from . import interface

# torch's SDPA as it was at import: the fallback, also while route_sdpa() replaces it.
_TORCH_SDPA = F.scaled_dot_product_attention
_warned = set()  # the reasons already warned about


def kernel_route(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False):
    """(reason, causal): why this call cannot run on flash_ext's kernels (None if it can), and
    flash_ext's causal flag for its mask (once the mask is one the kernels can take). The
    reasons about the call come before those about the tensors' dtype and device."""
    tensors = (query, key, value)
    if not all(isinstance(x, torch.Tensor) for x in tensors):
        return "inputs that are not tensors", False
    causal = bool(is_causal)
    if isinstance(attn_mask, CausalBias):
        if is_causal:
            return "attn_mask and is_causal together", False
        lower_right = attn_mask.variant == CausalVariant.LOWER_RIGHT
        if not lower_right and attn_mask.seq_len_q != attn_mask.seq_len_kv:
            return "causal_upper_left with Nq != Nk (the kernels align causal to the bottom-right corner)", False
        causal = True
    elif attn_mask is not None:
        return "an attn_mask tensor", False
    if dropout_p != 0.0:
        return "dropout", False
    if query.dim() not in (3, 4) or key.dim() != query.dim() or value.dim() != query.dim():
        return "inputs that are not all 3-D or all 4-D", causal
    if isinstance(attn_mask, CausalBias) and (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (query.shape[-2],
                                                                                          key.shape[-2]):
        return "a causal bias whose lengths are not the inputs'", False
    if causal and not isinstance(attn_mask, CausalBias) and query.shape[-2] != key.shape[-2]:
        return "is_causal with Nq != Nk (torch aligns it to the top-left corner, the kernels to the bottom-right)", False
    if key.shape[:-2] != value.shape[:-2] or key.shape[-2] != value.shape[-2]:
        return "key and value of different shapes", causal
    if query.shape[0] != key.shape[0]:
        return "a batch broadcast between query and key", causal
    if query.dim() == 4 and query.shape[1] != key.shape[1]:
        if not enable_gqa or key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0:
            return "heads that differ without enable_gqa, or do not divide", causal
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return "a value head dim that differs from the query's", causal
    d = query.shape[-1]
    max_d = max(interface.BUILT_HEAD_DIMS, default=interface.KERNEL_MAX_HEAD_DIM)
    if d == 0 or d % interface.KERNEL_ALIGN != 0 or d > max_d:
        return f"head dim {d} (the kernels take multiples of {interface.KERNEL_ALIGN} up to {max_d})", causal
    if query.dtype not in interface.KERNEL_DTYPES or any(x.dtype != query.dtype for x in tensors):
        return f"dtype {query.dtype} (the kernels take float16 and bfloat16 alike in query, key, value)", causal
    if not all(x.is_cuda and x.device == query.device for x in tensors):
        return "tensors not all on one CUDA device", causal
    if interface._C is None:
        return "the CUDA extension is not built", causal
    return None, causal


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention, on flash_ext's kernels where they apply."""
    reason, causal = kernel_route(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"flash_ext.scaled_dot_product_attention: {reason} runs on torch's SDPA", stacklevel=2)
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    three_d = query.dim() == 3  # (N, L, E): one head
    q, k, v = (interface._kernel_ready(x.unsqueeze(1) if three_d else x) for x in (query, key, value))
    out = interface.attention(q, k, v, causal=causal, scale=scale)
    return out.squeeze(1) if three_d else out


@contextlib.contextmanager
def route_sdpa():
    """Within the block, torch.nn.functional.scaled_dot_product_attention is flash_ext's; restored on exit.
    Code that looks it up at call time follows (transformers' sdpa attention does); a name bound
    earlier by `from torch.nn.functional import scaled_dot_product_attention` does not."""
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous
