"""The benchmark commands run end to end on toy sizes and print their ratio line (no timing is asserted)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from prep.paths import REPO_ROOT

pytestmark = pytest.mark.integration   # each runs a benchmark command as a subprocess


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


@pytest.mark.slow
def test_gpu_benchmark_runs_its_cpu_tiny_path_and_names_what_is_missing(capsys):
    """launch.bench_gpu --cpu-tiny: the loss comparison (Axolotl's kernel included), the SFT step and the distill
    step packed and unpacked at tiny shapes (one optimiser step each: tests/test_smoke.py times two); two optional
    modules looked up under names that do not exist."""
    from launch.bench_gpu import main

    # In this process (torch, transformers and TRL are imported already): the command's own main, its own output.
    code = main(["--cpu-tiny", "--steps", "1", "--import-name", "bitsandbytes=medkd_no_such_bitsandbytes",
                 "--import-name", "vllm=medkd_no_such_vllm"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "skip bitsandbytes: not installed; the 4-bit (QLoRA) steps are left out" in out
    assert "skip vllm: not installed; no serving request" in out
    rows = dict(re.findall(r"^\s+64 (\w+)\s+\d+\s+[\d.]+\s+([-\d.]+)$", out, re.M))
    assert set(rows) == {"kd_chunked", "kd_naive", "ce_trl", "kd_axolotl"}
    assert abs(float(rows["kd_chunked"]) - float(rows["kd_naive"])) < 1e-3
    for step in ("SFT step (qwen2.5-7b-instruct-lora-zero2.yaml)", "distill step (qwen2.5-7b-instruct-lora-multi-gpu.yaml, packed)",
                 "distill step (qwen2.5-7b-instruct-lora-multi-gpu.yaml, unpacked, "):
        assert f"ok {step}" in out, out
    last = out.strip().splitlines()[-1]
    figures = dict(item.split("=") for item in last.split())
    assert list(figures)[:4] == ["sft_tokens_per_s", "sft_mfu", "distill_packed_tokens_per_s", "distill_packed_mfu"]
    for key in ("sft_tokens_per_s", "distill_packed_tokens_per_s", "distill_unpacked_tokens_per_s", "packed_speedup",
                "sft_peak_vs_estimate"):
        assert float(figures[key]) > 0, last
    # At 64 tokens x 4096 in this process the loss's peaks are within the allocator's noise (0 or nan): only the
    # GPU run's ratios mean anything; here they must be there.
    assert all(isinstance(float(figures[key]), float) for key in ("kd_mem_vs_ce", "kd_mem_vs_axolotl")), last
    assert figures["sft_mfu"] == "nan"   # no bf16 peak for a CPU
