"""On-policy rounds: which answer of each training case the teacher scores in a round.

Stage two distils the teacher's log-probs on stage one's kept answers. An on-policy round (Agarwal et al.
2024, "On-policy distillation of language models"; TRL's GKDTrainer) lets the current student answer the
training cases itself (prep.stages.predict, sampled, under the same JSON constraint as in predict), has the
teacher score those answers token by token (prep.stages.softlabels with fixed answers) and continues distilling
on them. `mix` is GKD's lmbda: the share of training cases whose answer is the student's in a round; the
others keep the teacher's answer. The choice is a hash of (seed, round, id), so a re-run picks the same
cases and different rounds pick different ones. Cases the teacher's split grouped as exact or near duplicates
(its sft/groups.json, split.near_duplicates) are drawn together, by the group's smallest id. The cases stage one
held out keep the teacher's answer:
their soft-label loss stays comparable between rounds and the student never trains on its own answers to
the cases the score table rates.

The command is `python -m launch.onpolicy`; the pipeline runs it as the `mix-R` step of round R. Stage one's
answers are read as the soft-label stage reads them (prep.stages.fixed_answers.read_answers). Output: one JSONL row
per case, `{"id", "messages": [assistant turn], "agreement", "split", "source"}`, which prep.stages.softlabels reads
with `--answers FILE`.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from prep.answers import Answer, answer_json
from prep.jsonio import InputError, read_jsonl, write_jsonl_atomic
from prep.paths import resolve_path
from prep.stages.fixed_answers import read_answers
from prep.stages.teacher import GROUPS_FILE


def takes_student_answer(case_id: int, mix: float, seed: int, round_index: int) -> bool:
    """Whether case CASE_ID uses the student's answer in round ROUND_INDEX: a fraction MIX of the cases, by hash."""
    digest = hashlib.sha256(f"{seed}:{round_index}:{case_id}".encode()).hexdigest()[:13]
    return int(digest, 16) / 16 ** 13 < mix


def teacher_groups(teacher: Path) -> dict[int, int]:
    """The duplicate groups the teacher's split kept together (id -> the group's smallest id); empty for a teacher
    folder written before groups.json, or for an answers file."""
    path = teacher / "sft" / GROUPS_FILE
    if not path.is_file():
        return {}
    try:
        groups = json.loads(path.read_text(encoding="utf-8")).get("groups")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}: not a JSON object; rerun the teacher step to rewrite it") from None
    if not isinstance(groups, list) or not all(isinstance(group, list) and group and
                                               all(isinstance(i, int) for i in group) for group in groups):
        raise ValueError(f"{path}: 'groups' must be a list of lists of case ids")
    return {case_id: min(group) for group in groups for case_id in group}


def student_answers(predictions: Path) -> dict[int, str]:
    """The student's answers in prep.stages.predict's predictions.jsonl, as the answer JSON it was trained to write."""
    answers = {}
    for line, row in enumerate(read_jsonl(predictions), start=1):
        if not isinstance(row.get("id"), int):
            raise InputError(predictions, line, "must be an integer", "id")
        for key in ("reason", "diseases"):
            if not isinstance(row.get(key), str):
                raise InputError(predictions, line, "must be a string", key)
        answers[row["id"]] = answer_json(Answer(row["reason"], row["diseases"]))
    return answers


def mix_answers(teacher: str | Path, predictions: str | Path, out: str | Path, mix: float, seed: int,
                round_index: int) -> dict[str, Any]:
    """Write OUT: for each case stage one kept, the student's answer (a MIX share of the training cases) or the
    teacher's; the counts by source. Every training case needs a student answer (predict answers them all)."""
    if not 0 <= mix <= 1:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    predictions = resolve_path(predictions)
    kept, student = read_answers(teacher), student_answers(predictions)   # kept: the teacher folder, by split
    if kept.valid_ids is None:
        raise ValueError(f"{teacher}: not a teacher stage folder (its sft/train.jsonl and sft/valid.jsonl say which "
                         f"cases stage one held out)")
    missing = [case_id for case_id in kept.texts if case_id not in kept.valid_ids and case_id not in student]
    if missing:
        raise ValueError(f"{predictions}: no student answer for training case(s) {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}")
    rows, sources, groups = [], Counter(), teacher_groups(resolve_path(teacher))
    for case_id, text in kept.texts.items():
        split = "valid" if case_id in kept.valid_ids else "train"
        own = split == "train" and takes_student_answer(groups.get(case_id, case_id), mix, seed, round_index)
        source = "student" if own else "teacher"
        sources[f"{split}_{source}"] += 1
        rows.append({"id": case_id, "messages": [{"role": "assistant", "content": student[case_id] if own else text}],
                     "agreement": kept.agreement[case_id], "split": split, "source": source})
    write_jsonl_atomic(resolve_path(out), rows)
    return {"round": round_index, "mix": mix, "cases": len(rows), **dict(sorted(sources.items()))}
