"""The weight builder puts w_diseases exactly on the tokens that carry the diseases value."""
import pytest

from custom_losses.kd.token_weights import (
    TokenWeightConfig,
    answer_token_weights,
    diseases_value_span,
    load_lexicon,
    term_spans,
)
from prep.answers import Answer, answer_json
from prep.prompts import load_prompts
from prep.records import Case
from prep.tokenizer import chat_token_ids

CASE = Case(1, "性别: 男\n年龄: 63\n主诉: 头痛伴血压升高\n既往史: 2型糖尿病\n体格检查: 血压180/110mmHg\n辅助检查: 糖化血红蛋白 8.1%")
ANSWERS = [
    Answer("1. 血压180/110mmHg；\n2. 既往2型糖尿病。", "1. 原发性高血压（3级，很高危）；2. 2型糖尿病（血糖控制不佳）"),
    Answer('1. 主诉"头痛"，diseases 见下；\\ 反斜杠', "原发性高血压"),
    Answer("1. 糖化血红蛋白 8.1%。", "1. 高血压；2. 2型糖尿病；3. 头痛待查"),
    Answer("依据", "高血压病3级(很高危)"),
]


def byte_spans(tokenizer, ids):
    """Independent reference: each token's byte span, from the byte-level vocabulary itself."""
    from prep.tokenizer import _byte_to_unicode

    to_byte = {char: byte for byte, char in _byte_to_unicode().items()}
    spans, position = [], 0
    for token in tokenizer.convert_ids_to_tokens(ids):
        length = len(bytes(to_byte[char] for char in token))
        spans.append((position, position + length))
        position += length
    return spans


@pytest.mark.parametrize("answer", ANSWERS)
def test_diseases_weight_is_exactly_on_the_value_tokens(qwen_tokenizer, answer):
    config = TokenWeightConfig(w_diseases=3.0, w_terms=1.0, lexicon_path=None)
    text = answer_json(answer)
    tokens = answer_token_weights(qwen_tokenizer, text, CASE.feature_content, config)
    ids, weights = tokens.ids, tokens.weights
    assert tokens.in_diseases == [w == 3.0 for w in weights]
    assert ids[-1] == qwen_tokenizer.convert_tokens_to_ids("<|im_end|>") and weights[-1] == 1.0
    start, end = diseases_value_span(text)
    assert text[start:end] == answer.diseases
    value_bytes = (len(text[:start].encode()), len(text[:end].encode()))
    for (lo, hi), weight in zip(byte_spans(qwen_tokenizer, ids[:-1]), weights[:-1]):
        inside = lo < value_bytes[1] and hi > value_bytes[0]
        assert weight == (3.0 if inside else 1.0), (lo, hi, weight)
    weighted = qwen_tokenizer.decode([i for i, w in zip(ids, weights) if w == 3.0])
    assert answer.diseases in weighted and len(weighted) <= len(answer.diseases) + 3


@pytest.mark.parametrize("answer", ANSWERS)
def test_answer_tokens_are_those_of_the_full_conversation(qwen_tokenizer, answer):
    messages = load_prompts().messages(CASE, answer)
    full = chat_token_ids(qwen_tokenizer, messages)
    prompt = chat_token_ids(qwen_tokenizer, messages[:2], add_generation_prompt=True)
    ids = answer_token_weights(qwen_tokenizer, answer_json(answer), CASE.feature_content, TokenWeightConfig()).ids
    assert full[: len(prompt)] == prompt
    assert full[len(prompt) : len(prompt) + len(ids)] == ids
    assert full[len(prompt) + len(ids) :] == qwen_tokenizer("\n", add_special_tokens=False)["input_ids"]


def test_terms_in_case_and_answer_get_w_terms(qwen_tokenizer):
    lexicon = load_lexicon("data/medical_terms.txt")
    assert "糖化血红蛋白" in lexicon and "血压" in lexicon
    answer = answer_json(ANSWERS[2])
    spans = term_spans(answer, CASE.feature_content, lexicon)
    found = {answer[a:b] for a, b in spans}
    assert "糖化血红蛋白" in found and "2型糖尿病" in found
    assert "血红蛋白" not in found  # claimed by the longer term
    assert "头痛" in found  # in the case's chief complaint and in the diagnosis
    config = TokenWeightConfig(w_diseases=2.0, w_terms=1.5)
    tokens = answer_token_weights(qwen_tokenizer, answer, CASE.feature_content, config)
    ids, weights = tokens.ids, tokens.weights
    term_tokens = qwen_tokenizer.decode([i for i, w in zip(ids, weights) if w == 1.5])
    assert "糖化血红蛋白" in term_tokens
    # Overlap with the diseases value keeps the larger weight.
    assert qwen_tokenizer.decode([i for i, w in zip(ids, weights) if w == 2.0]).count("糖尿病") == 1


def test_terms_absent_from_the_case_are_not_weighted(qwen_tokenizer):
    case_text = "主诉: 咳嗽"
    tokens = answer_token_weights(qwen_tokenizer, answer_json(Answer("血压高", "高血压")), case_text,
                                  TokenWeightConfig(w_diseases=1.0, w_terms=5.0))
    assert set(tokens.weights) == {1.0}


def test_negative_weights_are_refused():
    with pytest.raises(ValueError, match="must be >= 0"):
        TokenWeightConfig(w_diseases=-1)
