"""One endpoint: its token-bucket limits, statistics, one request with our retry policy, and the HTTP layer
under it (the SDK's client with the aiohttp transport, responses decoded and errors redacted)."""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prep.api.settings import (
    MAX_RETRY_AFTER_S,
    ClientError,
    ClientSettings,
    EndpointSettings,
    redact,
    retryable_status,
)

log = logging.getLogger("medkd.client")



def server_message(err: Any, secret: str | None) -> str:
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


def clean_text(text: Any) -> str:
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
            return clean_text(value)
    return None


def estimate_prompt_tokens(messages: list[dict[str, Any]] | str) -> int:
    """An upper-ish token count without a tokenizer: one per character (Chinese runs ~0.7-1 per character)."""
    if isinstance(messages, str):
        return len(messages)
    return sum(len(str(message.get("content") or "")) + 4 for message in messages)


class Attempt(Exception):
    """One failed HTTP attempt: why, what the server said, its Retry-After, and the status if not worth retrying."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None, refused: int | None = None):
        super().__init__(message)
        self.reason, self.message, self.retry_after, self.refused = reason, message, retry_after, refused


class EndpointConnection:
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
        """One POST; the decoded body, or Attempt saying why not."""
        request = self._request_type("POST", self.urls[path], headers=self.headers, content=payload,
                                     extensions=self.extensions)
        self.stats.requests += 1
        try:
            response = await self.http.send(request)
        except self._transport_error as err:
            reason = _transport_failure(err)
            message = (f"no answer within {self.timeout_s:g} s" if reason == "timeout"
                       else redact(describe_cause(err), self.secret))
            raise Attempt(reason, message) from None
        status = response.status_code
        if status >= 400:
            message = redact(_error_message(response.content), self.secret)
            raise Attempt(str(status), message, _retry_after(response.headers),
                           None if retryable_status(status) else status)
        try:
            return _decode(response.content, path)
        except ValueError as err:      # a garbled body: json.JSONDecodeError, MalformedResponse
            raise Attempt("malformed", redact(str(err), self.secret)[:200]) from None

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


def describe_cause(err: BaseException) -> str:
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


