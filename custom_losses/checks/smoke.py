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

The steps themselves (the random model, the batches, the SFT and distill step functions, measuring in a fresh
process) are in custom_losses.checks.smoke_steps; this module holds the data, the parts and their report lines.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from custom_losses.checks.smoke_steps import (
    OPTIONAL_MODULES,
    distill_overrides,
    distill_steps,
    in_fresh_process,
    model_config,
    module_present,
    random_model_dir,
    save_rows,
    sft_attention,
    sft_batches,
    sft_features,
    sft_steps,
    sft_uses_liger,
)
from prep.config import compose
from prep.paths import resolve_path

PARTS = ("sft", "distill", "vllm")
GIB = 2**30


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


def keep_measured(ctx: SmokeContext, results: dict[str, Any], say: Callable[[str], None]) -> None:
    """The measured per-GPU training tokens/s, into custom_losses.pipeline.cost's measured file."""
    import torch

    from custom_losses.pipeline.cost import model_params, write_measured

    figures = {f"{part}_tokens_per_s": result.tokens_per_s for part, result in results.items()
               if part in ("sft", "distill") and isinstance(result, StepResult)}
    if not figures:
        return
    config = json.loads((ctx.model_dir / "config.json").read_text(encoding="utf-8"))
    path = write_measured(figures, "the doctor's smoke check (--smoke)", torch.cuda.get_device_name(0), model_params(config)[0],
                          ctx.gpus)
    say(f"ok measured figures: {path} ({', '.join(f'{k} {v:,.0f}' for k, v in figures.items())}); the cost "
        f"estimate of --plan prefers them")


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
    results = {}
    for part in parts:
        try:
            results[part] = runners[part]()
        except Exception as err:  # one part's failure is its line; the other parts still run
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            say(f"FAIL {part}: {type(err).__name__}: {first}")
    if not tiny:   # real shapes on this GPU: the figures the cost estimate prefers (the tiny model's would mislead it)
        keep_measured(ctx, results, say)
    say(f"ok smoke finished in {time.perf_counter() - start:.0f} s")
    return lines
