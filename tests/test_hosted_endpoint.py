"""The hosted teacher doubles (prep.testing.hosted_teacher) seen through the real `openai` client: DashScope-like
Qwen tokens as text and bytes with a top_logprobs cap and no /v1/completions, and a DeepSeek-like foreign
tokenizer whose pieces straddle Qwen's; the toy tokenizer against a hand-cut example."""
from __future__ import annotations

import math
from collections.abc import Callable

import openai
import pytest

from prep.qwen import IM_END_ID, VOCAB_ROWS
from prep.stages.softlabel_tokens import ForeignTokenizer, VocabIndex, positions_from_chat
from prep.testing.hosted_teacher import (
    FOREIGN_END_TOKEN,
    QwenPieces,
    foreign_logprobs,
    foreign_tokens,
    hosted_teacher_server,
)

CASE = [{"role": "user", "content": "性别: 男\n主诉: 咳嗽3天"}]
# An answer of the project's form with characters of both toy rules: 天 (U+5929, 22825 % 5 == 0) is split.
ANSWER = '{"reason":"咳嗽三天，发热","diseases":"肺炎"}'


@pytest.fixture(scope="module")
def vocab(qwen_tokenizer) -> VocabIndex:
    return VocabIndex(qwen_tokenizer, VOCAB_ROWS)


@pytest.fixture(scope="module")
def qwen_server(qwen_tokenizer):
    with hosted_teacher_server("qwen", tokenizer=qwen_tokenizer) as server:
        yield server


@pytest.fixture(scope="module")
def foreign_server():
    with hosted_teacher_server("foreign") as server:
        yield server


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=30)


def ask(server, k: int | None, **extra):
    options = {"logprobs": True, **({"top_logprobs": k} if k is not None else {}), **extra}
    return client(server).chat.completions.create(model=server.model, messages=CASE, **options)


def entries(response) -> list[dict]:
    return [entry.model_dump() for entry in response.choices[0].logprobs.content]


def joined(content: list[dict]) -> bytes:
    return b"".join(bytes(entry["bytes"]) for entry in content)


def lossy(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def assert_well_formed(entry: dict, k: int, text_of: Callable[[bytes], str] = lossy) -> None:
    """K alternatives, the chosen one among them, distinct, sorted descending, probabilities below 1 in all,
    each token TEXT_OF its bytes (the lossy text a hosted API shows)."""
    top = entry["top_logprobs"]
    assert len(top) == k
    for item in [entry, *top]:
        assert item["token"] == text_of(bytes(item["bytes"]))
    if k:
        assert (entry["token"], entry["bytes"], entry["logprob"]) in [(a["token"], a["bytes"], a["logprob"])
                                                                      for a in top]
        assert len({bytes(a["bytes"]) for a in top}) == k
        logprobs = [a["logprob"] for a in top]
        assert logprobs == sorted(logprobs, reverse=True) and len(set(logprobs)) == k
        assert sum(math.exp(lp) for lp in logprobs) < 1
    assert entry["logprob"] < 0


# ---- the toy foreign tokenizer --------------------------------------------------------------------------------------
def test_foreign_tokens_cut_a_hand_worked_example():
    # ASCII runs in 3-byte pieces; other characters in pairs, except 天 (U+5929 = 22825, % 5 == 0): its first byte,
    # then its other two, and the pairing starts afresh after it. 咳 21683, 嗽 22013, 三 19977, ， 65292, 发 21457,
    # 热 28909, 肺 32954, 炎 28814: none divisible by 5. 三 and 热 end a pairing early (before 天, before ASCII).
    expected = [b'{"r', b"eas", b'on"', b':"', "咳嗽".encode(), "三".encode(), b"\xe5", b"\xa4\xa9",
                "，发".encode(), "热".encode(), b'","', b"dis", b"eas", b'es"', b':"', "肺炎".encode(), b'"}']
    assert foreign_tokens(ANSWER) == expected
    assert foreign_tokens("热天a") == ["热".encode(), b"\xe5", b"\xa4\xa9", b"a"]
    # ð U+00F0 = 240 and 😃 U+1F603 = 128515 are split too; é (233) and 😀 (128512) pair up.
    assert foreign_tokens("ðé😀😃") == [b"\xc3", b"\xb0", "é😀".encode(), b"\xf0", b"\x9f\x98\x83"]
    assert foreign_tokens("") == [] and foreign_tokens("abcd") == [b"abc", b"d"]


def test_foreign_logprobs_are_well_formed_and_offer_prefix_extension_and_lone_byte_alternatives():
    for k in (0, 1, 2, 5, 20):
        content = foreign_logprobs(ANSWER, k)
        assert joined(content) == ANSWER.encode() + FOREIGN_END_TOKEN.encode()
        assert content[-1]["token"] == FOREIGN_END_TOKEN
        for entry in content:
            assert_well_formed(entry, k)
    assert joined(foreign_logprobs(ANSWER, 3, end_entry=False)) == ANSWER.encode()
    assert foreign_logprobs(ANSWER, 5) == foreign_logprobs(ANSWER, 5)         # deterministic
    first = {bytes(a["bytes"]) for a in foreign_logprobs(ANSWER, 5)[0]["top_logprobs"]}
    # {"r: its first byte, it extended by the next character, a lone lead byte, and other text
    assert {b'{"r', b"{", b'{"re', b"\xe5"} <= first and len(first) == 5
    pair = {bytes(a["bytes"]) for a in foreign_logprobs(ANSWER, 5)[4]["top_logprobs"]}
    assert {"咳嗽".encode(), "咳".encode(), "咳嗽三".encode()} <= pair      # prefix: its first character
    split = foreign_logprobs(ANSWER, 5)[6]                                 # b"\xe5", the lead byte of 天
    assert split["token"] == "\ufffd" and b"\xe5\xa4\xa9" in {bytes(a["bytes"]) for a in split["top_logprobs"]}


# ---- hosted Qwen ---------------------------------------------------------------------------------------------------
def test_hosted_qwen_sends_qwen_tokens_as_text_and_bytes_ending_in_im_end(qwen_server, vocab, qwen_tokenizer):
    response = ask(qwen_server, 5)
    text, content = response.choices[0].message.content, entries(response)
    assert joined(content) == text.encode() + b"<|im_end|>"
    ids = [vocab.by_bytes[bytes(entry["bytes"])] for entry in content]        # every piece is one Qwen token
    assert ids == qwen_tokenizer(text, add_special_tokens=False)["input_ids"] + [IM_END_ID]
    assert not any(entry["token"].startswith("token_id:") for entry in content)
    assert all(bytes(a["bytes"]) in vocab.by_bytes for entry in content for a in entry["top_logprobs"])
    for entry in content:
        assert_well_formed(entry, 5, lambda raw: qwen_tokenizer.decode([vocab.by_bytes[raw]]))
    assert response.usage.completion_tokens == len(content)
    # The soft-label stage's bytes path maps it all, alternatives included (none lost to lossy text: bytes given).
    positions = positions_from_chat(content, vocab, token_ids=False)
    assert [p.chosen for p in positions] == ids and all(len(p.ids) == 5 for p in positions)


def test_hosted_qwen_honours_and_caps_top_logprobs_and_refuses_completions(qwen_server):
    for k in (0, 1, 3):
        assert {len(entry["top_logprobs"]) for entry in entries(ask(qwen_server, k))} == {k}
    assert ask(qwen_server, None, logprobs=False).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be less than or equal to 5"):
        ask(qwen_server, 6)
    with pytest.raises(openai.NotFoundError):
        client(qwen_server).completions.create(model=qwen_server.model, prompt=[1, 2, 3], max_tokens=1,
                                               extra_body={"prompt_logprobs": 5})


def test_max_tokens_cuts_the_answer_as_a_real_api_does(qwen_server, foreign_server):
    for server in (qwen_server, foreign_server):
        server.push({"answer": ANSWER})
        response = ask(server, 2, max_tokens=3)
        content = entries(response)
        assert len(content) == 3 and response.choices[0].finish_reason == "length"
        assert response.choices[0].message.content == lossy(joined(content)) and response.usage.completion_tokens == 3
    assert foreign_server.requests[-1]["max_tokens"] == 3


def test_a_scripted_answer_gets_hosted_logprobs_too(qwen_server, vocab):
    qwen_server.push({"answer": ANSWER})
    content = entries(ask(qwen_server, 2))
    assert joined(content) == ANSWER.encode() + b"<|im_end|>"
    assert all(bytes(entry["bytes"]) in vocab.by_bytes for entry in content)


# ---- hosted foreign ------------------------------------------------------------------------------------------------
def test_hosted_foreign_cuts_across_qwen_boundaries_and_characters(foreign_server, vocab, qwen_tokenizer):
    response = ask(foreign_server, 20)
    text, content = response.choices[0].message.content, entries(response)
    data = text.encode()
    assert response.model == "deepseek-chat" and response.usage.completion_tokens == len(content)
    assert joined(content) == data + FOREIGN_END_TOKEN.encode()
    assert content == foreign_logprobs(text, 20)
    for entry in content:
        assert_well_formed(entry, 20)
    cuts, offset = [], 0
    for entry in content[:-1]:
        cuts.append((offset, offset + len(entry["bytes"])))
        offset += len(entry["bytes"])
    # a multi-byte character split across entries: a cut lands on a continuation byte
    assert any(end < len(data) and data[end] & 0xC0 == 0x80 for _, end in cuts)
    # an ASCII piece holding a quote that does not start and end on Qwen's token boundaries
    pieces, qwen_cuts, offset = QwenPieces(qwen_tokenizer), {0}, 0
    for token_id in qwen_tokenizer(text, add_special_tokens=False)["input_ids"]:
        offset += len(pieces.piece(token_id)[1])
        qwen_cuts.add(offset)
    assert any(b'"' in data[start:end] and not {start, end} <= qwen_cuts for start, end in cuts)
    with pytest.raises(ForeignTokenizer):                  # what the soft-label stage says of such a teacher
        positions_from_chat(content, vocab, token_ids=False)


def test_hosted_foreign_caps_top_logprobs_at_20(foreign_server):
    assert {len(entry["top_logprobs"]) for entry in entries(ask(foreign_server, 7))} == {7}
    with pytest.raises(openai.BadRequestError, match="less than or equal to 20"):
        ask(foreign_server, 21)


def test_the_fault_server_command_selects_the_hosted_teachers(qwen_tokenizer):
    from launch.fault_server import build

    foreign = build(["--hosted", "foreign"])
    assert foreign.model == "deepseek-chat" and foreign.teacher.max_top_logprobs == 20
    qwen = build(["--hosted", "qwen", "--top-logprobs-cap", "3", "--upstream", "http://127.0.0.1:9/v1"])
    assert qwen.model == "qwen2.5-72b-instruct" and qwen.teacher.max_top_logprobs == 3
    assert qwen.teacher.upstream == "http://127.0.0.1:9/v1" and qwen.upstream is None
    assert build(["--upstream", "http://127.0.0.1:9/v1"]).upstream == "http://127.0.0.1:9/v1"
    for wrong in (["--top-logprobs-cap", "3"], ["--hosted", "qwen", "--known-teacher"]):
        with pytest.raises(SystemExit) as stopped:
            build(wrong)
        assert stopped.value.code == 2


# ---- in front of a real vLLM server ---------------------------------------------------------------------------------
def test_in_front_of_vllm_the_hosted_forms_carry_vllms_own_tokens(vllm_server, qwen_tokenizer):
    """The same greedy request straight to vLLM (token ids) and through each hosted double: the qwen double shows
    exactly vLLM's tokens and log-probs as text and bytes; the foreign one re-cuts vLLM's text."""
    model = vllm_server.spec.served_model_name
    options = dict(messages=CASE, temperature=0.0, max_tokens=12, seed=0, logprobs=True, top_logprobs=3)
    direct = openai.OpenAI(base_url=vllm_server.base_url, api_key="EMPTY", max_retries=0).chat.completions.create(
        model=model, extra_body={"return_tokens_as_token_ids": True}, **options)
    want = entries(direct)
    pieces = QwenPieces(qwen_tokenizer)
    with hosted_teacher_server("qwen", upstream=vllm_server.base_url, model="qwen2.5-72b-instruct",
                               upstream_model=model, tokenizer=qwen_tokenizer) as server:
        hosted = client(server).chat.completions.create(model=server.model, **options)
        with pytest.raises(openai.BadRequestError):
            ask(server, 6)
    got = entries(hosted)
    assert hosted.model == "qwen2.5-72b-instruct" and hosted.choices[0].message.content == direct.choices[0].message.content
    assert len(got) == len(want) and hosted.usage.completion_tokens == direct.usage.completion_tokens
    for mine, theirs in zip(got, want):
        for a, b in [(mine, theirs), *zip(mine["top_logprobs"], theirs["top_logprobs"])]:
            text, raw = pieces.piece(int(b["token"].removeprefix("token_id:")))
            assert (a["token"], bytes(a["bytes"]), a["logprob"]) == (text, raw, b["logprob"])
    with hosted_teacher_server("foreign", upstream=vllm_server.base_url, upstream_model=model) as server:
        foreign = client(server).chat.completions.create(model=server.model, **options)
    # max_tokens counts the double's own tokens too: vLLM's text, cut again where it holds more foreign pieces
    stopped = direct.choices[0].finish_reason == "stop"        # the end entry only after the stop token
    expected = foreign_logprobs(direct.choices[0].message.content, 3, end_entry=stopped)[:12]
    assert entries(foreign) == expected and foreign.choices[0].message.content in (
        direct.choices[0].message.content, lossy(joined(expected)))
