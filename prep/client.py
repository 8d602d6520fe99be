"""The one async client for OpenAI-compatible endpoints: teacher labels, soft labels and the student's predictions.

Three layers, each usable alone:
- `ChatClient`: one request at a time as the caller sees it; underneath, bounded concurrency,
  token-bucket limits on requests and tokens per minute, and our own retry policy (the SDK's is
  off) with exponential backoff, jitter and Retry-After, shared by every caller of the client.
- `check_endpoint`: a cheap preflight (GET /models) that turns a wrong URL, model or key into one
  sentence before any paid request.
- `run_cached`: an exactly-once, resumable runner: each finished item is appended to a JSONL cache
  under a key, and a later run asks only for the keys the cache lacks.

The answer constraint (`structured_output` recipe section) is built here from prep.answers, with
optional length bounds: a random-weight model needs short bounds to close its JSON quickly, a real
model needs none (a 1500-char bound took vLLM 40 s to compile per request).

API keys are read from the environment variable (or file) a recipe names, held by the SDK client
only, and scrubbed from every message this module produces.
"""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from prep.answers import _JSON_STRING_BODY, ANSWER_KEYS, ANSWER_REGEX
from prep.jsonio import JsonlAppender, read_appended

log = logging.getLogger("medkd.client")

# Statuses worth another try: the request was not served, and may be next time (every 5xx but 501 Not Implemented).
def retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or (status >= 500 and status != 501)


MAX_RETRY_AFTER_S = 600.0     # a server asking for longer than this is treated as down
PLACEHOLDER_KEY = "EMPTY"     # local servers without auth; the SDK refuses an empty key


# ---- settings ------------------------------------------------------------------------------------

@dataclass
class ClientSettings:
    """The `client:` section of teacher, soft-label and predict recipes."""

    base_url: str | None = None          # e.g. https://api.deepseek.com/v1; None when the recipe starts a server
    model: str | None = None             # the name the endpoint serves; None = the started server's served_model_name
    api_key_env: str | None = None       # NAME of the environment variable holding the key (never the key)
    api_key_file: str | None = None      # or a file holding only the key
    concurrency: int = 8                 # requests in flight at once
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None   # prompt + max_tokens, settled against the usage reported
    request_timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    max_retries: int = 8                 # per request, on 429/5xx/timeouts/dropped connections/garbled bodies
    backoff_base_s: float = 1.0          # first retry waits about this long, doubling up to backoff_max_s
    backoff_max_s: float = 60.0
    transport: Literal["aiohttp", "httpx"] = "aiohttp"   # aiohttp costs half the client CPU per request of httpx
    # Items started per request slot (concurrency): 2 keeps one item queued behind every request in
    # flight, so a slot that frees is refilled at once instead of waiting for the runner's next turn.
    in_flight_per_slot: int = 1
    # Items failing in a row (after their retries) that stop the run: the endpoint is down or refusing
    # everything, and going on would only pay for more failures. null = never stop.
    abort_after_failures: int | None = 50

    def __post_init__(self) -> None:
        checks = [("concurrency", self.concurrency >= 1, "must be at least 1"),
                  ("requests_per_minute", self.requests_per_minute is None or self.requests_per_minute > 0,
                   "must be positive or null"),
                  ("tokens_per_minute", self.tokens_per_minute is None or self.tokens_per_minute > 0,
                   "must be positive or null"),
                  ("request_timeout_s", self.request_timeout_s > 0, "must be positive"),
                  ("connect_timeout_s", self.connect_timeout_s > 0, "must be positive"),
                  ("max_retries", self.max_retries >= 0, "must be 0 or more"),
                  ("backoff_base_s", self.backoff_base_s > 0, "must be positive"),
                  ("backoff_max_s", self.backoff_max_s >= self.backoff_base_s, "must be at least backoff_base_s"),
                  ("in_flight_per_slot", self.in_flight_per_slot >= 1, "must be at least 1"),
                  ("abort_after_failures", self.abort_after_failures is None or self.abort_after_failures >= 1,
                   "must be at least 1 or null")]
        for name, ok, problem in checks:
            if not ok:
                raise ValueError(f"key 'client.{name}': {problem}")


@dataclass
class StructuredOutput:
    """The `structured_output:` recipe section: how the answer format is enforced at decode time.

    regex        vLLM's per-request regex (extra_body.structured_outputs.regex), compact JSON, reason first;
    json_schema  the OpenAI `response_format` json_schema (vLLM and OpenAI-style servers);
    json_object  `response_format: {type: json_object}` (hosted APIs such as DashScope and DeepSeek);
    none         no constraint; the parser and one repair turn do the rest.
    """

    kind: Literal["regex", "json_schema", "json_object", "none"] = "regex"
    max_reason_chars: int | None = None      # characters (JSON escapes count as one); null = unbounded
    max_diseases_chars: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_reason_chars", "max_diseases_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"key 'structured_output.{name}': must be at least 1 or null")


def _repeat(bound: int | None) -> str:
    return "+" if bound is None else f"{{1,{bound}}}"


def answer_regex(max_reason_chars: int | None = None, max_diseases_chars: int | None = None) -> str:
    """prep.answers.ANSWER_REGEX with optional length bounds on the two strings."""
    if max_reason_chars is None and max_diseases_chars is None:
        return ANSWER_REGEX
    reason, diseases = _repeat(max_reason_chars), _repeat(max_diseases_chars)
    return (r'\{"reason":"' + _JSON_STRING_BODY + reason + r'","diseases":"' + _JSON_STRING_BODY + diseases + r'"\}')


def answer_schema(max_reason_chars: int | None = None, max_diseases_chars: int | None = None) -> dict[str, Any]:
    """prep.answers.ANSWER_JSON_SCHEMA with optional maxLength bounds."""
    bounds = dict(zip(ANSWER_KEYS, (max_reason_chars, max_diseases_chars)))
    properties = {key: {"type": "string", "minLength": 1, **({"maxLength": bound} if bound else {})}
                  for key, bound in bounds.items()}
    return {"type": "object", "properties": properties, "required": list(ANSWER_KEYS), "additionalProperties": False}


def structured_output_params(section: StructuredOutput) -> dict[str, Any]:
    """Request parameters (extra_body or response_format) enforcing the answer format; part of every cache key."""
    if section.kind == "regex":
        regex = answer_regex(section.max_reason_chars, section.max_diseases_chars)
        return {"extra_body": {"structured_outputs": {"regex": regex}}}
    if section.kind == "json_schema":
        schema = answer_schema(section.max_reason_chars, section.max_diseases_chars)
        json_schema = {"name": "answer", "schema": schema, "strict": True}
        return {"response_format": {"type": "json_schema", "json_schema": json_schema}}
    if section.kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    return {}


# ---- errors and secrets --------------------------------------------------------------------------

class ClientError(RuntimeError):
    """A problem the user must fix (endpoint, model, key): one sentence, and the run stops."""


class RequestFailed(RuntimeError):
    """One request gave up (retries spent, or refused as bad); the item fails, the run goes on."""

    def __init__(self, message: str, reason: str, retries: int):
        super().__init__(message)
        self.reason, self.retries = reason, retries


def redact(text: str, secret: str | None) -> str:
    if secret and secret != PLACEHOLDER_KEY and len(secret) >= 4:
        text = text.replace(secret, "***")
    return text


def key_source(settings: ClientSettings) -> str:
    if settings.api_key_env:
        return f"environment variable {settings.api_key_env}"
    if settings.api_key_file:
        return f"key file {settings.api_key_file}"
    return "no key (set client.api_key_env or client.api_key_file)"


def resolve_api_key(settings: ClientSettings) -> str:
    """The key from the variable or file the recipe names; a placeholder for endpoints without auth."""
    if settings.api_key_env:
        value = os.environ.get(settings.api_key_env, "").strip()
        if value:
            return value
        if not settings.api_key_file:
            raise ClientError(f"environment variable {settings.api_key_env} is not set; export the API key for "
                              f"{settings.base_url or 'the endpoint'} in it (or name a key file in "
                              f"client.api_key_file)")
    if settings.api_key_file:
        path = Path(settings.api_key_file).expanduser()
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ClientError(f"cannot read the API key file {path} ({err.strerror}); fix client.api_key_file") \
                from None
        if not value:
            raise ClientError(f"the API key file {path} is empty; put the key in it or fix client.api_key_file")
        return value
    return PLACEHOLDER_KEY


def _server_message(err: Any, secret: str | None) -> str:
    body = getattr(err, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    message = message or getattr(err, "message", None) or str(err)
    return redact(" ".join(str(message).split()), secret)[:200]


# ---- rate limits ---------------------------------------------------------------------------------

class TokenBucket:
    """A per-minute budget refilled continuously, holding at most one second's worth.

    A request larger than the bucket waits for a full bucket and then borrows (the level goes
    negative), so the long-run rate holds for any request size. Waiters queue first come, first served.
    """

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    async def acquire(self, amount: float) -> None:
        async with self._lock:
            need = min(amount, self.capacity)
            self._refill()
            while self.level < need:
                await asyncio.sleep((need - self.level) / self.rate)
                self._refill()
            self.level -= amount

    def settle(self, delta: float) -> None:
        """Give back (positive) or charge (negative) the difference between an estimate and the real use."""
        self._refill()
        self.level = min(self.capacity, self.level + delta)


# ---- the client ----------------------------------------------------------------------------------

@dataclass
class ClientStats:
    requests: int = 0            # HTTP attempts sent
    succeeded: int = 0
    retries: int = 0
    retry_reasons: Counter = field(default_factory=Counter)
    failed: int = 0              # requests given up
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "succeeded": self.succeeded, "retries": self.retries,
                "retry_reasons": dict(self.retry_reasons), "failed_requests": self.failed,
                "tokens_in": self.prompt_tokens, "tokens_out": self.completion_tokens}


@dataclass
class ChatResult:
    text: str
    finish_reason: str | None
    usage: dict[str, int]                 # prompt_tokens, completion_tokens
    logprobs: Any                         # choices[0].logprobs(.content) exactly as the server sent it
    retries: int
    response: dict[str, Any]              # the whole JSON body (prompt_logprobs, other choices, ...)


class MalformedResponse(ValueError):
    pass


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _clean_text(text: Any) -> str:
    # A `\ud83d` escape without its pair decodes to a lone surrogate, which UTF-8 files cannot hold.
    text = text if isinstance(text, str) else ""
    return _LONE_SURROGATE.sub("\ufffd", text) if _LONE_SURROGATE.search(text) else text


def estimate_prompt_tokens(messages: list[dict[str, Any]] | str) -> int:
    """An upper-ish token count without a tokenizer: one per character (Chinese runs ~0.7-1 per character)."""
    if isinstance(messages, str):
        return len(messages)
    return sum(len(str(message.get("content") or "")) + 4 for message in messages)


class ChatClient:
    """Async chat/completions against one endpoint and model, with limits and retries shared by all callers.

    Use as `async with ChatClient(settings) as client: result = await client.chat(messages, temperature=0.7)`.
    Keyword arguments are OpenAI request parameters; `extra_body` is merged into the request body.
    """

    def __init__(self, settings: ClientSettings, api_key: str | None = None, seed: int | None = None):
        import httpx2
        from openai import AsyncOpenAI

        if not settings.base_url or not settings.model:
            raise ClientError("client.base_url and client.model must be set (or the recipe must start a server)")
        self.settings = settings
        self._secret = api_key if api_key is not None else resolve_api_key(settings)
        self._openai = AsyncOpenAI(
            base_url=settings.base_url, api_key=self._secret, max_retries=0,  # retries are ours
            timeout=httpx2.Timeout(settings.request_timeout_s, connect=settings.connect_timeout_s),
            http_client=_http_client(settings),
        )
        self._response_type = httpx2.Response
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._rpm = TokenBucket(settings.requests_per_minute) if settings.requests_per_minute else None
        self._tpm = TokenBucket(settings.tokens_per_minute) if settings.tokens_per_minute else None
        self._resume_at = 0.0        # a 429's Retry-After holds back every request, not just the one refused
        self._random = random.Random(seed)
        self.stats = ClientStats()

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self.settings.base_url!r}, model={self.settings.model!r})"

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._openai.close()

    def redact(self, text: str) -> str:
        return redact(text, self._secret)

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        body = self._body({"messages": messages}, params)
        data, retries = await self._post("/chat/completions", body, estimate_prompt_tokens(messages))
        choice = data["choices"][0]
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and "content" in logprobs:
            logprobs = logprobs["content"]
        return ChatResult(_clean_text(message.get("content")), choice.get("finish_reason"), self._usage(data),
                          logprobs, retries, data)

    async def completion(self, prompt: str | list[int], **params: Any) -> ChatResult:
        """/v1/completions (e.g. `prompt_logprobs` on vLLM); text and logprobs of the first choice."""
        body = self._body({"prompt": prompt}, params)
        estimate = estimate_prompt_tokens(prompt) if isinstance(prompt, str) else len(prompt)
        data, retries = await self._post("/completions", body, estimate)
        choice = data["choices"][0]
        return ChatResult(_clean_text(choice.get("text")), choice.get("finish_reason"), self._usage(data),
                          choice.get("logprobs"), retries, data)

    def _body(self, payload: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        extra = params.pop("extra_body", None) or {}
        body = {"model": self.settings.model, **payload, **{k: v for k, v in params.items() if v is not None}}
        body.update(extra)
        return body

    @staticmethod
    def _usage(data: dict[str, Any]) -> dict[str, int]:
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                "completion_tokens": int(usage.get("completion_tokens") or 0)}

    async def _post(self, path: str, body: dict[str, Any], prompt_estimate: int) -> tuple[dict[str, Any], int]:
        from openai import APIConnectionError, APIStatusError

        completion = int(body.get("max_tokens") or body.get("max_completion_tokens") or 0) * int(body.get("n") or 1)
        estimate = prompt_estimate + completion
        retries = 0
        while True:
            await self._wait_for_limits(estimate)
            retry_after, refused = None, None
            async with self._slots:
                self.stats.requests += 1
                try:
                    response = await self._openai.post(path, cast_to=self._response_type, body=body)
                    data = self._decode(response.content, path)
                except APIStatusError as err:
                    reason, retry_after = str(err.status_code), _retry_after(err.response.headers)
                    message = _server_message(err, self._secret)
                    if not retryable_status(err.status_code):
                        refused = err.status_code
                except APIConnectionError as err:  # APITimeoutError included
                    reason = _transport_failure(err)
                    message = (f"no answer within {self.settings.request_timeout_s:g} s" if reason == "timeout"
                               else self.redact(_describe_cause(err)))
                except ValueError as err:  # a garbled body: json.JSONDecodeError, MalformedResponse
                    reason, message = "malformed", self.redact(str(err))[:200]
                else:
                    self.stats.succeeded += 1
                    usage = self._usage(data)
                    self.stats.prompt_tokens += usage["prompt_tokens"]
                    self.stats.completion_tokens += usage["completion_tokens"]
                    if self._tpm and (usage["prompt_tokens"] or usage["completion_tokens"]):
                        self._tpm.settle(estimate - usage["prompt_tokens"] - usage["completion_tokens"])
                    return data, retries
            if refused is not None:  # raised here, outside the except clause, so no chained error carries the raw body
                self.stats.failed += 1
                self._raise_for_status(refused, message, retries)
            if retries >= self.settings.max_retries:
                self.stats.failed += 1
                raise RequestFailed(f"gave up after {retries + 1} attempts; last: {reason} ({message})", reason,
                                    retries)
            delay = self._delay(retries, retry_after)
            if reason == "429":
                self._resume_at = max(self._resume_at, time.monotonic() + delay)
            retries += 1
            self.stats.retries += 1
            self.stats.retry_reasons[reason] += 1
            log.info("retry %d/%d in %.2f s after %s: %s", retries, self.settings.max_retries, delay, reason, message)
            await asyncio.sleep(delay)

    async def _wait_for_limits(self, estimate: int) -> None:
        while (wait := self._resume_at - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        if self._rpm:
            await self._rpm.acquire(1)
        if self._tpm:
            await self._tpm.acquire(estimate)

    def _delay(self, retries: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        # Exponential backoff with "equal jitter": half fixed, half random, so retries spread out.
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** retries)
        return ceiling * (0.5 + 0.5 * self._random.random())

    def _decode(self, content: bytes, path: str) -> dict[str, Any]:
        data = json.loads(content)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise MalformedResponse(f"the {path} response has no choices")
        return data

    def _raise_for_status(self, status: int, message: str, retries: int) -> None:
        url, model = self.settings.base_url, self.settings.model
        if status in (401, 403):
            raise ClientError(f"{url} refused the API key (HTTP {status}: {message}); check that "
                              f"{key_source(self.settings)} holds a valid key for this endpoint")
        if status == 404:
            raise ClientError(f"{url} has no model '{model}' or no such route (HTTP 404: {message}); "
                              f"check client.model and client.base_url")
        raise RequestFailed(f"the endpoint refused the request (HTTP {status}: {message})", str(status), retries)


def _http_client(settings: ClientSettings) -> Any:
    """The SDK's HTTP client: its vendored aiohttp transport, or plain httpx2 (O(pool) work per request)."""
    import httpx2

    limits = httpx2.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency)
    if settings.transport == "aiohttp":
        try:
            from openai import DefaultAioHttpClient

            return DefaultAioHttpClient(limits=limits)
        except (ImportError, RuntimeError):
            log.warning("aiohttp is not installed; using the httpx transport")
    return httpx2.AsyncClient(limits=limits)


def _root_cause(err: BaseException) -> BaseException:
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


def _transport_failure(err: BaseException) -> str:
    """'timeout' or 'connection'. The aiohttp transport maps a dropped connection to a connect
    timeout, so the root cause decides, not the SDK's class."""
    root = _root_cause(err)
    if isinstance(root, TimeoutError) or "Timeout" in type(root).__name__:
        return "timeout"
    return "connection"


def _describe_cause(err: BaseException) -> str:
    cause = _root_cause(err)
    if cause is err:
        return str(err)
    text = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {text}" if text else f"{type(cause).__name__} (connection dropped)"


def _retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms`, or `retry-after` as seconds or an HTTP date; None if absent or absurd."""
    try:
        if headers.get("retry-after-ms"):
            seconds = float(headers["retry-after-ms"]) / 1000
        elif headers.get("retry-after"):
            value = headers["retry-after"]
            try:
                seconds = float(value)
            except ValueError:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        else:
            return None
    except (TypeError, ValueError):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


# ---- preflight -----------------------------------------------------------------------------------

async def check_endpoint_async(settings: ClientSettings, api_key: str | None = None,
                               attempts: int = 2) -> list[str] | None:
    """GET /models once (one retry on a dropped connection): the models served, or None if the endpoint lists none.

    Raises ClientError naming the fix for an unreachable endpoint, a refused key or an unlisted model.
    """
    import httpx2
    from openai import APIConnectionError, APIStatusError, AsyncOpenAI

    secret = api_key if api_key is not None else resolve_api_key(settings)
    timeout = min(settings.request_timeout_s, 30.0)
    client = AsyncOpenAI(base_url=settings.base_url, api_key=secret, max_retries=0,
                         timeout=httpx2.Timeout(timeout, connect=min(settings.connect_timeout_s, timeout)))
    problem, response = None, None
    try:
        for attempt in range(attempts):
            try:
                response = await client.get("/models", cast_to=httpx2.Response)
                break
            except APIStatusError as err:
                status, message = err.status_code, _server_message(err, secret)
                if status in (401, 403):
                    problem = (f"{settings.base_url} refused the API key (HTTP {status}: {message}); "
                               f"check that {key_source(settings)} holds a valid key for this endpoint")
                    break
                if status in (404, 405):
                    return None  # some providers do not list models; the first request will tell
                problem = (f"{settings.base_url} answered HTTP {status} to GET /models ({message}); "
                           f"check client.base_url or try again later")
            except APIConnectionError as err:
                problem = (f"cannot reach {settings.base_url} ({redact(_describe_cause(err), secret)}); "
                           f"check client.base_url and that the server is running")
            if attempt < attempts - 1:
                await asyncio.sleep(1.0)
    finally:
        await client.close()
    if response is None:
        # Raised outside the except clauses: no chained SDK error carries the server's raw words.
        raise ClientError(problem)
    try:
        data = json.loads(response.content)
        served = [str(item["id"]) for item in data["data"]]
    except (ValueError, KeyError, TypeError):
        return None
    if served and settings.model not in served:
        raise ClientError(f"model '{settings.model}' is not served at {settings.base_url} (it serves: "
                          f"{', '.join(served[:10])}); fix client.model")
    return served


def check_endpoint(settings: ClientSettings, api_key: str | None = None) -> list[str] | None:
    """Synchronous preflight, for callers outside an event loop."""
    return asyncio.run(check_endpoint_async(settings, api_key))


# ---- the exactly-once cache runner ---------------------------------------------------------------

def cache_key(**parts: Any) -> str:
    """A short digest of everything that determines an answer (ids, prompt hash, model, sampling, constraint)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def load_cache(cache_path: str | Path) -> dict[str, dict[str, Any]]:
    """key -> row of an append-only cache; a torn last line (killed writer) is dropped, the first row per key wins."""
    rows: dict[str, dict[str, Any]] = {}
    for row in read_appended(cache_path):
        rows.setdefault(row.get("key"), row)
    return rows


def archive_cache(cache_path: str | Path) -> Path | None:
    """Move a cache aside (for --fresh): paid-for answers are never deleted."""
    path = Path(cache_path)
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.{datetime.now():%Y%m%d-%H%M%S}.bak")
    path.rename(target)
    return target


@dataclass
class RunReport:
    total: int                       # items given
    cached: int                      # found in the cache, not asked
    asked: int                       # items started this run
    finished: int                    # items appended to the cache this run
    failed: list[dict[str, Any]]     # {"key", "item", "error", "reason"}: not cached, asked again next run
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        return {"items": self.total, "cached": self.cached, "asked": self.asked, "finished": self.finished,
                "failed": len(self.failed), "wall_s": round(self.wall_s, 3)}


def uncached(items: list[Any], key_fn: Callable[[Any], str], cache_path: str | Path) -> list[tuple[str, Any]]:
    """(key, item) for each item whose key the cache lacks, the first of any items sharing a key."""
    done, pending = set(load_cache(cache_path)), {}
    for item in items:
        key = key_fn(item)
        if key not in done and key not in pending:
            pending[key] = item
    return list(pending.items())


async def run_cached(
    items: Iterable[Any],
    key_fn: Callable[[Any], str],
    work_fn: Callable[[Any], Awaitable[dict[str, Any]]],
    cache_path: str | Path,
    *,
    max_in_flight: int = 16,
    stats: ClientStats | None = None,
    desc: str = "items",
    label_fn: Callable[[Any], Hashable] = repr,
    abort_after_failures: int | None = None,
    progress: bool = True,
    fsync_interval_s: float = 1.0,
) -> RunReport:
    """Run WORK_FN on every item whose key the cache lacks, appending each result as `{"key": ..., **row}`.

    Exactly once: a row is appended (and flushed to the OS, so a SIGKILL cannot lose it) as soon as
    its item finishes; a rerun skips every key already there, so only the items in flight at a
    kill are paid twice. fsync (power loss) happens at most every FSYNC_INTERVAL_S and at the end.
    A work_fn raising RequestFailed fails that item only (not cached, reported, retried next run);
    ClientError stops the run; ABORT_AFTER_FAILURES failures in a row stop it too (the stages pass their
    recipe's client.abort_after_failures; None never stops).

    One function on purpose: the task loop, the appender, the progress bar and the cancellation of
    what is still running (in `finally`, on any way out) share their state.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    items = list(items)
    pending = uncached(items, key_fn, cache_path)
    report = RunReport(len(items), len(items) - len(pending), len(pending), 0, [], 0.0)
    if not pending:
        report.wall_s = time.perf_counter() - started
        return report

    bar = tqdm(total=len(pending), desc=desc, unit="it", disable=not progress, dynamic_ncols=True, mininterval=0.5)
    appender = JsonlAppender(cache_path, fsync=False)
    queue = iter(pending)
    running: dict[asyncio.Task, tuple[str, Any]] = {}
    consecutive_failures, last_fsync = 0, time.monotonic()

    def launch() -> None:
        for key, item in queue:
            running[asyncio.ensure_future(work_fn(item))] = (key, item)
            if len(running) >= max_in_flight:
                return

    try:
        launch()
        while running:
            finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                key, item = running.pop(task)
                error = task.exception()
                if error is None:
                    appender.append({"key": key, **task.result()})
                    report.finished += 1
                    consecutive_failures = 0
                elif isinstance(error, RequestFailed):
                    report.failed.append({"key": key, "item": label_fn(item), "error": str(error),
                                          "reason": error.reason})
                    consecutive_failures += 1
                    log.warning("%s %s failed: %s", desc, label_fn(item), error)
                else:
                    raise error
                bar.update(1)
            if abort_after_failures and consecutive_failures >= abort_after_failures:
                raise ClientError(f"{consecutive_failures} {desc} in a row failed (last: "
                                  f"{report.failed[-1]['error']}); stopping; fix the cause and run the same command "
                                  f"again to resume")
            if stats is not None:
                bar.set_postfix(failed=len(report.failed), retries=stats.retries, tok_in=stats.prompt_tokens,
                                tok_out=stats.completion_tokens, refresh=False)
            if time.monotonic() - last_fsync > fsync_interval_s:
                os.fsync(appender.handle.fileno())
                last_fsync = time.monotonic()
            launch()
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        os.fsync(appender.handle.fileno())
        appender.close()
        bar.close()
        report.wall_s = time.perf_counter() - started
    return report
