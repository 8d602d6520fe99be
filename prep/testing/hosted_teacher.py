"""Test doubles of hosted teacher APIs, served by prep.testing.fault_server: what the soft-label stage meets when
its teacher is not our own vLLM server.

Two kinds (HostedTeacher's `tokenizer_kind`):

- "qwen" plays DashScope's OpenAI-compatible Qwen2.5-72B: Qwen2.5 tokens, but none of vLLM's extensions. Chat
  `logprobs.content` entries carry `token` (the tokenizer's lossy decode of the one id: U+FFFD for a partial
  UTF-8 piece) and `bytes` (the token's exact bytes), never `token_id:N`; `top_logprobs` above the cap (5) is a
  400 naming it; /v1/completions is a 404 (a hosted chat API cannot score given text).
- "foreign" plays DeepSeek's deepseek-chat: the answer text cut by `foreign_tokens`, a toy tokenizer that is not
  Qwen's, up to 20 top_logprobs, `<｜end▁of▁sentence｜>` as the stop token.

With `upstream` (a vLLM server's /v1 URL) the answer comes from it: in qwen mode its chat logprobs, asked for as
token ids and rewritten into the hosted form; in foreign mode its text only, re-cut by the toy tokenizer. Without,
the text is the server's answer_fn (or a scripted {"answer": TEXT}) and the log-probs are synthesised:
deterministic, sorted descending, distinct, summing below 1, the chosen token always listed; max_tokens cuts the
answer (finish_reason "length"), as a real API does.

    python -m launch.fault_server --hosted qwen [--top-logprobs-cap 5] [--upstream http://127.0.0.1:8000/v1]
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from prep.qwen import END_OF_TEXT_ID, IM_END_ID
from prep.testing.fault_server import FaultServer, StatusError, default_answer
from prep.tokenizer import token_bytes

KINDS = ("qwen", "foreign")
TOP_LOGPROBS_CAPS = {"qwen": 5, "foreign": 20}          # DashScope's and DeepSeek's limits
DEFAULT_MODELS = {"qwen": "qwen2.5-72b-instruct", "foreign": "deepseek-chat"}
FOREIGN_END_TOKEN = "<｜end▁of▁sentence｜>"               # DeepSeek-V3's end of sequence (full-width bars)
TOKEN_ID_PREFIX = "token_id:"
# Pieces of other text for the foreign alternatives (then `#0`, `#1`, ... as many as a cap asks for).
_OTHER_PIECES = ("的", "，", "\n", " the", "病", "ing", "。", "炎症", "}", " ", "患者", "咳", "发热", "：", "ase",
                 "、", "1", "慢性", "急性", "a", "症状", " of", "诊断", "是")
_LONE_BYTES = (b"\xe5", b"\x8b")          # a lead byte and a continuation byte: invalid UTF-8 alone
_SPLIT_EVERY = 5                          # a multi-byte character whose code point % 5 == 0 is cut at its first byte


def _unit(*parts: object) -> float:
    """A number in [0, 1) fixed by PARTS: deterministic across runs and processes (unlike hash())."""
    digest = hashlib.sha256("|".join(map(repr, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def _ranked_logprobs(count: int, *seed: object) -> tuple[list[float], int]:
    """COUNT strictly decreasing log-probs whose probabilities sum below 1, and the rank the chosen token takes
    (1 for about a quarter of positions when COUNT >= 2, so the chosen token is not always the top one)."""
    top = 0.4 + 0.55 * _unit("top", *seed)       # > 1/3, so (1 - top) / 2 < top keeps the order strict
    probabilities = [top] + [(1 - top) * 0.5 ** i for i in range(1, max(count, 1))]
    rank = 1 if count >= 2 and _unit("rank", *seed) < 0.25 else 0
    return [math.log(p) for p in probabilities], rank


def _entry(raw: bytes, logprob: float, text: str | None = None) -> dict[str, Any]:
    return {"token": raw.decode("utf-8", errors="replace") if text is None else text, "logprob": logprob,
            "bytes": list(raw)}


def _with_alternatives(chosen: dict[str, Any], others: list[dict[str, Any]], k: int, *seed: object
                       ) -> dict[str, Any]:
    """CHOSEN (an entry without its logprob) with k top_logprobs: it and the first k - 1 of OTHERS (distinct
    tokens, in order of preference), sorted descending."""
    logprobs, rank = _ranked_logprobs(k, *seed)
    listed = others[:max(k - 1, 0)]
    listed.insert(rank, chosen)
    top = [{**entry, "logprob": lp} for entry, lp in zip(listed, logprobs)]
    return {**chosen, "logprob": logprobs[rank], "top_logprobs": top if k else []}


# ---- the toy foreign tokenizer ------------------------------------------------------------------------------------
def foreign_tokens(text: str) -> list[bytes]:
    """TEXT cut into the toy foreign tokenizer's pieces; their concatenation is exactly text.encode("utf-8").

    Rules, left to right over runs of ASCII and of non-ASCII characters:
    1. an ASCII run is cut into 3-byte pieces from its start (the last may be shorter): `{"reason":"` gives
       `{"r`, `eas`, `on"`, `:"`, pieces that straddle Qwen's `{"` | `reason` | `":"` boundaries;
    2. a non-ASCII run is cut into pieces of 2 characters, except that a character whose code point % 5 == 0
       is cut at the byte level into its first byte and its remaining bytes (two pieces of partial UTF-8, on
       their own), and the pairing starts afresh after it; a run of odd length ends in a 1-character piece.
    E.g. "热天a" (热 U+70ED: 28909 % 5 = 4; 天 U+5929: 22825 % 5 = 0) gives b"\\xe7\\x83\\xad", b"\\xe5", b"\\xa4\\xa9",
    b"a".
    """
    pieces: list[bytes] = []
    ascii_run, pending = "", ""

    def flush_pending() -> None:
        nonlocal pending
        if pending:
            pieces.append(pending.encode("utf-8"))
            pending = ""

    def flush_ascii() -> None:
        nonlocal ascii_run
        raw = ascii_run.encode("ascii")
        pieces.extend(raw[i:i + 3] for i in range(0, len(raw), 3))
        ascii_run = ""

    for char in text:
        if ord(char) < 0x80:
            flush_pending()
            ascii_run += char
            continue
        flush_ascii()
        if ord(char) % _SPLIT_EVERY == 0:
            flush_pending()
            raw = char.encode("utf-8")
            pieces += [raw[:1], raw[1:]]
        else:
            pending += char
            if len(pending) == 2:
                flush_pending()
    flush_ascii()
    flush_pending()
    return pieces


def _foreign_prefix(piece: bytes) -> bytes | None:
    """A strict prefix of PIECE: its first character when it holds two or more, else its first byte."""
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if len(text) >= 2:
        return text[0].encode("utf-8")
    return piece[:1] if len(piece) > 1 else None


def foreign_logprobs(text: str, k: int, end_entry: bool = True) -> list[dict[str, Any]]:
    """The `logprobs.content` the foreign teacher serves for TEXT with K top_logprobs (K already capped).

    Per piece the alternatives, in order of preference after the chosen piece: a strict prefix of it (its first
    character, or first byte), it extended to the end of the next character of the text (`\\n` at the end), a lone
    lead or continuation byte, then other text (_OTHER_PIECES, then `#0`, `#1`, ...); duplicates skipped. The end
    entry (last, when END_ENTRY) has the lone byte and the other text."""
    data = text.encode("utf-8")
    pieces = foreign_tokens(text)
    content, offset = [], 0
    for position, piece in enumerate(pieces):
        end = offset + len(piece)
        following = end + 1
        while following < len(data) and data[following] & 0xC0 == 0x80:     # to the next character boundary
            following += 1
        extension = data[offset:following] if end < len(data) else piece + b"\n"
        preferred = [_foreign_prefix(piece), extension, _LONE_BYTES[position % 2]]
        content.append(_foreign_entry(piece, preferred, k, position))
        offset = end
    if end_entry:
        end_raw = FOREIGN_END_TOKEN.encode("utf-8")
        content.append(_foreign_entry(end_raw, [_LONE_BYTES[len(pieces) % 2]], k, len(pieces),
                                      FOREIGN_END_TOKEN))
    return content


def _foreign_entry(piece: bytes, preferred: list[bytes | None], k: int, position: int,
                   text: str | None = None) -> dict[str, Any]:
    start = int(_unit("other", position, piece) * len(_OTHER_PIECES))
    others = [p.encode("utf-8") for p in _OTHER_PIECES[start:] + _OTHER_PIECES[:start]]
    seen, alternatives, filler = {piece}, [], 0
    for candidate in [*preferred, *others]:
        if candidate and candidate not in seen:
            seen.add(candidate)
            alternatives.append(_entry(candidate, 0.0))
    while len(alternatives) < k - 1:
        candidate, filler = f"#{filler}".encode(), filler + 1
        if candidate not in seen:
            seen.add(candidate)
            alternatives.append(_entry(candidate, 0.0))
    return _with_alternatives(_entry(piece, 0.0, text), alternatives, k, position, piece)


# ---- Qwen tokens in the hosted form -------------------------------------------------------------------------------
class QwenPieces:
    """Qwen2.5 token ids as a hosted API shows them: lossy text and exact bytes."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._bytes = token_bytes(tokenizer)
        self._cache: dict[int, tuple[str, bytes]] = {}

    def piece(self, token_id: int) -> tuple[str, bytes]:
        """(lossy text, exact bytes) of one id; ("", b"") for an id the tokenizer lacks (a padded model row)."""
        if token_id not in self._cache:
            raw = self._bytes.get(token_id, b"")
            self._cache[token_id] = (self.tokenizer.decode([token_id]) if raw else "", raw)
        return self._cache[token_id]

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.piece(token_id)
        return _entry(raw, logprob, text)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def qwen_logprobs(text: str, k: int, pieces: QwenPieces, end_entry: bool = True) -> list[dict[str, Any]]:
    """The synthesised `logprobs.content` of the hosted Qwen teacher for TEXT with K top_logprobs: the text's Qwen
    tokens (then `<|im_end|>` when END_ENTRY), each with k - 1 other ordinary tokens drawn from a hash."""
    ids = pieces.encode(text) + ([IM_END_ID] if end_entry else [])
    content = []
    for position, token_id in enumerate(ids):
        others, draw = [], 0
        while len(others) < k - 1:
            other = int(_unit("alt", position, token_id, draw) * END_OF_TEXT_ID)   # an ordinary (BPE) token
            draw += 1
            if other != token_id and other not in others:
                others.append(other)
        content.append(_with_alternatives(pieces.entry(token_id, 0.0), [pieces.entry(t, 0.0) for t in others], k,
                                          position, token_id))
    return content


# ---- the server's hooks -------------------------------------------------------------------------------------------
class HostedTeacher:
    """A hosted teacher API of kind TOKENIZER_KIND ("qwen" or "foreign") for FaultServer: `respond` is its body_fn,
    `finish` its finish_fn (log-probs for scripted answers too). MAX_TOP_LOGPROBS: the cap (default 5 for qwen, 20
    for foreign); UPSTREAM: a vLLM /v1 URL to take answers from (asked for UPSTREAM_MODEL, default the request's
    model); ANSWER_FN: the text without upstream; END_ENTRY: a last entry for the stop token, as vLLM sends."""

    def __init__(self, tokenizer_kind: str = "qwen", max_top_logprobs: int | None = None,
                 upstream: str | None = None, *, tokenizer: Any = None,
                 answer_fn: Callable[[dict], str] = default_answer, end_entry: bool = True,
                 upstream_model: str | None = None, timeout_s: float = 300.0):
        if tokenizer_kind not in KINDS:
            raise ValueError(f"tokenizer_kind must be one of {', '.join(KINDS)}, not {tokenizer_kind!r}")
        self.kind = tokenizer_kind
        self.max_top_logprobs = TOP_LOGPROBS_CAPS[tokenizer_kind] if max_top_logprobs is None else max_top_logprobs
        self.upstream, self.upstream_model, self.timeout_s = upstream, upstream_model, timeout_s
        self.answer_fn, self.end_entry = answer_fn, end_entry
        self.pieces: QwenPieces | None = None
        if tokenizer_kind == "qwen":
            if tokenizer is None:
                from prep.tokenizer import load_tokenizer

                tokenizer = load_tokenizer()
            self.pieces = QwenPieces(tokenizer)

    def top_logprobs(self, request: dict[str, Any]) -> int:
        """The request's top_logprobs (0 when absent); StatusError 400 above the cap, as the hosted API says it."""
        k = request.get("top_logprobs")
        if k is None:
            return 0
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise StatusError(f"top_logprobs must be a non-negative integer, got {k!r}", 400, "invalid_request_error")
        if k > self.max_top_logprobs:
            raise StatusError(f"top_logprobs must be less than or equal to {self.max_top_logprobs}", 400,
                              "invalid_request_error")
        return k

    def logprobs_content(self, text: str, k: int, stopped: bool = True) -> list[dict[str, Any]]:
        """The synthesised `logprobs.content` for TEXT (the stop token's entry last only when it STOPPED)."""
        if self.pieces is not None:
            return qwen_logprobs(text, k, self.pieces, self.end_entry and stopped)
        return foreign_logprobs(text, k, self.end_entry and stopped)

    async def respond(self, path: str, request: dict[str, Any], received: int) -> dict[str, Any]:
        """FaultServer's body_fn: a chat completion, or StatusError (404 for /v1/completions, 400 over the cap)."""
        if not path.endswith("/chat/completions"):
            raise StatusError(f"{path} not found: this hosted chat API cannot score given text (no prompt_logprobs)",
                              404, "NotFoundError")
        k = self.top_logprobs(request)
        if self.upstream is None:
            body = _chat_body(request, self.answer_fn(request), received)
            return self.finish(request, body)
        forwarded = {key: value for key, value in request.items()
                     if key not in ("return_tokens_as_token_ids", "logprobs", "top_logprobs")}
        forwarded["model"] = self.upstream_model or request.get("model")
        if self.kind == "qwen":     # ask vLLM for ids (exact), then show them as the hosted API would
            forwarded.update(logprobs=True, top_logprobs=k, return_tokens_as_token_ids=True)
        body = await asyncio.to_thread(self._post, forwarded)
        body["model"] = request.get("model")
        tokens = 0
        for choice in body.get("choices") or []:
            if self.kind == "foreign":      # vLLM's text only, cut by the toy tokenizer
                tokens += self._synthesise(choice, request, k)
            elif request.get("logprobs"):
                for entry in (choice.get("logprobs") or {}).get("content") or []:
                    self._rewrite(entry)
                    for alternative in entry.get("top_logprobs") or []:
                        self._rewrite(alternative)
            else:
                choice["logprobs"] = None
        if self.kind == "foreign" and isinstance(body.get("usage"), dict):
            body["usage"]["completion_tokens"] = tokens
            body["usage"]["total_tokens"] = (body["usage"].get("prompt_tokens") or 0) + tokens
        return body

    def finish(self, request: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """FaultServer's finish_fn: BODY (an answer the server built) with this teacher's log-probs and token
        count (a reasoning trace still counted by its characters); StatusError 400 over the cap."""
        k = self.top_logprobs(request)
        tokens = 0
        for choice in body.get("choices") or []:
            message = choice.get("message") or {}
            tokens += self._synthesise(choice, request, k)
            tokens += len(message.get("reasoning_content") or message.get("reasoning") or "")
        if isinstance(body.get("usage"), dict):
            body["usage"]["completion_tokens"] = tokens
            body["usage"]["total_tokens"] = (body["usage"].get("prompt_tokens") or 0) + tokens
        return body

    def _synthesise(self, choice: dict[str, Any], request: dict[str, Any], k: int) -> int:
        """CHOICE's logprobs synthesised from its text (None when not asked for); how many tokens it has. Past the
        request's max_tokens the answer is cut as a real API cuts it (finish_reason "length", no end entry), its
        content the kept bytes decoded lossily."""
        content = self.logprobs_content(_text(choice), k, choice.get("finish_reason", "stop") == "stop")
        limit = request.get("max_completion_tokens") or request.get("max_tokens")
        if isinstance(limit, int) and 0 < limit < len(content):
            content = content[:limit]
            choice["finish_reason"] = "length"
            choice["message"]["content"] = b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace")
        choice["logprobs"] = {"content": content} if request.get("logprobs") else None
        return len(content)

    def _rewrite(self, entry: dict[str, Any]) -> None:
        """vLLM's `token_id:N` entry in place into the hosted form (lossy text, exact bytes, the same log-prob)."""
        token = entry.get("token")
        if not (isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX)):
            raise StatusError(f"the upstream returned token {token!r}, not {TOKEN_ID_PREFIX}N (is it vLLM?)", 502,
                              "upstream_error")
        text, raw = self.pieces.piece(int(token[len(TOKEN_ID_PREFIX):]))
        entry["token"], entry["bytes"] = text, list(raw)

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST PAYLOAD to the upstream's /chat/completions (in a worker thread); its error status passed on."""
        url = self.upstream.rstrip("/") + "/chat/completions"
        http = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"),
                                      headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(http, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", errors="replace")[:500]
            raise StatusError(f"upstream: {message}", err.code, "upstream_error") from None
        except (urllib.error.URLError, OSError) as err:
            raise StatusError(f"upstream {url} unreachable: {err}", 502, "upstream_error") from None


def _text(choice: dict[str, Any]) -> str:
    content = (choice.get("message") or {}).get("content")
    return content if isinstance(content, str) else ""


def _chat_body(request: dict[str, Any], content: str, received: int) -> dict[str, Any]:
    prompt = sum(len(str(m.get("content", ""))) for m in request.get("messages", []))
    return {"id": f"chatcmpl-hosted-{received}", "object": "chat.completion", "created": 0,
            "model": request.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                         "logprobs": None}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}}


def hosted_teacher_server(tokenizer_kind: str = "qwen", max_top_logprobs: int | None = None,
                          upstream: str | None = None, model: str | None = None, *, tokenizer: Any = None,
                          end_entry: bool = True, upstream_model: str | None = None,
                          **server_options: Any) -> FaultServer:
    """A FaultServer (not started) answering as a HostedTeacher of TOKENIZER_KIND, its model MODEL (default
    qwen2.5-72b-instruct or deepseek-chat); SERVER_OPTIONS go to FaultServer (answer_fn, latency_s, faults, ...),
    never its own `upstream`: the teacher does the proxying."""
    answer_fn = server_options.pop("answer_fn", default_answer)
    teacher = HostedTeacher(tokenizer_kind, max_top_logprobs, upstream, tokenizer=tokenizer, answer_fn=answer_fn,
                            end_entry=end_entry, upstream_model=upstream_model)
    server = FaultServer(model=model or DEFAULT_MODELS[tokenizer_kind], answer_fn=answer_fn,
                         body_fn=teacher.respond, finish_fn=teacher.finish, **server_options)
    server.teacher = teacher
    return server
