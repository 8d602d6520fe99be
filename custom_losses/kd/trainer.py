"""The stage-two trainer: TRL's SFTTrainer trained on the weighted top-k distillation loss.

Rows come from `prep.stages.softlabels` (messages, answer_token_ids [A], target_token_ids [A][<=k],
logprobs [A][<=k]: ragged, each position its real candidates; temperature, k). `build_kd_features` turns a row into input ids, labels (prompt
-100) and per-position soft labels and token weights; `KDDataCollator` batches them, one case a row or
several packed into a row (custom_losses.kd.packing, recipe key kd_packing), with position ids that restart
per case and no attention mask, so the soft labels stay on their label positions and no token attends
across cases. `WeightedKDTrainer.compute_loss` runs the loss inside the output head's
own forward call (see `kd_head_forward`): the head receives the final hidden states, keeps the answer
positions and returns `weighted_topk_kd_loss`, which never builds [batch, seq, vocab] logits. Because the
loss runs inside the head's call, FSDP and DeepSpeed ZeRO-3 gather the (sharded) head weight for it as
for any forward, and a PEFT LoRA on lm_head trains through the loss (base weight plus LoRA delta).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from trl import SFTConfig, SFTTrainer

from custom_losses.kd.kd_loss import KDLossConfig, weighted_topk_kd_loss
from custom_losses.kd.packing import pack_features, row_segments
from custom_losses.kd.token_weights import TokenWeightConfig, answer_token_weights
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
    case_weight: str = field(default="none", metadata={
        "help": "none | agreement: multiply each case's token weights by its soft-label row's `agreement` (the "
                "teacher's self-consistency, prep.stages.teacher), so cases the teacher's samples disagreed on teach less."})
    kd_packing: bool = field(default=False, metadata={
        "help": "Pack cases into rows of up to max_length tokens (custom_losses.kd.packing, best-fit decreasing); "
                "position ids restart per case and no token attends across cases. TRL's `packing` would hand the "
                "batches to its own collator, which drops the soft labels."})
    kd_padding_free: bool = field(default=False, metadata={
        "help": "Concatenate each micro-batch's rows into one row: no padding; what flash_attention_2 needs to "
                "run packed rows (varlen) when a micro-batch has more than one."})

    def __post_init__(self) -> None:
        # TRL's own packing and padding-free modes replace (or refuse) our collator and its soft labels.
        for trl_key, ours in (("packing", "kd_packing"), ("padding_free", "kd_padding_free")):
            if getattr(self, trl_key):
                raise ValueError(f"{trl_key}: true is TRL's own batching, which drops the soft labels; "
                                 f"the KD trainer uses {ours}: true")
        if self.kd_packing and self.max_length is None:
            raise ValueError("kd_packing needs max_length (the packed row's length)")
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
        return TokenWeightConfig(w_diseases=self.w_diseases, w_terms=self.w_terms, lexicon_path=self.lexicon_path,
                                 case_weight=self.case_weight)


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
    # The case weight scales the token weights, and the loss divides by the accumulated batch's sum of those
    # weights (WeightedKDTrainer._get_num_items_in_batch), so it is normalised: it moves the gradient from
    # low- to high-agreement cases of a step without shrinking the step. Unnormalised, a run's mean agreement
    # would act as a learning-rate factor, and a recipe's learning rate would mean something else with the
    # weight on; normalised, a weight of 1 everywhere is exactly the unweighted loss.
    case_weight = 1.0
    if weights.case_weight == "agreement":
        agreement = row.get("agreement")
        if agreement is None:
            raise ValueError(f"case {row.get('id')}: case_weight: agreement needs the soft-label rows' 'agreement' "
                             f"column, which this dataset lacks (python -m launch.softlabels writes it; make the soft "
                             f"labels again, or set case_weight: none)")
        if not 0 <= agreement <= 1:
            raise ValueError(f"case {row.get('id')}: agreement {agreement} is outside [0, 1]")
        case_weight = float(agreement)
    topk_ids, topk_logprobs = row["target_token_ids"][:length], row["logprobs"][:length]
    if len(topk_ids) != length or len(topk_logprobs) != length:
        raise ValueError(f"case {row.get('id')}: {len(topk_ids)} soft-label positions for {length} answer tokens")
    return {
        "input_ids": prompt_ids + answer.ids,
        "labels": [-100] * len(prompt_ids) + answer.ids,
        "kd_topk_ids": [list(map(int, ids)) for ids in topk_ids],
        "kd_topk_logprobs": [list(map(float, lps)) for lps in topk_logprobs],
        "kd_weights": [weight * case_weight for weight in answer.weights],
        "kd_in_diseases": answer.in_diseases,
    }


def padded_topk(ids: list[list[int]], logprobs: list[list[float]], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged soft-label rows (each position only its real candidates) -> [A, top_k] ids padded with -1, log-probs
    with 0 (the loss masks id -1)."""
    out_ids = torch.full((len(ids), top_k), -1, dtype=torch.long)
    out_logprobs = torch.zeros((len(ids), top_k), dtype=torch.float32)
    for position, (row_ids, row_logprobs) in enumerate(zip(ids, logprobs)):
        size = min(len(row_ids), top_k)
        if size:
            out_ids[position, :size] = torch.tensor(row_ids[:size], dtype=torch.long)
            out_logprobs[position, :size] = torch.tensor(row_logprobs[:size], dtype=torch.float32)
    return out_ids, out_logprobs


@dataclass
class KDDataCollator:
    """Rows -> a micro-batch with position ids and no attention mask; soft labels on their label positions.

    A row is a build_kd_features dict (one case) or a packed row of several (custom_losses.kd.packing). Position ids
    restart at 0 at every case, which is how transformers knows where cases begin: it builds a block-diagonal
    causal mask for sdpa/eager from them, so no token attends across cases. Rows are right-padded to the longest;
    the padding is a segment of its own (its own position ids, labels -100, weight 0), so it touches nothing.
    A case's first label is -100: it follows another case's last token, which must not predict it.
    padding_free: the micro-batch's rows are concatenated into one row: no padding at all, and the one layout in
    which flash_attention_2 runs packed cases (varlen) correctly.
    Returns input_ids, labels, position_ids [B, L]; kd_topk_ids, kd_topk_logprobs [B, L, k]; kd_weights,
    kd_in_diseases [B, L].
    """

    pad_token_id: int
    top_k: int
    padding_free: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            features = [pack_features(features)]
        batch, length = len(features), max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        position_ids = torch.zeros((batch, length), dtype=torch.long)
        topk_ids = torch.full((batch, length, self.top_k), -1, dtype=torch.long)
        topk_logprobs = torch.zeros((batch, length, self.top_k), dtype=torch.float32)
        weights = torch.zeros((batch, length), dtype=torch.float32)
        in_diseases = torch.zeros((batch, length), dtype=torch.bool)
        for row, feature in enumerate(features):
            size = len(feature["input_ids"])
            input_ids[row, :size] = torch.tensor(feature["input_ids"])
            labels[row, :size] = torch.tensor(feature["labels"])
            position_ids[row, size:] = torch.arange(length - size)
            ids, logprobs = padded_topk(feature["kd_topk_ids"], feature["kd_topk_logprobs"], self.top_k)
            row_weights = torch.tensor(feature["kd_weights"], dtype=torch.float32)
            row_diseases = torch.tensor(feature["kd_in_diseases"], dtype=torch.bool)
            start = first_answer = 0
            for tokens, answer in row_segments(feature):
                end, answers = start + tokens, slice(first_answer, first_answer + answer)
                position_ids[row, start:end] = torch.arange(tokens)
                labels[row, start] = -100
                tail = slice(end - answer, end)  # the answer is the tail of its case
                topk_ids[row, tail, : ids.shape[1]] = ids[answers]
                topk_logprobs[row, tail, : ids.shape[1]] = logprobs[answers]
                weights[row, tail] = row_weights[answers]
                in_diseases[row, tail] = row_diseases[answers]
                start, first_answer = end, first_answer + answer
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "kd_topk_ids": topk_ids,
                "kd_topk_logprobs": topk_logprobs, "kd_weights": weights, "kd_in_diseases": in_diseases}


def _shifted_answer_weights(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weights of the positions the loss sees: label t is predicted from position t-1."""
    return batch["kd_weights"][:, 1:] * batch["labels"][:, 1:].ne(-100)


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module an FSDP (v1) or activation-checkpoint wrapper holds: its forward is the one to replace, so
    that the wrapper's own forward (which gathers the shards) still runs around it."""
    while True:
        inner = getattr(module, "_fsdp_wrapped_module", None) or getattr(module, "_checkpoint_wrapped_module", None)
        if inner is None:
            return module
        module = inner


def _lora_terms(layer: nn.Module) -> list[tuple[nn.Module, nn.Module, float]]:
    """(lora_A, lora_B, scaling) of each active adapter of a PEFT LoRA layer on the output head.

    The KD loss needs the head as one weight matrix, W + scaling * B @ A, which equals the layer's own
    forward only when nothing acts on the input of the LoRA path: dropout, DoRA and a LoRA bias do.
    """
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return []  # merged: the base weight already holds the delta; disabled: the base alone
    refusals = []
    terms = []
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
            refusals.append("use_dora")
        if not isinstance(layer.lora_dropout[name], nn.Identity):
            refusals.append("lora_dropout")
        if getattr(layer.lora_B[name], "bias", None) is not None:
            refusals.append("lora_bias")
        terms.append((layer.lora_A[name], layer.lora_B[name], float(layer.scaling[name])))
    if refusals:
        key = refusals[0]
        raise ValueError(f"a LoRA on lm_head trains through the KD loss only as one weight (base + B @ A), which "
                         f"'{key}' rules out: set {key} to {'0' if key == 'lora_dropout' else 'false'} or leave "
                         f"lm_head out of lora_target_modules")
    return terms


def kd_head_route(head: nn.Module) -> tuple[list[nn.Module], nn.Module, list[tuple[nn.Module, nn.Module, float]]]:
    """How a call of the model's output head reaches its weight: (PEFT wrappers the call passes through, the
    nn.Linear that owns the weight, the LoRA terms to add to it). ValueError for a LoRA it cannot train."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    wrappers: list[nn.Module] = []
    head = _unwrapped(head)
    if isinstance(head, ModulesToSaveWrapper):  # lora_modules_to_save: [lm_head], a trainable copy
        wrappers.append(head)
        active = not head.disable_adapters and head.active_adapters
        head = _unwrapped(head.modules_to_save[head.active_adapters[0]] if active else head.original_module)
    terms: list[tuple[nn.Module, nn.Module, float]] = []
    if isinstance(head, LoraLayer):
        terms = _lora_terms(head)
        wrappers.append(head)
        head = _unwrapped(head.get_base_layer())
    if not isinstance(head, nn.Linear) or getattr(head, "bias", None) is not None:
        raise ValueError(f"the KD loss needs the output head to be a bias-free nn.Linear, found {type(head).__name__}")
    return wrappers, head, terms


def _lora_weight(owner: nn.Module, terms: list[tuple[nn.Module, nn.Module, float]], size: int) -> torch.Tensor:
    """The head's weight [V, H], plus each LoRA delta, differentiable. The delta comes from calling the
    adapter modules on the identity (B(A(I)) = (B @ A)^T, an H x r x V product) rather than from their
    .weight attributes, so that under ZeRO-3 their own forward hooks gather them as in a plain forward."""
    weight = owner.weight
    for lora_a, lora_b, scaling in terms:
        eye = torch.eye(size, dtype=lora_a.weight.dtype, device=weight.device)
        # Added in the base weight's dtype: the served model is this sum, merged in that dtype.
        weight = weight + (lora_b(lora_a(eye)) * scaling).T.to(weight.dtype)
    return weight


@contextlib.contextmanager
def _replaced_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """MODULE.forward is FORWARD (an instance attribute) until the block ends; the class's forward after."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


@contextlib.contextmanager
def kd_head_forward(head: nn.Module, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside the block, a call of HEAD(hidden) returns LOSS_OF(hidden, weight) instead of logits, weight being the
    head's full [V, H] weight (plus its LoRA delta). The call still goes through the head's module call, so FSDP's
    and DeepSpeed's hooks gather its shards for the forward and again for the backward."""
    wrappers, owner, terms = kd_head_route(head)
    chain = [*wrappers, owner]
    with contextlib.ExitStack() as stack:
        for wrapper, inner in zip(chain, chain[1:]):  # each PEFT wrapper hands the hidden states straight on
            stack.enter_context(_replaced_forward(wrapper, lambda hidden, *args, _inner=inner, **kwargs: _inner(hidden)))
        stack.enter_context(_replaced_forward(
            owner, lambda hidden, *args, **kwargs: loss_of(hidden, _lora_weight(owner, terms, hidden.shape[-1]))))
        yield


class WeightedKDTrainer(SFTTrainer):
    """SFTTrainer whose loss is `weighted_topk_kd_loss` on the teacher's top-k soft labels."""

    def __init__(self, *args, teacher_temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_loss_config = self.args.loss_config()
        self.teacher_temperature = teacher_temperature
        # compute_loss normalises by the accumulated batch's weight sum itself, so the Trainer must
        # neither divide by the accumulation steps nor count labels as items.
        self.model_accepts_loss_kwargs = True
        kd_head_route(self._output_head(self.model))  # a LoRA on lm_head the loss cannot train stops here
        self._check_attention_sees_cases()

    def _check_attention_sees_cases(self) -> None:
        """flash_attention_2 keeps packed cases apart only in a single-row micro-batch (its varlen path); sdpa and
        eager get a block-diagonal mask from the position ids in any shape."""
        implementation = str(getattr(self.model.config, "_attn_implementation", "") or "")
        rows = max(self.args.per_device_train_batch_size, self.args.per_device_eval_batch_size)
        if ("flash" in implementation and self.args.kd_packing and rows > 1
                and not getattr(self.data_collator, "padding_free", False)):
            raise ValueError(f"attn_implementation {implementation} would let packed cases attend to each other in a "
                             f"micro-batch of {rows} rows: set kd_padding_free: true or per_device batch sizes 1")

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Sum of token weights over every micro-batch of the optimiser step (and every rank)."""
        if not batch_samples or "kd_weights" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        total = sum(_shifted_answer_weights(batch).sum() for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def _output_head(self, model) -> nn.Module:
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        return base.get_output_embeddings()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        answer = labels[:, 1:].ne(-100)  # label t is predicted from position t-1
        stats: dict[str, torch.Tensor] = {}

        def loss_of(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            loss, found = weighted_topk_kd_loss(
                hidden[:, :-1][answer].to(weight.dtype),
                weight,
                labels[:, 1:][answer],
                inputs["kd_topk_ids"][:, 1:][answer],
                inputs["kd_topk_logprobs"][:, 1:][answer],
                inputs["kd_weights"][:, 1:][answer],
                self.kd_loss_config,
                teacher_temperature=self.teacher_temperature,
                normaliser=num_items_in_batch,
            )
            stats.update(found, loss=loss.detach())
            return loss

        with kd_head_forward(self._output_head(model), loss_of):
            # logits_to_keep=0: the head gets every position and picks the answers itself.
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                            position_ids=inputs.get("position_ids"), use_cache=False, logits_to_keep=0)
        # The output's .logits is the loss as it left the head's call (hooks may hand on a new tensor: the
        # backward must go through it). A model that post-processes logits (e.g. soft-capping) would change it;
        # a mixed-precision output cast only rounds it.
        loss = outputs.logits
        # equal_nan: a NaN loss is the optimiser's problem to report (the Trainer logs it), not a changed head.
        if loss.dim() != 0 or not torch.allclose(loss.detach().double(), stats["loss"].double(), rtol=1e-2,
                                                 equal_nan=True):
            raise RuntimeError(f"{type(self._output_head(model)).__name__}: the model changed the output head's value "
                               f"on its way out; the KD trainer needs a model that returns lm_head's output as is")
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
