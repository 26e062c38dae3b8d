"""examples/train_gpt.py runs on the CPU at a tiny size, with both attention backends from the
same seed: the same data, losses that agree, its files written."""

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("train_gpt", ROOT / "examples" / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_train_gpt_tiny_on_cpu_both_backends_agree(tmp_path):
    train_gpt = load_example()
    tiny = ["--device", "cpu", "--steps", "4", "--batch", "2", "--context", "64", "--layers", "2", "--width", "64",
            "--heads", "2", "--text-mb", "0.25", "--eval-batches", "2", "--out", str(tmp_path)]
    ours = train_gpt.main(["--attention", "flash_ext"] + tiny)
    theirs = train_gpt.main(["--attention", "sdpa"] + tiny)
    assert len(ours["losses"]) == 4 and all(math.isfinite(x) for x in ours["losses"])
    assert abs(ours["losses"][0] - math.log(256)) < 0.5  # starts near uniform over bytes
    for a, b in zip(ours["losses"] + [ours["val_loss"]], theirs["losses"] + [theirs["val_loss"]]):
        assert abs(a - b) < 1e-4, (ours["losses"], theirs["losses"])
    for name in ("train_flash_ext.json", "train_sdpa.json", "loss_flash_ext.png", "loss_flash_ext_vs_sdpa.png"):
        assert (tmp_path / name).exists(), name
