"""flash_ext.attention's input checks and its CPU behaviour (no GPU needed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flash_ext
from flash_ext.interface import check_inputs

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


def qkv(b=2, hq=4, hkv=2, nq=5, nk=7, d=8, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=F64).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=F64).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=F64).to(dtype)
    return q, k, v


def call(q, k, v, **kw):
    return flash_ext.attention(q, k, v, **kw)


def test_valid_inputs_pass_check_inputs():
    q, k, v = qkv()
    check_inputs(q, k, v, False, None)
    check_inputs(q, k, v, True, 0.5)
    check_inputs(q, k, v, True, 2)


# ------------------------------------------------------------- errors ----

@pytest.mark.parametrize("pos", [0, 1, 2], ids=["q", "k", "v"])
@pytest.mark.parametrize("bad", [None, [[1.0]], 3.0, "q"], ids=["None", "list", "float", "str"])
def test_non_tensor(pos, bad):
    args = list(qkv())
    args[pos] = bad
    name = "qkv"[pos]
    with pytest.raises(TypeError, match=rf"\b{name} must be a torch\.Tensor"):
        call(*args)


@pytest.mark.parametrize("pos", [0, 1, 2], ids=["q", "k", "v"])
@pytest.mark.parametrize("rank", [0, 1, 2, 3, 5])
def test_rank_not_4(pos, rank):
    args = list(qkv())
    shape = {0: (), 1: (8,), 2: (7, 8), 3: (2, 7, 8), 5: (1,) + tuple(args[pos].shape)}[rank]
    args[pos] = torch.randn(shape, dtype=F64)
    name = "qkv"[pos]
    with pytest.raises(ValueError, match=rf"\b{name} must be 4-D.*got {rank}-D"):
        call(*args)


@pytest.mark.parametrize("pos", [1, 2], ids=["k", "v"])
def test_batch_mismatch(pos):
    args = list(qkv(b=2))
    args[pos] = torch.randn(3, *args[pos].shape[1:], dtype=F64)
    name = "qkv"[pos]
    with pytest.raises(ValueError, match=rf"\b{name} has batch 3 but q has batch 2"):
        call(*args)


@pytest.mark.parametrize("pos", [1, 2], ids=["k", "v"])
def test_head_dim_mismatch(pos):
    args = list(qkv(d=8))
    args[pos] = torch.randn(*args[pos].shape[:3], 6, dtype=F64)
    name = "qkv"[pos]
    with pytest.raises(ValueError, match=rf"\b{name} has head_dim 6 but q has head_dim 8"):
        call(*args)


@pytest.mark.parametrize("pos", [1, 2], ids=["k", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_mismatch(pos, dtype):
    args = list(qkv())
    args[pos] = args[pos].to(dtype)
    name = "qkv"[pos]
    with pytest.raises(TypeError, match=rf"\b{name} has dtype {dtype} but q has torch\.float64"):
        call(*args)


def test_q_dtype_differs_from_k_and_v():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"\bk has dtype torch\.float64 but q has torch\.float32"):
        call(q.float(), k, v)


@pytest.mark.parametrize("pos", [1, 2], ids=["k", "v"])
def test_device_mismatch(pos):
    args = list(qkv())
    args[pos] = torch.empty(args[pos].shape, dtype=F64, device="meta")
    name = "qkv"[pos]
    with pytest.raises(ValueError, match=rf"\b{name} is on meta but q is on cpu"):
        call(*args)


def test_q_on_another_device_than_k_and_v():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"\bk is on cpu but q is on meta"):
        call(torch.empty(q.shape, dtype=F64, device="meta"), k, v)


@pytest.mark.parametrize("hq,hkv", [(3, 2), (4, 3), (2, 4), (5, 2)])
def test_heads_not_a_multiple(hq, hkv):
    q, k, v = qkv(hq=hq, hkv=hkv)
    with pytest.raises(ValueError, match=rf"\bq has {hq} heads, which is not a multiple of the {hkv} heads of k and v"):
        call(q, k, v)


def test_zero_kv_heads():
    q, k, v = qkv(hq=4, hkv=2)
    with pytest.raises(ValueError, match=r"\bq has 4 heads.*\b0 heads of k and v"):
        call(q, k[:, :0], v[:, :0])


def test_k_and_v_lengths_differ():
    q, k, v = qkv(nk=7)
    with pytest.raises(ValueError, match=r"\bv has seqlen 6 but k has seqlen 7"):
        call(q, k, v[:, :, :6])
    with pytest.raises(ValueError, match=r"\bv has seqlen 7 but k has seqlen 5"):
        call(q, k[:, :, :5], v)


def test_k_and_v_head_counts_differ():
    q, k, v = qkv(hq=4, hkv=2)
    with pytest.raises(ValueError, match=r"\bv has 4 heads but k has 2"):
        call(q, k, v.repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match=r"\bv has 1 heads but k has 2"):
        call(q, k, v[:, :1])


@pytest.mark.parametrize("pos", [0, 1, 2], ids=["q", "k", "v"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128],
                         ids=["int32", "int64", "bool", "complex64", "complex128"])
def test_unsupported_dtype(pos, dtype):
    args = list(qkv())
    args[pos] = torch.ones(args[pos].shape, dtype=dtype)
    name = "qkv"[pos]
    with pytest.raises(TypeError, match=rf"\b{name} has dtype {dtype}; expected one of"):
        call(*args)


def test_unsupported_dtype_everywhere_names_q():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"\bq has dtype torch\.int32"):
        call(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))


@pytest.mark.parametrize("pos", [0, 1, 2], ids=["q", "k", "v"])
@pytest.mark.parametrize("how", ["step", "transpose"])
def test_last_dim_not_contiguous(pos, how):
    args = list(qkv(nq=8, nk=8, d=8))
    x = args[pos]
    if how == "step":
        x = torch.randn(*x.shape[:3], 16, dtype=F64)[..., ::2]
    else:
        x = x.transpose(-1, -2)           # (.., D, N) with D == N: same shape, last stride != 1
    assert x.shape == args[pos].shape and x.stride(-1) != 1
    args[pos] = x
    name = "qkv"[pos]
    with pytest.raises(ValueError, match=rf"\b{name} must be contiguous in its last dim"):
        call(*args)


def test_head_dim_one_with_any_stride_is_accepted():
    # With D == 1 the stride of the last dim is irrelevant: such a q is accepted.
    q, k, v = qkv(d=1)
    wide = torch.randn(2, 4, 5, 8, dtype=F64)[..., :1].transpose(-1, -2).reshape(2, 4, 1, 5).transpose(-1, -2)
    assert wide.shape == (2, 4, 5, 1) and wide.stride(-1) != 1
    o = call(wide, k, v)
    assert o.shape == (2, 4, 5, 1)
    assert (o - call(wide.contiguous(), k, v)).abs().max().item() < 1e-12


@pytest.mark.parametrize("causal", [1, 0, None, "yes", 1.0, torch.tensor(True)],
                         ids=["1", "0", "None", "str", "float", "tensor"])
def test_causal_not_a_bool(causal):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"\bcausal must be a bool"):
        call(q, k, v, causal=causal)


@pytest.mark.parametrize("scale", ["0.5", True, False, torch.tensor(0.5), [0.5], 1j],
                         ids=["str", "True", "False", "tensor", "list", "complex"])
def test_scale_not_a_number(scale):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"\bscale must be a float or None"):
        call(q, k, v, scale=scale)


@pytest.mark.parametrize("scale", [None, 0.5, 2, -1.0])
def test_scale_numbers_are_accepted(scale):
    q, k, v = qkv()
    assert call(q, k, v, scale=scale).shape == q.shape


def test_scale_default_is_inverse_sqrt_head_dim():
    q, k, v = qkv(d=9)
    assert torch.equal(call(q, k, v), call(q, k, v, scale=1 / 3))
    assert not torch.allclose(call(q, k, v), call(q, k, v, scale=1.0))


# ----------------------------------------------------------- CPU use ----

def test_import_without_gpu():
    # A fresh interpreter that sees no GPU imports the package and runs a CPU call.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        "import torch, flash_ext\n"
        "assert not torch.cuda.is_available()\n"
        "q = torch.randn(1, 2, 3, 4)\n"
        "o = flash_ext.attention(q, q, q)\n"
        "assert o.shape == q.shape and o.dtype == q.dtype\n"
        "print('ok', flash_ext.__version__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok ")


def test_public_names():
    assert flash_ext.__all__ == ["attention", "route_sdpa", "scaled_dot_product_attention"]
    assert all(callable(getattr(flash_ext, name)) for name in flash_ext.__all__)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 7, 8), (1, 6, 1, 9, 3, 5), (3, 1, 1, 1, 1, 1)],
                         ids=lambda s: "b{}-h{}:{}-n{}x{}-d{}".format(*s))
def test_cpu_shape_and_dtype(dtype, shape):
    b, hq, hkv, nq, nk, d = shape
    q, k, v = qkv(b, hq, hkv, nq, nk, d, dtype=dtype, seed=d)
    o = call(q, k, v, causal=True)
    assert o.shape == (b, hq, nq, d) and o.dtype == dtype and o.device == q.device
    o2, lse = call(q, k, v, causal=True, return_lse=True)
    assert torch.equal(o2, o)
    assert lse.shape == (b, hq, nq)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(o.float()).all()


def test_output_strides_follow_q_for_a_bnhd_view():
    b, n, h, d = 2, 6, 4, 8
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, n, h, d, generator=g, dtype=F64).transpose(1, 2)   # (B, H, N, D) view of (B, N, H, D)
    k = torch.randn(b, n + 1, 2, d, generator=g, dtype=F64).transpose(1, 2)
    v = torch.randn(b, n + 1, 2, d, generator=g, dtype=F64).transpose(1, 2)
    assert not q.is_contiguous()
    o = call(q, k, v, causal=True)
    assert o.shape == q.shape
    assert o.stride() == q.stride()
    assert o.transpose(1, 2).is_contiguous()
    # same values as the contiguous call
    o_c = call(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert o_c.is_contiguous()
    assert (o - o_c).abs().max().item() < 1e-12


def test_output_is_a_new_tensor():
    q, k, v = qkv()
    o = call(q, k, v)
    assert o.data_ptr() not in (q.data_ptr(), k.data_ptr(), v.data_ptr())
    q_before = q.clone()
    call(q, k, v, causal=True)
    assert torch.equal(q, q_before)
