"""The GPU memory estimator against published measurements, its parts, and its command line.

No GPU here: the estimator is checked against measurements others published (cited in
custom_losses/train/memory.py) and, for the KD loss's own terms, against the loss's peak measured on CPU;
this repo's recipes get predictions only. The distill recipes' headers state the estimator's figure,
checked here (the SFT recipes' headers are checked in test_recipes_validate.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from custom_losses.train.memory import (
    GIB,
    QWEN1_7B,
    QWEN25_7B,
    Setup,
    estimate,
    estimate_config,
    estimate_distill,
    setup_from_distill,
    shape_for,
)
from custom_losses.train.sft_config import compose
from launch.estimate_memory import main
from prep.config import compose as recipe_compose
from prep.paths import REPO_ROOT
from prep.qwen import VOCAB_ROWS

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
    from custom_losses.train.memory import PreflightError, check_fits

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


# ---- stage two: distill recipes ------------------------------------------------------------------

DISTILL_RECIPES = sorted((REPO_ROOT / "recipes" / "distill").glob("*.yaml"))
QLORA_DISTILL = "recipes/distill/qwen2.5-7b-instruct-qlora-1gpu.yaml"
QWEN25 = "Qwen/Qwen2.5-7B-Instruct"


@pytest.mark.integration
def test_kd_loss_terms_match_the_losss_measured_cpu_peak():
    """The KD loss's own memory (chunk logits, answer-hidden gradient, head gradient), predicted and then
    measured: peak RSS of one forward + backward of weighted_topk_kd_loss in a fresh fp32 process."""
    from custom_losses.checks.loss_bench import measure_in_fresh_process
    from custom_losses.train.memory import ModelShape, kd_loss_bytes

    # hidden 64: the head's gradient (152064 x 64 fp32, 37 MiB) is over glibc's largest mmap threshold (32 MiB),
    # so it is a fresh mapping that RSS sees, not heap memory the warm-up already touched.
    tokens, hidden, chunk = 512, 64, 128
    shape = ModelShape("probe", vocab=VOCAB_ROWS, hidden=hidden, intermediate=64, layers=1, heads=1, kv_heads=1,
                       head_dim=hidden)
    setup = Setup(method="full", act_bytes=4, loss="topk_kd", kd_chunk_size=chunk)
    terms = kd_loss_bytes(shape, setup, tokens)
    assert set(terms) == {"KD chunk logits", "KD answer hidden + grad"}    # unsharded: the head's grad is .grad
    predicted = sum(terms.values()) + VOCAB_ROWS * hidden * 4              # + lm_head.grad (fp32)
    measured = measure_in_fresh_process("kd_chunked", tokens, hidden, VOCAB_ROWS, 20, "cpu", "float32", chunk, 1)
    assert measured is not None, "the measuring process died"
    assert abs(measured["peak_bytes"] / predicted - 1) <= 0.1, \
        f"measured {measured['peak_bytes'] / 2**20:.0f} MiB, predicted {predicted / 2**20:.0f} MiB"


def test_distill_recipe_keys_reach_the_estimate():
    qlora = setup_from_distill(recipe_compose(QLORA_DISTILL))
    assert (qlora.method, qlora.weight_bits, qlora.double_quant, qlora.lora_rank, qlora.lora_targets) == \
        ("qlora", 4, True, 64, ())
    assert (qlora.seq_len, qlora.micro_batch, qlora.loss, qlora.kd_chunk_size) == (4096, 1, "topk_kd", 256)
    # TRL casts a quantised model's adapters to bf16: 2 B weight + 2 B grad + 2 x 2 B AdamW moments.
    terms = estimate(QWEN25_7B, qlora).terms
    assert terms["LoRA weights + grads"] + terms["LoRA optimizer"] == pytest.approx(QWEN25_7B.lora_params(64) * 8 / GIB)
    # No [tokens x vocab] logits: one chunk of fp32 logits plus logsumexp's temporary of the same size.
    assert "logits + loss" not in terms
    assert terms["KD chunk logits"] == pytest.approx(256 * VOCAB_ROWS * 8 / GIB)
    tail = estimate(QWEN25_7B, setup_from_distill(recipe_compose(QLORA_DISTILL, [], ["kd_support=tail", "kd_temperature=2.0"])))
    assert tail.terms["KD chunk logits"] == pytest.approx(1.5 * terms["KD chunk logits"])

    multi = setup_from_distill(recipe_compose("recipes/distill/qwen2.5-7b-instruct-lora-multi-gpu.yaml"))
    assert (multi.method, multi.weight_bits, multi.adapter_bytes, multi.micro_batch) == ("lora", 16, 4, 1)
    doubled = setup_from_distill(recipe_compose(QLORA_DISTILL, [], ["per_device_train_batch_size=2"]))
    assert estimate(QWEN25_7B, doubled).terms["activations"] == pytest.approx(2 * terms["activations"])


def test_sharded_full_distillation_gathers_the_head_and_shards_the_states():
    full = {"model_name_or_path": QWEN25, "use_peft": False, "dtype": "bfloat16", "bf16": True, "max_length": 4096,
            "per_device_train_batch_size": 1, "gradient_checkpointing": True, "kd_chunk_size": 256}
    params = QWEN25_7B.params
    # (setup, its states per parameter: gradients + optimizer; the weights' bytes per parameter)
    cases = {
        # DeepSpeed: bf16 weights and grads, fp32 master + AdamW moments (2 + 2 + 12).
        "zero3": (setup_from_distill({**full, "deepspeed": "recipes/deepspeed/zero3_bf16.json"}, 8), 2 + 12, 2),
        # FSDP2 (transformers' default) keeps a bf16-loaded model's dtype: pure bf16, 2 + 2 + 4.
        "fsdp2": (setup_from_distill({**full, "fsdp": True}, 8), 2 + 4, 2),
        "fsdp2-legacy": (setup_from_distill({**full, "fsdp": "full_shard auto_wrap"}, 8), 2 + 4, 2),
        # FSDP1 with mixed precision upcasts the sharded parameters to fp32 (4 + 4 + 8); so does loading in fp32.
        "fsdp1": (setup_from_distill({**full, "fsdp": True, "fsdp_config": {"version": 1}}, 8), 4 + 8, 4),
        "fsdp2-fp32": (setup_from_distill({**full, "dtype": "float32", "fsdp": True}, 8), 4 + 8, 4),
    }
    for name, (setup, state_bytes, weight_bytes) in cases.items():
        assert setup.zero_stage == 3 and setup.act_bytes == 2, name
        per_gpu = {n: estimate(QWEN25_7B, replace(setup, gpus=n)) for n in (1, 4, 8)}
        assert per_gpu[8].total < per_gpu[4].total < per_gpu[1].total, name
        terms = per_gpu[8].terms
        head = VOCAB_ROWS * 3584 * 2 / GIB          # the head's call gathers the bf16 weight; the loss accumulates its grad
        assert terms["KD gathered lm_head"] == pytest.approx(head) and terms["KD lm_head gradient"] == pytest.approx(head)
        states = sum(value for key, value in terms.items() if key.startswith(("gradients", "optimizer")))
        assert states == pytest.approx(params * state_bytes / 8 / GIB), name
        gathered = 2 * sum(d_in * d_out for d_in, d_out in QWEN25_7B.linears) * 2 / GIB    # two decoder layers
        if name.startswith("fsdp"):
            gathered += head                                 # FSDP's root unit keeps the input embeddings gathered
        assert terms["weights"] == pytest.approx(params * weight_bytes / 8 / GIB + gathered), name
    # FSDP's own activation checkpointing counts as checkpointing; shard_grad_op keeps the weights whole (stage 2).
    fsdp_ac = {**full, "gradient_checkpointing": False, "fsdp": True, "fsdp_config": {"activation_checkpointing": True}}
    assert setup_from_distill(fsdp_ac).gradient_checkpointing
    assert setup_from_distill({**full, "fsdp": "shard_grad_op auto_wrap"}, 8).zero_stage == 2
    assert setup_from_distill({**full, "fsdp": True, "fsdp_config": {"reshard_after_forward": False}}, 8).zero_stage == 2
    # Unsharded LoRA: no head gradient unless lm_head is a target, whose adapter then counts too.
    lora = setup_from_distill({**full, "use_peft": True, "lora_r": 16, "lora_target_modules": "all-linear"})
    assert "KD lm_head gradient" not in estimate(QWEN25_7B, lora).terms
    head_lora = replace(lora, lora_targets=("q_proj", "v_proj", "lm_head"))
    # W + B @ A and its gradient (bf16) and the fp32 delta: 2 + 2 + 4 B per head element.
    assert estimate(QWEN25_7B, head_lora).terms["KD lm_head W + B@A + grad"] == pytest.approx(VOCAB_ROWS * 3584 * 8 / GIB)
    assert QWEN25_7B.lora_params(16, ("q_proj", "v_proj", "lm_head")) == \
        16 * (28 * ((3584 + 3584) + (3584 + 512)) + 3584 + VOCAB_ROWS)
    with pytest.raises(ValueError, match=r"lora_target_modules \['c_attn'\]: not a linear of Qwen2.5-7B-Instruct"):
        QWEN25_7B.lora_params(16, ("c_attn",))


def _header(recipe: Path) -> str:
    return "".join(line for line in recipe.read_text(encoding="utf-8").splitlines(keepends=True) if line.startswith("#"))


@pytest.mark.parametrize("recipe", DISTILL_RECIPES, ids=lambda path: path.name)
def test_distill_recipe_header_states_the_estimators_peak(recipe: Path):
    """Each header names the estimate's command and its prediction(s) as '#   N GPU(s): X GiB', rounded to the
    0.1 GiB the command prints; the command's --model is the shape (the recipe's model is stage one's merged one)."""
    header, rel = _header(recipe), str(recipe.relative_to(REPO_ROOT))
    command = re.search(rf"python -m launch\.estimate_memory --config {re.escape(rel)}( [^`\n]*)?", header)
    assert command, f"{rel}: the header names `python -m launch.estimate_memory --config {rel} ...`"
    model = re.search(r"--model (\S+)", command.group(0))
    predictions = re.findall(r"^#\s+(\d+) GPUs?: ([0-9.]+) GiB", header, re.M)
    assert predictions, f"{rel}: the predicted peak, as '#   N GPU(s): X GiB'"
    config = recipe_compose(recipe)
    for gpus, stated in predictions:
        predicted = estimate_distill(config, int(gpus), model.group(1) if model else None).total
        assert abs(predicted - float(stated)) <= 0.05 + 1e-9, \
            f"{rel}: header says {stated} GiB on {gpus} GPU(s); the estimator says {predicted:.2f}"


def test_cli_estimates_a_distill_recipe(capsys, tiny_model_dir):
    assert main(["--config", QLORA_DISTILL, "--model", QWEN25]) == 0
    out = capsys.readouterr().out
    assert "Qwen2.5-7B-Instruct, qlora, 4-bit base, seq 4096 x micro-batch 1" in out and "chunked top-k KD loss" in out
    assert "KD chunk logits" in out and "logits + loss" not in out
    # Stage one's merged model does not exist yet: one sentence naming the key and the way out.
    assert main(["--config", QLORA_DISTILL]) == 2
    assert "model_name_or_path 'runs/stage1/merged'" in capsys.readouterr().err
    assert main(["--config", QLORA_DISTILL, "--model", QWEN25, "--set", "per_device_train_batch_size=4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["setup"]["micro_batch"] == 4 and report["setup"]["loss"] == "topk_kd"
    # The CPU overlay's tiny fixture is read from its folder (fp32 weights).
    assert main(["--config", QLORA_DISTILL, "--overlay", "recipes/distill/overrides/cpu-tiny.yaml", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["setup"]["weight_bits"] == 32 and report["setup"]["method"] == "lora"
