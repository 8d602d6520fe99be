"""The answer parser, the canonical JSON and the disease normaliser."""
import json
import re

import pytest

from prep.answers import (
    ANSWER_REGEX,
    Answer,
    AnswerError,
    answer_json,
    format_diseases,
    normalise_diseases,
    parse_answer,
)

CANON = Answer(reason="1. 主诉头痛；\n2. 血压160/100mmHg。", diseases="1. 原发性高血压（2级）；2. 头痛")


@pytest.mark.parametrize("text", [
    answer_json(CANON),
    json.dumps({"reason": CANON.reason, "diseases": CANON.diseases}, ensure_ascii=False, indent=2),
    "```json\n" + answer_json(CANON) + "\n```",
    "好的，诊断如下：\n```\n" + answer_json(CANON) + "\n```\n以上仅供参考。",
    "根据病例分析：" + answer_json(CANON) + " 希望有帮助",
    # near-JSON: raw newline inside a string value
    '{"reason": "1. 主诉头痛；\n2. 血压160/100mmHg。", "diseases": "1. 原发性高血压（2级）；2. 头痛"}',
    '{"诊断依据": "1. 主诉头痛；\\n2. 血压160/100mmHg。", "诊断": "1. 原发性高血压（2级）；2. 头痛"}',
    '{"reason": "1. 主诉头痛；\\n2. 血压160/100mmHg。", "diseases": ["原发性高血压（2级）", "头痛"]}',
])
def test_parser_accepts_the_usual_shapes(text):
    assert parse_answer(text) == CANON


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("我认为是高血压", "not valid JSON"),
    ('{"reason": "x"', "not valid JSON"),
    ('["a", "b"]', "is a list"),
    ('{"reason": "x"}', "no 'diseases' key"),
    ('{"diseases": "x"}', "no 'reason' key"),
    ('{"reason": "x", "diseases": 3}', "'diseases' must be a string"),
    ('{"reason": "  ", "diseases": "x"}', "'reason' is empty"),
])
def test_parser_says_why_not(text, reason):
    with pytest.raises(AnswerError, match=re.escape(reason)):
        parse_answer(text)


def test_canonical_json_is_reason_first_compact_and_matches_the_decode_regex():
    text = answer_json(CANON)
    assert text.startswith('{"reason":') and '"diseases":' in text and ", " not in text
    assert "原发性高血压" in text  # ensure_ascii=False
    assert re.fullmatch(ANSWER_REGEX, text)
    assert not re.fullmatch(ANSWER_REGEX, '{"reason":"","diseases":"x"}')
    assert not re.fullmatch(ANSWER_REGEX, '{"reason":"a\nb","diseases":"x"}')  # raw control char


@pytest.mark.parametrize("diseases,keep,expected", [
    ("发热", True, ["发热"]),
    ("1. 高尿酸血症；2. 皮炎；3. 失眠；4. 原发性高血压（1级）", True, ["高尿酸血症", "皮炎", "失眠", "原发性高血压（1级）"]),
    ("1. 高尿酸血症；2. 皮炎；3. 失眠；4. 原发性高血压（1级）", False, ["高尿酸血症", "皮炎", "失眠", "原发性高血压"]),
    ("高尿酸血症|皮炎|失眠", True, ["高尿酸血症", "皮炎", "失眠"]),
    ("1.高尿酸血症 2.皮炎 3.失眠", True, ["高尿酸血症", "皮炎", "失眠"]),
    ("冠心病、高血压,糖尿病/高脂血症\n痛风。", True, ["冠心病", "高血压", "糖尿病", "高脂血症", "痛风"]),
    ("（1）肺炎；（2）胸腔积液", True, ["肺炎", "胸腔积液"]),
    ("①肺炎②胸腔积液", True, ["肺炎", "胸腔积液"]),
    ("原发性高血压（2级，很高危）；2型糖尿病", True, ["原发性高血压（2级，很高危）", "2型糖尿病"]),
    ("原发性高血压（2级，很高危）；2型糖尿病", False, ["原发性高血压", "2型糖尿病"]),
    ("肺炎；肺炎；", True, ["肺炎"]),
    ("维生素D缺乏(25-OH-D 12.5ng/ml)", False, ["维生素D缺乏"]),
])
def test_normalise_diseases(diseases, keep, expected):
    assert normalise_diseases(diseases, keep_parentheticals=keep) == expected


def test_official_examples_parse_and_normalise(official_examples):
    for row in official_examples:
        answer = parse_answer(json.dumps({"reason": row["reason"], "diseases": row["diseases"]}, ensure_ascii=False))
        names = answer.disease_list()
        assert names and all(name and "；" not in name for name in names)
        assert format_diseases(names).replace(" ", "") == row["diseases"].replace(" ", "") or len(names) == 1
