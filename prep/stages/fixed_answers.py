"""The answers stage one kept, read for scoring: what the soft-label stage (--answers) and the on-policy stage take.

Answers come from prep.stages.teacher's output folder (sft/train.jsonl and sft/valid.jsonl) or from a JSONL file
whose rows hold `messages` (the last assistant turn is the answer) or `reason` and `diseases`. Each row may carry
its `agreement` (prep.stages.teacher's self-consistency, 1.0 when absent) and a `split`; the ids the answers hold
out become the soft-label validation split, so stage two never trains on the cases stage one's score rates.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prep.answers import Answer, answer_json
from prep.jsonio import InputError, read_jsonl
from prep.paths import resolve_path


@dataclass
class FixedAnswers:
    """Answers to score, read by read_answers."""

    texts: dict[int, str]           # id -> answer text (the last assistant turn, or reason + diseases as JSON)
    agreement: dict[int, float]     # id -> the row's `agreement` (prep.stages.teacher's self-consistency); 1.0 when absent
    # The ids the answers' own split holds out (the teacher folder's sft/valid.jsonl, or rows marked "split":
    # "valid"): the soft-label validation split, so stage two never trains on the cases stage one's score rates.
    # None: the answers carry no split, and the recipe's split applies.
    valid_ids: set[int] | None = None


def read_answers(path: str | Path) -> FixedAnswers:
    """The answers in prep.stages.teacher's output folder (sft/train.jsonl, sft/valid.jsonl) or a JSONL file whose rows
    hold `messages` (the last assistant turn) or `reason` and `diseases`, with each row's `agreement`."""
    path = resolve_path(path)
    files = [path / "sft" / "train.jsonl", path / "sft" / "valid.jsonl"] if path.is_dir() else [path]
    if not all(file.exists() for file in files):
        raise FileNotFoundError(f"{path}: no answers there (expected the teacher stage's sft/train.jsonl and "
                                f"sft/valid.jsonl, or a JSONL file)")
    answers, splits, folder = FixedAnswers({}, {}), {}, path.is_dir()
    for file in files:
        for line, row in enumerate(read_jsonl(file), start=1):
            split = "valid" if folder and file.name == "valid.jsonl" else row.get("split")
            if split is not None and split not in ("train", "valid"):
                raise InputError(file, line, f"must be train or valid, got {split!r}", "split")
            if not isinstance(row.get("id"), int):
                raise InputError(file, line, "must be an integer", "id")
            if "messages" in row:
                turns = [m for m in row["messages"] if m.get("role") == "assistant"]
                if not turns:
                    raise InputError(file, line, "has no assistant turn", "messages")
                answers.texts[row["id"]] = turns[-1]["content"]
            elif "reason" in row and "diseases" in row:
                answers.texts[row["id"]] = answer_json(Answer(str(row["reason"]), str(row["diseases"])))
            else:
                raise InputError(file, line, "needs 'messages' or 'reason' and 'diseases'", "answer")
            agreement = row.get("agreement", 1.0)
            if isinstance(agreement, bool) or not isinstance(agreement, int | float) or not 0 <= agreement <= 1:
                raise InputError(file, line, f"must be a number in [0, 1], got {agreement!r}", "agreement")
            answers.agreement[row["id"]] = float(agreement)
            splits[row["id"]] = split
    if folder or any(split is not None for split in splits.values()):
        answers.valid_ids = {case_id for case_id, split in splits.items() if split == "valid"}
    return answers
