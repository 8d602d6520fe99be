"""The known teacher (prep.testing.known_teacher): what it serves is recomputed here by brute force over its
candidate answers with the tokenizer; its samples follow the stated probabilities; our real teacher and
soft-label stages run against it unchanged."""
from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path

import pytest

from prep.answers import parse_answer
from prep.paths import REPO_ROOT
from prep.prompts import load_prompts
from prep.qwen import IM_END_ID
from prep.records import Case, read_cases
from prep.testing.known_teacher import FLOOR_LOGPROB, FindingsTable, known_teacher_server
from prep.tokenizer import chat_token_ids, load_tokenizer

REAL_CASES = REPO_ROOT.parent / "shared" / "data" / "healthai2025" / "camp_data_step_1_without_answer.jsonl"
PROMPTS = load_prompts(REPO_ROOT / "data/known_teacher/system.txt", REPO_ROOT / "data/known_teacher/user.txt")
HAND_CASES = [
    Case(id=90001, feature_content="性别: 男\n年龄: 30\n主诉: 咳嗽3天\n现病史: 咳白痰"),     # three candidates
    Case(id=90002, feature_content="性别: 女\n年龄: 52\n主诉: 发现血糖升高5年\n现病史: 口干"),  # two
    Case(id=90003, feature_content="性别: 女\n年龄: 8\n主诉: 体检\n现病史: 无不适"),            # the fallback
]


def some_cases(count: int = 6) -> list[Case]:
    """The hand-written cases, and real step-one cases of distinct rules when the shared data is present."""
    if not REAL_CASES.exists():
        return HAND_CASES
    table, seen, picked = FindingsTable(), set(), []
    for case in read_cases(REAL_CASES).cases:
        rule = table.matched(case.feature_content)
        if rule is not None and rule.finding not in seen:
            seen.add(rule.finding)
            picked.append(case)
        if len(picked) == count:
            break
    return HAND_CASES + picked


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer):
    with known_teacher_server(tokenizer) as running:
        yield running


def post(server, path: str, body: dict) -> dict:
    request = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def brute_force(tokenizer, case: Case) -> list[tuple[list[int], float]]:
    """Each candidate's token ids (the answer JSON, then <|im_end|>) and probability, from the table's answers."""
    return [(tokenizer(answer.to_json(), add_special_tokens=False)["input_ids"] + [IM_END_ID], p)
            for answer, p in FindingsTable().answers(PROMPTS.user(case))]


def expected_next(candidates: list[tuple[list[int], float]], prefix: list[int]) -> dict[int, float]:
    """log P(next token | answer prefix): the mass of candidates with prefix + token over those with prefix."""
    below = sum(p for ids, p in candidates if ids[:len(prefix)] == prefix and len(ids) > len(prefix))
    out = {}
    for token in {ids[len(prefix)] for ids, _ in candidates if ids[:len(prefix)] == prefix and len(ids) > len(prefix)}:
        out[token] = math.log(sum(p for ids, p in candidates if ids[:len(prefix) + 1] == prefix + [token]) / below)
    return out


def test_the_table_is_small_and_matches_chief_complaints():
    table = FindingsTable()
    assert 8 <= len(table.diseases) <= 20
    assert table.top_disease("主诉: 咳嗽3天") == "急性支气管炎"
    assert table.top_disease("主诉: 外阴瘙痒1周") == "阴道炎"        # the first rule in table order wins
    assert table.matched("主诉: 体检") is None and table.rule("主诉: 体检") is table.fallback
    for answer, _ in table.answers("主诉: 咽痛2天"):
        assert parse_answer(answer.to_json()) == answer and "咽痛" in answer.reason


def test_prompt_logprobs_of_each_candidate_are_the_brute_force_marginals(server, tokenizer):
    for case in some_cases():
        candidates = brute_force(tokenizer, case)
        for answer_ids, probability in candidates:
            text = tokenizer.decode(answer_ids[:-1])
            ids = chat_token_ids(tokenizer, PROMPTS.messages(case) + [{"role": "assistant", "content": text}])
            start = len(chat_token_ids(tokenizer, PROMPTS.messages(case), add_generation_prompt=True))
            rows = post(server, "/completions", {"model": "known-teacher", "prompt": ids, "max_tokens": 1,
                                                 "prompt_logprobs": 5})["choices"][0]["prompt_logprobs"]
            assert len(rows) == len(ids) and rows[0] is None
            total = 0.0
            for offset, token in enumerate(answer_ids):
                row = {int(key): value["logprob"] for key, value in rows[start + offset].items()}
                want = expected_next(candidates, answer_ids[:offset])
                assert {t: lp for t, lp in row.items() if lp > FLOOR_LOGPROB} == pytest.approx(want, abs=1e-9)
                assert len(row) >= 5
                total += row[token]
            assert total == pytest.approx(math.log(probability), abs=1e-9)       # the chain rule gives p back
            assert all(rows[i][str(ids[i])]["logprob"] == 0.0 for i in range(1, start))   # the prompt: certain


def test_chat_logprobs_are_the_brute_force_marginals_of_the_sampled_answer(server, tokenizer):
    for case in some_cases(3):
        candidates = brute_force(tokenizer, case)
        for seed in range(3):
            body = post(server, "/chat/completions", {
                "model": "known-teacher", "messages": PROMPTS.messages(case), "seed": seed, "logprobs": True,
                "top_logprobs": 4, "return_tokens_as_token_ids": True})
            choice = body["choices"][0]
            content = choice["logprobs"]["content"]
            chosen = [int(entry["token"].removeprefix("token_id:")) for entry in content]
            assert chosen in [ids for ids, _ in candidates] and chosen[-1] == IM_END_ID
            assert tokenizer.decode(chosen[:-1]) == choice["message"]["content"]
            for offset, entry in enumerate(content):
                want = expected_next(candidates, chosen[:offset])
                top = {int(t["token"].removeprefix("token_id:")): t["logprob"] for t in entry["top_logprobs"]}
                assert len(top) == 4 and entry["logprob"] == pytest.approx(want[chosen[offset]], abs=1e-9)
                assert {t: lp for t, lp in top.items() if lp > FLOOR_LOGPROB} == pytest.approx(want, abs=1e-9)
            # each token's bytes (byte pieces of one character included) make the answer's UTF-8
            assert b"".join(bytes(entry["bytes"]) for entry in content[:-1]).decode() == choice["message"]["content"]


def test_samples_follow_the_stated_probabilities(server, tokenizer):
    teacher, case_text = server.teacher, PROMPTS.user(HAND_CASES[0])
    draws = 6000
    counts = {}
    for seed in range(draws):
        disease = teacher.choose(case_text, seed, 1.0).disease
        counts[disease] = counts.get(disease, 0) + 1
    for answer, p in FindingsTable().answers(case_text):
        # 4 standard errors of a binomial share: a false alarm about once in 16,000 runs
        assert abs(counts[answer.diseases] / draws - p) < 4 * math.sqrt(p * (1 - p) / draws)
    ask = lambda seed, temperature=1.0: post(server, "/chat/completions", {  # noqa: E731
        "model": "known-teacher", "messages": PROMPTS.messages(HAND_CASES[0]), "seed": seed,
        "temperature": temperature})["choices"][0]["message"]["content"]
    assert ask(7) == ask(7) == teacher.choose(case_text, 7, 1.0).text          # the seed fixes the draw
    assert {parse_answer(ask(seed, 0.0)).diseases for seed in range(3)} == {"急性支气管炎"}   # greedy: the mode
    assert len({ask(seed) for seed in range(30)}) == 3


@pytest.mark.integration
def test_our_teacher_and_softlabel_stages_run_against_it(server, tokenizer, tmp_path: Path):
    from datasets import load_from_disk

    from prep.stages.softlabels import SoftLabelStage
    from prep.stages.teacher import TeacherStage

    cases = some_cases()
    case_file = tmp_path / "cases.jsonl"
    case_file.write_text("".join(json.dumps({"id": c.id, "feature_content": c.feature_content}, ensure_ascii=False)
                                 + "\n" for c in cases), encoding="utf-8")
    url = [f"client.base_url={server.base_url}"]
    teacher = TeacherStage.from_files(REPO_ROOT / "recipes/teacher/known-teacher.yaml", case_file,
                                      overrides=url).run(tmp_path / "teacher", progress=False)
    assert teacher["answered"] == len(cases) and teacher["rejected"] == 0
    by_id = {c.id: c for c in cases}
    for mode, extra in (("score", {"answers": tmp_path / "teacher"}), ("generate", {})):
        out = tmp_path / f"softlabels-{mode}"
        summary = SoftLabelStage.from_files(REPO_ROOT / "recipes/softlabels/known-teacher.yaml", case_file,
                                            overrides=url, **extra).run(out, progress=False)
        assert summary["mode"] == mode and summary["rejected"] == 0 and summary["answered"] == len(cases), summary
        dataset = load_from_disk(str(out / "dataset"))
        rows = list(dataset["train"]) + list(dataset["validation"])
        assert len(rows) == len(cases)
        for row in rows:
            candidates = brute_force(tokenizer, by_id[row["id"]])
            answer = row["answer_token_ids"]
            assert answer in [ids for ids, _ in candidates]
            for offset, (ids, logprobs) in enumerate(zip(row["target_token_ids"], row["logprobs"])):
                want = expected_next(candidates, answer[:offset])
                got = {t: lp for t, lp in zip(ids, logprobs) if t >= 0 and lp > -50}
                assert got == pytest.approx(want, abs=1e-5)


def test_the_fault_server_command_serves_it(tokenizer):
    from launch.fault_server import build

    server = build(["--known-teacher", "--latency", "0"])
    assert server.model == "known-teacher" and server.teacher.table.rules
    assert build(["--model", "x"]).model == "x" and build([]).body_fn is None


def test_the_learning_benchmark_keeps_matched_cases_cut_to_the_chief_complaint(tmp_path: Path):
    from custom_losses.checks.learning_bench import CHIEF_COMPLAINT_CHARS, report, short_cases

    cases = tmp_path / "cases.jsonl"
    rows = [{"id": c.id, "feature_content": c.feature_content} for c in HAND_CASES]
    rows.append({"id": 4, "feature_content": "主诉: " + "无特殊" * 30 + "咳嗽"})     # its term lies past the cut
    cases.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    kept = short_cases(cases, FindingsTable())
    assert [(c.id, c.feature_content) for c in kept] == [(90001, "主诉: 咳嗽3天"), (90002, "主诉: 发现血糖升高5年")]
    assert all(len(c.feature_content) <= CHIEF_COMPLAINT_CHARS + 4 for c in kept)
    figures = {"cases": 2, "held_out": 1, "majority_class": 1.0, "stage_two_steps": 5, "wall_s": 1.0, "seeds": 3,
               "accuracy": {"base": [0.0], "stage1": [0.5], "sft_more": [0.5, 0.7, 0.6], "kd": [0.6, 0.8, 0.7],
                            "kd_tail": [0.7], "kd_weighted": [0.6]},
               "mean": {"base": 0.0, "stage1": 0.5, "sft_more": 0.6, "kd": 0.7, "kd_tail": 0.7, "kd_weighted": 0.6},
               "spread": {"base": 0.0, "stage1": 0.0, "sft_more": 0.2, "kd": 0.2, "kd_tail": 0.0, "kd_weighted": 0.0}}
    assert report(figures)[-1] == ("acc_base=0.000 acc_stage1=0.500 acc_sft_more=0.600 acc_kd=0.700 acc_kd_tail=0.700 "
                                   "acc_kd_weighted=0.600 seeds=3")
