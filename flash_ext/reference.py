"""FlashAttention in plain PyTorch, tile by tile: the executable specification.

Layout is SDPA's: q is (B, Hq, Nq, D), k and v are (B, Hkv, Nk, D), with Hq a
multiple of Hkv (GQA/MQA: query head h reads key/value head h // (Hq // Hkv)).

Forward, for one tile of query rows:

    m = -inf, l = 0, acc = 0                      # running row max, row sum, output
    for each key/value tile j:
        S = scale · Q Kⱼᵀ                         (masked entries are -inf)
        m_new = max(m, rowmax S)
        α = exp(m - m_new)                        rescales what came before
        P = exp(S - m_new)
        l = α·l + rowsum P
        acc = α·acc + P Vⱼ
        m = m_new
    O = acc / l,  LSE = m + log l

Backward recomputes P tile by tile from the LSE saved by the forward:

    D = rowsum(dO ∘ O)
    P = exp(scale · Q Kᵀ - LSE)
    dV += Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP - D)
    dQ += scale · dS K,  dK += scale · dSᵀ Q

Which keys a query sees, with diag = Nk - Nq (aligned to the bottom-right corner):
causal, key j when j <= i + diag; a window (left, right), keys i + diag - left to
i + diag + right, -1 leaving that side unbounded (causal and a window: both hold).
Key tiles that no row of a query tile sees are skipped, and query tiles likewise
in the backward. A row that sees no key has output 0 and LSE -inf.

Soft-capping (softcap > 0) replaces each score s by softcap · tanh(s / softcap)
before the softmax; its gradient multiplies dS by 1 - tanh².

Low-precision inputs (fp16, bf16) are computed tile by tile in float32 and the
results cast back; float32 and float64 inputs are computed in their own dtype.
The LSE is float32 for every low-precision input, else the input's dtype.
"""

import math

import torch

DEFAULT_BLOCK = 64


def compute_dtype(dtype):
    """The dtype the reference accumulates in for inputs of `dtype`."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def default_scale(head_dim):
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def band(causal, window):
    """(left, right), each None when unbounded: query i sees keys j with
    i + diag - left <= j <= i + diag + right. window is (left, right) with -1 for
    unbounded, or None; causal caps right at 0."""
    left, right = (-1, -1) if window is None else window
    left, right = (None if left < 0 else left), (None if right < 0 else right)
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def visible_mask(q_start, q_end, k_start, k_end, nq, nk, device, causal=False, window=None):
    """(q_end - q_start, k_end - k_start) bool: True where query i (a global row) sees key j."""
    left, right = band(causal, window)
    rows = torch.arange(q_start, q_end, device=device)[:, None]
    cols = torch.arange(k_start, k_end, device=device)[None, :]
    offset = cols - (rows + (nk - nq))  # j - (i + diag)
    mask = torch.ones_like(offset, dtype=torch.bool)
    if right is not None:
        mask &= offset <= right
    if left is not None:
        mask &= offset >= -left
    return mask


def causal_mask(q_start, q_end, k_start, k_end, nq, nk, device):
    """True where query i (global row) may see key j: j <= i + nk - nq."""
    return visible_mask(q_start, q_end, k_start, k_end, nq, nk, device, causal=True)


def visible_keys(q_start, q_end, nq, nk, causal=False, window=None):
    """[start, end): the keys that some row of q_start..q_end-1 sees (empty: start >= end)."""
    left, right = band(causal, window)
    diag = nk - nq
    start = 0 if left is None else max(0, q_start + diag - left)
    end = nk if right is None else max(0, min(nk, q_end - 1 + diag + right + 1))
    return start, end


def visible_queries(k_start, k_end, nq, nk, causal=False, window=None):
    """[start, end): the queries that see some key of k_start..k_end-1."""
    left, right = band(causal, window)
    diag = nk - nq
    start = 0 if right is None else max(0, k_start - diag - right)
    end = nq if left is None else max(0, min(nq, k_end - 1 - diag + left + 1))
    return start, end


def _masked_scores(q_tile, k_tile, scale, softcap, visible):
    """S = scale · Q Kᵀ, soft-capped, and -inf where not visible (None: all visible).
    Returns (S, tanh of the capped scores or None)."""
    s = _scores(q_tile, k_tile, scale)
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = softcap * t
    if visible is not None:
        s = s.masked_fill(~visible, -math.inf)
    return s, t


def _group_queries(x, hkv):
    """(B, Hq, N, D) -> (B, Hkv, G, N, D): the G query heads sharing one K/V head."""
    b, hq, n, d = x.shape
    return x.reshape(b, hkv, hq // hkv, n, d)


def _scores(q_tile, k_tile, scale):
    # S = scale · Q Kᵀ; q_tile (B, Hkv, G, Bq, D), k_tile (B, Hkv, Bk, D) -> (B, Hkv, G, Bq, Bk)
    return torch.einsum("bhgqd,bhkd->bhgqk", q_tile, k_tile) * scale


def online_softmax_step(s, m, l):
    """One block of the online softmax over the last dim of s.

    m, l are the running row max and row sum over the blocks seen so far.
    Returns (p, m_new, l_new, alpha): the block's unnormalised probabilities
    exp(s - m_new), the new running max and sum, and alpha = exp(m - m_new),
    the factor that rescales everything accumulated before this block.
    A row whose entries are all -inf so far keeps m = -inf, l = 0, p = 0.
    """
    m_new = torch.maximum(m, s.amax(dim=-1))
    m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m - m_safe)
    p = torch.exp(s - m_safe[..., None])
    l_new = alpha * l + p.sum(dim=-1)
    return p, m_new, l_new, alpha


def _problem(q, k, v, scale, block_q, block_k, window=None, softcap=None):
    """Check the shapes, tile sizes, window and cap; return the sizes (b, hq, nq, d, hkv, nk, g),
    the scale and the accumulation dtype shared by the forward and the backward."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("reference: q, k, v must be 4-D (batch, heads, seqlen, head_dim)")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"reference: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"reference: Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    if block_q < 1 or block_k < 1:
        raise ValueError("reference: tile sizes must be at least 1")
    if window is not None and (len(window) != 2 or any(int(w) != w or w < -1 for w in window)):
        raise ValueError(f"reference: window must be (left, right), integers >= -1 (-1: unbounded), got {window}")
    if softcap is not None and not softcap >= 0:
        raise ValueError(f"reference: softcap must be >= 0 (0 or None: off), got {softcap}")
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = default_scale(d) if scale is None else float(scale)
    return (b, hq, nq, d, hkv, nk, hq // hkv), scale, compute_dtype(q.dtype)


def attention_forward(q, k, v, *, causal=False, scale=None, window=None, softcap=None,
                      block_q=DEFAULT_BLOCK, block_k=DEFAULT_BLOCK):
    """Tiled forward. Returns (O in q's dtype, LSE (B, Hq, Nq) in natural log)."""
    (b, hq, nq, d, hkv, nk, g), scale, acc_dtype = _problem(q, k, v, scale, block_q, block_k, window, softcap)
    masked = causal or band(causal, window) != (None, None)

    qg = _group_queries(q, hkv)
    out = torch.empty((b, hkv, g, nq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hkv, g, nq), dtype=acc_dtype, device=q.device)

    for q0 in range(0, nq, block_q):
        q1 = min(q0 + block_q, nq)
        q_tile = qg[:, :, :, q0:q1].to(acc_dtype)
        m = torch.full((b, hkv, g, q1 - q0), -math.inf, dtype=acc_dtype, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros((b, hkv, g, q1 - q0, d), dtype=acc_dtype, device=q.device)
        # Key tiles that no row of this tile sees are never visited.
        k_start, k_end = visible_keys(q0, q1, nq, nk, causal, window)
        for k0 in range((k_start // block_k) * block_k, k_end, block_k):
            k1 = min(k0 + block_k, nk)
            visible = visible_mask(q0, q1, k0, k1, nq, nk, q.device, causal, window) if masked else None
            s, _ = _masked_scores(q_tile, k[:, :, k0:k1].to(acc_dtype), scale, softcap, visible)
            p, m, l, alpha = online_softmax_step(s, m, l)
            # O = α·O + P V
            acc = alpha[..., None] * acc + torch.einsum("bhgqk,bhkd->bhgqd", p, v[:, :, k0:k1].to(acc_dtype))
        seen = l > 0
        l_safe = torch.where(seen, l, torch.ones_like(l))
        out[:, :, :, q0:q1] = (acc / l_safe[..., None]).to(q.dtype)
        lse[:, :, :, q0:q1] = torch.where(seen, m + torch.log(l_safe), torch.full_like(m, -math.inf))
    return out.reshape(b, hq, nq, d), lse.reshape(b, hq, nq)


def attention_backward(do, q, k, v, o, lse, *, causal=False, scale=None, window=None, softcap=None, dlse=None,
                       block_q=DEFAULT_BLOCK, block_k=DEFAULT_BLOCK):
    """Tiled backward from the forward's O and LSE. Returns (dQ, dK, dV) in the inputs' dtype.

    dlse, if given, is the gradient flowing into the LSE output. Since
    dLSEᵢ/dSᵢⱼ = Pᵢⱼ, it enters as dS = P ∘ (dP - (D - dLSE)): only D changes.
    """
    (b, hq, nq, d, hkv, nk, g), scale, acc_dtype = _problem(q, k, v, scale, block_q, block_k, window, softcap)
    masked = causal or band(causal, window) != (None, None)

    qg = _group_queries(q, hkv)
    dog = _group_queries(do, hkv)
    # D = rowsum(dO ∘ O), (B, Hkv, G, Nq)
    delta = (dog.to(acc_dtype) * _group_queries(o, hkv).to(acc_dtype)).sum(dim=-1)
    if dlse is not None:
        delta = delta - dlse.reshape(b, hkv, g, nq).to(acc_dtype)
    lse_g = lse.reshape(b, hkv, g, nq).to(acc_dtype)
    # A row that saw no key has LSE -inf and every score -inf: P = exp(-inf - 0) = 0.
    lse_g = torch.where(torch.isneginf(lse_g), torch.zeros_like(lse_g), lse_g)

    dq = torch.zeros((b, hkv, g, nq, d), dtype=acc_dtype, device=q.device)
    dk = torch.zeros((b, hkv, nk, d), dtype=acc_dtype, device=q.device)
    dv = torch.zeros_like(dk)

    for k0 in range(0, nk, block_k):
        k1 = min(k0 + block_k, nk)
        k_tile = k[:, :, k0:k1].to(acc_dtype)
        v_tile = v[:, :, k0:k1].to(acc_dtype)
        # Query tiles that see no key of this tile are never visited.
        q_start, q_end = visible_queries(k0, k1, nq, nk, causal, window)
        for q0 in range((q_start // block_q) * block_q, q_end, block_q):
            q1 = min(q0 + block_q, nq)
            q_tile = qg[:, :, :, q0:q1].to(acc_dtype)
            do_tile = dog[:, :, :, q0:q1].to(acc_dtype)
            visible = visible_mask(q0, q1, k0, k1, nq, nk, q.device, causal, window) if masked else None
            s, t = _masked_scores(q_tile, k_tile, scale, softcap, visible)
            # P = exp(S - LSE)
            p = torch.exp(s - lse_g[:, :, :, q0:q1, None])
            # dV += Pᵀ dO, summed over the query heads of the group
            dv[:, :, k0:k1] += torch.einsum("bhgqk,bhgqd->bhkd", p, do_tile)
            # dP = dO Vᵀ;  dS = P ∘ (dP - D)
            dp = torch.einsum("bhgqd,bhkd->bhgqk", do_tile, v_tile)
            ds = p * (dp - delta[:, :, :, q0:q1, None])
            if t is not None:  # through the cap: d(softcap · tanh(x / softcap)) / dx = 1 - tanh²
                ds = ds * (1 - t * t)
            # dQ += scale · dS K;  dK += scale · dSᵀ Q
            dq[:, :, :, q0:q1] += scale * torch.einsum("bhgqk,bhkd->bhgqd", ds, k_tile)
            dk[:, :, k0:k1] += scale * torch.einsum("bhgqk,bhgqd->bhkd", ds, q_tile)
    return dq.reshape(b, hq, nq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
