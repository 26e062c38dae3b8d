"""flash_ext.reference (and flash_ext.attention on the CPU) against untiled float64 attention.

The oracle below forms the whole score matrix: softmax(scale · Q Kᵀ) V with the
bottom-right causal mask j <= i + Nk - Nq and K/V heads repeated for GQA. It is
itself checked against torch SDPA's math backend. torch SDPA's is_causal is
aligned to the top-left corner, so the causal mask is always passed to it as an
explicit boolean attn_mask.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_ext
from flash_ext import reference

F64 = torch.float64
TOL = 1e-10


# --------------------------------------------------------------- helpers ----

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: one thread is faster than several.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, g, dtype=F64, requires_grad=False):
    """A fresh normal draw; never all zeros."""
    x = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    if x.numel():
        assert x.abs().max() > 0
    return x.requires_grad_(requires_grad)


def make_qkv(b, hq, hkv, nq, nk, d, seed, dtype=F64, requires_grad=False):
    g = gen(seed)
    q = randn((b, hq, nq, d), g, dtype, requires_grad)
    k = randn((b, hkv, nk, d), g, dtype, requires_grad)
    v = randn((b, hkv, nk, d), g, dtype, requires_grad)
    return q, k, v


def visible_mask(nq, nk, causal, window=None):
    """(nq, nk) bool: True where query i may see key j (bottom-right alignment, diag = nk - nq):
    causal, j <= i + diag; window (left, right), i + diag - left <= j <= i + diag + right, -1 unbounded."""
    offset = torch.arange(nk)[None, :] - (torch.arange(nq)[:, None] + nk - nq)
    mask = torch.ones(nq, nk, dtype=torch.bool)
    left, right = (-1, -1) if window is None else window
    if causal:
        mask &= offset <= 0
    if right >= 0:
        mask &= offset <= right
    if left >= 0:
        mask &= offset >= -left
    return mask


def oracle(q, k, v, causal=False, scale=None, window=None, softcap=None):
    """Untiled attention in float64: (O, LSE), differentiable, NaN-free for rows that see no key."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    hq, hkv, nq, nk, d = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    s = scale * (q @ k.transpose(-1, -2))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    mask = visible_mask(nq, nk, causal, window)
    s = s.masked_fill(~mask, -math.inf)
    empty = ~mask.any(dim=-1)                       # rows that see no key
    s = s.masked_fill(empty[:, None], 0.0)          # keep their softmax finite; zeroed below
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]) * (~empty)[:, None].to(F64)
    o = p @ v
    return o, lse.masked_fill(empty, -math.inf)


def sdpa_math(q, k, v, causal=False, scale=None):
    nq, nk = q.shape[2], k.shape[2]
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=visible_mask(nq, nk, causal), scale=scale,
            enable_gqa=q.shape[1] != k.shape[1])


def max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0.0
    a, b = a.to(F64), b.to(F64)
    both_ninf = torch.isneginf(a) & torch.isneginf(b)
    return (a - b).abs().masked_fill(both_ninf, 0.0).max().item()


def assert_finite_or_neginf_lse(lse):
    assert not torch.isnan(lse).any()
    assert not torch.isposinf(lse).any()


# (b, hq, hkv, nq, nk, d, block_q, block_k)
CASES = [
    (2, 2, 2, 17, 17, 8, 4, 4),          # square, tiles divide nothing of 17
    (1, 2, 2, 17, 17, 8, 2, 3),          # tiles of 2 and 3
    (1, 4, 2, 113, 127, 5, 32, 17),      # Nq < Nk, GQA 4/2, odd head dim
    (1, 6, 1, 129, 17, 3, 32, 5),        # Nq > Nk, MQA 6/1
    (2, 4, 2, 127, 129, 16, 64, 64),     # default tiles, neither divides
    (1, 4, 2, 1, 129, 7, 2, 9),          # Nq = 1
    (1, 6, 1, 113, 1, 9, 9, 2),          # Nk = 1
    (1, 1, 1, 1, 1, 1, 1, 1),            # one of everything
    (1, 2, 1, 17, 113, 1, 5, 128),       # head dim 1, one key tile larger than Nk
    (1, 2, 2, 129, 113, 33, 128, 8),     # one query tile and a row in a second one
    (1, 6, 1, 7, 3, 4, 3, 2),            # causal: a query tile mixing empty and non-empty rows
    (1, 4, 2, 3, 7, 6, 2, 3),            # causal: first rows start mid key tile
]


def case_id(c):
    return "b{}-h{}:{}-n{}x{}-d{}-t{}x{}".format(*c)


# ------------------------------------------------- the oracle vs SDPA math ---

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES[:6] + CASES[10:], ids=case_id)
def test_oracle_matches_sdpa_math_backend(case, causal):
    b, hq, hkv, nq, nk, d, _, _ = case
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=11)
    o, _ = oracle(q, k, v, causal, scale=0.7)
    want = sdpa_math(q, k, v, causal, scale=0.7)
    seen = visible_mask(nq, nk, causal).any(-1)    # SDPA's convention for empty rows varies
    assert max_err(o[:, :, seen], want[:, :, seen]) < TOL


def test_sdpa_is_causal_is_top_left_so_the_mask_is_explicit():
    # Guards the premise above: with Nq != Nk, is_causal differs from the bottom-right mask.
    q, k, v = make_qkv(1, 1, 1, 3, 5, 4, seed=12)
    with sdpa_kernel(SDPBackend.MATH):
        top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert max_err(top_left, oracle(q, k, v, causal=True)[0]) > 1e-3


# ----------------------------------------------------- forward, float64 ----

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_oracle(case, causal):
    b, hq, hkv, nq, nk, d, bq, bk = case
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=hash(case) % 2**31)
    o, lse = reference.attention_forward(q, k, v, causal=causal, block_q=bq, block_k=bk)
    want_o, want_lse = oracle(q, k, v, causal)
    assert o.dtype == F64 and lse.dtype == F64
    assert o.shape == q.shape and lse.shape == q.shape[:3]
    assert not torch.isnan(o).any()
    assert_finite_or_neginf_lse(lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    assert max_err(o, want_o) < TOL
    assert max_err(lse, want_lse) < TOL
    # LSE against torch.logsumexp of the masked scaled scores, written out directly
    kk = k.repeat_interleave(hq // hkv, dim=1)
    s = (q @ kk.transpose(-1, -2)) / math.sqrt(d)
    s = s.masked_fill(~visible_mask(nq, nk, causal), -math.inf)
    assert max_err(lse, torch.logsumexp(s, dim=-1)) < TOL


@pytest.mark.parametrize("scale", [0.25, 1.0, -0.5, 3.0])
def test_forward_explicit_scale(scale):
    q, k, v = make_qkv(1, 4, 2, 19, 23, 6, seed=int(100 * scale) + 7)
    o, lse = reference.attention_forward(q, k, v, causal=True, scale=scale, block_q=5, block_k=4)
    want_o, want_lse = oracle(q, k, v, True, scale=scale)
    assert max_err(o, want_o) < TOL and max_err(lse, want_lse) < TOL


@pytest.mark.parametrize("block", [(1, 1), (2, 3), (3, 2), (7, 64), (64, 7), (200, 200)])
def test_forward_does_not_depend_on_tiles(block):
    q, k, v = make_qkv(1, 2, 1, 13, 11, 4, seed=31)
    o, lse = reference.attention_forward(q, k, v, causal=True, block_q=block[0], block_k=block[1])
    o1, lse1 = reference.attention_forward(q, k, v, causal=True, block_q=13, block_k=11)
    assert max_err(o, o1) < TOL and max_err(lse, lse1) < TOL


def test_forward_causal_with_equal_lengths_is_lower_triangular():
    q, k, v = make_qkv(1, 1, 1, 5, 5, 3, seed=41)
    o, _ = reference.attention_forward(q, k, v, causal=True, block_q=2, block_k=2)
    # row 0 sees only key 0: its output is v[0] exactly up to rounding
    assert max_err(o[0, 0, 0], v[0, 0, 0]) < TOL
    # the last row sees every key: same as non-causal
    o_full, _ = reference.attention_forward(q, k, v, causal=False)
    assert max_err(o[0, 0, -1], o_full[0, 0, -1]) < TOL
    assert max_err(o[0, 0, 0], o_full[0, 0, 0]) > 1e-3


def test_forward_gqa_heads_read_their_group():
    # query heads 0,1 read K/V head 0 and heads 2,3 read K/V head 1
    q, k, v = make_qkv(1, 4, 2, 6, 8, 4, seed=43)
    o, _ = reference.attention_forward(q, k, v, block_q=4, block_k=3)
    for h in range(4):
        o_h, _ = reference.attention_forward(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1])
        assert max_err(o[:, h:h + 1], o_h) < TOL


def test_forward_rejects_bad_tiles_and_shapes():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 4, seed=47)
    with pytest.raises(ValueError, match="tile"):
        reference.attention_forward(q, k, v, block_q=0)
    with pytest.raises(ValueError, match="tile"):
        reference.attention_backward(q, q, k, v, q, q[..., 0], block_k=0)
    with pytest.raises(ValueError, match="multiple"):
        reference.attention_forward(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="4-D"):
        reference.attention_forward(q[0], k, v)


# ------------------------------------------------ online_softmax_step ----

def test_online_softmax_step_blocks_equal_full_softmax():
    g = gen(51)
    s = randn((3, 20), g) * 4
    m = torch.full((3,), -math.inf, dtype=F64)
    l = torch.zeros(3, dtype=F64)
    acc = torch.zeros(3, 0, dtype=F64)
    for k0 in range(0, 20, 6):
        p, m, l, alpha = reference.online_softmax_step(s[:, k0:k0 + 6], m, l)
        acc = torch.cat([alpha[:, None] * acc, p], dim=1)
    assert max_err(acc / l[:, None], torch.softmax(s, dim=-1)) < 1e-15
    assert max_err(m + torch.log(l), torch.logsumexp(s, dim=-1)) < 1e-14


def test_online_softmax_step_all_masked_rows():
    s = torch.tensor([[-math.inf, -math.inf], [0.5, -math.inf]], dtype=F64)
    m = torch.full((2,), -math.inf, dtype=F64)
    l = torch.zeros(2, dtype=F64)
    p, m1, l1, alpha = reference.online_softmax_step(s, m, l)
    assert torch.isneginf(m1[0]) and l1[0] == 0 and torch.equal(p[0], torch.zeros(2, dtype=F64))
    assert m1[1] == 0.5 and l1[1] == 1.0 and p[1].tolist() == [1.0, 0.0]
    assert not torch.isnan(p).any() and not torch.isnan(alpha).any()
    # a fully masked block after a visible one changes nothing
    p2, m2, l2, alpha2 = reference.online_softmax_step(torch.full((2, 3), -math.inf, dtype=F64), m1, l1)
    assert m2[1] == 0.5 and l2[1] == 1.0 and alpha2[1] == 1.0
    assert torch.equal(p2, torch.zeros(2, 3, dtype=F64))


# ---------------------------------------------------- backward, float64 ----

def oracle_grads(q, k, v, do, dlse, causal, scale=None, window=None, softcap=None):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o, lse = oracle(q, k, v, causal, scale, window, softcap)
    outs, grads = [o], [do]
    if dlse is not None:
        outs.append(lse)
        grads.append(dlse)
    return torch.autograd.grad(outs, (q, k, v), grads, allow_unused=True)


BWD_CASES = [c for i, c in enumerate(CASES) if i != 4] + [(1, 2, 2, 33, 31, 8, 64, 64)]


@pytest.mark.parametrize("with_dlse", [False, True], ids=["dO", "dO+dLSE"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", BWD_CASES, ids=case_id)
def test_backward_matches_autograd_of_oracle(case, causal, with_dlse):
    b, hq, hkv, nq, nk, d, bq, bk = case
    seed = (hash(case) + 2 * causal + with_dlse) % 2**31
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=seed)
    g = gen(seed + 1)
    do = randn(q.shape, g)
    dlse = randn(q.shape[:3], g) if with_dlse else None
    o, lse = reference.attention_forward(q, k, v, causal=causal, block_q=bq, block_k=bk)
    dq, dk, dv = reference.attention_backward(do, q, k, v, o, lse, causal=causal, dlse=dlse,
                                              block_q=bq, block_k=bk)
    want = oracle_grads(q, k, v, do, dlse, causal)
    for name, got, exp in zip("qkv", (dq, dk, dv), want):
        assert got.dtype == F64 and got.shape == exp.shape, name
        assert not torch.isnan(got).any(), name
        assert max_err(got, exp) < TOL, name


def test_backward_dlse_changes_the_gradient():
    # The dlse path must matter: with dO = 0, only dLSE drives dQ and dK (dV stays 0).
    q, k, v = make_qkv(1, 2, 1, 9, 12, 4, seed=61)
    g = gen(62)
    dlse = randn(q.shape[:3], g)
    o, lse = reference.attention_forward(q, k, v, causal=True, block_q=4, block_k=5)
    do = torch.zeros_like(q)
    dq, dk, dv = reference.attention_backward(do, q, k, v, o, lse, causal=True, dlse=dlse, block_q=4, block_k=5)
    want = oracle_grads(q, k, v, do, dlse, True)
    assert dq.abs().max() > 1e-3 and dk.abs().max() > 1e-3
    assert torch.equal(dv, torch.zeros_like(dv))
    for got, exp in zip((dq, dk, dv), want):
        assert max_err(got, exp) < TOL


@pytest.mark.parametrize("scale", [0.3, -1.25])
def test_backward_explicit_scale(scale):
    q, k, v = make_qkv(1, 4, 2, 10, 14, 5, seed=71)
    g = gen(72)
    do, dlse = randn(q.shape, g), randn(q.shape[:3], g)
    o, lse = reference.attention_forward(q, k, v, causal=True, scale=scale, block_q=3, block_k=4)
    got = reference.attention_backward(do, q, k, v, o, lse, causal=True, scale=scale, dlse=dlse,
                                       block_q=3, block_k=4)
    for a, e in zip(got, oracle_grads(q, k, v, do, dlse, True, scale)):
        assert max_err(a, e) < TOL


# ----------------------------------------------- rows that see no key ----

@pytest.mark.parametrize("tiles", [(1, 1), (3, 2), (4, 64), (64, 64)])
def test_rows_without_keys(tiles):
    nq, nk = 11, 4                           # causal: rows 0..6 see no key
    q, k, v = make_qkv(1, 4, 2, nq, nk, 5, seed=81 + tiles[0])
    g = gen(82)
    do, dlse = randn(q.shape, g), randn(q.shape[:3], g)
    o, lse = reference.attention_forward(q, k, v, causal=True, block_q=tiles[0], block_k=tiles[1])
    empty = slice(0, nq - nk)
    assert torch.equal(o[:, :, empty], torch.zeros_like(o[:, :, empty]))
    assert torch.isneginf(lse[:, :, empty]).all()
    assert torch.isfinite(lse[:, :, nq - nk:]).all()
    assert (o[:, :, nq - nk:].abs().sum(-1) > 0).all()
    dq, dk, dv = reference.attention_backward(do, q, k, v, o, lse, causal=True, dlse=dlse,
                                              block_q=tiles[0], block_k=tiles[1])
    for t in (o, dq, dk, dv):
        assert not torch.isnan(t).any()
    assert torch.equal(dq[:, :, empty], torch.zeros_like(dq[:, :, empty]))
    assert dq[:, :, nq - nk:].abs().max() > 0
    for a, e in zip((dq, dk, dv), oracle_grads(q, k, v, do, dlse, True)):
        assert max_err(a, e) < TOL


# ------------------------------------------------------------ empty ----

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_no_keys(causal):
    q, k, v = make_qkv(2, 4, 2, 5, 0, 3, seed=91)
    o, lse = reference.attention_forward(q, k, v, causal=causal, block_q=2, block_k=2)
    assert o.shape == q.shape and lse.shape == q.shape[:3]
    assert torch.equal(o, torch.zeros_like(q))
    assert torch.isneginf(lse).all()
    do = randn(q.shape, gen(92))
    dq, dk, dv = reference.attention_backward(do, q, k, v, o, lse, causal=causal, dlse=randn(lse.shape, gen(93)))
    assert torch.equal(dq, torch.zeros_like(q))
    assert dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_no_queries(causal):
    q, k, v = make_qkv(2, 4, 2, 0, 6, 3, seed=95)
    o, lse = reference.attention_forward(q, k, v, causal=causal, block_q=2, block_k=2)
    assert o.shape == q.shape and lse.shape == (2, 4, 0)
    dq, dk, dv = reference.attention_backward(torch.zeros_like(q), q, k, v, o, lse, causal=causal)
    assert dq.shape == q.shape
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


# ------------------------------------------------ fp16 / bf16 on the CPU ----

LOW = {
    # dtype: (tolerance on O relative to max |O|, on gradients relative to their max)
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 5e-2),
}


@pytest.mark.parametrize("dtype", list(LOW), ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_low_precision_forward_and_backward(dtype, causal):
    o_tol, g_tol = LOW[dtype]
    q, k, v = make_qkv(1, 4, 2, 37, 45, 16, seed=101, dtype=dtype)
    o, lse = reference.attention_forward(q, k, v, causal=causal, block_q=16, block_k=8)
    assert o.dtype == dtype and lse.dtype == torch.float32
    want_o, want_lse = oracle(q, k, v, causal)      # float64 on the very same (rounded) inputs
    assert max_err(o, want_o) <= o_tol * want_o.abs().max().item()
    # LSE is accumulated and kept in float32
    assert max_err(lse, want_lse) < 1e-4
    # a float64 reference run would be far closer: the low-precision error is real rounding, not a bug
    assert max_err(o, want_o) > 0

    g = gen(102)
    do = randn(q.shape, g, dtype)
    dlse = randn(q.shape[:3], g, torch.float32)
    grads = reference.attention_backward(do, q, k, v, o, lse, causal=causal, dlse=dlse, block_q=16, block_k=8)
    want = oracle_grads(q, k, v, do, dlse, causal)
    for name, got, exp in zip("qkv", grads, want):
        assert got.dtype == dtype, name
        assert max_err(got, exp) <= g_tol * exp.abs().max().item(), name


def test_float32_inputs_compute_in_float32():
    q, k, v = make_qkv(1, 2, 1, 20, 24, 8, seed=111, dtype=torch.float32)
    o, lse = reference.attention_forward(q, k, v, causal=True, block_q=8, block_k=8)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    want_o, want_lse = oracle(q, k, v, True)
    assert max_err(o, want_o) < 1e-5 and max_err(lse, want_lse) < 1e-5


# -------------------------------------------- the public API on the CPU ----

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", [(2, 4, 2, 19, 23), (1, 6, 1, 23, 19), (1, 3, 3, 1, 9), (1, 2, 1, 9, 1)],
                         ids=lambda c: "b{}-h{}:{}-n{}x{}".format(*c))
def test_api_forward_and_lse_match_oracle(case, causal):
    b, hq, hkv, nq, nk = case
    q, k, v = make_qkv(b, hq, hkv, nq, nk, 7, seed=121 + nq)
    o = flash_ext.attention(q, k, v, causal=causal)
    o2, lse = flash_ext.attention(q, k, v, causal=causal, return_lse=True)
    want_o, want_lse = oracle(q, k, v, causal)
    assert isinstance(o, torch.Tensor)
    assert o.dtype == F64 and lse.dtype == F64 and lse.shape == q.shape[:3]
    assert max_err(o, want_o) < TOL and max_err(o2, want_o) < TOL
    assert max_err(lse, want_lse) < TOL
    o3 = flash_ext.attention(q, k, v, causal=causal, scale=0.4)
    assert max_err(o3, oracle(q, k, v, causal, scale=0.4)[0]) < TOL


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_api_autograd_matches_oracle(causal):
    q, k, v = make_qkv(1, 4, 2, 13, 9, 5, seed=131, requires_grad=True)
    g = gen(132)
    do, dlse = randn(q.shape, g), randn(q.shape[:3], g)
    o, lse = flash_ext.attention(q, k, v, causal=causal, return_lse=True)
    # only the rows with a finite LSE carry a gradient into it
    dlse = dlse.masked_fill(torch.isneginf(lse.detach()), 0.0)
    got = torch.autograd.grad((o, lse), (q, k, v), (do, dlse))
    want = oracle_grads(q, k, v, do, dlse, causal)
    for name, a, e in zip("qkv", got, want):
        assert not torch.isnan(a).any(), name
        assert max_err(a, e) < TOL, name
    # output only, without return_lse
    q.grad = k.grad = v.grad = None
    flash_ext.attention(q, k, v, causal=causal).backward(do)
    for name, a, e in zip("qkv", (q.grad, k.grad, v.grad), oracle_grads(q, k, v, do, None, causal)):
        assert max_err(a, e) < TOL, name


@pytest.mark.parametrize("case", [
    # (hq, hkv, nq, nk, d, causal, return_lse)
    (1, 1, 3, 4, 3, False, True),
    (2, 2, 4, 4, 2, True, True),
    (4, 2, 3, 5, 3, True, True),       # GQA, causal, Nq < Nk
    (3, 1, 4, 3, 2, False, True),      # MQA, Nq > Nk
    (2, 1, 5, 2, 2, True, False),      # causal, Nq > Nk: rows without keys (their LSE is -inf, so O only)
], ids=lambda c: "h{}:{}-n{}x{}-d{}-c{}-lse{}".format(*c))
def test_api_gradcheck(case):
    hq, hkv, nq, nk, d, causal, return_lse = case
    q, k, v = make_qkv(1, hq, hkv, nq, nk, d, seed=141 + hq + nq, requires_grad=True)

    def f(q, k, v):
        return flash_ext.attention(q, k, v, causal=causal, scale=0.8, return_lse=return_lse)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


# ------------------------------------------- sliding window and soft-capping ----

# (left, right); -1: unbounded on that side
WINDOWS = [(-1, -1), (0, 0), (3, -1), (-1, 2), (5, 7), (0, -1), (16, 0), (1000, 1000), (2, 40)]


def window_id(w):
    return "w{}:{}".format(*w)


@pytest.mark.parametrize("window", WINDOWS, ids=window_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_window_forward_and_backward_match_oracle(case, causal, window):
    b, hq, hkv, nq, nk, d, bq, bk = case
    seed = (hash((case, causal, window)) + 7) % 2**31
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=seed)
    g = gen(seed + 1)
    do, dlse = randn(q.shape, g), randn(q.shape[:3], g)
    o, lse = reference.attention_forward(q, k, v, causal=causal, window=window, block_q=bq, block_k=bk)
    want_o, want_lse = oracle(q, k, v, causal, window=window)
    assert max_err(o, want_o) < TOL and max_err(lse, want_lse) < TOL
    assert_finite_or_neginf_lse(lse)
    grads = reference.attention_backward(do, q, k, v, o, lse, causal=causal, window=window, dlse=dlse,
                                         block_q=bq, block_k=bk)
    for name, got, exp in zip("qkv", grads, oracle_grads(q, k, v, do, dlse, causal, window=window)):
        assert not torch.isnan(got).any(), name
        assert max_err(got, exp) < TOL, name


@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
@pytest.mark.parametrize("window", [(-1, -1), (4, 3)], ids=window_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 2, 3, 4, 5, 6, 10)], ids=case_id)
def test_softcap_forward_and_backward_match_oracle(case, causal, window, softcap):
    b, hq, hkv, nq, nk, d, bq, bk = case
    seed = (hash((case, causal, window, softcap)) + 11) % 2**31
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=seed)
    q = q * 3  # scores beyond the cap, where tanh bends
    g = gen(seed + 1)
    do, dlse = randn(q.shape, g), randn(q.shape[:3], g)
    o, lse = reference.attention_forward(q, k, v, causal=causal, window=window, softcap=softcap,
                                         block_q=bq, block_k=bk)
    want_o, want_lse = oracle(q, k, v, causal, window=window, softcap=softcap)
    assert max_err(o, want_o) < TOL and max_err(lse, want_lse) < TOL
    grads = reference.attention_backward(do, q, k, v, o, lse, causal=causal, window=window, softcap=softcap,
                                         dlse=dlse, block_q=bq, block_k=bk)
    for name, got, exp in zip("qkv", grads, oracle_grads(q, k, v, do, dlse, causal, window=window,
                                                         softcap=softcap)):
        assert max_err(got, exp) < TOL, name


def test_softcap_changes_the_result():
    q, k, v = make_qkv(1, 2, 2, 9, 11, 4, seed=91)
    o, _ = reference.attention_forward(q * 3, k, v)
    capped, _ = reference.attention_forward(q * 3, k, v, softcap=0.5)
    assert max_err(o, capped) > 1e-2
    same, _ = reference.attention_forward(q * 3, k, v, softcap=0.0)  # 0: off
    assert torch.equal(o, same)


@pytest.mark.parametrize("window", WINDOWS, ids=window_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("nq,nk", [(17, 17), (5, 40), (40, 5), (1, 9), (9, 1)])
def test_visible_ranges_cover_exactly_the_band(nq, nk, causal, window):
    """The key range of a query tile (and the query range of a key tile) that the reference visits is the
    span of the visible entries: nothing visible is skipped, and ranges with nothing visible are empty."""
    mask = visible_mask(nq, nk, causal, window)
    for q0 in range(nq):
        for q1 in range(q0 + 1, nq + 1):
            cols = mask[q0:q1].any(dim=0).nonzero().flatten()
            start, end = reference.visible_keys(q0, q1, nq, nk, causal, window)
            if cols.numel() == 0:
                assert start >= end, (q0, q1, start, end)
            else:
                assert (start, end) == (cols.min().item(), cols.max().item() + 1), (q0, q1)
    for k0 in range(nk):
        for k1 in range(k0 + 1, nk + 1):
            rows = mask[:, k0:k1].any(dim=1).nonzero().flatten()
            start, end = reference.visible_queries(k0, k1, nq, nk, causal, window)
            if rows.numel() == 0:
                assert start >= end, (k0, k1, start, end)
            else:
                assert (start, end) == (rows.min().item(), rows.max().item() + 1), (k0, k1)
    assert torch.equal(reference.visible_mask(0, nq, 0, nk, nq, nk, "cpu", causal, window), mask)


@pytest.mark.parametrize("window,softcap", [((-2, 0), None), ((1, 2, 3), None), ((1.5, 0), None),
                                            (None, -1.0), (None, float("nan"))])
def test_bad_window_or_softcap_raises(window, softcap):
    q, k, v = make_qkv(1, 1, 1, 4, 4, 2, seed=92)
    with pytest.raises(ValueError, match="window|softcap"):
        reference.attention_forward(q, k, v, window=window, softcap=softcap)


@pytest.mark.parametrize("window,softcap", [((3, 2), None), ((-1, 0), 2.0), ((4, -1), 0.7), (None, 1.5)],
                         ids=["window", "window-causal-cap", "left-cap", "cap"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_api_window_and_softcap_match_oracle_and_gradcheck(window, softcap, causal):
    """flash_ext.attention(window=, softcap=) on the CPU: output, LSE and float64 gradcheck."""
    q, k, v = make_qkv(1, 4, 2, 11, 14, 6, seed=151, requires_grad=True)
    o, lse = flash_ext.attention(q * 2, k, v, causal=causal, window=window, softcap=softcap, return_lse=True)
    want_o, want_lse = oracle(q * 2, k, v, causal, window=window, softcap=softcap)
    assert max_err(o, want_o) < TOL and max_err(lse, want_lse) < TOL

    def f(q, k, v):
        return flash_ext.attention(q, k, v, causal=causal, scale=0.9, window=window, softcap=softcap,
                                   return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=(1,)), "window must be"), (dict(window=(-2, 3)), "window must be"),
    (dict(window=(1.0, 2)), "window must be"), (dict(window=5), "window must be"),
    (dict(softcap=-1.0), "softcap must be"), (dict(softcap=float("inf")), "softcap must be"),
    (dict(softcap=True), "softcap must be"),
])
def test_api_bad_window_or_softcap_names_the_argument(kwargs, match):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, seed=152)
    with pytest.raises(ValueError, match=match):
        flash_ext.attention(q, k, v, **kwargs)
