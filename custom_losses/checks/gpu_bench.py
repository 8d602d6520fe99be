"""The GPU benchmark behind `python -m launch.bench_gpu`: real shapes, random weights, one card, one short run.

  1. the loss: launch.bench_kd_loss's comparison at Qwen2.5-7B's hidden 3584 in bf16 (custom_losses.checks.loss_bench):
     our chunked top-k KD against TRL's chunked CE and Axolotl's fused top-k KD, same inputs, same run;
  2. an SFT recipe step and a distill recipe step packed versus unpacked, on the random-weight Qwen2.5-7B
     (custom_losses.checks.smoke's parts): tokens/s, model-FLOPs utilisation against the card's dense bf16 peak, and
     the peak memory against custom_losses.train.memory's prediction.

Model FLOPs of a step (no recomputation counted: gradient checkpointing's second forward is overhead):
forward 2 x (decoder linear params) per token, plus attention 4 x layers x heads x head_dim x s(s+1)/2 per case
of s tokens (QK^T and PV, causal, cases in a packed row do not see each other), plus the head 2 x vocab x hidden
per position whose logits the step computes (every position in SFT, as transformers and Liger compute them; the
answer positions in distillation, which is all our loss computes). Backward: the input gradients (1 x the
forward's linear and head work, 2 x its attention work) and, for a full fine-tune, the weight gradients (1 x
more); a LoRA's frozen base weights have none, and the adapters' own few FLOPs are left out.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from custom_losses.checks.smoke import StepResult
from custom_losses.checks.smoke_steps import OPTIONAL_MODULES, missing_modules

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a piece of
# torch.cuda.get_device_name; the longest matching piece wins (an "H100 PCIe" is not an "H100" SXM).
CARD_PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H800": 989.0, "H20": 148.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10": 125.0, "A6000": 155.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0,
}
MFU_TARGET = 0.40     # the target for bf16 LoRA at a packed 4096-token row

SFT_RECIPE = "recipes/sft/qwen2.5-7b-instruct-lora-zero2.yaml"
DISTILL_RECIPE = "recipes/distill/qwen2.5-7b-instruct-lora-multi-gpu.yaml"
QLORA_SFT_RECIPE = "recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml"
QLORA_DISTILL_RECIPE = "recipes/distill/qwen2.5-7b-instruct-qlora-1gpu.yaml"
SFT_CPU_OVERLAY = "recipes/sft/overrides/cpu-tiny.yaml"
DISTILL_CPU_OVERLAY = "recipes/distill/overrides/cpu-tiny.yaml"
SOFTLABEL_RECIPE = "recipes/softlabels/vllm-qwen2.5-72b-instruct.yaml"


def card_peak_tflops(name: str) -> float | None:
    """The card's dense bf16 peak by its device name, None for a card (or CPU) not in the table."""
    matches = [piece for piece in CARD_PEAK_TFLOPS if piece.lower() in name.lower()]
    return CARD_PEAK_TFLOPS[max(matches, key=len)] if matches else None


def step_flops(shape: Any, segments: Sequence[int], head_positions: int, full_finetune: bool) -> float:
    """Model FLOPs of one micro-batch's forward and backward (see the module docstring)."""
    tokens = sum(segments)
    linear = 2.0 * shape.linear_params * tokens
    attention = sum(4.0 * shape.layers * shape.heads * shape.head_dim * s * (s + 1) / 2 for s in segments)
    head = 2.0 * shape.vocab * shape.hidden * head_positions
    backward = (linear + head) * (2 if full_finetune else 1) + 2 * attention
    return linear + attention + head + backward


def mfu(result: StepResult, shape: Any, peak_tflops: float | None, head_all_positions: bool) -> float:
    """Model-FLOPs utilisation of RESULT's timed steps against PEAK_TFLOPS (nan without a peak)."""
    if not peak_tflops:
        return float("nan")
    timed = result.timed
    flops = sum(step_flops(shape, segments, sum(segments) if head_all_positions else labels, result.full_finetune)
                for segments, labels in zip(result.segments[timed], result.label_tokens[timed]))
    return flops / max(result.seconds, 1e-9) / (peak_tflops * 1e12)


# ---- the loss comparison -------------------------------------------------------------------------

@dataclass
class LossSettings:
    seqs: Sequence[int]
    hidden: int
    vocab: int
    k: int
    dtype: str
    chunk: int
    repeats: int
    fresh_process: bool   # on a GPU each variant in its own process (peaks do not leak); on a CPU here


def loss_comparison(settings: LossSettings, device: str, axolotl: bool, say: Callable[[str], None]
                    ) -> dict[str, float]:
    """Our KD loss, full-logits KD, TRL's chunked CE (and Axolotl's fused KD when it imports), each forward +
    backward on the same inputs; {mem_vs_ce, mem_vs_axolotl, time_vs_ce, time_vs_axolotl} at the longest length."""
    from custom_losses.checks.loss_bench import AXOLOTL_VARIANT, measure, measure_in_fresh_process

    variants = ["kd_chunked", "kd_naive", "ce_trl", *([AXOLOTL_VARIANT] if axolotl else [])]
    run = measure_in_fresh_process if settings.fresh_process else measure
    say(f"loss: hidden {settings.hidden}, vocab {settings.vocab}, top-{settings.k}, {settings.dtype}, chunk "
        f"{settings.chunk}; peak memory and median time of forward + backward")
    say(f"{'tokens':>7} {'variant':<11} {'peak MiB':>10} {'time ms':>9} {'loss':>9}")
    results: dict[tuple[int, str], dict | None] = {}
    for n in settings.seqs:
        for variant in variants:
            r = run(variant, n, settings.hidden, settings.vocab, settings.k, device, settings.dtype, settings.chunk,
                    settings.repeats)
            results[(n, variant)] = r
            say(f"{n:>7} {variant:<11} {'failed (OOM?)':>10}" if r is None else
                f"{n:>7} {variant:<11} {r['peak_bytes'] / 2**20:>10.0f} {r['time_s'] * 1e3:>9.1f} {r['loss']:>9.4f}")
    n = max(settings.seqs)
    ours = results[(n, "kd_chunked")]

    def ratio(other: str, key: str) -> float:
        theirs = results.get((n, other))
        return ours[key] / theirs[key] if ours and theirs and theirs[key] > 0 else float("nan")

    return {"kd_mem_vs_ce": ratio("ce_trl", "peak_bytes"), "kd_time_vs_ce": ratio("ce_trl", "time_s"),
            "kd_mem_vs_axolotl": ratio(AXOLOTL_VARIANT, "peak_bytes"),
            "kd_time_vs_axolotl": ratio(AXOLOTL_VARIANT, "time_s")}


# ---- the training steps --------------------------------------------------------------------------

@dataclass
class BenchPlan:
    """Which recipes the training part runs, and how."""

    cases: str
    tiny: bool
    steps: int
    qlora: bool
    import_names: dict[str, str] = field(default_factory=dict)


def bench_recipe(plan: BenchPlan, sft: str, distill: str) -> Any:
    """A pipeline recipe (custom_losses.pipeline.plan.PipelineRecipe) holding the bench's SFT and distill recipes on one process:
    DeepSpeed dropped, the CPU overlays in --cpu-tiny."""
    from custom_losses.pipeline.plan import PipelineRecipe, StageOne, StageTwo

    sft_overlays = [SFT_CPU_OVERLAY] if plan.tiny else []
    distill_overlays = [DISTILL_CPU_OVERLAY] if plan.tiny else []
    return PipelineRecipe(
        train_cases=plan.cases, test_cases=plan.cases, out="runs/bench-gpu", base_model="bench",
        stage1=StageOne(teacher="", sft=sft, predict="", sft_overlays=sft_overlays, sft_set=["deepspeed=null"]),
        stage2=StageTwo(softlabels=SOFTLABEL_RECIPE, distill=distill, predict="", distill_overlays=distill_overlays,
                        distill_set=["deepspeed=null"]))


def training_steps(plan: BenchPlan, peak: float | None, say: Callable[[str], None]) -> dict[str, float]:
    """The SFT step and the distill step packed and unpacked (bf16 LoRA; QLoRA too with PLAN.qlora): each part's
    lines from custom_losses.checks.smoke plus its MFU; the figures of the final line."""
    from custom_losses.checks.smoke import distill_part, sft_part, smoke_context
    from custom_losses.train.memory import shape_for
    from prep.config import compose

    figures: dict[str, float] = {}
    recipes = [("", SFT_RECIPE, DISTILL_RECIPE)] + ([("qlora_", QLORA_SFT_RECIPE, QLORA_DISTILL_RECIPE)]
                                                    if plan.qlora else [])
    for prefix, sft, distill in recipes:
        # Rows enough for the unpacked micro-batches to hold whole batches of cases.
        ctx = smoke_context(bench_recipe(plan, sft, distill), plan.tiny, plan.steps, plan.import_names, rows_of_tokens=3)
        shape = shape_for(str(ctx.model_dir))
        # Unpacked micro-batches of as many cases as a packed row holds on average: the same tokens per forward,
        # padded, rather than the recipe's one packed row read as one case.
        max_length = int(compose(distill, ctx.recipe.stage2.distill_overlays).get("max_length") or 1024)
        cases_per_row = max(1, round(max_length / ctx.data.case_tokens))
        unpacked = ["kd_packing=false", "kd_padding_free=false", f"per_device_train_batch_size={cases_per_row}"]
        parts = {"sft": (sft_part, ()),
                 "distill_packed": (distill_part, (["kd_packing=true", "kd_padding_free=true"], ", packed")),
                 "distill_unpacked": (distill_part, (unpacked, f", unpacked, {cases_per_row} cases a micro-batch"))}
        for name, (part, args) in parts.items():
            key = prefix + name
            try:
                result = part(ctx, say, *args)
            except Exception as err:  # one step's failure is its line; the others still run
                say(f"FAIL {key}: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}")
                continue
            if result is None:
                continue
            utilisation = mfu(result, shape, peak, head_all_positions=name == "sft")
            figures[f"{key}_tokens_per_s"] = result.tokens_per_s
            figures[f"{key}_mfu"] = utilisation
            figures[f"{key}_peak_vs_estimate"] = result.peak_bytes / 2**30 / result.estimate_gib
            # The target is for bf16 LoRA on packed rows: not the QLoRA steps, not the unpacked one.
            target = "" if math.isnan(utilisation) or prefix or name == "distill_unpacked" else (
                f" (target >= {MFU_TARGET:.0%} for bf16 LoRA at packed 4096: "
                f"{'met' if utilisation >= MFU_TARGET else 'not met'})")
            say(f"  {key}: MFU {utilisation:.1%}{target}" if not math.isnan(utilisation) else
                f"  {key}: MFU n/a (no bf16 peak for this device)")
        if f"{prefix}distill_packed_tokens_per_s" in figures and f"{prefix}distill_unpacked_tokens_per_s" in figures:
            figures[f"{prefix}packed_speedup"] = (figures[f"{prefix}distill_packed_tokens_per_s"]
                                                  / figures[f"{prefix}distill_unpacked_tokens_per_s"])
    return figures


def device_header(device: str) -> tuple[str, float | None]:
    """The card's name and its dense bf16 peak (None on a CPU or an unknown card)."""
    if device != "cuda":
        return "cpu", None
    import torch

    name = torch.cuda.get_device_name(0)
    return name, card_peak_tflops(name)


FINAL_KEYS = ("sft_tokens_per_s", "sft_mfu", "distill_packed_tokens_per_s", "distill_packed_mfu",
              "distill_unpacked_tokens_per_s", "packed_speedup", "kd_mem_vs_ce", "kd_mem_vs_axolotl",
              "sft_peak_vs_estimate", "distill_packed_peak_vs_estimate")


def final_line(figures: dict[str, float]) -> str:
    """`key=value` for the headline figures (nan where a part was skipped), then any QLoRA ones."""
    keys = [*FINAL_KEYS, *sorted(key for key in figures if key.startswith("qlora_") and
                                  key.endswith(("tokens_per_s", "mfu", "speedup")))]
    return " ".join(f"{key}={figures.get(key, float('nan')):.4g}" for key in keys)


def keep_measured(figures: dict[str, float], device: str, say: Callable[[str], None]) -> None:
    """The bf16 LoRA steps' per-GPU tokens/s and MFU into the cost estimate's measured file."""
    from custom_losses.pipeline.cost import model_config, model_params, write_measured

    config, _ = model_config("Qwen/Qwen2.5-7B-Instruct")   # the shape the bench builds (data/models/)
    kept = {"sft_tokens_per_s": figures.get("sft_tokens_per_s"), "sft_mfu": figures.get("sft_mfu"),
            "distill_tokens_per_s": figures.get("distill_packed_tokens_per_s"),
            "distill_mfu": figures.get("distill_packed_mfu")}
    path = write_measured({k: v for k, v in kept.items() if v is not None}, "the GPU benchmark (bench_gpu)", device,
                          model_params(config)[0], 1)
    say(f"measured figures kept in {path}: the cost estimate of --plan prefers them")


def run_bench(plan: BenchPlan, loss: LossSettings, device: str, out: Callable[[str], None] = print) -> int:
    """The whole benchmark; prints its lines and, last, final_line; returns the exit code (1 if a step failed)."""
    import time

    failed = []

    def say(line: str) -> None:
        if line.startswith("FAIL"):
            failed.append(line)
        out(line)

    start = time.perf_counter()
    name, peak = device_header(device)
    say(f"device {name}: dense bf16 peak {f'{peak:g} TFLOP/s' if peak else 'unknown (MFU not computed)'}; "
        f"{'tiny CPU shapes' if plan.tiny else 'Qwen2.5-7B shapes, random weights'}")
    missing = missing_modules(plan.import_names)
    for module in OPTIONAL_MODULES:
        if module in missing:
            say(missing[module])
    figures = loss_comparison(loss, device, "axolotl" not in missing, say)
    plan.qlora = plan.qlora and "bitsandbytes" not in missing
    figures.update(training_steps(plan, peak, say))
    if device == "cuda" and not plan.tiny:   # this card's figures, for the cost estimate (custom_losses.pipeline.cost)
        keep_measured(figures, name, say)
    say(f"bench finished in {time.perf_counter() - start:.0f} s")
    out(final_line(figures))
    return 1 if failed else 0
