"""prep.stages.onpolicy: which answer each case carries in an on-policy round (the student's for a share `mix` of the
training cases, the teacher's for the rest and for every held-out case), read back by the soft-label stage."""
import json
from pathlib import Path

import pytest

from launch.onpolicy import main
from prep.answers import Answer, answer_json
from prep.stages.fixed_answers import read_answers
from prep.stages.onpolicy import mix_answers, takes_student_answer

TRAIN, VALID = list(range(100, 140)), [900, 901, 902]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def teacher_folder(tmp_path: Path) -> Path:
    def row(case_id: int) -> dict:
        answer = answer_json(Answer(f"老师的理由 {case_id}", "感冒"))
        return {"id": case_id, "messages": [{"role": "user", "content": "病例"}, {"role": "assistant", "content": answer}],
                "agreement": 0.5}
    teacher = tmp_path / "teacher"
    write_rows(teacher / "sft" / "train.jsonl", [row(i) for i in TRAIN])
    write_rows(teacher / "sft" / "valid.jsonl", [row(i) for i in VALID])
    return teacher


def predictions(tmp_path: Path, ids: list[int]) -> Path:
    return write_rows(tmp_path / "student" / "predictions.jsonl",
                      [{"id": i, "reason": f"学生的理由 {i}", "diseases": "肺炎", "raw_valid": True, "filled": False}
                       for i in ids])


def test_a_share_of_training_cases_takes_the_students_answer_and_held_out_cases_never_do(tmp_path):
    teacher, student = teacher_folder(tmp_path), predictions(tmp_path, TRAIN + VALID)
    summary = mix_answers(teacher, student, tmp_path / "answers.jsonl", 0.5, 7, 1)
    rows = {row["id"]: row for row in map(json.loads, (tmp_path / "answers.jsonl").read_text().splitlines())}
    own = {i for i, row in rows.items() if row["source"] == "student"}
    assert sorted(rows) == sorted(TRAIN + VALID) and own <= set(TRAIN) and 10 <= len(own) <= 30
    assert own == {i for i in TRAIN if takes_student_answer(i, 0.5, 7, 1)}
    assert summary == {"round": 1, "mix": 0.5, "cases": 43, "train_student": len(own),
                       "train_teacher": 40 - len(own), "valid_teacher": 3}
    for i, row in rows.items():
        who = "学生" if i in own else "老师"
        assert json.loads(row["messages"][-1]["content"])["reason"] == f"{who}的理由 {i}"
        assert row["agreement"] == 0.5 and row["split"] == ("valid" if i in VALID else "train")
    # The soft-label stage reads the file back: every answer, the held-out ids as its validation split.
    fixed = read_answers(tmp_path / "answers.jsonl")
    assert fixed.texts == {i: row["messages"][-1]["content"] for i, row in rows.items()}
    assert fixed.valid_ids == set(VALID) and set(fixed.agreement.values()) == {0.5}
    # The same round draws the same cases again; the next round draws others; 0 and 1 are all or nothing.
    assert mix_answers(teacher, student, tmp_path / "again.jsonl", 0.5, 7, 1) == summary
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "answers.jsonl").read_bytes()
    assert {i for i in TRAIN if takes_student_answer(i, 0.5, 7, 2)} != own
    assert mix_answers(teacher, student, tmp_path / "none.jsonl", 0.0, 7, 1)["train_teacher"] == 40
    assert mix_answers(teacher, student, tmp_path / "all.jsonl", 1.0, 7, 1)["train_student"] == 40


def test_a_training_case_without_a_student_answer_or_a_bad_prediction_row_is_an_error(tmp_path, capsys):
    teacher = teacher_folder(tmp_path)
    student = predictions(tmp_path, TRAIN[1:])
    code = main(["--teacher", str(teacher), "--student", str(student), "--mix", "0.5", "--seed", "1", "--round", "1",
                 "--out", str(tmp_path / "answers.jsonl")])
    assert code == 2 and f"no student answer for training case(s) [{TRAIN[0]}]" in capsys.readouterr().err
    assert not (tmp_path / "answers.jsonl").exists()
    write_rows(student, [{"id": 5, "reason": 3, "diseases": "肺炎"}])
    with pytest.raises(ValueError, match=r"predictions.jsonl:1: .*reason.*must be a string"):
        mix_answers(teacher, student, tmp_path / "answers.jsonl", 0.5, 1, 1)


def test_an_answers_file_with_a_bad_split_is_refused(tmp_path):
    path = write_rows(tmp_path / "answers.jsonl", [{"id": 1, "reason": "发热。", "diseases": "感冒", "split": "test"}])
    with pytest.raises(ValueError, match=r"answers.jsonl:1: .*split.*must be train or valid, got 'test'"):
        read_answers(path)
    write_rows(path, [{"id": 1, "reason": "发热。", "diseases": "感冒"}])
    assert read_answers(path).valid_ids is None     # no split in the file: the soft-label recipe's split applies
