"""Soft labels laid out for Axolotl's KD plugin (0.19): pre-tokenised rows, each soft label on the position
whose hidden state predicts its token.

Why a separate export. Axolotl's offline KD path (the `axolotl.integrations.kd.chat_template` strategy)
right-aligns the soft-label rows to the tokens they describe and builds its mask from the labels at the
same positions; neither `AxolotlKDTrainer` nor its fused Liger kernel shifts them, so the hidden state at
position t is trained toward the distribution of token t instead of token t+1 (tests/test_softlabels.py
measures it). Its online vLLM path does shift: `prompt_logprobs[t + 1]` lands at position t, with the mask of
label t + 1. No row count makes the chat-template strategy reproduce that, because its mask is tied to the
unshifted labels (the first answer token would lose its row and `<|im_end|>` would get one for the token
after it). Axolotl also takes datasets that are already tokenised (`input_ids`, `attention_mask`, `labels`)
and passes them through untouched, so this module writes exactly the online path's layout:

    input_ids         prompt (chat template, generation prompt) + answer ids + <|im_end|>  [L]
    labels            -100 on the prompt, the answer ids and <|im_end|>                     [L]
    target_token_ids  [L][k] or []: at position start - 1 + j the teacher's top-k for answer token j
    target_logprobs   the same rows, renormalised over the top-k at `kd_temperature`
    target_mask       1 per valid entry (0 for a padded one, whose id is set to 0)

Positions without a soft label (the prompt, and <|im_end|> itself) hold empty lists: Axolotl's collator pads
every row to k with mask 0, so they cost only Arrow offsets. With `kd_alpha = a, kd_ce_alpha = 1 - a,
kd_beta = 0, kd_normalize_topk: true` Axolotl's loss on these rows is ours (custom_losses.kd.kd_loss) with
uniform token weights, forward KL and the renorm support; its gradient matches for kd_temperature 1 only
(its kernel leaves T^2 out of the gradient).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prep.jsonio import save_splits
from prep.qwen import IM_END_ID
from prep.tokenizer import chat_token_ids

COLUMNS = ("input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask")


def renormalised(ids: list[int], logprobs: list[float], scale: float) -> tuple[list[int], list[float], list[int]]:
    """One position's top-k as Axolotl's kernel wants it: log-probs renormalised over the valid entries after
    multiplying by SCALE (tau / T), padded entries (id -1 or log-prob -inf) as id 0, -inf and mask 0."""
    valid = [token_id >= 0 and logprob is not None and math.isfinite(logprob)
             for token_id, logprob in zip(ids, logprobs)]
    scaled = [logprob * scale for logprob, ok in zip(logprobs, valid) if ok]
    top = max(scaled, default=0.0)
    lse = top + math.log(sum(math.exp(value - top) for value in scaled)) if scaled else 0.0
    values = iter(scaled)
    return ([token_id if ok else 0 for token_id, ok in zip(ids, valid)],
            [next(values) - lse if ok else float("-inf") for ok in valid],
            [int(ok) for ok in valid])


def axolotl_row(row: dict[str, Any], tokenizer: Any, kd_temperature: float = 1.0) -> dict[str, Any]:
    """One soft-label row (prep.stages.softlabels' dataset/) -> one pre-tokenised Axolotl KD row (see the module doc).

    Raises ValueError naming the case when the chat template does not render the stored answer ids."""
    messages, answer = row["messages"], list(row["answer_token_ids"])
    prompt = chat_token_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full = chat_token_ids(tokenizer, messages)
    start, length = len(prompt), len(answer)
    content = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    if not prompt or answer != content + [IM_END_ID] or full[:start + length] != prompt + answer:
        raise ValueError(f"case {row.get('id')}: the chat template does not render the prompt, then the stored "
                         f"{length} answer_token_ids; the soft labels were made with another tokenizer or template")
    if len(row["target_token_ids"]) < length or len(row["logprobs"]) < length:
        raise ValueError(f"case {row.get('id')}: {len(row['target_token_ids'])} soft-label rows for {length} "
                         f"answer tokens")
    scale = float(row.get("temperature") or 1.0) / kd_temperature
    # Axolotl's kernel takes k alternatives at every position: the ragged rows padded back (id -1: masked).
    width = int(row.get("k") or max((len(ids) for ids in row["target_token_ids"]), default=1))
    shifted = [renormalised(list(ids) + [-1] * (width - len(ids)), list(lps) + [float("-inf")] * (width - len(lps)),
                            scale)
               for ids, lps in zip(row["target_token_ids"][:length], row["logprobs"][:length])]
    # Position start - 1 + j predicts answer token j; the prompt before it and <|im_end|> itself predict nothing.
    before, after = [[]] * (start - 1), [[]]
    return {
        "input_ids": prompt + answer,
        "attention_mask": [1] * (start + length),
        "labels": [-100] * start + answer,
        "target_token_ids": before + [ids for ids, _, _ in shifted] + after,
        "target_logprobs": before + [lps for _, lps, _ in shifted] + after,
        "target_mask": before + [mask for _, _, mask in shifted] + after,
    }


def save_axolotl_dataset(rows_by_split: dict[str, list[dict]], tokenizer: Any, folder: Path,
                         kd_temperature: float = 1.0, logprob_dtype: str = "float32") -> int:
    """Export every split's soft-label rows to FOLDER (a DatasetDict Axolotl loads with load_from_disk);
    returns the number of tokens written."""
    from datasets import Features, List, Value

    features = Features({
        "input_ids": List(Value("int32")), "attention_mask": List(Value("int8")), "labels": List(Value("int32")),
        "target_token_ids": List(List(Value("int32"))), "target_logprobs": List(List(Value(logprob_dtype))),
        "target_mask": List(List(Value("int8"))),
    })
    exported = {split: [axolotl_row(row, tokenizer, kd_temperature) for row in rows]
                for split, rows in rows_by_split.items()}
    save_splits(exported, features, folder)
    return sum(len(row["input_ids"]) for rows in exported.values() for row in rows)
