"""flash_ext as an attention implementation of Hugging Face transformers.

    from flash_ext.integrations.transformers import register
    model = AutoModelForCausalLM.from_config(config, attn_implementation=register())

register() adds flash_ext to transformers' attention interface and its mask
interface under the name "fa_ext" and returns that name. transformers treats any
name that contains "flash" as a request for the flash-attn package (and "sdpa" as
one for torch's SDPA), so the name has neither.

What runs where: a batch without padding (no mask tensor: mask_forward builds none
for the plain causal pattern, also under torch.compile) runs flash_ext.attention,
with transformers' causal flag aligned to the bottom-right corner, which is right
for a KV cache too: the kernels on CUDA (fp16, bf16), the reference on the CPU. A
padding or sliding-window mask, dropout, or CUDA inputs the kernels do not take go
to torch's SDPA through flash_ext.scaled_dot_product_attention, with its warning.
Soft-capping (Gemma-2), position biases (T5) and attention sinks are refused with
an error rather than dropped.
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
    # What this function would otherwise drop: soft-capping (Gemma-2), position biases (T5), attention sinks.
    for name, what in (("softcap", "attention soft-capping"), ("position_bias", "a position bias"),
                       ("s_aux", "attention sinks"), ("sinks", "attention sinks")):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"flash_ext: {what} ({name}=...) is not supported yet; "
                                      f"load this model with attn_implementation='eager' or 'sdpa'")
    if kwargs.get("output_attentions"):
        raise ValueError("flash_ext: output_attentions=True needs the attention weights; use attn_implementation='eager'")
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(is_causal) and q_len > 1
    gqa = query.shape[1] != key.shape[1]
    if attention_mask is None and not dropout:
        direct = not query.is_cuda or kernel_route(query, key, value, enable_gqa=gqa)[0] is None
        if direct:  # the kernels, or the reference on the CPU
            out = attention(query, key, value, causal=causal, scale=scaling)
            return out.transpose(1, 2).contiguous(), None
    mask = attention_mask
    if mask is None and causal:
        mask = causal_lower_right(q_len, kv_len)
    out = scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                       enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def mask_forward(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, local_size=None, **kwargs):
    """transformers' mask function: no mask for the plain causal pattern without padding (flash_ext's
    causal then applies: bottom-right, right with a KV cache too), also while torch.compile traces;
    otherwise the boolean mask torch's SDPA would get."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    if attention_mask is None and local_size is None and mask_function is causal_mask_function:
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
