"""The endpoint pool (`ChatClient`): requests go where there is free capacity, a failing endpoint is left out
until its health check passes and its requests are retried on the others; spend caps stop the run cleanly."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from prep.api.endpoint import (
    Attempt,
    ChatResult,
    ClientStats,
    EndpointConnection,
    SpendCapReached,
    clean_text,
    estimate_prompt_tokens,
    message_text,
    reasoning_text,
)
from prep.api.settings import ClientError, ClientSettings, RequestFailed, key_source, redact, resolve_api_key

log = logging.getLogger("medkd.client")

USAGE_FIELDS = ("prompt_tokens", "completion_tokens")
MAX_USAGE_TOKENS = 100_000_000    # more in one answer is not a count but noise (1e30, a negative, "abc")


def usage_count(value: Any) -> int | None:
    """A usage field as a token count: absent is 0; a whole number in [0, MAX_USAGE_TOKENS] (int or integral
    float) is itself; anything else (a string, a bool, a fraction, inf, 1e30, a negative) None."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if 0 <= value <= MAX_USAGE_TOKENS else None


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
        self.endpoints = [EndpointConnection(endpoint, settings, keys.get(endpoint.name) or resolve_api_key(endpoint))
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
        data, retries, usage = await self._post("/chat/completions", body,
                                                estimate_prompt_tokens(messages) + reasoning_tokens)
        choice = data["choices"][0]
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and "content" in logprobs:
            logprobs = logprobs["content"]
        return ChatResult(message_text(message), choice.get("finish_reason"), usage, logprobs, retries, data,
                          reasoning_text(message))

    async def completion(self, prompt: str | list[int], **params: Any) -> ChatResult:
        """/v1/completions (e.g. `prompt_logprobs` on vLLM); text and logprobs of the first choice."""
        body = self._body({"prompt": prompt}, params)
        estimate = estimate_prompt_tokens(prompt) if isinstance(prompt, str) else len(prompt)
        data, retries, usage = await self._post("/completions", body, estimate)
        choice = data["choices"][0]
        return ChatResult(clean_text(choice.get("text")), choice.get("finish_reason"), usage,
                          choice.get("logprobs"), retries, data)

    def _body(self, payload: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        extra = params.pop("extra_body", None) or {}
        body = {"model": self.settings.model, **payload, **{k: v for k, v in params.items() if v is not None}}
        body.update(extra)
        return body

    def _usage(self, data: dict[str, Any], endpoint: EndpointConnection) -> tuple[dict[str, int], bool]:
        """The answer's prompt and completion tokens, and whether its usage was unreadable: a field that is not a
        count is taken as 0, counted in the endpoint's bad_usage and named in one warning per endpoint (the run
        goes on; the caller charges the request's estimate against the token caps instead)."""
        usage = data.get("usage")
        fields = usage if isinstance(usage, dict) else {}
        counts = {name: usage_count(fields.get(name)) for name in USAGE_FIELDS}
        bad = [name for name, count in counts.items() if count is None]
        if usage is not None and not isinstance(usage, dict):
            bad = ["usage"]
        if bad:
            endpoint.stats.bad_usage += 1
            if endpoint.stats.bad_usage == 1:
                shown = usage if bad == ["usage"] else fields.get(bad[0])
                log.warning("endpoint %s sent a usage field that is not a token count (%s: %s); ignored and "
                            "counted in its bad_usage (this warning once), each such answer charged its estimate "
                            "against the token caps", endpoint.name, "usage" if bad == ["usage"] else f"usage.{bad[0]}",
                            self.redact(repr(shown))[:60])
        return {name: count or 0 for name, count in counts.items()}, bool(bad)

    def _payloads(self, body: dict[str, Any]) -> dict[str, bytes]:
        """The request body per endpoint: the same JSON but for the model name each one serves."""
        payloads: dict[str, bytes] = {}
        for endpoint in self.endpoints:
            model = endpoint.settings.model
            if model not in payloads:
                payloads[model] = json.dumps({**body, "model": model}, ensure_ascii=False).encode("utf-8")
        return payloads

    async def _post(self, path: str, body: dict[str, Any],
                    prompt_estimate: int) -> tuple[dict[str, Any], int, dict[str, int]]:
        """Send until answered: a failed attempt is retried (on another endpoint at once when one is ready,
        else after the backoff) up to max_retries; the body, the retries taken and the usage (readable fields)."""
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
                usage, unreadable = self._usage(data, endpoint)
                self._settle(endpoint, estimate, usage, unreadable)
                settled = True
                return data, retries, usage
            except Attempt as attempt:
                # Its traceback holds the frames that read the body: dropped, so a refused body goes back at once.
                failure = attempt.with_traceback(None)
                failure.__context__ = None
            except asyncio.CancelledError:
                if sending is None or asyncio.current_task().cancelling():
                    raise                # the caller cancelled us, not the prober
                failure = Attempt("connection", "the endpoint stopped answering (its health probe failed)")
            finally:
                if sending is not None:
                    endpoint.sending.discard(sending)
                endpoint.in_flight -= 1
                if not settled:          # failed or cancelled: its reservation goes back
                    self._release(endpoint, estimate)
                self._wake()
            self._count_failure(endpoint, failure, retries)
            reason, message = failure.reason, failure.message
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

    def _count_failure(self, endpoint: EndpointConnection, failure: Attempt, retries: int) -> None:
        """A failed attempt's bookkeeping: the endpoint's error count, a refused request raised by its status,
        a failing endpoint marked down (when others remain; one asking to wait past MAX_RETRY_AFTER_S at once),
        RequestFailed at once for a final failure (or a down one when no other endpoint is up), else once
        max_retries are spent."""
        reason, message = failure.reason, failure.message
        endpoint.stats.errors[reason] += 1
        if failure.refused is not None:
            self.stats.failed += 1
            self._raise_for_status(endpoint, failure.refused, message, retries)
        if reason != "429":
            endpoint.failures_in_row += 1
            if len(self.endpoints) > 1 and endpoint.up and (reason == "connection" or endpoint.failures_in_row >= 3):
                self._mark_down(endpoint, f"{reason}: {message}")
        if failure.down:        # asked to wait longer than a client waits: left out, the request goes elsewhere
            if len(self.endpoints) > 1 and endpoint.up:
                self._mark_down(endpoint, f"{reason}: {message}")
            if not any(other.up for other in self.endpoints if other is not endpoint):
                self.stats.failed += 1
                raise RequestFailed(f"{message} (attempt {retries + 1}; no other endpoint is up)", reason, retries)
        if failure.final:       # the same request would bring the same: not retried, not cached
            self.stats.failed += 1
            raise RequestFailed(f"{message} (attempt {retries + 1} at {endpoint.name})", reason, retries)
        if retries >= self.settings.max_retries:
            self.stats.failed += 1
            raise RequestFailed(f"gave up after {retries + 1} attempts; last: {reason} ({message})", reason, retries)

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

    def _other_ready(self, failed: EndpointConnection, estimate: int) -> EndpointConnection | None:
        now = time.monotonic()
        for endpoint in self.endpoints:
            if (endpoint is not failed and endpoint.up and endpoint.in_flight < endpoint.concurrency
                    and endpoint.fits(estimate) and endpoint.wait_s(now, estimate) == 0):
                return endpoint
        return None

    async def _acquire(self, estimate: int, avoid: EndpointConnection | None) -> EndpointConnection:
        """A slot on the endpoint with the most free capacity that may send now; waits until one may, or, at the
        end of a run, until a faster endpoint's slot would answer sooner than the free one (later_than_waiting)."""
        self._acquiring += 1
        try:
            return await self._acquire_slot(estimate, avoid)
        finally:
            self._acquiring -= 1

    async def _acquire_slot(self, estimate: int, avoid: EndpointConnection | None) -> EndpointConnection:
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

    def _soonest(self, candidates: list[EndpointConnection], best: EndpointConnection, avoid: EndpointConnection | None, now: float,
                 estimate: int, wake: float) -> tuple[EndpointConnection | None, float]:
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
        # Never wait for the endpoint a retry avoids: with a free slot there it would wait for itself, for ever.
        others = [(e.latency_s, e.concurrency) for e in ready if e is not best and e is not avoid]
        if later_than_waiting(best.latency_s, others, self.backlog + self._acquiring):
            return None, min(wake, min(latency / slots for latency, slots in others))
        return best, wake

    def _release(self, endpoint: EndpointConnection, estimate: int) -> None:
        endpoint.reserved -= estimate
        self.reserved -= estimate

    def _settle(self, endpoint: EndpointConnection, estimate: int, usage: dict[str, int],
                unreadable: bool = False) -> None:
        self._release(endpoint, estimate)
        used = usage["prompt_tokens"] + usage["completion_tokens"]
        if unreadable and used < estimate:     # the caps count what the answer may have cost, not a guess of 0
            endpoint.unreported += estimate - used
            self.spent += estimate - used
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

    def _mark_down(self, endpoint: EndpointConnection, why: str, start_check: bool = True) -> None:
        endpoint.up = False
        endpoint.stats.went_down += 1
        log.warning("endpoint %s is down (%s); its requests go to the others until it answers GET /models",
                    endpoint.name, self.redact(why)[:200])
        if start_check and endpoint.health_task is None:
            endpoint.health_task = asyncio.ensure_future(self._watch(endpoint))

    def _mark_up(self, endpoint: EndpointConnection) -> None:
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

    async def _watch(self, endpoint: EndpointConnection) -> None:
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

    def _raise_for_status(self, endpoint: EndpointConnection, status: int, message: str, retries: int) -> None:
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

