"""An OpenAI-compatible fault-injecting server on 127.0.0.1 (prep.testing.fault_server), for benchmarks and manual tests.

    python -m launch.fault_server [--port N] [--latency S] [--capacity N] [--model NAME]   # prints "port N"
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib

from prep.testing.fault_server import DEFAULT_MODEL, FaultServer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.fault_server", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each request takes")
    parser.add_argument("--capacity", type=int, default=None, help="requests served at once; more wait in line")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    server = FaultServer(model=args.model, latency_s=args.latency, capacity=args.capacity)
    server.port = args.port

    async def serve() -> None:
        await server.serve()
        print(f"port {server.port}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
