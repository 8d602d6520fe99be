"""One endpoint: its token-bucket limits, statistics, one request with our retry policy, and the HTTP layer
under it (the SDK's client with the aiohttp transport; each attempt within one deadline, its body read under
client.max_response_bytes and inflated here step by step, decoded, and the key taken out before any of the
server's words are cut into a message)."""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prep.api.settings import (
    MAX_RESPONSE_BYTES,
    MAX_RETRY_AFTER_S,
    PLACEHOLDER_KEY,
    ClientError,
    ClientSettings,
    EndpointSettings,
    redact,
    retryable_status,
)

log = logging.getLogger("medkd.client")

MESSAGE_CHARS = 200        # a server's words in a message, cut here (after the key is taken out)
SNIPPET_CHARS = 80         # the start of a body that is not JSON, shown to say what it was


def one_line(text: str, secret: str | None, limit: int = MESSAGE_CHARS) -> str:
    """A server's TEXT for a message or a file: the key taken out FIRST, then on one line, then cut to LIMIT
    characters (cut first, a key would survive in part: 25 of 26 characters no longer match it)."""
    return " ".join(redact(str(text), secret).split())[:limit]


def server_message(err: Any, secret: str | None) -> str:
    body = getattr(err, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    message = message or getattr(err, "message", None) or str(err)
    return one_line(message, secret)


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
    bad_usage: int = 0           # answers whose usage could not be read (not numbers, absurd): ignored, counted

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "succeeded": self.succeeded, "errors": sum(self.errors.values()),
                "error_reasons": dict(self.errors), "tokens_in": self.prompt_tokens,
                "tokens_out": self.completion_tokens, "went_down": self.went_down, "bad_usage": self.bad_usage}


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


TEXT_PART_TYPES = (None, "text", "output_text")


def message_text(message: dict[str, Any]) -> str:
    """A chat answer's content as text: a string, or a list of content parts (OpenAI's array form:
    {"type": "text", "text": ...} or plain strings) joined in order; other parts (images, refusals) add nothing."""
    content = message.get("content")
    if isinstance(content, list):
        parts = [part if isinstance(part, str) else part.get("text") for part in content
                 if isinstance(part, str) or (isinstance(part, dict) and part.get("type") in TEXT_PART_TYPES)]
        content = "".join(part for part in parts if isinstance(part, str))
    return clean_text(content)


def estimate_prompt_tokens(messages: list[dict[str, Any]] | str) -> int:
    """An upper-ish token count without a tokenizer: one per character (Chinese runs ~0.7-1 per character)."""
    if isinstance(messages, str):
        return len(messages)
    return sum(len(str(message.get("content") or "")) + 4 for message in messages)


class Attempt(Exception):
    """One failed HTTP attempt: why, what the server said, its Retry-After, the status if not worth retrying;
    FINAL: not worth retrying anywhere (the request fails at once, is not cached, and the next run asks it
    again); DOWN: the endpoint should be left out (it asked to wait longer than MAX_RETRY_AFTER_S)."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None, refused: int | None = None,
                 final: bool = False, down: bool = False):
        super().__init__(message)
        self.reason, self.message, self.retry_after, self.refused = reason, message, retry_after, refused
        self.final, self.down = final, down


class ResponseTooLarge(Exception):
    """A response body passed max_response_bytes (after decompression) while it was read."""


class ErrorBody(MalformedResponse):
    """HTTP 200 whose body is an {"error": ...} object instead of an answer."""


class ReasoningOnly(MalformedResponse):
    """A chat answer with a reasoning trace and no content, though the model stopped of itself."""


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
        # Only the codings read_body inflates under its cap (the aiohttp transport would add br, and a
        # library inflating a body by itself has no cap).
        headers = {**self.sdk.default_headers, **self.sdk.auth_headers, "Accept-Encoding": ACCEPT_ENCODING}
        # Built once: a Request given a parsed URL and a Headers object skips half its per-request work.
        self.headers = httpx2.Headers({key: value for key, value in headers.items() if isinstance(value, str)})
        self.root = str(self.sdk.base_url).rstrip("/")
        self.urls = {path: httpx2.URL(self.root + path) for path in ("/chat/completions", "/completions", "/models")}
        self.extensions = {"timeout": timeout.as_dict()}
        health = min(client.connect_timeout_s, client.request_timeout_s, 10.0)
        self.health_extensions = {"timeout": httpx2.Timeout(health).as_dict()}
        self.timeout_s = client.request_timeout_s      # the whole attempt: connect, send, every byte of the body
        self.health_s = health
        self.max_bytes = client.max_response_bytes
        self._request_type, self._transport_error = httpx2.Request, httpx2.RequestError
        self._timeout_type = httpx2.Timeout
        self.rpm = TokenBucket(settings.requests_per_minute) if settings.requests_per_minute else None
        self.tpm = TokenBucket(settings.tokens_per_minute) if settings.tokens_per_minute else None
        self.in_flight = 0
        self.resume_at = 0.0          # a 429's Retry-After holds back every request here, not just the one refused
        self.up, self.failures_in_row, self.throttled = True, 0, 0    # failures and 429s in a row
        self.reserved = 0             # token estimates of the requests in flight
        self.spent_before = 0         # tokens spent here by earlier rounds of the same run
        self.unreported = 0           # estimates charged for answers whose usage could not be read
        self.stats = EndpointStats()
        self.latency_s: float | None = None   # moving average of its answered requests' time (seconds)
        self.health_task: asyncio.Task | None = None
        self.sending: set[asyncio.Future] = set()      # attempts in flight, when a prober watches
        self.probe_failures = 0

    @property
    def spent(self) -> int:
        return self.spent_before + self.stats.prompt_tokens + self.stats.completion_tokens + self.unreported

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
        status, headers, content = await self.exchange(request, self.timeout_s)
        if status >= 400:
            retry_after = _retry_after(headers)
            message = error_message(content, self.secret)
            if retry_after is not None and retry_after > MAX_RETRY_AFTER_S:   # "come back in three years": down
                message = (f"the endpoint is treated as down (it asks to wait {retry_after:.0f} s in Retry-After, "
                           f"over the {MAX_RETRY_AFTER_S:.0f} s a client waits); HTTP {status}: {message}")
                raise Attempt(str(status), one_line(message, self.secret, 2 * MESSAGE_CHARS), None,
                              None if retryable_status(status) else status, down=True)
            raise Attempt(str(status), message, retry_after, None if retryable_status(status) else status)
        try:
            return _decode(content, path, headers.get("content-type"), self.secret)
        except ReasoningOnly as err:
            failure = Attempt("reasoning_only", str(err), final=True)
        except ErrorBody as err:
            failure = Attempt("error_body", str(err))
        except ValueError as err:      # a garbled body: json.JSONDecodeError, MalformedResponse
            failure = Attempt("malformed", one_line(err, self.secret, 2 * MESSAGE_CHARS))
        del content                    # raised out here, no traceback keeps the body (up to max_response_bytes)
        raise failure

    async def exchange(self, request: Any, deadline_s: float) -> tuple[int, Any, bytearray]:
        """Send REQUEST and read its whole body within DEADLINE_S (one total deadline, not one per read), at most
        max_response_bytes of it after decompression; (status, headers, body with the key taken out), or
        Attempt: timeout, connection, too_large (final: the same request would bring the same body)."""
        try:
            async with asyncio.timeout(deadline_s):
                response = await self.http.send(request, stream=True)
                try:
                    content = await read_body(response, self.max_bytes)
                finally:
                    await response.aclose()
        except TimeoutError:
            raise Attempt("timeout", f"no complete answer within {deadline_s:g} s (client.request_timeout_s)") \
                from None
        except ResponseTooLarge as err:
            raise Attempt("too_large", f"{err}; not cached, asked again on the next run (raise "
                          f"client.max_response_bytes if answers this large are right)", final=True) from None
        except self._transport_error as err:
            reason = _transport_failure(err)
            message = (f"no answer within {deadline_s:g} s" if reason == "timeout"
                       else redact(describe_cause(err), self.secret))
            raise Attempt(reason, message) from None
        except ValueError as err:       # a compressed body that does not inflate
            raise Attempt("malformed", one_line(err, self.secret)) from None
        if self.secret and self.secret != PLACEHOLDER_KEY and len(self.secret) >= 4:
            secret = self.secret.encode("utf-8", "replace")
            if secret in content:      # echoed in an answer too: never kept
                content = content.replace(secret, b"***")
        return response.status_code, response.headers, content

    async def get(self, path: str, deadline_s: float) -> tuple[int, Any, bytearray]:
        """GET PATH (e.g. /models) under the same limits as send: (status, headers, body) or Attempt."""
        request = self._request_type("GET", self.urls[path], headers=self.headers,
                                     extensions={"timeout": self._timeout_type(deadline_s).as_dict()})
        return await self.exchange(request, deadline_s)

    async def healthy(self) -> bool:
        """GET /models got an answer that is not a server error (some APIs list no models: a 404 is alive). The
        body is not read."""
        request = self._request_type("GET", self.urls["/models"], headers=self.headers,
                                     extensions=self.health_extensions)
        try:
            async with asyncio.timeout(self.health_s):
                response = await self.http.send(request, stream=True)
                await response.aclose()
        except Exception:  # noqa: BLE001 - a probe: whatever went wrong, the endpoint is not back yet
            return False
        return response.status_code < 500

    async def close(self) -> None:
        if self.health_task is not None:
            self.health_task.cancel()
            await asyncio.gather(self.health_task, return_exceptions=True)
        await self.sdk.close()


def _decode(content: bytes, path: str, content_type: str | None = None, secret: str | None = None) -> dict[str, Any]:
    """The answer's JSON, or why it is none: MalformedResponse (empty, not JSON, no choices, a choice without a
    message or with content of the wrong type), ErrorBody (an {"error": ...} object: the server's words),
    ReasoningOnly (a trace and no answer from a model that stopped of itself). Messages carry no key."""
    if not content.strip():
        raise MalformedResponse(f"the {path} response is empty (HTTP 200 and no body)")
    try:
        data = json.loads(content)
    except ValueError as err:      # json.JSONDecodeError, UnicodeDecodeError
        kind = (content_type or "").split(";")[0].strip().lower()
        if kind and "json" not in kind:
            raise MalformedResponse(f"the {path} response is {kind[:60]}, not JSON "
                                    f"({describe_body(content, secret)})") from None
        where = f" at byte {err.pos}" if isinstance(err, json.JSONDecodeError) else ""
        raise MalformedResponse(f"the {path} response is not valid JSON ({getattr(err, 'msg', None) or err.reason}"
                                f"{where}; {kind or 'no content type'}, {describe_body(content, secret)})") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if isinstance(data, dict) and not choices and data.get("error") is not None:
        raise ErrorBody(f"the server answered HTTP 200 with an error instead of an answer: "
                        f"{error_message(content, secret)}")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse(f"the {path} response has no choices ({describe_body(content, secret)})")
    if path == "/chat/completions":
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise MalformedResponse(f"the {path} response's first choice has no message object")
        if not isinstance(message.get("content"), (str, list, type(None))):
            raise MalformedResponse(f"the {path} response's message content is a "
                                    f"{type(message['content']).__name__}, not text or a list of parts")
        if not message_text(message).strip() and reasoning_text(message) and choice.get("finish_reason") != "length":
            raise ReasoningOnly(f"the answer came only as a reasoning trace, without content (finish_reason "
                                f"{choice.get('finish_reason')!r}); check the server's reasoning parser for this "
                                f"model; not cached, asked again on the next run")
    return data


def describe_body(content: bytes, secret: str | None) -> str:
    """A body that is not an answer, for a message: its size and first characters, the key taken out."""
    start = one_line(content[:2000].decode("utf-8", "replace"), secret, SNIPPET_CHARS)
    return f"{len(content)} bytes, starting {start!r}"


def error_message(content: bytes, secret: str | None = None) -> str:
    """The `error.message` (or `message`, or the text) of an error body, key taken out, on one line, at most
    MESSAGE_CHARS characters."""
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
    return one_line(message, secret)


# ---- reading a body under a cap -------------------------------------------------------------------------

ACCEPT_ENCODING = "gzip, deflate"


async def read_body(response: Any, limit: int = MAX_RESPONSE_BYTES) -> bytearray:
    """RESPONSE's body (an httpx2 streamed response), read chunk by chunk, gzip and deflate inflated here
    step by step, never to more than LIMIT bytes: ResponseTooLarge as soon as the decoded body (or what came
    on the wire) passes it, so a gzip bomb or a body that never ends costs LIMIT bytes, not what it
    claims. ValueError for a compressed body that does not inflate, or a coding that was not asked for."""
    coding = (response.headers.get("content-encoding") or "identity").strip().lower()
    if coding not in ("identity", "gzip", "x-gzip", "deflate"):
        raise ValueError(f"the response came in Content-Encoding {coding[:40]!r}, which was not asked for "
                         f"(Accept-Encoding: {ACCEPT_ENCODING})")
    declared = response.headers.get("content-length")
    if coding == "identity" and declared and declared.strip().isdigit() and int(declared) > limit:
        raise ResponseTooLarge(f"response over max_response_bytes ({limit} bytes): it announces {int(declared)}")
    wire_limit = limit + limit // 16 + 4096     # a compressed body is smaller than its content, but for noise
    inflater, body, wire, done = None, bytearray(), 0, False
    try:
        async with contextlib.aclosing(response.aiter_raw()) as chunks:
            async for chunk in chunks:
                wire += len(chunk)
                if wire > wire_limit:
                    raise ResponseTooLarge(f"response over max_response_bytes ({limit} bytes)")
                if coding == "identity":
                    body += chunk
                else:
                    if inflater is None:
                        inflater = zlib.decompressobj(_wbits(coding, chunk))
                    if inflater.eof:           # bytes after the end of the compressed stream: counted, not kept
                        continue
                    try:
                        body += inflater.decompress(chunk, limit - len(body) + 1)
                    except zlib.error as err:
                        raise ValueError(f"the {coding} body does not inflate ({err})") from None
                if len(body) > limit:
                    raise ResponseTooLarge(f"response over max_response_bytes ({limit} bytes"
                                           f"{' inflated' if coding != 'identity' else ''})")
        if inflater is not None and not inflater.eof and wire:
            raise ValueError(f"the {coding} body ends before its compressed stream does")
        done = True
        return body
    finally:
        # A failure's traceback keeps this frame, and so the buffer, until the cycle collector runs: 16 requests
        # at a time then held hundreds of MB of refused bodies. Emptied here, the memory goes back at once.
        if not done:
            body.clear()


def _wbits(coding: str, first: bytes) -> int:
    """zlib's window bits for a coding: gzip (or zlib) detected from the header; `deflate` is zlib-wrapped by
    the standard, raw by some servers (told apart by the zlib header's check bits)."""
    if coding != "deflate":
        return 47
    zlib_header = len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
    return 15 if zlib_header else -15


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
    """Seconds from `retry-after-ms`, or `retry-after` as seconds or an HTTP date; None if absent or unreadable.
    Not capped here: the caller treats an endpoint asking for more than MAX_RETRY_AFTER_S as down."""
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
    except (TypeError, ValueError, OverflowError):
        return None
    if math.isnan(seconds):
        return None
    return max(seconds, 0.0)
