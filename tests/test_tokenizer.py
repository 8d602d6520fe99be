"""The rebuilt tokenizer is Qwen2.5's: same ids as tiktoken on the shipped ranks, same template output."""
import json

import pytest

from prep.tokenizer import ADDED_TOKENS, FIRST_ADDED_ID, QWEN_PATTERN, default_ranks_path, load_ranks

TEXTS = [
    "性别: 男\n年龄: 48\n主诉: 乙肝阳性\n现病史: 2020-7-14 ALT/AST 109/95 予护肝治疗 HBVDNA 3.06E+4 ；小三阳",
    "体格检查: T36.5℃，P78次/分，R20次/分，BP142/78mmHg。心肺听诊未闻及异常。",
    "The patient's BP was 142/78 mmHg; they'll follow up. I'M FINE, it's OK.",
    "1234567890 3.1415926 -42 1e-5 ０１２３",
    "emoji 😀🩺🏥 and 👨‍👩‍👧 family",
    "odd   whitespace\t\ttabs\r\n\r\nCRLF  \n   trailing   ",
    '{"reason":"1. 主诉…\\n2. 既往史","diseases":"1. 高尿酸血症；2. 皮炎"}',
    "",
    "   ",
    "中英mixed文本with数字123和符号（括号）【方括号】“引号”",
]


@pytest.fixture(scope="module")
def tiktoken_encoding():
    tiktoken = pytest.importorskip("tiktoken")
    special = {content: FIRST_ADDED_ID + offset for offset, (content, _) in enumerate(ADDED_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=load_ranks(default_ranks_path()), special_tokens=special)


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_matches_tiktoken(qwen_tokenizer, tiktoken_encoding, text):
    ours = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours == tiktoken_encoding.encode(text)
    assert qwen_tokenizer.decode(ours) == text


def test_encoding_matches_tiktoken_on_real_cases(qwen_tokenizer, tiktoken_encoding, real_cases_path):
    lines = real_cases_path.read_text(encoding="utf-8").splitlines()[::25]
    for line in lines:
        text = json.loads(line)["feature_content"]
        assert qwen_tokenizer(text, add_special_tokens=False)["input_ids"] == tiktoken_encoding.encode(text)


def test_known_ids_and_special_tokens(qwen_tokenizer):
    assert qwen_tokenizer.convert_tokens_to_ids(["system", "user", "assistant"]) == [8948, 872, 77091]
    assert len(qwen_tokenizer) == 151665
    assert qwen_tokenizer.eos_token == "<|im_end|>" and qwen_tokenizer.eos_token_id == 151645
    assert qwen_tokenizer.pad_token == "<|endoftext|>" and qwen_tokenizer.pad_token_id == 151643
    assert qwen_tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    assert qwen_tokenizer.convert_tokens_to_ids("<|file_sep|>") == 151664
    # Special tokens are single ids and survive decoding; <tool_call> is added but not special.
    ids = qwen_tokenizer("<|im_start|>user\nhi<|im_end|><tool_call>", add_special_tokens=False)["input_ids"]
    assert ids == [151644, 872, 198, 6023, 151645, 151657]
    assert "<tool_call>" not in qwen_tokenizer.all_special_tokens
    assert len(load_ranks(default_ranks_path())) == 151643


def test_chat_template_renders_qwen25(qwen_tokenizer):
    with_system = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "头痛"},
                   {"role": "assistant", "content": '{"reason":"r","diseases":"d"}'}]
    assert qwen_tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\n你是医生。<|im_end|>\n<|im_start|>user\n头痛<|im_end|>\n"
        '<|im_start|>assistant\n{"reason":"r","diseases":"d"}<|im_end|>\n'
    )
    no_system = [{"role": "user", "content": "头痛"}]
    assert qwen_tokenizer.apply_chat_template(no_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n头痛<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen_tokenizer.apply_chat_template(with_system[:2], tokenize=False, add_generation_prompt=False).endswith(
        "<|im_start|>user\n头痛<|im_end|>\n"
    )
