"""Predict the peak GPU memory of an SFT recipe before any GPU time is spent.

    python -m launch.estimate_memory --config RECIPE [--overlay FILE]... [--set key=value]... [--gpus N]

The model is first principles, term by term, per GPU (GiB = 2**30 bytes):
  weights      base weights at the recipe's precision: bf16 2 B/param; NF4 4-bit with double
               quantisation 4.127 bits/param on the quantised linear layers (QLoRA paper, Dettmers et
               al. 2023, sec. 3: block-64 absmax constants cost 32/64 = 0.5 bit/param, double
               quantisation cuts that to 8/64 + 32/(64*256) = 0.127); embeddings and lm_head stay bf16.
  trainable    LoRA A/B (r * (d_in + d_out) per targeted linear), fp32 (PEFT casts adapters up):
               4 B weight + 4 B grad + 8 B AdamW moments = 16 B/param. Under DeepSpeed bf16 (LoRA
               or full): 2 B bf16 weight + 2 B grad + 12 B fp32 master weight and moments (ZeRO
               paper, Rajbhandari et al. 2020: "2 + 2 + 12 bytes per parameter"), the 12 sharded from
               stage 1, the grads from stage 2, the weights from stage 3; plus its comm buckets.
  activations  per token per decoder layer, 16-bit: saved inputs of the two RMSNorms, q/k/v after
               RoPE, the attention output, gate/up/SiLU/product of the SwiGLU MLP
               (6h + 2*kv + 4*I elements; the Megatron accounting of Korthikanti et al. 2022 adapted
               to SwiGLU and GQA, no attention-score term with flash attention); LoRA dropout keeps
               a dropped copy and a mask of each adapted input. With gradient checkpointing only each
               layer's input (h) is kept, plus one layer recomputed in backward (its activations and
               their gradients).
  logits       at the loss: transformers' Qwen2 head upcasts [tokens x vocab] logits to fp32 and
               log-softmaxes them, ~12 B per element at the peak; Liger's fused linear
               cross-entropy processes chunks and never holds them.
  overhead     CUDA context and allocator slack: 0.75 GiB + 5 %.

Checked against published measurements (tests/test_estimate_memory.py), all on one A100-80G with
flash-attention 2, micro-batch 1 and gradient checkpointing:
  * the Qwen team's profile of Qwen-7B fine-tuning (README of github.com/QwenLM/Qwen, "Profiling of
    Memory and Speed"; their finetune.py: LoRA r=64 on c_attn/c_proj/w1/w2, dropout 0.05, bf16;
    Q-LoRA on the GPTQ Int4 model under DeepSpeed ZeRO-2; full fine-tune on 2 GPUs with ZeRO-2):
      LoRA    20.1G at 256 tokens, 20.4 / 21.5 / 23.8 / 29.7 / 36.6G at 512 / 1k / 2k / 4k / 8k
      Q-LoRA  11.5G at 256, 11.5 / 12.3 / 13.9 / 16.9 / 23.5G at 512 / 1k / 2k / 4k / 8k
      full    139.2G (2 GPUs) at 256, 148.0G at 512, 162.0G at 1024
    every prediction is within 15 % (most within 8 %; the largest gap, -13 %, is LoRA at 4k).
    Their model computes the loss on 16-bit logits (about 8 B per logit at the peak), so these checks
    use logits_bytes=8 rather than transformers' 12.
  * LLaMA-Factory's hardware table (README, marked "estimated"): 7B LoRA 16 GB, QLoRA 4-bit 6 GB,
    full AMP 120 GB, a rule of thumb for the static part (weights + trainable states); the static
    terms here agree within 25 %.
ms-swift's benchmark (docs/source_en/LLM/Benchmark.md) reports more for the same model (qwen-7b-chat
LoRA r=8: 18.0 GiB at 512 tokens, 27.7 at 2048, 35.3 at 4096), i.e. more than the Qwen team measured
with a 8x larger adapter; this model is 5 % under it at 512 tokens and 32 % under at 4096, so it is
not used as a check. No GPU was available to measure this repo's own recipes: their figures are
predictions only, and `check_fits` (the one GPU-memory check: launch.sft's preflight and the
pipeline's, through custom_losses.sft_config.validate_recipe) calls a GPU with less than 15 % headroom tight.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prep.paths import resolve_path
from prep.qwen import VOCAB_ROWS

GIB = 2**30
NF4_BITS = 4 + 0.127          # 4-bit codes + double-quantised block constants (QLoRA paper)
INT8_BITS = 8 + 32 / 4096     # LLM.int8 rows with an fp32 scale (negligible)
CUDA_CONTEXT_GIB = 0.75
ALLOCATOR_SLACK = 0.05
HF_LOGITS_BYTES = 12          # bf16 logits -> fp32 copy -> log_softmax saved + its gradient
DS_DEFAULT_BUCKET = 5e8       # DeepSpeed's default allgather/reduce bucket size (elements)
ESTIMATE_TOLERANCE = 0.15     # the estimator's error against the published measurements below


class PreflightError(ValueError):
    """One sentence saying what is wrong and where, raised before any GPU time is spent."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool = False
    # (d_in, d_out) of each linear in one decoder layer; LoRA with all-linear targets adapts each.
    linears: tuple[tuple[int, int], ...] = ()
    bias_per_layer: int = -1             # Qwen2 has q/k/v biases; -1 = q + 2 * kv

    def __post_init__(self):
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        q = self.heads * self.head_dim
        if not self.linears:
            object.__setattr__(self, "linears", ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)))
        if self.bias_per_layer < 0:
            object.__setattr__(self, "bias_per_layer", q + 2 * kv)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_params(self) -> int:
        return self.layers * sum(d_in * d_out for d_in, d_out in self.linears)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.linear_params + self.embedding_params + norms + self.layers * self.bias_per_layer

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (d_in + d_out) for d_in, d_out in self.linears)

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "model") -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(name=name, vocab=config["vocab_size"], hidden=config["hidden_size"],
                   intermediate=config["intermediate_size"], layers=config["num_hidden_layers"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   tied_embeddings=bool(config.get("tie_word_embeddings", False)))


# Qwen/Qwen2.5-7B-Instruct config.json: 7,615,616,512 parameters.
QWEN25_7B = ModelShape("Qwen2.5-7B-Instruct", vocab=VOCAB_ROWS, hidden=3584, intermediate=18944, layers=28,
                       heads=28, kv_heads=4, head_dim=128)
# Qwen/Qwen-7B (v1), the model of the Qwen team's published profile: fused c_attn (q, k, v), MHA.
QWEN1_7B = ModelShape("Qwen-7B", vocab=151936, hidden=4096, intermediate=11008, layers=32, heads=32,
                      kv_heads=32, head_dim=128,
                      linears=((4096, 3 * 4096), (4096, 4096), (4096, 11008), (4096, 11008), (11008, 4096)),
                      bias_per_layer=3 * 4096)
KNOWN_SHAPES = {"qwen/qwen2.5-7b-instruct": QWEN25_7B, "qwen/qwen2.5-7b": QWEN25_7B}


@dataclass(frozen=True)
class Setup:
    """What a recipe decides about memory, independent of Axolotl's spelling."""

    method: str = "qlora"                 # full | lora | qlora
    weight_bits: int = 16                 # 16, 8 or 4 for the frozen base weights
    lora_rank: int = 32
    lora_dropout: float = 0.0
    seq_len: int = 4096
    micro_batch: int = 1
    gradient_checkpointing: bool = True
    flash_attention: bool = True          # flash-attention 2 / sdpa: no [heads x s x s] scores kept
    fused_cross_entropy: bool = False     # Liger fused linear cross-entropy
    logits_bytes: float = HF_LOGITS_BYTES
    act_bytes: int = 2                    # bf16 activations; 4 for an fp32 run
    optimizer_state_bytes: float = 8      # AdamW 32-bit moments per trainable param; 2 for 8-bit
    gpus: int = 1
    zero_stage: int = 0                   # 0 = plain DDP / one GPU
    offload_optimizer: bool = False
    offload_params: bool = False
    bucket_elements: float = 0            # DeepSpeed communication buckets (elements, each)


@dataclass
class Estimate:
    shape: str
    setup: Setup
    terms: dict[str, float] = field(default_factory=dict)       # GiB per GPU
    activations_no_checkpointing: float = 0.0                   # GiB, for comparison

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def table(self) -> str:
        lines = [f"{name:<28}{value:8.2f} GiB" for name, value in self.terms.items()]
        lines.append(f"{'peak per GPU':<28}{self.total:8.2f} GiB")
        lines.append(f"{'(activations w/o checkpointing':<28}{self.activations_no_checkpointing:8.2f} GiB)")
        return "\n".join(lines)


def layer_activation_bytes(shape: ModelShape, setup: Setup) -> float:
    """Bytes kept per token by one decoder layer for its backward pass (no checkpointing)."""
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    elements = 6 * h + 2 * kv + 4 * i
    total = elements * setup.act_bytes
    if setup.method in ("lora", "qlora") and setup.lora_dropout > 0:
        adapted_inputs = sum(d_in for d_in, _ in shape.linears)
        total += adapted_inputs * (setup.act_bytes + 1)          # dropped copy + bool mask
    if not setup.flash_attention:
        total += shape.heads * setup.seq_len * (2 * setup.act_bytes)   # scores + probabilities, per query token
    return total


def weight_bytes(shape: ModelShape, setup: Setup) -> float:
    """Frozen or trained base weights per GPU."""
    if setup.weight_bits == 4:
        weights = shape.linear_params * NF4_BITS / 8 + (shape.params - shape.linear_params) * 2
    elif setup.weight_bits == 8:
        weights = shape.linear_params * INT8_BITS / 8 + (shape.params - shape.linear_params) * 2
    else:
        weights = shape.params * 2
    if setup.zero_stage >= 3:
        largest_layer = sum(d_in * d_out for d_in, d_out in shape.linears) * 2
        weights = (0 if setup.offload_params else weights / max(setup.gpus, 1)) + 2 * largest_layer  # + gathered layers
    return weights


def trainable_terms(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """Trainable parameters, their gradients and optimiser states per GPU, in GiB."""
    n = max(setup.gpus, 1)
    if setup.method == "full":
        trainable = shape.params
        grads = trainable * 2 / (n if setup.zero_stage >= 2 else 1)
        master_and_moments = trainable * (4 + setup.optimizer_state_bytes)
        if setup.zero_stage >= 1:
            master_and_moments /= n
        if setup.offload_optimizer:
            master_and_moments = 0
        return {"gradients": grads / GIB, "optimizer (master + moments)": master_and_moments / GIB}
    trainable = shape.lora_params(setup.lora_rank)
    if setup.zero_stage >= 1:
        # DeepSpeed keeps the module's copy in bf16 and an fp32 master + moments, sharded.
        weights_and_grads = trainable * (2 + 2 / (n if setup.zero_stage >= 2 else 1))
        state = 0 if setup.offload_optimizer else trainable * (4 + setup.optimizer_state_bytes) / n
    else:
        weights_and_grads, state = trainable * 8, trainable * setup.optimizer_state_bytes
    return {"LoRA weights + grads": weights_and_grads / GIB, "LoRA optimizer": state / GIB}


def logits_bytes(shape: ModelShape, setup: Setup, tokens: int) -> float:
    """The loss's logits: [tokens x vocab] at logits_bytes each, or Liger's fused chunks."""
    if not setup.fused_cross_entropy:
        return tokens * shape.vocab * setup.logits_bytes
    inc = math.ceil(shape.vocab / shape.hidden)
    chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / inc))))
    logits = 2 * chunk * shape.vocab * 4 + tokens * shape.hidden * 4
    if setup.method == "full":
        logits += shape.vocab * shape.hidden * 4        # Liger accumulates lm_head's grad in fp32
    return logits


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    tokens = setup.seq_len * setup.micro_batch
    terms = {"weights": weight_bytes(shape, setup) / GIB, **trainable_terms(shape, setup)}
    if setup.bucket_elements:
        terms["DeepSpeed buckets"] = 2 * setup.bucket_elements * 2 / GIB

    # Activations.
    per_layer = layer_activation_bytes(shape, setup) * tokens
    checkpoints = shape.layers * shape.hidden * setup.act_bytes * tokens
    no_ckpt = shape.layers * per_layer
    activations = checkpoints + 2 * per_layer if setup.gradient_checkpointing else no_ckpt
    terms["activations"] = activations / GIB
    terms["logits + loss"] = logits_bytes(shape, setup, tokens) / GIB

    if setup.weight_bits == 4:
        terms["dequantisation buffer"] = max(d_in * d_out for d_in, d_out in shape.linears) * 2 / GIB
    subtotal = sum(terms.values())
    terms["CUDA context + allocator"] = CUDA_CONTEXT_GIB + ALLOCATOR_SLACK * subtotal
    return Estimate(shape.name, setup, terms, activations_no_checkpointing=no_ckpt / GIB)


# ---- reading an Axolotl config ------------------------------------------------------------------

def _deepspeed_config(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value:
        return json.loads(resolve_path(value).read_text(encoding="utf-8"))
    return {}


def setup_from_config(config: dict[str, Any], gpus: int = 1) -> Setup:
    """The memory-relevant decisions of a (composed) Axolotl config."""
    adapter = config.get("adapter")
    method = "qlora" if adapter == "qlora" else "lora" if adapter == "lora" else "full"
    bits = 4 if config.get("load_in_4bit") else 8 if config.get("load_in_8bit") else 16
    attn = config.get("attn_implementation") or ("flash_attention_2" if config.get("flash_attention") else
                                                  "sdpa" if config.get("sdp_attention") else "eager")
    plugins = config.get("plugins") or []
    liger = (any("liger" in str(plugin).lower() for plugin in plugins)
             and bool(config.get("liger_fused_linear_cross_entropy")))
    optimizer = str(config.get("optimizer") or "adamw_torch")
    ds = _deepspeed_config(config.get("deepspeed"))
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0)) if ds else 0
    fp32 = not (config.get("bf16") or config.get("fp16"))
    buckets = 0.0
    if ds:
        # Stage 2 all-gathers and reduces in buckets of these sizes; stage 3 only reduces. "auto" is
        # hidden_size**2 in the HF integration: a few MB, left out.
        sizes = [zero.get("reduce_bucket_size", DS_DEFAULT_BUCKET)]
        if stage <= 2:
            sizes.append(zero.get("allgather_bucket_size", DS_DEFAULT_BUCKET))
        numeric = [float(size) for size in sizes if not isinstance(size, str)]
        buckets = max(numeric) if numeric else 0.0
    return Setup(
        method=method, weight_bits=bits if method != "full" else 16,
        lora_rank=int(config.get("lora_r") or 0), lora_dropout=float(config.get("lora_dropout") or 0.0),
        seq_len=int(config.get("sequence_len") or 512), micro_batch=int(config.get("micro_batch_size") or 1),
        gradient_checkpointing=bool(config.get("gradient_checkpointing")),
        flash_attention=attn not in ("eager",), fused_cross_entropy=liger,
        act_bytes=4 if fp32 else 2,
        optimizer_state_bytes=2 if "8bit" in optimizer else 8,
        gpus=gpus, zero_stage=stage,
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None),
        offload_params=(zero.get("offload_param") or {}).get("device", "none") not in ("none", None),
        bucket_elements=buckets,
    )


def shape_for(base_model: str) -> ModelShape:
    """The base model's shape: its config.json when local (or in the HF cache), else a known Qwen2.5-7B id."""
    folder = Path(base_model)
    config_path = folder / "config.json"
    if not config_path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_model, "config.json")
            config_path = Path(cached) if isinstance(cached, str) else config_path
        except Exception:  # an id that is not a repo name, or no huggingface_hub
            pass
    if config_path.exists():
        return ModelShape.from_config(json.loads(config_path.read_text(encoding="utf-8")), name=base_model)
    known = KNOWN_SHAPES.get(base_model.lower())
    if known is None:
        raise ValueError(f"base_model '{base_model}': no local config.json and not a known shape "
                         f"({', '.join(KNOWN_SHAPES)})")
    return known


def estimate_config(config: dict[str, Any], gpus: int = 1) -> Estimate:
    return estimate(shape_for(str(config["base_model"])), setup_from_config(config, gpus))


# ---- the GPUs here -------------------------------------------------------------------------------

def gpu_memories_gib() -> list[tuple[str, float]]:
    """(name, GiB) of each CUDA GPU this process sees (CUDA_VISIBLE_DEVICES applies); [] without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory / GIB)
                for i in range(torch.cuda.device_count())]
    except Exception:  # no CUDA build, no driver: a CPU machine
        return []


def needs_gpu(config: dict[str, Any]) -> list[str]:
    """What in a composed Axolotl config only runs on a CUDA GPU."""
    reasons = []
    if config.get("bf16") is True or config.get("fp16") is True:
        reasons.append("bf16/fp16")
    if str(config.get("attn_implementation") or "").startswith("flash_attention"):
        reasons.append(str(config["attn_implementation"]))
    kernels = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
    if any(config.get(key) for key in kernels):
        reasons.append("Axolotl's LoRA kernels")
    if any("liger" in str(plugin).lower() for plugin in config.get("plugins") or []):
        reasons.append("Liger kernels")
    if config.get("deepspeed"):
        reasons.append("DeepSpeed (NCCL)")
    return reasons


def check_fits(config: dict[str, Any], source: str = "the SFT config", force: bool = False,
               require_gpu: bool = True, gpus: list[tuple[str, float]] | None = None) -> str:
    """Hold a composed Axolotl config against the GPUs here (or GPUS): a one-line note when it fits.

    PreflightError when it needs a GPU and none is visible (unless not REQUIRE_GPU: then the note says
    so) or when the estimate exceeds the smallest GPU (unless FORCE: then the note is a warning).
    """
    gpus = gpu_memories_gib() if gpus is None else gpus
    reasons = needs_gpu(config)
    if not gpus:
        if not reasons:
            return "no GPU: CPU run (fp32, tiny model)"
        if require_gpu:
            raise PreflightError(f"{source}: needs a CUDA GPU ({', '.join(reasons)}) and none is visible; "
                                 f"for a CPU smoke run add --overlay recipes/sft/overrides/cpu-tiny.yaml")
        return f"needs a CUDA GPU ({', '.join(reasons)}), none is visible here: memory not checked"
    peak = estimate_config(config, len(gpus)).total
    name, smallest = min(gpus, key=lambda gpu: gpu[1])
    message = (f"predicted peak {peak:.1f} GiB per GPU on {len(gpus)} GPU(s); "
               f"smallest has {smallest:.1f} GiB ({name})")
    if peak > smallest:
        if not force:
            raise PreflightError(f"{source}: {message}: it will not fit; use more GPUs, the QLoRA recipe, "
                                 f"a smaller micro_batch_size or sequence_len (or --force)")
        return f"warning: {message}; continuing (--force)"
    if peak * (1 + ESTIMATE_TOLERANCE) > smallest:
        return f"warning: {message}: tight, within the estimator's {ESTIMATE_TOLERANCE:.0%} error"
    return f"memory: {message}"
