"""Stage one data: teacher answers for every case, from any OpenAI-compatible endpoint, into an SFT dataset.

The command is `python -m launch.teacher`. Each (case, sample) is asked once: its answer, or its
rejection after the recipe's repair turns (`repair_turns`, the user turn `prompts.repair`), is
appended to OUT/cache.jsonl under a key of everything that shaped it (case text, prompt hashes,
model, sampling, answer constraint). A rerun asks only for what the cache lacks and re-derives the
outputs. Outputs under OUT: cache.jsonl, rejects.jsonl, sft/train.jsonl, sft/valid.jsonl
({"id", "messages", "agreement"}), sft/dataset/ (DatasetDict train/validation), summary.json,
teacher.log (and server.log when the recipe starts its own vLLM server).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prep.answers import (
    Answer,
    AnswerError,
    answer_from_object,
    format_diseases,
    normalise_diseases,
    parse_answer,
    structured_output_params,
)
from prep.api.cache import cache_key, load_cache
from prep.api.pool import ChatClient
from prep.config import RecipeError, load_recipe
from prep.jsonio import save_splits, write_jsonl_atomic, write_text_atomic
from prep.near_duplicates import NearDuplicates, group_of
from prep.paths import resolve_path
from prep.prompts import PromptSet
from prep.records import Case
from prep.stages.api_stage import (
    ApiRecipe,
    ApiStage,
    PromptFiles,
    StageRun,
    Target,
    check_recipe_files,
    reason_kind,
    text_digest,
)

REPAIR_PLACEHOLDER = "{error}"
GROUPS_FILE = "groups.json"    # under sft/: the duplicate groups the split kept together
REASONING_MODES = ("drop", "target")
DISEASES_VOTES = ("best", "majority")


@dataclass
class TeacherPrompts(PromptFiles):
    repair: str = "data/prompts/repair.txt"   # the user turn after an invalid answer; {error} is the parser's sentence


@dataclass
class Split:
    valid_fraction: float = 0.05
    seed: int = 2025
    # Exact and near-duplicate cases (prep.near_duplicates: character n-grams whose Jaccard reaches the threshold,
    # e.g. {ngram: 5, threshold: 0.8}) fall on one side together, drawn by their group's smallest id, so no held-out
    # case has a copy in training. null, the default, draws case by case, as runs before this key did.
    near_duplicates: NearDuplicates | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.valid_fraction < 1:
            raise ValueError("key 'split.valid_fraction': must be in [0, 1)")


@dataclass
class TeacherRecipe(ApiRecipe):
    prompts: TeacherPrompts = field(default_factory=TeacherPrompts)
    split: Split = field(default_factory=Split)
    repair_turns: int = 1                 # asks after an invalid answer, each with the parser's complaint
    # A reasoning teacher's trace (kept in cache.jsonl either way): drop = answers as today; target = in the SFT
    # target, first: {"reasoning", "reason", "diseases"}; a sample without one is rejected. Not in any cache key.
    reasoning: str = "drop"
    # Self-consistency (sampling.samples_per_case > 1). A case whose samples agree less than min_agreement (the
    # kept sample's mean Jaccard, select_by_agreement) goes to rejects.jsonl; 0 keeps every answered case.
    min_agreement: float = 0.0
    # best: the diseases of the sample that agrees most; majority: those named by more than half of the valid
    # samples (vote_diseases). Both only choose among cached answers: neither is part of a cache key.
    diseases_vote: str = "best"

    def __post_init__(self) -> None:
        if self.repair_turns < 0:
            raise ValueError("key 'repair_turns': must be 0 or more")
        if self.reasoning not in REASONING_MODES:
            raise ValueError(f"key 'reasoning': must be one of {', '.join(REASONING_MODES)}")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError("key 'min_agreement': must be in [0, 1]")
        if self.diseases_vote not in DISEASES_VOTES:
            raise ValueError(f"key 'diseases_vote': must be one of {', '.join(DISEASES_VOTES)}")


def load_repair_prompt(path: str | Path) -> str:
    """The repair turn's text; it must say what was wrong, so it needs the {error} placeholder."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    text = path.read_text(encoding="utf-8-sig").strip()   # -sig: an editor's byte-order mark is no part of it
    if REPAIR_PLACEHOLDER not in text:
        raise ValueError(f"{path}: the repair prompt has no {REPAIR_PLACEHOLDER} placeholder")
    return text


def validate_recipe(path: str | Path, overlays: list[str | Path] = (), overrides: list[str] = ()) -> TeacherRecipe:
    """A teacher recipe, composed and checked with the files a run reads first, without asking anything."""
    recipe = load_recipe(TeacherRecipe, path, list(overrides), list(overlays))
    check_recipe_files(recipe, path)
    try:
        load_repair_prompt(recipe.prompts.repair)
    except (FileNotFoundError, ValueError) as err:
        raise RecipeError(path, "prompts.repair", str(err)) from None
    return recipe


# ---- one case, one sample -----------------------------------------------------------------------

def validate_answer(text: str, finish_reason: str | None = None) -> Answer:
    """parse_answer, plus what a UTF-8 dataset cannot hold; the error says why, for the repair turn."""
    try:
        answer = parse_answer(text)
    except AnswerError as err:
        if finish_reason == "length":
            raise AnswerError(f"{err}; the answer was cut off at the max_tokens limit, so answer more briefly") \
                from None
        raise
    for name, value in (("reason", answer.reason), ("diseases", answer.diseases), ("reasoning", answer.reasoning or "")):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise AnswerError(f"'{name}' holds an invalid \\u escape (an unpaired surrogate)") from None
    return answer


class Labeller:
    """Keys and asks (case, sample) items for one recipe, prompt set and model."""

    def __init__(self, recipe: TeacherRecipe, prompts: PromptSet, model: str):
        self.recipe, self.prompts, self.model = recipe, prompts, model
        self.repair_prompt = load_repair_prompt(recipe.prompts.repair)
        self.sampling = recipe.sampling.request()
        self.constraint = structured_output_params(recipe.structured_output)

    def items(self, cases: list[Case]) -> list[tuple[Case, int]]:
        return [(case, sample) for case in cases for sample in range(self.recipe.sampling.samples_per_case)]

    def seed(self, sample: int) -> int | None:
        return None if self.recipe.sampling.seed is None else self.recipe.sampling.seed + sample

    def key(self, item: tuple[Case, int]) -> str:
        case, sample = item
        # One repair turn, the default, is not spelled out, so caches written before it was a key still match.
        turns = {} if self.recipe.repair_turns == 1 else {"repair_turns": self.recipe.repair_turns}
        return cache_key(id=case.id, case=text_digest(case.feature_content), prompt=self.prompts.hash,
                         repair=text_digest(self.repair_prompt, 8), **turns, model=self.model, sampling=self.sampling,
                         seed=self.seed(sample), sample=sample, constraint=self.constraint)

    async def label(self, client: ChatClient, item: tuple[Case, int]) -> dict[str, Any]:
        """Ask; on an invalid answer ask again with the parser's complaint (repair_turns times); the cache row."""
        case, sample = item
        messages = self.prompts.messages(case)
        params = {**self.sampling, "seed": self.seed(sample), **self.constraint}
        results, answer, error = [], None, None
        for _ in range(1 + self.recipe.repair_turns):
            result = await client.chat(messages, reasoning_tokens=self.recipe.sampling.reasoning_tokens, **params)
            results.append(result)
            try:
                answer = validate_answer(result.text, result.finish_reason)
                break
            except AnswerError as err:
                error = str(err)
                repair = self.repair_prompt.replace(REPAIR_PLACEHOLDER, error)
                # The answer only, never its trace: DeepSeek's API refuses a reasoning_content in the messages.
                messages = messages + [{"role": "assistant", "content": result.text},
                                       {"role": "user", "content": repair}]
        # Traces are kept whatever `reasoning` says, so switching it re-derives the outputs without asking again;
        # a teacher that sends none leaves its rows as they were before traces were kept.
        traces = [result.reasoning for result in results]
        return {
            "id": case.id, "sample": sample, "status": "ok" if answer else "rejected",
            "answer": {"reason": answer.reason, "diseases": answer.diseases} if answer else None,
            "error": None if answer else error, "repaired": bool(answer) and len(results) > 1,
            "raw": [result.text for result in results], "finish_reason": [result.finish_reason for result in results],
            "usage": {"prompt_tokens": sum(r.usage["prompt_tokens"] for r in results),
                      "completion_tokens": sum(r.usage["completion_tokens"] for r in results)},
            "retries": sum(result.retries for result in results), "model": self.model,
            "prompt_hash": self.prompts.hash, **({"reasoning": traces} if any(traces) else {}),
        }

    def judge(self, row: dict[str, Any]) -> tuple[Answer | None, str | None]:
        """A cache row's answer as the recipe trains on it (the trace first with `reasoning: target`), or None
        and why: the row's rejection, or a missing trace when the recipe trains on traces."""
        if row["status"] != "ok":
            return None, row["error"]
        answer = answer_from_object(row["answer"])
        if self.recipe.reasoning == "drop":
            return answer, None
        trace = (row.get("reasoning") or [None])[-1]      # the last turn's: the answer that was accepted
        if not trace:
            # "no reasoning trace" before the bracket is the kind the summary counts (stage.reason_kind).
            return None, ("no reasoning trace (the teacher sent none with this answer, and the recipe's "
                          "`reasoning: target` trains on one: use a reasoning model, DeepSeek-R1 on its API or QwQ / "
                          "R1-distilled models on vLLM with --reasoning-parser)")
        return replace(answer, reasoning=trace), None


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


def _named(answer: Answer) -> dict[str, str]:
    """Disease key (normalised, parentheticals dropped, as select_by_agreement compares them) -> the sample's own
    spelling of it (parentheticals kept), in the sample's order."""
    named: dict[str, str] = {}
    for spelling in normalise_diseases(answer.diseases, keep_parentheticals=True):
        for key in normalise_diseases(spelling, keep_parentheticals=False)[:1]:
            named.setdefault(key, spelling)
    return named


def vote_diseases(answers: list[Answer | None]) -> tuple[int | None, Answer | None]:
    """The majority answer of a case's samples: (the sample the reason comes from, the answer), or (None, None)
    when no disease is named by more than half of the valid samples (rejected samples do not vote).

    The diseases are the names more than half of the valid samples give (keys as in select_by_agreement). The
    reason comes from the valid sample whose disease set agrees most (Jaccard) with the voted set, ties to the
    first, so reason and diseases stay as close as the samples allow; each voted name is spelt as that sample
    spells it (else as the first sample naming it does) and listed in its order, then in sample order.
    """
    named = [_named(answer) if answer else None for answer in answers]
    valid = [names for names in named if names is not None]
    votes = Counter(key for names in valid for key in names)
    voted = {key for key, count in votes.items() if count * 2 > len(valid)}
    if not voted:
        return None, None
    source = max((i for i, names in enumerate(named) if names is not None),
                 key=lambda i: (_jaccard(set(named[i]), voted), -i))
    order = [named[source], *(names for names in named if names is not None)]
    spellings: dict[str, str] = {}
    for names in order:
        for key, spelling in names.items():
            if key in voted:
                spellings.setdefault(key, spelling)
    return source, replace(answers[source], diseases=format_diseases(list(spellings.values())))


def validation_ids(ids: list[int], valid_fraction: float, seed: int, groups: dict[int, int] | None = None) -> set[int]:
    """A case's split depends only on its id and the seed, so it never moves as more cases are labelled. GROUPS
    (case_groups: id -> its duplicate group's smallest id) draws a group's cases together, by that id."""
    groups = groups or {}

    def score(case_id: int) -> float:
        drawn = groups.get(case_id, case_id)
        return int(hashlib.sha256(f"{seed}:{drawn}".encode()).hexdigest()[:13], 16) / 16 ** 13

    valid = {case_id for case_id in ids if score(case_id) < valid_fraction}
    if valid_fraction > 0 and not valid and len(ids) >= 2:
        first = min(ids, key=score)
        valid = {case_id for case_id in ids if groups.get(case_id, case_id) == groups.get(first, first)}
        valid = set() if len(valid) == len(ids) else valid   # one group holds every case: it stays in training
    return valid


def case_groups(cases: list[Case], split: Split) -> dict[int, int]:
    """The split's duplicate groups over CASES (id -> the group's smallest id); empty when the split draws case by
    case (split.near_duplicates: null)."""
    if split.near_duplicates is None:
        return {}
    return group_of([case.id for case in cases], [case.feature_content for case in cases], split.near_duplicates)


def split_ids(cases: list[Case], ids: list[int], split: Split) -> set[int]:
    """The ids among IDS (the cases answered, a subset of CASES) that SPLIT holds out, groups drawn over all CASES."""
    return validation_ids(ids, split.valid_fraction, split.seed, case_groups(cases, split))


def derive_outputs(labeller: Labeller, cases: list[Case], out: Path,
                   failed: list[dict] | None = None) -> dict[str, Any]:
    """Rebuild rejects.jsonl and the SFT files from the cache (atomically); counts for the summary."""
    cache = load_cache(out / "cache.jsonl")
    n = labeller.recipe.sampling.samples_per_case
    sft, rejects, kinds, missing = [], [], Counter(), 0
    used_keys, repaired, voted, no_majority = set(), 0, 0, 0
    recipe = labeller.recipe
    for case in cases:
        keys = [labeller.key((case, sample)) for sample in range(n)]
        rows = [cache.get(key) for key in keys]
        used_keys.update(key for key, row in zip(keys, rows) if row)
        if any(row is None for row in rows):
            missing += 1
            continue
        judged = [labeller.judge(row) for row in rows]
        answers = [answer for answer, _ in judged]
        repaired += sum(bool(row.get("repaired")) for row in rows)
        for row, (answer, why) in zip(rows, judged):
            if answer is None:   # the teacher's answer was invalid, or valid without the trace the recipe needs
                rejects.append({"id": case.id, "sample": row["sample"],
                                "kind": "rejected" if row["status"] != "ok" else "no_reasoning", "reason": why,
                                "raw": row["raw"]})
        best, agreement = select_by_agreement(answers)
        if best is None:
            kinds[reason_kind(judged[-1][1] or "")] += 1
            continue
        if agreement < recipe.min_agreement:
            kinds["low_agreement"] += 1
            rejects.append({"id": case.id, "sample": None, "kind": "low_agreement",
                            "reason": f"its {n} samples agree {agreement} (the best sample's mean Jaccard overlap of "
                                      f"diseases with the others'), below min_agreement {recipe.min_agreement}",
                            "raw": [row["raw"][-1] for row in rows], "agreement": agreement})
            continue
        answer = answers[best]
        if recipe.diseases_vote == "majority":
            # No disease named by a majority: the samples disagree too much to vote, and an empty list is no
            # answer, so the case keeps the sample that agrees most (as with `best`); counted in the summary.
            _, majority = vote_diseases(answers)
            voted, no_majority = voted + (majority is not None), no_majority + (majority is None)
            answer = majority or answer
        sft.append({"id": case.id, "messages": labeller.prompts.messages(case, answer), "agreement": agreement})
    for failure in failed or []:
        case_id, sample = failure["item"]
        rejects.append({"id": case_id, "sample": sample, "kind": "failed", "reason": failure["error"], "raw": None})
    train, valid = write_sft_files(out, sft, rejects, recipe.split, case_groups(cases, recipe.split))
    agreements = [row["agreement"] for row in sft]
    return {"cases": len(cases), "answered": len(sft), "rejected": sum(kinds.values()),
            "rejected_reasons": dict(kinds),
            "incomplete": missing, "repaired_samples": repaired, "train": len(train), "valid": len(valid),
            "mean_agreement": round(sum(agreements) / len(agreements), 4) if agreements else None,
            "min_agreement": recipe.min_agreement, "diseases_vote": recipe.diseases_vote,
            "voted_cases": voted, "no_majority_cases": no_majority,
            "stale_cache_rows": len(cache) - len(used_keys)}


def write_sft_files(out: Path, sft: list[dict], rejects: list[dict], split: Split,
                    groups: dict[int, int] | None = None) -> tuple[list[dict], list[dict]]:
    """Split the SFT rows by id hash (GROUPS: case_groups, drawn together) and write rejects.jsonl,
    sft/train.jsonl, sft/valid.jsonl, sft/groups.json and sft/dataset/ (each atomically); the train and
    validation rows. sft/groups.json lists the groups, so later draws over these cases (the on-policy mix,
    prep.stages.onpolicy) keep a group together too."""
    groups = groups or {}
    valid_ids = validation_ids([row["id"] for row in sft], split.valid_fraction, split.seed, groups)
    train = [row for row in sft if row["id"] not in valid_ids]
    valid = [row for row in sft if row["id"] in valid_ids]
    write_jsonl_atomic(out / "rejects.jsonl", rejects)
    write_jsonl_atomic(out / "sft" / "train.jsonl", train)
    write_jsonl_atomic(out / "sft" / "valid.jsonl", valid)
    members: dict[int, list[int]] = {}
    for case_id, first in sorted(groups.items()):
        members.setdefault(first, []).append(case_id)
    settings = split.near_duplicates and {"ngram": split.near_duplicates.ngram,
                                          "threshold": split.near_duplicates.threshold}
    write_text_atomic(out / "sft" / GROUPS_FILE, json.dumps({"near_duplicates": settings,
                                                              "groups": list(members.values())}) + "\n")
    save_dataset(train, valid, out / "sft" / "dataset")
    return train, valid


def save_dataset(train: list[dict], valid: list[dict], folder: Path) -> None:
    """A DatasetDict (train, validation), swapped in whole: never half a folder."""
    from datasets import Features, List, Value

    features = Features({"id": Value("int64"), "messages": List({"role": Value("string"), "content": Value("string")}),
                         "agreement": Value("float64")})
    save_splits({"train": train, "validation": valid}, features, folder)


# ---- the stage --------------------------------------------------------------------------------------

class TeacherStage(ApiStage):
    """Teacher answers for every (case, sample), then the SFT files."""

    name = "teacher"
    recipe_schema = TeacherRecipe

    def resolve(self) -> Target:
        target = super().resolve()
        self.labeller = Labeller(self.recipe, self.prompts, target.identity)
        return target

    def items(self) -> list[tuple[Case, int]]:
        return self.labeller.items(self.cases)

    def key(self, item: tuple[Case, int]) -> str:
        return self.labeller.key(item)

    async def ask(self, client: ChatClient, item: tuple[Case, int]) -> dict[str, Any]:
        return await self.labeller.label(client, item)

    def label(self, item: tuple[Case, int]) -> tuple[int, int]:
        return item[0].id, item[1]

    def finish(self, out: Path, run: StageRun) -> dict[str, Any]:
        counts = derive_outputs(self.labeller, self.cases, out, run.failed)
        stats, items = run.client_stats(), len(self.cases) * self.recipe.sampling.samples_per_case
        return {
            "recipe": self.recipe.recipe_path, "model": run.settings.model, "base_url": run.settings.base_url,
            "prompt_hash": self.prompts.hash, "samples_per_case": self.recipe.sampling.samples_per_case,
            "cases_asked": len({case.id for case, _ in run.asked}), "items_asked": len(run.asked),
            "items_cached_before": items - len(run.asked), **counts,
            "failed": len(run.failed), "failed_reasons": run.failed_reasons(), **stats,
            "label_wall_s": round(run.ask_wall_s, 3), "wall_s": run.wall_s(),
            "requests_per_s": round(stats["requests"] / run.ask_wall_s, 3) if run.ask_wall_s else 0.0,
        }
