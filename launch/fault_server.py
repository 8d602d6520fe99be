"""Serve an OpenAI-compatible, fault-injecting endpoint on 127.0.0.1 (prep.testing.fault_server) until Ctrl-C, for
benchmarks, manual tests and trying a recipe against a misbehaving teacher without spending anything.

Reads: its flags only.
Writes: `port N` on stdout once it listens; nothing on disk.

Example:
    python -m launch.fault_server --latency 0.3 --capacity 64
    python -m launch.fault_server --fault gzip-bomb --fault "drip 1.5" --fault html --fault-rate 0.3 --seed 1

With --fault (repeatable), each chat request gets one of the faults named (drawn with --seed) with
probability --fault-rate (default 1: every request), else a valid answer. A fault is a script item of
prep.testing.fault_server, its argument after a space:

    hostile:  echo-key [OFFSET]  gzip-bomb [MIB]  endless  huge [MB] [chunked]  drip [SECONDS]
              retry-after-huge  bad-usage  error-object  html  empty  reasoning-only  parts
    classic:  ok  429 [retry-after=S]  any other status (500, 503, 400, ...)  slow SECONDS  reset  truncated  malformed
    encoded:  gzip  deflate (a valid answer, compressed)

With --known-teacher it answers as prep.testing.known_teacher's teacher (model "known-teacher" unless --model
says otherwise): answers drawn from a stated distribution per case (data/known_teacher/findings.json), with
exact chat logprobs and /v1/completions prompt_logprobs under the Qwen2.5 tokenizer.

With --hosted it plays a hosted teacher API (prep.testing.hosted_teacher): `qwen` is DashScope's Qwen2.5-72B
(model "qwen2.5-72b-instruct": Qwen tokens as text and bytes, no token ids, top_logprobs up to 5, no
/v1/completions), `foreign` is DeepSeek's deepseek-chat (a toy tokenizer of its own, top_logprobs up to 20).
Its answers come from --upstream (a vLLM server) when given, else are made up with log-probs to match:

    python -m launch.fault_server --hosted qwen --upstream http://127.0.0.1:8000/v1 --model tiny-qwen2.5
    python -m launch.fault_server --hosted foreign --top-logprobs-cap 20

Without --hosted, --upstream makes it a proxy: valid answers are the upstream server's, faults still injected.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib

from prep.cli import command_parser
from prep.testing.fault_server import DEFAULT_MODEL, FAULT_KINDS, FaultServer
from prep.testing.hosted_teacher import DEFAULT_MODELS as HOSTED_MODELS
from prep.testing.hosted_teacher import KINDS as HOSTED_KINDS
from prep.testing.hosted_teacher import TOP_LOGPROBS_CAPS, hosted_teacher_server
from prep.testing.known_teacher import DEFAULT_MODEL as KNOWN_TEACHER_MODEL
from prep.testing.known_teacher import known_teacher_server


def fault(value: str) -> str:
    """A --fault value: a known kind, with its argument if it takes one."""
    value = " ".join(value.split())
    kind, *args = value.split(" ")
    if kind not in FAULT_KINDS and not (kind.isdigit() and len(kind) == 3):
        raise argparse.ArgumentTypeError(f"unknown fault {kind!r}; one of: {', '.join(FAULT_KINDS)}")
    numbers = [word for word in args if word != "chunked" and not word.startswith("retry-after=")]
    for word in numbers + [word.split("=", 1)[1] for word in args if word.startswith("retry-after=")]:
        try:
            float(word)
        except ValueError:
            raise argparse.ArgumentTypeError(f"fault {value!r}: {word!r} is not a number") from None
    return value


def rate(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return number


def parser() -> argparse.ArgumentParser:
    parser = command_parser("launch.fault_server", __doc__, "For launch.fault_server, 0 follows Ctrl-C.")
    parser.add_argument("--port", type=int, default=0, help="the port to listen on (default 0: a free one, printed)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each request takes")
    parser.add_argument("--capacity", type=int, default=None, help="requests served at once; more wait in line")
    parser.add_argument("--model", default=None,
                        help=f"the served model's name (default {DEFAULT_MODEL}, {KNOWN_TEACHER_MODEL}, or the "
                             f"hosted API's: " + ", ".join(f"{m} ({k})" for k, m in HOSTED_MODELS.items()) + ")")
    teachers = parser.add_mutually_exclusive_group()
    teachers.add_argument("--known-teacher", action="store_true",
                          help="answer as the known teacher (prep.testing.known_teacher), exact log-probs included")
    teachers.add_argument("--hosted", choices=HOSTED_KINDS, default=None,
                          help="play a hosted teacher API (prep.testing.hosted_teacher): qwen (DashScope's "
                               "Qwen2.5-72B) or foreign (DeepSeek's deepseek-chat, another tokenizer)")
    parser.add_argument("--top-logprobs-cap", type=int, default=None, metavar="N",
                        help="with --hosted: the largest top_logprobs answered, more is a 400 (default "
                             + ", ".join(f"{n} for {k}" for k, n in TOP_LOGPROBS_CAPS.items()) + ")")
    parser.add_argument("--upstream", default=None, metavar="URL",
                        help="a vLLM server's /v1 URL whose answers are served (with --hosted: its log-probs "
                             "rewritten into the hosted form, or its text re-tokenised); default: none, answers "
                             "made up here")
    parser.add_argument("--api-key", default=None,
                        help="the key clients must present (a wrong one gets 401 echoing it); default: none needed")
    parser.add_argument("--fault", dest="faults", action="append", type=fault, default=[], metavar="KIND",
                        help="a fault some requests get, e.g. gzip-bomb or 'drip 1.5' (repeatable)")
    parser.add_argument("--fault-rate", type=rate, default=1.0,
                        help="the share of chat requests that get one of the faults (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the draws (default: random)")
    return parser


def build(argv: list[str] | None = None) -> FaultServer:
    """The server the command line describes, not started."""
    command = parser()
    args = command.parse_args(argv)
    if args.top_logprobs_cap is not None and not args.hosted:
        command.error("--top-logprobs-cap needs --hosted")
    if args.upstream and args.known_teacher:
        command.error("--upstream and --known-teacher exclude each other (the known teacher answers itself)")
    options = dict(latency_s=args.latency, capacity=args.capacity, api_key=args.api_key, faults=args.faults,
                   fault_rate=args.fault_rate, seed=args.seed)
    if args.known_teacher:
        server = known_teacher_server(model=args.model or KNOWN_TEACHER_MODEL, **options)
    elif args.hosted:
        server = hosted_teacher_server(args.hosted, args.top_logprobs_cap, args.upstream, args.model, **options)
    else:
        server = FaultServer(model=args.model or DEFAULT_MODEL, upstream=args.upstream, **options)
    server.port = args.port
    return server


def main(argv: list[str] | None = None) -> None:
    server = build(argv)

    async def serve() -> None:
        await server.serve()
        print(f"port {server.port}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
