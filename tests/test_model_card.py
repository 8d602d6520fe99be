"""The final model's card (custom_losses.pipeline.model_card) against a run folder made by the real writers: the
real plan of the tiny pipeline recipe, its stamps (steps.write_stamp), the model folders' run records
(prep.digests.write_record), the teacher summaries and the score table (prep.eval.score), no step run."""
import json
from pathlib import Path

import pytest

from custom_losses.pipeline.model_card import CARD_NAME, WRITTEN, final_model, masked, safe, write_model_card
from custom_losses.pipeline.plan import layout_of, plan_pipeline, validate_recipe
from custom_losses.pipeline.steps import write_stamp
from prep.digests import write_record
from prep.eval.score import ScoreSettings, load_answers, report_markdown, score_run
from prep.jsonio import write_jsonl_atomic, write_text_atomic
from prep.records import read_cases
from tests.conftest import REPO_ROOT, SAMPLE_CASES

PIPELINE = REPO_ROOT / "recipes" / "pipeline" / "tiny-cpu.yaml"
KEY = "sk-card-secret-5b1e0c"


def model_folder(folder: Path, identity: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}\n", encoding="utf-8")
    if identity is not None:
        write_record(folder, identity, done=True)
    return folder


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A finished tiny run's records: every step stamped done, the models' lineage, summaries, scores."""
    monkeypatch.setenv("MEDKD_CARD_TEST_KEY", KEY)
    recipe = validate_recipe(PIPELINE, overrides=[f"out={tmp_path / 'run'}",
                                                  'stage1.teacher_set=["split.valid_fraction=0.34", '
                                                  '"client.api_key_env=MEDKD_CARD_TEST_KEY"]'])
    decisions = plan_pipeline(recipe)
    where = layout_of(recipe)
    for decision in decisions:
        write_stamp(where.out / "stamps", decision, 12.5)
    base = model_folder(tmp_path / "base-model", None)
    stage1 = model_folder(where.stage1 / "merged", {"kind": "lora-merged", "source": str(where.stage1 / "sft"),
                                                     "trained weights": "aaaa1111", "base_model": str(base),
                                                     "dtype": "bfloat16"})
    stage2 = model_folder(where.stage2 / "distill" / "merged", {
        "kind": "lora-merged", "source": str(where.stage2 / "distill" / "adapter"), "trained weights": "bbbb2222",
        "base_model": str(stage1), "dtype": "float32"})
    write_record(where.stage2 / "distill", {"recipe": {"lr": 1e-4, "beta": 0.5}, "soft-label data": "cccc3333",
                                            "starting model": "model dddd4444"}, done=True)
    final = model_folder(where.round(1) / "distill" / "merged", {
        "kind": "lora-merged", "source": str(where.round(1) / "distill" / "adapter"), "trained weights": "eeee5555",
        "base_model": str(stage2), "dtype": "float32"})
    for folder, model in ((where.teacher, "tiny-qwen2.5"), (where.stage2 / "softlabels", "tiny-qwen2.5"),
                          (where.round(1) / "softlabels", "tiny-qwen2.5")):
        summary = {"model": model, "base_url": "http://127.0.0.1:8011/v1",
                   "model_identity": {"identity": f"{model}@0123abcd", "known_by": "content"},
                   "endpoints": {"127.0.0.1:8011": {"base_url": "http://127.0.0.1:8011/v1", "requests": 12}}}
        write_text_atomic(folder / "summary.json", json.dumps(summary))
    cases = read_cases(SAMPLE_CASES).cases
    answers = [{"id": case.id, "reason": "咽痛伴发热", "diseases": "急性扁桃体炎"} for case in cases]
    write_jsonl_atomic(where.teacher / "sft" / "train.jsonl", answers[:8])
    write_jsonl_atomic(where.valid_reference, answers[8:])
    reference = load_answers(where.valid_reference, strict=True)
    scored = [score_run(name, reference, reference, ScoreSettings()) for name in ("base", "stage1", "stage2", "round1")]
    write_text_atomic(where.out / "scores" / "scores.md", report_markdown(scored, reference, ScoreSettings()))
    return recipe, decisions, final


def test_the_card_says_where_the_final_model_came_from(run):
    recipe, decisions, final = run
    path = write_model_card(recipe, decisions)
    assert path == final / CARD_NAME and final_model(decisions)[1] == final
    card = path.read_text(encoding="utf-8")
    by_name = {decision.step.name: decision for decision in decisions}
    assert "(step `predict-round1`)" in card and "Base model (the untuned student): `medkd/tiny-qwen2.5`" in card
    # the lineage, down to the base model, from each folder's run record
    assert all(digest in card for digest in ("eeee5555", "bbbb2222", "aaaa1111", "cccc3333"))
    assert "no run record (the base model)" in card and "`distill-1`; the steps it comes from" in card
    # the teachers: model, identity, endpoint base URL, where the server came from
    assert card.count("model `tiny-qwen2.5`, identity `tiny-qwen2.5@0123abcd`") == 3
    assert "`http://127.0.0.1:8011/v1`" in card and "recipes/serve/tiny-cpu.yaml" in card
    # recipes per step with overlays and --set, and every step's key as stamped
    assert "`recipes/teacher/local-tiny-vllm.yaml`" in card and "`recipes/sft/overrides/cpu-tiny.yaml`" in card
    assert "`split.valid_fraction=0.34`" in card and "client.api_key_env=MEDKD_CARD_TEST_KEY" in card
    assert all(f"`{decision.key}`" in card for decision in decisions)
    assert f"- Final model: `{by_name['distill-1'].key}`" in card
    assert f"- Submission: `{by_name['submission'].key}`" in card
    # data: the case files with their record counts and digests; the teacher's rows
    assert f"| `{SAMPLE_CASES}` | train_cases | 12 | `" in card and "| teacher answers, training rows | 8 |" in card
    assert "`data/prompts/system.txt`: `" in card
    # scores and the date; never the key
    assert "| round1 | 4 | 0 |" in card and card.count(WRITTEN) == 1
    assert KEY not in card
    assert "```json" in card and '"api_key_env": "MEDKD_CARD_TEST_KEY"' in card


def test_the_card_is_rewritten_only_when_its_content_changes(run):
    recipe, decisions, final = run
    path = write_model_card(recipe, decisions)
    path.write_text(path.read_text(encoding="utf-8").replace(WRITTEN, WRITTEN + "then "), encoding="utf-8")
    write_model_card(recipe, decisions)
    assert WRITTEN + "then " in path.read_text(encoding="utf-8")      # only the date differs: left as it was
    write_record(final, {"kind": "lora-merged", "source": "elsewhere", "trained weights": "ffff6666",
                         "base_model": "x", "dtype": "float32"}, done=True)     # the final model was retrained
    write_model_card(recipe, decisions)
    card = path.read_text(encoding="utf-8")
    assert "ffff6666" in card and "eeee5555" not in card and WRITTEN + "then " not in card


def test_no_card_before_the_submission_is_up_to_date(run):
    recipe, decisions, final = run
    stamp = layout_of(recipe).out / "stamps" / "submission.json"
    stamp.unlink()
    assert write_model_card(recipe, decisions) is None and not (final / CARD_NAME).exists()
    assert write_model_card(recipe, [d for d in decisions if d.step.name != "submission"]) is None


def test_secrets_never_reach_the_card():
    assert safe(f"https://user:{KEY}@api.example.com/v1?api_key={KEY}") == "https://api.example.com/v1"
    assert safe(f"client.api_key={KEY}") == "client.api_key=***" and safe("client.api_key_env=X") == \
        "client.api_key_env=X"
    recipe = {"client": {"api_key": KEY, "api_key_env": "DEEPSEEK_API_KEY", "max_tokens": 5,
                         "endpoints": [{"base_url": f"http://u:{KEY}@h:1/v1"}]}, "hub_token": KEY}
    shown = json.dumps(masked(recipe))
    assert KEY not in shown and "DEEPSEEK_API_KEY" in shown and '"max_tokens": 5' in shown
