"""The student answers every case through vLLM, then a validated submission is written.

The command is `python -m launch.predict`. One code path with the teacher: the same stage skeleton
(prep.stages.api_stage), async client, resumable cache runner, prompt files, answer constraint and chat
template as prep.stages.teacher and training. MODEL_OR_ADAPTER is a merged model folder (or hub id), or a
PEFT adapter folder, served on its base model with `--enable-lora`.
The recipe either starts the vLLM server (its `server:` section) or names a running one
(`client.base_url`, `--set server=null`). Outputs under DIR: cache.jsonl (one row per answer
asked, append-only), predictions.jsonl (`id, reason, diseases, raw_valid, filled`),
submission.jsonl (only when every case has an answer, after validation), summary.json,
predict.log (and server.log when the recipe starts the server).

A case left without an answer (its output unusable, or its request failed) stops the run with its
id listed. `--set fill_missing.enabled=true` fills such cases by a retry at a higher temperature,
logged and flagged `filled` in predictions.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prep.answers import Answer, AnswerError, answer_from_object, structured_output_params
from prep.api.cache import cache_key, load_cache
from prep.api.pool import ChatClient
from prep.api.serving import load_server_spec, model_to_load
from prep.api.settings import ClientError, ClientSettings
from prep.config import load_recipe
from prep.eval.submission import SubmissionError, id_list, write_submission
from prep.jsonio import InputError, write_jsonl_atomic
from prep.paths import resolve_path
from prep.prompts import PromptSet
from prep.qwen import IM_END
from prep.records import Case
from prep.stages.api_stage import (
    ApiRecipe,
    ApiStage,
    Sampling,
    StageRun,
    Target,
    check_recipe_files,
    endpoint_target,
    served_identity,
)
from prep.stages.teacher import validate_answer
from prep.tokenizer import CHAT_TEMPLATE_PATH, chat_token_ids, load_tokenizer

log = logging.getLogger("medkd.predict")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # vLLM's allowed --max-lora-rank values


def greedy() -> Sampling:
    return Sampling(temperature=0.0, top_p=1.0, max_tokens=1024, samples_per_case=1, seed=None)


@dataclass
class FillMissing:
    """Cases left without an answer: an error (default), or filled by retries at a higher temperature."""

    enabled: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    attempts: int = 2                    # retries per unanswered case, each a fresh sample

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("key 'fill_missing.attempts': must be at least 1")
        if self.temperature <= 0:
            raise ValueError("key 'fill_missing.temperature': must be positive (a greedy retry repeats the failure)")


@dataclass
class PredictRecipe(ApiRecipe):
    """Whom to ask (client, or the server to start: null = use client.base_url) and how, plus the submission."""

    sampling: Sampling = field(default_factory=greedy)
    stop_tokens: list[str] = field(default_factory=lambda: [IM_END])
    lora_name: str = "student-lora"              # the name an adapter is served (and asked) under
    echo_feature_content: bool = False           # copy each case's text into its submission line
    fill_missing: FillMissing = field(default_factory=FillMissing)

    def __post_init__(self) -> None:
        if self.sampling.samples_per_case != 1:
            raise ValueError("key 'sampling.samples_per_case': a prediction asks one sample per case; must be 1")


def validate_recipe(path: str | Path, overlays: list[str | Path] = (), overrides: list[str] = ()) -> PredictRecipe:
    """A predict recipe, composed and checked with the files a run reads first, without asking anything."""
    recipe = load_recipe(PredictRecipe, path, list(overrides), list(overlays))
    check_recipe_files(recipe, path)
    return recipe


# ---- what to serve and whom to ask ----------------------------------------------------------------

def lora_rank_for(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds an adapter of rank RANK."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")


def adapter_config(path: str | Path) -> dict[str, Any] | None:
    config = resolve_path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except ValueError as err:
        raise InputError(config, None, f"not valid JSON ({err})") from None


def resolve_target(recipe: PredictRecipe, model: str | None) -> Target:
    """The server to start (merged model, or base + adapter with --enable-lora) and the model name to ask."""
    settings = recipe.client
    if recipe.server is None:
        settings = dataclasses.replace(settings, model=model or settings.model)
        return endpoint_target(settings, None, model_hint=" (or pass --model)")
    if model and not resolve_path(model).exists() and model.count("/") != 1:
        raise FileNotFoundError(f"{model}: --model is neither a folder nor a hub id (owner/name)")
    model = model_to_load(model) if model else None

    spec = load_server_spec(recipe.server)
    name = settings.model or spec.served_model_name or spec.model
    adapter = adapter_config(model) if model else None
    if adapter is not None:
        base = adapter.get("base_model_name_or_path")
        if not base or not Path(base).exists():
            if base and Path(str(base)).name != Path(spec.model).name:
                log.warning("adapter %s was trained on %s; serving it on the recipe's server.model %s",
                            model, base, spec.model)
            base = spec.model
        spec.model = model_to_load(str(base))
        spec.lora_modules = {recipe.lora_name: model}
        spec.max_lora_rank = lora_rank_for(max(spec.max_lora_rank, int(adapter.get("r") or 0)))
        name = recipe.lora_name
    else:
        if model:
            spec.model = model
            name = settings.model or spec.served_model_name or spec.model
        if spec.lora_modules and not settings.model:
            name = next(iter(spec.lora_modules))   # a recipe serving one adapter means that adapter
    if "--chat-template" not in spec.extra_args:   # the training template, whatever the model folder carries
        spec.extra_args = [*spec.extra_args, "--chat-template", str(CHAT_TEMPLATE_PATH)]
    # The answers' identity is what is served, by content: a model retrained in the same folder is another one.
    identity, known_by = served_identity(name, spec)
    return Target(dataclasses.replace(settings, model=name), spec, identity, known_by)


# ---- one case ---------------------------------------------------------------------------------------

def judge(text: str, finish_reason: str | None) -> tuple[Answer | None, bool, str | None]:
    """(answer or None, raw_valid, error): raw_valid when the text is strict JSON with the two keys as
    it came, before the lenient parser's repairs (fences, prose around it, raw newlines in strings)."""
    try:
        answer = validate_answer(text, finish_reason)
    except AnswerError as err:
        return None, False, str(err)
    try:
        raw_valid = answer_from_object(json.loads(text)) == answer
    except (ValueError, AnswerError):
        raw_valid = False
    return answer, raw_valid, None


class Predictor:
    """Keys and asks (case, attempt) items: attempt 0 is the recipe's sampling, 1.. are fill retries."""

    def __init__(self, recipe: PredictRecipe, prompts: PromptSet, identity: str):
        self.recipe, self.prompts, self.identity = recipe, prompts, identity
        self.stop_token_ids: list[int] | None = None   # resolved by the tokenizer only when something is asked
        self.constraint = structured_output_params(recipe.structured_output)
        self.template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")

    def sampling(self, attempt: int) -> dict[str, Any]:
        s, fill = self.recipe.sampling, self.recipe.fill_missing
        if attempt == 0:
            return {**s.request(), "seed": s.seed}
        seed = (s.seed or 0) + attempt   # reproducible retries that still differ from each other
        return {"temperature": fill.temperature, "top_p": fill.top_p, "max_tokens": s.max_tokens, "seed": seed}

    def key(self, item: tuple[Case, int]) -> str:
        case, attempt = item
        return cache_key(id=case.id, case=case.feature_content, prompt=self.prompts.hash, template=self.template,
                         model=self.identity, sampling=self.sampling(attempt), constraint=self.constraint,
                         stop=self.recipe.stop_tokens, attempt=attempt)

    def params(self, attempt: int) -> dict[str, Any]:
        if self.stop_token_ids is None:
            self.stop_token_ids = stop_token_ids(self.recipe.stop_tokens)
        extra = {**self.constraint.get("extra_body", {}), "stop_token_ids": self.stop_token_ids}
        return {**self.sampling(attempt), **{k: v for k, v in self.constraint.items() if k != "extra_body"},
                "extra_body": extra}

    async def predict(self, client: ChatClient, item: tuple[Case, int]) -> dict[str, Any]:
        case, attempt = item
        result = await client.chat(self.prompts.messages(case), **self.params(attempt))
        answer, raw_valid, error = judge(result.text, result.finish_reason)
        # Reason and diseases only: a student trained on traces writes one first (structured_output.reasoning),
        # and it stays in `raw`, never in predictions.jsonl or the submission.
        return {"id": case.id, "attempt": attempt, "status": "ok" if answer else "invalid",
                "answer": {"reason": answer.reason, "diseases": answer.diseases} if answer else None,
                "raw_valid": raw_valid, "error": error, "raw": result.text, "finish_reason": result.finish_reason,
                "usage": result.usage, "retries": result.retries, "model": self.identity}

    def answers(self, cases: list[Case], cache: dict[str, dict]) -> dict[int, dict[str, Any]]:
        """id -> the cache row that answers it: the first attempt with a usable answer."""
        chosen = {}
        for case in cases:
            for attempt in range(self.recipe.fill_missing.attempts + 1):
                row = cache.get(self.key((case, attempt)))
                if row is not None and row["status"] == "ok":
                    chosen[case.id] = row
                    break
        return chosen


# ---- preflight --------------------------------------------------------------------------------------

def check_chat_template(settings: ClientSettings, api_key: str, messages: list[dict],
                        expected: list[int]) -> bool | None:
    """Ask vLLM's /tokenize how it renders MESSAGES: True when it matches training's token ids,
    ClientError when it differs, None when the endpoint has no /tokenize (not vLLM)."""
    root = settings.base_url.rstrip("/").removesuffix("/v1")
    body = {"model": settings.model, "messages": messages, "add_generation_prompt": True, "add_special_tokens": False}
    request = urllib.request.Request(f"{root}/tokenize", data=json.dumps(body).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=min(settings.request_timeout_s, 60)) as response:
            served = json.loads(response.read())["tokens"]
    except (urllib.error.HTTPError, KeyError, ValueError) as err:
        log.info("the endpoint has no usable /tokenize (%s); chat template not checked", type(err).__name__)
        return None
    except (urllib.error.URLError, OSError) as err:
        log.info("/tokenize unreachable (%s); chat template not checked", err)
        return None
    if served != expected:
        first = next((i for i, (a, b) in enumerate(zip(served, expected)) if a != b), min(len(served), len(expected)))
        raise ClientError(f"the server renders the chat differently from training (token {first} of "
                          f"{len(expected)} differs); serve with --chat-template {CHAT_TEMPLATE_PATH}")
    return True


def stop_token_ids(stop_tokens: list[str]) -> list[int]:
    tokenizer = load_tokenizer()
    ids = [tokenizer.convert_tokens_to_ids(token) for token in stop_tokens]
    unknown = [token for token, token_id in zip(stop_tokens, ids)
               if token_id is None or token_id == tokenizer.unk_token_id]
    if unknown:
        raise ValueError(f"key 'stop_tokens': {unknown[0]!r} is not a token of the Qwen2.5 vocabulary")
    return ids



# ---- the stage ----------------------------------------------------------------------------------------

class PredictStage(ApiStage):
    """The student's answer to every case (rounds of fill retries when enabled), then the submission."""

    name = "predict"
    recipe_schema = PredictRecipe

    def __init__(self, recipe: PredictRecipe, cases: list[Case], prompts: PromptSet, model: str | None = None):
        super().__init__(recipe, cases, prompts)
        self.model = model

    @classmethod
    def from_files(cls, config: str | Path, cases_path: str | Path, **kwargs: Any) -> PredictStage:
        """As ApiStage.from_files, with MODEL (a merged folder, hub id or adapter folder); no cases is an error."""
        stage = super().from_files(config, cases_path, **kwargs)
        if not stage.cases:
            raise InputError(cases_path, None, "no cases to answer")
        return stage

    def resolve(self) -> Target:
        target = resolve_target(self.recipe, self.model)
        self.predictor = Predictor(self.recipe, self.prompts, target.identity)
        return target

    def rounds(self, cache: Path) -> Iterator[tuple[str, list[tuple[Case, int]]]]:
        """Attempt 0 for every case without an answer; then, with fill_missing, one round per fill attempt."""
        fill = self.recipe.fill_missing
        for attempt in range(1 + (fill.attempts if fill.enabled else 0)):
            answered = self.predictor.answers(self.cases, load_cache(cache))
            todo = [(case, attempt) for case in self.cases if case.id not in answered]
            if attempt > 0 and todo:
                log.warning("filling %d unanswered cases by a retry at temperature %g (attempt %d of %d): ids %s",
                            len(todo), fill.temperature, attempt, fill.attempts,
                            id_list([case.id for case, _ in todo]))
            yield ("predict" if attempt == 0 else "fill"), todo

    def key(self, item: tuple[Case, int]) -> str:
        return self.predictor.key(item)

    async def ask(self, client: ChatClient, item: tuple[Case, int]) -> dict[str, Any]:
        return await self.predictor.predict(client, item)

    def label(self, item: tuple[Case, int]) -> int:
        return item[0].id

    def preflight(self, settings: ClientSettings, api_key: str) -> None:
        """The stop tokens' ids, and the server's rendering of a prompt against training's."""
        tokenizer = load_tokenizer()
        self.predictor.stop_token_ids = stop_token_ids(self.recipe.stop_tokens)
        messages = self.prompts.messages(self.cases[0])
        checked = check_chat_template(settings, api_key, messages, chat_token_ids(tokenizer, messages, True))
        log.info("chat template %s", "matches training" if checked else "not checked")

    def finish(self, out: Path, run: StageRun) -> dict[str, Any]:
        """predictions.jsonl and summary.json always; submission.jsonl only when complete and valid."""
        cache = load_cache(out / "cache.jsonl")
        chosen = self.predictor.answers(self.cases, cache)
        write_jsonl_atomic(out / "predictions.jsonl", (
            {"id": case.id, **chosen[case.id]["answer"], "raw_valid": chosen[case.id]["raw_valid"],
             "filled": chosen[case.id]["attempt"] > 0, "finish_reason": chosen[case.id]["finish_reason"]}
            for case in self.cases if case.id in chosen))
        unanswered = [case.id for case in self.cases if case.id not in chosen]
        invalid = [case.id for case in self.cases if case.id not in chosen
                   and (row := cache.get(self.predictor.key((case, 0)))) is not None and row["status"] == "invalid"]
        submission, error = out / "submission.jsonl", self.write_submission(out / "submission.jsonl", chosen)
        raw_valid, finished = sum(row["raw_valid"] for row in chosen.values()), sum(r.finished for r in run.reports)
        return {
            "recipe": self.recipe.recipe_path, "model": self.predictor.identity, "prompt_hash": self.prompts.hash,
            "cases": len(self.cases), "answered": len(chosen), "unanswered": len(unanswered),
            "unanswered_ids": unanswered, "invalid_ids": invalid, **run.client_stats(),
            "failed_requests": len(run.failed), "raw_valid": raw_valid,
            "raw_valid_share": round(raw_valid / len(self.cases), 4) if self.cases else None,
            "filled": sum(row["attempt"] > 0 for row in chosen.values()),
            "cache_rows_before": run.cached_before, "asked": len(run.asked),
            "ask_wall_s": round(run.ask_wall_s, 3), "wall_s": run.wall_s(),
            "answers_per_s": round(finished / run.ask_wall_s, 3) if run.ask_wall_s else None,
            "submission": str(submission) if error is None else None, "error": error,
        }

    def write_submission(self, path: Path, chosen: dict[int, dict[str, Any]]) -> str | None:
        """The validated submission, or why there is none (an earlier run's file is then moved aside)."""
        answers = {case_id: answer_from_object(row["answer"]) for case_id, row in chosen.items()}
        try:
            write_submission(path, self.cases, answers, self.recipe.echo_feature_content)
        except SubmissionError as err:
            if path.exists():   # never leave an earlier run's file looking like this run's result
                path.rename(path.with_name(path.name + ".stale"))
                log.warning("moved an earlier %s aside to %s.stale", path, path.name)
            return str(err)
        return None

    def next_step(self, summary: dict[str, Any]) -> str:
        """What to do about a run that wrote no submission, for the command's last line."""
        hints = []
        if summary["failed_requests"]:
            hints.append("run the same command again to retry the failed requests")
        if summary["invalid_ids"] and not self.recipe.fill_missing.enabled:
            hints.append(f"fill them by a retry at temperature {self.recipe.fill_missing.temperature:g} with "
                         "--set fill_missing.enabled=true")
        return "; or ".join(hints)
