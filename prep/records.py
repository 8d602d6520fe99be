"""Competition cases: the `{"id", "feature_content"}` reader and summary (`python -m launch.records` is its command).

Every bad line is reported with file, line and field. The caller chooses between stopping at the
first problem (`on_error="raise"`) and collecting problems (`"collect"`, optionally written to a
rejects file); nothing is ever dropped silently.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from prep.jsonio import InputError, iter_json_lines, parse_object_line, write_jsonl_atomic
from prep.near_duplicates import NearDuplicates, contamination, group_summary

CASE_KEYS = ("id", "feature_content")
# Fields every case carries (values may be empty) and those that appear only sometimes.
ALWAYS_FIELDS = ("性别", "年龄", "主诉", "现病史", "既往史", "个人史", "过敏史", "婚育史")
OPTIONAL_FIELDS = ("流行病史", "体格检查", "辅助检查")
_FIELD_LINE = re.compile(r"^(" + "|".join(ALWAYS_FIELDS + OPTIONAL_FIELDS) + r")[:：]\s?(.*)$")


@dataclass(frozen=True)
class Case:
    id: int
    feature_content: str
    source: str = field(default="", compare=False)  # "path:line", for messages downstream

    def to_json(self) -> dict:
        return {"id": self.id, "feature_content": self.feature_content}


@dataclass
class ReadResult:
    cases: list[Case]
    problems: list[InputError]

    @property
    def ok(self) -> bool:
        return not self.problems


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def case_id_of(path: str | Path, line_number: int, value: object) -> int:
    """VALUE as a case id (an integer within int64, never a bool or a numeric string), or InputError naming the
    line. The datasets every stage writes keep ids as int64, so a larger one would pass here, be paid for, then
    fail at the first dataset write: it is refused here, before any request."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(path, line_number, f"must be an integer, got {json.dumps(value, ensure_ascii=False)}",
                         field="id")
    if not INT64_MIN <= value <= INT64_MAX:
        shown = str(value) if value.bit_length() < 256 else f"a number of about {int(value.bit_length() * 0.30103)} digits"
        raise InputError(path, line_number, f"{shown} is outside the 64-bit integer range the datasets store "
                                            f"({INT64_MIN} to {INT64_MAX}); renumber the case", field="id")
    return value


def parse_case_line(path: str | Path, line_number: int, text: str) -> Case:
    """One JSON line -> Case, or InputError naming the field at fault."""
    row = parse_object_line(path, line_number, text)
    for key in CASE_KEYS:
        if key not in row:
            raise InputError(path, line_number, "missing", field=key)
    extra = sorted(set(row) - set(CASE_KEYS))
    if extra:
        raise InputError(path, line_number, "unexpected key (a case has only id and feature_content)", field=extra[0])
    case_id, content = case_id_of(path, line_number, row["id"]), row["feature_content"]
    if not isinstance(content, str):
        raise InputError(path, line_number, f"must be a string, got {type(content).__name__}", field="feature_content")
    if not content.strip():
        raise InputError(path, line_number, "is empty", field="feature_content")
    return Case(case_id, content, source=f"{path}:{line_number}")


def read_cases(
    path: str | Path,
    on_error: Literal["raise", "collect"] = "raise",
    rejects_path: str | Path | None = None,
) -> ReadResult:
    """Read a JSONL (or JSON array) case file.

    on_error="raise" stops at the first bad line; "collect" keeps going and returns every problem,
    writing the bad lines with their reasons to `rejects_path` when given. Duplicate ids are
    problems (the second and later occurrences), as a submission needs each id exactly once.
    """
    cases: list[Case] = []
    problems: list[InputError] = []
    rejects: list[dict] = []
    first_line_of: dict[int, int] = {}
    for line_number, text in iter_json_lines(path):
        try:
            case = parse_case_line(path, line_number, text)
            if case.id in first_line_of:
                raise InputError(path, line_number, f"duplicate id {case.id} (first on line {first_line_of[case.id]})",
                                 field="id")
        except InputError as problem:
            if on_error == "raise":
                raise
            problems.append(problem)
            rejects.append({"source": f"{path}:{line_number}", "reason": str(problem), "raw": text})
            continue
        first_line_of[case.id] = line_number
        cases.append(case)
    if rejects_path is not None and rejects:
        write_jsonl_atomic(rejects_path, rejects)
    if not cases and not problems:   # nothing to do is an error: a run on it would "succeed" with no answers
        raise InputError(path, None, "no cases: the file is empty")
    return ReadResult(cases, problems)


def parse_fields(feature_content: str) -> dict[str, str]:
    """Split `字段: 值` lines into a dict; continuation lines belong to the field above them."""
    fields: dict[str, str] = {}
    current = None
    for line in feature_content.split("\n"):
        match = _FIELD_LINE.match(line)
        if match:
            current = match.group(1)
            fields[current] = match.group(2).strip()
        elif current is not None:
            fields[current] = (fields[current] + "\n" + line).strip()
    return fields


def percentiles(values: list[int], points: tuple[int, ...] = (50, 90, 99, 100)) -> dict[str, int]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {f"p{p}": ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))] for p in points}


def summarise(cases: list[Case], count_tokens: Callable[[str], int] | None = None) -> dict:
    """Records, unique ids, duplicate texts, exact and near-duplicate groups (prep.near_duplicates at its default
    n-gram and threshold, the split's), field presence (non-empty share) and length percentiles."""
    texts = Counter(case.feature_content for case in cases)
    presence = Counter()
    for case in cases:
        for name, value in parse_fields(case.feature_content).items():
            presence[name] += bool(value)
    summary = {
        "records": len(cases),
        "unique_ids": len({case.id for case in cases}),
        "duplicate_texts": sum(n - 1 for n in texts.values() if n > 1),
        "duplicate_groups": group_summary([case.id for case in cases], [case.feature_content for case in cases],
                                          NearDuplicates()),
        "field_non_empty": {name: presence[name] for name in ALWAYS_FIELDS + OPTIONAL_FIELDS},
        "chars": percentiles([len(case.feature_content) for case in cases]),
    }
    if count_tokens is not None:
        summary["qwen_tokens"] = percentiles([count_tokens(case.feature_content) for case in cases])
    return summary


def contamination_of(train: list[Case], test: list[Case], settings: NearDuplicates = NearDuplicates()) -> dict:
    """Which TEST cases are exact or near copies of TRAIN cases (prep.near_duplicates.contamination), by id."""
    return contamination([case.id for case in train], [case.feature_content for case in train],
                         [case.id for case in test], [case.feature_content for case in test], settings)
