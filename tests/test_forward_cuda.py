"""The CUDA forward kernel against the float32 reference, with torch's own
low-precision error as the bar: error(flash_ext) <= 2 * error(SDPA math in the
same dtype) + a small absolute slack. Skipped without a GPU."""

import math
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_ext
from flash_ext import reference

from cuda_grid import (_C, ABS_SLACK, DTYPES, LENGTHS, SM90_HEAD_DIMS, forward_kernel,  # noqa: F401 (fixtures)
                       grid_batch_heads, on_hopper_with_sm90, over_grid, poison_outputs, rand)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_qkv(b, hq, hkv, nq, nk, d, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (rand(b, hq, nq, d, dtype=dtype, gen=gen), rand(b, hkv, nk, d, dtype=dtype, gen=gen),
            rand(b, hkv, nk, d, dtype=dtype, gen=gen))


def visible(nq, nk, causal):
    """Bottom-right causal mask (Nq, Nk): query i sees key j <= i + Nk - Nq."""
    if not causal:
        return torch.ones(nq, nk, dtype=torch.bool, device="cuda")
    return reference.causal_mask(0, nq, 0, nk, nq, nk, "cuda")


def torch_lowp(q, k, v, causal, scale):
    """torch's own attention in the inputs' low precision: SDPA's math backend
    with fp16/bf16 reductions, and the LSE from low-precision scores."""
    mask = visible(q.shape[2], k.shape[2], causal)
    gqa = q.shape[1] != k.shape[1]
    prev = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(prev)
    g = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(g, dim=1).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s.masked_fill(~mask, -math.inf), dim=-1).float()
    return o, lse


def check_forward(q, k, v, causal, scale=None):
    scale_value = reference.default_scale(q.shape[-1]) if scale is None else scale
    o, lse = flash_ext.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.dtype == torch.float32
    ref_o, ref_lse = reference.attention_forward(q.float(), k.float(), v.float(), causal=causal,
                                                 scale=scale_value, block_q=512, block_k=512)
    assert not torch.isnan(o).any(), "NaN in the output"
    assert not torch.isnan(lse).any(), "NaN in the LSE"

    seen = ~torch.isneginf(ref_lse)  # rows that see at least one key
    assert torch.equal(torch.isneginf(lse), ~seen), "LSE must be -inf exactly where a row sees no key"
    assert torch.all(o[~seen] == 0), "rows that see no key must give 0"

    t_o, t_lse = torch_lowp(q, k, v, causal, scale_value)
    err = (o.float() - ref_o)[seen].abs().max().item() if seen.any() else 0.0
    t_err = (t_o.float() - ref_o)[seen].abs().max().item() if seen.any() else 0.0
    assert err <= 2 * t_err + ABS_SLACK, f"output error {err:.3e} > 2 x torch's {t_err:.3e}"
    lse_err = (lse - ref_lse)[seen].abs().max().item() if seen.any() else 0.0
    t_lse_err = (t_lse - ref_lse)[seen].abs().max().item() if seen.any() else 0.0
    assert lse_err <= 2 * t_lse_err + ABS_SLACK, f"LSE error {lse_err:.3e} > 2 x torch's {t_lse_err:.3e}"
    return err, t_err


@over_grid
def test_forward_grid(dtype, d, causal, nq, nk):
    b, h = grid_batch_heads(nq, nk)
    seed = zlib.crc32(repr((dtype, d, causal, nq, nk)).encode())
    check_forward(*make_qkv(b, h, h, nq, nk, d, dtype, seed), causal)


# On a Hopper GPU the forward grid above runs the sm_90a kernel at these head dims (with its
# softmax overlap); the grid below runs the same cases on its other variant and on the sm_80
# kernel, so that neither goes untested there.


@on_hopper_with_sm90
@pytest.mark.parametrize("forward_kernel", [(True, True), (False, False)], ids=["sm80", "sm90_no_overlap"],
                         indirect=True)
@pytest.mark.parametrize("nq,nk", LENGTHS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", SM90_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_grid_other_kernels_on_hopper(forward_kernel, dtype, d, causal, nq, nk):
    b, h = grid_batch_heads(nq, nk)
    seed = zlib.crc32(repr((dtype, d, causal, nq, nk, "other")).encode())
    check_forward(*make_qkv(b, h, h, nq, nk, d, dtype, seed), causal)


@on_hopper_with_sm90
@pytest.mark.parametrize("forward_kernel", [(False, True), (False, False)], ids=["sm90", "sm90_no_overlap"],
                         indirect=True)
@pytest.mark.parametrize("b,hq,hkv,nq,nk,causal", [
    (4, 16, 4, 1000, 1100, False),  # 512 query blocks: several per SM
    (4, 16, 4, 1000, 1100, True),
    (2, 8, 8, 2100, 2100, True),    # 17 row blocks a head: longest first within a group of heads
    (3, 6, 2, 4097, 3000, True),    # Nq > Nk: the first rows see no key
])
@pytest.mark.parametrize("d", SM90_HEAD_DIMS)
def test_sm90_forward_takes_many_blocks_per_sm(forward_kernel, d, b, hq, hkv, nq, nk, causal):
    """The persistent kernel's thread blocks take query blocks until none are left."""
    seed = zlib.crc32(repr((d, b, hq, hkv, nq, nk, causal, "persistent")).encode())
    check_forward(*make_qkv(b, hq, hkv, nq, nk, d, torch.bfloat16, seed), causal)


def forward_kernel_names(q, k, v, **kwargs):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        flash_ext.attention(q, k, v, **kwargs)
        torch.cuda.synchronize()
    return " ".join(e.name for e in prof.events())


@on_hopper_with_sm90
def test_hopper_runs_the_sm90_forward_where_it_applies():
    """Exact head dims 64/128/256 run fwd_kernel_sm90, with windows and caps too; other head
    dims and the forced switch run the sm_80 kernels."""
    for d in SM90_HEAD_DIMS:
        q, k, v = make_qkv(1, 2, 2, 300, 300, d, torch.bfloat16, d)
        assert "fwd_kernel_sm90" in forward_kernel_names(q, k, v, causal=True)
        assert "fwd_kernel_sm90" in forward_kernel_names(q, k, v, window=(32, 0))
        assert "fwd_kernel_sm90" in forward_kernel_names(q, k, v, softcap=10.0)
        _C.set_force_sm80(True)
        try:
            names = forward_kernel_names(q, k, v)
        finally:
            _C.set_force_sm80(False)
        assert "fwd_kernel_sm90" not in names and "fwd_kernel_sm80" in names
    q, k, v = make_qkv(1, 2, 2, 300, 300, 96, torch.bfloat16, 96)
    assert "fwd_kernel_sm90" not in forward_kernel_names(q, k, v)
    q, k, v = make_qkv(1, 2, 2, 300, 300, 120, torch.bfloat16, 120)  # runs on 128 with padded columns
    assert "fwd_kernel_sm90" not in forward_kernel_names(q, k, v)


@on_hopper_with_sm90
@pytest.mark.parametrize("causal", [False, True])
def test_sm90_head_dim_256_takes_the_key_tile_that_multiplies_less(causal):
    """At head dim 256 the Hopper forward has two key tiles, 80 and 64 keys (FwdConfigSm90):
    64 where 80 multiplies enough more key columns (512 keys: 7 tiles of 80, the last with 32
    keys, against 8 of 64), 80 otherwise (2048). Both give the right answer."""
    tiles = {}
    for n in (512, 2048):
        q, k, v = make_qkv(16384 // n // 4, 4, 2, n, n, 256, torch.bfloat16, zlib.crc32(repr((n, causal)).encode()))
        names = forward_kernel_names(q, k, v, causal=causal)
        tiles[n] = {int(x) for x in re.findall(r"FwdTileSm90<256, (\d+),", names)}
        check_forward(q, k, v, causal)
    assert tiles == {512: {64}, 2048: {80}}, tiles


@on_hopper_with_sm90
@pytest.mark.parametrize("causal", [False, True])
def test_sm90_head_dim_64_takes_three_warpgroups_where_they_compute_few_more_scores(causal):
    """At head dim 64 the Hopper forward has query blocks of 128 (two consumer warpgroups)
    and of 192 (three), FwdConfigSm90: 192 where its blocks compute under 15/14 of 128's
    scores (without a mask from 2048; causal, where the diagonal masks less of each block,
    from about 8k, so 4097 with a ragged last block), 128 otherwise. Both give the right answer."""
    lengths = {False: (1024, 2048), True: (2048, 4097)}[causal]
    consumers = {}
    for n in lengths:
        q, k, v = make_qkv(1, 4, 2, n, n, 64, torch.bfloat16, zlib.crc32(repr((n, causal, 64)).encode()))
        names = forward_kernel_names(q, k, v, causal=causal)
        consumers[n] = {int(x) for x in re.findall(r"FwdTileSm90<64, 128, 2, (\d+),", names)}
        check_forward(q, k, v, causal)
    assert consumers == {lengths[0]: {2}, lengths[1]: {3}}, consumers


@on_hopper_with_sm90
@pytest.mark.parametrize("d", SM90_HEAD_DIMS)
def test_sm90_forward_then_backward(d):
    """The backward runs unchanged on the Hopper forward's O and LSE."""
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 4, 2, 333, 517, d, torch.bfloat16, 100 + d))
    do = torch.randn_like(q)
    out = flash_ext.attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), do)
    qf, kf, vf = (x.detach().float() for x in (q, k, v))
    ref_o, ref_lse = reference.attention_forward(qf, kf, vf, causal=True)
    want = reference.attention_backward(do.float(), qf, kf, vf, ref_o, ref_lse, causal=True)
    _C.set_force_sm80(True)
    try:
        grads80 = torch.autograd.grad(flash_ext.attention(q, k, v, causal=True), (q, k, v), do)
    finally:
        _C.set_force_sm80(False)
    for g, g80, w in zip(grads, grads80, want):
        assert not torch.isnan(g).any()
        err, err80 = (g.float() - w).abs().max().item(), (g80.float() - w).abs().max().item()
        assert err <= 2 * err80 + ABS_SLACK, f"gradient error {err:.3e} vs {err80:.3e} on the sm_80 forward"


@pytest.mark.parametrize("d", [40, 72, 136, 200])
def test_head_dims_between_compiled_sizes(d):
    """Any multiple of 8 runs on the next compiled size up."""
    check_forward(*make_qkv(2, 2, 2, 129, 200, d, torch.bfloat16, d), causal=True)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 1), (4, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(hq, hkv, causal):
    check_forward(*make_qkv(2, hq, hkv, 300, 257, 64, torch.bfloat16, hq * 10 + hkv), causal)


@pytest.mark.parametrize("b,hq,hkv,n,d", [(3, 13, 13, 2065, 128), (2, 40, 20, 2100, 256), (40, 1, 1, 1100, 256)])
def test_causal_longest_first_groups(b, hq, hkv, n, d):
    """Long causal rows launch longest first in groups of (batch, head) pairs: several groups,
    a smaller last one, GQA, and more pairs than one group holds."""
    check_forward(*make_qkv(b, hq, hkv, n, n - 7, d, torch.bfloat16, b * hq + n), causal=True)


def test_scale():
    for scale in (0.05, 1.0, -0.3, 0.0):
        check_forward(*make_qkv(1, 2, 2, 200, 333, 128, torch.float16, 7), causal=True, scale=scale)


@pytest.mark.parametrize("causal", [False, True])
def test_transposed_layout(causal):
    """(B, N, H, D) tensors viewed as (B, H, N, D) run without a copy, and O follows q's layout."""
    b, n, h, d = 2, 333, 4, 128
    gen = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (rand(b, n, h, d, dtype=torch.bfloat16, gen=gen).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    check_forward(q, k, v, causal)
    o = flash_ext.attention(q, k, v, causal=causal)
    assert o.stride() == q.stride()


def test_packed_qkv():
    """q, k, v as slices of one packed (B, N, 3, H, D) tensor."""
    gen = torch.Generator(device="cuda").manual_seed(12)
    qkv = rand(2, 257, 3, 4, 64, dtype=torch.float16, gen=gen)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    check_forward(q, k, v, causal=True)


def test_rows_that_see_no_key():
    """Causal with Nq > Nk: the first Nq - Nk rows see nothing: 0 and -inf."""
    q, k, v = make_qkv(1, 2, 2, 300, 100, 64, torch.bfloat16, 13)
    o, lse = flash_ext.attention(q, k, v, causal=True, return_lse=True)
    assert torch.all(o[:, :, :200] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :200]))
    assert torch.isfinite(lse[:, :, 200:]).all()
    check_forward(q, k, v, causal=True)


def test_empty_and_zero_length():
    q, k, v = make_qkv(1, 2, 2, 0, 50, 64, torch.bfloat16, 14)
    o, lse = flash_ext.attention(q, k, v, return_lse=True)
    assert o.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)
    q, k, v = make_qkv(1, 2, 2, 50, 0, 64, torch.bfloat16, 15)
    o, lse = flash_ext.attention(q, k, v, return_lse=True)
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))


def test_large_values_do_not_overflow():
    """Scores far beyond exp's range: the running max keeps the softmax finite."""
    q, k, v = make_qkv(1, 2, 2, 257, 300, 64, torch.bfloat16, 16)
    check_forward(q * 30, k * 30, v, causal=False)


def test_cuda_graph_capture():
    q, k, v = make_qkv(2, 4, 2, 256, 256, 64, torch.bfloat16, 17)
    expected = flash_ext.attention(q, k, v, causal=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        flash_ext.attention(q, k, v, causal=True)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_ext.attention(q, k, v, causal=True)
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, flash_ext.attention(q, k, v, causal=True))
    assert not torch.equal(out, expected)


def test_runs_on_current_stream():
    q, k, v = make_qkv(1, 4, 4, 512, 512, 128, torch.float16, 18)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        o = flash_ext.attention(q, k, v)
    stream.synchronize()
    assert torch.equal(o, flash_ext.attention(q, k, v))


@on_hopper_with_sm90
@pytest.mark.parametrize("causal", [False, True])
def test_sm90_forward_is_its_kernel_alone_on_the_gpu(causal):
    """A Hopper forward call puts its kernel on the GPU and nothing else: no memset of the
    block counter first (each launch leaves its stream's counter at zero for the next)."""
    _C.set_poison_outputs(False)  # the NaN fills are GPU work too
    q, k, v = make_qkv(1, 2, 2, 300, 300, 128, torch.bfloat16, 21)
    flash_ext.attention(q, k, v, causal=causal)  # the stream's counter, made once
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        flash_ext.attention(q, k, v, causal=causal)
        torch.cuda.synchronize()
    on_gpu = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(on_gpu) == 1 and "fwd_kernel_sm90" in on_gpu[0], on_gpu


@on_hopper_with_sm90
def test_sm90_forwards_on_two_streams_at_once_and_beside_a_graph():
    """Each stream has a block counter of its own, and a captured graph one more, zeroed at
    each replay: forwards on two streams at once, and a graph replayed on one stream while the
    stream it was captured on runs forwards, give the answer of a forward run alone (bit for
    bit; a block skipped or taken twice leaves NaN or a wrong row). The grids (32 and 24 query
    blocks) fit on the SMs together, so the kernels do run at once."""
    inputs = [make_qkv(1, 4, 2, 1000, 1000, 128, torch.bfloat16, 22),
              make_qkv(1, 4, 4, 700, 900, 64, torch.bfloat16, 23)]
    want = [flash_ext.attention(*x, causal=True) for x in inputs]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    got = [[], []]
    for _ in range(20):
        for i, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                got[i].append(flash_ext.attention(*inputs[i], causal=True))
    torch.cuda.synchronize()
    for i in range(2):
        assert all(torch.equal(o, want[i]) for o in got[i]), i

    capture = streams[0]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture):
        out = flash_ext.attention(*inputs[0], causal=True)
    eager = []
    for _ in range(20):
        graph.replay()  # on the current stream
        with torch.cuda.stream(capture):
            eager.append(flash_ext.attention(*inputs[0], causal=True))
    torch.cuda.synchronize()
    assert torch.equal(out, want[0])
    assert all(torch.equal(o, want[0]) for o in eager)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    q, k, v = (t.to("cuda:1") for t in make_qkv(1, 2, 2, 129, 129, 64, torch.bfloat16, 19))
    o = flash_ext.attention(q, k, v)
    assert o.device == q.device
    ref, _ = reference.attention_forward(q.float(), k.float(), v.float())
    assert (o.float() - ref).abs().max().item() < 2e-2


def test_repeatable_and_input_errors():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, torch.bfloat16, 20)
    assert torch.equal(flash_ext.attention(q, k, v), flash_ext.attention(q, k, v))
    with pytest.raises(TypeError, match="float16 or bfloat16.*cast"):
        flash_ext.attention(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="head_dim 100"):
        flash_ext.attention(*(torch.randn(1, 2, 8, 100, device="cuda", dtype=torch.bfloat16) for _ in range(3)))
    with pytest.raises(ValueError, match="head_dim 264"):
        flash_ext.attention(*(torch.randn(1, 2, 8, 264, device="cuda", dtype=torch.bfloat16) for _ in range(3)))
    big = torch.randn(1, 2, 8, 68, device="cuda", dtype=torch.bfloat16)  # row stride 68: not 16-byte aligned
    with pytest.raises(ValueError, match="k strides"):
        flash_ext.attention(q, big[..., :64], big[..., :64].contiguous())


def test_host_time_tool():
    """bench/host_time.py (the host's time per eager call, against SDPA's backends) runs: a
    row of four times per causal setting, and the kernels of one flash_ext call."""
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(repo / "bench" / "host_time.py"), "--calls", "20", "--shape", "1", "1",
                          "128", "64"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = re.findall(r"^\| 1 1 128 64 \| ([01]) \|(?: [\d.]+ \|){4}$", run.stdout, re.M)
    assert rows == ["0", "1"], run.stdout
    assert re.search(r"kernels of one flash_ext.attention call: \[.*fwd_kernel", run.stdout), run.stdout
