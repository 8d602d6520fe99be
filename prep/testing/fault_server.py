"""A real HTTP server on 127.0.0.1 that speaks enough of the OpenAI API to test clients against faults.

It answers GET /v1/models and POST /v1/chat/completions (and /v1/completions when proxying) over
HTTP/1.1 keep-alive, built on asyncio streams so no extra package is needed. Each chat request
takes the next item of a script, or the default behaviour when the script is empty:

    "ok"                  a valid answer (the default answer_fn, or the upstream server's when proxying)
    "429"                 rate limited, no Retry-After;  "429 retry-after=2": with Retry-After: 2
    "500", "503", "400"   that status with an OpenAI-style error body
    "slow 3"              wait 3 s before answering (beyond the client's timeout)
    "reset"               drop the connection with a TCP reset, no response
    "truncated"           headers promise more body than is sent, then close
    "malformed"           200 with a body that is not JSON
    {"answer": TEXT}      200 whose assistant content is TEXT (e.g. an invalid answer)
    {"answer": TEXT, "reasoning": TRACE}   ... with TRACE as the message's reasoning trace

Hostile and odd bodies (HOSTILE_FAULTS; the number after a name is optional):

    "echo-key 175"        500 whose error message echoes the presented API key 175 characters in
    "gzip-bomb 1536"      200, Content-Encoding gzip: ~1.5 MB on the wire inflating to 1536 MiB of zeros
    "endless"             200, chunked, a JSON answer whose content never ends (until the client hangs up)
    "huge 60"             200, a valid answer of 60 MB (Content-Length announced); "huge 60 chunked": not announced
    "drip 1"              200, a valid answer sent one byte per second
    "retry-after-huge"    429 with Retry-After: 100000000 (three years)
    "bad-usage"           200, a valid answer whose usage is {"prompt_tokens": "abc", "completion_tokens": 1e30}
    "error-object"        200 whose body is {"error": {"message": ...}} and no choices
    "html"                200, text/html: a proxy's error page
    "empty"               200 with an empty body
    "reasoning-only"      200, the answer only in the message's reasoning trace, content empty
    "parts"               200, the answer as a list of two text content parts
    "gzip", "deflate"     200, a valid answer compressed so (Content-Encoding), as real APIs may send

Without a script item, a request gets one of `faults` (drawn with `seed`) with probability `fault_rate`,
else "ok": `python -m launch.fault_server --fault gzip-bomb --fault html --fault-rate 0.3 --seed 1`.

With `reasoning_fn` every answer also carries a trace beside its content, under `reasoning_field`
(`reasoning_content`, as DeepSeek's API and older vLLM send it, or `reasoning`, newer vLLM's name), and
the trace's characters count in usage.completion_tokens, as a reasoning model's tokens do.

With `body_fn` the server answers "ok" requests (chat and completions) with the body that function builds:
how prep.testing.known_teacher serves a teacher with known answers and exact log-probs on this server. It may
be a coroutine function (awaited on the server's loop, so it can wait on a slow upstream), and may raise
StatusError for an error status other than a ValueError's 400. With `finish_fn` the answers the server builds
itself ("ok" without body_fn or upstream, {"answer": ...}, gzip/deflate) pass through it before they are sent.
prep.testing.hosted_teacher uses both to play hosted teacher APIs: DashScope's Qwen2.5-72B (Qwen tokens as text
and bytes, top_logprobs capped at 5, no /v1/completions) and DeepSeek's deepseek-chat (a foreign tokenizer).

Setting `frozen` makes it stop answering anything (GET /models included) without closing a
connection, as a machine that vanished from the network would, until it is cleared.

It counts what it was asked (received, completed, in flight, the peak in flight) and keeps each
chat request's body and arrival time for assertions. Run in a thread (`with FaultServer() as s`)
for tests, or as a process for benchmarks:

    python -m launch.fault_server --latency 0.3 --capacity 64      # prints "port N", serves until killed

Library code because both the tests and `launch.bench_teacher` stand on it.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import random
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any

DEFAULT_MODEL = "fault-model"
HOSTILE_FAULTS = ("echo-key", "gzip-bomb", "endless", "huge", "drip", "retry-after-huge", "bad-usage", "error-object",
                  "html", "empty", "reasoning-only", "parts")
CLASSIC_FAULTS = ("ok", "429", "500", "502", "503", "504", "400", "422", "501", "slow", "reset", "truncated",
                  "malformed")
ENCODED_ANSWERS = ("gzip", "deflate")      # a valid answer, compressed (what a real API may send)
FAULT_KINDS = (*CLASSIC_FAULTS, *HOSTILE_FAULTS, *ENCODED_ANSWERS)
HUGE_RETRY_AFTER = "100000000"
_STREAM_CHUNK = 64 * 1024
_DISEASES = ["急性扁桃体炎", "社区获得性肺炎", "2型糖尿病", "高血压病", "急性胃肠炎", "偏头痛"]


def _case_digest(body: dict) -> int:
    """The request's user turn (the case) as a number: what the default answer and trace depend on."""
    user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
    return int(hashlib.sha256(user.encode("utf-8")).hexdigest(), 16)


def default_reasoning(body: dict) -> str:
    """A trace that depends only on the case text, as default_answer does."""
    digest = _case_digest(body)
    return f"嗯，先看主诉和现病史。病例编号{digest % 1000}，症状指向{_DISEASES[digest % len(_DISEASES)]}，再排除其他可能。"


def default_answer(body: dict) -> str:
    """A valid answer that depends only on the case text, so reruns and samples are reproducible."""
    digest = _case_digest(body)
    disease = _DISEASES[digest % len(_DISEASES)]
    return json.dumps({"reason": f"1. 主诉与现病史支持{disease}；2. 病例编号{digest % 1000}", "diseases": disease},
                      ensure_ascii=False, separators=(",", ":"))


@functools.lru_cache(maxsize=4)
def gzip_bomb(inflated_mib: int = 1536) -> bytes:
    """A valid gzip stream of INFLATED_MIB MiB of zeros, about 1 KB per MiB: built from one compressed MiB
    repeated (after a full flush deflate starts afresh, so the same input gives the same bytes), then an empty
    final block and the true CRC and length."""
    block = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    segment = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(inflated_mib):
        crc = zlib.crc32(block, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, (inflated_mib << 20) & 0xFFFFFFFF)
    return header + first + segment * (inflated_mib - 1) + b"\x03\x00" + trailer


class StatusError(ValueError):
    """Raised by a body_fn or finish_fn: answer STATUS with an OpenAI-style error body (a plain ValueError: 400)."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.kind = status, kind


class FaultServer:
    def __init__(self, model: str = DEFAULT_MODEL, latency_s: float = 0.0, capacity: int | None = None,
                 api_key: str | None = None, upstream: str | None = None,
                 answer_fn: Callable[[dict], str] = default_answer, list_models: bool = True,
                 reasoning_fn: Callable[[dict], str | None] | None = None,
                 reasoning_field: str = "reasoning_content", faults: list[str] | tuple[str, ...] = (),
                 fault_rate: float = 1.0, seed: int | None = None,
                 body_fn: Callable[[str, dict, int], Any] | None = None,
                 finish_fn: Callable[[dict, dict], dict] | None = None):
        self.model, self.latency_s, self.capacity = model, latency_s, capacity
        self.faults, self.fault_rate, self._random = list(faults), fault_rate, random.Random(seed)
        self.reasoning_fn, self.reasoning_field = reasoning_fn, reasoning_field
        self.api_key, self.upstream, self.answer_fn, self.list_models = api_key, upstream, answer_fn, list_models
        # body_fn(path, request, received) -> the whole "ok" body (chat or completions): a server of its own, e.g.
        # prep.testing.known_teacher's; a ValueError it raises is a 400 (StatusError: its status). It may return an
        # awaitable, awaited on the loop, so a body_fn that waits on another server does not stall the others.
        self.body_fn = body_fn
        # finish_fn(request, body) -> the body to send, for the valid answers the server builds itself.
        self.finish_fn = finish_fn
        self.script: deque[Any] = deque()
        self.received = self.completed = self.in_flight = self.peak_in_flight = self.models_requests = 0
        self.requests: list[dict] = []          # chat request bodies, in arrival order
        self.arrivals: list[float] = []         # time.monotonic() of each chat request
        self.host, self.port = "127.0.0.1", 0
        self.frozen = False                     # True: answer nothing, close nothing (a vanished machine)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)     # notified when a count changes (wait_until)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- control (thread-safe) ---------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def push(self, *items: Any) -> FaultServer:
        with self._lock:
            self.script.extend(items)
        return self

    def counts(self) -> dict[str, int]:
        with self._lock:
            return self._counts()

    def _counts(self) -> dict[str, int]:
        return {"received": self.received, "completed": self.completed, "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight}

    def wait_until(self, predicate: Callable[[dict[str, int]], bool], timeout_s: float) -> bool:
        """Block (from another thread than the server's) until PREDICATE(counts()) holds, re-checked each time a
        chat request arrives or finishes, or until TIMEOUT_S pass; whether it holds."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._counts()), timeout_s)

    def start(self) -> FaultServer:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_forever, args=(ready,), daemon=True, name="fault-server")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run_forever(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(self.serve())
        ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def serve(self) -> asyncio.AbstractServer:
        self._slots = asyncio.Semaphore(self.capacity) if self.capacity else None
        server = await asyncio.start_server(self._connection, self.host, self.port, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        return server

    # ---- HTTP ----------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line.strip():
                    break
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                if not await self._dispatch(method, path.split("?")[0], headers, body, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    async def _hold(self) -> None:
        while self.frozen:
            await asyncio.sleep(0.02)

    async def _dispatch(self, method: str, path: str, headers: dict, body: bytes, writer) -> bool:
        await self._hold()
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            presented = headers.get("authorization", "").removeprefix("Bearer ")
            # Like real providers, the message echoes the key it was given: clients must not repeat it.
            return await self._error(writer, 401, f"Incorrect API key provided: {presented}", "invalid_request_error")
        if method == "GET" and path.endswith("/models"):
            with self._lock:
                self.models_requests += 1
            if not self.list_models:
                return await self._error(writer, 404, "Not Found", "not_found")
            models = [{"id": self.model, "object": "model", "created": 0, "owned_by": "fault-server"}]
            return await self._send(writer, 200, {"object": "list", "data": models})
        if method == "POST" and path.endswith(("/chat/completions", "/completions")):
            return await self._completion(path, body, writer, headers)
        return await self._error(writer, 404, f"no route {method} {path}", "not_found")

    def _draw(self) -> str:
        """With no script item: one of `faults` with probability fault_rate, else "ok" (under the lock)."""
        if self.faults and self._random.random() < self.fault_rate:
            return self._random.choice(self.faults)
        return "ok"

    async def _completion(self, path: str, raw: bytes, writer, headers: dict | None = None) -> bool:
        request = json.loads(raw)
        with self._lock:
            self.received += 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self.requests.append(request)
            self.arrivals.append(time.monotonic())
            item = self.script.popleft() if self.script else self._draw()
            self._changed.notify_all()
        try:
            if self._slots is not None:
                async with self._slots:
                    return await self._respond(item, path, request, raw, writer, headers or {})
            return await self._respond(item, path, request, raw, writer, headers or {})
        finally:
            with self._lock:
                self.in_flight -= 1
                self._changed.notify_all()

    async def _respond(self, item: Any, path: str, request: dict, raw: bytes, writer, headers: dict) -> bool:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        await self._hold()
        if request.get("model") != self.model and not (isinstance(item, str) and item.startswith(("4", "5"))):
            return await self._error(writer, 404, f"The model `{request.get('model')}` does not exist.",
                                     "NotFoundError")
        kind, _, arg = item.partition(" ") if isinstance(item, str) else ("answer", "", "")
        if kind == "slow":
            await asyncio.sleep(float(arg))
            kind = "ok"
        if kind.isdigit():
            headers = {"Retry-After": arg.split("=", 1)[1]} if arg.startswith("retry-after=") else {}
            return await self._error(writer, int(kind), f"scripted {kind}", "scripted", headers)
        if kind == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if kind == "truncated":
            payload = json.dumps(self._chat_body(request, self.answer_fn(request))).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(payload) + 100}\r\n\r\n".encode() + payload[: len(payload) // 2])
            await writer.drain()
            writer.transport.abort()
            return False
        if kind == "malformed":
            return await self._send(writer, 200, b'{"id": "x", "choices": [{"message": ', mark_done=True)
        if kind in HOSTILE_FAULTS:
            return await self._hostile(kind, arg, request, writer, headers)
        try:    # a ValueError from the hooks is the request's fault: an error status, not a dropped connection
            if kind == "answer":
                body = self._chat_body(request, item["answer"], item.get("reasoning", self._reasoning(request)))
                body = self._finished(request, body)
            elif kind not in ENCODED_ANSWERS and self.body_fn is not None:
                body = self.body_fn(path, request, self.received)
                if inspect.isawaitable(body):
                    body = await body
            elif kind not in ENCODED_ANSWERS and self.upstream:
                body = await asyncio.to_thread(self._proxy, path, raw)
            else:
                body = self._finished(request, self._chat_body(request, self.answer_fn(request),
                                                               self._reasoning(request)))
        except ValueError as err:
            return await self._error(writer, getattr(err, "status", 400), str(err),
                                     getattr(err, "kind", "BadRequestError"))
        if isinstance(body, tuple):       # the upstream's (status, payload)
            return await self._send(writer, body[0], body[1], mark_done=body[0] == 200)
        if kind in ENCODED_ANSWERS:
            packer = zlib.compressobj(6, zlib.DEFLATED, 31 if kind == "gzip" else 15)
            payload = packer.compress(json.dumps(body, ensure_ascii=False).encode("utf-8")) + packer.flush()
            return await self._send(writer, 200, payload, headers={"Content-Encoding": kind}, mark_done=True)
        return await self._send(writer, 200, body, mark_done=True)

    def _finished(self, request: dict, body: dict) -> dict:
        return self.finish_fn(request, body) if self.finish_fn is not None else body

    async def _hostile(self, kind: str, arg: str, request: dict, writer, headers: dict) -> bool:
        """One of HOSTILE_FAULTS (see the module docstring); False when the connection is done with."""
        answer = self.answer_fn(request)
        if kind == "echo-key":
            presented = headers.get("authorization", "").removeprefix("Bearer ")
            offset = int(arg or 175)
            filler = ("the upstream worker failed while serving a request; " * (offset // 50 + 1))[:offset]
            return await self._error(writer, 500, f"{filler}{presented} (request id 42)", "server_error")
        if kind == "retry-after-huge":
            return await self._error(writer, 429, "rate limited; come back later", "rate_limit",
                                     {"Retry-After": HUGE_RETRY_AFTER})
        if kind == "gzip-bomb":
            payload = await asyncio.to_thread(gzip_bomb, int(arg or 1536))
            return await self._send(writer, 200, payload, headers={"Content-Encoding": "gzip"})
        if kind in ("endless", "huge"):
            words = arg.split()
            megabytes = float(words[0]) if words and words[0] != "chunked" else 60.0
            size = None if kind == "endless" else int(megabytes * 1_000_000)
            return await self._stream_answer(request, writer, size, chunked=kind == "endless" or "chunked" in arg)
        if kind == "drip":
            return await self._drip(writer, self._chat_body(request, answer), float(arg or 1.0))
        if kind == "bad-usage":
            body = self._chat_body(request, answer)
            body["usage"] = {"prompt_tokens": "abc", "completion_tokens": 1e30, "total_tokens": None}
            return await self._send(writer, 200, body, mark_done=True)
        if kind == "error-object":
            body = {"error": {"message": "The engine is currently overloaded, please try again later",
                              "type": "server_error", "code": "overloaded"}}
            return await self._send(writer, 200, body)
        if kind == "html":
            page = (b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1>"
                    b"</center><hr><center>nginx</center></body></html>")
            return await self._send(writer, 200, page, content_type="text/html")
        if kind == "empty":
            return await self._send(writer, 200, b"")
        if kind == "reasoning-only":
            body = self._chat_body(request, "", f"先分析病例。{answer}")
            return await self._send(writer, 200, body, mark_done=True)
        # parts: the answer split in two text parts, as the array form of `content` carries it
        body = self._chat_body(request, answer, self._reasoning(request))
        half = len(answer) // 2
        body["choices"][0]["message"]["content"] = [{"type": "text", "text": answer[:half]},
                                                    {"type": "text", "text": answer[half:]}]
        return await self._send(writer, 200, body, mark_done=True)

    async def _stream_answer(self, request: dict, writer, size: int | None, chunked: bool) -> bool:
        """A chat answer whose content is SIZE bytes of "a" (None: without end), written 64 KB at a time as the
        client reads, never held whole; until the client hangs up."""
        marker = "\u0000CONTENT\u0000"
        head, tail = (part.encode() for part in json.dumps(self._chat_body(request, marker)).split(
            json.dumps(marker)[1:-1], 1))
        chunked = chunked or size is None
        lines = ["HTTP/1.1 200 OK", "Content-Type: application/json",
                 "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(head) + size + len(tail)}"]

        def frame(data: bytes) -> bytes:
            return f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data

        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + frame(head))
        block, sent = b"a" * _STREAM_CHUNK, 0
        while size is None or sent < size:
            if writer.is_closing():
                return False
            piece = block if size is None else block[: min(_STREAM_CHUNK, size - sent)]
            sent += len(piece)
            writer.write(frame(piece))
            await writer.drain()
        writer.write(frame(tail) + (b"0\r\n\r\n" if chunked else b""))
        await writer.drain()
        return True

    async def _drip(self, writer, body: dict, every_s: float) -> bool:
        """BODY announced in full (Content-Length), then sent one byte every EVERY_S seconds."""
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                     .encode("latin-1"))
        for i in range(len(payload)):
            if writer.is_closing():
                return False
            writer.write(payload[i:i + 1])
            await writer.drain()
            await asyncio.sleep(every_s)
        return True

    def _proxy(self, path: str, raw: bytes) -> tuple[int, bytes]:
        url = self.upstream.rstrip("/") + path[path.index("/v1") + 3:] if "/v1" in path else self.upstream + path
        http = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(http, timeout=300) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def _reasoning(self, request: dict) -> str | None:
        return self.reasoning_fn(request) if self.reasoning_fn else None

    def _chat_body(self, request: dict, content: str, reasoning: str | None = None) -> dict:
        prompt_chars = sum(len(str(m.get("content", ""))) for m in request.get("messages", []))
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message[self.reasoning_field] = reasoning
        completion = len(content) + len(reasoning or "")
        return {
            "id": f"chatcmpl-{self.received}", "object": "chat.completion", "created": int(time.time()),
            "model": request.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": prompt_chars, "completion_tokens": completion,
                      "total_tokens": prompt_chars + completion},
        }

    async def _error(self, writer, status: int, message: str, kind: str, headers: dict | None = None) -> bool:
        body = {"error": {"message": message, "type": kind, "code": status}}
        return await self._send(writer, status, body, headers=headers)

    async def _send(self, writer, status: int, body: Any, headers: dict | None = None,
                    mark_done: bool = False, content_type: str = "application/json") -> bool:
        payload = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode("utf-8")
        lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(payload)}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
        await writer.drain()
        if mark_done:
            with self._lock:
                self.completed += 1
                self._changed.notify_all()
        return True
