"""The custom ops behind flash_ext.attention: torch.library.opcheck, and
torch.compile(fullgraph=True) with dynamic shapes (a graph break fails the test).
CPU tensors run the reference; the CUDA cases skip without a GPU."""

import pytest
import torch
from torch.library import opcheck

import flash_ext

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def qkv(b, hq, hkv, nq, nk, d, device, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, device=device, dtype=torch.float32, generator=gen).to(dtype)
                 for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))


def run_opcheck(q, k, v, causal, scale, dlse_options=("given",)):
    checks = opcheck(torch.ops.flash_ext.fwd.default, (q, k, v, causal, scale))
    assert all(result == "SUCCESS" for result in checks.values()), checks
    # The backward op has no derivative of its own (no double backward).
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = torch.ops.flash_ext.fwd(q, k, v, causal, scale)
    do = torch.randn_like(o)
    for option in dlse_options:  # dlse is None where the LSE output was not used
        dlse = torch.randn_like(lse) if option == "given" else None
        checks = opcheck(torch.ops.flash_ext.bwd.default, (do, q, k, v, o, lse, dlse, causal, scale))
        assert all(result == "SUCCESS" for result in checks.values()), (option, checks)


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_cpu(causal):
    q, k, v = qkv(2, 4, 2, 33, 40, 16, "cpu", torch.float64, 1)
    run_opcheck(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), causal, 0.25, ("given", None))


def opcheck_band(q, k, v, band):
    """opcheck of both ops with a window and soft-capping: band = (window_left, window_right, softcap)."""
    checks = opcheck(torch.ops.flash_ext.fwd.default, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                                                       True, 0.25, False, *band))
    assert all(result == "SUCCESS" for result in checks.values()), checks
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = torch.ops.flash_ext.fwd(q, k, v, True, 0.25, False, *band)
    checks = opcheck(torch.ops.flash_ext.bwd.default, (torch.randn_like(o), q, k, v, o, lse, None, True, 0.25, False,
                                                       *band))
    assert all(result == "SUCCESS" for result in checks.values()), checks


def test_opcheck_cpu_window_and_softcap():
    opcheck_band(*qkv(1, 4, 2, 21, 25, 16, "cpu", torch.float64, 3), (5, 2, 1.5))


@CUDA
def test_opcheck_cuda_window_and_softcap():
    opcheck_band(*qkv(2, 4, 2, 129, 77, 64, "cuda", torch.bfloat16, 4), (20, 3, 10.0))


@CUDA
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_cuda(causal):
    q, k, v = qkv(2, 4, 2, 129, 77, 64, "cuda", torch.bfloat16, 2)
    run_opcheck(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), causal, 0.125)


def loss(q, k, v, **band):
    o, lse = flash_ext.attention(q, k, v, causal=True, return_lse=True, **band)
    acc = torch.float64 if o.dtype == torch.float64 else torch.float32
    return o.to(acc).square().sum() + lse.to(acc).sum()


def check_compiled(device, dtype, backend, tol, **band):
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: loss(q, k, v, **band), fullgraph=True, dynamic=True, backend=backend)
    for seed, shape in enumerate([(2, 4, 2, 33, 40, 16), (1, 4, 1, 57, 20, 16), (3, 2, 2, 8, 8, 16)]):
        inputs = [x.requires_grad_() for x in qkv(*shape, device, dtype, seed)]
        copies = [x.detach().clone().requires_grad_() for x in inputs]
        got, want = compiled(*inputs), loss(*copies, **band)
        got.backward()
        want.backward()
        assert torch.allclose(got, want, rtol=tol, atol=tol), (got, want)
        for x, y in zip(inputs, copies):
            assert torch.allclose(x.grad, y.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_dynamic_cpu(backend):
    check_compiled("cpu", torch.float64, backend, 1e-10)


@CUDA
def test_compile_fullgraph_dynamic_cuda():
    check_compiled("cuda", torch.bfloat16, "inductor", 2e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_compile_fullgraph_window_and_softcap(device):
    dtype, tol = (torch.float64, 1e-10) if device == "cpu" else (torch.bfloat16, 2e-2)
    check_compiled(device, dtype, "aot_eager", tol, window=(7, 0), softcap=5.0)


@CUDA
def test_eager_calls_without_autograd_skip_only_the_op_dispatch(monkeypatch):
    """flash_ext.attention calls the kernel itself where the op would only dispatch to it (no
    gradient to record, no tracing, no mode), and the op everywhere else: with a gradient to
    record and under a dispatch mode. Both give the same numbers bit for bit."""
    from flash_ext import interface
    from torch.utils.flop_counter import FlopCounterMode

    calls = []
    op = interface._fwd
    monkeypatch.setattr(interface, "_fwd", lambda *args: calls.append(1) or op(*args))
    q, k, v = qkv(2, 4, 2, 300, 257, 64, "cuda", torch.bfloat16, 7)

    with torch.no_grad():
        direct = flash_ext.attention(q, k, v, causal=True, return_lse=True)
    assert calls == []
    assert direct[0].grad_fn is None
    through_op = op(q, k, v, True, 0.125)
    assert all(torch.equal(a, b) for a, b in zip(direct, through_op))

    with FlopCounterMode(display=False):
        flash_ext.attention(q, k, v, causal=True)
    assert calls == [1]

    q.requires_grad_(True)
    o = flash_ext.attention(q, k, v, causal=True)
    assert calls == [1, 1] and o.grad_fn is not None
    assert torch.equal(o.detach(), direct[0])
