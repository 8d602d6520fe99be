"""Benchmark the teacher client against a local server of known latency and capacity. The server
(launch/fault_server.py) runs in its own process, answering every chat request after a fixed latency with at most
CAPACITY requests served at once, so the best possible rate is CAPACITY / LATENCY. The client side is the real
teacher path (prompt building, ChatClient limits and retries, answer parsing, the exactly-once cache runner writing
a cache) in this process, whose CPU time per request is reported.

Reads: the teacher recipe (prompts, sampling, constraint), the bundled sample cases.
Writes: its caches in a temporary folder (removed); the figures on stdout.

Example:
    python -m launch.bench_teacher --requests 256 --latency 0.1 --capacity 16

The recipe gives the prompts, sampling and constraint; its endpoint is replaced by the fault server.
The two-endpoint case then asks two such servers at once as one recipe's `client.endpoints`: one
with half the capacity at the same latency, one with half the capacity at twice the latency (half as
fast), so the best possible rate is the sum of theirs. It runs twice: first as a baseline with the client
not told how many items are left (free-capacity routing alone), then as the stages run it.

Last line: `capacity_fraction=F speedup_vs_sequential=S client_cpu_ms=C capacity_fraction_2ep=F2`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prep.api.cache import run_cached
from prep.api.pool import ChatClient
from prep.api.settings import ClientSettings, EndpointSettings
from prep.cli import command_parser, parse_command, print_config, recipe_arguments
from prep.paths import REPO_ROOT, resolve_path
from prep.prompts import load_prompts
from prep.records import Case, read_cases
from prep.stages.teacher import Labeller, validate_recipe
from prep.testing.fault_server import DEFAULT_MODEL

SAMPLE_CASES = "data/sample_cases.jsonl"


def start_server(latency: float, capacity: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "launch.fault_server", "--latency", str(latency),
                                "--capacity", str(capacity)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    port = int(process.stdout.readline().split()[1])
    return process, f"http://127.0.0.1:{port}/v1"


def process_cpu_s(pid: int) -> float:
    """utime + stime of another process (Linux /proc), to show what the server itself costs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def synthetic_cases(count: int, first_id: int) -> list[Case]:
    """COUNT distinct cases cycled from the bundled samples (distinct ids, so distinct cache keys)."""
    samples = read_cases(resolve_path(SAMPLE_CASES)).cases
    return [Case(first_id + i, samples[i % len(samples)].feature_content) for i in range(count)]


async def label(labeller: Labeller, settings: ClientSettings, cases: list[Case],
                cache: Path, backlog: bool = True) -> tuple[float, float, int]:
    """(wall seconds, client CPU seconds, requests) for labelling CASES through run_cached; BACKLOG: run_cached
    tells the client how many items are left (as the stages do), for its end-of-run routing."""
    async with ChatClient(settings) as client:
        warm = synthetic_cases(settings.total_concurrency, 10_000_000)   # open the connections outside the timing
        await asyncio.gather(*(labeller.label(client, (case, 0)) for case in warm))
        before = client.stats.requests
        cpu, wall = time.process_time(), time.perf_counter()
        report = await run_cached(labeller.items(cases), labeller.key, lambda item: labeller.label(client, item),
                                  cache, max_in_flight=settings.total_concurrency, stats=client.stats,
                                  progress=False, client=client if backlog else None)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert report.finished == len(cases) and not report.failed, report
        return wall, cpu, client.stats.requests - before


async def bare_aiohttp(base_url: str, body: dict, requests: int, concurrency: int) -> tuple[float, float]:
    """(requests/s, CPU ms per request) of a bare aiohttp loop: what this machine allows right now, for context."""
    import aiohttp

    payload, url = json.dumps(body, ensure_ascii=False).encode("utf-8"), base_url + "/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        slots = asyncio.Semaphore(concurrency)

        async def one() -> None:
            headers = {"Content-Type": "application/json"}
            async with slots, session.post(url, data=payload, headers=headers) as response:
                json.loads(await response.read())

        await asyncio.gather(*(one() for _ in range(concurrency)))
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        return requests / (time.perf_counter() - wall), (time.process_time() - cpu) / requests * 1000


def two_endpoints(labeller: Labeller, base: ClientSettings, capacity: int, latency: float, requests: int,
                  cache: Path, backlog: bool = True) -> tuple[float, float, int]:
    """REQUESTS through one recipe over two fault servers of CAPACITY each, one at LATENCY and one twice as slow."""
    fast, fast_url = start_server(latency, capacity)
    slow, slow_url = start_server(2 * latency, capacity)
    try:
        two = dataclasses.replace(base, base_url=None, endpoints=[
            EndpointSettings(base_url=fast_url, name="fast", concurrency=capacity),
            EndpointSettings(base_url=slow_url, name="slow", concurrency=capacity)])
        return asyncio.run(label(labeller, two, synthetic_cases(requests, 2_000_000), cache, backlog))
    finally:
        for process in (fast, slow):
            process.terminate()
            process.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("launch.bench_teacher", __doc__)
    parser.add_argument("--requests", type=int, default=1280, help="requests in the concurrent run")
    parser.add_argument("--sequential-requests", type=int, default=20, help="requests in the one-at-a-time run")
    parser.add_argument("--latency", type=float, default=0.3, help="seconds the server takes per request")
    parser.add_argument("--capacity", type=int, default=64, help="requests the server serves at once")
    parser.add_argument("--concurrency", type=int, default=None, help="client concurrency (default: the capacity)")
    recipe_arguments(parser, "teacher recipe", default="recipes/teacher/local-tiny-vllm.yaml")
    args = parse_command(parser, argv)
    if args.print_config:
        return print_config(args.config, args.overlays, args.overrides)
    recipe = validate_recipe(args.config, args.overlays, overrides=[*args.overrides, "server=null"])
    server, base_url = start_server(args.latency, args.capacity)
    try:
        labeller = Labeller(recipe, load_prompts(recipe.prompts.system, recipe.prompts.user), DEFAULT_MODEL)
        base = dataclasses.replace(recipe.client, base_url=base_url, model=DEFAULT_MODEL, request_timeout_s=60)
        with tempfile.TemporaryDirectory() as tmp:
            seq_wall, seq_cpu, seq_n = asyncio.run(label(labeller, dataclasses.replace(base, concurrency=1),
                                                         synthetic_cases(args.sequential_requests, 0),
                                                         Path(tmp) / "seq.jsonl"))
            concurrency = args.concurrency or args.capacity
            server_cpu = process_cpu_s(server.pid)
            wall, cpu, n = asyncio.run(label(labeller, dataclasses.replace(base, concurrency=concurrency),
                                             synthetic_cases(args.requests, 1_000_000), Path(tmp) / "par.jsonl"))
            server_cpu = process_cpu_s(server.pid) - server_cpu
            case = synthetic_cases(1, 0)[0]
            body = {"model": DEFAULT_MODEL, "messages": labeller.prompts.messages(case), **labeller.sampling,
                    **labeller.constraint["extra_body"]}
            bare_rate, bare_cpu_ms = asyncio.run(bare_aiohttp(base_url, body, args.requests, concurrency))
            half = max(1, args.capacity // 2)
            # The baseline in the same run: free-capacity routing alone, the client not told what is left.
            wall0, _, n0 = two_endpoints(labeller, base, half, args.latency, args.requests, Path(tmp) / "two0.jsonl",
                                         backlog=False)
            wall2, cpu2, n2 = two_endpoints(labeller, base, half, args.latency, args.requests, Path(tmp) / "two.jsonl")
    finally:
        server.terminate()
        server.wait(10)

    capacity_rate = args.capacity / args.latency
    sequential_rate, rate = seq_n / seq_wall, n / wall
    print(f"server: latency {args.latency} s, capacity {args.capacity} -> at most {capacity_rate:.1f} requests/s")
    print(f"sequential client: {seq_n} requests in {seq_wall:.2f} s = {sequential_rate:.2f} requests/s "
          f"({seq_cpu / seq_n * 1000:.2f} ms CPU each)")
    print(f"concurrent client ({concurrency} in flight): {n} requests in {wall:.2f} s = {rate:.1f} requests/s, "
          f"{cpu:.2f} s client CPU; the server process used {server_cpu:.2f} s CPU "
          f"({server_cpu / n * 1000:.2f} ms per request, warm-up included); load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"for context, a bare aiohttp loop (no SDK, no retries, limits, parsing or cache) at the same time: "
          f"{bare_rate:.1f} requests/s = {bare_rate / capacity_rate:.3f} of capacity, {bare_cpu_ms:.2f} ms CPU each")
    capacity_2ep, rate_2ep = half / args.latency + half / (2 * args.latency), n2 / wall2
    print(f"two endpoints (capacity {half} at {args.latency} s and {half} at {2 * args.latency} s -> at most "
          f"{capacity_2ep:.1f} requests/s together): {n2} requests in {wall2:.2f} s = {rate_2ep:.1f} requests/s, "
          f"{cpu2 / n2 * 1000:.2f} ms client CPU each; {rate_2ep / (n0 / wall0):.3f} x the same run without telling "
          f"the client its backlog ({n0 / wall0:.1f} requests/s = {n0 / wall0 / capacity_2ep:.3f} of capacity)")
    print(f"capacity_fraction={rate / capacity_rate:.3f} speedup_vs_sequential={rate / sequential_rate:.1f} "
          f"client_cpu_ms={cpu / n * 1000:.2f} capacity_fraction_2ep={rate_2ep / capacity_2ep:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
