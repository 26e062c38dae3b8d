"""The band kernels on CUDA: sliding windows and soft-capping, forward and backward, against
the float32 reference, with torch's own low-precision error as the bar (the 2x rule of the
forward and backward tests). SDPA has no soft-capping, so torch's low-precision computation
is written out here: scores, cap, mask, softmax and P V, each a torch op in fp16/bf16.
Outputs and gradients are NaN-poisoned before the kernels run. Skipped without a GPU."""

import zlib

import pytest
import torch

import flash_ext
from flash_ext import reference

from cuda_grid import (ABS_SLACK, DTYPES, HEAD_DIMS, SM90_HEAD_DIMS, forward_kernel,  # noqa: F401 (fixtures)
                       on_hopper_with_sm90, poison_outputs, rand)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REF_BLOCK = 512
# (left, right), -1 unbounded: a single diagonal, left-only, right-only, a narrow band off the
# diagonal, a wide one, and one whose right side reaches past every key.
WINDOWS = [(0, 0), (3, -1), (-1, 2), (70, 5), (200, 0), (1, 1000)]
LENGTHS = [(1, 1), (17, 17), (129, 129), (1000, 1000), (113, 1000), (1000, 113)]
SOFTCAP = 20.0


def make_inputs(b, hq, hkv, nq, nk, d, dtype, seed):
    """q, k, v and dO, random normal, a fresh draw per seed."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (rand(b, hq, nq, d, dtype=dtype, gen=gen), rand(b, hkv, nk, d, dtype=dtype, gen=gen),
            rand(b, hkv, nk, d, dtype=dtype, gen=gen), rand(b, hq, nq, d, dtype=dtype, gen=gen))


def torch_lowp(q, k, v, mask, scale, softcap):
    """torch's attention in the inputs' dtype, op by op: (O, LSE), differentiable."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(g, dim=1) for x in (k, v))
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v), torch.logsumexp(s.float(), dim=-1)


def max_err(x, ref, rows=None):
    """Largest absolute difference, over the query rows `rows` (a mask) if given."""
    if rows is not None:
        x, ref = x[:, :, rows], ref[:, :, rows]
    return (x.float() - ref).abs().max().item() if x.numel() else 0.0


def check(q, k, v, do, causal, window, softcap, backward=True, deterministic=False):
    """flash_ext's O, LSE (and dq, dk, dv) against the float32 reference, within twice torch's error."""
    nq, nk = q.shape[2], k.shape[2]
    scale = reference.default_scale(q.shape[-1])
    leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
    o, lse = flash_ext.attention(*leaves, causal=causal, window=window, softcap=softcap, return_lse=True,
                                 deterministic=deterministic)
    f32 = [x.float() for x in (q, k, v, do)]
    ref_o, ref_lse = reference.attention_forward(*f32[:3], causal=causal, scale=scale, window=window,
                                                 softcap=softcap, block_q=REF_BLOCK, block_k=REF_BLOCK)
    # A row that sees no key is NaN in torch's softmax: there it sees every key and gets dO = 0,
    # which leaves dk and dv as they are; its O, LSE and dq are checked to be 0, -inf and 0.
    mask = reference.visible_mask(0, nq, 0, nk, nq, nk, "cuda", causal, window)
    seen = mask.any(dim=1)
    mask[~seen] = True
    lowp = [x.detach().requires_grad_(backward) for x in (q, k, v)]
    t_o, t_lse = torch_lowp(*lowp, mask, scale, softcap)

    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "NaN in O or LSE"
    assert torch.equal(torch.isneginf(lse), ~seen.expand_as(lse)), "LSE must be -inf exactly where a row sees no key"
    assert torch.all(o[:, :, ~seen] == 0), "rows that see no key must give 0"
    for name, x, ref, t in (("O", o, ref_o, t_o), ("LSE", lse, ref_lse, t_lse)):
        err, t_err = max_err(x, ref, seen), max_err(t, ref, seen)
        assert err <= 2 * t_err + ABS_SLACK, f"{name} error {err:.3e} > 2 x torch's {t_err:.3e}"
    if not backward:
        return
    got = torch.autograd.grad(o, leaves, do)
    want = reference.attention_backward(f32[3], *f32[:3], ref_o, ref_lse, causal=causal, scale=scale, window=window,
                                        softcap=softcap, block_q=REF_BLOCK, block_k=REF_BLOCK)
    t_grads = torch.autograd.grad(t_o, lowp, do.masked_fill(~seen[:, None], 0))
    for name, x, ref, t in zip(("dq", "dk", "dv"), got, want, t_grads):
        assert not torch.isnan(x).any(), f"NaN in {name}"
        rows = None
        if name == "dq":
            assert torch.all(x[:, :, ~seen] == 0), "dq of rows that see no key must be 0"
            rows = seen
        err, t_err = max_err(x, ref, rows), max_err(t, ref, rows)
        assert err <= 2 * t_err + ABS_SLACK, f"{name} error {err:.3e} > 2 x torch's {t_err:.3e}"


def seed_of(*case):
    return zlib.crc32(repr(case).encode())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: "w{}:{}".format(*w))
@pytest.mark.parametrize("nq,nk", LENGTHS)
def test_window_grid(dtype, d, causal, window, nq, nk):
    """Forward and backward (atomic dQ) of windows, causal or not."""
    check(*make_inputs(2, 3, 3, nq, nk, d, dtype, seed_of("window", dtype, d, causal, window, nq, nk)),
          causal, window, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (70, 5)], ids=str)
@pytest.mark.parametrize("nq,nk", [(17, 17), (129, 129), (1000, 113), (113, 1000)])
def test_softcap_grid(dtype, d, causal, window, nq, nk):
    """Soft-capping, alone and with a window, forward and backward."""
    check(*make_inputs(2, 3, 3, nq, nk, d, dtype, seed_of("softcap", dtype, d, causal, window, nq, nk)),
          causal, window, SOFTCAP)


# On a Hopper GPU the grids above run the sm_90a forward at its head dims; these run the
# forward's other kernels there (the sm_80 one, the sm_90a one without its overlap), and the
# persistent sm_90a kernel over many query blocks per SM.
@on_hopper_with_sm90
@pytest.mark.parametrize("forward_kernel", [(True, True), (False, False)], ids=["sm80", "sm90_no_overlap"],
                         indirect=True)
@pytest.mark.parametrize("d", SM90_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window,softcap", [((0, 0), None), ((3, -1), None), ((-1, 2), SOFTCAP), ((70, 5), None),
                                            ((200, 0), SOFTCAP), ((1, 1000), None)], ids=str)
@pytest.mark.parametrize("nq,nk", [(17, 17), (129, 129), (1000, 113), (113, 1000)])
def test_band_forward_other_kernels_on_hopper(forward_kernel, d, causal, window, softcap, nq, nk):
    check(*make_inputs(2, 3, 3, nq, nk, d, torch.float16, seed_of("other", d, causal, window, softcap, nq, nk)),
          causal, window, softcap, backward=False)


@on_hopper_with_sm90
@pytest.mark.parametrize("forward_kernel", [(False, True), (False, False)], ids=["sm90", "sm90_no_overlap"],
                         indirect=True)
@pytest.mark.parametrize("d", SM90_HEAD_DIMS)
@pytest.mark.parametrize("causal,window,softcap,nq,nk", [
    (False, (300, 300), None, 3000, 2500),    # 24 query blocks a head, 576 in all
    (True, (500, 0), SOFTCAP, 3000, 2500),    # Nq > Nk: the first 500 rows see no key
    (False, (0, 2000), None, 2500, 3000),
], ids=str)
def test_sm90_band_forward_takes_many_blocks_per_sm(forward_kernel, d, causal, window, softcap, nq, nk):
    check(*make_inputs(3, 8, 2, nq, nk, d, torch.bfloat16, seed_of("persistent", d, causal, window, softcap)),
          causal, window, softcap, backward=False)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("case", [(True, (70, 5), None), (False, (3, 40), SOFTCAP)], ids=str)
@pytest.mark.parametrize("nq,nk", [(129, 129), (1000, 113), (113, 1000)])
def test_band_deterministic(d, case, nq, nk):
    """The deterministic backward's dQ pass under a band."""
    causal, window, softcap = case
    check(*make_inputs(2, 3, 3, nq, nk, d, torch.bfloat16, seed_of("det", d, case, nq, nk)), causal, window, softcap,
          deterministic=True)


@pytest.fixture
def small_smem():
    """As on a GPU with 99 KB of shared memory per block: the backward's small tiles."""
    flash_ext.interface._C.set_smem_cap(99 * 1024)
    yield
    flash_ext.interface._C.set_smem_cap(0)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_band_small_tiles(small_smem, d, deterministic):
    check(*make_inputs(2, 3, 3, 300, 257, d, torch.float16, seed_of("small", d, deterministic)), True, (70, 5),
          SOFTCAP, deterministic=deterministic)


def test_long_rows_and_gqa():
    check(*make_inputs(1, 4, 2, 4097, 4097, 128, torch.bfloat16, 31), True, (256, 0), None)
    check(*make_inputs(1, 4, 2, 300, 5000, 64, torch.float16, 32), False, (100, 100), SOFTCAP)
    check(*make_inputs(1, 6, 2, 4097, 4097, 256, torch.bfloat16, 33), True, None, 50.0)


def test_softcap_scale_and_layout():
    """A negative scale (the kernels run it on -q) and a (B, N, H, D) layout, capped."""
    q, k, v, do = make_inputs(1, 129, 129, 2, 2, 64, torch.bfloat16, 34)  # (B, N, H, D)
    q, k, v, do = (x.transpose(1, 2) for x in (q, k, v, do))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o = flash_ext.attention(*leaves, scale=-0.2, softcap=5.0, window=(10, 10))
    got = torch.autograd.grad(o, leaves, do)
    f32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = reference.attention_forward(*f32, scale=-0.2, softcap=5.0, window=(10, 10))[0]
    want = torch.autograd.grad(ref, f32, do.float())
    assert (o.float() - ref).abs().max().item() < 2e-2
    for x, w in zip(got, want):
        assert (x.float() - w).abs().max().item() < 5e-2
