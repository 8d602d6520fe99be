"""Per-token weights for the answer: more weight where the diagnosis and its evidence are.

w_t is 0 on prompt tokens (they carry no label), 1 on ordinary answer tokens, `w_diseases` on the
tokens inside the `diseases` value, and `w_terms` on tokens of lexicon terms that also occur in the
case (the findings that justify the diagnosis). Where both apply, the larger weight wins.
With `case_weight: agreement` every weight of a case is then multiplied by the case's agreement
(custom_losses.kd.trainer.build_kd_features), so answers the teacher's samples agreed on teach more.
Spans are found on the answer's characters and mapped to tokens through the tokenizer's offsets,
so the weights follow the exact tokens the model is trained on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from prep.paths import resolve_path
from prep.qwen import IM_END

DEFAULT_LEXICON = "data/medical_terms.txt"
CASE_WEIGHTS = ("none", "agreement")


@dataclass(frozen=True)
class TokenWeightConfig:
    w_diseases: float = 2.0
    w_terms: float = 1.5
    lexicon_path: str | None = DEFAULT_LEXICON
    case_weight: str = "none"     # none | agreement: the soft-label row's `agreement` scales its tokens' weights

    def __post_init__(self) -> None:
        if self.w_diseases < 0 or self.w_terms < 0:
            raise ValueError("token weights w_diseases and w_terms must be >= 0")
        if self.case_weight not in CASE_WEIGHTS:
            raise ValueError(f"key 'case_weight': must be one of {', '.join(CASE_WEIGHTS)}, got {self.case_weight!r}")


@lru_cache(maxsize=8)
def load_lexicon(path: str | None) -> tuple[str, ...]:
    """Terms, longest first (so a longer term claims its characters before a shorter one inside it)."""
    if not path:
        return ()
    terms = {line.strip() for line in resolve_path(path).read_text(encoding="utf-8-sig").splitlines()}
    return tuple(sorted((t for t in terms if t and not t.startswith("#")), key=lambda t: (-len(t), t)))


def diseases_value_span(answer_text: str) -> tuple[int, int]:
    """Character span [start, end) of the `diseases` string value inside an answer's JSON text.

    Decoded with the JSON decoder rather than searched for, so a reason that mentions "diseases"
    or holds escaped quotes cannot fool it.
    """
    decoder = json.JSONDecoder(strict=False)
    position = answer_text.index("{") + 1
    while True:
        while answer_text[position] in " \t\r\n,":
            position += 1
        if answer_text[position] == "}":
            raise ValueError("the answer JSON has no 'diseases' key")
        key, position = decoder.raw_decode(answer_text, position)
        while answer_text[position] in " \t\r\n:":
            position += 1
        value_start = position
        _, position = decoder.raw_decode(answer_text, position)
        if key == "diseases":
            return value_start + 1, position - 1  # inside the quotes


def term_spans(answer_text: str, case_text: str, lexicon: tuple[str, ...]) -> list[tuple[int, int]]:
    """Spans of lexicon terms that occur in both the answer and the case (non-overlapping, longest first)."""
    taken = [False] * len(answer_text)
    spans = []
    for term in lexicon:
        if term not in case_text:
            continue
        start = answer_text.find(term)
        while start != -1:
            end = start + len(term)
            if not any(taken[start:end]):
                spans.append((start, end))
                taken[start:end] = [True] * len(term)
            start = answer_text.find(term, end)
    return sorted(spans)


@dataclass(frozen=True)
class AnswerTokens:
    ids: list[int]            # assistant content tokens, then <|im_end|>
    weights: list[float]      # one per token
    in_diseases: list[bool]   # the token carries part of the diseases value (for logging the weight share)


def answer_token_weights(tokenizer, answer_text: str, case_text: str, config: TokenWeightConfig) -> AnswerTokens:
    """Token ids of the assistant content followed by <|im_end|>, and one weight per token.

    The content is tokenised on its own: in the ChatML rendering it sits between
    `<|im_start|>assistant\\n` and the special `<|im_end|>`, and Qwen's pre-tokenizer splits at
    both, so these are exactly the tokens of the full conversation.
    """
    encoded = tokenizer(answer_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    disease_start, disease_end = diseases_value_span(answer_text)
    terms = term_spans(answer_text, case_text, load_lexicon(config.lexicon_path))
    weights, in_diseases = [], []
    for start, end in offsets:
        weight = 1.0
        in_value = start < disease_end and end > disease_start
        if in_value:
            weight = max(weight, config.w_diseases)
        if any(start < term_end and end > term_start for term_start, term_end in terms):
            weight = max(weight, config.w_terms)
        weights.append(weight)
        in_diseases.append(in_value)
    ids.append(tokenizer.convert_tokens_to_ids(IM_END))
    weights.append(1.0)
    in_diseases.append(False)
    return AnswerTokens(ids, weights, in_diseases)
