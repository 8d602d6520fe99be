"""From a server's log-probs to the student's token ids: the exact mapping the soft-label stage relies on.

Every token a teacher returns becomes a student id exactly or not at all: vLLM's `return_tokens_as_token_ids`
gives `token_id:N`; otherwise each token's `bytes` (or its text) are looked up in the Qwen2.5 vocabulary, byte
for byte (Qwen2.5-7B and -72B share one tokenizer). A token the vocabulary cannot hold means the teacher is not a
Qwen2.5 model (ForeignTokenizer: the run stops); a piece that cannot be mapped exactly (lossily decoded, empty,
shared by two tokens) is reported with its reason, never re-tokenised loosely. A row of soft labels keeps the k
most likely alternatives sorted by log-prob, the answer token always among them, padded with id -1 and
log-prob -inf. prep.stages.softlabels turns these rows into cache and dataset rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prep.api.settings import ClientError
from prep.qwen import END_OF_TEXT, IM_END
from prep.tokenizer import token_bytes

TOKEN_ID_PREFIX = "token_id:"
_LOSSY = "\ufffd".encode("utf-8")       # what a byte piece becomes when a server decodes it on its own


class ForeignTokenizer(ClientError):
    """The teacher's tokens are not the student's: soft labels cannot be mapped, the run stops."""

    def __init__(self, problem: str):
        super().__init__(f"{problem}, so the run stops: a teacher with another tokenizer needs "
                         f"softlabels.teacher_tokenizer: foreign (its top-k aligned onto the student's tokens, "
                         f"docs/HOSTED_TEACHER.md); one that returns no log-probs can only give text labels "
                         f"(python -m launch.teacher)")



class VocabIndex:
    """Exact lookups between token bytes and student ids (byte-level BPE tokens and added tokens)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.im_end = tokenizer.convert_tokens_to_ids(IM_END)
        self.end_ids = {self.im_end, tokenizer.convert_tokens_to_ids(END_OF_TEXT)}
        id_bytes = token_bytes(tokenizer)
        by_bytes: dict[bytes, int | None] = {}
        for token_id, raw in id_bytes.items():
            by_bytes[raw] = None if raw in by_bytes else token_id   # a collision would make bytes ambiguous
        self.by_bytes, self.id_bytes = by_bytes, id_bytes
        self.longest = max(len(raw) for raw in by_bytes)

    def bytes_of(self, token_id: int) -> bytes:
        """The exact bytes of a student token (an added token's: its text)."""
        return self.id_bytes[token_id]

    def exact_id(self, raw: bytes) -> int | None:
        """The one student token whose bytes are RAW, or None."""
        return self.by_bytes.get(raw)

    def longest_prefix(self, raw: bytes) -> int:
        """The longest student token whose bytes start RAW (byte-level BPE holds every single byte, so one does)."""
        for size in range(min(len(raw), self.longest), 0, -1):
            token_id = self.by_bytes.get(raw[:size])
            if token_id is not None:
                return token_id
        raise ValueError(f"no student token starts {raw!r}")

    def lookup(self, entry: dict[str, Any], token_ids: bool) -> tuple[int | None, str]:
        """(student id, '') for one logprob entry, or (None, why it cannot be mapped exactly).

        Raises ForeignTokenizer when the entry names a token the student's vocabulary cannot hold.
        """
        token = entry.get("token")
        if token_ids and isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX):
            token_id = int(token[len(TOKEN_ID_PREFIX):])
            if not 0 <= token_id < self.vocab_size:
                raise ForeignTokenizer(f"the teacher returned token id {token_id}, outside the student's "
                                       f"{self.vocab_size}-row vocabulary")
            return token_id, ""
        raw = bytes(entry["bytes"]) if entry.get("bytes") is not None else str(token or "").encode("utf-8")
        if not raw:
            return None, "an incomplete UTF-8 piece (the server reported it as empty text)"
        if _LOSSY in raw:
            return None, "text holding U+FFFD (a byte piece the server decoded lossily)"
        if raw not in self.by_bytes:
            return None, "unknown"
        token_id = self.by_bytes[raw]
        return (token_id, "") if token_id is not None else (None, "bytes shared by two tokens")

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([token_id]) for token_id in ids]


@dataclass
class Position:
    """One answer position as the server reported it, in student ids."""

    chosen: int | None            # the token the teacher emitted (None: not exactly mappable)
    chosen_logprob: float | None
    why: str                      # why `chosen` is None
    ids: list[int]                # mapped alternatives, as listed
    logprobs: list[float]
    dropped: int = 0              # alternatives that could not be mapped exactly


def positions_from_chat(content: list[dict[str, Any]], vocab: VocabIndex, token_ids: bool) -> list[Position]:
    """Chat `logprobs.content` -> Positions. Stops at the first chosen token that cannot be mapped
    (its successors' alternatives were decoded in its context and cannot be trusted either)."""
    positions = []
    for index, entry in enumerate(content):
        chosen, why = vocab.lookup(entry, token_ids)
        if why == "unknown":
            shown = bytes(entry.get("bytes") or []) or str(entry.get("token")).encode()
            raise ForeignTokenizer(f"the teacher's token {shown!r} (answer token {index}) is not a Qwen2.5 token")
        ids, logprobs, seen, dropped = [], [], set(), 0
        for alternative in entry.get("top_logprobs") or []:
            token_id, _ = vocab.lookup(alternative, token_ids)
            if token_id is None:
                dropped += 1
            elif token_id not in seen:
                seen.add(token_id)
                ids.append(token_id)
                logprobs.append(float(alternative["logprob"]))
        logprob = entry.get("logprob")
        positions.append(Position(chosen, None if logprob is None else float(logprob), why, ids, logprobs, dropped))
        if chosen is None:
            break
    return positions


def topk_row(position: Position, target: int, k: int) -> tuple[list[int], list[float]]:
    """The k most likely (sorted descending, ties in server order), the target always included when its
    log-prob is known, padded with -1 / -inf."""
    pairs = sorted(zip(position.logprobs, position.ids), key=lambda pair: -pair[0])[:k]
    missing = target not in {token_id for _, token_id in pairs}
    if missing and position.chosen == target and position.chosen_logprob is not None:
        pairs = sorted(pairs[: k - 1] + [(position.chosen_logprob, target)], key=lambda pair: -pair[0])
    ids = [token_id for _, token_id in pairs] + [-1] * (k - len(pairs))
    logprobs = [round(logprob, 5) for logprob, _ in pairs] + [float("-inf")] * (k - len(pairs))
    return ids, logprobs
