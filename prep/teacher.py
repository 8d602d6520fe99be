"""Stage one data: teacher answers for every case, from any OpenAI-compatible endpoint, into an SFT dataset.

    python -m prep.teacher --config recipes/teacher/local-tiny-vllm.yaml --input data/sample_cases.jsonl --out runs/teacher

Each (case, sample) is asked once: its answer, or its rejection after one repair turn, is appended
to OUT/cache.jsonl under a key of everything that shaped it (case text, prompt hash, model,
sampling, answer constraint). A rerun (the default, --resume) asks only for what the cache lacks
and re-derives the outputs; --fresh moves the cache aside first. Outputs under OUT:
cache.jsonl, rejects.jsonl, sft/train.jsonl, sft/valid.jsonl ({"id", "messages", "agreement"}),
sft/dataset/ (DatasetDict train/validation), summary.json, teacher.log (and server.log when the
recipe starts its own vLLM server).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prep.answers import Answer, AnswerError, answer_from_object, normalise_diseases, parse_answer
from prep.stage import STAGE_ERRORS, fail, logging_to, retry_status, stage_parser
from prep.client import (ChatClient, ClientError, ClientSettings, RequestFailed, StructuredOutput, archive_cache,
                         cache_key, check_endpoint, load_cache, resolve_api_key, run_cached, structured_output_params)
from prep.config import load_recipe
from prep.jsonio import dumps, save_splits, write_jsonl_atomic, write_text_atomic
from prep.prompts import PromptSet, load_prompts
from prep.records import Case, read_cases

log = logging.getLogger("medkd.teacher")

DEFAULT_REPAIR_PROMPT = ("上面的回答无法使用：{error}。请重新回答：只输出一个 JSON 对象，格式为 "
                         '{"reason": "…", "diseases": "…"}，reason 在前，不要输出其他内容。')


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 1024
    samples_per_case: int = 1            # > 1: self-consistency, keep the sample that agrees most with the others
    seed: int | None = None              # sample i is asked with seed + i, so samples differ yet reruns repeat

    def __post_init__(self) -> None:
        if self.samples_per_case < 1:
            raise ValueError("key 'sampling.samples_per_case': must be at least 1")
        if self.max_tokens < 1:
            raise ValueError("key 'sampling.max_tokens': must be at least 1")


@dataclass
class PromptFiles:
    system: str = "data/prompts/system.txt"
    user: str = "data/prompts/user.txt"


@dataclass
class Split:
    valid_fraction: float = 0.05
    seed: int = 2025

    def __post_init__(self) -> None:
        if not 0 <= self.valid_fraction < 1:
            raise ValueError("key 'split.valid_fraction': must be in [0, 1)")


@dataclass
class TeacherRecipe:
    client: ClientSettings = field(default_factory=ClientSettings)
    sampling: Sampling = field(default_factory=Sampling)
    structured_output: StructuredOutput = field(default_factory=StructuredOutput)
    prompts: PromptFiles = field(default_factory=PromptFiles)
    split: Split = field(default_factory=Split)
    server: str | dict[str, Any] | None = None   # a serve recipe (path) or inline mapping: prep.teacher starts and stops it
    repair_prompt: str = DEFAULT_REPAIR_PROMPT   # the user turn after an invalid answer; {error} is the parser's sentence
    recipe_path: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if "{error}" not in self.repair_prompt:
            raise ValueError("key 'repair_prompt': must contain the {error} placeholder")


# ---- one case, one sample -----------------------------------------------------------------------

def validate_answer(text: str, finish_reason: str | None = None) -> Answer:
    """parse_answer, plus what a UTF-8 dataset cannot hold; the error says why, for the repair turn."""
    try:
        answer = parse_answer(text)
    except AnswerError as err:
        if finish_reason == "length":
            raise AnswerError(f"{err}; the answer was cut off at the max_tokens limit, so answer more briefly") from None
        raise
    for name, value in (("reason", answer.reason), ("diseases", answer.diseases)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise AnswerError(f"'{name}' holds an invalid \\u escape (an unpaired surrogate)") from None
    return answer


def _digest(text: str, length: int = 12) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


class Labeller:
    """Keys and asks (case, sample) items for one recipe, prompt set and model."""

    def __init__(self, recipe: TeacherRecipe, prompts: PromptSet, model: str):
        self.recipe, self.prompts, self.model = recipe, prompts, model
        sampling = recipe.sampling
        self.sampling = {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens}
        self.constraint = structured_output_params(recipe.structured_output)

    def items(self, cases: list[Case]) -> list[tuple[Case, int]]:
        return [(case, sample) for case in cases for sample in range(self.recipe.sampling.samples_per_case)]

    def seed(self, sample: int) -> int | None:
        return None if self.recipe.sampling.seed is None else self.recipe.sampling.seed + sample

    def key(self, item: tuple[Case, int]) -> str:
        case, sample = item
        return cache_key(id=case.id, case=_digest(case.feature_content), prompt=self.prompts.hash,
                         repair=_digest(self.recipe.repair_prompt, 8), model=self.model, sampling=self.sampling,
                         seed=self.seed(sample), sample=sample, constraint=self.constraint)

    async def label(self, client: ChatClient, item: tuple[Case, int]) -> dict[str, Any]:
        """Ask; on an invalid answer ask once more with the parser's complaint; return the cache row."""
        case, sample = item
        messages = self.prompts.messages(case)
        params = {**self.sampling, "seed": self.seed(sample), **self.constraint}
        results, answer, error = [], None, None
        for attempt in range(2):
            result = await client.chat(messages, **params)
            results.append(result)
            try:
                answer = validate_answer(result.text, result.finish_reason)
                break
            except AnswerError as err:
                error = str(err)
                messages = messages + [{"role": "assistant", "content": result.text},
                                       {"role": "user", "content": self.recipe.repair_prompt.replace("{error}", error)}]
        return {
            "id": case.id, "sample": sample, "status": "ok" if answer else "rejected",
            "answer": {"reason": answer.reason, "diseases": answer.diseases} if answer else None,
            "error": None if answer else error, "repaired": bool(answer) and len(results) == 2,
            "raw": [result.text for result in results], "finish_reason": [result.finish_reason for result in results],
            "usage": {"prompt_tokens": sum(r.usage["prompt_tokens"] for r in results),
                      "completion_tokens": sum(r.usage["completion_tokens"] for r in results)},
            "retries": sum(result.retries for result in results), "model": self.model, "prompt_hash": self.prompts.hash,
        }


# ---- from the cache to the dataset ----------------------------------------------------------------

def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def select_by_agreement(answers: list[Answer | None]) -> tuple[int | None, float]:
    """Index of the answer whose disease set agrees most with the others' (mean Jaccard; ties to the
    first; a rejected sample agrees with nothing), and that agreement. One sample agrees fully."""
    sets = [set(normalise_diseases(a.diseases, keep_parentheticals=False)) if a else None for a in answers]
    if len(sets) == 1:
        return (0, 1.0) if sets[0] is not None else (None, 0.0)
    best, best_score = None, -1.0
    for i, mine in enumerate(sets):
        if mine is None:
            continue
        others = [_jaccard(mine, other) if other is not None else 0.0 for j, other in enumerate(sets) if j != i]
        score = sum(others) / len(others)
        if score > best_score + 1e-12:
            best, best_score = i, score
    return best, (round(best_score, 4) if best is not None else 0.0)


def validation_ids(ids: list[int], valid_fraction: float, seed: int) -> set[int]:
    """A case's split depends only on its id and the seed, so it never moves as more cases are labelled."""
    def score(case_id: int) -> float:
        return int(hashlib.sha256(f"{seed}:{case_id}".encode()).hexdigest()[:13], 16) / 16 ** 13

    valid = {case_id for case_id in ids if score(case_id) < valid_fraction}
    if valid_fraction > 0 and not valid and len(ids) >= 2:
        valid = {min(ids, key=score)}
    return valid


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(";")[0].strip()


def derive_outputs(labeller: Labeller, cases: list[Case], out: Path, failed: list[dict] | None = None) -> dict[str, Any]:
    """Rebuild rejects.jsonl and the SFT files from the cache (atomically); counts for the summary."""
    cache = load_cache(out / "cache.jsonl")
    n = labeller.recipe.sampling.samples_per_case
    sft, rejects, kinds, missing = [], [], Counter(), 0
    used_keys, repaired = set(), 0
    for case in cases:
        keys = [labeller.key((case, sample)) for sample in range(n)]
        rows = [cache.get(key) for key in keys]
        used_keys.update(key for key, row in zip(keys, rows) if row)
        if any(row is None for row in rows):
            missing += 1
            continue
        answers = [answer_from_object(row["answer"]) if row["status"] == "ok" else None for row in rows]
        repaired += sum(bool(row.get("repaired")) for row in rows)
        for row in rows:
            if row["status"] != "ok":
                rejects.append({"id": case.id, "sample": row["sample"], "kind": "rejected", "reason": row["error"], "raw": row["raw"]})
        best, agreement = select_by_agreement(answers)
        if best is None:
            kinds[_reason_kind(rows[-1]["error"] or "")] += 1
            continue
        sft.append({"id": case.id, "messages": labeller.prompts.messages(case, answers[best]), "agreement": agreement})
    for failure in failed or []:
        case_id, sample = failure["item"]
        rejects.append({"id": case_id, "sample": sample, "kind": "failed", "reason": failure["error"], "raw": None})

    split = labeller.recipe.split
    valid_ids = validation_ids([row["id"] for row in sft], split.valid_fraction, split.seed)
    train = [row for row in sft if row["id"] not in valid_ids]
    valid = [row for row in sft if row["id"] in valid_ids]
    write_jsonl_atomic(out / "rejects.jsonl", rejects)
    write_jsonl_atomic(out / "sft" / "train.jsonl", train)
    write_jsonl_atomic(out / "sft" / "valid.jsonl", valid)
    save_dataset(train, valid, out / "sft" / "dataset")
    agreements = [row["agreement"] for row in sft]
    return {"cases": len(cases), "answered": len(sft), "rejected": sum(kinds.values()), "rejected_reasons": dict(kinds),
            "incomplete": missing, "repaired_samples": repaired, "train": len(train), "valid": len(valid),
            "mean_agreement": round(sum(agreements) / len(agreements), 4) if agreements else None,
            "stale_cache_rows": len(cache) - len(used_keys)}


def save_dataset(train: list[dict], valid: list[dict], folder: Path) -> None:
    """A DatasetDict (train, validation), swapped in whole: never half a folder."""
    from datasets import Features, List, Value

    features = Features({"id": Value("int64"), "messages": List({"role": Value("string"), "content": Value("string")}),
                         "agreement": Value("float64")})
    save_splits({"train": train, "validation": valid}, features, folder)


# ---- the run ----------------------------------------------------------------------------------------

def resolve_settings(recipe: TeacherRecipe) -> tuple[ClientSettings, Any]:
    """Client settings with the model filled in from the server recipe when the recipe starts one."""
    settings, spec = recipe.client, None
    if recipe.server is not None:
        from prep.serving import load_server_spec

        spec = load_server_spec(recipe.server)
        settings = dataclasses.replace(settings, model=settings.model or spec.served_model_name or spec.model)
    elif not settings.base_url:
        raise ClientError("client.base_url is not set and the recipe has no server: section; set one of them")
    if not settings.model:
        raise ClientError("client.model is not set; name the model the endpoint serves")
    return settings, spec


async def _label_all(labeller: Labeller, items: list, settings: ClientSettings, api_key: str, out: Path, progress: bool):
    async with ChatClient(settings, api_key=api_key) as client:
        report = await run_cached(items, labeller.key, lambda item: labeller.label(client, item), out / "cache.jsonl",
                                  max_in_flight=settings.concurrency, stats=client.stats, desc="teacher",
                                  label_fn=lambda item: (item[0].id, item[1]), progress=progress)
        return report, client.stats


def run_teacher(recipe: TeacherRecipe, cases: list[Case], prompts: PromptSet, out: str | Path, *,
                fresh: bool = False, progress: bool = True) -> dict[str, Any]:
    """Label what the cache lacks (starting the recipe's server if it has one), then derive every output."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fresh and (moved := archive_cache(out / "cache.jsonl")):
        log.info("moved the old cache to %s", moved)
    settings, spec = resolve_settings(recipe)
    labeller = Labeller(recipe, prompts, settings.model)
    items = labeller.items(cases)
    cached = load_cache(out / "cache.jsonl")
    pending = [item for item in items if labeller.key(item) not in cached]
    log.info("%d cases, %d samples each: %d items cached, %d to ask %s at %s", len(cases),
             recipe.sampling.samples_per_case, len(items) - len(pending), len(pending), settings.model,
             settings.base_url or "(server from the recipe)")
    report, stats, server = None, None, None
    if pending:
        api_key = resolve_api_key(settings)      # a missing key stops us before a server start or a request
        try:
            if spec is not None:
                from prep.serving import VLLMServer

                log.info("starting the vLLM server for %s", spec.model)
                server = VLLMServer(spec, out / "server.log").start()
                settings = dataclasses.replace(settings, base_url=server.base_url)
            check_endpoint(settings, api_key)
            report, stats = asyncio.run(_label_all(labeller, pending, settings, api_key, out, progress))
        finally:
            if server is not None:
                server.stop()
                log.info("stopped the vLLM server")
    counts = derive_outputs(labeller, cases, out, report.failed if report else None)
    wall = time.perf_counter() - started
    client_stats = stats.to_json() if stats else {"requests": 0, "retries": 0, "tokens_in": 0, "tokens_out": 0}
    failed_reasons = Counter(_reason_kind(f["error"]) for f in report.failed) if report else Counter()
    summary = {
        "recipe": recipe.recipe_path, "model": settings.model, "base_url": settings.base_url,
        "prompt_hash": prompts.hash, "samples_per_case": recipe.sampling.samples_per_case,
        "cases_asked": len({item[0].id for item in pending}), "items_asked": len(pending),
        "items_cached_before": len(items) - len(pending),
        **counts,
        "failed": len(report.failed) if report else 0, "failed_reasons": dict(failed_reasons),
        **client_stats,
        "label_wall_s": round(report.wall_s, 3) if report else 0.0,
        "wall_s": round(wall, 3),
        "requests_per_s": round(client_stats["requests"] / report.wall_s, 3) if report and report.wall_s else 0.0,
    }
    write_text_atomic(out / "summary.json", dumps(summary) + "\n")
    log.info("summary: %s", dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m prep.teacher", __doc__.splitlines()[0], "teacher recipe (recipes/teacher/*.yaml)",
                          "output folder (cache, rejects, sft/, summary.json, teacher.log)", "label only the first N cases")
    args = parser.parse_args(argv)

    out = Path(args.out)
    try:
        recipe = load_recipe(TeacherRecipe, args.config, args.set)
        cases = read_cases(args.input).cases
        if args.limit is not None:
            cases = cases[: args.limit]
        prompts = load_prompts(recipe.prompts.system, recipe.prompts.user)
        out.mkdir(parents=True, exist_ok=True)
        with logging_to(out / "teacher.log"):
            summary = run_teacher(recipe, cases, prompts, out, fresh=args.fresh, progress=not args.no_progress)
    except STAGE_ERRORS as err:
        return fail(log, err)
    print(f"{summary['answered']}/{summary['cases']} cases answered ({summary['rejected']} rejected, "
          f"{summary['failed']} failed, {summary['incomplete']} incomplete); {summary['retries']} retries; "
          f"outputs in {out}", file=sys.stderr)
    return retry_status(summary, out)


if __name__ == "__main__":
    sys.exit(main())
