"""Two worked examples of the ideas behind FlashAttention, computed step by step.

Run as ``python -m flash_ext.explain``.

(a) A matrix product computed block by block: the 4x4 product Q @ K as a sum
    of products of 2x2 blocks, C11 = Q11 K11 + Q12 K21 and so on. Attention
    never holds all of Q Kᵀ at once; it works on one tile of it at a time, and
    this is the rule that makes that possible.
(b) A softmax computed online, block by block, with
    flash_ext.reference.online_softmax_step, the same step the tiled forward
    uses: a running max, a running sum, and a rescale factor that corrects
    what was summed before whenever the max grows.
(c) Both ideas together: a tiny attention through flash_ext.reference with
    tiles of 2 against the untiled softmax(scale · Q Kᵀ) V.

Each example ends with a check that the tiled result equals the full one:
bit for bit for (a) (small integers are exact in float64) and to float64
rounding for (b) and (c). The module exits non-zero if a check fails.

The functions return the values they compute, so that tests can call them;
main() prints.
"""

import math
import sys

import torch

from . import reference

DTYPE = torch.float64

# (a) the block matrix product
Q_EXAMPLE = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
K_EXAMPLE = [[17, 18, 19, 20], [21, 22, 23, 24], [25, 26, 27, 28], [29, 30, 31, 32]]
QK_EXPECTED = [
    [250, 260, 270, 280],
    [618, 644, 670, 696],
    [986, 1028, 1070, 1112],
    [1354, 1412, 1470, 1528],
]

# (b) the online softmax
X_EXAMPLE = [1, 2, 3, 4, 5, 6]
SOFTMAX_4DP = [0.0043, 0.0116, 0.0315, 0.0858, 0.2331, 0.6337]
# Values often printed for this example when it is worked by hand; both lists
# carry small arithmetic slips (see hand_worked_comparison).
HAND_BLOCKS_4DP = [0.0042, 0.0116, 0.0316, 0.0857, 0.2328, 0.6345]
HAND_FULL_4DP = [0.0043, 0.0116, 0.0316, 0.0856, 0.2330, 0.6344]

# Float64 rounding: a few units in the last place of numbers of order 1.
FLOAT64_TOL = 8 * torch.finfo(DTYPE).eps


# ---------------------------------------------------------------- (a) ------

def split_blocks(m, size):
    """{(i, j): block} for the size x size blocks of m, i and j counted from 1."""
    rows, cols = m.shape
    if rows % size or cols % size:
        raise ValueError(f"a {rows}x{cols} matrix does not split into {size}x{size} blocks")
    return {
        (i // size + 1, j // size + 1): m[i:i + size, j:j + size]
        for i in range(0, rows, size)
        for j in range(0, cols, size)
    }


def block_matmul_example(q=None, k=None, block=2):
    """C = Q @ K as a sum of block products, C_ij = sum_p Q_ip K_pj.

    Returns a dict with the inputs ('q', 'k'), their blocks, every step
    ('steps': one dict per block product with i, j, p, the product and the
    partial sum of C_ij after it), the assembled result ('tiled'), the plain
    product Q @ K ('full') and the expected values ('expected', None unless
    the default matrices are used).
    """
    use_default = q is None and k is None
    q = torch.tensor(Q_EXAMPLE if q is None else q, dtype=DTYPE)
    k = torch.tensor(K_EXAMPLE if k is None else k, dtype=DTYPE)
    if q.shape[1] != k.shape[0]:
        raise ValueError(f"cannot multiply {tuple(q.shape)} by {tuple(k.shape)}")
    qb, kb = split_blocks(q, block), split_blocks(k, block)
    n_i, n_p, n_j = q.shape[0] // block, q.shape[1] // block, k.shape[1] // block

    tiled = torch.empty((q.shape[0], k.shape[1]), dtype=DTYPE)
    steps = []
    for i in range(1, n_i + 1):
        for j in range(1, n_j + 1):
            partial = torch.zeros((block, block), dtype=DTYPE)
            for p in range(1, n_p + 1):
                product = torch.matmul(qb[(i, p)], kb[(p, j)])
                partial = partial + product
                steps.append({"i": i, "j": j, "p": p, "product": product, "partial": partial})
            tiled[(i - 1) * block:i * block, (j - 1) * block:j * block] = partial
    return {
        "q": q,
        "k": k,
        "q_blocks": qb,
        "k_blocks": kb,
        "steps": steps,
        "tiled": tiled,
        "full": torch.matmul(q, k),
        "expected": torch.tensor(QK_EXPECTED, dtype=DTYPE) if use_default else None,
    }


# ---------------------------------------------------------------- (b) ------

def online_softmax_example(x=None, block=3):
    """softmax(x) computed online, `block` entries at a time.

    Each block goes through reference.online_softmax_step. The running vector
    of unnormalised probabilities plays the part of attention's output
    accumulator: it is multiplied by the rescale factor alpha = e^(m_old - m_new)
    before the new block's probabilities exp(x - m_new) are appended.

    Returns a dict with 'x', 'steps' (per block: its values, the block's own
    max, the running max m, running sum l, alpha, the block's probabilities p
    and the accumulator after the block), 'online' (the accumulator divided by
    the final sum), 'full' (torch.softmax of all of x at once), 'direct'
    (exp(x - max) / sum, written out) and 'max_diff' (max |online - full|).
    """
    x = torch.tensor(X_EXAMPLE if x is None else x, dtype=DTYPE)
    m = torch.tensor(-math.inf, dtype=DTYPE)
    l = torch.tensor(0.0, dtype=DTYPE)
    acc = torch.zeros(0, dtype=DTYPE)
    steps = []
    for start in range(0, x.numel(), block):
        s = x[start:start + block]
        p, m, l, alpha = reference.online_softmax_step(s, m, l)
        acc = torch.cat([alpha * acc, p])
        steps.append({
            "start": start,
            "values": s,
            "block_max": s.max(),
            "m": m,
            "l": l,
            "alpha": alpha,
            "p": p,
            "acc": acc,
        })
    online = acc / l
    full = torch.softmax(x, dim=0)
    e = torch.exp(x - x.max())
    direct = e / e.sum()
    return {
        "x": x,
        "steps": steps,
        "online": online,
        "full": full,
        "direct": direct,
        "max_diff": (online - full).abs().max().item(),
        "max_diff_direct": (online - direct).abs().max().item(),
    }


def round4(t):
    """Round to four decimal places, as a list of Python floats."""
    return [round(v, 4) for v in t.tolist()]


def hand_worked_comparison():
    """Where the often-printed hand-worked numbers differ from the exact ones.

    Returns a dict with the exact softmax of X_EXAMPLE to four places, the
    indices where each hand-worked list differs from it, the sums of the
    hand-worked lists (four-place values of a true softmax can add up to
    1 ± 6·0.00005 at most), the sum of e^1..e^6 and e^6 divided by it.
    """
    exact = round4(online_softmax_example()["full"])
    e = torch.exp(torch.tensor(X_EXAMPLE, dtype=DTYPE))
    total = e.sum().item()
    return {
        "exact_4dp": exact,
        "hand_blocks_4dp": list(HAND_BLOCKS_4DP),
        "hand_full_4dp": list(HAND_FULL_4DP),
        "blocks_differ_at": [i for i, (a, b) in enumerate(zip(HAND_BLOCKS_4DP, exact)) if a != b],
        "full_differ_at": [i for i, (a, b) in enumerate(zip(HAND_FULL_4DP, exact)) if a != b],
        "blocks_sum": sum(HAND_BLOCKS_4DP),
        "full_sum": sum(HAND_FULL_4DP),
        "max_rounding_drift": len(X_EXAMPLE) * 0.00005,
        "sum_exp": total,
        "e6_over_sum": math.exp(6) / total,
    }


# ---------------------------------------------------------------- (c) ------

def attention_example(causal=False, block=2):
    """A 4x4 attention through the tiled reference against the untiled formula.

    Q and K are the matrices of example (a), divided by 16 and 32 to keep the
    scores small; V is 0..15 in rows. The reference runs with tiles of
    `block` rows and keys; the oracle is softmax(scale · Q Kᵀ) V with the
    whole score matrix at once (and, when causal, the bottom-right mask
    j <= i + Nk - Nq). Returns a dict with 'out', 'lse', 'oracle_out',
    'oracle_lse', 'scores' and 'max_diff' (over output and LSE).
    """
    q = torch.tensor(Q_EXAMPLE, dtype=DTYPE) / 16
    k = torch.tensor(K_EXAMPLE, dtype=DTYPE) / 32
    v = torch.arange(16, dtype=DTYPE).reshape(4, 4)
    scale = reference.default_scale(q.shape[-1])
    out, lse = reference.attention_forward(q[None, None], k[None, None], v[None, None],
                                           causal=causal, scale=scale, block_q=block, block_k=block)
    out, lse = out[0, 0], lse[0, 0]

    scores = scale * (q @ k.T)
    if causal:
        nq, nk = q.shape[0], k.shape[0]
        i = torch.arange(nq)[:, None]
        j = torch.arange(nk)[None, :]
        scores = scores.masked_fill(~(j <= i + nk - nq), -math.inf)
    oracle_out = torch.softmax(scores, dim=-1) @ v
    oracle_lse = torch.logsumexp(scores, dim=-1)
    max_diff = max((out - oracle_out).abs().max().item(), (lse - oracle_lse).abs().max().item())
    return {
        "q": q, "k": k, "v": v, "scale": scale, "causal": causal, "block": block,
        "scores": scores, "out": out, "lse": lse,
        "oracle_out": oracle_out, "oracle_lse": oracle_lse, "max_diff": max_diff,
    }


# ------------------------------------------------------------- checks ------

def run_checks():
    """[(name, ok, detail)] for every example."""
    a = block_matmul_example()
    b = online_softmax_example()
    c = [attention_example(causal=False), attention_example(causal=True)]
    # Output values reach 15, so allow float64 rounding relative to that.
    c_tol = 16 * FLOAT64_TOL
    return [
        ("(a) tiled Q @ K equals the full product bit for bit",
         torch.equal(a["tiled"], a["full"]) and torch.equal(a["full"], a["expected"]),
         f"max |tiled - full| = {(a['tiled'] - a['full']).abs().max().item():g}"),
        ("(b) online softmax equals the full softmax to float64 rounding",
         b["max_diff"] <= FLOAT64_TOL and round4(b["online"]) == SOFTMAX_4DP,
         f"max |online - full| = {b['max_diff']:.3g} (tolerance {FLOAT64_TOL:.3g})"),
        ("(c) tiled attention equals softmax(scale Q Kᵀ) V to float64 rounding",
         all(r["max_diff"] <= c_tol for r in c),
         "max diff: " + ", ".join(f"{'causal' if r['causal'] else 'full'} {r['max_diff']:.3g}" for r in c)
         + f" (tolerance {c_tol:.3g})"),
    ]


# ------------------------------------------------------------- output ------

def _fmt_matrix(m, width=6, fmt="{:.0f}", indent="    "):
    return "\n".join(indent + "[" + " ".join(fmt.format(v).rjust(width) for v in row) + " ]"
                     for row in m.tolist())


def _fmt_vector(t, fmt="{:.4f}"):
    return "[" + ", ".join(fmt.format(v) for v in t.tolist()) + "]"


def print_block_matmul(a):
    print("=" * 78)
    print("(a) A matrix product, block by block")
    print("=" * 78)
    print("Q and K are 4x4, split into 2x2 blocks. This example computes the plain")
    print("matrix product Q @ K (Q times K as written, not the Q Kᵀ of attention;")
    print("the block rule is the same for any product):")
    print("    C_ij = Q_i1 K_1j + Q_i2 K_2j,   e.g. C11 = Q11 K11 + Q12 K21")
    print("\nQ =")
    print(_fmt_matrix(a["q"]))
    print("K =")
    print(_fmt_matrix(a["k"]))
    print("\nBlocks:")
    for (i, j), blk in a["q_blocks"].items():
        print(f"  Q{i}{j} =")
        print(_fmt_matrix(blk, indent="      "))
    for (i, j), blk in a["k_blocks"].items():
        print(f"  K{i}{j} =")
        print(_fmt_matrix(blk, indent="      "))
    print()
    for st in a["steps"]:
        i, j, p = st["i"], st["j"], st["p"]
        print(f"C{i}{j}, step {p}: Q{i}{p} K{p}{j} =")
        print(_fmt_matrix(st["product"], indent="      "))
        terms = " + ".join(f"Q{i}{q}K{q}{j}" for q in range(1, p + 1))
        print(f"    partial sum C{i}{j} = {terms} =")
        print(_fmt_matrix(st["partial"], indent="      "))
    print("\nAssembled from the blocks:")
    print(_fmt_matrix(a["tiled"]))
    print("Full product Q @ K in one call:")
    print(_fmt_matrix(a["full"]))
    same = torch.equal(a["tiled"], a["full"])
    print(f"Identical bit for bit: {same} (small integers are exact in float64).")


def print_online_softmax(b):
    print()
    print("=" * 78)
    print("(b) A softmax, computed online in blocks of three")
    print("=" * 78)
    print(f"x = {_fmt_vector(b['x'], '{:g}')}")
    print("Each block goes through flash_ext.reference.online_softmax_step:")
    print("    m_new = max(m, max(block)),  alpha = e^(m - m_new),  p = e^(block - m_new)")
    print("    l_new = alpha·l + sum(p),    acc = [alpha·acc, p]")
    print("alpha rescales everything summed before the block to the new max.\n")
    prev_m = None
    for n, st in enumerate(b["steps"], 1):
        print(f"Block {n}: x[{st['start']}:{st['start'] + st['values'].numel()}] = {_fmt_vector(st['values'], '{:g}')}"
              f", its own max {st['block_max'].item():g}")
        if prev_m is None:
            print(f"  first block: nothing to rescale (m was -inf, alpha = e^(-inf) = {st['alpha'].item():g})")
        else:
            print(f"  the max rises from {prev_m:g} to {st['m'].item():g}: earlier sum and"
                  f" probabilities are multiplied by alpha = e^({prev_m:g} - {st['m'].item():g})")
        print(f"  p        = e^(x - {st['m'].item():g}) = {_fmt_vector(st['p'], '{:.6f}')}")
        print(f"  running max m   = {st['m'].item():g}")
        print(f"  running sum l   = {st['l'].item():.6f}")
        print(f"  rescale alpha   = {st['alpha'].item():.6f}")
        print(f"  accumulator     = {_fmt_vector(st['acc'], '{:.6f}')}")
        prev_m = st["m"].item()
    print()
    print(f"online = accumulator / l = {_fmt_vector(b['online'], '{:.17f}')}")
    print(f"full   = softmax(x)      = {_fmt_vector(b['full'], '{:.17f}')}")
    print(f"to four places: online {_fmt_vector(b['online'])}")
    print(f"                full   {_fmt_vector(b['full'])}")
    print(f"max |online - full|        = {b['max_diff']:.3g}")
    print(f"max |online - e^x/sum e^x| = {b['max_diff_direct']:.3g}")
    h = hand_worked_comparison()
    print()
    print("Note: hand-worked versions of this example often print")
    print(f"    {_fmt_list(h['hand_blocks_4dp'])} for the blocks and")
    print(f"    {_fmt_list(h['hand_full_4dp'])} for the full softmax,")
    print("and blame rounding for the gap between them. Both lists carry small")
    print(f"arithmetic slips: the sum of e^1..e^6 is {h['sum_exp']:.2f}, and e^6/{h['sum_exp']:.2f}"
          f" is {h['e6_over_sum']:.4f}.")
    print(f"Their entries add up to {h['blocks_sum']:.4f} and {h['full_sum']:.4f}, while the four-place")
    print(f"values of a true softmax of six numbers add up to 1 within ±{h['max_rounding_drift']:.4f}.")
    print(f"The exact computation, in blocks or all at once, gives {_fmt_list(h['exact_4dp'])}:")
    print("there is no gap at all between the online and the full softmax.")


def _fmt_list(values):
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def print_attention(results):
    print()
    print("=" * 78)
    print("(c) Both together: tiled attention with tiles of 2")
    print("=" * 78)
    r0 = results[0]
    print("Q = (Q of (a)) / 16, K = (K of (a)) / 32, V = 0..15 in rows;"
          f" scale = 1/sqrt(4) = {r0['scale']:g}.")
    print("flash_ext.reference.attention_forward with block_q = block_k = 2 never forms the")
    print("4x4 score matrix: it visits 2x2 tiles of scale·Q Kᵀ, runs the online softmax")
    print("of (b) over them and rescales its output accumulator with the same alpha.")
    for r in results:
        kind = "causal (query i sees key j <= i + Nk - Nq)" if r["causal"] else "not causal"
        print(f"\n{kind}:")
        print("  tiled output =")
        print(_fmt_matrix(r["out"], width=10, fmt="{:.6f}", indent="    "))
        print(f"  tiled LSE    = {_fmt_vector(r['lse'], '{:.6f}')}")
        print(f"  max |tiled - softmax(scale Q Kᵀ) V| over output and LSE = {r['max_diff']:.3g}")


def main():
    torch.set_printoptions(precision=6)
    a = block_matmul_example()
    b = online_softmax_example()
    c = [attention_example(causal=False), attention_example(causal=True)]
    print_block_matmul(a)
    print_online_softmax(b)
    print_attention(c)
    print()
    print("=" * 78)
    print("Checks")
    print("=" * 78)
    ok = True
    for name, passed, detail in run_checks():
        ok &= bool(passed)
        print(f"[{'ok' if passed else 'FAILED'}] {name}: {detail}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
