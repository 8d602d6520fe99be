"""Predict the peak GPU memory of an SFT or distill recipe before any GPU time is spent.

    python -m launch.estimate_memory --config RECIPE [--overlay FILE]... [--set key=value]... [--gpus N]
                                     [--model ID]

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

Stage two (distill recipes, TRL's keys; setup_from_distill) has the same terms except the loss: no
full logits are built; custom_losses.kd.kd_loss runs inside the head's call and walks the answer tokens in
chunks, holding [chunk x vocab] fp32 logits and logsumexp's temporary of the same size (8 B per element), the answer
hidden states and their gradient, and, for a trained head, a [vocab x hidden] gradient buffer; under
ZeRO-3 / FSDP full shard the head is gathered whole (kd_loss_bytes). custom_losses.checks.loss_bench measures
the loss's real peak on CPU in fp32, and tests/test_estimate_memory.py holds this term to it.

tests/test_estimate_memory.py checks the model against published measurements of Qwen-7B fine-tuning on one
A100-80G with flash-attention 2, micro-batch 1 and gradient checkpointing: the Qwen team's profile (README of
github.com/QwenLM/Qwen, "Profiling of Memory and Speed": LoRA r=64 on c_attn/c_proj/w1/w2, dropout 0.05, bf16;
Q-LoRA on the GPTQ Int4 model under DeepSpeed ZeRO-2; full fine-tune on 2 GPUs with ZeRO-2), whose model
computes the loss on 16-bit logits, so those checks use logits_bytes=8 rather than transformers' 12; and
LLaMA-Factory's hardware table (README, marked "estimated"), a rule of thumb for the static part (weights +
trainable states). ms-swift's benchmark (docs/source_en/LLM/Benchmark.md) reports more than the Qwen team for
a smaller adapter, so it is not used as a check. The figures and the gaps are in docs/MEASUREMENTS.md's
table. This repo's own recipes have predictions only until a GPU run measures them (`launch.doctor
--smoke` prints the measured peak beside the estimate). `check_fits` (the one GPU-memory check: launch.sft's
preflight and the pipeline's, through custom_losses.train.sft_config.validate_recipe) calls a GPU with less
than 15 % headroom tight.
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
NF4_SINGLE_BITS = 4 + 0.5     # without double quantisation: one fp32 absmax per block of 64
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

    def lora_params(self, rank: int, targets: tuple[str, ...] = ()) -> int:
        """LoRA A/B parameters: every decoder linear (TARGETS empty, PEFT's all-linear, which leaves the
        output layer out) or the named ones (Qwen2/Llama module names; `lm_head` adapts the output layer)."""
        if not targets:
            return self.layers * sum(rank * (d_in + d_out) for d_in, d_out in self.linears)
        named = dict(zip(LINEAR_NAMES, self.linears)) if len(self.linears) == len(LINEAR_NAMES) else {}
        unknown = [name for name in targets if name not in named and name != "lm_head"]
        if unknown:
            raise ValueError(f"lora_target_modules {unknown}: not a linear of {self.name} "
                             f"({', '.join([*named, 'lm_head'])})")
        per_layer = sum(rank * (d_in + d_out) for name, (d_in, d_out) in named.items() if name in targets)
        return self.layers * per_layer + (rank * (self.hidden + self.vocab) if "lm_head" in targets else 0)

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
# The decoder linears of ModelShape's default layout, in its order (Qwen2/Llama module names).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KNOWN_SHAPES = {"qwen/qwen2.5-7b-instruct": QWEN25_7B, "qwen/qwen2.5-7b": QWEN25_7B}


@dataclass(frozen=True)
class Setup:
    """What a recipe decides about memory, independent of Axolotl's spelling."""

    method: str = "qlora"                 # full | lora | qlora
    weight_bits: int = 16                 # 32, 16, 8 or 4 for the base weights
    double_quant: bool = True             # NF4 block constants quantised again (4.127 bits), else 4.5 bits
    lora_rank: int = 32
    lora_targets: tuple[str, ...] = ()    # () = every decoder linear (all-linear)
    adapter_bytes: int = 4                # LoRA A/B dtype without DeepSpeed: fp32 (PEFT's upcast) or bf16
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
    sharding: str = "ZeRO"                # ZeRO (DeepSpeed) or FSDP (see _fsdp_settings)
    master_weights: bool = True           # full fine-tune: an fp32 master copy beside 16-bit weights and grads
                                          # (AMP, DeepSpeed); False: grads and moments in the weights' dtype
    loss: str = "cross_entropy"           # cross_entropy (SFT) | topk_kd (custom_losses.kd.kd_loss, stage two)
    kd_chunk_size: int = 256              # answer tokens per chunk of the fused KD loss
    kd_chunk_bytes: float = 8             # bytes per [chunk x vocab] element at the KD loss's peak


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
        bits = NF4_BITS if setup.double_quant else NF4_SINGLE_BITS
        weights = shape.linear_params * bits / 8 + (shape.params - shape.linear_params) * 2
    elif setup.weight_bits == 8:
        weights = shape.linear_params * INT8_BITS / 8 + (shape.params - shape.linear_params) * 2
    else:
        weights = shape.params * setup.weight_bits / 8
    if setup.zero_stage >= 3:
        largest_layer = sum(d_in * d_out for d_in, d_out in shape.linears) * 2
        weights = (0 if setup.offload_params else weights / max(setup.gpus, 1)) + 2 * largest_layer  # + gathered layers
        if setup.sharding.startswith("FSDP") and not shape.tied_embeddings:
            # FSDP wraps the decoder layers; the embeddings, final norm and head form the root unit, which
            # stays gathered from forward to the end of backward (FSDP2's root never reshards after forward).
            # The head is counted with the KD loss ("KD gathered lm_head"); the input embeddings here.
            weights += shape.vocab * shape.hidden * 2
    return weights


def trainable_terms(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """Trainable parameters, their gradients and optimiser states per GPU, in GiB."""
    n = max(setup.gpus, 1)
    if setup.method == "full":
        trainable = shape.params
        grad_bytes = 2 if setup.master_weights else setup.weight_bits / 8
        grads = trainable * grad_bytes / (n if setup.zero_stage >= 2 else 1)
        master_and_moments = trainable * ((4 if setup.master_weights else 0) + setup.optimizer_state_bytes)
        if setup.zero_stage >= 1:
            master_and_moments /= n
        if setup.offload_optimizer:
            master_and_moments = 0
        label = "optimizer (master + moments)" if setup.master_weights else "optimizer (moments)"
        return {"gradients": grads / GIB, label: master_and_moments / GIB}
    trainable = shape.lora_params(setup.lora_rank, setup.lora_targets)
    if setup.zero_stage >= 1:
        # DeepSpeed keeps the module's copy in bf16 and an fp32 master + moments, sharded.
        weights_and_grads = trainable * (2 + 2 / (n if setup.zero_stage >= 2 else 1))
        state = 0 if setup.offload_optimizer else trainable * (4 + setup.optimizer_state_bytes) / n
    else:
        weights_and_grads, state = trainable * 2 * setup.adapter_bytes, trainable * setup.optimizer_state_bytes
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


def kd_loss_bytes(shape: ModelShape, setup: Setup, tokens: int) -> dict[str, float]:
    """What the KD loss holds beyond the model, per GPU, in bytes.

    custom_losses.kd.trainer runs custom_losses.kd.kd_loss.weighted_topk_kd_loss inside the output head's call
    (kd_head_forward): the head gets the final hidden states, keeps the answer positions (a copy, at most
    every token of the micro-batch) and allocates their gradient up front; per chunk the loss holds the
    fp32 logits [chunk x vocab] plus logsumexp's fp32 temporary of the same size (kd_chunk_bytes 8; 12
    with support "tail" at T != 1, whose z / T and its logsumexp temporary are two more). A trained head
    gets a full [vocab x hidden] gradient buffer in the weight's dtype, accumulated over the chunks and
    held until backward: unsharded and fully trained it becomes lm_head.grad (already under
    "gradients"); sharded (ZeRO-3 / FSDP full shard) it is extra, and the head's call gathers the
    weight whole (bf16). A LoRA on lm_head trains through W + B @ A: that sum and its gradient in the
    weight's dtype, and the delta B @ A in the adapter's dtype (its gradient in backward, same size).
    """
    h, v = shape.hidden, shape.vocab
    terms = {
        "KD chunk logits": min(setup.kd_chunk_size, tokens) * v * setup.kd_chunk_bytes,
        "KD answer hidden + grad": 2 * tokens * h * setup.act_bytes,
    }
    sharded = setup.zero_stage >= 3
    if sharded:
        terms["KD gathered lm_head"] = v * h * 2
    if setup.method == "full" and sharded:
        terms["KD lm_head gradient"] = v * h * setup.act_bytes
    elif setup.method != "full" and "lm_head" in setup.lora_targets:
        terms["KD lm_head W + B@A + grad"] = v * h * (2 * setup.act_bytes + setup.adapter_bytes)
    return terms


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
    if setup.loss == "topk_kd":
        terms.update({name: value / GIB for name, value in kd_loss_bytes(shape, setup, tokens).items()})
    else:
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


def _zero_settings(value: Any) -> dict[str, Any]:
    """Setup's DeepSpeed fields from a `deepspeed:` value (a JSON path or a dict; empty = no DeepSpeed)."""
    ds = _deepspeed_config(value)
    if not ds:
        return {"zero_stage": 0, "offload_optimizer": False, "offload_params": False, "bucket_elements": 0.0}
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    # Stage 2 all-gathers and reduces in buckets of these sizes; stage 3 only reduces. "auto" is
    # hidden_size**2 in the HF integration: a few MB, left out.
    sizes = [zero.get("reduce_bucket_size", DS_DEFAULT_BUCKET)]
    if stage <= 2:
        sizes.append(zero.get("allgather_bucket_size", DS_DEFAULT_BUCKET))
    numeric = [float(size) for size in sizes if not isinstance(size, str)]
    return {"zero_stage": stage,
            "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None),
            "offload_params": (zero.get("offload_param") or {}).get("device", "none") not in ("none", None),
            "bucket_elements": max(numeric) if numeric else 0.0}


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
    zero = _zero_settings(config.get("deepspeed"))
    fp32 = not (config.get("bf16") or config.get("fp16"))
    return Setup(
        method=method, weight_bits=bits if method != "full" else 16,
        lora_rank=int(config.get("lora_r") or 0), lora_dropout=float(config.get("lora_dropout") or 0.0),
        seq_len=int(config.get("sequence_len") or 512), micro_batch=int(config.get("micro_batch_size") or 1),
        gradient_checkpointing=bool(config.get("gradient_checkpointing")),
        flash_attention=attn not in ("eager",), fused_cross_entropy=liger,
        act_bytes=4 if fp32 else 2,
        optimizer_state_bytes=2 if "8bit" in optimizer else 8,
        gpus=gpus, **zero,
    )


def shape_for(base_model: str, key: str = "base_model", hint: str = "") -> ModelShape:
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
        raise ValueError(f"{key} '{base_model}': no local config.json and not a known shape "
                         f"({', '.join(KNOWN_SHAPES)}){hint}")
    return known


def estimate_config(config: dict[str, Any], gpus: int = 1) -> Estimate:
    return estimate(shape_for(str(config["base_model"])), setup_from_config(config, gpus))


# ---- reading a distill (TRL) recipe --------------------------------------------------------------

def _fsdp_settings(value: Any, fsdp_config: Any) -> dict[str, Any]:
    """Setup's sharding fields from TrainingArguments' `fsdp` (true, or the legacy "full_shard auto_wrap" or a
    list) and `fsdp_config` (version, reshard_after_forward, cpu_offload, activation_checkpointing), read as
    transformers 5 reads them; {} without FSDP.

    FSDP is counted as the ZeRO stage that shards the same things: resharding after forward (full_shard,
    hybrid_shard, FSDP2's default) as 3, keeping the gathered parameters for backward (shard_grad_op,
    reshard_after_forward false) as 2. Optimiser states follow the parameters' dtype (no master copy),
    see setup_from_distill.
    """
    config = fsdp_config if isinstance(fsdp_config, dict) else {}
    if isinstance(value, str):
        options = [option.lower() for option in value.split()]
    elif isinstance(value, (list, tuple)):
        options = [str(option).lower() for option in value]
    else:
        options = ["full_shard"] if value else []
    if not options:
        return {}
    reshard = config.get("reshard_after_forward")
    if reshard is None:
        reshard = not ({"shard_grad_op", "no_shard"} & set(options))
    stage = 3 if str(reshard).lower() in ("true", "full_shard", "hybrid_shard") else 2
    offload = "offload" in options or str(config.get("cpu_offload", False)).lower() == "true"
    return {"zero_stage": stage, "offload_optimizer": offload, "offload_params": offload and stage == 3,
            "bucket_elements": 0.0, "sharding": f"FSDP{int(config.get('version', 2))}"}


def _lora_targets(value: Any) -> tuple[str, ...]:
    """TRL's lora_target_modules: "all-linear" (or empty: PEFT's defaults for Qwen2, q_proj and v_proj) or names."""
    if value is None:
        return ("q_proj", "v_proj")
    if isinstance(value, str):
        return () if value == "all-linear" else (value,)
    return tuple(str(name) for name in value)


def setup_from_distill(config: dict[str, Any], gpus: int = 1) -> Setup:
    """The memory-relevant decisions of a (composed) distill recipe: TRL's ModelConfig and SFTConfig keys
    plus the KD knobs (recipes/distill/*.yaml), each missing key at TRL's default.

    Precision: TRL keeps a quantised model's LoRA adapters in bf16 (SFTTrainer casts them after
    get_peft_model), so QLoRA adapters cost 2 + 2 + 4 (bf16 AdamW moments: torch's AdamW keeps them in
    the parameter's dtype) = 8 B/param; a bf16 model's adapters are upcast to fp32 by PEFT, 16 B/param.
    Activations: a micro-batch is per_device_train_batch_size rows of up to max_length tokens, packed
    (kd_packing: true fills each row with several cases; kd_padding_free concatenates the rows) or not
    (the longest case sets the padded length): the peak is the same full micro-batch either way, packing
    only makes every step reach it.
    """
    quantised = 4 if config.get("load_in_4bit") else 8 if config.get("load_in_8bit") else 0
    method = ("qlora" if quantised == 4 else "lora") if config.get("use_peft") else "full"
    param_bytes = 4 if str(config.get("dtype") or "").endswith("float32") else 2
    mixed = bool(config.get("bf16") or config.get("fp16"))
    fp32 = param_bytes == 4 and not mixed
    fsdp_config = config.get("fsdp_config") if isinstance(config.get("fsdp_config"), dict) else {}
    if config.get("deepspeed"):
        sharding = _zero_settings(config.get("deepspeed"))
    else:
        sharding = _fsdp_settings(config.get("fsdp"), fsdp_config) or _zero_settings(None)
    adapter_bytes = 2 if quantised and not fp32 else 4
    optimizer = str(config.get("optim") or "adamw_torch_fused")
    eight_bit = "8bit" in optimizer
    master = True
    if method == "full" and not config.get("deepspeed"):
        # Without DeepSpeed nothing keeps an fp32 master copy: AdamW updates the parameters in their own
        # dtype, with gradients and moments in it too. transformers' Trainer does not upcast a bf16-loaded
        # model, and neither does accelerate 1.13's FSDP2 path (its upcast loop rebinds a local): such a run
        # trains pure bf16, 2 + 2 + 4 B/param, and loses updates below bf16's resolution. FSDP1 with mixed
        # precision does upcast the sharded parameters to fp32 (accelerate's "Upcasted low precision
        # parameters"): 4 + 4 + 8 B/param, as a float32-loaded model gets anywhere.
        master = False
        if sharding.get("sharding") == "FSDP1" and mixed:
            param_bytes = 4
        moments = 2 if eight_bit else 2 * param_bytes
    else:
        # AdamW's two moments in the trained parameters' dtype (LoRA without DeepSpeed); DeepSpeed keeps an
        # fp32 master + moments (trainable_terms).
        moments = 2 if eight_bit else 2 * adapter_bytes if method != "full" and not sharding["zero_stage"] else 8
    checkpointing = config.get("gradient_checkpointing", True) or str(fsdp_config.get("activation_checkpointing", "")).lower() == "true"
    support, temperature = config.get("kd_support", "renorm"), float(config.get("kd_temperature", 1.0))
    attn = str(config.get("attn_implementation") or "sdpa")
    return Setup(
        method=method, weight_bits=quantised or 8 * param_bytes, master_weights=master,
        double_quant=bool(config.get("use_bnb_nested_quant", False)),
        lora_rank=int(config.get("lora_r") or 16), lora_dropout=float(config.get("lora_dropout", 0.05) or 0.0),
        lora_targets=_lora_targets(config.get("lora_target_modules")), adapter_bytes=adapter_bytes,
        seq_len=int(config.get("max_length") or 1024), micro_batch=int(config.get("per_device_train_batch_size") or 8),
        gradient_checkpointing=bool(checkpointing),
        flash_attention=attn != "eager", act_bytes=4 if fp32 else 2, optimizer_state_bytes=moments, gpus=gpus,
        loss="topk_kd", kd_chunk_size=int(config.get("kd_chunk_size") or 256),
        kd_chunk_bytes=12 if support == "tail" and temperature != 1.0 else 8,
        **sharding,
    )


def shape_of_model(name: str) -> ModelShape:
    """shape_for a recipe's model_name_or_path (a hub id, a folder under the repo, or the tiny fixture)."""
    from prep.testing.tiny_model import resolve_model

    resolved = resolve_model(name)
    local = resolve_path(resolved)
    return shape_for(str(local) if local.is_dir() else resolved, key="model_name_or_path",
                     hint="; name the model it is made from (launch.estimate_memory --model ID)")


def estimate_distill(config: dict[str, Any], gpus: int = 1, model: str | None = None) -> Estimate:
    """Peak memory per GPU of a distill recipe; MODEL names the student's shape when model_name_or_path
    is a folder that does not exist yet (stage one's merged model: pass the model it was made from)."""
    shape = shape_of_model(model or str(config["model_name_or_path"]))
    return estimate(shape, setup_from_distill(config, gpus))


def estimate_recipe(config: dict[str, Any], gpus: int = 1, model: str | None = None) -> Estimate:
    """estimate_config for an Axolotl (SFT) config, estimate_distill for a TRL (distill) one."""
    if "model_name_or_path" in config and "base_model" not in config:
        return estimate_distill(config, gpus, model)
    return estimate(shape_for(model or str(config["base_model"])), setup_from_config(config, gpus))


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
