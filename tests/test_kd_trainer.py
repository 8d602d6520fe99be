"""The stage-two trainer on the tiny model: features, collator alignment, accumulation, metrics."""
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from custom_losses.kd.packing import PackedDataset, pack_features
from custom_losses.kd.token_weights import TokenWeightConfig, answer_token_weights
from custom_losses.kd.trainer import KDConfig, KDDataCollator, WeightedKDTrainer, build_kd_features
from prep.answers import Answer, answer_json
from prep.prompts import load_prompts
from prep.records import read_cases
from tests.conftest import SAMPLE_CASES

ANSWERS = [
    Answer("1. 咽痛发热；2. 扁桃体脓性分泌物。", "急性化脓性扁桃体炎"),
    Answer("1. 活动后胸闷；2. ST段压低。", "1. 冠心病；2. 稳定型心绞痛；3. 原发性高血压（2级）"),
    Answer("1. 血糖升高多年。", "2型糖尿病"),
    Answer("1. 停经45天；2. hCG阳性。", "1. 早孕；2. 先兆流产"),
]
TOP_K = 4


def softlabel_rows(tokenizer, count=4, seed=0):
    """Rows in prep.stages.softlabels' layout with a synthetic teacher: the answer token at rank 1 plus random others."""
    generator = torch.Generator().manual_seed(seed)
    prompts, cases = load_prompts(), read_cases(SAMPLE_CASES).cases
    rows = []
    for index in range(count):
        case, answer = cases[index], ANSWERS[index % len(ANSWERS)]
        messages = prompts.messages(case, answer)
        ids = answer_token_weights(tokenizer, answer_json(answer), messages[1]["content"], TokenWeightConfig()).ids
        others = torch.randint(0, 150000, (len(ids), TOP_K - 1), generator=generator)
        topk = torch.cat([torch.tensor(ids)[:, None], others], dim=1)
        logprobs = torch.log_softmax(torch.randn(len(ids), TOP_K, generator=generator) + torch.tensor([3.0, 0, 0, 0]), -1)
        rows.append({"id": case.id, "messages": messages, "answer_token_ids": ids, "target_token_ids": topk.tolist(),
                     "logprobs": logprobs.tolist(), "temperature": 1.0})
    return rows


def test_features_and_collator_put_soft_labels_on_label_positions(qwen_tokenizer):
    rows = softlabel_rows(qwen_tokenizer, 2)
    features = [build_kd_features(row, qwen_tokenizer, TokenWeightConfig()) for row in rows]
    batch = KDDataCollator(qwen_tokenizer.pad_token_id, TOP_K)(features)
    for row_index, row in enumerate(rows):
        answer = batch["labels"][row_index].ne(-100)
        # Every labelled position carries the teacher's top-k whose rank-1 id is that label.
        assert torch.equal(batch["kd_topk_ids"][row_index][answer][:, 0], batch["labels"][row_index][answer])
        assert torch.equal(batch["kd_topk_ids"][row_index][answer], torch.tensor(row["target_token_ids"]))
        assert (batch["kd_weights"][row_index][~answer] == 0).all() and (batch["kd_weights"][row_index][answer] >= 1).all()
        assert (batch["kd_topk_ids"][row_index][~answer] == -1).all()
    # Diseases tokens carry w_diseases.
    assert (batch["kd_weights"][batch["kd_in_diseases"]] == 2.0).all() and batch["kd_in_diseases"].any()


def test_mismatched_answer_tokens_are_refused(qwen_tokenizer):
    row = softlabel_rows(qwen_tokenizer, 1)[0]
    row["answer_token_ids"] = row["answer_token_ids"][:-2]
    with pytest.raises(ValueError, match="differ from the tokenizer's"):
        build_kd_features(row, qwen_tokenizer, TokenWeightConfig())


def _one_sgd_step(model_dir, tokenizer, features, tmp_path, batch_size, accumulation):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    args = KDConfig(output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                    max_steps=1, learning_rate=1.0, lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0, bf16=False,
                    weight_decay=0.0, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
                    data_seed=0, dataloader_drop_last=False, kd_alpha=0.7, kd_temperature=2.0, w_diseases=3.0)
    trainer = WeightedKDTrainer(model=model, args=args, train_dataset=Dataset.from_list(features),
                                data_collator=KDDataCollator(tokenizer.pad_token_id, TOP_K), processing_class=tokenizer)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    return {n: (p.detach() - before[n]) for n, p in model.named_parameters()}, trainer


@pytest.mark.integration
def test_two_micro_batches_of_two_equal_one_batch_of_four(tiny_model_dir, qwen_tokenizer, tmp_path):
    features = [build_kd_features(r, qwen_tokenizer, TokenWeightConfig()) for r in softlabel_rows(qwen_tokenizer, 4)]
    accumulated, trainer = _one_sgd_step(tiny_model_dir, qwen_tokenizer, features, tmp_path / "a", 2, 2)
    whole, _ = _one_sgd_step(tiny_model_dir, qwen_tokenizer, features, tmp_path / "b", 4, 1)
    for name in whole:
        assert torch.allclose(accumulated[name], whole[name], atol=1e-6, rtol=1e-4), name
    assert any(delta.abs().max() > 0 for delta in whole.values())
    logged = trainer.state.log_history[0]
    assert {"kd_loss", "ce_loss", "diseases_weight_share"} <= set(logged)
    assert 0 < logged["diseases_weight_share"] < 1 and math.isfinite(logged["kd_loss"])


def dense_reference_loss(logits, batch, alpha, temperature, tau=1.0, normaliser=None):
    """Weighted forward-KL (renormalised over the teacher's top-k) + CE from full [B, L, V] logits in float64,
    written from the definitions: the brute force the trainer's head-side loss must equal."""
    z = logits[:, :-1].double()
    labels, ids = batch["labels"][:, 1:], batch["kd_topk_ids"][:, 1:]
    answer = labels.ne(-100)
    z, labels, ids = z[answer], labels[answer], ids[answer]
    lp, weights = batch["kd_topk_logprobs"][:, 1:][answer].double(), batch["kd_weights"][:, 1:][answer].double()
    valid = ids.ge(0)
    log_q = torch.log_softmax((lp * tau / temperature).masked_fill(~valid, float("-inf")), -1)
    student = torch.log_softmax(z / temperature, -1).gather(1, ids.clamp_min(0)).masked_fill(~valid, float("-inf"))
    log_p = torch.log_softmax(student, -1)
    kd = torch.where(valid, log_q.exp() * (log_q - log_p), torch.zeros_like(log_q)).sum(-1)
    ce = -torch.log_softmax(z, -1).gather(1, labels[:, None]).squeeze(1)
    norm = weights.sum() if normaliser is None else normaliser
    return (weights * (alpha * temperature ** 2 * kd + (1 - alpha) * ce)).sum() / norm


def _peft_trainer(model_dir, tokenizer, features, tmp_path, **lora):
    from peft import LoraConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    args = KDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, bf16=False, report_to=[],
                    save_strategy="no", use_cpu=True, kd_alpha=0.7, kd_temperature=2.0, w_diseases=3.0)
    config = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **{"lora_dropout": 0.0, **lora})
    return WeightedKDTrainer(model=model, args=args, train_dataset=Dataset.from_list(features), peft_config=config,
                             data_collator=KDDataCollator(tokenizer.pad_token_id, TOP_K), processing_class=tokenizer)


@pytest.mark.integration
@pytest.mark.parametrize("head", ["lora", "modules_to_save"])
def test_trained_lm_head_gets_the_kd_gradient(head, tiny_model_dir, qwen_tokenizer, tmp_path):
    """A LoRA on lm_head (or a trainable copy of it) gets exactly autograd's gradient of the dense loss."""
    features = [build_kd_features(r, qwen_tokenizer, TokenWeightConfig(w_diseases=3.0))
                for r in softlabel_rows(qwen_tokenizer, 2)]
    lora = ({"target_modules": ["q_proj", "lm_head"]} if head == "lora"
            else {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]})
    trainer = _peft_trainer(tiny_model_dir, qwen_tokenizer, features, tmp_path, **lora)
    model = trainer.model.train()
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    head_params = [name for name in params if "lm_head" in name]
    assert len(head_params) == (2 if head == "lora" else 1), head_params
    batch = trainer.data_collator(features)

    loss = trainer.compute_loss(model, batch)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    reference = dense_reference_loss(logits, batch, alpha=0.7, temperature=2.0)
    expected = dict(zip(params, torch.autograd.grad(reference, list(params.values()))))

    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for name in params:  # fp32 sums in another order: 1e-5 of the tensor's largest entry
        error = (grads[name] - expected[name]).abs().max() / expected[name].abs().max()
        assert error < 1e-5, (name, error.item())
    for name in head_params:
        assert grads[name].abs().max() > 1e-6, name


def test_lm_head_lora_with_dropout_is_refused(tiny_model_dir, qwen_tokenizer, tmp_path):
    features = [build_kd_features(r, qwen_tokenizer, TokenWeightConfig()) for r in softlabel_rows(qwen_tokenizer, 1)]
    with pytest.raises(ValueError, match=r"'lora_dropout' rules out: set lora_dropout to 0 or leave lm_head out"):
        _peft_trainer(tiny_model_dir, qwen_tokenizer, features, tmp_path, target_modules=["lm_head"], lora_dropout=0.1)


def _kd_trainer(model_dir, tokenizer, features, tmp_path, **args):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    config = KDConfig(output_dir=str(tmp_path), bf16=False, report_to=[], save_strategy="no", use_cpu=True,
                      kd_alpha=0.7, kd_temperature=2.0, w_diseases=3.0, max_length=2048, **args)
    return WeightedKDTrainer(model=model, args=config, train_dataset=Dataset.from_list(features),
                             data_collator=KDDataCollator(tokenizer.pad_token_id, TOP_K), processing_class=tokenizer)


def _loss_and_grads(trainer, batch):
    model = trainer.model.train()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    normaliser = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, batch, num_items_in_batch=normaliser)
    return loss.detach(), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.integration
def test_packed_batches_equal_unpacked_ones(tiny_model_dir, qwen_tokenizer, tmp_path):
    """The same 4 cases as 4 padded rows, as 2 packed rows and as one padding-free row: same loss, same gradient
    of every parameter (fp32, sdpa with the block-diagonal mask transformers builds from the position ids)."""
    features = [build_kd_features(r, qwen_tokenizer, TokenWeightConfig(w_diseases=3.0))
                for r in softlabel_rows(qwen_tokenizer, 4)]
    lengths = [len(f["input_ids"]) for f in features]
    packed = PackedDataset(features, max_length=sum(sorted(lengths)[-2:]))  # room for two cases a row
    assert sorted(len(b) for b in packed.bins) == [2, 2] and sorted(i for b in packed.bins for i in b) == [0, 1, 2, 3]
    trainer = _kd_trainer(tiny_model_dir, qwen_tokenizer, features, tmp_path)
    unpacked = KDDataCollator(qwen_tokenizer.pad_token_id, TOP_K)(features)
    rows = KDDataCollator(qwen_tokenizer.pad_token_id, TOP_K)(list(packed))
    flat = KDDataCollator(qwen_tokenizer.pad_token_id, TOP_K, padding_free=True)(features)
    assert rows["input_ids"].shape[0] == 2 and flat["input_ids"].shape == (1, sum(lengths))
    assert "attention_mask" not in flat and flat["position_ids"][0].eq(0).sum() == 4  # four cases restart at 0

    loss, grads = _loss_and_grads(trainer, unpacked)
    for name, batch in (("packed", rows), ("padding-free", flat)):
        assert batch["kd_weights"].sum() == unpacked["kd_weights"].sum(), name
        other_loss, other_grads = _loss_and_grads(trainer, batch)
        assert torch.allclose(other_loss, loss, rtol=1e-5, atol=0), (name, other_loss, loss)
        for param in grads:
            assert torch.allclose(other_grads[param], grads[param], rtol=1e-5, atol=1e-5), (name, param)
    assert max(g.abs().max() for g in grads.values()) > 1e-3


def test_no_token_attends_across_packed_cases(tiny_model_dir, qwen_tokenizer, tmp_path):
    """In a packed row [A, B], rewriting A's tokens leaves B's hidden states and loss as B alone gives them;
    without the restarting position ids (one causal sequence) they do change, so the probe can see leaks."""
    features = [build_kd_features(r, qwen_tokenizer, TokenWeightConfig()) for r in softlabel_rows(qwen_tokenizer, 2)]
    trainer = _kd_trainer(tiny_model_dir, qwen_tokenizer, features, tmp_path)
    decoder, collate = trainer.model.eval().get_decoder(), KDDataCollator(qwen_tokenizer.pad_token_id, TOP_K)
    case_a, case_b = features
    scrambled = {**case_a, "input_ids": [(token * 7 + 11) % 150000 for token in case_a["input_ids"]]}
    size_a = len(case_a["input_ids"])

    def b_hidden(batch, **position):
        with torch.no_grad():
            return decoder(input_ids=batch["input_ids"], use_cache=False, **position).last_hidden_state[0, size_a:]

    alone = collate([case_b])
    with torch.no_grad():
        b_alone = decoder(input_ids=alone["input_ids"], position_ids=alone["position_ids"]).last_hidden_state[0]
    for first in (case_a, scrambled):
        row = collate([pack_features([first, case_b])])
        assert torch.allclose(b_hidden(row, position_ids=row["position_ids"]), b_alone, atol=1e-5)
    plain = [collate([pack_features([first, case_b])]) for first in (case_a, scrambled)]
    assert not torch.allclose(b_hidden(plain[0]), b_hidden(plain[1]), atol=1e-3)

    # B's loss with A's weights zeroed: the same whatever A's tokens are, and the same as B alone.
    silent = {name: [0.0] * len(case_a["kd_weights"]) if name == "kd_weights" else value for name, value in case_a.items()}
    silent_scrambled = {**silent, "input_ids": scrambled["input_ids"]}
    with torch.no_grad():
        losses = [trainer.compute_loss(trainer.model, collate([pack_features([first, case_b])]))
                  for first in (silent, silent_scrambled)]
        losses.append(trainer.compute_loss(trainer.model, alone))
    assert torch.allclose(losses[0], losses[2], rtol=1e-5) and torch.allclose(losses[1], losses[2], rtol=1e-5), losses


def test_batching_modes_that_would_lose_soft_labels_or_leak_are_refused(tiny_model_dir, qwen_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="packing: true is TRL's own batching, which drops the soft labels; the KD "
                                         "trainer uses kd_packing: true"):
        KDConfig(output_dir=str(tmp_path), packing=True, use_cpu=True, bf16=False)
    features = [build_kd_features(r, qwen_tokenizer, TokenWeightConfig()) for r in softlabel_rows(qwen_tokenizer, 1)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config._attn_implementation = "flash_attention_2"  # only the check reads it; nothing runs
    args = KDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], kd_packing=True, max_length=512,
                    per_device_train_batch_size=2, per_device_eval_batch_size=1)
    with pytest.raises(ValueError, match="flash_attention_2 would let packed cases attend to each other in a "
                                         "micro-batch of 2 rows: set kd_padding_free: true"):
        WeightedKDTrainer(model=model, args=args, train_dataset=Dataset.from_list(features), processing_class=qwen_tokenizer,
                          data_collator=KDDataCollator(qwen_tokenizer.pad_token_id, TOP_K))
