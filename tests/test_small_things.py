"""Small promises every reader and command keeps (issue 22, points 7 and 8): a UTF-8 byte-order mark at the start
of any file a user hands us is tolerated, and a command that fails on its configuration leaves no --out behind."""
import json
import os
from pathlib import Path

import pytest

from prep.config import compose, read_yaml
from prep.eval.score import load_answers
from prep.eval.submission import check_submission
from prep.jsonio import read_jsonl
from prep.prompts import load_prompts
from prep.records import read_cases
from prep.stages.fixed_answers import read_answers
from prep.stages.teacher import load_repair_prompt
from tests.conftest import REPO_ROOT, SAMPLE_CASES

BOM = "\ufeff"
CASE = {"id": 7, "feature_content": "性别: 女\n年龄: 34\n主诉: 咽痛伴发热2天"}
ANSWER = {"id": 7, "reason": "咽痛伴发热", "diseases": "急性扁桃体炎"}


def bom_file(path: Path, text: str) -> Path:
    """TEXT written as UTF-8 with a byte-order mark in front, as Windows editors save it."""
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    return path


def line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


# ---- a byte-order mark is tolerated by every reader of a user's file ---------------------------------------------

@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_a_case_file_with_a_bom_reads_as_without(tmp_path, layout):
    text = line(CASE) + line({**CASE, "id": 8}) if layout == "jsonl" else json.dumps([CASE, {**CASE, "id": 8}])
    cases = read_cases(bom_file(tmp_path / "cases.jsonl", text)).cases
    assert [case.id for case in cases] == [7, 8] and cases[0].feature_content == CASE["feature_content"]
    assert cases[0].source.endswith(":1")                   # line numbers are unchanged by the mark


def test_answer_files_with_a_bom_read_as_without(tmp_path):
    """--answers files, the score's reference and predictions, and our own JSONL outputs read back."""
    path = bom_file(tmp_path / "answers.jsonl", line(ANSWER))
    assert read_jsonl(path) == [ANSWER]
    assert read_answers(path).texts.keys() == {7}
    for strict in (True, False):
        answers = load_answers(path, strict=strict)
        assert list(answers.answers) == [7] and not answers.problems


def test_a_submission_with_a_bom_checks_clean(tmp_path):
    cases = bom_file(tmp_path / "cases.jsonl", line(CASE))
    submission = bom_file(tmp_path / "submission.jsonl", line({"id": 7, "reason": "r", "diseases": "d"}))
    assert check_submission(cases, submission) == []


@pytest.mark.parametrize("name", ["recipe.yaml", "ds_config.json"])
def test_a_recipe_with_a_bom_reads_as_without(tmp_path, name):
    text = '{"lr": 0.1, "name": "x"}\n' if name.endswith(".json") else "lr: 0.1\nname: x\n"
    assert read_yaml(bom_file(tmp_path / name, text)) == {"lr": 0.1, "name": "x"}


def test_a_recipe_overlay_with_a_bom_composes(tmp_path):
    recipe = bom_file(tmp_path / "recipe.yaml", "a: 1\nb: {c: 2}\n")
    overlay = bom_file(tmp_path / "overlay.yaml", "b: {c: 3}\n")
    assert compose(recipe, [overlay]) == {"a": 1, "b": {"c": 3}}


def test_prompt_files_with_a_bom_are_the_same_prompts(tmp_path):
    """The mark is no part of the prompt: not in the text sent, not in the prompt hash every cache key holds."""
    folder = REPO_ROOT / "data" / "prompts"
    plain = load_prompts(folder / "system.txt", folder / "user.txt")
    system = bom_file(tmp_path / "system.txt", (folder / "system.txt").read_text(encoding="utf-8"))
    user = bom_file(tmp_path / "user.txt", (folder / "user.txt").read_text(encoding="utf-8"))
    marked = load_prompts(system, user)
    assert marked == plain and marked.hash == plain.hash and BOM not in marked.system + marked.user_template
    repair = bom_file(tmp_path / "repair.txt", (folder / "repair.txt").read_text(encoding="utf-8"))
    assert load_repair_prompt(repair) == load_repair_prompt(folder / "repair.txt")


def test_a_key_file_and_a_lexicon_with_a_bom_read_as_without(tmp_path):
    """The mark is no part of an API key (it would be sent in the header) nor of the lexicon's first term."""
    from custom_losses.kd.token_weights import load_lexicon
    from prep.api.settings import ClientSettings, resolve_api_key

    key = bom_file(tmp_path / "key.txt", "sk-test-123\n")
    assert resolve_api_key(ClientSettings(base_url="http://127.0.0.1:9/v1", model="m", api_key_file=str(key))) \
        == "sk-test-123"
    lexicon = bom_file(tmp_path / "terms.txt", "发热\n咽痛\n")
    assert set(load_lexicon(str(lexicon))) == {"发热", "咽痛"}


# ---- a command that fails on its configuration leaves no --out behind ---------------------------------------------

RECIPES = {"teacher": REPO_ROOT / "recipes" / "teacher" / "local-tiny-vllm.yaml",
           "softlabels": REPO_ROOT / "recipes" / "softlabels" / "local-tiny-vllm.yaml",
           "predict": REPO_ROOT / "recipes" / "predict" / "tiny-cpu.yaml"}
NO_KEY = "MEDKD_TEST_UNSET_KEY_VARIABLE"
# A hosted endpoint that needs a key from an unset variable: the run would fail at its first request.
HOSTED = ["--set", "server=null", "--set", "client.base_url=http://127.0.0.1:9/v1", "--set", "client.model=m",
          "--set", f"client.api_key_env={NO_KEY}"]
MISTAKES = {
    "bad recipe key": (lambda tmp: ["--set", "sampling.temprature=0.5"], "key 'sampling.temprature': unknown key"),
    "missing key variable": (lambda tmp: HOSTED, f"environment variable {NO_KEY} is not set"),
    "missing input": (lambda tmp: ["--input", str(tmp / "no-such-cases.jsonl")], "no-such-cases.jsonl: file not found"),
    "no endpoint": (lambda tmp: ["--set", "server=null", "--set", "client.base_url=null"], "client.base_url is not set"),
    "missing serve recipe": (lambda tmp: ["--set", f"server={tmp / 'no-such-serve.yaml'}"], "no-such-serve.yaml"),
}


def command(name: str):
    from launch import predict, softlabels, teacher

    return {"teacher": teacher, "softlabels": softlabels, "predict": predict}[name].main


@pytest.mark.parametrize("mistake", list(MISTAKES))
@pytest.mark.parametrize("name", list(RECIPES))
def test_a_stage_that_fails_on_its_configuration_makes_no_out(name, mistake, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(NO_KEY, raising=False)
    extra, expected = MISTAKES[mistake]
    out = tmp_path / "new" / "out"
    argv = ["--config", str(RECIPES[name]), "--input", str(SAMPLE_CASES), "--out", str(out), "--no-progress",
            *extra(tmp_path)]
    assert command(name)(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists() and not out.parent.exists()


def test_a_stage_failing_on_its_configuration_leaves_an_existing_out_as_it_was(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept", encoding="utf-8")
    argv = ["--config", str(RECIPES["teacher"]), "--input", str(SAMPLE_CASES), "--out", str(out),
            "--set", "sampling.temprature=0.5"]
    assert command("teacher")(argv) == 2
    assert sorted(os.listdir(out)) == ["mine.txt"] and (out / "mine.txt").read_text(encoding="utf-8") == "kept"


def test_a_predict_on_a_missing_model_makes_no_out(tmp_path, capsys):
    out = tmp_path / "predict"
    argv = ["--config", str(RECIPES["predict"]), "--input", str(SAMPLE_CASES), "--out", str(out),
            "--model", str(tmp_path / "no-such-model")]
    assert command("predict")(argv) == 2
    assert "--model is neither a folder nor a hub id" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("missing", ["teacher", "student"])
def test_an_onpolicy_mix_on_a_missing_input_makes_no_out(missing, tmp_path, capsys):
    from launch.onpolicy import main

    teacher, student = tmp_path / "teacher", tmp_path / "predictions.jsonl"
    if missing == "teacher":
        student.write_text(line({"id": 7, "reason": "r", "diseases": "d"}), encoding="utf-8")
    else:
        (teacher / "sft").mkdir(parents=True)
        for split in ("train", "valid"):
            (teacher / "sft" / f"{split}.jsonl").write_text("", encoding="utf-8")
    out = tmp_path / "round-1" / "answers.jsonl"
    argv = ["--teacher", str(teacher), "--student", str(student), "--mix", "0.5", "--seed", "1", "--round", "1",
            "--out", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ") and not out.parent.exists()
