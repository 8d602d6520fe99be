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


def test_distill_benchmark_prints_its_line_and_packed_batches_pad_less(real_cases_path):
    result = subprocess.run([sys.executable, "-m", "launch.bench_distill", "--cases", str(real_cases_path), "--limit", "300",
                             "--cpu-cases", "4"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"pad_fraction_packed=([\d.]+) tokens_per_forward_ratio=([\d.]+) cpu_speedup=([\d.]+)", last)
    assert match, last
    # Each recipe's table rows: name, GPUs, layout, tokens and cases per micro-batch, pad, fill, steps per epoch.
    rows = re.findall(r"^(\S+\.yaml)\s+\d+ (unpacked|packed)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$",
                      result.stdout, re.M)
    table: dict[tuple[str, str], tuple[float, ...]] = {}
    for name, layout, tokens, _cases, pad, fill, steps in rows[-len(rows) // 2:]:    # the headline (example-length) table
        table[(name, layout)] = (float(tokens), float(pad), float(fill), float(steps))
    recipes = {name for name, _ in table}
    assert recipes and len(table) == 2 * len(recipes)
    for name in recipes:
        (tokens_u, pad_u, fill_u, steps_u), (tokens_p, pad_p, fill_p, steps_p) = table[(name, "unpacked")], table[(name, "packed")]
        assert tokens_p > tokens_u and pad_p <= pad_u and fill_p > fill_u and steps_p < steps_u, name
    # A is the packed rows' unused capacity (1 - fill), the worst recipe's.
    assert abs(float(match.group(1)) - max(1 - table[(name, "packed")][2] for name in recipes)) <= 1e-3
    assert "answer tokens/s" in result.stdout


def test_distill_benchmark_without_the_competition_data_says_so(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launch.bench_distill", "--cases", str(tmp_path / "absent.jsonl")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "absent.jsonl is not here" in result.stdout and "nothing measured" in result.stdout
