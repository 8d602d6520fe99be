"""Agreement that counts: the teacher's self-consistency as a filter (min_agreement), a majority vote on the
diseases (diseases_vote), and a per-case weight of the stage-two loss (case_weight), carried from stage one's
kept answers into the soft-label rows."""
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM

from custom_losses.kd.token_weights import TokenWeightConfig
from custom_losses.kd.trainer import KDConfig, KDDataCollator, WeightedKDTrainer, build_kd_features
from launch.softlabels import main as softlabels_main
from launch.teacher import main as teacher_main
from prep.answers import Answer, answer_json
from prep.prompts import load_prompts
from prep.records import read_cases
from prep.stages.fixed_answers import read_answers
from prep.stages.teacher import TeacherRecipe, select_by_agreement, vote_diseases
from prep.testing.fault_server import FaultServer
from tests.conftest import REPO_ROOT, SAMPLE_CASES
from tests.test_kd_trainer import TOP_K, dense_reference_loss, softlabel_rows

TONSILLITIS, PNEUMONIA, GASTRO = "急性扁桃体炎", "社区获得性肺炎", "急性胃肠炎"


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- the vote and the filter on hand-made samples ------------------------------------------------------------

def test_the_vote_keeps_what_most_valid_samples_name_with_the_reason_of_the_closest_sample():
    a = Answer("r0", f"1. {TONSILLITIS}；2. {PNEUMONIA}")
    b = Answer("r1", f"1. {PNEUMONIA}（细菌性）；2. {GASTRO}")
    c = Answer("r2", f"{PNEUMONIA}；偏头痛")
    # Pneumonia is named three times (once with a parenthetical); the rest once: a majority of one.
    # r2 ({pneumonia, migraine}) and r0 agree 1/2 with it, r1 too: ties go to the first, r0, whose spelling wins.
    assert vote_diseases([a, b, c]) == (0, Answer("r0", PNEUMONIA))
    # Two of three name tonsillitis and pneumonia: both kept, in the reason sample's order, then sample order.
    d = Answer("r3", f"{GASTRO}；{PNEUMONIA}（细菌性）；{TONSILLITIS}")
    assert vote_diseases([b, d, a]) == (1, Answer("r3", f"1. {GASTRO}；2. {PNEUMONIA}（细菌性）；3. {TONSILLITIS}"))
    # A rejected sample does not vote: two valid samples, so a majority is both of them.
    assert vote_diseases([None, b, c]) == (1, Answer("r1", f"{PNEUMONIA}（细菌性）"))
    # No name reaches a majority, or nothing is valid: no vote (derive_outputs keeps the best sample instead).
    assert vote_diseases([Answer("x", TONSILLITIS), Answer("y", PNEUMONIA), Answer("z", GASTRO)]) == (None, None)
    assert vote_diseases([None, None]) == (None, None)
    assert vote_diseases([a]) == (0, a)


def test_recipe_keys_are_validated_and_default_to_todays_behaviour():
    recipe = TeacherRecipe()
    assert (recipe.min_agreement, recipe.diseases_vote) == (0.0, "best")
    with pytest.raises(ValueError, match=r"key 'min_agreement': must be in \[0, 1\]"):
        TeacherRecipe(min_agreement=1.5)
    with pytest.raises(ValueError, match="key 'diseases_vote': must be one of best, majority"):
        TeacherRecipe(diseases_vote="mode")
    with pytest.raises(ValueError, match="key 'case_weight': must be one of none, agreement"):
        TokenWeightConfig(case_weight="confidence")


# ---- a teacher run whose samples disagree ------------------------------------------------------------------------

CASES = read_cases(SAMPLE_CASES).cases[:2]
# Case 0: each pair of samples shares one name (agreement 1/3); the vote names all three. Case 1: nothing shared.
CANNED = {CASES[0].id: [f"{TONSILLITIS}；{PNEUMONIA}", f"{TONSILLITIS}；{GASTRO}（感染性）", f"{PNEUMONIA}；{GASTRO}"],
          CASES[1].id: ["偏头痛", "高血压病", "2型糖尿病"]}


def canned_answer(body: dict) -> str:
    """Sample `seed` of the case in the user turn (the tiny recipe's seeds are 0, 1, 2)."""
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    case = next(case for case in CASES if case.feature_content in user)
    return answer_json(Answer(f"样本{body['seed']}", CANNED[case.id][body["seed"]]))


def test_min_agreement_rejects_and_the_vote_rewrites_a_teacher_run_without_asking_again(tmp_path):
    out = tmp_path / "teacher"
    with FaultServer(answer_fn=canned_answer) as server:
        def run(*extra: str) -> dict:
            args = ["--config", str(REPO_ROOT / "recipes" / "teacher" / "local-tiny-vllm.yaml"),
                    "--input", str(SAMPLE_CASES), "--out", str(out), "--no-progress", "--limit", "2",
                    "--set", "server=null", "--set", f"client.base_url={server.base_url}",
                    "--set", f"client.model={server.model}", "--set", "sampling.samples_per_case=3", *extra]
            assert teacher_main(args) == 0
            sft = rows(out / "sft" / "train.jsonl") + rows(out / "sft" / "valid.jsonl")
            return {"summary": json.loads((out / "summary.json").read_text(encoding="utf-8")),
                    "sft": {row["id"]: row for row in sft}, "rejects": rows(out / "rejects.jsonl")}

        today = run()
        assert server.received == 6
        assert {i: row["agreement"] for i, row in today["sft"].items()} == {CASES[0].id: 0.3333, CASES[1].id: 0.0}
        assert today["rejects"] == [] and today["summary"]["rejected_reasons"] == {}
        assert json.loads(today["sft"][CASES[0].id]["messages"][2]["content"]) == {
            "reason": "样本0", "diseases": f"{TONSILLITIS}；{PNEUMONIA}"}   # all tie: the first sample

        filtered = run("--set", "min_agreement=0.2", "--set", "diseases_vote=majority")
        assert server.received == 6                       # neither key is part of a cache key: nothing asked
        assert list(filtered["sft"]) == [CASES[0].id]
        assert json.loads(filtered["sft"][CASES[0].id]["messages"][2]["content"]) == {
            "reason": "样本0", "diseases": f"1. {TONSILLITIS}；2. {PNEUMONIA}；3. {GASTRO}（感染性）"}
        (reject,) = filtered["rejects"]
        assert (reject["id"], reject["sample"], reject["kind"], reject["agreement"]) == (CASES[1].id, None,
                                                                                          "low_agreement", 0.0)
        assert "below min_agreement 0.2" in reject["reason"] and len(reject["raw"]) == 3
        stats = filtered["summary"]
        assert stats["rejected_reasons"] == {"low_agreement": 1} and stats["rejected"] == 1
        assert (stats["answered"], stats["train"] + stats["valid"], stats["voted_cases"]) == (1, 1, 1)

        # No majority in case 1: it keeps its best-agreeing sample, as `best` does, and is counted.
        fallback = run("--set", "diseases_vote=majority")
        assert fallback["sft"][CASES[1].id] == today["sft"][CASES[1].id]
        assert (fallback["summary"]["voted_cases"], fallback["summary"]["no_majority_cases"]) == (1, 1)
        assert server.received == 6


def test_select_by_agreement_is_what_min_agreement_compares():
    samples = [Answer(f"r{i}", diseases) for i, diseases in enumerate(CANNED[CASES[0].id])]
    assert select_by_agreement(samples) == (0, 0.3333)


# ---- stage two: the agreement travels with the kept answer ---------------------------------------------------

class ScoringTeacher(FaultServer):
    """Answers /v1/completions as vLLM does with prompt_logprobs: every prompt token's entry at -0.5, plus id 15."""

    def _chat_body(self, request, content, *rest):
        if "prompt" not in request:
            return super()._chat_body(request, content, *rest)
        entries = [None] + [{str(token): {"logprob": -0.5, "rank": 1}, "15": {"logprob": -3.0, "rank": 2}}
                            for token in request["prompt"][1:]]
        return {"id": "cmpl-1", "object": "text_completion", "model": request["model"],
                "choices": [{"index": 0, "text": "0", "finish_reason": "length", "prompt_logprobs": entries}],
                "usage": {"prompt_tokens": len(request["prompt"]), "completion_tokens": 1}}


def test_kept_answers_carry_their_agreement_into_the_soft_label_rows(tmp_path):
    prompts = load_prompts()
    answers = [Answer("1. 咽痛发热。", TONSILLITIS), Answer("1. 咳嗽。", PNEUMONIA)]
    teacher = tmp_path / "teacher"
    (teacher / "sft").mkdir(parents=True)
    for name, case, answer, agreement in (("train.jsonl", CASES[0], answers[0], 0.75),
                                          ("valid.jsonl", CASES[1], answers[1], 0.3333)):
        row = {"id": case.id, "messages": prompts.messages(case, answer), "agreement": agreement}
        (teacher / "sft" / name).write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_answers(teacher).agreement == {CASES[0].id: 0.75, CASES[1].id: 0.3333}

    out = tmp_path / "scored"
    with ScoringTeacher(model="tiny-qwen2.5") as server:
        assert softlabels_main([
            "--config", str(REPO_ROOT / "recipes" / "softlabels" / "local-tiny-vllm.yaml"), "--input",
            str(SAMPLE_CASES), "--out", str(out), "--no-progress", "--limit", "3", "--answers", str(teacher),
            "--set", "server=null", "--set", f"client.base_url={server.base_url}",
            "--set", "softlabels.axolotl_export=false", "--set", "softlabels.top_k=2"]) == 0   # 2: what it gives
    dataset = load_from_disk(str(out / "dataset"))
    scored = {row["id"]: row for split in dataset.values() for row in split}
    assert {i: row["agreement"] for i, row in scored.items()} == {CASES[0].id: 0.75, CASES[1].id: 0.3333}
    assert scored[CASES[0].id]["messages"][-1]["content"] == answer_json(answers[0])
    stats = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert (stats["answers"], stats["answers_from"], stats["without_answer"]) == ("kept", str(teacher), 1)
    # The case stage one held out stays held out, whatever the soft-label recipe's own split would pick.
    assert (dataset["train"]["id"], dataset["validation"]["id"], stats["valid_split"]) == (
        [CASES[0].id], [CASES[1].id], "answers")


def test_an_answers_file_without_agreement_counts_fully_and_a_bad_one_is_refused(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": 7, "reason": "1. 发热。", "diseases": "感冒"}\n', encoding="utf-8")
    assert read_answers(path).agreement == {7: 1.0}
    path.write_text('{"id": 7, "reason": "1. 发热。", "diseases": "感冒", "agreement": 1.5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"answers.jsonl:1: .*agreement.*must be a number in \[0, 1\], got 1.5"):
        read_answers(path)


# ---- the weighted loss ---------------------------------------------------------------------------------------------

def _trainer(model_dir, tokenizer, features, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    config = KDConfig(output_dir=str(tmp_path), bf16=False, report_to=[], save_strategy="no", use_cpu=True,
                      kd_alpha=0.7, kd_temperature=2.0, w_diseases=3.0, case_weight="agreement")
    return WeightedKDTrainer(model=model, args=config, train_dataset=Dataset.from_list(features),
                             data_collator=KDDataCollator(tokenizer.pad_token_id, TOP_K), processing_class=tokenizer)


def _loss(trainer, batch):
    normaliser = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch, num_items_in_batch=normaliser)


@pytest.mark.integration
def test_case_weight_scales_each_cases_tokens_as_a_brute_force_reference_does(tiny_model_dir, qwen_tokenizer,
                                                                               tmp_path):
    agreements = [1.0, 0.5, 0.25]
    softlabels = [{**row, "agreement": agreement}
                  for row, agreement in zip(softlabel_rows(qwen_tokenizer, 3), agreements)]
    plain = TokenWeightConfig(w_diseases=3.0)
    weighted = TokenWeightConfig(w_diseases=3.0, case_weight="agreement")
    features = [build_kd_features(row, qwen_tokenizer, weighted) for row in softlabels]
    trainer = _trainer(tiny_model_dir, qwen_tokenizer, features, tmp_path)
    assert trainer.args.weight_config() == weighted           # the recipe key reaches the feature builder
    loss = _loss(trainer, trainer.data_collator(features))

    # Brute force: the unweighted batch, each case's row of token weights times its agreement, dense logits.
    batch = trainer.data_collator([build_kd_features(row, qwen_tokenizer, plain) for row in softlabels])
    batch["kd_weights"] = batch["kd_weights"] * torch.tensor(agreements)[:, None]
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               use_cache=False).logits
    reference = dense_reference_loss(logits, batch, alpha=0.7, temperature=2.0)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    unweighted = dense_reference_loss(logits, trainer.data_collator(
        [build_kd_features(row, qwen_tokenizer, plain) for row in softlabels]), alpha=0.7, temperature=2.0)
    assert abs(loss.item() - unweighted.item()) > 1e-4     # the weights do change the loss

    # A weight of 1 everywhere is today's loss, bit for bit.
    ones = [{**row, "agreement": 1.0} for row in softlabels]
    today = [build_kd_features(row, qwen_tokenizer, plain) for row in softlabels]
    assert [build_kd_features(row, qwen_tokenizer, weighted) for row in ones] == today
    assert torch.equal(_loss(trainer, trainer.data_collator(today)),
                       _loss(trainer, trainer.data_collator([build_kd_features(row, qwen_tokenizer, weighted)
                                                             for row in ones])))


def test_case_weight_needs_the_agreement_column(qwen_tokenizer):
    row = softlabel_rows(qwen_tokenizer, 1)[0]                 # soft labels made before the column existed
    build_kd_features(row, qwen_tokenizer, TokenWeightConfig())
    with pytest.raises(ValueError, match="case_weight: agreement needs the soft-label rows' 'agreement' column"):
        build_kd_features(row, qwen_tokenizer, TokenWeightConfig(case_weight="agreement"))


def test_distill_with_case_weight_refuses_soft_labels_without_agreement_before_loading_anything(qwen_tokenizer,
                                                                                                 tmp_path):
    from datasets import DatasetDict

    from custom_losses.train.distill import build_trainer, parse_recipe
    from prep.jsonio import InputError

    folder = tmp_path / "softlabels"
    DatasetDict({"train": Dataset.from_list(softlabel_rows(qwen_tokenizer, 2))}).save_to_disk(str(folder / "dataset"))
    recipe, overlay = "recipes/distill/qwen2.5-7b-instruct-qlora-1gpu.yaml", "recipes/distill/overrides/cpu-tiny.yaml"
    args = parse_recipe(recipe, [overlay], [f"dataset_path={folder}", f"output_dir={tmp_path / 'out'}",
                                            "case_weight=agreement"])
    with pytest.raises(InputError, match=r"field 'agreement': split 'train' has no 'agreement' column, which "
                                         r"case_weight: agreement needs"):
        build_trainer(*args)
