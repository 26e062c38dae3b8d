"""The band kernels' tile arithmetic (band_tiles, band_query_blocks in csrc/tile_sm80.cuh) against brute force,
compiled with nvcc and run on the host: no GPU needed. Skipped without nvcc."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_band_tiles_match_brute_force(tmp_path):
    exe = tmp_path / "band_tiles_check"
    subprocess.run(["nvcc", "-std=c++17", f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "band_tiles_check.cu"),
                    "-o", str(exe)], check=True, capture_output=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(" 0 bad") == 6, run.stdout
