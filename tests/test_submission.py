"""The submission writer and validator: each kind of broken submission is named by its line."""
import json
import subprocess
import sys

import pytest

from launch.submission import main
from prep.answers import Answer
from prep.eval.submission import SubmissionError, check_submission, write_submission
from prep.records import read_cases
from tests.conftest import REPO_ROOT, SAMPLE_CASES

CASES = read_cases(SAMPLE_CASES).cases
ANSWERS = {case.id: Answer(reason=f"1. 主诉：病例{case.id}；\n2. 依据。", diseases="1. 高血压；2. 头痛") for case in CASES}


@pytest.fixture
def good(tmp_path):
    return write_submission(tmp_path / "submission.jsonl", CASES, ANSWERS)


def rows_of(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def rewrite(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_writer_output_is_the_competition_format_and_validates(good):
    text = good.read_text(encoding="utf-8")
    rows = rows_of(good)
    assert [row["id"] for row in rows] == [case.id for case in CASES]
    assert all(list(row) == ["id", "reason", "diseases"] for row in rows)
    assert "高血压" in text and "\\u" not in text  # UTF-8, ensure_ascii=False
    assert rows[0]["reason"] == ANSWERS[CASES[0].id].reason
    assert check_submission(SAMPLE_CASES, good) == []


def test_writer_echoes_feature_content_when_asked(tmp_path):
    path = write_submission(tmp_path / "s.jsonl", CASES, ANSWERS, echo_feature_content=True)
    rows = rows_of(path)
    assert [row["feature_content"] for row in rows] == [case.feature_content for case in CASES]
    assert list(rows[0]) == ["id", "reason", "diseases", "feature_content"]
    assert check_submission(SAMPLE_CASES, path) == []


def test_writer_refuses_missing_answers_and_leaves_the_old_file(good):
    before = good.read_bytes()
    partial = {k: v for k, v in ANSWERS.items() if k not in (CASES[2].id, CASES[5].id)}
    with pytest.raises(SubmissionError, match=f"2 of 12 cases have no answer \\(ids: {CASES[2].id}, {CASES[5].id}\\)") as caught:
        write_submission(good, CASES, partial)
    assert caught.value.missing_ids == [CASES[2].id, CASES[5].id]
    assert good.read_bytes() == before
    assert not [p for p in good.parent.iterdir() if p.name.endswith(".tmp")]


def test_writer_refuses_an_empty_field(tmp_path):
    answers = dict(ANSWERS)
    answers[CASES[1].id] = Answer(reason="  ", diseases="x")
    with pytest.raises(SubmissionError, match=r"s.jsonl:2: field 'reason': is empty"):
        write_submission(tmp_path / "s.jsonl", CASES, answers)
    assert not (tmp_path / "s.jsonl").exists()


def _mutations():
    """name -> (function of the good lines -> broken lines, expected line, expected message)."""
    def set_field(index, key, value):
        def apply(lines):
            row = json.loads(lines[index])
            row[key] = value
            lines[index] = json.dumps(row, ensure_ascii=False)
            return lines
        return apply

    return {
        "missing id": (lambda lines: lines[:4] + lines[5:], None, f"1 input ids have no line: {CASES[4].id}"),
        "extra id": (lambda lines: lines + [json.dumps({"id": 77, "reason": "r", "diseases": "d"})], 13,
                     "field 'id': id 77 is not one of the input cases"),
        "duplicate id": (lambda lines: lines[:6] + [lines[3]] + lines[6:], 7,
                         f"field 'id': duplicate id {CASES[3].id} (first on line 4)"),
        "empty reason": (set_field(8, "reason", ""), 9, "field 'reason': is empty"),
        "blank diseases": (set_field(2, "diseases", " \n"), 3, "field 'diseases': is empty"),
        "missing diseases key": (lambda lines: lines[:1] + [json.dumps({"id": CASES[1].id, "reason": "r"})] + lines[2:], 2,
                                 "field 'diseases': missing"),
        "diseases not a string": (set_field(5, "diseases", ["高血压"]), 6, "field 'diseases': must be a string, got list"),
        "id as string": (set_field(0, "id", str(CASES[0].id)), 1, f"field 'id': must be an integer, got \"{CASES[0].id}\""),
        "bad JSON line": (lambda lines: lines[:10] + [lines[10][:-5]] + lines[11:], 11, "invalid JSON"),
        "not an object": (lambda lines: lines[:1] + ["[1, 2]"] + lines[2:], 2, "expected a JSON object, got list"),
        "blank line": (lambda lines: lines[:3] + [""] + lines[3:], 4, "blank line"),
        "wrong order": (lambda lines: lines[:6] + [lines[7], lines[6]] + lines[8:], 8,
                        f"field 'id': id {CASES[6].id} is out of input order (the input has it before id {CASES[7].id}, "
                        "which is on line 7)"),
        "unexpected key": (set_field(1, "score", 1), 2, "field 'score': unexpected key"),
        "wrong feature_content": (set_field(0, "feature_content", "性别: 男"), 1,
                                  "field 'feature_content': does not match the input case"),
    }


@pytest.mark.parametrize("name", list(_mutations()))
def test_validator_names_the_line_of_each_kind_of_breakage(good, name):
    mutate, line, message = _mutations()[name]
    lines = good.read_text(encoding="utf-8").splitlines()
    rewrite(good, mutate(list(lines)))
    problems = check_submission(SAMPLE_CASES, good)
    assert len(problems) >= 1
    first = problems[0]
    assert first.line == line, str(first)
    prefix = f"{good}:{line}: " if line is not None else f"{good}: "
    assert str(first).startswith(prefix) and message in str(first), str(first)


def test_a_dropped_line_is_not_also_reported_as_out_of_order(good):
    lines = good.read_text(encoding="utf-8").splitlines()
    rewrite(good, lines[:2] + lines[3:])
    assert [str(p) for p in check_submission(SAMPLE_CASES, good)] == [f"{good}: 1 input ids have no line: {CASES[2].id}"]


def test_non_utf8_is_named_by_line(good):
    good.write_bytes(good.read_bytes() + b'{"id": 1, "reason": "\xff", "diseases": "x"}\n')
    (problem,) = [p for p in check_submission(SAMPLE_CASES, good) if p.line is not None]
    assert str(problem) == f"{good}:13: not valid UTF-8 (invalid start byte)"


def test_check_command_exit_codes_and_messages(good, capsys):
    assert main(["check", str(SAMPLE_CASES), str(good)]) == 0
    assert "ok (12 lines" in capsys.readouterr().out
    lines = good.read_text(encoding="utf-8").splitlines()
    rewrite(good, lines[1:] + [lines[1]])
    assert main(["check", str(SAMPLE_CASES), str(good)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{good}:12: field 'id': duplicate id {CASES[1].id} (first on line 1)"
    assert err[1] == f"{good}: 1 input ids have no line: {CASES[0].id}"
    assert err[-1] == f"{good}: INVALID (2 problems)"


@pytest.mark.integration
def test_check_command_runs_as_a_module(good, tmp_path):
    rewrite(good, good.read_text(encoding="utf-8").splitlines()[:-1])
    result = subprocess.run([sys.executable, "-m", "launch.submission", "check", str(SAMPLE_CASES), str(good)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{good}: 1 input ids have no line: {CASES[-1].id}" in result.stderr
    missing = subprocess.run([sys.executable, "-m", "launch.submission", "check", str(tmp_path / "nope.jsonl"), str(good)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "nope.jsonl: file not found" in missing.stderr


def test_write_command_keeps_exactly_the_input_cases_and_refuses_a_gap(tmp_path, capsys):
    predictions = tmp_path / "predictions.jsonl"
    rows = [{"id": case.id, "reason": ANSWERS[case.id].reason, "diseases": ANSWERS[case.id].diseases,
             "raw_valid": True} for case in reversed(CASES)] + [{"id": 777, "reason": "r", "diseases": "d"}]
    rewrite(predictions, [json.dumps(row, ensure_ascii=False) for row in rows])
    out = tmp_path / "submission.jsonl"
    assert main(["write", str(SAMPLE_CASES), str(predictions), str(out)]) == 0
    assert [row["id"] for row in rows_of(out)] == [case.id for case in CASES]  # input order, id 777 left out
    assert all(list(row) == ["id", "reason", "diseases"] for row in rows_of(out))
    assert check_submission(SAMPLE_CASES, out) == []

    before = out.read_bytes()
    rewrite(predictions, [json.dumps(row, ensure_ascii=False) for row in rows if row["id"] != CASES[3].id])
    assert main(["write", str(SAMPLE_CASES), str(predictions), str(out)]) == 1
    assert f"1 of 12 cases have no answer (ids: {CASES[3].id})" in capsys.readouterr().err
    assert out.read_bytes() == before
    predictions.write_text('{"id": 1, "reason"\n', encoding="utf-8")
    assert main(["write", str(SAMPLE_CASES), str(predictions), str(out)]) == 2
    assert f"{predictions}:1: invalid JSON" in capsys.readouterr().err
