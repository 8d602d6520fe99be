"""The GPU memory estimator against published measurements, its parts, and its command line.

No GPU here: the estimator is checked against measurements others published (cited in
custom_losses/memory.py), and this repo's recipes get predictions only.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from custom_losses.memory import GIB, QWEN1_7B, QWEN25_7B, Setup, estimate, estimate_config, shape_for
from custom_losses.sft_config import compose
from launch.estimate_memory import main

TOLERANCE = 0.15
GB = 1e9 / GIB   # LLaMA-Factory writes decimal GB

# The Qwen team's finetune.py settings behind their profile (README of QwenLM/Qwen): LoRA r=64,
# dropout 0.05 on all linears, bf16; Q-LoRA = the GPTQ Int4 model under DeepSpeed ZeRO-2 (buckets 2e8);
# full fine-tune on 2 GPUs under ZeRO-2. Their remote code takes the loss on 16-bit logits (~8 B each).
QWEN1_LORA = Setup(method="lora", weight_bits=16, lora_rank=64, lora_dropout=0.05, logits_bytes=8)
QWEN1_QLORA = replace(QWEN1_LORA, method="qlora", weight_bits=4, zero_stage=2, bucket_elements=2e8)
QWEN1_FULL = Setup(method="full", logits_bytes=8, gpus=2, zero_stage=2, bucket_elements=2e8)
# (setup, sequence length, measured GiB per GPU)
QWEN_PROFILE = [
    *[(QWEN1_LORA, seq, gib) for seq, gib in ((256, 20.1), (512, 20.4), (1024, 21.5), (2048, 23.8), (4096, 29.7), (8192, 36.6))],
    *[(QWEN1_QLORA, seq, gib) for seq, gib in ((256, 11.5), (512, 11.5), (1024, 12.3), (2048, 13.9), (4096, 16.9), (8192, 23.5))],
    *[(QWEN1_FULL, seq, total / 2) for seq, total in ((256, 139.2), (512, 148.0), (1024, 162.0))],
]


@pytest.mark.parametrize("setup,seq_len,measured", QWEN_PROFILE,
                         ids=[f"{s.method}-{seq}" for s, seq, _ in QWEN_PROFILE])
def test_prediction_within_tolerance_of_the_qwen_teams_measurements(setup, seq_len, measured):
    predicted = estimate(QWEN1_7B, replace(setup, seq_len=seq_len)).total
    assert abs(predicted / measured - 1) <= TOLERANCE, f"predicted {predicted:.1f} GiB, measured {measured} GiB"


@pytest.mark.parametrize("method,setup,table_gb", [
    ("LoRA 16-bit", Setup(method="lora", weight_bits=16, lora_rank=8), 16),
    ("QLoRA 4-bit", Setup(method="qlora", weight_bits=4, lora_rank=8), 6),
    ("full AMP", Setup(method="full", zero_stage=0), 120),
])
def test_static_memory_agrees_with_llama_factory_rule_of_thumb(method, setup, table_gb):
    terms = estimate(QWEN25_7B, setup).terms
    static = sum(value for name, value in terms.items() if name.startswith(("weights", "LoRA", "gradients", "optimizer")))
    assert abs(static / (table_gb * GB) - 1) <= 0.25, f"{method}: static {static:.1f} GiB vs LLaMA-Factory's {table_gb} GB"


def test_parameter_counts_are_exact():
    assert QWEN25_7B.params == 7_615_616_512          # Qwen2.5-7B-Instruct's safetensors
    assert QWEN1_7B.params == 7_721_324_544           # ms-swift's "7721.3245M" trainable for qwen-7b-chat
    assert QWEN25_7B.lora_params(32) == 32 * 28 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))


def test_shape_comes_from_the_model_folder(tiny_model_dir):
    from safetensors import safe_open

    shape = shape_for(str(tiny_model_dir))
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as weights:
        count = 0
        for name in weights.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
            size = 1
            for dim in weights.get_slice(name).get_shape():
                size *= dim
            count += size
    assert shape.params == count and shape.hidden == 128 and shape.vocab == 152064
    assert shape_for("Qwen/Qwen2.5-7B-Instruct") == QWEN25_7B


def test_each_term_moves_the_way_its_knob_says():
    base = Setup(method="lora", weight_bits=16, lora_rank=32, seq_len=4096)
    plain = estimate(QWEN25_7B, base)
    # Checkpointing keeps one hidden vector per layer per token instead of every activation.
    no_ckpt = estimate(QWEN25_7B, replace(base, gradient_checkpointing=False))
    assert no_ckpt.terms["activations"] == pytest.approx(plain.activations_no_checkpointing)
    assert no_ckpt.terms["activations"] > 5 * plain.terms["activations"]
    # NF4 with double quantisation: ~4.13 bits on the linears, embeddings stay bf16.
    qlora = estimate(QWEN25_7B, replace(base, method="qlora", weight_bits=4))
    expected = (QWEN25_7B.linear_params * 4.127 / 8 + (QWEN25_7B.params - QWEN25_7B.linear_params) * 2) / GIB
    assert qlora.terms["weights"] == pytest.approx(expected)
    assert 2.5 < plain.terms["weights"] / qlora.terms["weights"] < 3
    # Fused cross-entropy never holds [tokens x vocab] logits; without it they cost ~12 B each.
    fused = estimate(QWEN25_7B, replace(base, fused_cross_entropy=True))
    assert plain.terms["logits + loss"] == pytest.approx(4096 * 152064 * 12 / GIB)
    assert fused.terms["logits + loss"] < 0.05 * plain.terms["logits + loss"]
    # Eager attention keeps [heads x s x s] scores; flash attention does not.
    eager = estimate(QWEN25_7B, replace(base, flash_attention=False, gradient_checkpointing=False))
    assert eager.terms["activations"] > no_ckpt.terms["activations"]
    # ZeRO-3 shards everything: 8 GPUs need less per GPU than 4, and both far less than 1.
    full = Setup(method="full", zero_stage=3, fused_cross_entropy=True)
    per_gpu = {n: estimate(QWEN25_7B, replace(full, gpus=n)).total for n in (1, 4, 8)}
    assert per_gpu[8] < per_gpu[4] < per_gpu[1] and per_gpu[1] > 110
    # Micro-batch 2 doubles the token-proportional terms.
    double = estimate(QWEN25_7B, replace(base, micro_batch=2))
    assert double.terms["activations"] == pytest.approx(2 * plain.terms["activations"])


@pytest.mark.parametrize("recipe,gpus,limit_gib", [
    ("recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml", 1, 24 * GB),      # written for one 24-80 GB GPU
    ("recipes/sft/qwen2.5-7b-instruct-lora-zero2.yaml", 2, 40 * GB),      # 2-8 GPUs of 40-80 GB
    ("recipes/sft/qwen2.5-7b-instruct-full-zero3.yaml", 8, 40 * GB),      # 8 x 40-80 GB
    ("recipes/sft/qwen2.5-7b-instruct-full-zero3.yaml", 4, 80 * GB),      # or 4 x 80 GB
])
def test_recipes_fit_the_gpus_their_headers_name_with_margin(recipe, gpus, limit_gib):
    predicted = estimate_config(compose(recipe), gpus).total
    assert predicted * (1 + TOLERANCE) <= limit_gib, f"{recipe} on {gpus} GPU(s): {predicted:.1f} GiB (+15 %) > {limit_gib:.1f}"


def test_cli_prints_the_breakdown_and_warns_when_it_does_not_fit(capsys):
    recipe = "recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml"
    assert main(["--config", recipe]) == 0
    out = capsys.readouterr().out
    assert "Qwen2.5-7B-Instruct, qlora, 4-bit base, seq 4096" in out and "peak per GPU" in out
    assert "activations w/o checkpointing" in out

    assert main(["--config", recipe, "--gpu-mem", "8"]) == 0                 # warns, exits 0
    assert "does not fit in 8 GiB" in capsys.readouterr().err
    assert main(["--config", recipe, "--gpu-mem", "8", "--strict"]) == 1     # --strict makes it an error
    assert "does not fit in 8 GiB" in capsys.readouterr().err
    assert main(["--config", recipe, "--gpu-mem", "80", "--strict"]) == 0
    assert capsys.readouterr().err == ""

    assert main(["--config", recipe, "--set", "micro_batch_size=4", "--json"]) == 0   # overrides reach the estimate
    report = json.loads(capsys.readouterr().out)
    assert report["setup"]["micro_batch"] == 4 and report["total_gib"] > estimate_config(compose(recipe), 1).total


def test_cli_names_a_bad_recipe_in_one_sentence(capsys, tmp_path):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: recipe file not found" in capsys.readouterr().err


def test_fit_check_holds_a_config_against_the_gpus():
    from custom_losses.memory import PreflightError, check_fits

    qlora = compose("recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml")
    peak = estimate_config(qlora, 1).total
    fits = check_fits(qlora, gpus=[("roomy", 80.0)])
    assert fits.startswith(f"memory: predicted peak {peak:.1f} GiB per GPU on 1 GPU")
    assert "tight" in check_fits(qlora, gpus=[("snug", peak * 1.05)])
    too_small = r"qlora-1gpu\.yaml: predicted peak .* smallest has 8\.0 GiB \(small\): it will not fit"
    with pytest.raises(PreflightError, match=too_small):
        check_fits(qlora, "recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml", gpus=[("roomy", 80.0), ("small", 8.0)])
    assert check_fits(qlora, gpus=[("small", 8.0)], force=True).startswith("warning: ")
    # No GPU: a GPU recipe is refused before a run, and only noted when a recipe is merely validated.
    with pytest.raises(PreflightError, match=r"needs a CUDA GPU \(bf16/fp16, flash_attention_2.*cpu-tiny\.yaml"):
        check_fits(qlora, gpus=[])
    assert "none is visible here" in check_fits(qlora, gpus=[], require_gpu=False)
    cpu = compose("recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml", ["recipes/sft/overrides/cpu-tiny.yaml"])
    assert check_fits(cpu, gpus=[]) == "no GPU: CPU run (fp32, tiny model)"
