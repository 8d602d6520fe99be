"""The student answers every case through vLLM, then a validated submission is written.

    python -m launch.predict --config recipes/predict/tiny-cpu.yaml --model MODEL_OR_ADAPTER --input CASES.jsonl --out DIR

One code path with the teacher: the same async client, resumable cache runner, prompt files,
answer constraint and chat template as prep.teacher and training. MODEL_OR_ADAPTER is a merged
model folder (or hub id), or a PEFT adapter folder, served on its base model with `--enable-lora`.
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

import asyncio
import dataclasses
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prep.submission import SubmissionError, id_list, write_submission
from prep.answers import Answer, AnswerError, answer_from_object
from prep.client import (ChatClient, ClientError, ClientSettings, StructuredOutput, archive_cache, cache_key,
                         check_endpoint, load_cache, resolve_api_key, run_cached, structured_output_params)
from prep.config import load_recipe
from prep.jsonio import InputError, dumps, write_jsonl_atomic, write_text_atomic
from prep.prompts import PromptSet, load_prompts
from prep.records import Case, read_cases
from prep.stage import STAGE_ERRORS, fail, logging_to, stage_parser
from prep.teacher import PromptFiles, Sampling, validate_answer
from prep.tokenizer import CHAT_TEMPLATE_PATH

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
class PredictRecipe:
    client: ClientSettings = field(default_factory=ClientSettings)
    sampling: Sampling = field(default_factory=greedy)
    structured_output: StructuredOutput = field(default_factory=StructuredOutput)
    prompts: PromptFiles = field(default_factory=PromptFiles)
    server: str | dict[str, Any] | None = None   # a serve recipe (path) or inline mapping; null = use client.base_url
    stop_tokens: list[str] = field(default_factory=lambda: ["<|im_end|>"])
    lora_name: str = "student-lora"              # the name an adapter is served (and asked) under
    echo_feature_content: bool = False           # copy each case's text into its submission line
    fill_missing: FillMissing = field(default_factory=FillMissing)
    recipe_path: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.sampling.samples_per_case != 1:
            raise ValueError("key 'sampling.samples_per_case': a prediction asks one sample per case; must be 1")


# ---- what to serve and whom to ask ----------------------------------------------------------------

def lora_rank_for(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds an adapter of rank RANK."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")


def adapter_config(path: str | Path) -> dict[str, Any] | None:
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except ValueError as err:
        raise InputError(config, None, f"not valid JSON ({err})") from None


@dataclass
class Target:
    settings: ClientSettings       # model = the name to ask; base_url filled in once a started server is up
    spec: Any                      # launch.vllm_server.ServerSpec, or None for a running endpoint
    identity: str                  # what produced the answers, for the cache key


def resolve_target(recipe: PredictRecipe, model: str | None) -> Target:
    """The server to start (merged model, or base + adapter with --enable-lora) and the model name to ask."""
    settings = recipe.client
    if recipe.server is None:
        if not settings.base_url:
            raise ClientError("client.base_url is not set and the recipe has no server: section; set one of them")
        settings = dataclasses.replace(settings, model=model or settings.model)
        if not settings.model:
            raise ClientError("client.model is not set; name the model the endpoint serves (or pass --model)")
        return Target(settings, None, settings.model)

    from prep.serving import load_server_spec, resolve_model

    spec = load_server_spec(recipe.server)
    name = settings.model or spec.served_model_name or spec.model
    adapter = adapter_config(model) if model else None
    if adapter is not None:
        base = adapter.get("base_model_name_or_path")
        if not base or not Path(base).exists():
            if base and Path(str(base)).name != Path(spec.model).name:
                log.warning("adapter %s was trained on %s; serving it on the recipe's server.model %s", model, base, spec.model)
            base = spec.model
        spec.model = str(resolve_model(str(base)))
        spec.lora_modules = {recipe.lora_name: str(Path(model).resolve())}
        spec.max_lora_rank = lora_rank_for(max(spec.max_lora_rank, int(adapter.get("r") or 0)))
        name = recipe.lora_name
        identity = f"{spec.model}+lora:{Path(model).resolve()}"
    else:
        if model:
            spec.model = str(resolve_model(model))
            name = settings.model or spec.served_model_name or spec.model
        identity = spec.model + "".join(f"+lora:{n}={p}" for n, p in sorted(spec.lora_modules.items()))
        if spec.lora_modules and not settings.model:
            name = next(iter(spec.lora_modules))   # a recipe serving one adapter means that adapter
    if "--chat-template" not in spec.extra_args:   # the training template, whatever the model folder carries
        spec.extra_args = [*spec.extra_args, "--chat-template", str(CHAT_TEMPLATE_PATH)]
    return Target(dataclasses.replace(settings, model=name), spec, identity)


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
            return {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": s.seed}
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

def check_chat_template(settings: ClientSettings, api_key: str, messages: list[dict], expected: list[int]) -> bool | None:
    """Ask vLLM's /tokenize how it renders MESSAGES: True when it matches training's token ids,
    ClientError when it differs, None when the endpoint has no /tokenize (not vLLM)."""
    root = settings.base_url.rstrip("/").removesuffix("/v1")
    body = {"model": settings.model, "messages": messages, "add_generation_prompt": True, "add_special_tokens": False}
    request = urllib.request.Request(f"{root}/tokenize", data=json.dumps(body).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
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


# ---- the run ----------------------------------------------------------------------------------------

async def _ask(predictor: Predictor, items: list, settings: ClientSettings, api_key: str, cache: Path,
               desc: str, progress: bool):
    async with ChatClient(settings, api_key=api_key) as client:
        report = await run_cached(items, predictor.key, lambda item: predictor.predict(client, item), cache,
                                  max_in_flight=2 * settings.concurrency, stats=client.stats, desc=desc,
                                  label_fn=lambda item: item[0].id, progress=progress)
        return report, client.stats.to_json()


class Endpoint:
    """The server (started on first need, when the recipe has one) and the preflight checks."""

    def __init__(self, target: Target, out: Path, prompts: PromptSet, sample_case: Case):
        self.target, self.out, self.prompts, self.sample_case = target, out, prompts, sample_case
        self.server, self.settings, self.api_key = None, target.settings, None

    def open(self) -> ClientSettings:
        if self.api_key is not None:
            return self.settings
        self.api_key = resolve_api_key(self.settings)   # a missing key stops us before a server start
        if self.target.spec is not None:
            from prep.serving import VLLMServer

            log.info("starting the vLLM server for %s", self.target.identity)
            self.server = VLLMServer(self.target.spec, self.out / "server.log").start()
            self.settings = dataclasses.replace(self.settings, base_url=self.server.base_url)
        check_endpoint(self.settings, self.api_key)
        from prep.tokenizer import chat_token_ids, load_tokenizer

        tokenizer = load_tokenizer()
        messages = self.prompts.messages(self.sample_case)
        checked = check_chat_template(self.settings, self.api_key, messages, chat_token_ids(tokenizer, messages, True))
        log.info("chat template %s", "matches training" if checked else "not checked")
        return self.settings

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            log.info("stopped the vLLM server")


def stop_token_ids(stop_tokens: list[str]) -> list[int]:
    from prep.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    ids = [tokenizer.convert_tokens_to_ids(token) for token in stop_tokens]
    unknown = [token for token, token_id in zip(stop_tokens, ids) if token_id is None or token_id == tokenizer.unk_token_id]
    if unknown:
        raise ValueError(f"key 'stop_tokens': {unknown[0]!r} is not a token of the Qwen2.5 vocabulary")
    return ids


def run_predict(recipe: PredictRecipe, cases: list[Case], prompts: PromptSet, out: str | Path, *,
                model: str | None = None, fresh: bool = False, progress: bool = True) -> dict[str, Any]:
    """Ask what the cache lacks (and fill, when enabled), then write predictions, the submission and the summary."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "cache.jsonl"
    if fresh and (moved := archive_cache(cache_path)):
        log.info("moved the old cache to %s", moved)
    target = resolve_target(recipe, model)
    predictor = Predictor(recipe, prompts, target.identity)
    endpoint = Endpoint(target, out, prompts, cases[0])
    cached_before = len(load_cache(cache_path))
    reports, stats, failed = [], [], []
    try:
        rounds = [("predict", 0)]
        if recipe.fill_missing.enabled:
            rounds += [("fill", attempt) for attempt in range(1, recipe.fill_missing.attempts + 1)]
        for desc, attempt in rounds:
            answered = predictor.answers(cases, load_cache(cache_path))
            todo = [(case, attempt) for case in cases if case.id not in answered]
            if attempt > 0 and todo:
                log.warning("filling %d unanswered cases by a retry at temperature %g (attempt %d of %d): ids %s",
                            len(todo), recipe.fill_missing.temperature, attempt, recipe.fill_missing.attempts,
                            id_list([case.id for case, _ in todo]))
            cache = load_cache(cache_path)
            todo = [item for item in todo if predictor.key(item) not in cache]
            if attempt == 0:
                log.info("%d cases: %d cached, %d to ask %s", len(cases), len(cases) - len(todo), len(todo), target.identity)
            if not todo:
                continue
            predictor.params(attempt)   # resolve the stop tokens before the event loop starts
            settings = endpoint.open()
            report, client_stats = asyncio.run(_ask(predictor, todo, settings, endpoint.api_key, cache_path, desc, progress))
            reports.append(report)
            stats.append(client_stats)
            failed += report.failed
    finally:
        endpoint.close()
    return finish(predictor, recipe, cases, out, reports, stats, failed, cached_before, time.perf_counter() - started)


def finish(predictor: Predictor, recipe: PredictRecipe, cases: list[Case], out: Path, reports: list, stats: list[dict],
           failed: list[dict], cached_before: int, wall_s: float) -> dict[str, Any]:
    """predictions.jsonl and summary.json always; submission.jsonl only when complete and valid."""
    cache = load_cache(out / "cache.jsonl")
    chosen = predictor.answers(cases, cache)
    answers = {case_id: answer_from_object(row["answer"]) for case_id, row in chosen.items()}
    write_jsonl_atomic(out / "predictions.jsonl", (
        {"id": case.id, **chosen[case.id]["answer"], "raw_valid": chosen[case.id]["raw_valid"],
         "filled": chosen[case.id]["attempt"] > 0, "finish_reason": chosen[case.id]["finish_reason"]}
        for case in cases if case.id in chosen))
    unanswered = [case.id for case in cases if case.id not in chosen]
    invalid = [case.id for case in cases if case.id not in chosen
               and (row := cache.get(predictor.key((case, 0)))) is not None and row["status"] == "invalid"]
    submission, error = out / "submission.jsonl", None
    try:
        write_submission(submission, cases, answers, recipe.echo_feature_content)
    except SubmissionError as err:
        error = str(err)
        if submission.exists():   # never leave an earlier run's file looking like this run's result
            submission.rename(submission.with_name(submission.name + ".stale"))
            log.warning("moved an earlier %s aside to %s.stale", submission, submission.name)
    totals = {key: sum(s[key] for s in stats) for key in ("requests", "retries", "tokens_in", "tokens_out")}
    asked_wall = sum(report.wall_s for report in reports)
    summary = {
        "recipe": recipe.recipe_path, "model": predictor.identity, "prompt_hash": predictor.prompts.hash,
        "cases": len(cases), "answered": len(chosen), "unanswered": len(unanswered), "unanswered_ids": unanswered,
        "invalid_ids": invalid, "failed_requests": len(failed),
        "raw_valid": sum(row["raw_valid"] for row in chosen.values()),
        "raw_valid_share": round(sum(row["raw_valid"] for row in chosen.values()) / len(cases), 4) if cases else None,
        "filled": sum(row["attempt"] > 0 for row in chosen.values()),
        "cache_rows_before": cached_before, "asked": sum(report.asked for report in reports), **totals,
        "ask_wall_s": round(asked_wall, 3), "wall_s": round(wall_s, 3),
        "answers_per_s": round(sum(report.finished for report in reports) / asked_wall, 3) if asked_wall else None,
        "submission": str(submission) if error is None else None, "error": error,
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    log.info("summary: %s", dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m launch.predict", __doc__.splitlines()[0], "predict recipe (recipes/predict/*.yaml)",
                          "output folder (cache, predictions, submission, summary, log)", "answer only the first N cases")
    parser.add_argument("--model", help="merged model folder or hub id, or a LoRA adapter folder (default: the recipe's "
                                        "server.model; with server=null, the served model name to ask)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    try:
        recipe = load_recipe(PredictRecipe, args.config, args.set)
        cases = read_cases(args.input).cases
        if args.limit is not None:
            cases = cases[: args.limit]
        if not cases:
            raise InputError(args.input, None, "no cases to answer")
        if args.model and recipe.server is not None and not Path(args.model).exists() and args.model.count("/") != 1:
            raise FileNotFoundError(f"{args.model}: --model is neither a folder nor a hub id (owner/name)")
        prompts = load_prompts(recipe.prompts.system, recipe.prompts.user)
        out.mkdir(parents=True, exist_ok=True)
        with logging_to(out / "predict.log"):
            summary = run_predict(recipe, cases, prompts, out, model=args.model, fresh=args.fresh, progress=not args.no_progress)
    except STAGE_ERRORS as err:
        return fail(log, err)
    print(f"{summary['answered']}/{summary['cases']} cases answered ({summary['raw_valid']} valid JSON as generated, "
          f"{summary['filled']} filled, {summary['failed_requests']} failed requests); outputs in {out}", file=sys.stderr)
    if summary["error"]:
        hints = []
        if summary["failed_requests"]:
            hints.append("run the same command again to retry the failed requests")
        if summary["invalid_ids"] and not recipe.fill_missing.enabled:
            hints.append(f"fill them by a retry at temperature {recipe.fill_missing.temperature:g} with "
                         "--set fill_missing.enabled=true")
        print(f"error: no submission written: {summary['error']}" + (f"; {'; or '.join(hints)}" if hints else ""),
              file=sys.stderr)
        return 1
    print(f"submission: {summary['submission']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
