"""The competition submission: rendered, validated, and written only when valid (`python -m launch.submission`).

A submission is JSONL, one line per input case in input order, keys `id`, `reason`, `diseases`
(and `feature_content` echoed when asked, as the official example does). Every problem is one
sentence naming the file and the line; a case without an answer is an error listing its id, never
a silently missing line.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from prep.answers import REASONING_KEY, Answer
from prep.jsonio import InputError, dumps, parse_object_line, read_jsonl, text_line_of_byte, write_text_atomic
from prep.records import Case, case_id_of, read_cases

SUBMISSION_KEYS = ("id", "reason", "diseases")
OPTIONAL_KEYS = ("feature_content",)
MAX_IDS_SHOWN = 20


class SubmissionError(ValueError):
    """The submission would be incomplete or invalid; nothing was written."""

    def __init__(self, message: str, problems: list[InputError] | None = None, missing_ids: list[int] | None = None):
        self.problems = problems or []
        self.missing_ids = missing_ids or []
        super().__init__(message)


def id_list(ids: list[int], limit: int = MAX_IDS_SHOWN) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def submission_row(case: Case, answer: Answer, echo_feature_content: bool = False) -> dict:
    """One submission line: the answer's reason and diseases (a reasoning trace never goes in)."""
    row = {"id": case.id, "reason": answer.reason, "diseases": answer.diseases}
    if echo_feature_content:
        row["feature_content"] = case.feature_content
    return row


def render_submission(cases: list[Case], answers: Mapping[int, Answer], echo_feature_content: bool = False) -> str:
    """The submission text for CASES in input order; SubmissionError listing the ids without an answer."""
    missing = [case.id for case in cases if case.id not in answers]
    if missing:
        raise SubmissionError(f"{len(missing)} of {len(cases)} cases have no answer (ids: {id_list(missing)})",
                              missing_ids=missing)
    return "".join(dumps(submission_row(case, answers[case.id], echo_feature_content)) + "\n" for case in cases)


def read_submission_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, text) for every line, blank ones included: a gap in a submission is a problem too."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, None, "file not found") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(path, text_line_of_byte(data, err.start), f"not valid UTF-8 ({err.reason})") from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":  # the final newline ends the last line; it does not start a blank one
        lines.pop()
    return list(enumerate(lines, start=1))


def _line_problem(path: str | Path, number: int, text: str, expected: Mapping[int, tuple[int, Case]],
                  seen: dict[int, int], last: list) -> InputError | None:
    """The first problem of one line, or None; registers the line's id in SEEN and the order state in LAST."""
    if not text.strip():
        return InputError(path, number, "blank line (a submission has exactly one JSON object per line)")
    try:
        row = parse_object_line(path, number, text)
        if "id" not in row:
            return InputError(path, number, "missing", field="id")
        case_id = case_id_of(path, number, row["id"])
    except InputError as problem:
        return problem
    if case_id not in expected:
        return InputError(path, number, f"id {case_id} is not one of the input cases", field="id")
    if case_id in seen:
        return InputError(path, number, f"duplicate id {case_id} (first on line {seen[case_id]})", field="id")
    seen[case_id] = number
    position, case = expected[case_id]
    if last and position < last[0]:
        return InputError(path, number, f"id {case_id} is out of input order (the input has it before id "
                                        f"{last[1]}, which is on line {last[2]})", field="id")
    last[:] = [position, case_id, number]
    for key in SUBMISSION_KEYS[1:]:
        if key not in row:
            return InputError(path, number, "missing", field=key)
        if not isinstance(row[key], str):
            return InputError(path, number, f"must be a string, got {type(row[key]).__name__}", field=key)
        if not row[key].strip():
            return InputError(path, number, "is empty", field=key)
    if REASONING_KEY in row:
        return InputError(path, number, "a reasoning trace is a training target, never part of a submission (a line "
                                        "has id, reason, diseases and optionally feature_content)",
                          field=REASONING_KEY)
    extra = [key for key in row if key not in SUBMISSION_KEYS + OPTIONAL_KEYS]
    if extra:
        return InputError(path, number, "unexpected key (a submission line has id, reason, diseases and optionally "
                                        "feature_content)", field=extra[0])
    if "feature_content" in row and row["feature_content"] != case.feature_content:
        return InputError(path, number, f"does not match the input case {case_id} ({case.source})",
                          field="feature_content")
    return None


def validate_lines(cases: list[Case], lines: Iterable[tuple[int, str]], path: str | Path) -> list[InputError]:
    """Every problem of a submission's lines against the input CASES: bad JSON, missing/extra/duplicate
    ids, empty fields, wrong order; then one problem listing the input ids that have no line."""
    expected = {case.id: (position, case) for position, case in enumerate(cases)}
    seen: dict[int, int] = {}
    last: list = []  # [input position, id, line] of the latest line in input order
    problems = [problem for number, text in lines
                if (problem := _line_problem(path, number, text, expected, seen, last)) is not None]
    missing = [case.id for case in cases if case.id not in seen]
    if missing:
        problems.append(InputError(path, None, f"{len(missing)} input ids have no line: {id_list(missing)}"))
    return problems


def check_submission(cases_path: str | Path, submission_path: str | Path) -> list[InputError]:
    """Problems of the submission file against the case file (an unreadable case file raises InputError)."""
    cases = read_cases(cases_path).cases
    try:
        lines = read_submission_lines(submission_path)
    except InputError as err:
        return [err]
    return validate_lines(cases, lines, submission_path)


def write_submission(path: str | Path, cases: list[Case], answers: Mapping[int, Answer],
                     echo_feature_content: bool = False) -> Path:
    """Render, validate, then write atomically; SubmissionError (and no file change) when anything is wrong."""
    text = render_submission(cases, answers, echo_feature_content)
    problems = validate_lines(cases, enumerate(text.splitlines(), start=1), path)
    if problems:
        raise SubmissionError(f"the rendered submission does not validate: {problems[0]}", problems=problems)
    return write_text_atomic(path, text)


def write_submission_from_predictions(cases_path: str | Path, predictions_path: str | Path,
                                      out_path: str | Path) -> Path:
    """The submission for exactly the cases of CASES_PATH, from predictions (predict's `predictions.jsonl`
    or another submission) that may cover more cases; SubmissionError when a case has no usable answer."""
    answers = {row["id"]: Answer(row["reason"], row["diseases"]) for row in read_jsonl(predictions_path)
               if row.get("reason") and row.get("diseases")}
    return write_submission(out_path, read_cases(cases_path).cases, answers)
