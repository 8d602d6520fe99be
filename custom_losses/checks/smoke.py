"""The real-shape smoke check behind `doctor --smoke` (and the steps `launch.bench_gpu` times).

For a pipeline recipe it builds the student's architecture with random weights (Qwen2.5-7B-Instruct's
published config, data/models/qwen2.5-7b-instruct.json; with `tiny` the tiny fixture's config), then:

  sft      a few optimiser steps of the pipeline's SFT recipe as composed for its run (overlays, --set):
           the recipe's precision, 4-bit quantisation, LoRA rank and targets, gradient checkpointing,
           attention and packed rows of sequence_len tokens (micro_batch_size rows, concatenated). Axolotl
           itself is not started (it needs a dataset on disk and minutes of preprocessing): the step is the
           same model, adapter and batch shape in transformers + peft, with Liger's kernels when the recipe
           names them and they import; Axolotl's fused LoRA kernels are not emulated.
  distill  a few optimiser steps of the pipeline's distill recipe through medkd's own trainer
           (custom_losses.train.distill.build_trainer: packing, collator, KD loss inside the head's call), on
           synthetic soft labels for the pipeline's train cases (custom_losses.checks.distill_bench).
  vllm     one chat request to a vLLM server of the same model (skipped, with a line saying why, when the
           vLLM environment is missing).

Each training part reports tokens/s, the peak memory next to custom_losses.train.memory's prediction, and the
estimated wall time of that pipeline step for the recipe's case files (cases x epochs x tokens per case /
measured tokens/s, on the GPUs visible). Gradient accumulation is set to 1 (tokens/s and peak memory do not
depend on it; the steps come sooner). Every line starts with `ok`, `skip` or `FAIL`.
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
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prep.config import compose
from prep.paths import DATA_DIR, cache_dir, resolve_path

QWEN25_7B_CONFIG = DATA_DIR / "models" / "qwen2.5-7b-instruct.json"
PARTS = ("sft", "distill", "vllm")
SEED = 1234
GIB = 2**30
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


# ---- the data: the pipeline's cases with synthetic answers and soft labels -----------------------

@dataclass
class SmokeData:
    cases_path: str
    cases_total: int                  # cases in the pipeline's train file
    case_tokens: float                # mean tokens of a case in training (chat template, prompt, answer)
    top_k: int
    rows: list[dict[str, Any]]        # soft-label rows in prep.stages.softlabels' layout, a few cases
    answers_from: str


def stand_in_answers(cases: Sequence[Any]) -> tuple[list[Any], str]:
    """Answers to train on before any teacher has answered: the published examples when ../shared has them, else
    each case's own text (cut to 300 characters) as the reason. Their length is what counts here."""
    from custom_losses.checks.distill_bench import EXAMPLES_PATH
    from prep.answers import Answer, parse_answer
    from prep.jsonio import read_jsonl

    if EXAMPLES_PATH.exists():
        return [parse_answer(row["bingli_json"]) for row in read_jsonl(EXAMPLES_PATH)], str(EXAMPLES_PATH.name)
    return [Answer(reason=case.feature_content[:300], diseases="待查") for case in cases[:8]], "the cases' own text"


def smoke_data(recipe: Any, tokenizer: Any, needed_tokens: int) -> SmokeData:
    """Synthetic soft-label rows for the first cases of the pipeline's train file, enough for NEEDED_TOKENS."""
    from custom_losses.checks.distill_bench import prompt_lengths, softlabel_budget, synthetic_softlabel_rows
    from prep.records import read_cases

    softlabels = recipe.stage2.softlabels if recipe.stage2 else "recipes/softlabels/vllm-qwen2.5-72b-instruct.yaml"
    prompts, _ = softlabel_budget(softlabels)
    top_k = int(compose(softlabels)["softlabels"]["top_k"])
    cases = read_cases(resolve_path(recipe.train_cases)).cases
    answers, answers_from = stand_in_answers(cases)
    prompt_tokens = prompt_lengths(recipe.train_cases, prompts, tokenizer)
    rows, total = [], 0
    for index, case in enumerate(cases):
        rows += synthetic_softlabel_rows([case], prompts, [answers[index % len(answers)]], tokenizer, top_k, seed=index)
        total += prompt_tokens[index] + len(rows[-1]["answer_token_ids"])
        if total >= needed_tokens:
            break
    answer_tokens = statistics.mean(len(row["answer_token_ids"]) for row in rows)
    return SmokeData(str(recipe.train_cases), len(cases), statistics.mean(prompt_tokens) + answer_tokens, top_k,
                     rows, answers_from)


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


# ---- reporting -----------------------------------------------------------------------------------

@dataclass
class StepResult:
    """A training part's measured steps (the first, a warm-up, left out of the rates)."""

    name: str
    times: list[float]
    tokens: list[int]
    peak_bytes: float
    reserved_bytes: float
    losses: list[float] = field(default_factory=list)
    segments: list[list[int]] = field(default_factory=list)
    label_tokens: list[int] = field(default_factory=list)
    estimate_gib: float = float("nan")    # custom_losses.train.memory's peak without the CUDA-context term
    full_finetune: bool = False

    @classmethod
    def of(cls, name: str, measured: dict[str, Any]) -> StepResult:
        keys = ("times", "tokens", "peak_bytes", "reserved_bytes", "losses", "segments", "label_tokens")
        return cls(name, **{key: measured[key] for key in keys if key in measured})

    @property
    def timed(self) -> slice:
        return slice(1, None) if len(self.times) > 1 else slice(None)

    @property
    def seconds(self) -> float:
        return sum(self.times[self.timed])

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens[self.timed]) / max(self.seconds, 1e-9)


def estimate_without_context(estimate: Any) -> float:
    return estimate.total - estimate.terms.get("CUDA context + allocator", 0.0)


def memory_line(result: StepResult, estimate: Any, device: str) -> str:
    """Measured peak beside the estimator's: CUDA's allocated and reserved peaks against the estimate without its
    CUDA-context term (which no allocator counter sees), the CPU's peak RSS against the same."""
    predicted = estimate_without_context(estimate)
    what = "allocated" if device == "cuda" else "RSS"
    return (f"peak {result.peak_bytes / GIB:.2f} GiB {what} ({result.reserved_bytes / GIB:.2f} reserved) vs estimate "
            f"{predicted:.2f} GiB without the CUDA context ({estimate.total:.2f} with it): "
            f"{result.peak_bytes / GIB / max(predicted, 1e-9):.2f} x")


def wall_time_line(name: str, result: StepResult, data: SmokeData, config: dict[str, Any], epochs_key: str,
                   gpus: int, tokens_per_step: float) -> str:
    """The pipeline step's estimated training time: max_steps x tokens per step, or cases x epochs x tokens per
    case, over the measured tokens/s times the GPUs (linear scaling assumed)."""
    rate = result.tokens_per_s * gpus
    max_steps = int(config.get("max_steps") or -1)
    if max_steps > 0:
        seconds = max_steps * tokens_per_step / rate
        how = f"max_steps {max_steps} x {tokens_per_step:,.0f} tokens"
    else:
        epochs = float(config.get(epochs_key) or 1)
        seconds = data.cases_total * epochs * data.case_tokens / rate
        how = f"{data.cases_total} cases x {epochs:g} epochs x {data.case_tokens:,.0f} tokens"
    hours = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
    return f"ok {name} wall time: {how} / ({result.tokens_per_s:,.0f} tokens/s x {gpus} GPU) = {hours} ({data.cases_path})"


# ---- the parts -----------------------------------------------------------------------------------

@dataclass
class SmokeContext:
    """What the parts share. The model and the data are made when a part first asks for them: a vLLM request to a
    running server needs neither."""

    recipe: Any                       # custom_losses.pipeline.plan.PipelineRecipe
    tiny: bool
    device: str
    steps: int
    gpus: int
    import_names: dict[str, str] = field(default_factory=dict)
    rows_of_tokens: int = 2           # cases enough for this many rows of the longer SFT / distill length
    _model_dir: Path | None = None
    _data: SmokeData | None = None

    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            # On a GPU the 7B is built in a child process, so this one holds no CUDA memory while the steps run.
            self._model_dir = Path(_run_on(self.device, random_model_dir, model_config(self.tiny), self.device))
        return self._model_dir

    @property
    def data(self) -> SmokeData:
        if self._data is None:
            from prep.tokenizer import load_tokenizer

            stage1, stage2 = self.recipe.stage1, self.recipe.stage2
            lengths = [int(compose(stage1.sft, stage1.sft_overlays, stage1.sft_set).get("sequence_len") or 2048)]
            if stage2:
                lengths.append(int(compose(stage2.distill, stage2.distill_overlays,
                                           stage2.distill_set).get("max_length") or 1024))
            self._data = smoke_data(self.recipe, load_tokenizer(str(self.model_dir)), self.rows_of_tokens * max(lengths))
        return self._data


def _run_on(device: str, fn: Callable, *args: Any) -> Any:
    """FN(*ARGS) in a fresh process on a GPU (peaks and kernel patches stay there), here on a CPU (a spawned
    process re-imports torch and transformers: seconds a CPU check cannot spare)."""
    return in_fresh_process(fn, *args) if device == "cuda" else fn(*args)


def _run(ctx: SmokeContext, fn: Callable, *args: Any) -> Any:
    return _run_on(ctx.device, fn, *args)


def sft_part(ctx: SmokeContext, say: Callable[[str], None], extra: Sequence[str] = ()) -> StepResult | None:
    """The SFT recipe's steps, its memory beside the estimate and its wall time; None when it cannot run."""
    from custom_losses.train.memory import estimate, setup_from_config, shape_for
    from custom_losses.train.sft_config import compose as compose_sft
    from prep.tokenizer import load_tokenizer

    stage = ctx.recipe.stage1
    config = compose_sft(stage.sft, stage.sft_overlays, [*stage.sft_set, *extra])
    config.pop("deepspeed", None)  # one process (ZeRO shards across processes; the estimate follows)
    name = f"SFT step ({Path(stage.sft).name})"
    if config.get("adapter") not in ("lora", "qlora"):
        say(f"skip {name}: a full fine-tune needs its ZeRO-3 GPUs; the smoke runs LoRA/QLoRA recipes")
        return None
    if config.get("load_in_4bit") and not module_present(ctx.import_names.get("bitsandbytes", "bitsandbytes")):
        say(f"skip {name}: bitsandbytes not installed; the 4-bit recipe cannot load")
        return None
    attn, notes = sft_attention(config, ctx.import_names)
    liger, liger_notes = sft_uses_liger(config, ctx.device, ctx.import_names)
    for note in notes + liger_notes:
        say(note)
    tokenizer = load_tokenizer(str(ctx.model_dir))
    sequence_len, micro_batch = int(config.get("sequence_len") or 2048), int(config.get("micro_batch_size") or 1)
    batches = sft_batches(sft_features(ctx.data.rows, tokenizer), sequence_len, micro_batch, ctx.steps)
    result = StepResult.of(name, _run(ctx, sft_steps, config, str(ctx.model_dir), batches, ctx.device, attn, liger))
    setup = replace(setup_from_config(config, 1), fused_cross_entropy=liger, flash_attention=attn != "eager")
    predicted = estimate(shape_for(str(ctx.model_dir)), setup)
    result.estimate_gib = estimate_without_context(predicted)
    method = f"{config['adapter']} r={config['lora_r']}, {micro_batch} x {sequence_len} tokens packed, {attn}"
    say(f"ok {name}: {method}: {len(result.times)} steps, {result.tokens_per_s:,.0f} tokens/s; "
        + memory_line(result, predicted, ctx.device))
    per_step = micro_batch * sequence_len * int(config.get("gradient_accumulation_steps") or 1)
    say(wall_time_line("SFT", result, ctx.data, config, "num_epochs", ctx.gpus, per_step))
    return result


def distill_part(ctx: SmokeContext, say: Callable[[str], None], extra: Sequence[str] = (),
                 label: str = "") -> StepResult | None:
    """The distill recipe's steps through medkd's trainer, memory beside the estimate, wall time."""
    from custom_losses.train.memory import estimate_distill

    stage = ctx.recipe.stage2
    if stage is None:
        say("skip distill step: the pipeline recipe has no stage2")
        return None
    name = f"distill step ({Path(stage.distill).name}{label})"
    if not module_present(ctx.import_names.get("trl", "trl")):
        say(f"skip {name}: trl not installed; {OPTIONAL_MODULES['trl']}")
        return None
    with tempfile.TemporaryDirectory(prefix="medkd-smoke-") as work:
        dataset = save_rows(ctx.data.rows, Path(work) / "softlabels")
        overrides = distill_overrides(ctx.model_dir, dataset, Path(work) / "out", ctx.steps,
                                      [*stage.distill_set, *extra])
        config = compose(stage.distill, list(stage.distill_overlays), overrides)
        if config.get("load_in_4bit") and not module_present(ctx.import_names.get("bitsandbytes", "bitsandbytes")):
            say(f"skip {name}: bitsandbytes not installed; the 4-bit recipe cannot load")
            return None
        measured = _run(ctx, distill_steps, stage.distill, list(stage.distill_overlays), overrides, ctx.device)
    result = StepResult.of(name, measured)
    predicted = estimate_distill(config, 1, str(ctx.model_dir))
    result.estimate_gib = estimate_without_context(predicted)
    result.full_finetune = not config.get("use_peft")
    packing = "packed" if config.get("kd_packing") else "unpacked"
    say(f"ok {name}: {packing} rows of <= {config.get('max_length')} tokens, {len(result.times)} steps, "
        f"{result.tokens_per_s:,.0f} tokens/s; " + memory_line(result, predicted, ctx.device))
    full = compose(stage.distill, list(stage.distill_overlays), list(stage.distill_set))
    per_step = (int(full.get("per_device_train_batch_size") or 8) * int(full.get("max_length") or 1024)
                * int(full.get("gradient_accumulation_steps") or 1))
    say(wall_time_line("distill", result, ctx.data, full, "num_train_epochs", ctx.gpus, per_step))
    return result


def chat_once(base_url: str, messages: list[dict[str, str]], max_tokens: int = 64) -> tuple[int, float]:
    """One chat completion from the first model the server lists: (completion tokens, seconds)."""
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/models", timeout=30) as response:
        model = json.loads(response.read())["data"][0]["id"]
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return int(answer["usage"]["completion_tokens"]), time.perf_counter() - start


def last_error_line(log: Path) -> str:
    """The last line of a server log that names an error (else its last line): what a FAIL line quotes."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["(empty log)"])[-1][-300:]


def vllm_part(ctx: SmokeContext, say: Callable[[str], None], base_url: str | None = None) -> None:
    """One request through vLLM: BASE_URL's server, or one started from the predict recipe's serve settings on
    the smoke's model."""
    from prep.api.serving import load_server_spec, serving, vllm_python
    from prep.prompts import load_prompts
    from prep.records import read_cases

    case = read_cases(resolve_path(ctx.recipe.train_cases)).cases[0]
    messages = load_prompts().messages(case)
    if base_url is None:
        try:
            vllm_python()
        except FileNotFoundError as err:
            say(f"skip vLLM: {err}; no serving request")
            return
        server = compose(ctx.recipe.stage1.predict).get("server")
        if not server:
            say(f"skip vLLM: {ctx.recipe.stage1.predict} serves elsewhere (server: null); no serving request")
            return
        spec = load_server_spec(server, [f"model={json.dumps(str(ctx.model_dir))}", "served_model_name=smoke"])
        log = resolve_path(ctx.recipe.out) / "logs" / "smoke-vllm.log"   # kept: a failed start is read there
        log.unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            with serving(spec, log) as running:
                ready = time.perf_counter() - start
                tokens, seconds = chat_once(running.base_url, messages)
        except RuntimeError as err:
            say(f"FAIL vLLM: {str(err).splitlines()[0].split(';')[0]}: {last_error_line(log)} (log: {log})")
            return
        say(f"ok vLLM: ready in {ready:.0f} s; one request, {tokens} tokens in {seconds:.2f} s "
            f"({tokens / seconds:,.0f} tokens/s); log {log}")
        return
    tokens, seconds = chat_once(base_url, messages)
    say(f"ok vLLM ({base_url}): one request, {tokens} tokens in {seconds:.2f} s ({tokens / seconds:,.0f} tokens/s)")


def smoke_context(recipe: Any, tiny: bool, steps: int, import_names: dict[str, str] | None = None,
                  rows_of_tokens: int = 2) -> SmokeContext:
    """RECIPE (a custom_losses.pipeline.plan.PipelineRecipe) on this machine; RuntimeError when the real shapes need a GPU
    and none is visible. The random-weight model is built (once per config) when a part first needs it."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not tiny and device == "cpu":
        raise RuntimeError("no CUDA GPU visible: the real-shape smoke needs one (tiny=True runs the tiny model here)")
    gpus = torch.cuda.device_count() if device == "cuda" else 1
    return SmokeContext(recipe, tiny, device, steps, gpus, dict(import_names or {}), rows_of_tokens)


def run_smoke(config: str | Path, overrides: Sequence[str] = (), *, tiny: bool,
              out: Callable[[str], None] | None = None, vllm_base_url: str | None = None,
              parts: Sequence[str] = PARTS, steps: int = 3, import_names: dict[str, str] | None = None) -> list[str]:
    """The smoke check of pipeline recipe CONFIG (with OVERRIDES, its --set items); returns its lines (each `ok`,
    `skip` or `FAIL`), also passed to OUT as they come. A part that fails is a FAIL line, never an exception;
    a bad pipeline recipe raises prep.config.RecipeError. VLLM_BASE_URL: ask that server instead of starting one.
    IMPORT_NAMES maps an optional module to the name it is looked up by (see missing_modules)."""
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if out:
            out(line)

    from custom_losses.pipeline.plan import validate_recipe

    start = time.perf_counter()
    recipe = validate_recipe(config, [], list(overrides))
    try:
        ctx = smoke_context(recipe, tiny, steps, import_names)
        if {"sft", "distill"} & set(parts):
            where = f"{ctx.gpus} GPU(s) visible" if ctx.device == "cuda" else "no GPU"
            say(f"ok smoke model: {ctx.model_dir.name} on {ctx.device} ({where}); {len(ctx.data.rows)} cases of "
                f"{ctx.data.cases_path}, answers as long as {ctx.data.answers_from}'s, top-{ctx.data.top_k} soft labels")
    except (RuntimeError, ValueError, OSError) as err:
        say(f"FAIL smoke: {err}")
        return lines
    runners = {"sft": lambda: sft_part(ctx, say), "distill": lambda: distill_part(ctx, say),
               "vllm": lambda: vllm_part(ctx, say, vllm_base_url)}
    for part in parts:
        try:
            runners[part]()
        except Exception as err:  # one part's failure is its line; the other parts still run
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            say(f"FAIL {part}: {type(err).__name__}: {first}")
    say(f"ok smoke finished in {time.perf_counter() - start:.0f} s")
    return lines
