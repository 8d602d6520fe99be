"""The smoke check's steps (custom_losses.checks.smoke runs them; launch.bench_gpu times them).

What a step needs and does, without the reporting: which optional modules import here (and what their absence
leaves out), the random-weight student of a config (built once per config and cached), measuring in a fresh
process with its own peak memory, and the two kinds of optimiser step:

  sft      the pipeline's SFT recipe as Axolotl would set it up (dtype, 4/8-bit quantisation, LoRA, gradient
           checkpointing, attention, Liger's kernels when named), on packed rows, in transformers + peft;
  distill  the pipeline's distill recipe through custom_losses.train.distill.build_trainer, on soft-label rows
           saved as a datasets folder, with the overrides that make it a few steps that save nothing.

Each step function returns plain data (seconds, tokens, losses, case lengths per step, peak bytes) so it can run
in a spawned process on a GPU and be reported by the caller.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib.util
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prep.paths import DATA_DIR, cache_dir

QWEN25_7B_CONFIG = DATA_DIR / "models" / "qwen2.5-7b-instruct.json"
SEED = 1234
# What a missing optional module costs, by the name it is imported as (launch.bench_gpu prints the same lines).
OPTIONAL_MODULES = {
    "vllm": "no serving request (medkd runs vLLM from its own environment, .venv-vllm)",
    "bitsandbytes": "the 4-bit (QLoRA) steps are left out",
    "flash_attn": "flash_attention_2 recipes run with sdpa instead",
    "liger_kernel": "plain cross-entropy on full logits instead of Liger's fused kernels",
    "axolotl": "no Axolotl fused top-k KD in the loss comparison",
    "deepspeed": "one process, no ZeRO (the recipes' deepspeed key is dropped)",
    "trl": "no distill steps (medkd's trainer subclasses TRL's); the CE comparison uses a copy of TRL's algorithm",
}


def module_present(name: str) -> bool:
    """NAME is importable here (found, not imported: importing vLLM or DeepSpeed takes seconds)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_modules(import_names: dict[str, str] | None = None, wanted: Sequence[str] = tuple(OPTIONAL_MODULES)
                    ) -> dict[str, str]:
    """{module: 'skip MODULE: not installed; what is left out'} for each of WANTED that does not import.
    IMPORT_NAMES maps a module to the name it is looked up by (a name that does not exist shows the skip path)."""
    names = import_names or {}
    return {module: f"skip {module}: not installed; {OPTIONAL_MODULES[module]}"
            for module in wanted if not module_present(names.get(module, module))}


# ---- the model -----------------------------------------------------------------------------------

def model_config(tiny: bool) -> dict[str, Any]:
    """The student's config.json: the tiny fixture's, or Qwen2.5-7B-Instruct's published one."""
    if tiny:
        from prep.testing.tiny_model import TINY_CONFIG

        return {**TINY_CONFIG, "torch_dtype": "float32"}
    return json.loads(QWEN25_7B_CONFIG.read_text(encoding="utf-8"))


def build_random_model(config: dict[str, Any], out_dir: str | Path, device: str) -> Path:
    """A random-weight model of CONFIG (built on DEVICE, saved in its torch_dtype) with the Qwen2.5 tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from prep.testing.tiny_model import GENERATION_CONFIG
    from prep.tokenizer import tokenizer_dir

    out_dir = Path(out_dir)
    shape = {key: value for key, value in config.items() if key not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(SEED)
    # Built in its saved dtype on DEVICE: the 7B in bf16 is 15 GB where fp32 first would need 46 GB at the peak.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **shape),
                                                 dtype=getattr(torch, config.get("torch_dtype") or "float32"))
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    for name in os.listdir(tokenizer_dir()):
        shutil.copy2(tokenizer_dir() / name, out_dir / name)
    return out_dir


def random_model_dir(config: dict[str, Any], device: str) -> Path:
    """The cached random-weight model of CONFIG (built once per config: 15 GB for the 7B, so it is reused)."""
    from prep.jsonio import build_dir_once

    digest = hashlib.sha256(json.dumps([config, SEED], sort_keys=True).encode()).hexdigest()[:10]
    name = f"random-{config['model_type']}-h{config['hidden_size']}-l{config['num_hidden_layers']}-{digest}"
    return build_dir_once(cache_dir() / name, lambda out: build_random_model(config, out, device))


# ---- measuring -----------------------------------------------------------------------------------

def _first_gpu_only() -> None:
    """In the child, before CUDA starts: one GPU. A single process that sees several makes transformers' Trainer
    wrap the model in torch.nn.DataParallel, which is neither what a recipe runs nor what one GPU measures."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0] if visible else "0"


def in_fresh_process(fn: Callable, *args: Any) -> Any:
    """FN(*ARGS) in a spawned process on the first visible GPU: its peak memory is its own and its kernels'
    patches (Liger) stay there. A killed child (out of memory) raises RuntimeError."""
    context = mp.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context,
                                                    initializer=_first_gpu_only) as pool:
            return pool.submit(fn, *args).result()
    except concurrent.futures.process.BrokenProcessPool:
        raise RuntimeError("the measuring process died (out of memory?)") from None


@contextlib.contextmanager
def peak_memory(device: str):
    """Yields a dict filled on exit with peak_bytes (CUDA: max allocated; CPU: peak RSS above the start) and
    reserved_bytes (CUDA's caching allocator; the CPU peak again)."""
    import torch

    from custom_losses.checks.loss_bench import cpu_rss_bytes, reset_cpu_peak

    result: dict[str, float] = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = 0
    else:
        reset_cpu_peak()
        base = cpu_rss_bytes("VmRSS")
    try:
        yield result
    finally:
        if device == "cuda":
            torch.cuda.synchronize()
            result.update(peak_bytes=torch.cuda.max_memory_allocated(), reserved_bytes=torch.cuda.max_memory_reserved())
        else:
            peak = cpu_rss_bytes("VmHWM") - base
            result.update(peak_bytes=peak, reserved_bytes=peak)


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---- SFT: the Axolotl recipe's model, adapter and batches in transformers + peft ------------------

def sft_dtype(config: dict[str, Any]) -> str:
    return "bfloat16" if config.get("bf16") is True else "float16" if config.get("fp16") is True else "float32"


def sft_attention(config: dict[str, Any], import_names: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """The attention the recipe names, or sdpa with a skip line when it names flash_attention_2 and flash_attn is
    not installed."""
    attn = str(config.get("attn_implementation") or ("flash_attention_2" if config.get("flash_attention") else "sdpa"))
    if attn.startswith("flash_attention") and not module_present((import_names or {}).get("flash_attn", "flash_attn")):
        return "sdpa", [f"skip flash_attn: not installed; {OPTIONAL_MODULES['flash_attn']}"]
    return attn, []


def sft_uses_liger(config: dict[str, Any], device: str, import_names: dict[str, str] | None = None
                   ) -> tuple[bool, list[str]]:
    wanted = any("liger" in str(plugin).lower() for plugin in config.get("plugins") or [])
    if not wanted:
        return False, []
    if device != "cuda":
        return False, ["skip liger_kernel: its Triton kernels need CUDA; plain cross-entropy instead"]
    if not module_present((import_names or {}).get("liger_kernel", "liger_kernel")):
        return False, [f"skip liger_kernel: not installed; {OPTIONAL_MODULES['liger_kernel']}"]
    return True, []


def sft_features(rows: Sequence[dict[str, Any]], tokenizer: Any) -> list[dict[str, list[int]]]:
    """Each soft-label row as an SFT example: the chat template's prompt and the answer, loss on the answer only
    (train_on_inputs: false), the ids build_kd_features gives (without the trainer module, which needs TRL)."""
    from prep.tokenizer import chat_token_ids

    features = []
    for row in rows:
        prompt = chat_token_ids(tokenizer, row["messages"][:-1], add_generation_prompt=True)
        answer = list(row["answer_token_ids"])
        features.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return features


def sft_batches(features: Sequence[dict[str, list[int]]], sequence_len: int, micro_batch: int, count: int
                ) -> list[dict[str, list[int]]]:
    """COUNT micro-batches of MICRO_BATCH packed rows of up to SEQUENCE_LEN tokens (Axolotl's sample_packing),
    each micro-batch's rows concatenated (padding-free, position ids restarting per case), cycling through the
    rows. Cases longer than SEQUENCE_LEN are left out (Axolotl's recipes refuse them: excess_length_strategy)."""
    from custom_losses.kd.packing import pack_by_length

    fitting = [feature for feature in features if len(feature["input_ids"]) <= sequence_len]
    if not fitting:
        raise ValueError(f"no case fits sequence_len {sequence_len}")
    rows = pack_by_length([len(feature["input_ids"]) for feature in fitting], sequence_len)
    batches = []
    for index in range(count):
        cases = [case for j in range(micro_batch) for case in rows[(index * micro_batch + j) % len(rows)]]
        batches.append({"input_ids": [t for case in cases for t in fitting[case]["input_ids"]],
                        "labels": [t for case in cases for t in fitting[case]["labels"]],
                        "seq_lengths": [len(fitting[case]["input_ids"]) for case in cases]})
    return batches


def load_sft_model(config: dict[str, Any], model_dir: str, device: str, attn: str) -> Any:
    """The recipe's student: its dtype, 4/8-bit quantisation, LoRA and gradient checkpointing (as Axolotl sets them)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, sft_dtype(config))
    quantization = None
    if config.get("load_in_4bit"):
        kwargs = config.get("bnb_config_kwargs") or {}
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype,
                                          bnb_4bit_quant_type=kwargs.get("bnb_4bit_quant_type", "nf4"),
                                          bnb_4bit_use_double_quant=bool(kwargs.get("bnb_4bit_use_double_quant", True)))
    elif config.get("load_in_8bit"):
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn,
                                                 quantization_config=quantization,
                                                 device_map={"": 0} if device == "cuda" else None)
    checkpointing = bool(config.get("gradient_checkpointing"))
    kwargs = config.get("gradient_checkpointing_kwargs") or {"use_reentrant": False}
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=kwargs)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    # As Axolotl 0.19 does for a LoRA/QLoRA adapter (ModelLoader._configure_embedding_dtypes): the norms and the
    # embedding and output layers, which the k-bit preparation upcasts to fp32, go back to the compute dtype.
    for name, module in model.named_modules():
        if "norm" in name or (name.endswith(("embed_tokens", "lm_head")) and hasattr(module, "weight")):
            module.to(dtype)
    targets: Any = list(config.get("lora_target_modules") or [])
    if config.get("lora_target_linear"):
        targets = "all-linear" if not targets else sorted({*targets, "q_proj", "k_proj", "v_proj", "o_proj",
                                                           "gate_proj", "up_proj", "down_proj"})
    lora = LoraConfig(r=int(config["lora_r"]), lora_alpha=int(config.get("lora_alpha") or config["lora_r"]),
                      lora_dropout=float(config.get("lora_dropout") or 0.0), target_modules=targets or None,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def sft_steps(config: dict[str, Any], model_dir: str, batches: list[dict[str, Any]], device: str, attn: str,
              liger: bool) -> dict[str, Any]:
    """Optimiser steps of one micro-batch each (the first a warm-up); tokens, seconds and loss of each, peak memory."""
    import torch

    if liger:  # before the model is built: Liger patches Qwen2's modules (this runs in a fresh process on CUDA)
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=bool(config.get("liger_rope")), rms_norm=bool(config.get("liger_rms_norm")),
                                    swiglu=bool(config.get("liger_glu_activation")), cross_entropy=False,
                                    fused_linear_cross_entropy=bool(config.get("liger_fused_linear_cross_entropy")))
    torch.manual_seed(SEED)
    with peak_memory(device) as memory:
        model = load_sft_model(config, model_dir, device, attn)
        trainable = [param for param in model.parameters() if param.requires_grad]
        fused = device == "cuda" and "fused" in str(config.get("optimizer") or "")
        optimizer = torch.optim.AdamW(trainable, lr=float(config.get("learning_rate") or 2e-4),
                                      weight_decay=float(config.get("weight_decay") or 0.0), fused=fused or None)
        model.train()
        times, losses = [], []
        for batch in batches:
            tensors = {key: torch.tensor([batch[key]], device=model.device) for key in ("input_ids", "labels")}
            tensors["position_ids"] = torch.cat([torch.arange(length) for length in batch["seq_lengths"]])[None].to(
                model.device)
            synchronize(device)
            start = time.perf_counter()
            loss = model(**tensors).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, float(config.get("max_grad_norm") or 1.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
    return {"times": times, "losses": losses, "tokens": [len(batch["input_ids"]) for batch in batches],
            "segments": [list(batch["seq_lengths"]) for batch in batches],
            "label_tokens": [sum(label != -100 for label in batch["labels"]) for batch in batches], **memory}


# ---- distill: medkd's own trainer on synthetic soft labels ---------------------------------------

class _CountingCollator:
    """The trainer's collator, recording each micro-batch's real tokens, answer tokens and case lengths."""

    def __init__(self, collator: Any):
        self.collator, self.batches = collator, []

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        from custom_losses.kd.packing import row_segments

        segments = [length for feature in features for length, _ in row_segments(feature)]
        answers = sum(answer for feature in features for _, answer in row_segments(feature))
        self.batches.append({"tokens": sum(segments), "segments": segments, "label_tokens": answers})
        return self.collator(features)


def distill_steps(recipe: str, overlays: Sequence[str], overrides: Sequence[str], device: str) -> dict[str, Any]:
    """max_steps optimiser steps of the distill recipe through custom_losses.train.distill.build_trainer; per step its
    seconds, tokens and loss, and the peak memory."""
    from transformers import PrinterCallback, TrainerCallback

    from custom_losses.train.distill import build_trainer, parse_recipe

    timings: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            timings.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with peak_memory(device) as memory:
        script_args, training_args, model_args = parse_recipe(recipe, list(overlays), list(overrides))
        trainer, _, _ = build_trainer(script_args, training_args, model_args)
        counter = _CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(Timer())
        trainer.train()
    steps = len(timings)
    # One micro-batch per optimiser step (gradient accumulation 1); the dataloader may fetch one ahead.
    batches = counter.batches[:steps]
    return {"times": timings, "losses": losses, "tokens": [batch["tokens"] for batch in batches],
            "segments": [batch["segments"] for batch in batches],
            "label_tokens": [batch["label_tokens"] for batch in batches], **memory}


def save_rows(rows: list[dict[str, Any]], folder: Path) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(folder))
    return folder


def distill_overrides(model_dir: str | Path, dataset_dir: Path, work: Path, steps: int,
                      extra: Sequence[str] = ()) -> list[str]:
    """What the smoke changes in a distill recipe: the random model, synthetic data, a few steps, nothing saved."""
    quoted = lambda key, path: f"{key}={json.dumps(str(path))}"
    return [*extra, quoted("model_name_or_path", model_dir), quoted("dataset_path", dataset_dir),
            quoted("output_dir", work), f"max_steps={steps}", "gradient_accumulation_steps=1", "save_strategy='no'",
            "eval_strategy='no'", "dataloader_num_workers=0", "dataset_eval_split=null", "report_to=none", "merge=false", "logging_steps=1",
            "disable_tqdm=true", "deepspeed=null", "tokenizer_path=null", "init_adapter_path=null"]
