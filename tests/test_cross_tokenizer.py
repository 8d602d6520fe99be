"""Soft labels across tokenizers (prep.stages.cross_tokenizer) and the ragged rows without filler.

- identity: a Qwen-tokenised teacher run through the foreign-tokenizer path gives the same-tokenizer rows and
  loss exactly (from hand-built responses, and end to end from the real vLLM-CPU teacher behind a hosted-API
  emulation);
- a real foreign tokenizer: a hand-written response whose tokens straddle Qwen's (JSON punctuation, a Chinese
  character split across two tokens) against a hand-computed expectation; end to end from the fault server's
  toy foreign tokenizer, checked against the alignment of the same entries;
- rows without filler: the stored rows are today's minus padding and constraint filler, and the loss on them
  equals today's loss with the filler turned into padding.
"""
import math
from pathlib import Path

import pytest
import torch

from custom_losses.kd.trainer import padded_topk
from prep.api.endpoint import ChatResult
from prep.prompts import load_prompts
from prep.records import Case
from prep.stages.cross_tokenizer import EXACT, MAPPED, TAIL, Misaligned, aligned_positions
from prep.stages.softlabel_rows import MASKED_LOGPROB, dataset_row, real_candidates
from prep.stages.softlabel_tokens import Position, VocabIndex, topk_row
from prep.stages.softlabels import SoftLabeller, validate_recipe
from tests.conftest import REPO_ROOT
from tests.test_softlabels import row_loss

RECIPE = REPO_ROOT / "recipes" / "softlabels" / "local-tiny-vllm.yaml"
IM_END, VOCAB = 151645, 152064
DEEPSEEK_END = "<｜end▁of▁sentence｜>".encode()


@pytest.fixture(scope="module")
def vocab(qwen_tokenizer):
    return VocabIndex(qwen_tokenizer, VOCAB)


def entry(raw: bytes, logprob: float, alternatives: list[tuple[bytes, float]]) -> dict:
    """A hosted API's logprob entry: the token's (lossily decoded) text, its exact bytes, its alternatives."""
    def one(piece: bytes, value: float) -> dict:
        return {"token": piece.decode("utf-8", "replace"), "bytes": list(piece), "logprob": value}

    return {**one(raw, logprob), "top_logprobs": [one(piece, value) for piece, value in alternatives]}


def lse(*values: float) -> float:
    return math.log(sum(math.exp(value) for value in values))


# ---- a foreign tokenizer, by hand --------------------------------------------------------------------------

ANSWER = '{"diseases":"肺炎"}'
# Qwen2.5: {" | d | ise | ases | ":" | 肺炎 | "} | <|im_end|>  (bytes 0-2, 2, 3-6, 6-10, 10-13, 13-19, 19-21)
# The teacher: {"d | ise | ase | s": | "\xe8 | \x82\xba炎 | "} | <｜end▁of▁sentence｜>
# ({"d straddles Qwen's {" and d; s": straddles ases and ":"; 肺 is split between "\xe8 and \x82\xba炎.)
FOREIGN = [
    entry(b'{"d', -0.1, [(b'{"d', -0.1), (b'{"', -2.5), (b"{", -3.0), (b"[", -4.0)]),
    entry(b"ise", -0.2, [(b"ise", -0.2), (b"is", -2.0), (b"ize", -3.0)]),
    entry(b"ase", -0.4, [(b"ase", -0.4), (b"ases", -1.5), (b"as", -3.0)]),
    entry(b's":', -0.05, [(b's":', -0.05), (b's"', -3.5), (b"s", -4.0), (b"es", -5.0)]),
    entry(b'"\xe8', -0.3, [(b'"\xe8', -0.3), (b'"\xe5', -1.6), (b'",', -2.2), (b'"', -3.1)]),
    entry(b"\x82\xba" + "炎".encode(), -0.5, [(b"\x82\xba" + "炎".encode(), -0.5)]),
    entry(b'"}', -0.01, [(b'"}', -0.01), (b'"', -5.0)]),
    entry(DEEPSEEK_END, -0.02, [(DEEPSEEK_END, -0.02), (b"\n", -4.5)]),
]


def test_a_foreign_teacher_is_aligned_as_computed_by_hand(vocab, qwen_tokenizer):
    """Each student position against the hand-computed rows (module docstring of prep.stages.cross_tokenizer)."""
    ids = qwen_tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [IM_END]
    assert ids == [4913, 67, 1064, 2264, 3252, 102749, 9207, IM_END]
    brace, bracket, is_, ize, as_, quote, comma, newline = 90, 58, 285, 551, 300, 1, 11, 198
    lead_e5 = vocab.exact_id(b"\xe5")          # the byte-level token of a lone lead byte
    positions, kinds = aligned_positions(FOREIGN, ANSWER, ids, vocab, {DEEPSEEK_END})
    z_s = lse(-0.05, -3.5, -4.0)               # s": s" s: the alternatives consistent with the written "s"
    z_q = lse(-0.3, -1.6, -2.2, -3.1)          # "\xe8 "\xe5 ", ": consistent with the written '"'
    expected = [
        # {": the teacher's {"d and its alternative {" are both the student's {" (summed); { and [ are tokens
        ([4913, brace, bracket], [lse(-0.1, -2.5), -3.0, -4.0], MAPPED),
        # d, inside {"d: only {"d and {" are consistent with the written {"; {" ends here (tail): d alone
        ([67], [-0.1 - lse(-0.1, -2.5)], TAIL),
        # ise: both tokenizers cut here and agree: exact
        ([1064, is_, ize], [-0.2, -2.0, -3.0], EXACT),
        # ases: the teacher's ase (chosen) and ases are both the student's ases
        ([2264, as_], [lse(-0.4, -1.5), -3.0], MAPPED),
        # ":" starts inside s": (written: s): s": -> ":", s" -> ", s ends here (tail), es is inconsistent
        ([3252, quote], [-0.05 - z_s, -3.5 - z_s], MAPPED),
        # 肺炎 starts inside "\xe8 (written: "): the chosen -> 肺炎, "\xe5 -> the byte \xe5, ", -> ",", " -> tail
        ([102749, lead_e5, comma], [-0.3 - z_q, -1.6 - z_q, -2.2 - z_q], MAPPED),
        ([9207, quote], [-0.01, -5.0], EXACT),
        # the end: DeepSeek's end token is <|im_end|>; a newline is a Qwen token
        ([IM_END, newline], [-0.02, -4.5], MAPPED),
    ]
    assert kinds == "".join(kind for _, _, kind in expected)
    for position, (want_ids, want_logprobs, _) in zip(positions, expected):
        assert position.ids == want_ids
        assert position.logprobs == pytest.approx(want_logprobs, abs=1e-12)
    assert [position.dropped for position in positions] == [0, 1, 0, 0, 1, 1, 0, 0]
    rows = [topk_row(position, target, 4) for position, target in zip(positions, ids)]
    assert rows[1] == ([67, -1, -1, -1], [round(-0.1 - lse(-0.1, -2.5), 5)] + [float("-inf")] * 3)


# The toy foreign tokenizer of prep.testing.hosted_teacher (foreign_logprobs(ANSWER_2, 4), log-probs as it gives them):
# ASCII in 3-byte pieces ({"r | eas | on" | :"), 天 (U+5929, % 5 == 0) split into its lead byte and the rest.
ANSWER_2 = '{"reason":"天热"}'
END_2 = [(DEEPSEEK_END, -0.6704), (b"\xe5", -1.4096), ("。".encode(), -2.1027), ("炎症".encode(), -2.7959)]
FOREIGN_2 = [
    entry(b'{"r', -0.7641, [(b'{"r', -0.7641), (b"{", -1.3201), (b'{"re', -2.0132), (b"\xe5", -2.7064)]),
    entry(b"eas", -0.8211, [(b"eas", -0.8211), (b"e", -1.2729), (b"easo", -1.966), (b"\x8b", -2.6592)]),
    entry(b'on"', -0.3283, [(b'on"', -0.3283), (b"o", -1.9666), (b'on":', -2.6598), (b"\xe5", -3.3529)]),
    entry(b':"', -0.4365, [(b':"', -0.4365), (b":", -1.7324), (b':"' + "天".encode(), -2.4256), (b"\x8b", -3.1187)]),
    entry(b"\xe5", -0.9121, [(b"\xe5", -0.9121), ("天".encode(), -1.2068), (b"1", -1.9), ("慢性".encode(), -2.5931)]),
    entry(b"\xa4\xa9", -0.2643, [(b"\xa4\xa9", -0.2643), (b"\xa4", -2.153), (b"\xa4\xa9" + "热".encode(), -2.8462),
                                (b"\x8b", -3.5393)]),
    entry("热".encode(), -0.4585, [("热".encode(), -0.4585), (b"\xe7", -1.6934), ('热"'.encode(), -2.3866),
                                  (b"\xe5", -3.0797)]),
    entry(b'"}', -0.4064, [(b'"}', -0.4064), (b'"', -1.79), (b'"}\n', -2.4831), (b"\x8b", -3.1763)]),
    entry(DEEPSEEK_END, -0.6704, END_2),
]


def test_a_split_character_and_straddling_json_as_computed_by_hand(vocab, qwen_tokenizer):
    """A second answer: the student's 天 starts at a teacher piece holding only its lead byte; its reason and ":"
    start inside the teacher's {"r and on"; merges on 天, 热 and {"; the toy server sends these very entries."""
    from prep.testing.hosted_teacher import foreign_logprobs

    sent = foreign_logprobs(ANSWER_2, 4)
    assert [bytes(item["bytes"]) for item in sent] == [bytes(item["bytes"]) for item in FOREIGN_2]
    assert [round(item["logprob"], 4) for item in sent] == [item["logprob"] for item in FOREIGN_2]
    ids = qwen_tokenizer(ANSWER_2, add_special_tokens=False)["input_ids"] + [IM_END]
    assert ids == [4913, 19895, 3252, 35727, 99259, 9207, IM_END]            # {" reason ":" 天 热 "} <|im_end|>
    re_, colon_quote, lead_e5, lead_e7, one, chronic, quote_nl, byte_8b = 265, 788, 161, 163, 16, 108044, 16707, 233
    z_0 = lse(-0.7641, -2.0132)          # {"r and {"re: what starts with the written {"
    z_2 = lse(-0.3283, -2.6598)          # on" and on": what starts with the written on
    expected = [
        ([4913, 90, lead_e5], [lse(-0.7641, -2.0132), -1.3201, -2.7064], MAPPED),   # {"re -> {" (merged)
        ([19895, re_], [-0.7641 - z_0, -2.0132 - z_0], MAPPED),                      # { and \xe5 inconsistent
        ([3252, colon_quote], [-0.3283 - z_2, -2.6598 - z_2], MAPPED),               # on": -> ":
        ([35727, one, chronic], [lse(-0.9121, -1.2068), -1.9, -2.5931], MAPPED),        # \xe5 (chosen) + 天 merged
        ([99259, lead_e7, lead_e5], [lse(-0.4585, -2.3866), -1.6934, -3.0797], MAPPED),   # 热" -> 热 merged
        ([9207, 1, quote_nl, byte_8b], [-0.4064, -1.79, -2.4831, -3.1763], EXACT),
        ([IM_END, lead_e5, 1773, 110819], [-0.6704, -1.4096, -2.1027, -2.7959], MAPPED),
    ]
    positions, kinds = aligned_positions(FOREIGN_2, ANSWER_2, ids, vocab, {DEEPSEEK_END})
    assert kinds == "".join(kind for _, _, kind in expected)
    for position, (want_ids, want_logprobs, _) in zip(positions, expected):
        assert position.ids == want_ids
        assert position.logprobs == pytest.approx(want_logprobs, abs=1e-12)


def test_misaligned_tokens_and_a_missing_end_entry(vocab, qwen_tokenizer):
    """Tokens that spell other text are refused with the byte where they differ; without an end-of-turn entry the
    <|im_end|> position has no soft label (kind t, CE only)."""
    ids = qwen_tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [IM_END]
    wrong = [dict(FOREIGN[0]), *FOREIGN[1:]]
    wrong[0] = entry(b'{"D', -0.1, [])
    with pytest.raises(Misaligned, match="from byte 2"):
        aligned_positions(wrong, ANSWER, ids, vocab, {DEEPSEEK_END})
    positions, kinds = aligned_positions(FOREIGN[:-1], ANSWER, ids, vocab, {DEEPSEEK_END})
    assert kinds[-1] == TAIL and positions[-1].ids == [] and topk_row(positions[-1], IM_END, 3)[0] == [-1, -1, -1]
    with pytest.raises(Misaligned, match="not one end-of-turn token"):
        aligned_positions([*FOREIGN[:-1], entry(b"</end>", -0.1, [])], ANSWER, ids, vocab, {DEEPSEEK_END})


# ---- identity: a Qwen-tokenised teacher through the foreign path ---------------------------------------------

def qwen_response(text: str, tokenizer, vocab: VocabIndex, k: int, seed: int) -> ChatResult:
    """A hosted Qwen teacher's answer to TEXT: its Qwen tokens (bytes), <|im_end|>, and k distinct Qwen-token
    alternatives each, the chosen one among them (sorted, deterministic log-probs)."""
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [IM_END]
    content = []
    for token_id in ids:
        others = torch.randint(0, 151643, (4 * k,), generator=generator).tolist()
        alternatives = [token_id] + [other for other in dict.fromkeys(others) if other != token_id][: k - 1]
        logprobs = sorted((-float(torch.rand(1, generator=generator)) * 6 for _ in alternatives), reverse=True)
        content.append(entry(vocab.bytes_of(token_id), logprobs[0],
                             [(vocab.bytes_of(alt), lp) for alt, lp in zip(alternatives, logprobs)]))
    return ChatResult(text=text, finish_reason="stop", usage={}, logprobs=content, retries=0, response={})


ANSWERS = ['{"reason":"发热3天，咳嗽、咳痰；听诊湿啰音","diseases":"社区获得性肺炎"}',
           '{"reason":"血糖升高，口渴多饮（2型）","diseases":"2型糖尿病,高血压病"}',
           '{"reason":"头痛伴恶心 怕光、畏声","diseases":"偏头痛"}']


@pytest.mark.parametrize("text", ANSWERS)
def test_a_qwen_teacher_through_the_foreign_path_gives_the_same_rows_and_loss(text, vocab, qwen_tokenizer):
    """The same response through both paths: identical rows, every position exact, identical loss."""
    settings = ["server=null", "softlabels.return_tokens_as_token_ids=false"]
    same = validate_recipe(RECIPE, overrides=settings)
    foreign = validate_recipe(RECIPE, overrides=[*settings, "softlabels.teacher_tokenizer=foreign"])
    prompts, case = load_prompts(), Case(id=7, feature_content="患者，男，45岁，发热三天。")
    result = qwen_response(text, qwen_tokenizer, vocab, 20, seed=len(text))
    rows = {name: SoftLabeller(recipe, prompts, "m", qwen_tokenizer).row_from_chat(case, result)
            for name, recipe in (("same", same), ("foreign", foreign))}
    assert rows["same"]["status"] == rows["foreign"]["status"] == "ok"
    for key in ("answer_token_ids", "target_token_ids", "logprobs", "dropped", "chosen_end"):
        assert rows["same"][key] == rows["foreign"][key], key
    assert set(rows["foreign"]["target_kinds"]) == {EXACT}
    losses = [row_loss(dataset_row(rows[name], [], same.softlabels)) for name in ("same", "foreign")]
    assert losses[0] == losses[1]


# ---- rows without filler -------------------------------------------------------------------------------------

def test_rows_keep_only_real_candidates_and_the_loss_is_todays_with_filler_as_padding():
    """A constrained position (2 allowed tokens, 3 forbidden at -9999, 1 pad): the row keeps the 2; the loss
    on the ragged row equals the loss on today's padded row with the filler turned into padding; under
    renormalisation the student's logits of the filler ids get no gradient any more, and under the tail bucket
    their mass is what the bucket penalises."""
    assert real_candidates([5, 9, 11, 12, 13, -1], [-0.1, -2.4, -9999.0, -9999.0, -9999.0, None], -50.0) == \
        ([5, 9], [-0.1, -2.4])
    assert real_candidates([5, 9], [-0.1, -70.0], -50.0) == ([5, 9], [-0.1, -50.0])   # a real, tiny one: floored
    cache_row = {"id": 1, "model": "m", "source": "chat", "answer_token_ids": [5, IM_END],
                 "target_token_ids": [[5, 9, 11, 12, 13, -1], [IM_END, 198, 11, -1, -1, -1]],
                 "logprobs": [[-0.1, -2.4, -9999.0, -9999.0, -9999.0, None], [-0.01, -4.6, -9999.0, None, None, None]]}
    settings = validate_recipe(RECIPE, overrides=["server=null"]).softlabels
    row = dataset_row(cache_row, [], settings)
    assert row["target_token_ids"] == [[5, 9], [IM_END, 198]] and row["target_kinds"] == "ee"
    today = {**row, "target_token_ids": [[5, 9, 11, 12, 13], [IM_END, 198, 11]],
             "logprobs": [[-0.1, -2.4, -50.0, -50.0, -50.0], [-0.01, -4.6, -50.0]]}
    as_padding = {**row, "target_token_ids": [[5, 9, -1, -1, -1], [IM_END, 198, -1]],
                  "logprobs": [[-0.1, -2.4, 0.0, 0.0, 0.0], [-0.01, -4.6, 0.0]]}
    for support in ("renorm", "tail"):
        assert row_loss(row, support) == row_loss(as_padding, support)
    changed = abs(float(row_loss(row, "renorm") - row_loss(today, "renorm")))
    assert changed > 0          # the filler ids were part of the renormalised support: not any more
    assert float(row_loss(row, "tail")) == pytest.approx(float(row_loss(today, "tail")), abs=1e-6)


def test_the_collator_pads_ragged_rows_to_k():
    ids, logprobs = padded_topk([[5, 9], [], [7]], [[-0.1, -2.4], [], [-0.3]], 3)
    assert ids.tolist() == [[5, 9, -1], [-1, -1, -1], [7, -1, -1]]
    assert logprobs.flatten().tolist() == pytest.approx([-0.1, -2.4, 0.0, 0.0, 0.0, 0.0, -0.3, 0.0, 0.0])


def test_masked_logprob_is_below_any_real_log_prob():
    assert MASKED_LOGPROB < -100 < -50


def test_a_foreign_recipe_validates_and_refuses_token_ids(tmp_path: Path):
    recipe = validate_recipe(RECIPE, overrides=["server=null", "softlabels.return_tokens_as_token_ids=false",
                                                "softlabels.teacher_tokenizer=foreign"])
    assert recipe.softlabels.teacher_tokenizer == "foreign"
    from prep.config import RecipeError

    with pytest.raises(RecipeError, match="return_tokens_as_token_ids"):
        validate_recipe(RECIPE, overrides=["server=null", "softlabels.teacher_tokenizer=foreign"])
    with pytest.raises(RecipeError, match="teacher_tokenizer"):
        validate_recipe(RECIPE, overrides=["server=null", "softlabels.teacher_tokenizer=deepseek"])


def test_position_type_is_shared():
    assert Position(1, -0.1, "", [1], [-0.1]).dropped == 0


# ---- end to end: the stage against hosted-API emulations (prep.testing.hosted_teacher) ------------------------

def hosted_args(out: Path, server, *extra: str, limit: int = 6) -> list[str]:
    """launch.softlabels pointed at a hosted-style endpoint: tokens read by their bytes, one request at a time
    (so a seeded sample is the same whichever run asks it)."""
    from tests.test_softlabels import softlabel_args

    return [*softlabel_args(out, server.base_url, server.model, "--limit", str(limit)),
            "--set", "softlabels.return_tokens_as_token_ids=false", "--set", "client.concurrency=1", *extra]


def dataset_rows(out: Path) -> dict[int, dict]:
    from tests.test_softlabels import all_rows

    return {row["id"]: row for row in all_rows(out)}


@pytest.fixture(scope="module")
def hosted_qwen(vllm_server, qwen_tokenizer):
    """DashScope-like: the real tiny teacher's answers and log-probs, as Qwen tokens' text and bytes, top_logprobs
    capped at 5, no /v1/completions."""
    from prep.testing.hosted_teacher import hosted_teacher_server

    with hosted_teacher_server("qwen", 5, vllm_server.base_url, tokenizer=qwen_tokenizer,
                               upstream_model=vllm_server.spec.served_model_name) as server:
        yield server


@pytest.fixture(scope="module")
def hosted_runs(hosted_qwen, vllm_server, tmp_path_factory):
    """Top-5 soft labels for 6 cases three ways: from vLLM directly (token ids), and from the hosted emulation
    through the same-tokenizer path and the foreign path (forced)."""
    from launch.softlabels import main
    from tests.test_softlabels import softlabel_args

    root = tmp_path_factory.mktemp("hosted")
    assert main([*softlabel_args(root / "vllm", vllm_server.base_url, vllm_server.spec.served_model_name,
                                 "--limit", "6"), "--set", "softlabels.top_k=5", "--set", "client.concurrency=1"]) == 0
    assert main(hosted_args(root / "same", hosted_qwen, "--set", "softlabels.top_k=5")) == 0
    assert main(hosted_args(root / "foreign", hosted_qwen, "--set", "softlabels.top_k=5",
                            "--set", "softlabels.teacher_tokenizer=foreign")) == 0
    return root


@pytest.mark.vllm
def test_identity_end_to_end_a_qwen_teacher_through_the_foreign_path(hosted_runs):
    """The real tiny teacher behind the hosted emulation: the foreign path's rows equal the same-tokenizer path's,
    which equal vLLM's own token-id rows, every position exact, and the loss is the same."""
    from tests.test_softlabels import summary

    runs = {name: dataset_rows(hosted_runs / name) for name in ("vllm", "same", "foreign")}
    assert len(runs["same"]) == 6 and set(runs["same"]) == set(runs["foreign"]) == set(runs["vllm"])
    for case_id, row in runs["foreign"].items():
        for other in ("same", "vllm"):
            for key in ("messages", "answer_token_ids", "target_token_ids", "logprobs"):
                assert row[key] == runs[other][case_id][key], (case_id, other, key)
        assert set(row["target_kinds"]) == {EXACT}
        assert row_loss(row) == row_loss(runs["same"][case_id]) == row_loss(runs["vllm"][case_id])
    stats = summary(hosted_runs / "foreign")
    assert stats["teacher_tokenizer"] == "foreign" and stats["positions"]["mapped"] == stats["positions"]["tail"] == 0
    assert stats["dropped_alternatives"] == summary(hosted_runs / "same")["dropped_alternatives"] == 0


def test_a_foreign_teacher_end_to_end_matches_the_alignment_of_its_entries(tmp_path, vocab, qwen_tokenizer):
    """DeepSeek-like (toy foreign tokenizer, Chinese answers, top-20): the stage's rows are the alignment of the
    entries the server sent, its answer tokens are Qwen's of the same text, and every kind of position occurs."""
    from launch.softlabels import main
    from prep.testing.hosted_teacher import foreign_logprobs, hosted_teacher_server
    from tests.test_softlabels import summary

    with hosted_teacher_server("foreign") as server:
        assert main(hosted_args(tmp_path / "run", server, "--set", "softlabels.teacher_tokenizer=foreign",
                                "--set", "structured_output.kind=json_object", limit=8)) == 0
    rows, settings = dataset_rows(tmp_path / "run"), validate_recipe(RECIPE, overrides=["server=null"]).softlabels
    assert len(rows) == 8
    kinds = ""
    for row in rows.values():
        text = row["messages"][-1]["content"]
        ids = qwen_tokenizer(text, add_special_tokens=False)["input_ids"] + [IM_END]
        assert row["answer_token_ids"] == ids and not text.isascii()
        positions, expected_kinds = aligned_positions(foreign_logprobs(text, 20), text, ids, vocab,
                                                      {DEEPSEEK_END})
        expected = [real_candidates(*topk_row(position, target, 20), settings.logprob_floor)
                    for position, target in zip(positions, ids)]
        assert row["target_token_ids"] == [candidate_ids for candidate_ids, _ in expected]
        for (_, want), got in zip(expected, row["logprobs"]):
            assert got == pytest.approx(want, abs=1e-5)
        assert row["target_kinds"] == expected_kinds
        kinds += expected_kinds
    assert {EXACT, MAPPED, TAIL} <= set(kinds)
    stats = summary(tmp_path / "run")
    assert stats["positions"] == {"exact": kinds.count(EXACT), "mapped": kinds.count(MAPPED),
                                  "tail": kinds.count(TAIL)}
    print("foreign teacher positions:", stats["positions"])


def test_a_qwen_tokenizer_run_against_a_foreign_teacher_stops_after_the_probe(tmp_path, capsys):
    """teacher_tokenizer: same (the default) against a foreign endpoint: one probe, one sentence naming the key."""
    from launch.softlabels import main
    from prep.testing.hosted_teacher import hosted_teacher_server

    with hosted_teacher_server("foreign") as server:
        code = main(hosted_args(tmp_path / "run", server))
        received = server.received
    err = capsys.readouterr().err
    assert code == 2 and "softlabels.teacher_tokenizer: foreign" in err and err.count("\n") == 1, err
    assert received == 1


def test_a_foreign_teacher_cannot_score_given_answers(tmp_path, capsys):
    from launch.softlabels import main
    from prep.testing.hosted_teacher import hosted_teacher_server

    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"id": 1, "reason": "发热", "diseases": "肺炎"}\n', encoding="utf-8")
    with hosted_teacher_server("foreign") as server:
        code = main([*hosted_args(tmp_path / "run", server, "--set", "softlabels.teacher_tokenizer=foreign"),
                     "--answers", str(answers)])
        received = server.received
    err = capsys.readouterr().err
    assert code == 2 and "teacher_tokenizer" in err and "--answers" in err and received == 0, err


def test_fresh_samples_take_stage_ones_split_and_agreement(tmp_path):
    """--split-from: the ids the teacher's answers hold out are the validation split of fresh soft labels, and each
    row carries its case's agreement (what case_weight: agreement weighs), whichever answer was sampled now."""
    from launch.softlabels import main
    from prep.records import read_cases
    from prep.testing.hosted_teacher import hosted_teacher_server
    from tests.conftest import SAMPLE_CASES

    ids = [case.id for case in read_cases(SAMPLE_CASES).cases[:6]]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(
        f'{{"id": {case_id}, "reason": "r", "diseases": "d", "agreement": {0.5 if i % 2 else 1.0}, '
        f'"split": "{"valid" if i in (1, 4) else "train"}"}}\n' for i, case_id in enumerate(ids)), encoding="utf-8")
    with hosted_teacher_server("qwen") as server:
        assert main([*hosted_args(tmp_path / "run", server, "--set", "softlabels.top_k=5"),
                     "--split-from", str(answers)]) == 0
    from datasets import load_from_disk

    dataset = load_from_disk(str(tmp_path / "run" / "dataset"))
    assert sorted(dataset["validation"]["id"]) == sorted([ids[1], ids[4]])
    agreement = {row["id"]: row["agreement"] for split in dataset.values() for row in split}
    assert agreement == {case_id: 0.5 if i % 2 else 1.0 for i, case_id in enumerate(ids)}


@pytest.mark.slow
@pytest.mark.vllm
def test_a_distill_run_on_a_hosted_top5_teacher(hosted_runs, tmp_path):
    """Stage two on the DashScope-like endpoint's ragged top-5 rows (the tiny student, the CPU overlay, the tail
    bucket that small k needs): it trains and every step logs a finite KD and CE term."""
    import json
    import subprocess

    from tests.test_distill import distill_command

    output = tmp_path / "distill"
    command = distill_command(hosted_runs / "same", output, "max_steps=4", "save_steps=100", "kd_support=tail")
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads(next(output.rglob("trainer_state.json")).read_text())
    steps = [entry for entry in state["log_history"] if "kd_loss" in entry]
    assert [entry["step"] for entry in steps] == list(range(1, 5))
    assert all(math.isfinite(entry["kd_loss"]) and math.isfinite(entry["ce_loss"]) for entry in steps)
    print("hosted top-5, tail bucket:", [(entry["step"], round(entry["kd_loss"], 3), round(entry["ce_loss"], 3))
                                         for entry in steps])
