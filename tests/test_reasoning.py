"""Reasoning traces: the client keeps a reasoning model's trace, `reasoning: target` trains on it (first, before
reason and diseases), the token estimates count it, predict and the submission strip it. A real fault server
plays the reasoning teacher and the student that was trained on traces."""
import asyncio
import json
from pathlib import Path

import pytest

from custom_losses.train.sft_preflight import token_lengths
from launch import predict
from launch.teacher import main as teacher_main
from prep.answers import Answer, AnswerError, StructuredOutput, answer_json, parse_answer, structured_output_params
from prep.api.endpoint import SpendCapReached
from prep.api.pool import ChatClient
from prep.api.settings import ClientSettings
from prep.config import RecipeError, load_recipe
from prep.eval.submission import check_submission, validate_lines
from prep.records import read_cases
from prep.stages.teacher import TeacherRecipe
from prep.testing.fault_server import FaultServer, default_answer, default_reasoning
from tests.conftest import REPO_ROOT, SAMPLE_CASES
from tests.test_teacher import rows, summary, teacher_args

CASES = read_cases(SAMPLE_CASES).cases
MESSAGES = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "病例：咽痛伴发热2天。"}]
REASONING_OVERLAY = REPO_ROOT / "recipes" / "predict" / "overrides" / "reasoning.yaml"


def sft_rows(out: Path) -> list[dict]:
    return rows(out / "sft" / "train.jsonl") + rows(out / "sft" / "valid.jsonl")


# ---- the answer schema ------------------------------------------------------------------------------

def test_a_trace_is_written_first_parsed_back_and_left_out_of_the_submitted_answer():
    answer = Answer("1. 咽痛发热", "急性扁桃体炎", reasoning="先看主诉。")
    text = answer_json(answer)
    assert text == '{"reasoning":"先看主诉。","reason":"1. 咽痛发热","diseases":"急性扁桃体炎"}'
    assert parse_answer(text) == answer and parse_answer("```json\n" + text + "\n```") == answer
    assert answer.without_reasoning() == Answer("1. 咽痛发热", "急性扁桃体炎")
    assert answer_json(answer.without_reasoning()) == '{"reason":"1. 咽痛发热","diseases":"急性扁桃体炎"}'
    assert parse_answer('{"reason":"r","diseases":"d"}').reasoning is None
    with pytest.raises(AnswerError, match="'reasoning' must be a string, got list"):
        parse_answer('{"reasoning":["a"],"reason":"r","diseases":"d"}')


def test_the_constraint_opens_with_a_trace_only_when_asked_and_keeps_todays_params_by_default():
    import re

    plain = structured_output_params(StructuredOutput())
    assert "reasoning" not in json.dumps(plain)                     # today's regex, today's cache keys
    regex = structured_output_params(StructuredOutput(reasoning=True))["extra_body"]["structured_outputs"]["regex"]
    assert re.fullmatch(regex, answer_json(Answer("r", "d", reasoning="t")))
    assert not re.fullmatch(regex, answer_json(Answer("r", "d")))
    schema = structured_output_params(StructuredOutput(kind="json_schema", reasoning=True, max_reasoning_chars=9))
    schema = schema["response_format"]["json_schema"]["schema"]
    assert schema["required"] == ["reasoning", "reason", "diseases"] and schema["properties"]["reasoning"]["maxLength"] == 9
    with pytest.raises(ValueError, match="key 'structured_output.max_reasoning_chars': set only with reasoning: true"):
        StructuredOutput(max_reasoning_chars=10)


def test_recipe_keys_are_checked_by_name():
    recipe = REPO_ROOT / "recipes" / "teacher" / "local-tiny-vllm.yaml"
    assert load_recipe(TeacherRecipe, recipe).reasoning == "drop"
    with pytest.raises(RecipeError, match="key 'reasoning': must be one of drop, target"):
        load_recipe(TeacherRecipe, recipe, ["reasoning=keep"])
    with pytest.raises(RecipeError, match="key 'sampling.reasoning_tokens': must be 0 or more"):
        load_recipe(TeacherRecipe, recipe, ["sampling.reasoning_tokens=-1"])
    for name in ("deepseek-r1", "vllm-qwq-32b"):
        assert load_recipe(TeacherRecipe, REPO_ROOT / "recipes" / "teacher" / f"{name}.yaml").reasoning == "target"


# ---- the client -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_the_client_keeps_the_trace_under_either_name(field):
    async def ask(server: FaultServer):
        settings = ClientSettings(base_url=server.base_url, model=server.model, request_timeout_s=5)
        async with ChatClient(settings) as client:
            return await client.chat(MESSAGES, max_tokens=50)

    with FaultServer(reasoning_fn=default_reasoning, reasoning_field=field) as server:
        result = asyncio.run(ask(server))
        assert result.reasoning == default_reasoning(server.requests[0]) and result.text == default_answer(server.requests[0])
    with FaultServer() as server:
        assert asyncio.run(ask(server)).reasoning is None


def test_a_requests_estimate_counts_the_trace_against_the_token_cap():
    async def ask(server: FaultServer, reasoning_tokens: int):
        settings = ClientSettings(base_url=server.base_url, model=server.model, request_timeout_s=5, token_cap=500)
        async with ChatClient(settings) as client:
            return await client.chat(MESSAGES, max_tokens=100, reasoning_tokens=reasoning_tokens)

    with FaultServer(reasoning_fn=default_reasoning) as server:
        assert asyncio.run(ask(server, 0)).reasoning
        with pytest.raises(SpendCapReached):
            asyncio.run(ask(server, 1000))
        assert server.counts()["received"] == 1                      # the second was never sent
        assert "reasoning_tokens" not in server.requests[0]


# ---- the teacher ------------------------------------------------------------------------------------

def test_the_switch_puts_the_trace_first_in_training_rows_and_a_rerun_asks_nothing(tmp_path):
    out = tmp_path / "teacher"
    with FaultServer(reasoning_fn=default_reasoning) as server:
        args = teacher_args(out, server.base_url, server.model, "--limit", "4")
        assert teacher_main(args) == 0                                 # drop (the default): today's targets
        assert all(row["messages"][2]["content"].startswith('{"reason":"') for row in sft_rows(out))
        cached = {row["id"]: row for row in rows(out / "cache.jsonl")}
        assert len(cached) == 4 and all(row["reasoning"][0].startswith("嗯，先看主诉") for row in cached.values())

        assert teacher_main(args + ["--set", "reasoning=target"]) == 0
        assert server.counts()["received"] == 4                        # re-derived from the cache, nothing asked
        assert summary(out)["items_asked"] == 0
    for row in sft_rows(out):
        content = row["messages"][2]["content"]
        assert content.startswith('{"reasoning":"嗯，先看主诉')
        assert list(json.loads(content)) == ["reasoning", "reason", "diseases"]
        assert parse_answer(content).reasoning == cached[row["id"]]["reasoning"][0]
    from datasets import load_from_disk

    dataset = load_from_disk(str(out / "sft" / "dataset"))
    assert json.loads(dataset["train"][0]["messages"][2]["content"])["reasoning"]


def test_a_sample_without_a_trace_is_rejected_with_its_reason_when_the_switch_is_on(tmp_path):
    out = tmp_path / "teacher"
    with_trace = {"answer": answer_json(Answer("1. 咽痛发热", "急性扁桃体炎")), "reasoning": "咽痛发热，考虑扁桃体炎。"}
    with FaultServer() as server:
        server.push(with_trace)                                        # the first case's answer has a trace
        assert teacher_main(teacher_args(out, server.base_url, server.model, "--limit", "3", "--set", "reasoning=target",
                                         "--set", "client.concurrency=1")) == 0
    (kept,) = sft_rows(out)
    assert kept["id"] == CASES[0].id and json.loads(kept["messages"][2]["content"])["reasoning"] == with_trace["reasoning"]
    rejects = rows(out / "rejects.jsonl")
    assert sorted(row["id"] for row in rejects) == [CASES[1].id, CASES[2].id]
    assert all(row["kind"] == "no_reasoning" and row["reason"].startswith("no reasoning trace (") for row in rejects)
    assert summary(out)["answered"] == 1 and summary(out)["rejected_reasons"] == {"no reasoning trace": 2}


def test_the_run_estimate_counts_reasoning_tokens_against_the_spend_cap(tmp_path, capsys):
    with FaultServer() as server:
        args = teacher_args(tmp_path / "t", server.base_url, server.model, "--limit", "2",
                            "--set", "client.token_cap=4000")
        assert teacher_main(args + ["--set", "sampling.reasoning_tokens=3000"]) == 2
        assert "over its spend cap of 4000" in capsys.readouterr().err and server.counts()["received"] == 0
        assert teacher_main(args) == 0


def test_the_sft_length_check_counts_the_trace(qwen_tokenizer):
    trace = "先看主诉与现病史，再看体格检查。" * 20
    rows_ = [(1, {"messages": [{"role": "user", "content": "病例"},
                               {"role": "assistant", "content": answer_json(Answer("r", "d", reasoning=r))}]})
             for r in (None, trace)]
    plain, traced = token_lengths(rows_, qwen_tokenizer)
    assert traced - plain >= len(qwen_tokenizer(trace, add_special_tokens=False)["input_ids"])


# ---- predict and the submission ---------------------------------------------------------------------

def test_predict_with_the_reasoning_overlay_strips_the_trace_from_predictions_and_submission(tmp_path):
    def student(body: dict) -> str:        # a student trained on traces: the trace first, inside its JSON
        return answer_json(Answer(**json.loads(default_answer(body)), reasoning=default_reasoning(body)))

    out = tmp_path / "predict"
    with FaultServer(answer_fn=student) as server:
        args = ["--config", str(REPO_ROOT / "recipes" / "predict" / "tiny-cpu.yaml"), "--overlay", str(REASONING_OVERLAY),
                "--set", "server=null", "--set", f"client.base_url={server.base_url}",
                "--set", f"client.model={server.model}", "--no-progress", "--input", str(SAMPLE_CASES), "--limit", "3",
                "--out", str(out)]
        assert predict.main(args) == 0
        regex = server.requests[0]["structured_outputs"]["regex"]
        assert regex.startswith('\\{"reasoning":"')
    predictions = rows(out / "predictions.jsonl")
    assert len(predictions) == 3 and all("reasoning" not in row and row["raw_valid"] for row in predictions)
    lines = (out / "submission.jsonl").read_text(encoding="utf-8").splitlines()
    assert all(list(json.loads(line)) == ["id", "reason", "diseases"] for line in lines)
    cases = tmp_path / "three.jsonl"
    cases.write_text("".join(json.dumps({"id": c.id, "feature_content": c.feature_content}, ensure_ascii=False) + "\n"
                             for c in CASES[:3]), encoding="utf-8")
    assert check_submission(cases, out / "submission.jsonl") == []


def test_the_submission_check_refuses_a_trace_naming_file_and_line():
    good = json.dumps({"id": CASES[0].id, "reason": "r", "diseases": "d"}, ensure_ascii=False)
    bad = json.dumps({"id": CASES[1].id, "reason": "r", "diseases": "d", "reasoning": "t"}, ensure_ascii=False)
    (problem,) = validate_lines(CASES[:2], [(1, good), (2, bad)], "sub.jsonl")
    assert str(problem).startswith("sub.jsonl:2: field 'reasoning': a reasoning trace is a training target")


@pytest.mark.vllm
def test_vllm_decodes_the_reasoning_shape_and_predict_strips_it(vllm_server, tmp_path):
    """The regex that opens with a trace compiles on vLLM's structured outputs and the tiny model answers in it."""
    out = tmp_path / "predict"
    args = ["--config", str(REPO_ROOT / "recipes" / "predict" / "tiny-cpu.yaml"), "--overlay", str(REASONING_OVERLAY),
            "--set", "structured_output.max_reasoning_chars=20", "--set", "sampling.max_tokens=200",
            "--set", "server=null", "--set", f"client.base_url={vllm_server.base_url}",
            "--set", f"client.model={vllm_server.spec.served_model_name}", "--no-progress",
            "--input", str(SAMPLE_CASES), "--limit", "1", "--out", str(out)]
    assert predict.main(args) == 0
    raws = [row["raw"] for row in rows(out / "cache.jsonl")]
    assert len(raws) == 1 and all(list(json.loads(raw)) == ["reasoning", "reason", "diseases"] for raw in raws)
    assert all(row["raw_valid"] and "reasoning" not in row for row in rows(out / "predictions.jsonl"))
    lines = (out / "submission.jsonl").read_text(encoding="utf-8").splitlines()
    assert all(list(json.loads(line)) == ["id", "reason", "diseases"] for line in lines)
