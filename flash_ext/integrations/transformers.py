"""flash_ext as an attention implementation of Hugging Face transformers.

    from flash_ext.integrations.transformers import register
    model = AutoModelForCausalLM.from_config(config, attn_implementation=register())

register() adds flash_ext to transformers' attention interface and its mask
interface under the name "fa_ext" and returns that name. transformers treats any
name that contains "flash" as a request for the flash-attn package (and "sdpa" as
one for torch's SDPA), so the name has neither.

What runs where: a batch without padding (no mask tensor: mask_forward builds none
for the plain causal pattern nor for the causal sliding window, also under
torch.compile) runs flash_ext.attention, with transformers' causal flag aligned to
the bottom-right corner, which is right for a KV cache too, the layer's
sliding_window (Mistral, Gemma-2: keys q - sliding_window + 1 .. q, window
(sliding_window - 1, 0)) and its softcap (Gemma-2): the kernels on CUDA (fp16,
bf16), the reference on the CPU. As in transformers' own flash-attention path, the
window comes from the sliding_window argument that the model passes its attention
function. A padding mask, another mask pattern, dropout, or CUDA inputs the kernels
do not take go to torch's SDPA through flash_ext.scaled_dot_product_attention, with
its warning; soft-capping has no such fallback and raises there. Position biases
(T5) and attention sinks are refused with an error rather than dropped.
"""

import torch
from torch.nn.attention.bias import causal_lower_right

from ..interface import attention
from ..sdpa import kernel_route, scaled_dot_product_attention

NAME = "fa_ext"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers' attention function: query (B, Hq, L, D), key and value (B, Hkv, S, D);
    returns the output as (B, L, Hq, D) and no attention weights."""
    # What this function would otherwise drop: position biases (T5), attention sinks.
    for name, what in (("position_bias", "a position bias"), ("s_aux", "attention sinks"),
                       ("sinks", "attention sinks")):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"flash_ext: {what} ({name}=...) is not supported yet; "
                                      f"load this model with attn_implementation='eager' or 'sdpa'")
    if kwargs.get("output_attentions"):
        raise ValueError("flash_ext: output_attentions=True needs the attention weights; use attn_implementation='eager'")
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(is_causal) and q_len > 1
    gqa = query.shape[1] != key.shape[1]
    softcap = kwargs.get("softcap")
    if attention_mask is None and not dropout:
        direct = not query.is_cuda or kernel_route(query, key, value, enable_gqa=gqa)[0] is None
        if direct:  # the kernels, or the reference on the CPU
            out = attention(query, key, value, causal=causal, scale=scaling,
                            window=_window(kwargs.get("sliding_window"), is_causal), softcap=softcap)
            return out.transpose(1, 2).contiguous(), None
    if softcap is not None:
        raise NotImplementedError("flash_ext: attention soft-capping (softcap=...) runs on flash_ext.attention only, "
                                  "which takes no padding mask, dropout or these inputs; load this model with "
                                  "attn_implementation='eager'")
    mask = attention_mask
    if mask is None and causal:
        mask = causal_lower_right(q_len, kv_len)
    out = scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                       enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _window(sliding_window, is_causal):
    """flash_ext's window for transformers' sliding_window: causal, keys q - sliding_window + 1 .. q
    (masking_utils.sliding_window_overlay); bidirectional, distance <= sliding_window."""
    if sliding_window is None:
        return None
    return (sliding_window - 1, 0) if is_causal else (sliding_window, sliding_window)


def mask_forward(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, local_size=None, **kwargs):
    """transformers' mask function: no mask without padding for the plain causal pattern and for the
    config's sliding window (the mask of the model's sliding layers: transformers passes the window's
    size as local_size; flash_ext's causal and window then apply, bottom-right, right with a KV cache
    too), also while torch.compile traces; otherwise the boolean mask torch's SDPA would get. Mask
    functions cannot be told apart while torch.compile traces, so the window is recognised by its size,
    as transformers' own flash-attention path does: another pattern of that size (chunked attention
    whose chunk is the sliding window) is not told from it."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask
    from transformers.utils.import_utils import is_tracing

    mask_function = causal_mask_function if mask_function is None else mask_function
    # A padding mask without padding (generate passes one) is none, as in transformers' flash-attention
    # path: its last kv_length columns all true; not checked while tracing (the check reads the tensor).
    if attention_mask is not None and not is_tracing(attention_mask):
        last = attention_mask[:, -kv_length:]
        if last.shape[1] == kv_length and bool(last.all()):
            attention_mask = None
    plain = kwargs.get("allow_is_causal_skip", True) and not kwargs.get("use_vmap", False)
    sliding = local_size is not None and local_size == getattr(kwargs.get("config"), "sliding_window", None)
    if attention_mask is None and plain and (
            (local_size is None and mask_function is causal_mask_function) or sliding):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask, local_size=local_size, **kwargs)


def register():
    """Register flash_ext with transformers' attention and mask interfaces; returns the name to pass as
    attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_forward)
    return NAME
