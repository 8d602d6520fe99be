"""The teacher stage (launch.teacher over prep.stages.teacher) end to end: real vLLM-CPU teacher, a fault-injecting
server, kill-and-resume, clear errors, no leaked keys."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.teacher import main
from prep.answers import Answer, answer_json, parse_answer
from prep.config import load_recipe
from prep.prompts import load_prompts
from prep.records import read_cases
from prep.stages.teacher import TeacherRecipe, select_by_agreement, validate_recipe, validation_ids
from prep.testing.fault_server import FaultServer
from tests.conftest import REPO_ROOT, SAMPLE_CASES

RECIPE = REPO_ROOT / "recipes" / "teacher" / "local-tiny-vllm.yaml"
TEACHER_RECIPES = sorted((REPO_ROOT / "recipes" / "teacher").glob("*.yaml"))
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1",
                  "WANDB_MODE": "disabled", "TRL_EXPERIMENTAL_SILENCE": "1"}


def teacher_args(out, base_url, model, *extra, cases=SAMPLE_CASES):
    """CLI arguments for the tiny recipe pointed at an already running endpoint, with short timeouts."""
    return ["--config", str(RECIPE), "--input", str(cases), "--out", str(out), "--no-progress",
            "--set", "server=null", "--set", f"client.base_url={base_url}", "--set", f"client.model={model}",
            "--set", "client.request_timeout_s=1", "--set", "client.backoff_base_s=0.05",
            "--set", "client.backoff_max_s=0.2", *extra]


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def summary(out) -> dict:
    return json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))


def write_cases(path: Path, count: int, first_id: int = 0) -> Path:
    samples = read_cases(SAMPLE_CASES).cases
    lines = [json.dumps({"id": first_id + i, "feature_content": samples[i % len(samples)].feature_content}, ensure_ascii=False)
             for i in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_exactly_once(out, ids):
    """Every (case, sample) once in the cache file, every case once in the SFT files."""
    cache = rows(Path(out) / "cache.jsonl")
    assert len({row["key"] for row in cache}) == len(cache), "a duplicate line in the cache"
    assert sorted(row["id"] for row in cache) == sorted(ids)
    sft = rows(Path(out) / "sft" / "train.jsonl") + rows(Path(out) / "sft" / "valid.jsonl")
    assert sorted(row["id"] for row in sft) == sorted(ids)


# ---- recipes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", TEACHER_RECIPES, ids=[path.stem for path in TEACHER_RECIPES])
def test_every_teacher_recipe_validates(path):
    recipe = validate_recipe(path)
    endpoints = recipe.client.resolved()
    if isinstance(recipe.server, str):
        assert (REPO_ROOT / recipe.server).exists()
    elif isinstance(recipe.server, dict):   # an inline server (a teacher only it needs, e.g. a reasoning parser)
        assert recipe.server["model"] and recipe.client.base_url is None
    elif recipe.client.endpoints:       # several: hosted over https, self-hosted replicas on a private network
        assert all(e.base_url.startswith(("https://", "http://")) for e in endpoints)
    else:
        assert recipe.client.base_url.startswith(("https://", "http://127.0.0.1:", "http://localhost:"))   # http: this machine only
    for key_env in [recipe.client.api_key_env] + [e.api_key_env for e in endpoints]:
        assert key_env is None or (key_env.isupper() and not key_env.startswith("SK")), "name a variable, never a key"
    load_prompts(recipe.prompts.system, recipe.prompts.user)


def test_the_shipped_recipes_cover_local_self_hosted_and_hosted_teachers():
    names = {path.stem for path in TEACHER_RECIPES}
    assert {"local-tiny-vllm", "vllm-qwen2.5-72b-instruct", "dashscope-qwen2.5-72b-instruct", "deepseek-v3"} <= names
    tiny = load_recipe(TeacherRecipe, RECIPE)
    assert tiny.server == "recipes/serve/tiny-cpu.yaml" and tiny.structured_output.max_reason_chars
    big = load_recipe(TeacherRecipe, REPO_ROOT / "recipes" / "teacher" / "vllm-qwen2.5-72b-instruct.yaml")
    assert big.server == "recipes/serve/qwen2.5-72b-instruct-tp8.yaml"
    assert big.structured_output.max_reason_chars is None and big.structured_output.max_diseases_chars is None


# ---- the real teacher -------------------------------------------------------------------------------

@pytest.mark.vllm
def test_end_to_end_against_the_real_vllm_server(vllm_server, tmp_path, capsys):
    out = tmp_path / "teacher"
    args = teacher_args(out, vllm_server.base_url, vllm_server.spec.served_model_name, "--set", "client.request_timeout_s=60")
    assert main(args) == 0
    first = summary(out)
    assert first["cases"] == first["answered"] == 12 and first["rejected"] == first["failed"] == 0
    assert first["items_asked"] == 12 and first["requests"] >= 12 and first["tokens_in"] > 0 and first["tokens_out"] > 0
    assert first["train"] + first["valid"] == 12 and first["valid"] >= 1
    assert_exactly_once(out, [case.id for case in read_cases(SAMPLE_CASES).cases])

    prompts = load_prompts()
    cases = {case.id: case for case in read_cases(SAMPLE_CASES).cases}
    for row in rows(out / "sft" / "train.jsonl") + rows(out / "sft" / "valid.jsonl"):
        system, user, assistant = row["messages"]
        assert [system, user] == prompts.messages(cases[row["id"]])
        assert assistant["role"] == "assistant" and assistant["content"].startswith('{"reason":"')
        assert assistant["content"] == answer_json(parse_answer(assistant["content"]))   # canonical, reason first
        assert row["agreement"] == 1.0

    from datasets import load_from_disk

    dataset = load_from_disk(str(out / "sft" / "dataset"))
    assert dataset["train"].num_rows == first["train"] and dataset["validation"].num_rows == first["valid"]
    assert dataset["train"][0]["messages"] == rows(out / "sft" / "train.jsonl")[0]["messages"]

    before = {name: (out / "sft" / name).read_bytes() for name in ("train.jsonl", "valid.jsonl")}
    assert main(args) == 0                                      # a finished step: nothing asked, outputs re-derived
    again = summary(out)
    assert again["items_asked"] == 0 and again["requests"] == 0 and again["answered"] == 12
    assert before == {name: (out / "sft" / name).read_bytes() for name in before}


@pytest.mark.vllm
def test_invalid_answers_are_repaired_once_or_rejected_with_reason_and_raw_text(vllm_server, tmp_path):
    model = vllm_server.spec.served_model_name
    with FaultServer(model=model, upstream=vllm_server.base_url) as proxy:
        # Case 1: invalid, then the repair request goes through to vLLM. Case 2: invalid twice. Case 3: vLLM.
        proxy.push({"answer": "诊断：咽炎"}, "ok", {"answer": "not json at all"}, {"answer": '{"reason": "1. 发热"}'})
        out = tmp_path / "teacher"
        assert main(teacher_args(out, proxy.base_url, model, "--limit", "3", "--set", "client.concurrency=1",
                                 "--set", "client.request_timeout_s=60")) == 0
        requests = list(proxy.requests)
    result = summary(out)
    assert result["answered"] == 2 and result["rejected"] == 1 and result["repaired_samples"] == 1
    assert len(requests) == 5                                   # 2 + 2 + 1: one repair turn per invalid answer, no more
    repair = requests[1]["messages"]
    assert repair[:2] == requests[0]["messages"]
    assert repair[2] == {"role": "assistant", "content": "诊断：咽炎"}
    assert repair[3]["role"] == "user" and "the output is not valid JSON" in repair[3]["content"]
    assert requests[1]["structured_outputs"] == requests[0]["structured_outputs"]   # the constraint stays on

    case_ids = [case.id for case in read_cases(SAMPLE_CASES).cases[:3]]
    (reject,) = rows(out / "rejects.jsonl")
    assert reject["id"] == case_ids[1] and reject["kind"] == "rejected"
    assert reject["reason"] == "the JSON object has no 'diseases' key (keys: reason)"
    assert reject["raw"] == ["not json at all", '{"reason": "1. 发热"}']
    kept = {row["id"] for row in rows(out / "sft" / "train.jsonl") + rows(out / "sft" / "valid.jsonl")}
    assert kept == {case_ids[0], case_ids[2]}
    cache = {row["id"]: row for row in rows(out / "cache.jsonl")}
    assert cache[case_ids[0]]["repaired"] and cache[case_ids[1]]["status"] == "rejected"


@pytest.mark.vllm
@pytest.mark.slow
def test_the_cli_starts_and_stops_the_server_its_recipe_names(tmp_path, capsys):
    out = tmp_path / "teacher"
    assert main(["--config", str(RECIPE), "--input", str(SAMPLE_CASES), "--out", str(out), "--limit", "2", "--no-progress"]) == 0
    result = summary(out)
    assert result["answered"] + result["rejected"] == 2 and result["model"] == "tiny-qwen2.5"
    assert "Application startup complete" in (out / "server.log").read_text(errors="replace")
    host, port = result["base_url"].removeprefix("http://").removesuffix("/v1").split(":")
    with pytest.raises(OSError):                                 # stopped: nothing listens there any more
        socket.create_connection((host, int(port)), timeout=2).close()


# ---- faults, one per run ----------------------------------------------------------------------------

FAULTS = [("429", "429"), ("429 retry-after=1", "429"), ("500", "500"), ("503", "503"), ("slow 3", "timeout"),
          ("reset", "connection"), ("truncated", "connection"), ("malformed", "malformed")]


@pytest.mark.parametrize("fault,reason", FAULTS, ids=[fault for fault, _ in FAULTS])
def test_a_fault_costs_one_counted_retry_and_no_case_is_lost_or_doubled(fault_server, tmp_path, fault, reason):
    fault_server.push(fault)
    out = tmp_path / "teacher"
    assert main(teacher_args(out, fault_server.base_url, fault_server.model, "--limit", "4",
                             "--set", "client.concurrency=2")) == 0
    result = summary(out)
    assert result["answered"] == 4 and result["retries"] == 1 and result["retry_reasons"] == {reason: 1}
    assert result["requests"] == fault_server.received == 5
    assert_exactly_once(out, [case.id for case in read_cases(SAMPLE_CASES).cases[:4]])


def test_every_fault_in_one_concurrent_run(fault_server, tmp_path):
    fault_server.push(*[fault for fault, _ in FAULTS])
    out = tmp_path / "teacher"
    assert main(teacher_args(out, fault_server.base_url, fault_server.model, "--set", "client.concurrency=4")) == 0
    result = summary(out)
    assert result["answered"] == 12 and result["retries"] == len(FAULTS) and fault_server.received == 12 + len(FAULTS)
    assert_exactly_once(out, [case.id for case in read_cases(SAMPLE_CASES).cases])


def test_a_case_whose_retries_run_out_fails_and_the_next_run_asks_only_for_it(fault_server, tmp_path, capsys):
    fault_server.push(*["503"] * 4)                             # the first case: 1 + 3 retries, all refused
    out = tmp_path / "teacher"
    args = teacher_args(out, fault_server.base_url, fault_server.model, "--limit", "3", "--set", "client.concurrency=1",
                        "--set", "client.max_retries=3")
    assert main(args) == 1
    assert "run the same command again" in capsys.readouterr().err
    result = summary(out)
    assert result["failed"] == 1 and result["answered"] == 2 and result["failed_reasons"] == {"gave up after 4 attempts": 1}
    first_id = read_cases(SAMPLE_CASES).cases[0].id
    (failure,) = rows(out / "rejects.jsonl")
    assert failure["id"] == first_id and failure["kind"] == "failed" and "503" in failure["reason"]
    received = fault_server.received
    assert main(args) == 0
    assert fault_server.received == received + 1 and summary(out)["answered"] == 3 and rows(out / "rejects.jsonl") == []
    assert_exactly_once(out, [case.id for case in read_cases(SAMPLE_CASES).cases[:3]])


def test_failures_in_a_row_stop_the_run_at_the_recipes_limit(fault_server, tmp_path, capsys):
    fault_server.push(*["503"] * 3)
    out = tmp_path / "teacher"
    assert main(teacher_args(out, fault_server.base_url, fault_server.model, "--limit", "6",
                             "--set", "client.concurrency=1", "--set", "client.max_retries=0",
                             "--set", "client.abort_after_failures=3")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 teacher in a row failed") and "run the same command again" in err, err
    assert fault_server.received == 3 and rows(out / "cache.jsonl") == []


# ---- the repair turns -------------------------------------------------------------------------------

def test_repair_turns_and_the_repair_prompt_come_from_the_recipe(fault_server, tmp_path, capsys):
    """repair_turns asks again after each invalid answer with prompts.repair, its {error} filled in; 0 rejects."""
    repair = tmp_path / "repair.txt"
    repair.write_text("重答，问题是：{error}\n", encoding="utf-8")
    fault_server.push({"answer": "不是 JSON"}, {"answer": "还不是"}, {"answer": "仍然不是"})
    out = tmp_path / "two"
    assert main(teacher_args(out, fault_server.base_url, fault_server.model, "--limit", "1",
                             "--set", "repair_turns=2", "--set", f"prompts.repair={repair}")) == 0
    assert fault_server.received == 3
    last = fault_server.requests[-1]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [last[2]["content"], last[4]["content"]] == ["不是 JSON", "还不是"]
    assert last[3]["content"].startswith("重答，问题是：the output is not valid JSON") and "{error}" not in last[3]["content"]
    (reject,) = rows(out / "rejects.jsonl")
    assert reject["raw"] == ["不是 JSON", "还不是", "仍然不是"] and summary(out)["rejected"] == 1

    fault_server.push({"answer": "不是 JSON"})
    out = tmp_path / "none"
    assert main(teacher_args(out, fault_server.base_url, fault_server.model, "--limit", "1",
                             "--set", "repair_turns=0")) == 0
    assert fault_server.received == 4 and summary(out)["rejected"] == 1

    repair.write_text("请重新回答。", encoding="utf-8")
    assert main(teacher_args(tmp_path / "bad", fault_server.base_url, fault_server.model,
                             "--set", f"prompts.repair={repair}")) == 2
    assert capsys.readouterr().err.endswith("the repair prompt has no {error} placeholder\n")
    assert fault_server.received == 4


# ---- cache keys -------------------------------------------------------------------------------------

def test_a_changed_prompt_or_sampling_is_a_new_key_and_a_finished_run_asks_nothing(fault_server, tmp_path):
    out = tmp_path / "teacher"
    args = teacher_args(out, fault_server.base_url, fault_server.model, "--limit", "3")
    assert main(args) == 0 and fault_server.received == 3
    assert main(args) == 0 and fault_server.received == 3 and summary(out)["items_asked"] == 0

    system = tmp_path / "system.txt"
    system.write_text(load_prompts().system + "\n请简洁。", encoding="utf-8")
    assert main(args + ["--set", f"prompts.system={system}"]) == 0
    assert fault_server.received == 6 and summary(out)["items_asked"] == 3 and summary(out)["stale_cache_rows"] == 3
    sft = rows(out / "sft" / "train.jsonl") + rows(out / "sft" / "valid.jsonl")
    assert all(row["messages"][0]["content"].endswith("请简洁。") for row in sft)

    assert main(args + ["--set", "sampling.temperature=0.3"]) == 0 and fault_server.received == 9
    assert main(args + ["--set", "structured_output.max_reason_chars=80"]) == 0 and fault_server.received == 12
    assert main(args) == 0 and fault_server.received == 12      # the first settings are still cached


def test_an_overlay_file_sets_recipe_keys_and_set_overrides_it(fault_server, tmp_path):
    overlay = tmp_path / "cooler.yaml"
    overlay.write_text("sampling:\n  temperature: 0.3\n  top_p: 0.5\n", encoding="utf-8")
    assert main(teacher_args(tmp_path / "out", fault_server.base_url, fault_server.model, "--limit", "1",
                             "--overlay", str(overlay), "--set", "sampling.top_p=0.6")) == 0
    assert (fault_server.requests[0]["temperature"], fault_server.requests[0]["top_p"]) == (0.3, 0.6)


def test_fresh_moves_the_cache_aside_and_asks_again(fault_server, tmp_path):
    out = tmp_path / "teacher"
    args = teacher_args(out, fault_server.base_url, fault_server.model, "--limit", "2")
    assert main(args) == 0 and main(args + ["--fresh"]) == 0
    assert fault_server.received == 4 and len(list(out.glob("cache.jsonl.*.bak"))) == 1
    assert len(rows(out / "cache.jsonl")) == 2


# ---- self-consistency and the split ------------------------------------------------------------------

def test_self_consistency_keeps_the_sample_that_agrees_most(fault_server, tmp_path):
    a = answer_json(Answer("1. 咽痛发热", "急性扁桃体炎"))
    fault_server.push({"answer": a}, {"answer": answer_json(Answer("1. 咳嗽", "1. 肺炎；2. 支气管炎"))},
                      {"answer": answer_json(Answer("1. 咽部充血", "急性扁桃体炎（化脓性）"))})
    out = tmp_path / "teacher"
    assert main(teacher_args(out, fault_server.base_url, fault_server.model, "--limit", "1",
                             "--set", "sampling.samples_per_case=3", "--set", "client.concurrency=1")) == 0
    assert [body["seed"] for body in fault_server.requests] == [0, 1, 2]     # samples differ, reruns repeat
    (row,) = rows(out / "sft" / "train.jsonl") + rows(out / "sft" / "valid.jsonl")
    assert row["messages"][2]["content"] == a and row["agreement"] == 0.5    # samples 0 and 2 agree; ties go to the first
    assert summary(out)["mean_agreement"] == 0.5 and len(rows(out / "cache.jsonl")) == 3


def test_agreement_scores():
    a, b, a2 = Answer("r", "肺炎"), Answer("r", "1. 胃炎；2. 肠炎"), Answer("r", "肺炎（社区获得性）")
    assert select_by_agreement([a]) == (0, 1.0)
    assert select_by_agreement([None]) == (None, 0.0)
    assert select_by_agreement([b, a, a2]) == (1, 0.5)
    assert select_by_agreement([None, a, a2]) == (1, 0.5)                    # a rejected sample agrees with nothing
    assert select_by_agreement([a, b]) == (0, 0.0)
    assert select_by_agreement([None, None]) == (None, 0.0)


def test_the_split_is_fixed_by_seed_and_stable_as_cases_are_added():
    ids = list(range(1000))
    valid = validation_ids(ids, 0.1, seed=7)
    assert 60 < len(valid) < 140 and valid == validation_ids(list(reversed(ids)), 0.1, seed=7)
    assert validation_ids(ids + list(range(1000, 1500)), 0.1, seed=7) & set(ids) == valid
    assert valid != validation_ids(ids, 0.1, seed=8)
    assert len(validation_ids([1, 2], 0.01, seed=7)) == 1 and validation_ids([1, 2], 0.0, seed=7) == set()


# ---- clear errors ---------------------------------------------------------------------------------------

def test_a_bad_case_file_stops_the_run_before_any_request(fault_server, tmp_path, capsys):
    cases = tmp_path / "cases.jsonl"
    cases.write_text('{"id": 1, "feature_content": "性别: 女"}\n{"id": "x", "feature_content": "性别: 男"}\n', encoding="utf-8")
    out = tmp_path / "teacher"
    assert main(teacher_args(out, fault_server.base_url, fault_server.model, cases=cases)) == 2
    assert capsys.readouterr().err == f"error: {cases}:2: field 'id': must be an integer, got \"x\"\n"
    assert fault_server.received == 0 and fault_server.models_requests == 0 and not (out / "cache.jsonl").exists()


def test_a_bad_recipe_key_is_named(fault_server, tmp_path, capsys):
    assert main(teacher_args(tmp_path / "out", fault_server.base_url, fault_server.model, "--set", "sampling.temprature=1")) == 2
    assert "key 'sampling.temprature': unknown key (did you mean 'sampling.temperature'?)" in capsys.readouterr().err


def _closed_port_url() -> str:
    from prep.api.process import free_port

    return f"http://127.0.0.1:{free_port()}/v1"


ENDPOINT_ERRORS = {
    "unreachable": (lambda server: [f"client.base_url={_closed_port_url()}"], r"cannot reach http://127\.0\.0\.1:\d+/v1 \("),
    "wrong model": (lambda server: ["client.model=Qwen2.5-72B-Instruct"],
                    r"model 'Qwen2\.5-72B-Instruct' is not served at .* \(it serves: fault-model\); fix client\.model"),
    "missing key variable": (lambda server: ["client.api_key_env=MEDKD_NO_SUCH_KEY"],
                             r"environment variable MEDKD_NO_SUCH_KEY is not set; export the API key"),
    "refused key": (lambda server: ["client.api_key_env=MEDKD_TEST_WRONG_KEY"],
                    r"refused the API key \(HTTP 401: Incorrect API key provided: \*\*\*\); check that environment variable MEDKD_TEST_WRONG_KEY"),
}


@pytest.mark.parametrize("problem", list(ENDPOINT_ERRORS))
def test_endpoint_problems_end_the_run_early_with_one_sentence(problem, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEDKD_NO_SUCH_KEY", raising=False)
    monkeypatch.setenv("MEDKD_TEST_WRONG_KEY", "sk-wrong-key-for-this-test")
    overrides, expected = ENDPOINT_ERRORS[problem]
    with FaultServer(api_key="sk-right" if problem == "refused key" else None) as server:
        extra = [item for override in overrides(server) for item in ("--set", override)]
        started = time.monotonic()
        assert main(teacher_args(tmp_path / "out", server.base_url, server.model, *extra)) == 2
        assert time.monotonic() - started < 15 and server.received == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert __import__("re").search(expected, err), err
    assert "sk-wrong-key-for-this-test" not in err


# ---- keys never leak -----------------------------------------------------------------------------------

FAKE_KEY = "sk-medkd-fake-7f3a9c21e5b84d06"


def _teacher_process(out, server, *extra, env_key=FAKE_KEY, cases=SAMPLE_CASES, progress=False):
    args = [a for a in teacher_args(out, server.base_url, server.model, *extra, cases=cases) if a != "--no-progress" or not progress]
    env = {**SUBPROCESS_ENV, "MEDKD_FAKE_KEY": env_key}
    return [sys.executable, "-m", "launch.teacher", *args, "--set", "client.api_key_env=MEDKD_FAKE_KEY"], env


def _files_holding(folder: Path, secret: str) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


@pytest.mark.integration
def test_a_known_fake_key_appears_in_no_file_log_or_message(tmp_path):
    with FaultServer(api_key=FAKE_KEY) as server:
        server.push("429", "500", {"answer": "not json"})
        out = tmp_path / "ok"
        command, env = _teacher_process(out, server, "--limit", "4", progress=True)
        done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert server.received == 4 + 2 + 1                    # the key worked: every request was served
        assert "tok_in=" in done.stderr and "failed=0" in done.stderr and "it/s" in done.stderr   # the progress bar
        assert FAKE_KEY not in done.stdout + done.stderr and _files_holding(out, FAKE_KEY) == []
        assert (out / "teacher.log").stat().st_size > 0 and (out / "sft" / "dataset").is_dir()

    with FaultServer(api_key="sk-the-right-one") as server:    # refuses, echoing the key it was sent
        out = tmp_path / "refused"
        command, env = _teacher_process(out, server)
        done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "refused the API key" in done.stderr
        assert FAKE_KEY not in done.stdout + done.stderr and _files_holding(out, FAKE_KEY) == []


# ---- kill -9 and resume -----------------------------------------------------------------------------------

def _cache_lines(path: Path) -> int:
    """Whole rows in a cache file being appended to (a row not yet ended by its newline is not counted)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.integration
def test_sigkill_at_random_moments_then_resume_asks_each_case_once(tmp_path):
    cases, concurrency, kills = write_cases(tmp_path / "cases.jsonl", 48, first_id=5000), 4, 3
    out = tmp_path / "teacher"
    rng = random.Random(1234)
    unrecorded = []
    with FaultServer(latency_s=0.25) as server:
        command, env = _teacher_process(out, server, "--set", f"client.concurrency={concurrency}", env_key="unused", cases=cases)
        for _ in range(kills):
            received_before = server.received
            process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            assert server.wait_until(lambda counts, before=received_before: counts["received"] > before, 60), "it never asked"
            # The moment varies by how many answers this run has written when it dies: 0 (requests paid for,
            # none recorded) up to 8 (a few in flight beside them).
            target = _cache_lines(out / "cache.jsonl") + rng.randint(0, 8)
            deadline = time.monotonic() + 60
            while _cache_lines(out / "cache.jsonl") < target:
                assert process.poll() is None and time.monotonic() < deadline, f"no {target} cache rows before it ended"
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            recorded = len({row["key"] for row in rows(out / "cache.jsonl")}) if (out / "cache.jsonl").exists() else 0
            # Requests paid for but not in the cache: at most those in flight when the process died.
            unrecorded.append(server.received - recorded - sum(unrecorded))
            assert 0 <= unrecorded[-1] <= concurrency, unrecorded
        assert 0 < recorded < 48, "every kill should land mid-run"
        done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert server.received <= 48 + sum(unrecorded), (server.received, unrecorded)
        print("kill-and-resume: recorded after the last kill", recorded, "unrecorded per kill", unrecorded, "received", server.received)
    assert_exactly_once(out, list(range(5000, 5048)))
    assert summary(out)["answered"] == 48


def test_a_self_hosted_teacher_is_known_by_its_checkpoint_not_its_served_name(tmp_path, tiny_model_dir):
    """The serve recipe keeps served_model_name while its model folder is retrained in place: the teacher's
    identity (in every cache key and row) changes with the weights, the name asked stays."""
    import shutil

    from prep.stages.teacher import TeacherStage
    from tests.test_predict import _retrain_in_place

    model = tmp_path / "teacher-model"
    shutil.copytree(tiny_model_dir, model)
    serve = tmp_path / "serve.yaml"
    serve.write_text((REPO_ROOT / "recipes" / "serve" / "tiny-cpu.yaml").read_text(encoding="utf-8")
                     .replace("model: medkd/tiny-qwen2.5", f"model: {model}"), encoding="utf-8")

    def target():
        return TeacherStage.from_files(RECIPE, SAMPLE_CASES, limit=2, overrides=[f"server={serve}"]).resolve()

    before = target()
    _retrain_in_place(model)
    after = target()
    assert before.settings.model == after.settings.model == "tiny-qwen2.5"
    assert before.identity != after.identity and after.identity.startswith("tiny-qwen2.5@")
    hosted = TeacherStage.from_files(RECIPE, SAMPLE_CASES, limit=2, overrides=[
        "server=null", "client.base_url=http://127.0.0.1:9/v1"]).resolve()
    assert hosted.identity == "tiny-qwen2.5" and "model name only" in hosted.known_by
