"""The stage-two trainer: TRL's SFTTrainer trained on the weighted top-k distillation loss.

Rows come from `prep.softlabels` (messages, answer_token_ids [A], target_token_ids [A][k],
logprobs [A][k], temperature). `build_kd_features` turns a row into input ids, labels (prompt
-100) and per-position soft labels and token weights; `KDDataCollator` pads them so the soft labels
stay on their label positions; `WeightedKDTrainer.compute_loss` takes the final hidden states of
the answer positions only and feeds them, with the lm_head weight, to `weighted_topk_kd_loss`,
which never builds [batch, seq, vocab] logits. Sequence packing is not supported (right padding).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from custom_losses.kd_loss import KDLossConfig, weighted_topk_kd_loss
from custom_losses.token_weights import TokenWeightConfig, answer_token_weights
from prep.tokenizer import chat_token_ids

KD_COLUMNS = ("kd_topk_ids", "kd_topk_logprobs", "kd_weights", "kd_in_diseases")


@dataclass
class KDConfig(SFTConfig):
    """SFTConfig plus the distillation knobs; every one is a recipe key (recipes/distill/*.yaml)."""

    kd_alpha: float = field(default=0.5, metadata={
        "help": "Weight of the KD term; 1 - kd_alpha weighs cross-entropy."})
    kd_temperature: float = field(default=1.0, metadata={
        "help": "Distillation temperature T (the loss is scaled by T^2)."})
    kd_divergence: str = field(default="forward_kl", metadata={"help": "forward_kl | reverse_kl | jsd"})
    kd_beta: float = field(default=0.5, metadata={"help": "Generalised JSD mixing (TRL GKD convention)."})
    kd_support: str = field(default="renorm", metadata={
        "help": "renorm (over the teacher's top-k) | tail (plus a rest-of-vocabulary bucket)"})
    kd_chunk_size: int = field(default=256, metadata={"help": "Answer tokens per chunk of the fused lm_head + loss."})
    kd_rho_keep_fraction: float = field(default=1.0, metadata={
        "help": "Rho-1 token selection by excess loss; 1.0 = off."})
    w_diseases: float = field(default=2.0, metadata={"help": "Weight of tokens inside the diseases value."})
    w_terms: float = field(default=1.5, metadata={"help": "Weight of lexicon terms found in both case and answer."})
    lexicon_path: str | None = field(default="data/medical_terms.txt", metadata={
        "help": "Medical-term lexicon, one per line."})

    def __post_init__(self) -> None:
        # The KD columns must reach the collator untouched and TRL must not re-tokenise our features.
        self.remove_unused_columns = False
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        self.loss_type = "nll"  # keeps TRL from patching the model's forward with its own chunked CE
        super().__post_init__()
        self.loss_config()
        self.weight_config()

    def loss_config(self) -> KDLossConfig:
        return KDLossConfig(alpha=self.kd_alpha, temperature=self.kd_temperature, divergence=self.kd_divergence,
                            beta=self.kd_beta, support=self.kd_support, chunk_size=self.kd_chunk_size,
                            rho_keep_fraction=self.kd_rho_keep_fraction)

    def weight_config(self) -> TokenWeightConfig:
        return TokenWeightConfig(w_diseases=self.w_diseases, w_terms=self.w_terms, lexicon_path=self.lexicon_path)


def build_kd_features(row: dict[str, Any], tokenizer, weights: TokenWeightConfig) -> dict[str, Any]:
    """One soft-label row -> input_ids, labels and the answer positions' soft labels and weights.

    The answer tokens are re-derived from the text and must equal the stored ones: soft labels
    attached to the wrong tokens would teach the wrong distribution without any error.
    """
    messages = row["messages"]
    if [m["role"] for m in messages][-1] != "assistant":
        raise ValueError(f"case {row.get('id')}: the last message must be the assistant's answer")
    prompt_ids = chat_token_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    case_text = next(m["content"] for m in messages if m["role"] == "user")
    answer = answer_token_weights(tokenizer, messages[-1]["content"], case_text, weights)
    stored = list(row["answer_token_ids"])
    if stored != answer.ids:
        raise ValueError(f"case {row.get('id')}: stored answer_token_ids ({len(stored)}) differ from the tokenizer's "
                         f"({len(answer.ids)}); the soft labels were made with another tokenizer or template")
    length = len(answer.ids)
    topk_ids, topk_logprobs = row["target_token_ids"][:length], row["logprobs"][:length]
    if len(topk_ids) != length or len(topk_logprobs) != length:
        raise ValueError(f"case {row.get('id')}: {len(topk_ids)} soft-label positions for {length} answer tokens")
    return {
        "input_ids": prompt_ids + answer.ids,
        "labels": [-100] * len(prompt_ids) + answer.ids,
        "kd_topk_ids": [list(map(int, ids)) for ids in topk_ids],
        "kd_topk_logprobs": [list(map(float, lps)) for lps in topk_logprobs],
        "kd_weights": answer.weights,
        "kd_in_diseases": answer.in_diseases,
    }


@dataclass
class KDDataCollator:
    """Right-pads a batch; soft labels and weights land on their label positions ([B, L, k] / [B, L])."""

    pad_token_id: int
    top_k: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch, length = len(features), max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        topk_ids = torch.full((batch, length, self.top_k), -1, dtype=torch.long)
        topk_logprobs = torch.zeros((batch, length, self.top_k), dtype=torch.float32)
        weights = torch.zeros((batch, length), dtype=torch.float32)
        in_diseases = torch.zeros((batch, length), dtype=torch.bool)
        for row, feature in enumerate(features):
            size = len(feature["input_ids"])
            input_ids[row, :size] = torch.tensor(feature["input_ids"])
            attention_mask[row, :size] = 1
            labels[row, :size] = torch.tensor(feature["labels"])
            answer = len(feature["kd_weights"])
            start = size - answer  # the answer is the tail of the sequence
            ids = torch.tensor(feature["kd_topk_ids"], dtype=torch.long)[:, : self.top_k]
            topk_ids[row, start:size, : ids.shape[1]] = ids
            topk_logprobs[row, start:size, : ids.shape[1]] = torch.tensor(feature["kd_topk_logprobs"])[:, : self.top_k]
            weights[row, start:size] = torch.tensor(feature["kd_weights"])
            in_diseases[row, start:size] = torch.tensor(feature["kd_in_diseases"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "kd_topk_ids": topk_ids,
                "kd_topk_logprobs": topk_logprobs, "kd_weights": weights, "kd_in_diseases": in_diseases}


def _shifted_answer_weights(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weights of the positions the loss sees: label t is predicted from position t-1."""
    return batch["kd_weights"][:, 1:] * batch["labels"][:, 1:].ne(-100)


class WeightedKDTrainer(SFTTrainer):
    """SFTTrainer whose loss is `weighted_topk_kd_loss` on the teacher's top-k soft labels."""

    def __init__(self, *args, teacher_temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_loss_config = self.args.loss_config()
        self.teacher_temperature = teacher_temperature
        # compute_loss normalises by the accumulated batch's weight sum itself, so the Trainer must
        # neither divide by the accumulation steps nor count labels as items.
        self.model_accepts_loss_kwargs = True

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Sum of token weights over every micro-batch of the optimiser step (and every rank)."""
        if not batch_samples or "kd_weights" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        total = sum(_shifted_answer_weights(batch).sum() for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    @contextlib.contextmanager
    def _capture_final_hidden(self, model):
        """Capture the decoder's final (normed) hidden states while the call still goes through every
        wrapper (DDP, PEFT), which a direct call of the inner decoder would bypass."""
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        captured: dict[str, torch.Tensor] = {}
        handle = base.get_decoder().register_forward_hook(
            lambda module, args, output: captured.__setitem__("hidden", output.last_hidden_state))
        try:
            yield captured, base.get_output_embeddings()
        finally:
            handle.remove()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        with self._capture_final_hidden(model) as (captured, lm_head):
            # logits_to_keep=1: the model's own head runs on one position only; ours runs on the answers.
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                  logits_to_keep=1)
        hidden = captured["hidden"][:, :-1]
        answer = labels[:, 1:].ne(-100)
        loss, stats = weighted_topk_kd_loss(
            hidden[answer],
            lm_head.weight,
            labels[:, 1:][answer],
            inputs["kd_topk_ids"][:, 1:][answer],
            inputs["kd_topk_logprobs"][:, 1:][answer],
            inputs["kd_weights"][:, 1:][answer],
            self.kd_loss_config,
            teacher_temperature=self.teacher_temperature,
            normaliser=num_items_in_batch,
        )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the normaliser is global
        self._record_kd_metrics(stats, inputs, answer)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _record_kd_metrics(self, stats: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                           answer: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        weights = inputs["kd_weights"][:, 1:][answer]
        diseases_weight = (weights * inputs["kd_in_diseases"][:, 1:][answer]).sum()
        self._metrics[mode]["kd_loss"].append(float(stats["kd"]))
        self._metrics[mode]["ce_loss"].append(float(stats["ce"]))
        self._metrics[mode]["diseases_weight_share"].append(float(diseases_weight / weights.sum().clamp_min(1e-9)))
