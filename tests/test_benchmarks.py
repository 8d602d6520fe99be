"""The benchmark commands run end to end on toy sizes and print their ratio line (no timing is asserted)."""
from __future__ import annotations

import re
import subprocess
import sys

from prep.paths import REPO_ROOT


def test_kd_loss_benchmark_prints_its_ratios_and_equal_losses():
    result = subprocess.run([sys.executable, "-m", "launch.bench_kd_loss", "--seqs", "64", "--vocab", "2048",
                             "--hidden", "32"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = dict(re.findall(r"^\s+64 (\w+)\s+\d+\s+[\d.]+\s+([-\d.]+)$", result.stdout, re.M))
    assert set(rows) == {"kd_chunked", "kd_naive", "ce_trl", "ce_naive"}
    # (a) and (b) are the same loss computed two ways, as are (c) and (d).
    assert abs(float(rows["kd_chunked"]) - float(rows["kd_naive"])) < 1e-3
    assert abs(float(rows["ce_trl"]) - float(rows["ce_naive"])) < 1e-3
    assert re.search(r"^mem_vs_ce=[\d.]+ mem_vs_naive=[\d.]+ time_vs_ce=[\d.]+$", result.stdout, re.M)
