"""Soft labels in Axolotl 0.19's KD plugin, measured with its own code (strategy, loader, collator, trainer loss,
fused kernel) on the tiny model: what its offline chat-template path does with rows aligned to their tokens, and
that prep.stages.axolotl_export's rows give exactly our loss."""
import math
import types

import pytest
import torch

from custom_losses.kd.kd_loss import KDLossConfig, weighted_topk_kd_loss
from custom_losses.kd.trainer import padded_topk
from prep.answers import Answer, answer_json
from prep.prompts import load_prompts
from prep.qwen import IM_END_ID, NEWLINE_ID
from prep.records import read_cases
from prep.stages.axolotl_export import axolotl_row, renormalised, save_axolotl_dataset
from prep.stages.softlabel_rows import dataset_row
from prep.stages.softlabels import SoftLabelSettings
from prep.tokenizer import chat_token_ids
from tests.conftest import SAMPLE_CASES

K = 8
ANSWERS = [Answer("1. 咽痛发热三天；2. 扁桃体Ⅱ度肿大。", "急性化脓性扁桃体炎"),
           Answer("1. 活动后胸闷；2. ST段压低。", "1. 冠心病；2. 稳定型心绞痛")]


@pytest.fixture(scope="module")
def student(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)


def teacher_rows(tokenizer, count: int = 2, seed: int = 0) -> list[dict]:
    """dataset/ rows (prep.stages.softlabel_rows.dataset_row) from a synthetic teacher: top-k sorted, the answer token
    among them, a spread of confident and uncertain positions."""
    generator = torch.Generator().manual_seed(seed)
    prompts, cases = load_prompts(), read_cases(SAMPLE_CASES).cases
    rows = []
    for case, answer in zip(cases[:count], ANSWERS * count):
        text = answer_json(answer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [IM_END_ID]
        topk = torch.randint(0, 150000, (len(ids), K), generator=generator)
        topk[:, 0] = torch.tensor(ids)
        logits = torch.randn(len(ids), K, generator=generator) * 2 + 4 * torch.rand(len(ids), 1, generator=generator)
        logits[:, 0] += 3.0
        logprobs, order = torch.log_softmax(logits, -1).sort(-1, descending=True)
        cache_row = {"id": case.id, "answer_token_ids": ids, "target_token_ids": topk.gather(1, order).tolist(),
                     "logprobs": logprobs.tolist(), "model": "synthetic", "source": "chat", "sampling_temperature": 1.0}
        messages = prompts.messages(case) + [{"role": "assistant", "content": text}]
        rows.append(dataset_row(cache_row, messages, SoftLabelSettings(top_k=K)))
    return rows


def axolotl_kd_loss(model, tokenizer, features: list[dict], temperature: float = 1.0, alpha: float = 1.0):
    """Axolotl's collator, then AxolotlKDTrainer.compute_loss with the fused kernel it builds (kd_alpha=alpha,
    kd_ce_alpha=1-alpha, kd_beta=0, kd_normalize_topk=true; compiled=False: the same math without inductor)."""
    from axolotl.integrations.kd.collator import DataCollatorForKD
    from axolotl.integrations.kd.kernels.liger import LigerFusedLinearKLTopKLogprobLoss
    from axolotl.integrations.kd.trainer import AxolotlKDTrainer

    batch = DataCollatorForKD(tokenizer=tokenizer, return_tensors="pt")([dict(f) for f in features])
    trainer = types.SimpleNamespace(_kd_loss_fn=LigerFusedLinearKLTopKLogprobLoss(
        1.0 - alpha, alpha, temperature, 0.0, compute_ce_loss=alpha < 1.0, normalize_topk=True, compiled=False))
    model.zero_grad()
    loss = AxolotlKDTrainer.compute_loss(trainer, model, dict(batch))
    loss.backward()
    return loss.item(), gradients(model)


def our_kd_loss(model, tokenizer, rows: list[dict], temperature: float = 1.0, alpha: float = 1.0,
                offset: int = 1):
    """custom_losses.kd.kd_loss on our rows, uniform weights: answer token j's row on the hidden state at
    start - OFFSET + j (OFFSET 1: the position that predicts it, as custom_losses.kd.trainer does)."""
    model.zero_grad()
    hidden, targets, ids, logprobs = [], [], [], []
    for row in rows:
        prompt = chat_token_ids(tokenizer, row["messages"][:-1], add_generation_prompt=True)
        answer = row["answer_token_ids"]
        states = model(input_ids=torch.tensor([prompt + answer]), output_hidden_states=True).hidden_states[-1][0]
        start = len(prompt) - offset
        hidden.append(states[start:start + len(answer)])
        targets.append(torch.tensor(answer))
        width = int(row.get("k") or max(len(position) for position in row["target_token_ids"]))
        padded_ids, padded_logprobs = padded_topk(row["target_token_ids"][:len(answer)], row["logprobs"][:len(answer)],
                                                  width)
        ids.append(padded_ids)
        logprobs.append(padded_logprobs)
    config = KDLossConfig(alpha=alpha, temperature=temperature, divergence="forward_kl", support="renorm")
    target = torch.cat(targets)
    loss, _ = weighted_topk_kd_loss(torch.cat(hidden), model.lm_head.weight, target, torch.cat(ids),
                                    torch.cat(logprobs), torch.ones(len(target)), config)
    loss.backward()
    return loss.item(), gradients(model)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def relative_error(ours: dict, theirs: dict, scale: float = 1.0) -> float:
    assert ours.keys() == theirs.keys()
    return max(((theirs[name] * scale - ours[name]).norm() / ours[name].norm()).item() for name in ours)


@pytest.mark.integration
def test_axolotl_offline_kd_trains_each_position_toward_its_own_tokens_row(student, qwen_tokenizer):
    """Rows right-aligned to the tokens they describe (our dataset/ rows plus the old filler for the template's
    trailing newline), through Axolotl's chat-template KD strategy: its loss and gradients are exactly ours with
    the hidden state AT token t paired with token t's distribution, not the one before it that predicts it."""
    from axolotl.integrations.kd.chat_template import load as load_kd_strategy
    from axolotl.utils.dict import DictDefault

    strategy = load_kd_strategy(qwen_tokenizer, DictDefault({"chat_template": "tokenizer_default", "sequence_len": 4096,
                                                             "train_on_inputs": False}),
                                {"type": "axolotl.integrations.kd.chat_template", "field_messages": "messages",
                                 "logprobs_field": "logprobs", "temperature": 1.0})
    rows, features = teacher_rows(qwen_tokenizer), []
    for row in rows:
        aligned = {"messages": row["messages"],
                   "target_token_ids": row["target_token_ids"] + [[NEWLINE_ID] + list(range(K - 1))],
                   "logprobs": row["logprobs"] + [[0.0] + [-50.0] * (K - 1)]}
        sample = strategy.tokenize_prompt(aligned)
        start = len(sample["input_ids"]) - len(row["answer_token_ids"]) - 1
        assert sample["input_ids"][start:] == row["answer_token_ids"] + [NEWLINE_ID]
        assert sample["target_token_ids"][start:-1] == row["target_token_ids"]      # row t on token t
        features.append({name: sample[name] for name in ("input_ids", "attention_mask", "labels",
                                                         "target_token_ids", "target_logprobs", "target_mask")})
    axolotl_loss, axolotl_grads = axolotl_kd_loss(student, qwen_tokenizer, features)
    right_loss, right_grads = our_kd_loss(student, qwen_tokenizer, rows, offset=1)
    wrong_loss, wrong_grads = our_kd_loss(student, qwen_tokenizer, rows, offset=0)
    print(f"Axolotl chat-template KD {axolotl_loss:.6f}; ours {right_loss:.6f}; ours one position late {wrong_loss:.6f}")
    assert axolotl_loss == pytest.approx(wrong_loss, rel=1e-5) and relative_error(wrong_grads, axolotl_grads) < 1e-4
    assert abs(axolotl_loss - right_loss) > 1e-3 and relative_error(right_grads, axolotl_grads) > 0.1


@pytest.mark.integration
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_the_export_gives_axolotls_loss_our_loss_and_gradients(student, qwen_tokenizer, tmp_path, alpha):
    """The export written to disk, loaded by Axolotl's own dataset loader (already tokenised: passed through),
    collated and trained by Axolotl: loss and every parameter's gradient equal ours (uniform weights, forward
    KL, renorm support, T = 1; alpha < 1 adds the CE term on both sides)."""
    from axolotl.utils.data.sft import _load_and_process_single_dataset
    from axolotl.utils.dict import DictDefault

    rows = teacher_rows(qwen_tokenizer)
    save_axolotl_dataset({"train": rows, "validation": []}, qwen_tokenizer, tmp_path / "axolotl")
    dataset, _ = _load_and_process_single_dataset(DictDefault({"path": str(tmp_path / "axolotl"), "split": "train"}),
                                                  DictDefault({}), qwen_tokenizer, "train", seed=0)
    features = list(dataset)
    expected = axolotl_row(rows[0], qwen_tokenizer)
    assert len(features) == len(rows) and all(features[0][name] == expected[name] for name in
                                              ("input_ids", "labels", "target_token_ids", "target_mask"))
    axolotl_loss, axolotl_grads = axolotl_kd_loss(student, qwen_tokenizer, features, alpha=alpha)
    loss, grads = our_kd_loss(student, qwen_tokenizer, rows, alpha=alpha)
    print(f"alpha {alpha}: Axolotl on the export {axolotl_loss:.7f}, ours {loss:.7f}, "
          f"gradient error {relative_error(grads, axolotl_grads):.1e}")
    assert axolotl_loss == pytest.approx(loss, rel=1e-5) and relative_error(grads, axolotl_grads) < 1e-4


@pytest.mark.integration
def test_at_temperature_two_axolotls_gradient_lacks_t_squared(student, qwen_tokenizer):
    """Exported at kd_temperature 2 (the teacher re-tempered as Axolotl's strategy would): the loss Axolotl
    reports is ours (T^2 included), its gradient is ours / T^2."""
    rows = teacher_rows(qwen_tokenizer)
    features = [axolotl_row(row, qwen_tokenizer, kd_temperature=2.0) for row in rows]
    axolotl_loss, axolotl_grads = axolotl_kd_loss(student, qwen_tokenizer, features, temperature=2.0)
    loss, grads = our_kd_loss(student, qwen_tokenizer, rows, temperature=2.0)
    assert axolotl_loss == pytest.approx(loss, rel=1e-5)
    assert relative_error(grads, axolotl_grads, scale=4.0) < 1e-4 and relative_error(grads, axolotl_grads) > 0.7


def test_export_layout_shifts_rows_onto_the_predicting_positions(qwen_tokenizer):
    row = teacher_rows(qwen_tokenizer, 1)[0]
    row["target_token_ids"][2][-1], row["logprobs"][2][-1] = -1, float("-inf")    # a padded alternative
    exported = axolotl_row(row, qwen_tokenizer)
    answer, length = row["answer_token_ids"], len(row["answer_token_ids"])
    start = len(exported["input_ids"]) - length
    assert exported["input_ids"][start:] == answer and exported["labels"] == [-100] * start + answer
    assert all(len(exported[name]) == start + length
               for name in ("attention_mask", "target_token_ids", "target_logprobs", "target_mask"))
    rows = exported["target_token_ids"]
    assert rows[:start - 1] == [[]] * (start - 1) and rows[-1] == []               # no row: prompt, <|im_end|>
    assert rows[start - 1:-1][0] == row["target_token_ids"][0] and rows[start + 1][-1] == 0
    assert exported["target_mask"][start + 1] == [1] * (K - 1) + [0]
    for lps in exported["target_logprobs"][start - 1:-1]:
        assert math.isclose(sum(math.exp(lp) for lp in lps), 1.0, rel_tol=1e-9)    # renormalised over the valid
    ids, lps, mask = renormalised([5, 6, -1], [-0.1, -2.0, float("-inf")], 0.5)
    assert ids == [5, 6, 0] and mask == [1, 1, 0] and lps[2] == float("-inf")
    assert math.isclose(lps[0] - lps[1], 0.95) and math.isclose(math.exp(lps[0]) + math.exp(lps[1]), 1.0)
    row["answer_token_ids"] = row["answer_token_ids"][:-1]
    with pytest.raises(ValueError, match=f"case {row['id']}: the chat template does not render"):
        axolotl_row(row, qwen_tokenizer)
