"""Soft labels from a teacher with another tokenizer: its top-k, aligned onto the student's tokens by byte offsets.

A hosted API (DeepSeek-V3's `deepseek-chat`, up to 20 `top_logprobs`) returns, per token it wrote, the token's
bytes, its log-prob and its k most likely alternatives, all in *its* vocabulary. The student keeps the answer
text exactly as the teacher wrote it, re-tokenised by Qwen2.5; this module says, for every student position,
which student ids the teacher's alternatives stand for. It needs nothing of the teacher but the bytes of each
token (no teacher tokenizer, no full logits), which is what an API gives.

Why not TRL's GOLD or tokenkit's ALM: both need the teacher's full distribution (GOLD merges probabilities over
aligned token groups and matches the unaligned ones by sorted probabilities, ULD-style, with the teacher's
logits in memory; ALM compares the likelihoods of aligned spans, which needs every token's probability under
both models, and chunk likelihoods of text the teacher did not write). From an API's top-k only the written
text's tokens and a few alternatives per position are known, so the mapping below works per student position,
on the teacher's distribution at the same byte offset:

For student token j, starting at byte o_j of the answer, let teacher token i be the one covering o_j (it starts
at b_i <= o_j) and p = answer[b_i:o_j] the part of it already written (empty when both tokenizers start a token
at o_j). Each alternative c of teacher position i (bytes x_c, log-prob l_c):
  - inconsistent: x_c does not start with p. It contradicts the text before o_j: left out, and not counted.
  - the chosen token (the one the teacher wrote): its mass goes to the student's own token j, which is what the
    text goes on with, whatever the two tokenizers' boundaries are.
  - ends at o_j (x_c == p): the teacher's next token would decide; unknown here, so its mass is tail.
  - otherwise r = x_c[len(p):] goes to the longest student token that is a prefix of r ("is one Qwen token"
    when r is one, else the Qwen token it starts with). Byte-level BPE holds all 256 bytes, so some token always
    matches, including for pieces that split a UTF-8 character.
Alternatives landing on one student id are summed (log-sum-exp). When p is not empty the row is the teacher's
distribution *conditioned on p*: each log-prob minus log Z, Z the total probability of the consistent
alternatives in the top-k (the true Z, over the whole vocabulary, is at least that, so these conditionals are
upper estimates). Mass outside the row (what did not fit into the top-k, tail candidates) is the tail bucket
that `kd_support: tail` trains; `renorm` ignores it.

What is exact and what is approximated:
  - exact: the answer text and its student tokens; the teacher's probabilities of its own tokens; a position
    where both tokenizers cut at o_j and the teacher's token is the student's (same bytes) with every
    alternative one whole student token. With a Qwen-tokenised teacher every position is of this kind and the
    rows equal prep.stages.softlabels' same-tokenizer rows (tests/test_cross_tokenizer.py).
  - approximated: an alternative's event "the teacher writes x_c next" stands for "the student writes the
    token x_c starts with", though the student could also write a longer token starting with x_c; a position
    inside a teacher token uses the conditional above; the teacher was conditioned on its own tokenization of
    the prefix, not the student's (the same text).
Each position records how its targets were built, one letter per answer token (`target_kinds`):
  e  exact (as above);  m  mapped (at least one alternative mapped, merged or conditioned);
  t  tail (only the student's own token got mass: every alternative was tail or inconsistent).
The end of the answer: the teacher's end-of-turn entry, when the API returns one, is the student's <|im_end|>
row; its alternatives that are Qwen tokens byte for byte stay those ids, a teacher end token named in
`softlabels.teacher_end_tokens` becomes <|im_end|>. Without that entry the <|im_end|> position has only the
student's token (kind t).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

from prep.stages.softlabel_tokens import Position, VocabIndex

EXACT, MAPPED, TAIL = "e", "m", "t"


class Misaligned(ValueError):
    """The teacher's tokens do not spell the answer (or the student's tokens do not): no row, with the reason."""


@dataclass
class TeacherToken:
    """One teacher position: the token it wrote and its alternatives, as bytes."""

    raw: bytes
    logprob: float | None
    alternatives: list[tuple[bytes, float]]


def entry_bytes(entry: dict[str, Any]) -> bytes:
    """A logprob entry's exact bytes: the API's `bytes` when given (raw, even for a piece that splits a character),
    else its text (which a server may have decoded lossily; such a piece then fails to spell the answer)."""
    if entry.get("bytes") is not None:
        return bytes(entry["bytes"])
    return str(entry.get("token") or "").encode("utf-8")


def teacher_tokens(content: list[dict[str, Any]]) -> list[TeacherToken]:
    """Chat `logprobs.content` -> TeacherTokens (alternatives in the order listed)."""
    tokens = []
    for entry in content:
        alternatives = [(entry_bytes(alt), float(alt["logprob"])) for alt in entry.get("top_logprobs") or []
                        if alt.get("logprob") is not None]
        logprob = entry.get("logprob")
        tokens.append(TeacherToken(entry_bytes(entry), None if logprob is None else float(logprob), alternatives))
    return tokens


def split_end(tokens: list[TeacherToken], answer: bytes, end_tokens: set[bytes]) -> tuple[list[TeacherToken],
                                                                                          TeacherToken | None]:
    """The tokens that spell ANSWER, and the end-of-turn entry after them (None when the API did not return one).
    Raises Misaligned when they spell something else."""
    spelled, count = b"", 0
    while count < len(tokens) and len(spelled) < len(answer):
        spelled += tokens[count].raw
        count += 1
    if spelled != answer:
        where = next((i for i, (a, b) in enumerate(zip(spelled, answer)) if a != b), min(len(spelled), len(answer)))
        raise Misaligned(f"the teacher's tokens spell other text than its answer from byte {where} "
                         f"({spelled[where:where + 12]!r} vs {answer[where:where + 12]!r})")
    rest = tokens[count:]
    if not rest:
        return tokens[:count], None
    if len(rest) == 1 and (rest[0].raw in end_tokens or not rest[0].raw):
        return tokens[:count], rest[0]
    raise Misaligned(f"{len(rest)} log-prob entries after the answer's text ({rest[0].raw[:20]!r}...), not one "
                     f"end-of-turn token (softlabels.teacher_end_tokens)")


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(value - top) for value in values))


def _candidates(token: TeacherToken) -> list[tuple[bytes, float, bool]]:
    """(bytes, log-prob, is the chosen token) in listed order; the chosen token appended when the API left it out."""
    listed = [(raw, logprob, raw == token.raw) for raw, logprob in token.alternatives]
    if token.logprob is not None and not any(chosen for _, _, chosen in listed):
        listed.append((token.raw, token.logprob, True))
    return listed


def student_offsets(answer_ids: list[int], vocab: VocabIndex, answer: bytes) -> list[int]:
    """Byte offset of each of the student's answer tokens (the content tokens, without <|im_end|>)."""
    pieces = [vocab.bytes_of(token_id) for token_id in answer_ids]
    if b"".join(pieces) != answer:
        raise Misaligned("the student's tokenizer does not spell the answer byte for byte (it normalises the text)")
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return offsets


def _position(target: int, chosen: int | None, candidates: list[tuple[int, float]], exact: bool, shift: float = 0.0,
              tail: int = 0) -> tuple[Position, str]:
    """The Position of student token TARGET from its CANDIDATES (student id, teacher log-prob), summed per id in
    first-seen order, each minus SHIFT; CHOSEN: the id the teacher's own token went to (None: not among them).
    Its kind: EXACT when EXACT holds and no two candidates shared an id."""
    mass: dict[int, list[float]] = {}
    for token_id, logprob in candidates:
        mass.setdefault(token_id, []).append(logprob)
    merged = {token_id: _logsumexp(values) - shift for token_id, values in mass.items()}
    exact = exact and all(len(values) == 1 for values in mass.values())
    kind = EXACT if exact else (TAIL if set(merged) == {target} else MAPPED)
    chosen_logprob = merged.get(chosen) if chosen is not None else None
    return Position(chosen if chosen is not None else target, chosen_logprob, "", list(merged),
                    list(merged.values()), tail), kind


def align_position(token: TeacherToken, written: bytes, student_id: int, student_bytes: bytes,
                   vocab: VocabIndex) -> tuple[Position, str]:
    """The student position whose token (STUDENT_ID, STUDENT_BYTES) starts after WRITTEN, the part of teacher
    TOKEN already written; its Position (student ids, log-probs) and kind (module docstring)."""
    candidates: list[tuple[int, float]] = []
    consistent: list[float] = []
    tail, chosen_seen = 0, False
    exact = not written and token.raw == student_bytes
    for raw, logprob, chosen in _candidates(token):
        if not raw.startswith(written):
            continue
        consistent.append(logprob)
        rest = raw[len(written):]
        if chosen:
            target, chosen_seen = student_id, True
        elif not rest:
            tail += 1
            exact = False
            continue
        else:
            target = vocab.longest_prefix(rest)
            exact = exact and len(vocab.bytes_of(target)) == len(rest)
        candidates.append((target, logprob))
    shift = _logsumexp(consistent) if written and consistent else 0.0
    # The teacher's own token has a log-prob unless the API gave none for it (then the student's has none either).
    return _position(student_id, student_id if chosen_seen else None, candidates, exact, shift, tail)


def end_position(token: TeacherToken | None, im_end: int, vocab: VocabIndex,
                 end_tokens: set[bytes]) -> tuple[Position, str]:
    """The <|im_end|> position: the teacher's end-of-turn entry, alternatives that are Qwen tokens byte for byte as
    those ids, teacher end tokens as <|im_end|>, other text by its longest Qwen prefix; none: only <|im_end|>."""
    if token is None:
        return Position(im_end, None, "", [], []), TAIL

    def target_of(raw: bytes) -> int:
        exact = vocab.exact_id(raw)
        if exact is not None:
            return exact
        if raw in end_tokens or not raw:
            return im_end
        return vocab.longest_prefix(raw)

    listed = _candidates(token)
    exact = all(vocab.exact_id(raw) is not None for raw, _, _ in listed)
    return _position(im_end, target_of(token.raw), [(target_of(raw), logprob) for raw, logprob, _ in listed], exact)


def aligned_positions(content: list[dict[str, Any]], answer: str, answer_ids: list[int], vocab: VocabIndex,
                      end_tokens: set[bytes]) -> tuple[list[Position], str]:
    """Chat `logprobs.content` of a teacher with any tokenizer -> one Position per student answer token (the content
    tokens, then <|im_end|>) and their kinds, one letter each. Raises Misaligned."""
    raw = answer.encode("utf-8")
    tokens, end = split_end(teacher_tokens(content), raw, end_tokens)
    content_ids = answer_ids[:-1]
    offsets = student_offsets(content_ids, vocab, raw)
    starts = [0]
    for token in tokens[:-1]:
        starts.append(starts[-1] + len(token.raw))
    positions, kinds = [], []
    for token_id, offset in zip(content_ids, offsets):
        index = bisect.bisect_right(starts, offset) - 1   # the last teacher token starting at or before it
        token = tokens[index]
        student_bytes = vocab.bytes_of(token_id)
        position, kind = align_position(token, raw[starts[index]:offset], token_id, student_bytes, vocab)
        positions.append(position)
        kinds.append(kind)
    position, kind = end_position(end, answer_ids[-1], vocab, end_tokens)
    positions.append(position)
    kinds.append(kind)
    return positions, "".join(kinds)
