"""From the soft-label cache to the dataset: the rows stage two trains on, their storage figures, rejects.jsonl.

A cache row (prep.stages.softlabels) holds what the teacher returned, padded to k; a dataset row holds, per answer
position, only the real candidates: neither padding nor the tokens a structured-output constraint forbids (vLLM
reports them at -9999: filler, most of a constrained position's k; docs/HOSTED_TEACHER.md, "Rows without
filler"). The Axolotl export keeps the filler, at the floor: Axolotl's kernel wants k slots. Everything here is
rebuilt from the cache at the end of every run, atomically. `labeller` is prep.stages.softlabels.SoftLabeller and
`settings` its SoftLabelSettings (typed Any: that module imports this one).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from prep.api.cache import load_cache
from prep.jsonio import save_splits, write_jsonl_atomic
from prep.records import Case
from prep.stages.axolotl_export import save_axolotl_dataset
from prep.stages.cross_tokenizer import EXACT, MAPPED, TAIL
from prep.stages.teacher import split_ids

# vLLM reports the tokens a structured-output constraint forbids at -9999: not candidates at all (filler), dropped.
MASKED_LOGPROB = -1000.0


def is_filler(logprob: float | None) -> bool:
    """A cache entry a structured-output constraint forbade (vLLM's -9999); padding (None) is not filler."""
    return logprob is not None and logprob <= MASKED_LOGPROB


def real_candidates(ids: list[int], logprobs: list[float | None], floor: float,
                    keep_filler: bool = False) -> tuple[list[int], list[float]]:
    """One position's stored candidates: without padding (id -1, log-prob null) and without filler (tokens a
    structured-output constraint forbids, reported at -9999; KEEP_FILLER keeps them), raised to FLOOR."""
    kept = [(token_id, max(lp, floor)) for token_id, lp in zip(ids, logprobs)
            if token_id >= 0 and lp is not None and (keep_filler or not is_filler(lp))]
    return [token_id for token_id, _ in kept], [lp for _, lp in kept]


def dataset_row(cache_row: dict[str, Any], messages: list[dict[str, str]],
                settings: Any, agreement: float = 1.0, keep_filler: bool = False) -> dict[str, Any]:
    """A dataset row: ragged, each position holding only its real candidates (module docstring)."""
    rows = [real_candidates(ids, lps, settings.logprob_floor, keep_filler)
            for ids, lps in zip(cache_row["target_token_ids"], cache_row["logprobs"])]
    kinds = cache_row.get("target_kinds") or EXACT * len(cache_row["answer_token_ids"])
    return {"id": cache_row["id"], "messages": messages, "answer_token_ids": cache_row["answer_token_ids"],
            "target_token_ids": [ids for ids, _ in rows], "logprobs": [lps for _, lps in rows],
            "target_kinds": kinds,
            "temperature": settings.logprob_temperature, "sampling_temperature": cache_row.get("sampling_temperature"),
            "k": settings.top_k, "teacher_model": cache_row["model"], "source": cache_row["source"],
            "agreement": agreement}


def save_softlabel_dataset(train: list[dict], valid: list[dict], folder: Path, logprob_dtype: str = "float32") -> None:
    from datasets import Features, List, Value

    features = Features({
        "id": Value("int64"), "messages": List({"role": Value("string"), "content": Value("string")}),
        "answer_token_ids": List(Value("int32")), "target_token_ids": List(List(Value("int32"))),
        "logprobs": List(List(Value(logprob_dtype))), "temperature": Value("float64"),
        "sampling_temperature": Value("float64"), "k": Value("int32"), "teacher_model": Value("string"),
        "source": Value("string"), "agreement": Value("float64"), "target_kinds": Value("string"),
    })
    save_splits({"train": train, "validation": valid}, features, folder)


def storage_figures(folder: Path, answer_tokens: int, columns: tuple[str, ...] = ("target_token_ids", "logprobs"),
                    prefix: str = "") -> dict[str, float | None]:
    """Bytes per answer token: the soft-label COLUMNS in Arrow memory, and the whole folder on disk."""
    from datasets import load_from_disk

    if not answer_tokens:
        return {f"{prefix}bytes_per_answer_token": None, f"{prefix}softlabel_bytes_per_answer_token": None}
    dataset = load_from_disk(str(folder))
    in_columns = sum(split.data.column(name).nbytes for split in dataset.values() for name in columns)
    on_disk = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    return {f"{prefix}bytes_per_answer_token": round(on_disk / answer_tokens, 1),
            f"{prefix}softlabel_bytes_per_answer_token": round(in_columns / answer_tokens, 1)}


def validation_ids(labeller: Any, cases: list[Case], rows: list[dict[str, Any]]) -> set[int]:
    """The held-out ids: the answers' own split (scored answers, or --split-from), else the recipe's split of the
    answered cases (duplicate groups kept together)."""
    if labeller.reference is not None and labeller.reference.valid_ids is not None:
        return labeller.reference.valid_ids
    return split_ids(cases, [row["id"] for row in rows], labeller.recipe.split)


def export_axolotl(rows: list[dict[str, Any]], valid_ids: set[int], labeller: Any, folder: Path,
                   answer_tokens: int) -> dict[str, Any]:
    """axolotl/ from ROWS with their filler kept: Axolotl's top-k kernel renormalises the student over all k slots,
    masked ones included, so rows with fewer real candidates than k would train another loss there; the filler (at
    the floor, as before rows went ragged) fills a constrained position's k slots. Its summary figures."""
    settings = labeller.settings
    splits = {"train": [row for row in rows if row["id"] not in valid_ids],
              "validation": [row for row in rows if row["id"] in valid_ids]}
    save_axolotl_dataset(splits, labeller.tokenizer, folder, settings.axolotl_kd_temperature, settings.logprob_dtype)
    return {"axolotl_kd_temperature": settings.axolotl_kd_temperature,
            **storage_figures(folder, answer_tokens, ("target_token_ids", "target_logprobs", "target_mask"), "axolotl_")}


def derive_outputs(labeller: Any, cases: list[Case], out: Path,
                   failed: list[dict] | None = None) -> dict[str, Any]:
    """Rebuild rejects.jsonl and dataset/ from the cache (atomically); counts for the summary."""
    cache = load_cache(out / "cache.jsonl")
    rows, rejects, kinds, missing, used = [], [], Counter(), 0, set()
    dropped = endoftext_stops = filler = 0
    export_rows: list[dict[str, Any]] = []
    position_kinds: Counter = Counter()
    for case in cases:
        key = labeller.key(case)
        row = cache.get(key)
        if row is None:
            missing += 1
            continue
        used.add(key)
        if row["status"] != "ok":
            kinds[row["kind"]] += 1
            rejects.append({"id": case.id, "kind": "rejected", "reason": row["error"], "raw": row["raw"]})
            continue
        messages = labeller.prompts.messages(case) + [{"role": "assistant", "content": row["answer"]}]
        agreement = labeller.reference.agreement.get(case.id, 1.0) if labeller.reference else 1.0
        rows.append(dataset_row(row, messages, labeller.settings, agreement))
        if labeller.settings.axolotl_export:   # Axolotl's kernel wants k slots: the filler stays there (see below)
            export_rows.append(dataset_row(row, messages, labeller.settings, agreement, keep_filler=True))
        dropped += row["dropped"]
        filler += sum(is_filler(lp) for lps in row["logprobs"] for lp in lps)
        position_kinds.update(rows[-1]["target_kinds"])
        endoftext_stops += row.get("chosen_end") not in (None, labeller.vocab.im_end)
    for failure in failed or []:
        rejects.append({"id": failure["item"], "kind": "failed", "reason": failure["error"], "raw": None})
    valid_ids = validation_ids(labeller, cases, rows)
    train = [row for row in rows if row["id"] not in valid_ids]
    valid = [row for row in rows if row["id"] in valid_ids]
    settings = labeller.settings
    write_jsonl_atomic(out / "rejects.jsonl", rejects)
    save_softlabel_dataset(train, valid, out / "dataset", settings.logprob_dtype)
    answer_tokens = sum(len(row["answer_token_ids"]) for row in rows)
    axolotl = (export_axolotl(export_rows, valid_ids, labeller, out / "axolotl", answer_tokens)
               if settings.axolotl_export else {})
    return {"cases": len(cases), "answered": len(rows), "rejected": sum(kinds.values()),
            "rejected_reasons": dict(kinds),
            "incomplete": missing, "train": len(train), "valid": len(valid), "answer_tokens": answer_tokens,
            "k": settings.top_k, "logprob_dtype": settings.logprob_dtype, "dropped_alternatives": dropped,
            "filler_dropped": filler, "teacher_tokenizer": settings.teacher_tokenizer,
            "positions": {"exact": position_kinds[EXACT], "mapped": position_kinds[MAPPED],
                          "tail": position_kinds[TAIL]},
            "stopped_on_endoftext": endoftext_stops, **storage_figures(out / "dataset", answer_tokens), **axolotl,
            "stale_cache_rows": len(cache) - len(used)}
