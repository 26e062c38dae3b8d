"""The CUDA backward kernels against the float32 reference, with torch's own
low-precision error as the bar: for each of dq, dk, dv, error(flash_ext) <=
2 * error(SDPA math autograd in the same dtype) + a small absolute slack.
Gradients are NaN-poisoned before the kernels run. Skipped without a GPU."""

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_ext
from flash_ext import reference

from cuda_grid import (ABS_SLACK, DTYPES, HEAD_DIMS, grid_batch_heads, over_grid,  # noqa: F401 (autouse fixture)
                       poison_outputs, rand)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REF_BLOCK = 512  # the reference's tile: larger is faster, the result is the same


def make_inputs(b, hq, hkv, nq, nk, d, dtype, seed):
    """q, k, v and dO, random normal, a fresh draw per seed."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (rand(b, hq, nq, d, dtype=dtype, gen=gen), rand(b, hkv, nk, d, dtype=dtype, gen=gen),
            rand(b, hkv, nk, d, dtype=dtype, gen=gen), rand(b, hq, nq, d, dtype=dtype, gen=gen))


def flash_grads(q, k, v, do, causal, scale=None, deterministic=False):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = flash_ext.attention(q, k, v, causal=causal, scale=scale, deterministic=deterministic)
    return torch.autograd.grad(o, (q, k, v), do)


def reference_grads(q, k, v, do, causal, scale):
    """float32 reference on upcast inputs."""
    q, k, v, do = (x.float() for x in (q, k, v, do))
    o, lse = reference.attention_forward(q, k, v, causal=causal, scale=scale, block_q=REF_BLOCK, block_k=REF_BLOCK)
    return reference.attention_backward(do, q, k, v, o, lse, causal=causal, scale=scale,
                                        block_q=REF_BLOCK, block_k=REF_BLOCK)


def torch_lowp_grads(q, k, v, do, causal, scale):
    """torch's own gradients in the inputs' low precision (SDPA math, fp16/bf16 reductions).
    A row that sees no key is NaN in SDPA: such rows see every key here and get dO = 0, which
    leaves dk and dv as they are; their dq is not compared (it is 0 in the others)."""
    nq, nk = q.shape[2], k.shape[2]
    mask = torch.ones(nq, nk, dtype=torch.bool, device="cuda")
    if causal:
        mask = reference.causal_mask(0, nq, 0, nk, nq, nk, "cuda")
    blind = ~mask.any(dim=1)
    mask[blind] = True
    do = do.masked_fill(blind[:, None], 0)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    prev = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                               enable_gqa=q.shape[1] != k.shape[1])
        return torch.autograd.grad(o, (q, k, v), do), blind
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(prev)


def check_backward(q, k, v, do, causal, scale=None, deterministic=False):
    scale_value = reference.default_scale(q.shape[-1]) if scale is None else scale
    got = flash_grads(q, k, v, do, causal, scale, deterministic)
    want = reference_grads(q, k, v, do, causal, scale_value)
    lowp, blind = torch_lowp_grads(q, k, v, do, causal, scale_value)
    errors = {}
    for name, x, ref, t, inp in zip(("dq", "dk", "dv"), got, want, lowp, (q, k, v)):
        assert x.shape == inp.shape and x.dtype == inp.dtype, name
        assert not torch.isnan(x).any(), f"NaN in {name}"
        if name == "dq":
            assert torch.all(x[:, :, blind] == 0), "dq of rows that see no key must be 0"
            x, ref, t = x[:, :, ~blind], ref[:, :, ~blind], t[:, :, ~blind]
        err = (x.float() - ref).abs().max().item() if x.numel() else 0.0
        t_err = (t.float() - ref).abs().max().item() if x.numel() else 0.0
        assert err <= 2 * t_err + ABS_SLACK, f"{name} error {err:.3e} > 2 x torch's {t_err:.3e}"
        errors[name] = (err, t_err)
    return errors


@over_grid
def test_backward_grid(dtype, d, causal, nq, nk):
    b, h = grid_batch_heads(nq, nk)
    seed = zlib.crc32(repr(("bwd", dtype, d, causal, nq, nk)).encode())
    check_backward(*make_inputs(b, h, h, nq, nk, d, dtype, seed), causal)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(129, 129), (1000, 113), (113, 1000)])
def test_backward_deterministic_grid(d, causal, nq, nk):
    """The deterministic path (dQ from its own pass) meets the same bar."""
    seed = zlib.crc32(repr(("det", d, causal, nq, nk)).encode())
    check_backward(*make_inputs(2, 3, 3, nq, nk, d, torch.bfloat16, seed), causal, deterministic=True)


@pytest.fixture
def small_smem():
    """Run as on a GPU with 99 KB of shared memory per block (sm_86, sm_89): the backward's
    small tiles, which the A100 also takes above head dim 128. A fast tile would not launch."""
    flash_ext.interface._C.set_smem_cap(99 * 1024)
    yield
    flash_ext.interface._C.set_smem_cap(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(1, 1), (17, 17), (129, 129), (1000, 1000), (1000, 113), (113, 1000)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_small_tiles(small_smem, dtype, d, causal, nq, nk, deterministic):
    seed = zlib.crc32(repr(("small", dtype, d, causal, nq, nk, deterministic)).encode())
    check_backward(*make_inputs(2, 3, 3, nq, nk, d, dtype, seed), causal, deterministic=deterministic)


def test_small_smem_is_enforced(small_smem):
    """The cap acts like a smaller GPU: a kernel that needs more raises, so the test above
    fails if the backward picks a fast tile."""
    q = torch.randn(1, 2, 200, 128, dtype=torch.bfloat16, device="cuda")
    flash_ext.interface._C.set_smem_cap(64 * 1024)  # below even the small tiles
    with pytest.raises(ValueError, match="shared memory"):
        flash_ext.interface._C.bwd(q, q, q, q, q, torch.zeros(1, 2, 200, device="cuda"), None, False, 0.1, False)


@pytest.mark.parametrize("d", [40, 72, 136, 200])
def test_head_dims_between_compiled_sizes(d):
    check_backward(*make_inputs(2, 2, 2, 129, 200, d, torch.bfloat16, d), causal=True)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 1), (4, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gqa(hq, hkv, causal, deterministic):
    """dk and dv sum over the query heads of each group."""
    check_backward(*make_inputs(2, hq, hkv, 300, 257, 64, torch.bfloat16, hq * 10 + hkv), causal,
                   deterministic=deterministic)


@pytest.mark.parametrize("causal", [False, True])
def test_transposed_layout(causal):
    """(B, N, H, D) tensors viewed as (B, H, N, D); gradients follow the inputs' layout."""
    b, n, h, d = 2, 333, 4, 128
    gen = torch.Generator(device="cuda").manual_seed(21)
    q, k, v, do = (rand(b, n, h, d, dtype=torch.bfloat16, gen=gen).transpose(1, 2) for _ in range(4))
    assert not q.is_contiguous()
    check_backward(q, k, v, do, causal)
    dq, dk, dv = flash_grads(q, k, v, do, causal)
    assert dq.stride() == q.stride() and dk.stride() == k.stride()


def test_scale():
    for scale in (0.05, 1.0, -0.3, 0.0):
        check_backward(*make_inputs(1, 2, 2, 200, 333, 128, torch.float16, 22), causal=True, scale=scale)


def test_rows_that_see_no_key():
    """Causal with Nq > Nk: the first Nq - Nk rows see nothing and get dq = 0."""
    check_backward(*make_inputs(1, 2, 2, 300, 100, 64, torch.bfloat16, 23), causal=True)


def test_large_values():
    q, k, v, do = make_inputs(1, 2, 2, 257, 300, 64, torch.bfloat16, 24)
    check_backward(q * 8, k * 8, v, do, causal=False)


def test_lse_gradient():
    """return_lse=True: a loss on both outputs; the LSE's gradient enters as D - dLSE."""
    q, k, v, do = make_inputs(2, 4, 2, 200, 150, 64, torch.bfloat16, 25)
    dlse = torch.randn(2, 4, 200, device="cuda")
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o, lse = flash_ext.attention(*leaves, causal=True, return_lse=True)
    got = torch.autograd.grad((o, lse), leaves, (do, dlse))
    q32, k32, v32, do32 = (x.float() for x in (q, k, v, do))
    scale = reference.default_scale(64)
    o32, lse32 = reference.attention_forward(q32, k32, v32, causal=True, scale=scale)
    want = reference.attention_backward(do32, q32, k32, v32, o32, lse32, causal=True, scale=scale, dlse=dlse)
    without = flash_grads(q, k, v, do, causal=True)
    for name, x, ref, plain in zip(("dq", "dk", "dv"), got, want, without):
        assert not torch.isnan(x).any()
        err = (x.float() - ref).abs().max().item()
        assert err < 3e-2 * max(1.0, ref.abs().max().item()), (name, err)
        if name != "dv":  # dV = Pᵀ dO does not depend on the LSE's gradient
            assert not torch.equal(x, plain), f"dLSE changed nothing in {name}"


def test_expanded_dout():
    """o.sum().backward() hands the backward an expanded dO (all strides 0)."""
    q, k, v, _ = make_inputs(1, 2, 2, 130, 130, 64, torch.float16, 26)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    flash_ext.attention(*leaves, causal=True).sum().backward()
    want = flash_grads(q, k, v, torch.ones_like(q), causal=True)
    for x, w in zip(leaves, want):
        assert torch.equal(x.grad, w)


@pytest.mark.parametrize("hq,hkv,causal", [(4, 4, False), (8, 2, True)])
def test_deterministic_bitwise(hq, hkv, causal):
    """deterministic=True, or torch.use_deterministic_algorithms(True): identical bits run after run."""
    inputs = make_inputs(2, hq, hkv, 1000, 1000, 128, torch.bfloat16, 27)
    first = flash_grads(*inputs, causal=causal, deterministic=True)
    for _ in range(3):
        again = flash_grads(*inputs, causal=causal, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        via_torch = flash_grads(*inputs, causal=causal)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(a, b) for a, b in zip(first, via_torch))


@pytest.mark.parametrize("b,nq,nk", [(1, 0, 50), (1, 50, 0), (0, 50, 50)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_empty_and_zero_length(b, nq, nk, deterministic):
    """No query, no key or no batch: gradients of the inputs' shapes, all zero (no key: O = 0
    whatever q, k, v are)."""
    q, k, v, do = make_inputs(b, 2, 2, nq, nk, 64, torch.bfloat16, 30 + nq + 2 * nk + 3 * b)
    grads = flash_grads(q, k, v, do, causal=False, deterministic=deterministic)
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype and g.device == x.device
        assert torch.all(g == 0)


def test_cuda_graph_capture():
    q, k, v, do = make_inputs(2, 4, 2, 256, 256, 64, torch.bfloat16, 28)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.autograd.grad(flash_ext.attention(*leaves, causal=True), leaves, do)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = torch.autograd.grad(flash_ext.attention(*leaves, causal=True), leaves, do)
    for _ in range(2):
        for x in leaves:
            x.data.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        want = flash_grads(*leaves, do, causal=True, deterministic=True)
        for g, w in zip(grads, want):
            assert (g.float() - w.float()).abs().max().item() < 2e-2 * max(1.0, w.float().abs().max().item())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    q, k, v, do = (t.to("cuda:1") for t in make_inputs(1, 2, 2, 129, 129, 64, torch.bfloat16, 29))
    got = flash_grads(q, k, v, do, causal=True)
    want = reference_grads(q, k, v, do, True, reference.default_scale(64))
    for x, w in zip(got, want):
        assert x.device == q.device
        assert (x.float() - w).abs().max().item() < 5e-2
