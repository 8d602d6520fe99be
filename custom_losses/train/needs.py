"""What a training recipe (SFT's Axolotl keys, distill's TRL keys) asks of the machine, read from its composed
config: the GPU reasons the doctor weighs, and the refusal `launch.sft` and `launch.distill` make before anything
heavy imports when this machine has no GPU for them (prep.api.preconditions.Unmet, naming the CPU overlay).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from custom_losses.train.memory import needs_gpu
from prep.api.preconditions import Problem, VisibleGpu, gpu_problem, model_problem, require, visible_gpus
from prep.config import compose

CPU_OVERLAYS = {"sft": "recipes/sft/overrides/cpu-tiny.yaml", "distill": "recipes/distill/overrides/cpu-tiny.yaml"}
MODEL_KEYS = {"sft": "base_model", "distill": "model_name_or_path"}


def train_gpu_reasons(kind: str, config: dict[str, Any]) -> list[str]:
    """What in a composed KIND ("sft" or "distill") config wants a CUDA GPU: the doctor's view, which includes what
    runs on a CPU only in tests (4-bit, FSDP and DeepSpeed on CPU processes)."""
    reasons = list(needs_gpu(config))
    if kind == "distill":
        if config.get("use_cpu"):
            return []
        reasons += ["4-bit bitsandbytes"] * bool(config.get("load_in_4bit")) + ["FSDP"] * bool(config.get("fsdp"))
    return reasons


def certain_gpu_reasons(kind: str, config: dict[str, Any]) -> list[str]:
    """What in the config fails for certain without a GPU, so a command refuses it up front: SFT's preflight
    refuses every GPU need (custom_losses.train.memory.check_fits); distill's trainer refuses bf16/fp16 without
    use_cpu, and flash attention has no CPU kernel. DeepSpeed, FSDP and 4-bit do run on CPU processes."""
    if kind == "sft":
        return train_gpu_reasons(kind, config)
    reasons = [] if config.get("use_cpu") else ["bf16/fp16"] * bool(config.get("bf16") is True or
                                                                    config.get("fp16") is True)
    attention = str(config.get("attn_implementation") or "")
    return reasons + [attention] * attention.startswith("flash_attention")


def training_problem(kind: str, config: dict[str, Any], recipe: str | Path, overlays: Sequence[str | Path] = (),
                     gpus: Sequence[VisibleGpu] | None = None) -> Problem | None:
    """The first reason this machine (or GPUS) cannot train KIND's composed CONFIG from RECIPE and OVERLAYS: a GPU it
    needs and does not have (the fix names the CPU overlay, or what is left once it is on), then the model missing
    (distill's; SFT's preflight checks its base model with its tokenizer and chat template)."""
    reasons = certain_gpu_reasons(kind, config)
    if reasons:
        overlaid = any(Path(overlay).name == Path(CPU_OVERLAYS[kind]).name for overlay in overlays)
        cpu_fix = (f"turn off what still needs it over {CPU_OVERLAYS[kind]} with --set (e.g. --set deepspeed=null)"
                   if overlaid else f"add --overlay {CPU_OVERLAYS[kind]} (the tiny model in fp32)")
        problem = gpu_problem(1, f"{recipe} ({', '.join(reasons)})", visible_gpus() if gpus is None else gpus, cpu_fix)
        if problem:
            return problem
    model = config.get(MODEL_KEYS[kind])
    if kind == "distill" and isinstance(model, str) and model:
        return model_problem(model, f"{MODEL_KEYS[kind]} in {recipe}")
    return None


def check_training_machine(kind: str, recipe: str | Path, overlays: Sequence[str | Path] = (),
                           overrides: Sequence[str] = ()) -> None:
    """prep.api.preconditions.Unmet when this machine cannot train the composed recipe (training_problem);
    composing is all it costs (a bad recipe is the RecipeError the command's own parse then reports)."""
    require(training_problem(kind, compose(recipe, list(overlays), list(overrides)), recipe, overlays))
