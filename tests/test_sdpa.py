"""flash_ext.scaled_dot_product_attention against torch's SDPA: which calls run on the
kernels (GPU tests) and, for every other call, the fallback to torch's SDPA with one
warning per reason (CPU tests: the reasons about the call are decided before the
device is looked at)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import flash_ext
from flash_ext import sdpa

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def fresh_warnings():
    sdpa._warned.clear()
    yield
    sdpa._warned.clear()


def qkv(b, hq, hkv, nq, nk, d, dtype=BF16, device="cpu", seed=0, dv=None):
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, dv or d))
    return tuple(torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype) for s in shapes)


# Calls the kernels cannot take: (description, call arguments, the reason's start).
def fallback_calls():
    q, k, v = qkv(2, 4, 4, 16, 16, 64)
    q2, k2, v2 = qkv(2, 4, 4, 16, 24, 64)
    mask = torch.rand(16, 16) > 0.3
    return [
        ("mask tensor", (q, k, v), dict(attn_mask=mask), "an attn_mask tensor"),
        ("dropout", (q, k, v), dict(dropout_p=0.1), "dropout"),
        ("top-left causal", (q2, k2, v2), dict(is_causal=True), "is_causal with Nq != Nk"),
        ("upper-left bias", (q2, k2, v2), dict(attn_mask=causal_upper_left(16, 24)), "causal_upper_left"),
        ("5-D", tuple(x[None] for x in (q, k, v)), {}, "inputs that are not all 3-D or all 4-D"),
        ("value head dim", qkv(2, 4, 4, 16, 16, 64, dv=32), {}, "a value head dim"),
        ("head dim 12", qkv(2, 4, 4, 16, 16, 12), {}, "head dim 12"),
        ("head dim 512", qkv(1, 1, 1, 4, 4, 512), {}, "head dim 512"),
        ("float32", qkv(2, 4, 4, 16, 16, 64, dtype=torch.float32), {}, "dtype torch.float32"),
        ("GQA without enable_gqa", qkv(2, 4, 2, 16, 16, 64), {}, "heads that differ"),
        ("CPU", (q, k, v), {}, "tensors not all on one CUDA device"),
        ("bias of other lengths", (q, k, v), dict(attn_mask=causal_lower_right(16, 20)), "a causal bias whose"),
    ]


@pytest.mark.parametrize("name,args,kwargs,reason", fallback_calls(), ids=[c[0] for c in fallback_calls()])
def test_fallback_reason_result_and_one_warning(name, args, kwargs, reason):
    got_reason, _ = sdpa.kernel_route(*args, attn_mask=kwargs.get("attn_mask"),
                                      dropout_p=kwargs.get("dropout_p", 0.0), is_causal=kwargs.get("is_causal", False))
    assert got_reason is not None and got_reason.startswith(reason), got_reason
    if name in ("GQA without enable_gqa", "bias of other lengths"):  # torch refuses these; the drop-in too
        with pytest.warns(UserWarning, match=reason), pytest.raises(RuntimeError):
            flash_ext.scaled_dot_product_attention(*args, **kwargs)
        return
    torch.manual_seed(5)
    want = F.scaled_dot_product_attention(*args, **kwargs)
    with pytest.warns(UserWarning, match="runs on torch's SDPA") as record:
        torch.manual_seed(5)
        got = flash_ext.scaled_dot_product_attention(*args, **kwargs)
    assert len(record) == 1 and reason in str(record[0].message)
    assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason again: no second warning
        flash_ext.scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.parametrize("kwargs,nq,nk,causal", [
    ({}, 16, 24, False),
    (dict(is_causal=True), 16, 16, True),
    (dict(attn_mask="lower_right"), 16, 24, True),
    (dict(attn_mask="lower_right"), 24, 16, True),
    (dict(attn_mask="upper_left"), 16, 16, True),
], ids=["none", "is_causal-square", "lower-right-wide", "lower-right-tall", "upper-left-square"])
def test_masks_map_to_flash_ext_causal(kwargs, nq, nk, causal):
    """Up to the device, these calls are ones the kernels take, with this causal flag."""
    q, k, v = qkv(1, 2, 2, nq, nk, 64)
    if kwargs.get("attn_mask") == "lower_right":
        kwargs = dict(attn_mask=causal_lower_right(nq, nk))
    elif kwargs.get("attn_mask") == "upper_left":
        kwargs = dict(attn_mask=causal_upper_left(nq, nk))
    reason, got = sdpa.kernel_route(q, k, v, **kwargs)
    assert reason == "tensors not all on one CUDA device" and got == causal


def test_route_sdpa_replaces_and_restores():
    original = F.scaled_dot_product_attention
    with flash_ext.route_sdpa():
        assert F.scaled_dot_product_attention is flash_ext.scaled_dot_product_attention
    assert F.scaled_dot_product_attention is original
    with pytest.raises(KeyError):
        with flash_ext.route_sdpa():
            raise KeyError("restored on the way out")
    assert F.scaled_dot_product_attention is original


# ----------------------------------------------------------------- GPU ----

def reference_sdpa(q, k, v, do, **kwargs):
    """torch's SDPA (math backend) on float32 copies, output and gradients, the mask as a boolean
    tensor. A row that sees no key is NaN in torch and 0 in flash_ext: such rows see every key
    here, with dO = 0, and are left out of the output and dq comparisons (blind: True there)."""
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    nq, nk = q.shape[-2], k.shape[-2]
    mask = kwargs.pop("attn_mask", None)
    if kwargs.pop("is_causal", False):
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
    elif mask is not None:
        mask = mask._materialize(q.device)
    blind = torch.zeros(nq, dtype=torch.bool, device=q.device)
    if mask is not None:
        blind = ~mask.any(dim=-1)
        mask = mask | blind[:, None]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), do.float().masked_fill(blind[:, None], 0))
    return out, grads, blind


@CUDA
@pytest.mark.parametrize("case", [
    "plain", "is_causal", "lower_right_wide", "lower_right_tall", "gqa", "3d", "transposed", "scale",
])
def test_kernel_calls_match_torch_and_do_not_warn(case):
    nq, nk, hkv, kwargs = 200, 200, 4, {}
    if case == "is_causal":
        kwargs = dict(is_causal=True)
    elif case == "lower_right_wide":
        nq, nk = 100, 300
        kwargs = dict(attn_mask=causal_lower_right(nq, nk))
    elif case == "lower_right_tall":
        nq, nk = 300, 100
        kwargs = dict(attn_mask=causal_lower_right(nq, nk))
    elif case == "gqa":
        hkv, kwargs = 2, dict(enable_gqa=True)
    elif case == "scale":
        kwargs = dict(scale=0.3)
    q, k, v = qkv(2, 4, hkv, nq, nk, 64, device="cuda", seed=hash(case) % 1000)
    if case == "3d":
        q, k, v = (x[:, 0] for x in (q, k, v))
    if case == "transposed":  # (B, N, H, D) storage viewed as (B, H, N, D)
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    assert sdpa.kernel_route(*leaves, attn_mask=kwargs.get("attn_mask"), is_causal=kwargs.get("is_causal", False),
                             enable_gqa=kwargs.get("enable_gqa", False))[0] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel call never warns
        out = flash_ext.scaled_dot_product_attention(*leaves, **kwargs)
    do = torch.randn_like(out)
    want, want_grads, blind = reference_sdpa(*leaves, do, **kwargs)
    assert out.shape == want.shape and out.dtype == q.dtype
    assert torch.all(out[..., blind, :] == 0), "a row that sees no key gives 0 (torch: NaN)"
    assert (out[..., ~blind, :].float() - want[..., ~blind, :]).abs().max().item() < 2e-2
    grads = torch.autograd.grad(out, leaves, do)
    for name, g, w in zip("qkv", grads, want_grads):
        if name == "q":
            g, w = g[..., ~blind, :], w[..., ~blind, :]
        assert (g.float() - w).abs().max().item() < 5e-2 * max(1.0, w.abs().max().item()), name


@CUDA
def test_route_sdpa_runs_unchanged_code_on_the_kernels(monkeypatch):
    calls = []
    real = flash_ext.interface.attention
    monkeypatch.setattr(flash_ext.interface, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = qkv(2, 4, 4, 128, 128, 64, device="cuda")
    with flash_ext.route_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert calls == [dict(causal=True, scale=None)]
    want, _, _ = reference_sdpa(q, k, v, torch.zeros_like(q), is_causal=True)
    assert (out.float() - want).abs().max().item() < 2e-2
