"""Prompt files are the single source of prompts, and their hash follows their content."""
import pytest

from prep.answers import Answer
from prep.prompts import load_prompts
from prep.records import read_cases
from tests.conftest import SAMPLE_CASES


def test_messages_use_the_prompt_files_and_canonical_answer():
    prompts = load_prompts()
    case = read_cases(SAMPLE_CASES).cases[0]
    messages = prompts.messages(case, Answer("1. 咽痛发热", "急性化脓性扁桃体炎"))
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == prompts.system
    assert case.feature_content in messages[1]["content"]
    assert messages[2]["content"] == '{"reason":"1. 咽痛发热","diseases":"急性化脓性扁桃体炎"}'


def test_hash_changes_with_content(tmp_path):
    (tmp_path / "s.txt").write_text("系统", encoding="utf-8")
    (tmp_path / "u.txt").write_text("病例：{feature_content}", encoding="utf-8")
    first = load_prompts(tmp_path / "s.txt", tmp_path / "u.txt")
    assert first.hash == load_prompts(tmp_path / "s.txt", tmp_path / "u.txt").hash
    (tmp_path / "u.txt").write_text("病例信息：{feature_content}", encoding="utf-8")
    assert load_prompts(tmp_path / "s.txt", tmp_path / "u.txt").hash != first.hash


def test_template_without_placeholder_is_refused(tmp_path):
    (tmp_path / "s.txt").write_text("系统", encoding="utf-8")
    (tmp_path / "u.txt").write_text("没有占位符", encoding="utf-8")
    with pytest.raises(ValueError, match="no {feature_content} placeholder"):
        load_prompts(tmp_path / "s.txt", tmp_path / "u.txt")
