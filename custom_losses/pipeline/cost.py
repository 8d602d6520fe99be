"""What a run will cost, before it starts: per step the API requests and tokens, the GPUs and hours, the wall time
and the money, from the pipeline recipe's `estimate:`, `prices:` and `budget:` sections (docs/COST.md).

Tokens are counted, not guessed: each step's prompt files rendered with the chat template around every case of
the case files (the real Qwen2.5 tokenizer, prep.tokenizer), times samples_per_case; an answer is
`estimate.completion_share` of the recipe's sampling.max_tokens. Time:
  served step   api_step_start_s + server_start_s (self-hosted only) + prompt / prompt rate + completion / completion
                rate (estimate.serve_tokens_per_s by the served model, else its `default`, given for the
                serve_reference_model on one GPU and scaled by reference / active parameters x the server's GPUs);
  hosted step   api_step_start_s + the longest of: answers streamed at hosted_stream_tokens_per_s over the
                recipe's concurrency, requests over requests_per_minute, tokens over tokens_per_minute;
  training      start_s + optimiser steps / steps_per_s when the recipe states a measured rate, else trained
                tokens x FLOPs per token / (GPUs x gpu_peak_tflops x mfu), or over tokens/s measured on this
                machine (cache_dir()/measured.json, written by `launch.doctor --smoke` and `launch.bench_gpu`)
                when its model has the student's size. FLOPs per trained token, N the parameters less the input
                embedding (a lookup): 2N forward + 2N backward through the activations + 2N weight gradients
                (full fine-tune only; LoRA/QLoRA freeze the base) + 2N recomputed forward (gradient
                checkpointing); attention's sequence-squared term is left out (under 10 % at 4k for a 7B);
  merge, tools  merge_s, tool_step_s.
Money: the box's GPUs x the step's hours x prices.gpu_hour_usd (a rented box is paid whole, busy or idle) plus
a hosted endpoint's tokens at prices.endpoints[its model]. Model sizes come from a local config.json (the tiny
fixture's, a local folder) or the published configs in data/models/, never from the hub.
"""
from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from custom_losses.pipeline.steps import Decision
from prep.config import compose
from prep.jsonio import write_text_atomic
from prep.paths import REPO_ROOT, cache_dir, resolve_path
from prep.records import read_cases

MODELS_DIR = REPO_ROOT / "data" / "models"
# Names the hosted APIs serve a published model under: the API's model name -> its data/models/ file.
MODEL_ALIASES = {"deepseek-chat": "deepseek-v3"}
MEASURED_FILE = "measured.json"       # under cache_dir(): figures measured on this machine
LOCAL_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0", "::1")


@dataclass
class TrainSpeed:
    start_s: float = 300.0                # loading the model, tokenising, saving: a training step's seconds besides its steps
    steps_per_s: float | None = None      # optimiser steps per second measured on this box; None: the FLOPs model


@dataclass
class EstimateSettings:
    """The assumptions of the estimate; each pipeline recipe states its own (recipes/pipeline/*.yaml)."""

    machine: str = "an unnamed box"       # words, for the plan
    gpus: int = 0                         # GPUs on the box: trainers use all, the money counts all
    gpu_peak_tflops: float = 989.0        # dense bf16 peak per GPU
    mfu: float = 0.35                     # model-FLOPs utilisation of training
    completion_share: float = 0.3         # an answer's share of sampling.max_tokens
    # A vLLM server's seconds from start to ready (weights loaded, graphs captured), by the served model, else default.
    server_start_s: dict[str, float] = field(default_factory=lambda: {"default": 600.0})
    serve_reference_model: str = "Qwen/Qwen2.5-7B-Instruct"
    serve_tokens_per_s: dict[str, dict[str, float]] = field(
        default_factory=lambda: {"default": {"prompt": 20000.0, "completion": 2000.0}})
    hosted_stream_tokens_per_s: float = 30.0    # one hosted request's answer tokens per second
    api_step_start_s: float = 5.0         # a stage command's start before it asks (imports, the model's digest)
    sft: TrainSpeed = field(default_factory=TrainSpeed)
    distill: TrainSpeed = field(default_factory=TrainSpeed)
    merge_s: float = 300.0
    tool_step_s: float = 5.0              # mix, score, submission
    preflight_s: float = 30.0             # the doctor before the first step

    def __post_init__(self) -> None:
        if not 0 < self.mfu <= 1:
            raise ValueError(f"key 'estimate.mfu': must be in (0, 1], got {self.mfu}")
        if not 0 < self.completion_share <= 1:
            raise ValueError(f"key 'estimate.completion_share': must be in (0, 1], got {self.completion_share}")
        if "default" not in self.serve_tokens_per_s:
            raise ValueError("key 'estimate.serve_tokens_per_s': needs a `default` entry {prompt: ..., completion: ...}")
        if "default" not in self.server_start_s:
            raise ValueError("key 'estimate.server_start_s': needs a `default` entry (seconds)")

    def start_s(self, model: str) -> float:
        return self.server_start_s.get(model, self.server_start_s["default"])


@dataclass
class Prices:
    gpu_hour_usd: float = 0.0             # one GPU of the box for an hour
    # A hosted endpoint's price by its client.model: {prompt_per_m: USD per million prompt tokens, completion_per_m: ...}
    endpoints: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Budget:
    max_usd: float | None = None          # refuse a run whose estimate costs more (null: no limit)
    max_gpu_hours: float | None = None


@dataclass
class StepCost:
    """One step's estimate (or, in cost_report, its actuals)."""

    step: str
    runs: bool = True
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    train_tokens: int = 0
    gpus: int = 0
    wall_s: float = 0.0
    usd: float = 0.0
    how: str = ""
    server_start_s: float = 0.0           # of wall_s: starting its vLLM server (0 when it shares the one before)

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.wall_s / 3600

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens + self.train_tokens

    def as_json(self) -> dict[str, Any]:
        return {**vars(self), "gpu_hours": round(self.gpu_hours, 4),
                "wall_s": round(self.wall_s, 1), "usd": round(self.usd, 4)}


@dataclass
class RunEstimate:
    steps: list[StepCost]
    assumptions: list[str]
    preflight_s: float = 0.0

    @property
    def running(self) -> list[StepCost]:
        return [step for step in self.steps if step.runs]

    def total(self) -> StepCost:
        run = self.running
        return StepCost("total", requests=sum(s.requests for s in run), prompt_tokens=sum(s.prompt_tokens for s in run),
                        completion_tokens=sum(s.completion_tokens for s in run),
                        train_tokens=sum(s.train_tokens for s in run), wall_s=self.preflight_s + sum(s.wall_s for s in run),
                        usd=sum(s.usd for s in run), how="")

    @property
    def gpu_hours(self) -> float:
        return sum(step.gpu_hours for step in self.running)

    def as_json(self) -> dict[str, Any]:
        total = self.total()
        return {"steps": [step.as_json() for step in self.steps], "assumptions": self.assumptions,
                "preflight_s": self.preflight_s,
                "total": {**total.as_json(), "gpu_hours": round(self.gpu_hours, 4)}}


# --------------------------------------------------------------------------- models and measured figures

def model_config(name: str) -> tuple[dict[str, Any] | None, str]:
    """NAME's config.json and where it came from: a local folder (the tiny fixture's included, when built), else
    the published config shipped in data/models/ (by the name's last part, lower case); (None, why) otherwise."""
    from prep.testing.tiny_model import resolve_model

    local = resolve_path(resolve_model(name)) / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8")), str(local)
    stem = name.rstrip("/").split("/")[-1].lower()
    shipped = MODELS_DIR / f"{MODEL_ALIASES.get(stem, stem)}.json"
    if shipped.is_file():
        return json.loads(shipped.read_text(encoding="utf-8")), str(shipped.relative_to(REPO_ROOT))
    return None, f"no config.json for {name} here nor in data/models/"


def model_params(config: dict[str, Any]) -> tuple[int, int]:
    """(total, active per token) parameters of a decoder config: GQA or MLA attention (DeepSeek's q/kv low-rank),
    a SwiGLU MLP, and DeepSeek's MoE (n_routed_experts, num_experts_per_tok, n_shared_experts, the first
    first_k_dense_replace layers dense). Biases are left out (0.002 % of Qwen2.5-7B)."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    if config.get("kv_lora_rank"):
        nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
        q_rank, kv_rank = config.get("q_lora_rank"), config["kv_lora_rank"]
        q = h * q_rank + q_rank + q_rank * heads * (nope + rope) if q_rank else h * heads * (nope + rope)
        attention = q + h * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v) + heads * v * h
    else:
        head_dim = config.get("head_dim") or h // heads
        kv = config.get("num_key_value_heads") or heads
        attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    routed = config.get("n_routed_experts") or 0
    dense_layers = min(config.get("first_k_dense_replace", layers), layers) if routed else layers
    expert = 3 * h * (config.get("moe_intermediate_size") or 0)
    shared, per_token = config.get("n_shared_experts") or 0, config.get("num_experts_per_tok") or 0
    common = layers * (attention + 2 * h) + dense_layers * 3 * h * config["intermediate_size"] + h
    common += vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    moe_layers = layers - dense_layers
    total = common + moe_layers * ((routed + shared) * expert + routed * h)
    active = common + moe_layers * ((per_token + shared) * expert + routed * h)
    return total, active


def measured_path() -> Path:
    return cache_dir() / MEASURED_FILE


def read_measured(path: Path | None = None) -> dict[str, Any] | None:
    """The figures measured on this machine (PATH, default measured_path()), None when there are none."""
    try:
        measured = json.loads((path or measured_path()).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return measured if isinstance(measured, dict) else None


def write_measured(figures: dict[str, float], source: str, device: str, params: int, gpus: int) -> Path:
    """Keep FIGURES (per-GPU training tokens/s: sft_tokens_per_s, distill_tokens_per_s) measured by SOURCE on
    DEVICE for a model of PARAMS parameters, merged over the file's earlier figures; the estimate prefers them."""
    kept = {key: value for key, value in figures.items() if isinstance(value, (int, float)) and math.isfinite(value)}
    earlier = read_measured() or {}
    if earlier.get("params") != params:
        earlier = {}
    record = {**earlier, **kept, "source": source, "device": device, "params": params, "gpus": gpus,
              "written": datetime.datetime.now().isoformat(timespec="seconds")}
    write_text_atomic(measured_path(), json.dumps(record, indent=1) + "\n")
    return measured_path()


# --------------------------------------------------------------------------- tokens

class TokenCounter:
    """Chat-rendered prompt tokens of cases with a step's prompt files, by the real Qwen2.5 tokenizer; cached."""

    def __init__(self) -> None:
        self._tokenizer, self._counts = None, {}

    def prompt_tokens(self, cases_path: Path, limit: int | None, prompts: dict[str, Any]) -> list[int]:
        from prep.prompts import load_prompts
        from prep.tokenizer import chat_token_ids, load_tokenizer

        prompt_set = load_prompts(prompts.get("system"), prompts.get("user"))
        key = (str(cases_path), limit, prompt_set.hash)
        if key not in self._counts:
            self._tokenizer = self._tokenizer or load_tokenizer()
            cases = read_cases(cases_path).cases[:limit]
            self._counts[key] = [len(chat_token_ids(self._tokenizer, prompt_set.messages(case), True)) for case in cases]
        return self._counts[key]


def answer_tokens(sampling: dict[str, Any], share: float) -> int:
    """An answer's expected tokens: SHARE of sampling.max_tokens (+ reasoning_tokens)."""
    return round(share * (int(sampling.get("max_tokens") or 0) + int(sampling.get("reasoning_tokens") or 0)))


# --------------------------------------------------------------------------- the estimate

def flops_per_token(params: int, embedding: int, full: bool, checkpointing: bool) -> float:
    """Training FLOPs per token (module docstring): 2N forward, 2N activation gradients, 2N weight gradients when
    every weight trains, 2N again when gradient checkpointing recomputes the forward."""
    n = params - embedding
    return 2 * n * (2 + (1 if full else 0) + (1 if checkpointing else 0))


@dataclass
class Served:
    """Whom an API step asks: this box's own vLLM server (GPUS > 0 or a CPU one), an endpoint of the user's own
    (no start, no GPU here), or a hosted API (priced by its tokens)."""

    kind: str          # self-hosted | own-endpoint | hosted
    model: str
    gpus: int = 0


class Estimator:
    """The estimate of each step of a plan (estimate_run), from the recipe's sections and this machine's
    measured figures."""

    def __init__(self, recipe: Any, limit: int | None, measured_file: Path | None = None) -> None:
        self.recipe, self.limit = recipe, limit
        self.measured_file = measured_file or measured_path()
        self.settings: EstimateSettings = recipe.estimate
        self.prices: Prices = recipe.prices
        self.counter = TokenCounter()
        self.measured = read_measured(self.measured_file)
        self.notes: dict[str, str] = {}
        self.train_path, self.test_path = resolve_path(recipe.train_cases), resolve_path(recipe.test_cases)
        teacher = compose(resolve_path(recipe.stage1.teacher), [], list(recipe.stage1.teacher_set))
        self.teacher = teacher
        self.valid_fraction = float((teacher.get("split") or {}).get("valid_fraction") or 0.0)

    # ---- the cases each step asks or trains on

    def case_prompts(self, path: Path, prompts: dict[str, Any]) -> list[int]:
        return self.counter.prompt_tokens(path, self.limit, prompts)

    def predict_prompts(self, prompts: dict[str, Any]) -> list[int]:
        """Test cases plus the held-out training cases (when the test file is another file)."""
        tests = self.case_prompts(self.test_path, prompts)
        if self.test_path.resolve() == self.train_path.resolve():
            return tests
        train = self.case_prompts(self.train_path, prompts)
        return tests + train[:round(len(train) * self.valid_fraction)]

    def training_rows(self) -> list[int]:
        """Tokens of each training row: the teacher's prompt and its answer, for the cases of the train split."""
        prompts = self.case_prompts(self.train_path, self.teacher.get("prompts") or {})
        answer = answer_tokens(self.teacher.get("sampling") or {}, self.settings.completion_share)
        kept = len(prompts) - round(len(prompts) * self.valid_fraction)
        return [tokens + answer for tokens in prompts[:kept]]

    # ---- whom a step asks, and how fast

    def served(self, composed: dict[str, Any]) -> Served:
        client = composed.get("client") or {}
        if composed.get("server"):
            serve = compose(resolve_path(composed["server"]))
            gpus = int(serve.get("nodes") or 1) * int(serve.get("gpus_per_node") or 1) if self.settings.gpus else 0
            return Served("self-hosted", str(serve.get("model")), gpus)
        host = urlparse(str(client.get("base_url") or "")).hostname or ""
        return Served("own-endpoint" if host in LOCAL_HOSTS else "hosted", str(client.get("model")))

    def serve_rates(self, model: str, gpus: int) -> tuple[float, float, str]:
        """(prompt, completion) tokens/s of MODEL's server on GPUS GPUs, and where they come from."""
        table = self.settings.serve_tokens_per_s
        if model in table:
            return table[model]["prompt"], table[model]["completion"], f"estimate.serve_tokens_per_s['{model}']"
        scale, how = 1.0, "estimate.serve_tokens_per_s.default"
        reference, _ = model_config(self.settings.serve_reference_model)
        config, _ = model_config(model)
        if reference and config and model != self.settings.serve_reference_model:
            scale = model_params(reference)[1] / model_params(config)[1]
            how += f" x {scale:.3g} (active parameters against {self.settings.serve_reference_model})"
        scale *= max(gpus, 1)
        if gpus > 1:
            how += f" x {gpus} GPUs"
        return table["default"]["prompt"] * scale, table["default"]["completion"] * scale, how

    def hosted_price(self, model: str) -> tuple[float, float]:
        price = self.prices.endpoints.get(model)
        if price is None:
            self.notes[model] = f"no price for {model}: add prices.endpoints.{model}: {{prompt_per_m, completion_per_m}}"
            return 0.0, 0.0
        return float(price.get("prompt_per_m", 0.0)), float(price.get("completion_per_m", 0.0))

    def box_usd(self, wall_s: float) -> float:
        return self.settings.gpus * wall_s / 3600 * self.prices.gpu_hour_usd

    # ---- one step each

    def api_step(self, name: str, composed: dict[str, Any], prompts: list[int], scoring: bool,
                 answer: int) -> StepCost:
        """A teacher, soft-label or predict step asking PROMPTS (each case's tokens); SCORING: the soft-label teacher
        reads given answers of ANSWER tokens (prompt_logprobs, one completion token)."""
        sampling = composed.get("sampling") or {}
        samples = 1 if scoring else int(sampling.get("samples_per_case") or 1)
        requests = len(prompts) * samples
        prompt = sum(prompts) * samples + (answer * requests if scoring else 0)
        completion = requests if scoring else requests * answer_tokens(sampling, self.settings.completion_share)
        served = self.served(composed)
        cost = StepCost(name, requests=requests, prompt_tokens=prompt, completion_tokens=completion, gpus=served.gpus)
        if served.kind == "hosted":
            client = composed.get("client") or {}
            per_answer = completion / max(requests, 1) / self.settings.hosted_stream_tokens_per_s
            streams = requests * per_answer / max(int(client.get("concurrency") or 1), 1)
            rpm = requests / float(client["requests_per_minute"]) * 60 if client.get("requests_per_minute") else 0
            tpm = (prompt + completion) / float(client["tokens_per_minute"]) * 60 if client.get("tokens_per_minute") else 0
            cost.wall_s = self.settings.api_step_start_s + max(streams, rpm, tpm)
            prompt_price, completion_price = self.hosted_price(served.model)
            cost.usd = (prompt * prompt_price + completion * completion_price) / 1e6
            cost.how = f"hosted {served.model}"
        elif served.kind == "own-endpoint":
            cost.wall_s = self.settings.api_step_start_s
            cost.how = f"your endpoint {served.model} (its time and cost are not this box's)"
        else:
            prompt_rate, completion_rate, how = self.serve_rates(served.model, served.gpus)
            cost.server_start_s = self.settings.start_s(served.model)
            cost.wall_s = (self.settings.api_step_start_s + cost.server_start_s + prompt / prompt_rate
                           + completion / completion_rate)
            cost.how = f"vLLM {served.model} on {served.gpus or 'no'} GPU(s), {how}"
        cost.usd += self.box_usd(cost.wall_s)
        return cost

    def train_step(self, name: str, composed: dict[str, Any], dialect: str) -> StepCost:
        """SFT (Axolotl's keys) or distill (TRL's keys and ours) on the training rows; see the module docstring.
        Long because it reads each dialect's epochs, length, packing and batch keys side by side."""
        from custom_losses.train.launcher import batch_plan

        sft = dialect == "sft"
        epochs = float(composed.get("num_epochs" if sft else "num_train_epochs") or 1)
        length = int(composed.get("sequence_len" if sft else "max_length") or (2048 if sft else 1024))
        packing = bool(composed.get("sample_packing" if sft else "kd_packing"))
        full = not (composed.get("adapter") if sft else composed.get("use_peft"))
        world = max(self.settings.gpus, 1)
        try:
            rows_per_step = batch_plan(composed, dialect, world).rows_per_step
        except ValueError:   # an effective batch this world size cannot hold: the doctor says so; the recipe's own here
            rows_per_step = int(composed.get("micro_batch_size" if sft else "per_device_train_batch_size") or 1) * world
        rows = [min(tokens, length) for tokens in self.training_rows()]
        data_tokens = sum(rows)
        rows_in_epoch = max(math.ceil(data_tokens / length), 1) if packing else max(len(rows), 1)
        row_tokens = data_tokens / rows_in_epoch
        max_steps = int(composed.get("max_steps") or 0)
        steps = max_steps if max_steps > 0 else math.ceil(epochs * rows_in_epoch / rows_per_step)
        tokens = round(steps * rows_per_step * row_tokens) if max_steps > 0 else round(epochs * data_tokens)
        speed: TrainSpeed = self.settings.sft if sft else self.settings.distill
        config, source = model_config(self.recipe.base_model)
        cost = StepCost(name, train_tokens=tokens, gpus=self.settings.gpus)
        measured = self.measured_rate(dialect, config)
        if speed.steps_per_s:
            seconds, how = steps / speed.steps_per_s, f"{steps} steps at {speed.steps_per_s:g}/s (estimate.{dialect})"
        elif measured:
            seconds = tokens / (measured * world)
            how = f"{measured:,.0f} tokens/s per GPU measured ({self.measured_file}, {self.measured.get('source')})"
        elif config:
            params = model_params(config)[0]
            flops = flops_per_token(params, config["vocab_size"] * config["hidden_size"], full,
                                    bool(composed.get("gradient_checkpointing")))
            seconds = tokens * flops / (world * self.settings.gpu_peak_tflops * 1e12 * self.settings.mfu)
            how = (f"{flops / (params - config['vocab_size'] * config['hidden_size']):.0f}N FLOPs/token, N={params / 1e9:.3g}B ({source}), "
                   f"{'full' if full else 'adapter'}, MFU {self.settings.mfu:g} of {self.settings.gpu_peak_tflops:g} TFLOP/s")
        else:
            seconds, how = 0.0, source
        cost.wall_s = speed.start_s + seconds
        cost.how = f"{steps} steps, {tokens:,} tokens; {how}"
        cost.usd = self.box_usd(cost.wall_s)
        return cost

    def measured_rate(self, dialect: str, config: dict[str, Any] | None) -> float | None:
        """Per-GPU training tokens/s measured here for a model of the student's size, when there is one."""
        if not self.measured or not config or self.measured.get("params") != model_params(config)[0]:
            return None
        value = self.measured.get(f"{dialect}_tokens_per_s")
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    def step_cost(self, decision: Decision) -> StepCost:
        step, name = decision.step, decision.step.name
        composed = step.recipe.composed() if step.recipe else {}
        kind = name.split("-")[0]
        if kind in ("teacher", "student", "predict"):
            cases = self.predict_prompts if kind == "predict" else (
                lambda prompts: self.case_prompts(self.train_path, prompts))
            cost = self.api_step(name, composed, cases(composed.get("prompts") or {}), False, 0)
        elif kind == "softlabels":
            scoring = self.recipe.stage2.scores_fixed_answers and (name != "softlabels" or
                                                                   self.recipe.stage2.softlabel_answers == "kept")
            answer = answer_tokens(self.teacher.get("sampling") or {}, self.settings.completion_share)
            prompts = self.case_prompts(self.train_path, composed.get("prompts") or {})
            cost = self.api_step(name, composed, prompts, scoring, answer)
        elif kind in ("sft", "distill"):
            cost = self.train_step(name, composed, kind)
        else:
            seconds = self.settings.merge_s if kind == "merge" else self.settings.tool_step_s
            cost = StepCost(name, wall_s=seconds, usd=self.box_usd(seconds), how=f"estimate.{kind}_s"
                            if kind == "merge" else "estimate.tool_step_s")
        cost.runs = decision.runs
        return cost

    def serve_key(self, decision: Decision) -> tuple[str, str] | None:
        """What a self-hosted API step's server serves (its serve recipe, the model: predict's --model), so that
        adjacent steps serving the same share one server, as the pipeline runs them (custom_losses.pipeline.servers);
        None for a step that starts no server."""
        from prep.testing.tiny_model import resolve_model

        step = decision.step
        if step.recipe is None or step.name.split("-")[0] not in ("teacher", "softlabels", "predict", "student"):
            return None
        composed = step.recipe.composed()
        if not composed.get("server"):
            return None
        model = step.argv[step.argv.index("--model") + 1] if "--model" in step.argv else None
        if model is None:
            model = str(compose(resolve_path(composed["server"])).get("model"))
        return str(resolve_path(composed["server"])), resolve_model(model)

    def share_servers(self, decisions: list[Decision], steps: list[StepCost]) -> None:
        """Take the server start off a step that shares the server of the serving step before it (no step that
        trains between; the mix, score and submission steps leave a server up)."""
        previous = None
        for decision, cost in zip(decisions, steps):
            if not cost.runs:
                continue
            key = self.serve_key(decision)
            if key is not None and key == previous and cost.server_start_s:
                cost.wall_s -= cost.server_start_s
                cost.usd -= self.box_usd(cost.server_start_s)
                cost.server_start_s = 0.0
                cost.how += "; shares the server of the step before"
            if key is not None or decision.step.name.split("-")[0] not in ("mix", "score", "submission"):
                previous = key

    def assumptions(self, config_path: str) -> list[str]:
        s, p = self.settings, self.prices
        measured = self.measured
        lines = [f"assumptions: {config_path} `estimate:` ({s.machine}: {s.gpus} GPU(s), {s.gpu_peak_tflops:g} TFLOP/s "
                 f"peak, MFU {s.mfu:g}, answers {s.completion_share:g} of max_tokens, server start "
                 f"{', '.join(f'{model} {seconds:g} s' for model, seconds in s.server_start_s.items())})"
                 f"; prices: ${p.gpu_hour_usd:g} per GPU-hour"
                 + "".join(f", {model} ${price.get('prompt_per_m', 0):g}/${price.get('completion_per_m', 0):g} "
                           f"per M prompt/completion tokens" for model, price in p.endpoints.items()),
                 "measured figures: " + (f"{self.measured_file} ({measured.get('source')} on {measured.get('device')}, "
                                         f"{measured.get('written')}; used where its model is the student's size)"
                                         if measured else f"none ({self.measured_file} absent): recipe defaults"),
                 f"tokens: the real Qwen2.5 tokenizer over {self.train_path.name}"
                 + (f" and {self.test_path.name}" if self.test_path != self.train_path else "")
                 + (f" (first {self.limit} cases)" if self.limit else "") + " with each step's prompt files"]
        config, source = model_config(self.recipe.base_model)
        if config:
            lines.append(f"student {self.recipe.base_model}: {model_params(config)[0] / 1e9:.3g}B parameters ({source})")
        return lines + sorted(self.notes.values())


def estimate_run(recipe: Any, decisions: list[Decision], limit: int | None, config_path: str,
                 measured_file: Path | None = None) -> RunEstimate:
    """The estimate of every step of DECISIONS (a plan of RECIPE, a PipelineRecipe) and its assumptions in words;
    MEASURED_FILE: this machine's measured figures (default measured_path())."""
    estimator = Estimator(recipe, limit, measured_file)
    steps = [estimator.step_cost(decision) for decision in decisions]
    estimator.share_servers(decisions, steps)
    return RunEstimate(steps, estimator.assumptions(config_path), recipe.estimate.preflight_s)
