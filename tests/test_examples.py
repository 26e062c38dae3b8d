"""The worked examples of flash_ext.explain, checked value by value."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flash_ext import explain

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- (a) ------

def test_block_matmul_inputs_are_the_consecutive_integers():
    a = explain.block_matmul_example()
    assert a["q"].flatten().tolist() == list(range(1, 17))
    assert a["k"].flatten().tolist() == list(range(17, 33))


def test_block_matmul_equals_expected_product_bit_for_bit():
    a = explain.block_matmul_example()
    expected = torch.tensor(
        [[250, 260, 270, 280], [618, 644, 670, 696], [986, 1028, 1070, 1112], [1354, 1412, 1470, 1528]],
        dtype=torch.float64)
    assert a["tiled"].dtype == torch.float64
    assert torch.equal(a["tiled"], expected)
    assert torch.equal(a["full"], expected)
    assert torch.equal(a["expected"], expected)


def test_block_matmul_steps_are_the_block_products_and_partial_sums():
    a = explain.block_matmul_example()
    q, k = a["q"], a["k"]
    steps = a["steps"]
    # 4 output blocks, 2 products each
    assert [(s["i"], s["j"], s["p"]) for s in steps] == [
        (i, j, p) for i in (1, 2) for j in (1, 2) for p in (1, 2)]

    def blk(m, i, j):
        return m[2 * (i - 1):2 * i, 2 * (j - 1):2 * j]

    for s in steps:
        i, j, p = s["i"], s["j"], s["p"]
        # each product computed independently here, by hand-written sums
        want = torch.tensor([[sum(blk(q, i, p)[r, t].item() * blk(k, p, j)[t, c].item() for t in range(2))
                              for c in range(2)] for r in range(2)], dtype=torch.float64)
        assert torch.equal(s["product"], want)
    by_block = {}
    for s in steps:
        by_block.setdefault((s["i"], s["j"]), []).append(s)
    for (i, j), ss in by_block.items():
        assert torch.equal(ss[0]["partial"], ss[0]["product"])
        assert torch.equal(ss[1]["partial"], ss[0]["product"] + ss[1]["product"])
        assert torch.equal(ss[1]["partial"], blk(q @ k, i, j))


def test_block_matmul_known_block_values():
    steps = {(s["i"], s["j"], s["p"]): s for s in explain.block_matmul_example()["steps"]}
    # C11 = Q11 K11 + Q12 K21
    assert steps[1, 1, 1]["product"].tolist() == [[59, 62], [211, 222]]
    assert steps[1, 1, 2]["product"].tolist() == [[191, 198], [407, 422]]
    assert steps[1, 1, 2]["partial"].tolist() == [[250, 260], [618, 644]]
    assert steps[2, 2, 2]["partial"].tolist() == [[1070, 1112], [1470, 1528]]


def test_block_matmul_is_q_times_k_not_k_transposed():
    a = explain.block_matmul_example()
    assert not torch.equal(a["tiled"], a["q"] @ a["k"].T)


def test_block_matmul_other_inputs_and_block_size():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-9, 10, (6, 4), generator=g).tolist()
    k = torch.randint(-9, 10, (4, 8), generator=g).tolist()
    a = explain.block_matmul_example(q, k, block=2)
    assert torch.equal(a["tiled"], torch.tensor(q, dtype=torch.float64) @ torch.tensor(k, dtype=torch.float64))
    assert len(a["steps"]) == 3 * 4 * 2
    assert a["expected"] is None


def test_split_blocks_rejects_uneven_split():
    with pytest.raises(ValueError, match="3x3"):
        explain.split_blocks(torch.zeros(4, 4), 3)


# ---------------------------------------------------------------- (b) ------

def test_online_softmax_steps():
    b = explain.online_softmax_example()
    s1, s2 = b["steps"]
    e = math.exp
    # block 1: its own max 3, its sum e^-2 + e^-1 + 1
    assert s1["m"].item() == 3.0
    assert s1["block_max"].item() == 3.0
    assert s1["l"].item() == pytest.approx(e(-2) + e(-1) + 1, rel=1e-15)
    assert s1["alpha"].item() == 0.0          # nothing before it to rescale
    # block 2 raises the max to 6 and rescales block 1's sum by e^(3-6)
    assert s2["m"].item() == 6.0
    assert s2["alpha"].item() == pytest.approx(e(3 - 6), rel=1e-15)
    assert s2["l"].item() == pytest.approx(e(-3) * (e(-2) + e(-1) + 1) + (e(-2) + e(-1) + 1), rel=1e-15)
    assert s2["l"].item() == pytest.approx(sum(e(x - 6) for x in range(1, 7)), rel=1e-15)
    assert s2["acc"].tolist() == pytest.approx([e(x - 6) for x in range(1, 7)], rel=1e-15)


def test_online_softmax_equals_full_softmax():
    b = explain.online_softmax_example()
    x = torch.arange(1, 7, dtype=torch.float64)
    assert torch.equal(b["full"], torch.softmax(x, dim=0))
    assert (b["online"] - torch.softmax(x, dim=0)).abs().max().item() <= 4 * torch.finfo(torch.float64).eps
    assert b["max_diff"] <= 4 * torch.finfo(torch.float64).eps
    exact = [math.exp(v) / sum(math.exp(u) for u in range(1, 7)) for v in range(1, 7)]
    assert b["online"].tolist() == pytest.approx(exact, rel=1e-14, abs=0)


def test_online_softmax_four_decimal_values():
    b = explain.online_softmax_example()
    want = [0.0043, 0.0116, 0.0315, 0.0858, 0.2331, 0.6337]
    assert explain.round4(b["online"]) == want
    assert explain.round4(b["full"]) == want
    assert explain.SOFTMAX_4DP == want


@pytest.mark.parametrize("block", [1, 2, 4, 5, 6])
def test_online_softmax_other_block_sizes(block):
    x = torch.randn(11, dtype=torch.float64, generator=torch.Generator().manual_seed(block)) * 5
    b = explain.online_softmax_example(x.tolist(), block=block)
    assert len(b["steps"]) == math.ceil(11 / block)
    assert b["max_diff"] <= 8 * torch.finfo(torch.float64).eps
    assert b["steps"][-1]["m"].item() == x.max().item()


def test_hand_worked_numbers_differ_where_claimed():
    h = explain.hand_worked_comparison()
    exact = [0.0043, 0.0116, 0.0315, 0.0858, 0.2331, 0.6337]
    blocks = [0.0042, 0.0116, 0.0316, 0.0857, 0.2328, 0.6345]
    full = [0.0043, 0.0116, 0.0316, 0.0856, 0.2330, 0.6344]
    assert h["exact_4dp"] == exact
    assert h["hand_blocks_4dp"] == blocks and h["hand_full_4dp"] == full
    assert h["blocks_differ_at"] == [0, 2, 3, 4, 5]
    assert h["full_differ_at"] == [2, 3, 4, 5]
    # each often-printed list is off the exact one by more than four-place rounding
    assert max(abs(a - b) for a, b in zip(blocks, exact)) > 0.00005
    assert max(abs(a - b) for a, b in zip(full, exact)) > 0.00005
    # and neither can be a rounded softmax: the sums are off by more than 6 * 0.00005
    assert abs(h["blocks_sum"] - 1) > h["max_rounding_drift"]
    assert abs(h["full_sum"] - 1) > h["max_rounding_drift"]
    assert abs(sum(exact) - 1) <= h["max_rounding_drift"]


def test_hand_worked_slips():
    h = explain.hand_worked_comparison()
    assert round(h["sum_exp"], 2) == 636.63
    assert round(h["e6_over_sum"], 4) == 0.6337
    assert round(math.exp(6) / 636.63, 4) == 0.6337
    assert round(h["e6_over_sum"], 4) not in (0.6344, 0.6345)


# ---------------------------------------------------------------- (c) ------

@pytest.mark.parametrize("causal", [False, True])
def test_attention_example_matches_untiled(causal):
    r = explain.attention_example(causal=causal)
    q, k, v, scale = r["q"], r["k"], r["v"], r["scale"]
    s = scale * (q @ k.T)
    if causal:
        s = s.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), -math.inf)
    assert torch.allclose(r["out"], torch.softmax(s, -1) @ v, rtol=0, atol=1e-13)
    assert torch.allclose(r["lse"], torch.logsumexp(s, -1), rtol=0, atol=1e-13)
    assert r["max_diff"] < 1e-13
    if causal:
        assert r["out"][0].tolist() == v[0].tolist()   # row 0 sees only key 0


def test_attention_example_tiles_of_one_and_three():
    for block in (1, 3):
        assert explain.attention_example(causal=True, block=block)["max_diff"] < 1e-13


# ------------------------------------------------------------- checks ------

def test_run_checks_all_pass():
    checks = explain.run_checks()
    assert len(checks) == 3
    assert all(ok for _, ok, _ in checks), checks


def test_main_returns_nonzero_when_a_check_fails(monkeypatch, capsys):
    def broken_step(s, m, l):
        p, m_new, l_new, alpha = real_step(s, m, l)
        return p, m_new, l_new * 1.001, alpha

    real_step = explain.reference.online_softmax_step
    monkeypatch.setattr(explain.reference, "online_softmax_step", broken_step)
    assert explain.main() == 1
    assert "FAILED" in capsys.readouterr().out


def test_main_returns_zero(capsys):
    assert explain.main() == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out
    assert "[0.0043, 0.0116, 0.0315, 0.0858, 0.2331, 0.6337]" in out


def test_module_runs_as_script():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "flash_ext.explain"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for text in ("C11 = Q11K11 + Q12K21", "Q @ K", "running max m", "running sum l", "rescale alpha",
                 "1354   1412   1470   1528", "0.0043, 0.0116, 0.0315, 0.0858, 0.2331, 0.6337",
                 "0.0042, 0.0116, 0.0316, 0.0857, 0.2328, 0.6345",
                 "0.0043, 0.0116, 0.0316, 0.0856, 0.2330, 0.6344"):
        assert text in out, text
    assert out.count("[ok]") == 3 and "FAILED" not in out
