"""flash_ext in torch's registry of flash attention implementations
(flash_ext/torch_registry.py): registered on import, not active until asked; activated,
SDPA's flash backend runs on flash_ext's kernels, forward and backward; restored, on torch's."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_ext
from flash_ext import torch_registry

pytestmark = pytest.mark.skipif(not torch_registry.available(), reason="this torch has no flash attention registry")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
attention = torch.nn.attention


@pytest.fixture
def activated():
    if flash_ext.interface._C is None:
        pytest.skip("needs the built extension")
    attention.activate_flash_attention_impl(torch_registry.IMPL)
    yield
    attention.restore_flash_attention_impl()


def test_registered_on_import_and_not_active():
    assert torch_registry.IMPL in attention.list_flash_attention_impls()
    assert attention.current_flash_attention_impl() != torch_registry.IMPL


def test_activate_and_restore(activated):
    assert attention.current_flash_attention_impl() == torch_registry.IMPL
    q = torch.randn(1, 2, 8, 16)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q),
                               torch.softmax(q @ q.transpose(-1, -2) / 4, dim=-1) @ q)  # CPU: torch's own


def cuda_kernels(fn):
    """Names of the CUDA kernels fn launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.name for e in prof.events())


def qkv(b, hq, hkv, n, d, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, n, d, device="cuda", generator=gen).bfloat16().requires_grad_() for h in (hq, hkv, hkv)]


@CUDA
@pytest.mark.parametrize("causal,hkv", [(False, 4), (True, 4), (True, 2)])
def test_sdpa_flash_backend_runs_flash_ext(activated, causal, hkv):
    q, k, v = qkv(2, 4, hkv, 300, 64, seed=hkv + causal)
    do = torch.randn_like(q)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hkv != 4)
        grads = torch.autograd.grad(out, (q, k, v), do)
        names = cuda_kernels(lambda: torch.autograd.grad(
            F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hkv != 4), (q, k, v), do))
    assert "flash::fwd_kernel_sm" in names and "bwd_kv_kernel_sm80" in names, names
    # The same kernels as flash_ext.attention: the same output, bit for bit.
    mine = flash_ext.attention(q, k, v, causal=causal)
    assert torch.equal(out, mine)
    want = torch.autograd.grad(mine, (q, k, v), do)
    for g, w in zip(grads, want):  # dQ by atomic adds: equal up to the order of the sums
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)


@CUDA
def test_restored_sdpa_runs_torchs_kernels():
    q, k, v = qkv(1, 2, 2, 128, 64, seed=7)
    attention.activate_flash_attention_impl(torch_registry.IMPL)
    attention.restore_flash_attention_impl()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        names = cuda_kernels(lambda: F.scaled_dot_product_attention(q, k, v))
    assert "flash::fwd_kernel" not in names


@CUDA
def test_dropout_raises_clearly(activated):
    q, k, v = qkv(1, 2, 2, 64, 64, seed=8)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), pytest.raises(RuntimeError, match="dropout is not supported"):
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
