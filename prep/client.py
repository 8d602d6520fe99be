"""The one async client for OpenAI-compatible endpoints: teacher labels, soft labels and the student's predictions.

Three layers, each usable alone:
- `ChatClient`: one request at a time as the caller sees it; underneath, bounded concurrency,
  token-bucket limits on requests and tokens per minute, and our own retry policy (the SDK's is
  off) with exponential backoff, jitter and Retry-After, shared by every caller of the client.
  A recipe may list several endpoints (`client.endpoints`: replicas, several keys): requests go where
  there is free capacity, a failing endpoint is left out until its health check passes, and its
  requests are retried on the others. Token caps (`client.token_cap`, per endpoint too) stop the run
  cleanly before a request could pass them (SpendCapReached).
- `check_endpoint`: a cheap preflight (GET /models) that turns a wrong URL, model or key into one
  sentence before any paid request.
- `run_cached`: an exactly-once, resumable runner: each finished item is appended to a JSONL cache
  under a key, and a later run asks only for the keys the cache lacks.

The answer constraint (`structured_output` recipe section) is built here from prep.answers, with
optional length bounds: a random-weight model needs short bounds to close its JSON quickly, a real
model needs none (a 1500-char bound took vLLM 40 s to compile per request).

The SDK builds each endpoint's client (base URL, auth and default headers, the aiohttp transport);
requests then go through that client's HTTP layer with those headers, so no per-request options or
response models are built (0.4 ms of client CPU per request less; bench_teacher measures it).

API keys are read from the environment variable (or file) a recipe names, held by the SDK client
and the headers built from it only, and scrubbed from every message this module produces.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from prep.answers import _JSON_STRING_BODY, ANSWER_KEYS, ANSWER_REGEX, REASONING_KEY
from prep.jsonio import JsonlAppender, read_appended

log = logging.getLogger("medkd.client")

# Statuses worth another try: the request was not served, and may be next time (every 5xx but 501 Not Implemented).
def retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or (status >= 500 and status != 501)


MAX_RETRY_AFTER_S = 600.0     # a server asking for longer than this is treated as down
PLACEHOLDER_KEY = "EMPTY"     # local servers without auth; the SDK refuses an empty key


# ---- settings ------------------------------------------------------------------------------------

@dataclass
class EndpointSettings:
    """One item of `client.endpoints`: an endpoint asked alongside the others (replicas, several keys).

    Keys left unset take the client section's value (model, key variable, concurrency, limits); a
    base_url of null is the server the recipe starts. token_cap is this endpoint's share of a run's spend.
    """

    base_url: str | None = None
    name: str | None = None              # in logs and the summary; default host:port
    model: str | None = None             # the name this endpoint serves; default client.model
    api_key_env: str | None = None
    api_key_file: str | None = None
    concurrency: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    token_cap: int | None = None         # prompt + completion tokens this run may spend here; null = no cap

    def __post_init__(self) -> None:
        checks = [("concurrency", self.concurrency is None or self.concurrency >= 1, "must be at least 1 or null"),
                  ("requests_per_minute", self.requests_per_minute is None or self.requests_per_minute > 0,
                   "must be positive or null"),
                  ("tokens_per_minute", self.tokens_per_minute is None or self.tokens_per_minute > 0,
                   "must be positive or null"),
                  ("token_cap", self.token_cap is None or self.token_cap >= 1, "must be at least 1 or null")]
        for name, ok, problem in checks:
            if not ok:
                raise ValueError(f"key '{name}': {problem}")


@dataclass
class ClientSettings:
    """The `client:` section of teacher, soft-label and predict recipes.

    One endpoint: base_url, model, the key and the limits here. Several: list them under `endpoints`
    (base_url stays null); each takes the keys it leaves unset from here.
    """

    base_url: str | None = None          # e.g. https://api.deepseek.com/v1; None when the recipe starts a server
    model: str | None = None             # the name the endpoint serves; None = the started server's served_model_name
    api_key_env: str | None = None       # NAME of the environment variable holding the key (never the key)
    api_key_file: str | None = None      # or a file holding only the key
    concurrency: int = 8                 # requests in flight at once (per endpoint)
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
    endpoints: list[EndpointSettings] | None = None   # several endpoints sharing the work; null = the one above
    token_cap: int | None = None         # prompt + completion tokens this run may spend, all endpoints together
    health_check_s: float = 1.0          # first GET /models after an endpoint failed; doubles up to 16 s
    # Several endpoints: each one with requests in flight is probed (GET /models) this often; two failed
    # probes in a row mark it down and send its in-flight requests to the others at once (a machine that
    # vanished sends no error, so they would wait out request_timeout_s). null = no probes.
    probe_s: float | None = 15.0

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
                   "must be at least 1 or null"),
                  ("endpoints", self.endpoints is None or len(self.endpoints) >= 1, "must list at least one or be null"),
                  ("endpoints", not (self.endpoints and self.base_url),
                   "set client.base_url or client.endpoints, not both"),
                  ("token_cap", self.token_cap is None or self.token_cap >= 1, "must be at least 1 or null"),
                  ("health_check_s", self.health_check_s > 0, "must be positive"),
                  ("probe_s", self.probe_s is None or self.probe_s > 0, "must be positive or null")]
        for name, ok, problem in checks:
            if not ok:
                raise ValueError(f"key 'client.{name}': {problem}")
        if self.endpoints is not None:
            self.endpoints = [_endpoint_item(item, i) for i, item in enumerate(self.endpoints)]
            names = [endpoint.name for endpoint in self.resolved()]
            if len(set(names)) < len(names):
                raise ValueError(f"key 'client.endpoints': two endpoints share a name ({', '.join(names)}); give "
                                 f"each a different base_url or name")

    def resolved(self) -> list[EndpointSettings]:
        """Every endpoint with all its keys filled in (one, from this section, when `endpoints` is null)."""
        items = self.endpoints if self.endpoints is not None else [EndpointSettings(base_url=self.base_url)]
        inherited = {"model": self.model, "api_key_env": self.api_key_env, "api_key_file": self.api_key_file,
                     "concurrency": self.concurrency, "requests_per_minute": self.requests_per_minute,
                     "tokens_per_minute": self.tokens_per_minute}
        out = []
        for i, item in enumerate(items):
            values = {key: getattr(item, key) if getattr(item, key) is not None else default
                      for key, default in inherited.items()}
            if item.api_key_env or item.api_key_file:    # an endpoint naming its own key takes none from above
                values.update(api_key_env=item.api_key_env, api_key_file=item.api_key_file)
            name = item.name or _host(item.base_url) or ("server" if len(items) == 1 else f"endpoint{i}")
            out.append(EndpointSettings(base_url=item.base_url, name=name, token_cap=item.token_cap, **values))
        return out

    @property
    def total_concurrency(self) -> int:
        """Requests in flight at once over every endpoint."""
        return sum(endpoint.concurrency for endpoint in self.resolved())

    def only(self, endpoint: EndpointSettings) -> ClientSettings:
        """This section for one of its resolved endpoints alone (a stage's preflight asks each on its own)."""
        return dataclasses.replace(
            self, endpoints=None, base_url=endpoint.base_url, model=endpoint.model, api_key_env=endpoint.api_key_env,
            api_key_file=endpoint.api_key_file, concurrency=endpoint.concurrency, token_cap=None,
            requests_per_minute=endpoint.requests_per_minute, tokens_per_minute=endpoint.tokens_per_minute)

    def with_server(self, base_url: str) -> ClientSettings:
        """The started server's URL in place of the endpoint(s) without one."""
        if self.endpoints is None:
            return dataclasses.replace(self, base_url=base_url)
        endpoints = [dataclasses.replace(item, base_url=item.base_url or base_url) for item in self.endpoints]
        return dataclasses.replace(self, endpoints=endpoints)


def _host(base_url: str | None) -> str | None:
    if not base_url:
        return None
    netloc = base_url.split("://", 1)[-1].split("/", 1)[0]
    return netloc or None


def _endpoint_item(item: Any, index: int) -> EndpointSettings:
    """A `client.endpoints` item as EndpointSettings; a bad key as a ValueError naming client.endpoints.N.KEY."""
    from prep.config import RecipeError, build

    if isinstance(item, EndpointSettings):
        return item
    if not isinstance(item, dict):
        raise ValueError(f"key 'client.endpoints.{index}': expected a mapping (base_url, api_key_env, ...), "
                         f"got {type(item).__name__}")
    try:
        return build(EndpointSettings, item, "", f"client.endpoints.{index}.")
    except RecipeError as err:
        problem = str(err).removeprefix(": ")
        if err.key is None:   # a range check: "key 'concurrency': ..." from __post_init__
            problem = problem.replace("key '", f"key 'client.endpoints.{index}.", 1)
        raise ValueError(problem) from None


@dataclass
class StructuredOutput:
    """The `structured_output:` recipe section: how the answer format is enforced at decode time.

    regex        vLLM's per-request regex (extra_body.structured_outputs.regex), compact JSON, reason first;
    json_schema  the OpenAI `response_format` json_schema (vLLM and OpenAI-style servers);
    json_object  `response_format: {type: json_object}` (hosted APIs such as DashScope and DeepSeek);
    none         no constraint; the parser and one repair turn do the rest.

    `reasoning: true` puts a `reasoning` string first in the regex and the schema: the shape a student
    trained on a reasoning teacher's traces answers in (predict strips the trace from the submission).
    A reasoning teacher served with a reasoning parser needs no such thing: its trace comes beside the answer.
    """

    kind: Literal["regex", "json_schema", "json_object", "none"] = "regex"
    max_reason_chars: int | None = None      # characters (JSON escapes count as one); null = unbounded
    max_diseases_chars: int | None = None
    reasoning: bool = False                  # the answer opens with a `reasoning` field
    max_reasoning_chars: int | None = None   # its bound, as above (only with reasoning: true)

    def __post_init__(self) -> None:
        if self.max_reasoning_chars is not None and not self.reasoning:
            raise ValueError("key 'structured_output.max_reasoning_chars': set only with reasoning: true")
        for name in ("max_reason_chars", "max_diseases_chars", "max_reasoning_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"key 'structured_output.{name}': must be at least 1 or null")


def _repeat(bound: int | None) -> str:
    return "+" if bound is None else f"{{1,{bound}}}"


def answer_regex(max_reason_chars: int | None = None, max_diseases_chars: int | None = None,
                 reasoning: bool = False, max_reasoning_chars: int | None = None) -> str:
    """prep.answers.ANSWER_REGEX with optional length bounds on the strings, and the trace first when REASONING."""
    if max_reason_chars is None and max_diseases_chars is None and not reasoning:
        return ANSWER_REGEX
    reason, diseases = _repeat(max_reason_chars), _repeat(max_diseases_chars)
    trace = f'"{REASONING_KEY}":"' + _JSON_STRING_BODY + _repeat(max_reasoning_chars) + '",' if reasoning else ""
    return (r'\{' + trace + r'"reason":"' + _JSON_STRING_BODY + reason + r'","diseases":"' + _JSON_STRING_BODY
            + diseases + r'"\}')


def answer_schema(max_reason_chars: int | None = None, max_diseases_chars: int | None = None,
                  reasoning: bool = False, max_reasoning_chars: int | None = None) -> dict[str, Any]:
    """prep.answers.ANSWER_JSON_SCHEMA with optional maxLength bounds, and the trace first when REASONING."""
    keys = ((REASONING_KEY,) if reasoning else ()) + ANSWER_KEYS
    bounds = dict(zip(keys, ((max_reasoning_chars,) if reasoning else ()) + (max_reason_chars, max_diseases_chars)))
    properties = {key: {"type": "string", "minLength": 1, **({"maxLength": bound} if bound else {})}
                  for key, bound in bounds.items()}
    return {"type": "object", "properties": properties, "required": list(keys), "additionalProperties": False}


def structured_output_params(section: StructuredOutput) -> dict[str, Any]:
    """Request parameters (extra_body or response_format) enforcing the answer format; part of every cache key."""
    trace = {"reasoning": True, "max_reasoning_chars": section.max_reasoning_chars} if section.reasoning else {}
    if section.kind == "regex":
        regex = answer_regex(section.max_reason_chars, section.max_diseases_chars, **trace)
        return {"extra_body": {"structured_outputs": {"regex": regex}}}
    if section.kind == "json_schema":
        schema = answer_schema(section.max_reason_chars, section.max_diseases_chars, **trace)
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


def key_source(settings: ClientSettings | EndpointSettings) -> str:
    if settings.api_key_env:
        return f"environment variable {settings.api_key_env}"
    if settings.api_key_file:
        return f"key file {settings.api_key_file}"
    return "no key (set client.api_key_env or client.api_key_file)"


def resolve_api_key(settings: ClientSettings | EndpointSettings) -> str:
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
    negative), so the long-run rate holds for any request size. Callers ask `wait_s` and, when it
    is 0, `take` in the same step (no await between), so nothing is given out twice.
    """

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until AMOUNT (or a full bucket, for more) is there; 0 when it is now."""
        self._refill()
        return max(0.0, (min(amount, self.capacity) - self.level) / self.rate)

    def take(self, amount: float) -> None:
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
class EndpointStats:
    """One endpoint's share: attempts sent, answers, failed attempts by reason, tokens, times marked down."""

    requests: int = 0
    succeeded: int = 0
    errors: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    went_down: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "succeeded": self.succeeded, "errors": sum(self.errors.values()),
                "error_reasons": dict(self.errors), "tokens_in": self.prompt_tokens,
                "tokens_out": self.completion_tokens, "went_down": self.went_down}


@dataclass
class ChatResult:
    text: str
    finish_reason: str | None
    usage: dict[str, int]                 # prompt_tokens, completion_tokens
    logprobs: Any                         # choices[0].logprobs(.content) exactly as the server sent it
    retries: int
    response: dict[str, Any]              # the whole JSON body (prompt_logprobs, other choices, ...)
    reasoning: str | None = None          # a reasoning model's trace, beside the answer (see reasoning_text)


class MalformedResponse(ValueError):
    pass


class SpendCapReached(ClientError):
    """No endpoint may take another request without passing a token cap: the run stops cleanly."""


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _clean_text(text: Any) -> str:
    # A `\ud83d` escape without its pair decodes to a lone surrogate, which UTF-8 files cannot hold.
    text = text if isinstance(text, str) else ""
    return _LONE_SURROGATE.sub("\ufffd", text) if _LONE_SURROGATE.search(text) else text


# Where a reasoning model's trace comes: DeepSeek's API and vLLM before 0.11 say `reasoning_content`;
# vLLM renamed it `reasoning` (docs.vllm.ai, "Reasoning Outputs") and may send the old name empty beside it.
REASONING_FIELDS = ("reasoning", "reasoning_content")


def reasoning_text(message: dict[str, Any]) -> str | None:
    """The trace of a chat answer's message under either name (the first non-blank), or None."""
    for name in REASONING_FIELDS:
        value = message.get(name)
        if isinstance(value, str) and value.strip():
            return _clean_text(value)
    return None


def estimate_prompt_tokens(messages: list[dict[str, Any]] | str) -> int:
    """An upper-ish token count without a tokenizer: one per character (Chinese runs ~0.7-1 per character)."""
    if isinstance(messages, str):
        return len(messages)
    return sum(len(str(message.get("content") or "")) + 4 for message in messages)


class _Attempt(Exception):
    """One failed HTTP attempt: why, what the server said, its Retry-After, and the status if not worth retrying."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None, refused: int | None = None):
        super().__init__(message)
        self.reason, self.message, self.retry_after, self.refused = reason, message, retry_after, refused


class _Endpoint:
    """One endpoint's connection, limits, health and spend, as the pool in ChatClient sees it.

    The SDK client is built here (base URL, auth and default headers, transport); requests are sent
    through its HTTP client with those headers, so no per-request options or response models are built.
    """

    def __init__(self, settings: EndpointSettings, client: ClientSettings, secret: str):
        import httpx2
        from openai import AsyncOpenAI

        self.settings, self.name, self.secret = settings, settings.name, secret
        self.concurrency = settings.concurrency
        self.http = _http_client(settings.concurrency, client.transport)
        timeout = httpx2.Timeout(client.request_timeout_s, connect=client.connect_timeout_s)
        self.sdk = AsyncOpenAI(base_url=settings.base_url, api_key=secret, max_retries=0,  # retries are ours
                               timeout=timeout, http_client=self.http)
        headers = {**self.sdk.default_headers, **self.sdk.auth_headers}
        # Built once: a Request given a parsed URL and a Headers object skips half its per-request work.
        self.headers = httpx2.Headers({key: value for key, value in headers.items() if isinstance(value, str)})
        self.root = str(self.sdk.base_url).rstrip("/")
        self.urls = {path: httpx2.URL(self.root + path) for path in ("/chat/completions", "/completions", "/models")}
        self.extensions = {"timeout": timeout.as_dict()}
        health = min(client.connect_timeout_s, client.request_timeout_s, 10.0)
        self.health_extensions = {"timeout": httpx2.Timeout(health).as_dict()}
        self.timeout_s = client.request_timeout_s
        self._request_type, self._transport_error = httpx2.Request, httpx2.RequestError
        self.rpm = TokenBucket(settings.requests_per_minute) if settings.requests_per_minute else None
        self.tpm = TokenBucket(settings.tokens_per_minute) if settings.tokens_per_minute else None
        self.in_flight = 0
        self.resume_at = 0.0          # a 429's Retry-After holds back every request here, not just the one refused
        self.up, self.failures_in_row, self.throttled = True, 0, 0    # failures and 429s in a row
        self.reserved = 0             # token estimates of the requests in flight
        self.spent_before = 0         # tokens spent here by earlier rounds of the same run
        self.stats = EndpointStats()
        self.latency_s: float | None = None   # moving average of its answered requests' time (seconds)
        self.health_task: asyncio.Task | None = None
        self.sending: set[asyncio.Future] = set()      # attempts in flight, when a prober watches
        self.probe_failures = 0

    @property
    def spent(self) -> int:
        return self.spent_before + self.stats.prompt_tokens + self.stats.completion_tokens

    def fits(self, estimate: int) -> bool:
        cap = self.settings.token_cap
        return cap is None or self.spent + self.reserved + estimate <= cap

    def wait_s(self, now: float, estimate: int) -> float:
        """Seconds until this endpoint may send a request of ESTIMATE tokens (0: now), slots aside."""
        wait = self.resume_at - now
        if self.rpm:
            wait = max(wait, self.rpm.wait_s(1))
        if self.tpm:
            wait = max(wait, self.tpm.wait_s(estimate))
        return max(wait, 0.0)

    def take(self, estimate: int) -> None:
        self.in_flight += 1
        self.reserved += estimate
        if self.rpm:
            self.rpm.take(1)
        if self.tpm:
            self.tpm.take(estimate)

    async def send(self, path: str, payload: bytes) -> dict[str, Any]:
        """One POST; the decoded body, or _Attempt saying why not."""
        request = self._request_type("POST", self.urls[path], headers=self.headers, content=payload,
                                     extensions=self.extensions)
        self.stats.requests += 1
        try:
            response = await self.http.send(request)
        except self._transport_error as err:
            reason = _transport_failure(err)
            message = (f"no answer within {self.timeout_s:g} s" if reason == "timeout"
                       else redact(_describe_cause(err), self.secret))
            raise _Attempt(reason, message) from None
        status = response.status_code
        if status >= 400:
            message = redact(_error_message(response.content), self.secret)
            raise _Attempt(str(status), message, _retry_after(response.headers),
                           None if retryable_status(status) else status)
        try:
            return _decode(response.content, path)
        except ValueError as err:      # a garbled body: json.JSONDecodeError, MalformedResponse
            raise _Attempt("malformed", redact(str(err), self.secret)[:200]) from None

    async def healthy(self) -> bool:
        """GET /models got an answer that is not a server error (some APIs list no models: a 404 is alive)."""
        request = self._request_type("GET", self.urls["/models"], headers=self.headers,
                                     extensions=self.health_extensions)
        try:
            response = await self.http.send(request)
        except Exception:  # noqa: BLE001 - a probe: whatever went wrong, the endpoint is not back yet
            return False
        return response.status_code < 500

    async def close(self) -> None:
        if self.health_task is not None:
            self.health_task.cancel()
            await asyncio.gather(self.health_task, return_exceptions=True)
        await self.sdk.close()


def _decode(content: bytes, path: str) -> dict[str, Any]:
    data = json.loads(content)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse(f"the {path} response has no choices")
    return data


def _error_message(content: bytes) -> str:
    """The `error.message` (or `message`, or the text) of an error body, on one line, at most 200 characters."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    message = None
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
        message = message or body.get("message") or body.get("detail")
    if message is None:
        message = content.decode("utf-8", "replace")
    return " ".join(str(message).split())[:200]


class ChatClient:
    """Async chat/completions against one or several endpoints of one model, with limits and retries shared
    by all callers.

    Use as `async with ChatClient(settings) as client: result = await client.chat(messages, temperature=0.7)`.
    Keyword arguments are OpenAI request parameters; `extra_body` is merged into the request body.

    Several endpoints (settings.endpoints): each request goes to the endpoint with the most free slots
    among those up, within their limits and token caps. An endpoint whose connection fails (or that
    fails three requests in a row) is down: its requests are retried on the others at once, and a
    GET /models every health_check_s (doubling) brings it back. One that stops answering altogether is
    found by a probe every probe_s; its in-flight requests are then cancelled and sent elsewhere.
    A 429 pauses only the endpoint that sent it.
    """

    def __init__(self, settings: ClientSettings, api_key: str | None = None, seed: int | None = None,
                 api_keys: dict[str, str] | None = None, down: Iterable[str] = (),
                 spent: dict[str, int] | None = None):
        """API_KEYS: endpoint name -> key (default: each endpoint's variable or file; API_KEY for a lone one).
        DOWN: endpoints that did not answer the preflight, left out until their health check passes.
        SPENT: endpoint name -> tokens an earlier round of the same run spent, counted against the caps."""
        endpoints = settings.resolved()
        if not endpoints or any(not endpoint.base_url or not endpoint.model for endpoint in endpoints):
            raise ClientError("client.base_url and client.model must be set (or the recipe must start a server)")
        self.settings = settings
        keys = api_keys or {}
        if api_key is not None and len(endpoints) == 1:
            keys = {endpoints[0].name: api_key}
        self.endpoints = [_Endpoint(endpoint, settings, keys.get(endpoint.name) or resolve_api_key(endpoint))
                          for endpoint in endpoints]
        self._secret = self.endpoints[0].secret
        self._random = random.Random(seed)
        # Requests waiting for a slot, first come first served: a freed slot wakes one, an endpoint coming
        # back wakes all (waking every waiter on every answer would cost O(waiters) per request).
        self._waiters: deque[asyncio.Future] = deque()
        self._prober: asyncio.Task | None = None
        self._acquiring = 0        # requests inside _acquire: waiting for a slot, or about to take one
        # Items the caller has not handed to the client yet (run_cached's queue), or None when unknown: with it,
        # the run's last requests skip a slow endpoint whose answer would come after a faster one's next slot
        # (later_than_waiting).
        self.backlog: int | None = None
        self.stats = ClientStats()
        for endpoint in self.endpoints:
            endpoint.spent_before = (spent or {}).get(endpoint.name, 0)
        self.spent, self.reserved = sum(endpoint.spent_before for endpoint in self.endpoints), 0
        for endpoint in self.endpoints:
            if endpoint.name in set(down):
                self._mark_down(endpoint, "did not answer the preflight", start_check=False)

    def __repr__(self) -> str:
        return f"ChatClient(endpoints={[e.root for e in self.endpoints]!r}, model={self.settings.model!r})"

    async def __aenter__(self) -> ChatClient:
        for endpoint in self.endpoints:
            if not endpoint.up and endpoint.health_task is None:
                endpoint.health_task = asyncio.ensure_future(self._watch(endpoint))
        if len(self.endpoints) > 1 and self.settings.probe_s and self._prober is None:
            self._prober = asyncio.ensure_future(self._probe())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None
        for endpoint in self.endpoints:
            await endpoint.close()

    def redact(self, text: str) -> str:
        for endpoint in self.endpoints:
            text = redact(text, endpoint.secret)
        return text

    def endpoint_stats(self) -> dict[str, dict[str, Any]]:
        """name -> requests, errors, tokens, times down, and the base URL (no key), per endpoint."""
        return {e.name: {"base_url": e.settings.base_url, **e.stats.to_json()} for e in self.endpoints}

    def stats_json(self) -> dict[str, Any]:
        """The client's counters and, under "endpoints", each endpoint's."""
        return {**self.stats.to_json(), "endpoints": self.endpoint_stats()}

    async def chat(self, messages: list[dict[str, Any]], reasoning_tokens: int = 0, **params: Any) -> ChatResult:
        """One chat answer. REASONING_TOKENS: what a reasoning model's trace may add beyond max_tokens (not sent;
        counted in the request's token estimate against token_cap and tokens_per_minute)."""
        body = self._body({"messages": messages}, params)
        data, retries = await self._post("/chat/completions", body, estimate_prompt_tokens(messages) + reasoning_tokens)
        choice = data["choices"][0]
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and "content" in logprobs:
            logprobs = logprobs["content"]
        return ChatResult(_clean_text(message.get("content")), choice.get("finish_reason"), self._usage(data),
                          logprobs, retries, data, reasoning_text(message))

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

    def _payloads(self, body: dict[str, Any]) -> dict[str, bytes]:
        """The request body per endpoint: the same JSON but for the model name each one serves."""
        payloads: dict[str, bytes] = {}
        for endpoint in self.endpoints:
            model = endpoint.settings.model
            if model not in payloads:
                payloads[model] = json.dumps({**body, "model": model}, ensure_ascii=False).encode("utf-8")
        return payloads

    async def _post(self, path: str, body: dict[str, Any], prompt_estimate: int) -> tuple[dict[str, Any], int]:
        """Send until answered: a failed attempt is retried (on another endpoint at once when one is ready,
        else after the backoff) up to max_retries; the body and the retries taken."""
        completion = int(body.get("max_tokens") or body.get("max_completion_tokens") or 0) * int(body.get("n") or 1)
        estimate = prompt_estimate + completion
        payloads = self._payloads(body)
        retries, avoid = 0, None
        while True:
            endpoint = await self._acquire(estimate, avoid)
            self.stats.requests += 1
            settled, sending, sent_at = False, None, time.monotonic()
            try:
                if self._prober is None:
                    data = await endpoint.send(path, payloads[endpoint.settings.model])
                else:       # a task of its own, which the prober cancels if the endpoint stops answering
                    sending = asyncio.ensure_future(endpoint.send(path, payloads[endpoint.settings.model]))
                    endpoint.sending.add(sending)
                    data = await sending
                took = time.monotonic() - sent_at
                endpoint.latency_s = took if endpoint.latency_s is None else 0.8 * endpoint.latency_s + 0.2 * took
                self._settle(endpoint, estimate, self._usage(data))
                settled = True
                return data, retries
            except _Attempt as attempt:
                failure = attempt
            except asyncio.CancelledError:
                if sending is None or asyncio.current_task().cancelling():
                    raise                # the caller cancelled us, not the prober
                failure = _Attempt("connection", "the endpoint stopped answering (its health probe failed)")
            finally:
                if sending is not None:
                    endpoint.sending.discard(sending)
                endpoint.in_flight -= 1
                if not settled:          # failed or cancelled: its reservation goes back
                    self._release(endpoint, estimate)
                self._wake()
            reason, message = failure.reason, failure.message
            endpoint.stats.errors[reason] += 1
            if failure.refused is not None:
                self.stats.failed += 1
                self._raise_for_status(endpoint, failure.refused, message, retries)
            if reason != "429":
                endpoint.failures_in_row += 1
                if len(self.endpoints) > 1 and endpoint.up and (reason == "connection" or endpoint.failures_in_row >= 3):
                    self._mark_down(endpoint, f"{reason}: {message}")
            if retries >= self.settings.max_retries:
                self.stats.failed += 1
                raise RequestFailed(f"gave up after {retries + 1} attempts; last: {reason} ({message})", reason,
                                    retries)
            delay = self._delay(retries, failure.retry_after)
            if reason == "429":    # the endpoint pauses, longer with each 429 in a row it sends
                endpoint.throttled += 1
                pause = self._delay(endpoint.throttled - 1, failure.retry_after)
                endpoint.resume_at = max(endpoint.resume_at, time.monotonic() + pause)
            retries += 1
            self.stats.retries += 1
            self.stats.retry_reasons[reason] += 1
            other = self._other_ready(endpoint, estimate)
            log.info("retry %d/%d %s after %s at %s: %s", retries, self.settings.max_retries,
                     f"now at {other.name}" if other else f"in {delay:.2f} s", reason, endpoint.name, message)
            avoid = endpoint
            if other is None:
                await asyncio.sleep(delay)

    # ---- the pool ----

    def _wake(self, everyone: bool = False) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    def _total_fits(self, estimate: int) -> bool:
        cap = self.settings.token_cap
        return cap is None or self.spent + self.reserved + estimate <= cap

    def _other_ready(self, failed: _Endpoint, estimate: int) -> _Endpoint | None:
        now = time.monotonic()
        for endpoint in self.endpoints:
            if (endpoint is not failed and endpoint.up and endpoint.in_flight < endpoint.concurrency
                    and endpoint.fits(estimate) and endpoint.wait_s(now, estimate) == 0):
                return endpoint
        return None

    async def _acquire(self, estimate: int, avoid: _Endpoint | None) -> _Endpoint:
        """A slot on the endpoint with the most free capacity that may send now; waits until one may, or, at the
        end of a run, until a faster endpoint's slot would answer sooner than the free one (later_than_waiting)."""
        self._acquiring += 1
        try:
            return await self._acquire_slot(estimate, avoid)
        finally:
            self._acquiring -= 1

    async def _acquire_slot(self, estimate: int, avoid: _Endpoint | None) -> _Endpoint:
        while True:
            now, best, best_score, wake = time.monotonic(), None, None, 1.0
            fitting = [e for e in self.endpoints if e.fits(estimate)] if self._total_fits(estimate) else []
            if not fitting and self.reserved == 0:   # nothing in flight will free a reservation: no room, ever
                self._wake(everyone=True)            # the other waiters learn it now, not at their timeout
                raise SpendCapReached(self._cap_message(estimate))
            # Those up; when none is, every endpoint (a retry then tries them anyway, within its budget).
            candidates = [e for e in fitting if e.up] if any(e.up for e in self.endpoints) else fitting
            for endpoint in candidates:
                free = endpoint.concurrency - endpoint.in_flight
                if free <= 0:
                    continue
                wait = endpoint.wait_s(now, estimate)
                if wait > 0:
                    wake = min(wake, wait)
                    continue
                score = (endpoint is not avoid, free / endpoint.concurrency, free)
                if best_score is None or score > best_score:
                    best, best_score = endpoint, score
            if best is not None and self.backlog is not None:
                best, wake = self._soonest(candidates, best, avoid, now, estimate, wake)
            if best is not None:
                best.take(estimate)
                self.reserved += estimate
                return best
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, timeout=max(wake, 0.001))

    def _soonest(self, candidates: list[_Endpoint], best: _Endpoint, avoid: _Endpoint | None, now: float,
                 estimate: int, wake: float) -> tuple[_Endpoint | None, float]:
        """With the caller's backlog known: the free slot that answers soonest, or None (wait) when a faster
        endpoint's next slot would answer sooner still, given every request still to come (the backlog and
        those waiting here); and the wait before looking again. Mid-run that many requests keep every slot worth
        filling; at the end a half-speed endpoint's last answers would come a whole latency after the fast
        one's. Free-capacity order (BEST) stands until every endpoint has answered once."""
        ready = [e for e in candidates if e.wait_s(now, estimate) == 0]
        if any(e.latency_s is None for e in ready):
            return best, wake
        free = [e for e in ready if e.in_flight < e.concurrency]
        best = min(free, key=lambda e: (e is avoid, e.latency_s))
        others = [(e.latency_s, e.concurrency) for e in ready if e is not best]
        if later_than_waiting(best.latency_s, others, self.backlog + self._acquiring):
            return None, min(wake, min(latency / slots for latency, slots in others))
        return best, wake

    def _release(self, endpoint: _Endpoint, estimate: int) -> None:
        endpoint.reserved -= estimate
        self.reserved -= estimate

    def _settle(self, endpoint: _Endpoint, estimate: int, usage: dict[str, int]) -> None:
        self._release(endpoint, estimate)
        used = usage["prompt_tokens"] + usage["completion_tokens"]
        for stats in (self.stats, endpoint.stats):
            stats.succeeded += 1
            stats.prompt_tokens += usage["prompt_tokens"]
            stats.completion_tokens += usage["completion_tokens"]
        self.spent += used
        endpoint.failures_in_row = endpoint.throttled = 0
        if not endpoint.up:              # it answered a request tried while every endpoint was down
            self._mark_up(endpoint)
        if endpoint.tpm and used:
            endpoint.tpm.settle(estimate - used)

    def _cap_message(self, estimate: int) -> str:
        caps = [f"{e.name} {e.spent}/{e.settings.token_cap}" for e in self.endpoints if e.settings.token_cap]
        total = f"{self.spent} tokens spent of client.token_cap {self.settings.token_cap}" \
            if self.settings.token_cap else f"{self.spent} tokens spent"
        per = f" (per endpoint: {', '.join(caps)})" if caps else ""
        return (f"spend cap reached: {total}{per}, and the next request may need {estimate}; raise the cap and "
                f"run the same command again to continue from the cache")

    # ---- health ----

    def _mark_down(self, endpoint: _Endpoint, why: str, start_check: bool = True) -> None:
        endpoint.up = False
        endpoint.stats.went_down += 1
        log.warning("endpoint %s is down (%s); its requests go to the others until it answers GET /models",
                    endpoint.name, self.redact(why)[:200])
        if start_check and endpoint.health_task is None:
            endpoint.health_task = asyncio.ensure_future(self._watch(endpoint))

    def _mark_up(self, endpoint: _Endpoint) -> None:
        endpoint.up, endpoint.failures_in_row = True, 0
        log.info("endpoint %s is back", endpoint.name)
        self._wake(everyone=True)

    async def _probe(self) -> None:
        """Every probe_s, GET /models on each endpoint up with requests in flight; two failures in a row: down,
        and the requests it holds are cancelled, to be retried on the others."""
        while True:
            await asyncio.sleep(self.settings.probe_s)
            busy = [e for e in self.endpoints if e.up and e.in_flight]
            for endpoint, ok in zip(busy, await asyncio.gather(*(e.healthy() for e in busy))):
                endpoint.probe_failures = 0 if ok else endpoint.probe_failures + 1
                if endpoint.probe_failures >= 2 and endpoint.up:
                    endpoint.probe_failures = 0
                    self._mark_down(endpoint, "GET /models failed twice in a row")
                    for sending in list(endpoint.sending):
                        sending.cancel()

    async def _watch(self, endpoint: _Endpoint) -> None:
        """GET /models after health_check_s, doubling up to 16 s, until the endpoint answers; then it rejoins."""
        interval = self.settings.health_check_s
        try:
            while not endpoint.up:
                await asyncio.sleep(interval)
                if endpoint.up:
                    break
                if await endpoint.healthy():
                    self._mark_up(endpoint)
                    break
                interval = min(interval * 2, 16.0)
        finally:
            endpoint.health_task = None

    def _delay(self, retries: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        # Exponential backoff with "equal jitter": half fixed, half random, so retries spread out.
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** retries)
        return ceiling * (0.5 + 0.5 * self._random.random())

    def _raise_for_status(self, endpoint: _Endpoint, status: int, message: str, retries: int) -> None:
        url, model = endpoint.settings.base_url, endpoint.settings.model
        if status in (401, 403):
            raise ClientError(f"{url} refused the API key (HTTP {status}: {message}); check that "
                              f"{key_source(endpoint.settings)} holds a valid key for this endpoint")
        if status == 404:
            raise ClientError(f"{url} has no model '{model}' or no such route (HTTP 404: {message}); "
                              f"check client.model and client.base_url")
        raise RequestFailed(f"the endpoint refused the request (HTTP {status}: {message})", str(status), retries)


def later_than_waiting(latency_s: float, others: list[tuple[float, int]], waiting: int) -> bool:
    """Whether a request sent now on an endpoint answering in LATENCY_S would finish later than the WAITING
    requests still to send (this one included) would on one of OTHERS (each (latency, slots)) alone: its
    slots answer them one after another, the last after about latency x (1 + waiting / slots)."""
    return any(other * (1 + waiting / slots) < latency_s for other, slots in others)


def _http_client(concurrency: int, transport: str) -> Any:
    """The SDK's HTTP client: its vendored aiohttp transport, or plain httpx2 (O(pool) work per request)."""
    import httpx2

    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if transport == "aiohttp":
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

async def check_endpoint_async(settings: ClientSettings, api_key: str | None = None, attempts: int = 2,
                               endpoint: EndpointSettings | None = None) -> list[str] | None:
    """GET /models once (one retry on a dropped connection): the models served, or None if the endpoint lists none.

    ENDPOINT: one of settings.resolved() (default: the only one). Raises ClientError naming the fix for
    an unreachable endpoint (EndpointUnreachable), a refused key or an unlisted model.
    """
    import httpx2
    from openai import APIConnectionError, APIStatusError, AsyncOpenAI

    endpoint = endpoint or settings.resolved()[0]
    url, model = endpoint.base_url, endpoint.model
    secret = api_key if api_key is not None else resolve_api_key(endpoint)
    timeout = min(settings.request_timeout_s, 30.0)
    client = AsyncOpenAI(base_url=url, api_key=secret, max_retries=0,
                         timeout=httpx2.Timeout(timeout, connect=min(settings.connect_timeout_s, timeout)))
    problem, response, unreachable = None, None, False
    try:
        for attempt in range(attempts):
            try:
                response = await client.get("/models", cast_to=httpx2.Response)
                break
            except APIStatusError as err:
                status, message = err.status_code, _server_message(err, secret)
                if status in (401, 403):
                    problem = (f"{url} refused the API key (HTTP {status}: {message}); "
                               f"check that {key_source(endpoint)} holds a valid key for this endpoint")
                    break
                if status in (404, 405):
                    return None  # some providers do not list models; the first request will tell
                problem = (f"{url} answered HTTP {status} to GET /models ({message}); "
                           f"check client.base_url or try again later")
            except APIConnectionError as err:
                problem, unreachable = (f"cannot reach {url} ({redact(_describe_cause(err), secret)}); "
                                        f"check client.base_url and that the server is running"), True
            if attempt < attempts - 1:
                await asyncio.sleep(1.0)
    finally:
        await client.close()
    if response is None:
        # Raised outside the except clauses: no chained SDK error carries the server's raw words.
        raise (EndpointUnreachable if unreachable else ClientError)(problem)
    try:
        data = json.loads(response.content)
        served = [str(item["id"]) for item in data["data"]]
    except (ValueError, KeyError, TypeError):
        return None
    if served and model not in served:
        raise ClientError(f"model '{model}' is not served at {url} (it serves: "
                          f"{', '.join(served[:10])}); fix client.model")
    return served


class EndpointUnreachable(ClientError):
    """The preflight could not connect (as opposed to a refused key or a missing model)."""


def check_endpoint(settings: ClientSettings, api_key: str | None = None) -> list[str] | None:
    """Synchronous preflight of every endpoint, for callers outside an event loop: the first one's models."""
    endpoints = settings.resolved()
    if len(endpoints) == 1:
        return asyncio.run(check_endpoint_async(settings, api_key))
    return [asyncio.run(check_endpoint_async(settings, endpoint=endpoint)) for endpoint in endpoints][0]


def check_endpoints(settings: ClientSettings, api_keys: dict[str, str]) -> list[str]:
    """Preflight of each endpoint (several): the names of those unreachable now, which join when they answer.

    A refused key or a missing model stops the run (ClientError); so does no endpoint answering.
    """
    down, problems = [], []
    for endpoint in settings.resolved():
        try:
            asyncio.run(check_endpoint_async(settings, api_keys.get(endpoint.name), endpoint=endpoint))
        except EndpointUnreachable as err:
            down.append(endpoint.name)
            problems.append(str(err))
            log.warning("endpoint %s: %s; starting without it, it joins when it answers", endpoint.name, err)
    if len(down) == len(settings.resolved()):
        raise ClientError(problems[0] if len(problems) == 1 else f"no endpoint answers: {'; '.join(problems)}")
    return down


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
    stopped: str | None = None       # why the run stopped before asking everything (a spend cap), if it did

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
    client: ChatClient | None = None,
) -> RunReport:
    """Run WORK_FN on every item whose key the cache lacks, appending each result as `{"key": ..., **row}`.

    Exactly once: a row is appended (and flushed to the OS, so a SIGKILL cannot lose it) as soon as
    its item finishes; a rerun skips every key already there, so only the items in flight at a
    kill are paid twice. fsync (power loss) happens at most every FSYNC_INTERVAL_S and at the end.
    A work_fn raising RequestFailed fails that item only (not cached, reported, retried next run);
    ClientError stops the run; ABORT_AFTER_FAILURES failures in a row stop it too (the stages pass their
    recipe's client.abort_after_failures; None never stops). SpendCapReached stops it cleanly: nothing
    new starts, what is in flight finishes and is cached, and the report says why (`stopped`). CLIENT, when
    given, is told how many items are not yet started (ChatClient.backlog), for its end-of-run routing.

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
    consecutive_failures, last_fsync, started_items = 0, time.monotonic(), 0

    def launch() -> None:
        nonlocal started_items
        if report.stopped:
            return
        for key, item in queue:
            running[asyncio.ensure_future(work_fn(item))] = (key, item)
            started_items += 1
            if len(running) >= max_in_flight:
                break
        if client is not None:
            client.backlog = len(pending) - started_items

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
                elif isinstance(error, SpendCapReached):
                    if not report.stopped:
                        log.warning("%s", error)
                    report.stopped = str(error)
                    continue        # not done: no progress tick, asked next run
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
