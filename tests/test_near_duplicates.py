"""prep.near_duplicates and the leak-free splits built on it: exact and near-duplicate cases fall on one side of the
teacher's split, the soft-label split and the on-policy mix; the contamination report names copied test cases."""
import json
import random
import time
from pathlib import Path

import numpy as np

from custom_losses.pipeline.plan import build_plan
from custom_losses.pipeline.plan import validate_recipe as validate_pipeline
from launch.records import main as records_main
from prep.eval.score import ScoreSettings, read_contamination, score_files
from prep.near_duplicates import (
    NearDuplicates,
    bands_for,
    duplicate_groups,
    estimate_jaccard,
    jaccard,
    ngram_hashes,
    ngrams,
    signatures,
)
from prep.records import Case
from prep.stages.fixed_answers import read_answers
from prep.stages.onpolicy import mix_answers, takes_student_answer
from prep.stages.teacher import Split, case_groups, split_ids, validation_ids, write_sft_files

POOL = "发热咳嗽头痛腹泻胸闷气短乏力恶心呕吐血压心率体温脉搏呼吸肝脾肾肺胃肠骨关节皮疹红肿疼痛麻木无力" \
       "男女年岁月日周前后左右上下轻中重度急慢性反复持续间断加重缓解伴有无既往史个人过敏婚育查体辅助检查"
SETTINGS = NearDuplicates()


def text(rng: random.Random, length: int = 200) -> str:
    return "".join(rng.choice(POOL) for _ in range(length))


def edited(rng: random.Random, original: str, substitutions: int) -> str:
    """ORIGINAL with SUBSTITUTIONS characters replaced at spread-out places (each touches up to n n-grams)."""
    chars = list(original)
    for k in range(substitutions):
        position = (k + 1) * len(chars) // (substitutions + 1)
        chars[position] = next(c for c in iter(lambda: rng.choice(POOL), None) if c != chars[position])
    return "".join(chars)


def exact_jaccard(a: str, b: str) -> float:
    return jaccard(ngrams(a, SETTINGS.ngram), ngrams(b, SETTINGS.ngram))


def planted_cases(count: int = 120, planted: int = 20) -> tuple[list[Case], list[tuple[int, int]]]:
    """COUNT unrelated cases, then a near copy of each of the first PLANTED (ids 1000+) and an exact copy, padded
    with whitespace, of the first PLANTED // 2 (ids 2000+); the (original, copy) id pairs."""
    rng = random.Random(7)
    cases = [Case(i, text(rng)) for i in range(count)]
    pairs = []
    for i in range(planted):
        cases.append(Case(1000 + i, edited(rng, cases[i].feature_content, 2)))
        pairs.append((i, 1000 + i))
    for i in range(planted // 2):
        cases.append(Case(2000 + i, f"  {cases[i].feature_content}\n"))
        pairs.append((i, 2000 + i))
    return cases, pairs


def sides(valid: set[int], pairs: list[tuple[int, int]]) -> list[bool]:
    """For each pair, whether its two cases fall on the same side."""
    return [(a in valid) == (b in valid) for a, b in pairs]


def test_minhash_estimate_tracks_exact_jaccard_and_hashes_count_the_ngrams():
    rng = random.Random(3)
    base = text(rng, 400)
    for substitutions in (0, 3, 10, 30, 80):
        other = edited(rng, base, substitutions)
        sigs = signatures([ngram_hashes(base, 5), ngram_hashes(other, 5)])
        exact = exact_jaccard(base, other)
        # 128 permutations: the estimate's standard error is at most 0.045; 0.15 is over three of them.
        assert abs(estimate_jaccard(sigs[0], sigs[1]) - exact) < 0.15, (substitutions, exact)
    unrelated = signatures([ngram_hashes(base, 5), ngram_hashes(text(rng, 400), 5)])
    assert estimate_jaccard(*unrelated) < 0.05
    for sample in (base, "短", "", "  四个字 "):
        assert len(ngram_hashes(sample, 5)) == len(ngrams(sample, 5))
    assert signatures([np.empty(0, dtype=np.uint64)])[0].min() == np.iinfo(np.uint64).max


def test_bands_check_a_pair_at_the_threshold_almost_surely():
    for threshold in (0.5, 0.8, 0.9, 1.0):
        bands, rows = bands_for(threshold)
        assert bands * rows <= 128 and 1 - (1 - threshold ** rows) ** bands >= 0.999


def test_groups_hold_exact_and_near_copies_and_the_threshold_is_exact():
    rng = random.Random(11)
    base = text(rng)
    variants = [edited(rng, base, k) for k in range(1, 9)]     # Jaccard from ~0.95 down to ~0.67
    texts = [base, f"\t{base}  ", *variants, text(rng)]
    groups = duplicate_groups(texts, SETTINGS)
    assert len(groups) == 1
    expected = {0, 1} | {2 + k for k, variant in enumerate(variants) if exact_jaccard(base, variant) >= 0.8}
    # Below the threshold a variant stays out unless it reaches 0.8 with another member (a chain is one group).
    linked = {2 + k for k, variant in enumerate(variants)
              if any(exact_jaccard(variant, texts[j]) >= 0.8 for j in expected if j != 2 + k)}
    assert expected <= set(groups[0]) <= expected | linked and len(texts) - 1 not in groups[0]
    assert any(exact_jaccard(base, variant) < 0.8 for variant in variants)   # the sweep crosses the threshold
    assert duplicate_groups(texts, NearDuplicates(threshold=1.0)) == [[0, 1]]


def test_the_teacher_split_keeps_planted_copies_together_and_the_default_keeps_todays_split():
    cases, pairs = planted_cases()
    ids = [case.id for case in cases]
    today = validation_ids(ids, 0.3, 2025)
    assert split_ids(cases, ids, Split(0.3, 2025)) == today           # near_duplicates: null, the default
    assert not all(sides(today, pairs))                                  # the leak the key closes
    grouped = Split(0.3, 2025, NearDuplicates())
    valid = split_ids(cases, ids, grouped)
    assert all(sides(valid, pairs)) and 0 < len(valid) < len(ids)
    # Cases answered later (a rejected original) still follow the group drawn over every case.
    answered = [i for i in ids if i not in {0, 1, 2}]
    assert split_ids(cases, answered, grouped) == valid - {0, 1, 2}
    assert {case_groups(cases, grouped)[b] for _, b in pairs} == {a for a, _ in pairs}


def teacher_rows(cases: list[Case]) -> list[dict]:
    return [{"id": case.id, "messages": [{"role": "user", "content": case.feature_content},
                                         {"role": "assistant", "content": json.dumps({"reason": "r", "diseases": "d"})}],
             "agreement": 1.0} for case in cases]


def test_soft_labels_and_the_on_policy_mix_follow_the_teachers_groups(tmp_path):
    cases, pairs = planted_cases()
    split = Split(0.3, 2025, NearDuplicates())
    train, valid = write_sft_files(tmp_path / "teacher", teacher_rows(cases), [], split, case_groups(cases, split))
    valid_ids = {row["id"] for row in valid}
    assert all(sides(valid_ids, pairs)) and len(train) + len(valid) == len(cases)
    # Stage two on the kept answers holds out exactly the teacher's cases (prep.stages.softlabels takes
    # FixedAnswers.valid_ids as its validation split); on fresh samples it draws split_ids, tested above.
    assert read_answers(tmp_path / "teacher").valid_ids == valid_ids
    groups = json.loads((tmp_path / "teacher" / "sft" / "groups.json").read_text())
    assert groups["near_duplicates"] == {"ngram": 5, "threshold": 0.8}
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"id": case.id, "reason": "学生", "diseases": "肺炎"}, ensure_ascii=False)
                                   + "\n" for case in cases), encoding="utf-8")
    together = []
    for round_index in (1, 2, 3):
        mix_answers(tmp_path / "teacher", predictions, tmp_path / "mix.jsonl", 0.5, 7, round_index)
        source = {row["id"]: row["source"] for row in map(json.loads, (tmp_path / "mix.jsonl").open())}
        together += [source[a] == source[b] for a, b in pairs if a not in valid_ids]
    assert together and all(together)
    # A teacher folder without groups.json (written before the key) mixes case by case, as before.
    (tmp_path / "teacher" / "sft" / "groups.json").unlink()
    mix_answers(tmp_path / "teacher", predictions, tmp_path / "mix.jsonl", 0.5, 7, 1)
    own = {row["id"] for row in map(json.loads, (tmp_path / "mix.jsonl").open()) if row["source"] == "student"}
    assert own == {case.id for case in cases if case.id not in valid_ids and takes_student_answer(case.id, 0.5, 7, 1)}


def write_cases(path: Path, cases: list[Case]) -> Path:
    path.write_text("".join(json.dumps(case.to_json(), ensure_ascii=False) + "\n" for case in cases), encoding="utf-8")
    return path


def test_the_contamination_report_names_planted_copies_with_their_share(tmp_path, capsys):
    rng = random.Random(5)
    train = [Case(i, text(rng)) for i in range(40)]
    test = [Case(500, f" {train[3].feature_content} "), Case(501, edited(rng, train[7].feature_content, 2)),
            Case(502, edited(rng, train[9].feature_content, 12)), *(Case(600 + i, text(rng)) for i in range(7))]
    assert exact_jaccard(test[2].feature_content, train[9].feature_content) < 0.8    # too far: not a copy
    code = records_main(["--no-tokens", "--against", str(write_cases(tmp_path / "train.jsonl", train)),
                         str(write_cases(tmp_path / "test.jsonl", test))])
    out = capsys.readouterr().out
    assert code == 0
    *summary, last = out.rstrip("\n").split("\n")
    assert last == "exact_copies=1 near_copies=1 test_cases=10"
    report = json.loads("\n".join(summary))["contamination"]
    assert report["exact_share"] == 0.1 and report["near_share"] == 0.1 and report["contaminated_share"] == 0.2
    assert [(row["test_id"], row["train_id"], row["exact"]) for row in report["copies"]] == [(500, 3, True),
                                                                                          (501, 7, False)]
    assert 0.8 <= report["copies"][1]["jaccard"] < 1


def test_records_reports_the_groups_of_the_real_cases_in_seconds(real_cases_path, capsys):
    started = time.monotonic()
    assert records_main(["--no-tokens", str(real_cases_path)]) == 0
    seconds = time.monotonic() - started
    groups = json.loads(capsys.readouterr().out)["duplicate_groups"]
    # 31 texts repeat another case's exactly (the count); near copies join more cases into groups.
    assert groups["exact_duplicate_texts"] == 31 and groups["groups"] >= 31 - 10 and groups["largest"] >= 2
    assert len(groups["examples"]) == 5 and all(len(group) >= 2 for group in groups["examples"])
    print(f"real cases: {groups['groups']} groups, {groups['cases_in_groups']} cases, largest {groups['largest']}, "
          f"{seconds:.1f} s")
    assert seconds < 15


def test_the_pipeline_reports_test_cases_copying_training_cases_in_the_score_report(tmp_path):
    rng = random.Random(9)
    cases = [Case(i, text(rng)) for i in range(20)]
    train = write_cases(tmp_path / "train.jsonl", cases)
    test = write_cases(tmp_path / "test.jsonl", [Case(100, text(rng)), Case(101, cases[4].feature_content + "\n")])

    def score_step(test_cases: Path):
        recipe = validate_pipeline("recipes/pipeline/qwen2.5-7b-1gpu.yaml", overrides=[
            f"train_cases={train}", f"test_cases={test_cases}", f"out={tmp_path / 'run'}"])
        return next(step for step in build_plan(recipe) if step.name == "score")

    assert "--contamination" not in score_step(train).argv      # the demo's case: the test file is the training file
    step = score_step(test)
    report_path = Path(step.argv[step.argv.index("--contamination") + 1])
    assert report_path in step.outputs and {train, test} <= set(step.inputs)
    step.before()
    report = read_contamination(report_path)
    assert (report["exact_copies"], report["near_copies"], report["test_cases"]) == (1, 0, 2)
    reference = tmp_path / "reference.jsonl"
    reference.write_text(json.dumps({"id": 4, "reason": "发热", "diseases": "感冒"}, ensure_ascii=False) + "\n",
                         encoding="utf-8")
    score_files(str(reference), [str(reference)], ["stage1"], ScoreSettings(), tmp_path / "scores",
                contamination=report)
    scores = (tmp_path / "scores" / "scores.md").read_text(encoding="utf-8")
    assert "## Contamination" in scores and "1 (50.0%) are exact copies" in scores and "101 ~ 4 (exact)" in scores
    assert json.loads((tmp_path / "scores" / "scores.json").read_text())["contamination"]["exact_copies"] == 1
