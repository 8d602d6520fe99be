"""The local scorer's numbers on hand-made pairs, expected values worked out by hand below."""
import csv
import json

import pytest

from launch.score import main
from prep.eval.score import ScoreSettings, char_dice, fuzzy_matches, load_answers, rouge_l_f1, score_files
from prep.jsonio import InputError
from tests.conftest import SHARED_DATA

APPROX = dict(abs=1e-6)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_character_rouge_l_on_a_pair_worked_by_hand():
    # reference 高血压头痛 (5 chars), hypothesis 高血头晕 (4): LCS 高血头 = 3 -> P 3/4, R 3/5, F1 2/3.
    assert rouge_l_f1("高血头晕", "高血压头痛") == pytest.approx(2 / 3, **APPROX)
    assert rouge_l_f1("高 血\n头晕", "高血压头痛") == pytest.approx(2 / 3, **APPROX)  # whitespace is not a character
    assert rouge_l_f1("发热", "发热") == pytest.approx(1, **APPROX)
    assert rouge_l_f1("", "发热") == 0.0
    assert rouge_l_f1("咳嗽", "发热") == 0.0


def test_fuzzy_matching_is_one_to_one_and_uses_character_dice():
    assert char_dice("多囊卵巢综合征（PCOS）", "多囊卵巢综合征") == pytest.approx(2 * 7 / (13 + 7))
    assert char_dice("原发性高血压（1级）", "高血压") == pytest.approx(2 * 3 / (10 + 3))  # 0.46: below 0.5
    # 高血压病 is close to 高血压 (6/7) but 高血压 is taken by its exact twin first; 糖尿病 shares only 病 (2/7).
    assert fuzzy_matches(["高血压病", "高血压"], ["高血压", "糖尿病"], 0.5) == 1
    assert fuzzy_matches(["高血压病", "糖尿病"], ["高血压", "2型糖尿病"], 0.5) == 2
    assert fuzzy_matches(["高血压病"], ["高血压"], 0.9) == 0


@pytest.fixture
def reference(tmp_path):
    return write_jsonl(tmp_path / "ref.jsonl", [
        {"id": 1, "reason": "高血压头痛", "diseases": "1. 原发性高血压（2级）；2. 头痛"},
        {"id": 2, "reason": "发热咳嗽", "diseases": "社区获得性肺炎"},
        {"id": 3, "reason": "多饮多尿", "diseases": "2型糖尿病"},
        {"id": 4, "reason": "胸痛", "diseases": "冠心病|高脂血症"},
    ])


def test_scores_of_a_hand_made_run(tmp_path, reference):
    prediction = write_jsonl(tmp_path / "run.jsonl", [
        # exact: {原发性高血压（2级）, 头痛} vs {原发性高血压（2级）, 头痛, 眩晕} -> P 2/3 R 1 F1 0.8; ROUGE 2/3
        {"id": 1, "reason": "高血头晕", "diseases": "原发性高血压（2级）、头痛、眩晕", "raw_valid": True},
        # 肺炎 vs 社区获得性肺炎: exact 0; Dice 2*2/(2+7) = 0.44 -> fuzzy 0 at 0.5; ROUGE 1
        {"id": 2, "reason": "发热咳嗽", "diseases": "肺炎", "raw_valid": False},
        # id 3 missing -> zero everywhere
        {"id": 4, "reason": "胸痛", "diseases": "1.冠心病 2.高脂血症", "raw_valid": True},  # all 1
        {"id": 99, "reason": "x", "diseases": "y"},  # not in the reference: ignored, listed
    ])
    (run,) = score_files(reference, [str(prediction)], None, ScoreSettings(), tmp_path / "out")
    m = run.metrics
    assert m["diseases_exact_p"] == pytest.approx((2 / 3 + 0 + 0 + 1) / 4)
    assert m["diseases_exact_r"] == pytest.approx((1 + 0 + 0 + 1) / 4)
    assert m["diseases_exact_f1"] == pytest.approx((0.8 + 0 + 0 + 1) / 4)
    assert m["diseases_fuzzy_f1"] == pytest.approx((0.8 + 0 + 0 + 1) / 4)
    assert m["reason_rouge_l_f1"] == pytest.approx((2 / 3 + 1 + 0 + 1) / 4, **APPROX)
    assert m["format_valid"] == pytest.approx(2 / 4)  # id 2 needed repair, id 3 never came
    assert run.missing_ids == [3] and run.extra_ids == [99] and run.answered == 3
    assert run.reason_chars["mean"] == pytest.approx((4 + 4 + 2) / 3)
    assert run.reason_chars["ratio_to_ref"] == pytest.approx(((4 + 4 + 2) / 3) / ((5 + 4 + 4 + 2) / 4))

    # A looser fuzzy threshold lets 肺炎 match 社区获得性肺炎 (Dice 0.44).
    (loose,) = score_files(reference, [str(prediction)], None, ScoreSettings(fuzzy_threshold=0.4), None)
    assert loose.metrics["diseases_fuzzy_f1"] == pytest.approx((0.8 + 1 + 0 + 1) / 4)
    # Dropping parentheticals changes nothing here: both sides carry the same (2级).
    (bare,) = score_files(reference, [str(prediction)], None, ScoreSettings(keep_parentheticals=False), None)
    assert bare.metrics["diseases_exact_f1"] == pytest.approx(m["diseases_exact_f1"])


def test_official_examples_scored_against_each_other(tmp_path, official_examples):
    """submission_example.jsonl as the reference (its ids are placeholders, renumbered 1-3 in file order)
    against example_output_early.jsonl (ids 1-3, diseases joined by '|', reasons inside bingli_json)."""
    reference_rows = [{**row, "id": index} for index, row in enumerate(official_examples, start=1)]
    reference = write_jsonl(tmp_path / "ref.jsonl", reference_rows)
    early = SHARED_DATA / "example_output_early.jsonl"
    (run, itself) = score_files(reference, [str(early), str(reference)], ["early", "itself"], ScoreSettings(), None)
    # case 1: 发热 = 发热.  case 2: {高尿酸血症, 皮炎, 失眠, 原发性高血压（1级）} vs {皮炎, 失眠, 高尿酸血症}:
    # P 1, R 3/4, F1 6/7.  case 3: 多囊卵巢综合征（PCOS） vs 多囊卵巢综合征: exact 0, fuzzy (Dice 0.7) 1.
    assert run.metrics["diseases_exact_p"] == pytest.approx((1 + 1 + 0) / 3)
    assert run.metrics["diseases_exact_r"] == pytest.approx((1 + 3 / 4 + 0) / 3)
    assert run.metrics["diseases_exact_f1"] == pytest.approx((1 + 6 / 7 + 0) / 3)
    assert run.metrics["diseases_fuzzy_f1"] == pytest.approx((1 + 6 / 7 + 1) / 3)
    # The early reasons are the same texts with real newlines where the submission example has a literal
    # backslash-n (2 characters, not whitespace): hypothesis = reference minus those, so P = 1, R = 1 - 2k/len.
    expected = []
    for ref_row in reference_rows:
        ref_chars = len("".join(ref_row["reason"].split()))
        recall = (ref_chars - 2 * ref_row["reason"].count("\\n")) / ref_chars
        expected.append(2 * recall / (1 + recall))
    assert run.metrics["reason_rouge_l_f1"] == pytest.approx(sum(expected) / 3, **APPROX)
    assert expected[2] == 1.0 and expected[0] < 1.0
    assert run.metrics["format_valid"] == 1.0 and run.missing_ids == []
    # Without parentheticals, 多囊卵巢综合征（PCOS） is 多囊卵巢综合征 and case 3 matches exactly.
    (bare,) = score_files(reference, [str(early)], None, ScoreSettings(keep_parentheticals=False), None)
    assert bare.metrics["diseases_exact_f1"] == pytest.approx((1 + 6 / 7 + 1) / 3)
    assert all(itself.metrics[k] == pytest.approx(1, **APPROX) for k in itself.metrics)


def test_reference_in_the_sft_valid_layout(tmp_path, reference):
    answers = load_answers(reference, strict=True).answers
    sft = write_jsonl(tmp_path / "valid.jsonl", [
        {"id": case_id, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                     {"role": "assistant", "content": json.dumps(
                                         {"reason": a.reason, "diseases": a.diseases}, ensure_ascii=False)}]}
        for case_id, a in answers.items()])
    assert load_answers(sft, strict=True).answers == answers
    (run,) = score_files(sft, [str(reference)], None, ScoreSettings(), None)
    assert run.metrics["diseases_exact_f1"] == 1.0 and run.metrics["format_valid"] == 1.0


def test_bad_reference_rows_stop_and_bad_prediction_rows_score_zero(tmp_path, reference):
    bad_ref = write_jsonl(tmp_path / "bad_ref.jsonl", [{"id": 1, "reason": "r", "diseases": "d"}, {"id": 1, "reason": "r", "diseases": "d"}])
    with pytest.raises(InputError, match=r"bad_ref.jsonl:2: field 'id': duplicate id 1 \(first on line 1\)"):
        load_answers(bad_ref, strict=True)
    pred = tmp_path / "pred.jsonl"
    pred.write_text('{"id": 1, "reason": "高血压头痛", "diseases": ""}\n{"id": 2, "reason": "发热咳嗽", "diseases": "社区获得性肺炎"}\n'
                    '{"id": 3, "reason"\n', encoding="utf-8")
    (run,) = score_files(reference, [str(pred)], None, ScoreSettings(), None)
    assert run.missing_ids == [1, 3, 4]
    assert run.problems == [f"{pred}:1: id 1: 'diseases' is empty", f"{pred}:3: invalid JSON (Expecting ':' delimiter, column 19)"]
    assert run.metrics["diseases_exact_f1"] == pytest.approx(1 / 4)


def test_command_writes_table_csv_chart_and_lists_missing(tmp_path, reference, capsys):
    runs = tmp_path / "runs"
    (runs / "base").mkdir(parents=True)
    (runs / "stage1").mkdir()
    rows = load_answers(reference, strict=True).answers
    write_jsonl(runs / "base" / "submission.jsonl", [{"id": 1, "reason": "头痛", "diseases": "头痛"}])
    write_jsonl(runs / "stage1" / "submission.jsonl",
                [{"id": i, "reason": a.reason, "diseases": a.diseases} for i, a in rows.items()])
    out = tmp_path / "scores"
    assert main([str(reference), str(runs / "base" / "submission.jsonl"), str(runs / "stage1" / "submission.jsonl"),
                 "--out", str(out), "--set", "fuzzy_threshold=0.6"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("| run | cases | missing | diseases_exact_p")
    assert "base: 3 reference cases missing, scored zero: 2, 3, 4" in printed
    table = list(csv.DictReader((out / "scores.csv").open(encoding="utf-8")))
    assert [row["run"] for row in table] == ["base", "stage1"]  # labels from the folders of generic file names
    assert table[0]["missing"] == "3" and float(table[1]["diseases_exact_f1"]) == 1.0
    # base: case 1 names {头痛} vs {原发性高血压（2级）, 头痛}: P 1, R 1/2, F1 2/3; the rest zero.
    assert float(table[0]["diseases_exact_f1"]) == pytest.approx(2 / 3 / 4, abs=1e-4)
    markdown = (out / "scores.md").read_text(encoding="utf-8")
    assert "3 reference cases missing (scored zero): 2, 3, 4" in markdown and "Dice >= 0.6" in markdown
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "scores.json").read_text())["settings"] == {"keep_parentheticals": True, "fuzzy_threshold": 0.6}
    assert len((out / "per_case.jsonl").read_text().splitlines()) == 8

    assert main([str(reference), str(runs / "base" / "submission.jsonl"), "--out", str(out), "--set", "fuzzy_thresh=1"]) == 2
    assert "key 'fuzzy_thresh': unknown key (did you mean 'fuzzy_threshold'?)" in capsys.readouterr().err
    assert main([str(reference), str(runs / "base" / "submission.jsonl"), "--out", str(out), "--names", "a", "b"]) == 2
    assert "--names gives 2 names for 1 prediction files" in capsys.readouterr().err


def test_command_takes_its_settings_from_a_score_recipe(tmp_path, reference, capsys):
    prediction = write_jsonl(tmp_path / "run.jsonl", [{"id": 2, "reason": "发热咳嗽", "diseases": "肺炎"}])
    recipe = tmp_path / "loose.yaml"
    recipe.write_text("keep_parentheticals: false\nfuzzy_threshold: 0.4\n", encoding="utf-8")
    assert main([str(reference), str(prediction), "--out", str(tmp_path / "out"), "--config", str(recipe)]) == 0
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["settings"] == {"keep_parentheticals": False, "fuzzy_threshold": 0.4}
    # 肺炎 vs 社区获得性肺炎 (Dice 0.44) matches at 0.4: fuzzy F1 1 on case 2, zero on the three missing cases.
    assert float(scores["table"][0]["diseases_fuzzy_f1"]) == pytest.approx(1 / 4)
    recipe.write_text("fuzzy_threshold: 1.5\n", encoding="utf-8")
    assert main([str(reference), str(prediction), "--out", str(tmp_path / "out"), "--config", str(recipe)]) == 2
    assert "fuzzy_threshold must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_command_plots_training_curves_beside_the_scores(tmp_path, reference, capsys):
    """--curves NAME=PATH: a training folder (its last checkpoint's state, as Axolotl leaves it) or a trainer_state.json
    -> OUT/curves-NAME.png, linked from scores.md and printed; a missing one stops the command before anything is
    written."""
    from tests.test_curves import distill_history, save_state

    prediction = write_jsonl(tmp_path / "run.jsonl", [{"id": 2, "reason": "发热咳嗽", "diseases": "肺炎"}])
    save_state(tmp_path / "sft" / "checkpoint-16" / "trainer_state.json", [{"step": s, "loss": 1.0 / s} for s in (1, 2)])
    state = save_state(tmp_path / "distill" / "trainer_state.json", distill_history())
    out = tmp_path / "out"
    assert main([str(reference), str(prediction), "--out", str(out), "--curves", f"sft={tmp_path / 'sft'}",
                 f"distill={state}"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == [f"wrote {out / 'curves-sft.png'}", f"wrote {out / 'curves-distill.png'}"]
    for name in ("sft", "distill"):
        assert (out / f"curves-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name} training](curves-{name}.png)" in (out / "scores.md").read_text(encoding="utf-8")

    fresh = tmp_path / "fresh"
    assert main([str(reference), str(prediction), "--out", str(fresh), "--curves", f"x={tmp_path / 'nothing'}"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'nothing'}: not found: give a trainer_state.json or the "
                                       f"training output folder holding one\n")
    assert not fresh.exists()
