"""The one skeleton of the API-driven stages: teacher answers, soft labels and the student's predictions.

Each stage asks an OpenAI-compatible endpoint one request per item and keeps every answer in an
append-only cache, so the three differ only in what an item is, how it is asked and keyed, and what
is derived from the cache. `ApiStage.run` is everything else, once:

    check the API keys (for a new OUT) -> resolve whom to ask (a configuration mistake makes no OUT) ->
    archive the cache (--fresh) -> for each round: the items the cache lacks ->
    open the endpoint on first need (API key, the recipe's vLLM server via prep.api.serving.serving,
    GET /models, the stage's preflight) -> prep.api.cache.run_cached -> stop the server -> derive the
    outputs and the summary (the stage) -> OUT/summary.json, OUT/<stage>.log

everything from the archive on holding OUT's lock (prep.locks: a second run into the same OUT is refused, exit 2),
with a free-space check against the run's estimated output before the first request, and a full disk anywhere
(prep.jsonio.DiskFull) as one sentence, logged, exit 3.

The shared recipe sections (`client`, `sampling`, `structured_output`, `prompts`, `server`) and what
the stage commands share (flags, bad input as one sentence and exit 2, failed requests as exit 1, a
full disk as exit 3) live here too.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from prep.answers import StructuredOutput
from prep.api.cache import RunReport, archive_cache, load_cache, run_cached
from prep.api.endpoint import estimate_prompt_tokens
from prep.api.pool import ChatClient
from prep.api.preflight import check_endpoint, check_endpoints
from prep.api.serving import AttachedServer, ServerSpec, load_server_spec, model_to_load, serving
from prep.api.settings import ClientError, ClientSettings, resolve_api_key
from prep.cli import EXIT_BAD_INPUT, EXIT_DISK_FULL, command_parser, recipe_arguments, user_error
from prep.config import RecipeError, load_recipe
from prep.digests import model_digest
from prep.jsonio import (
    DiskFull,
    InputError,
    disk_full_at,
    dumps,
    is_disk_full,
    read_appended,
    write_jsonl_atomic,
    write_text_atomic,
)
from prep.locks import folder_lock
from prep.paths import cli_path, free_gib, resolve_path
from prep.prompts import PromptSet, load_prompts
from prep.records import Case, read_cases

log = logging.getLogger("medkd.stage")

# Bad recipes, bad cases, endpoint problems and a vLLM server that would not start (RuntimeError,
# whose message carries the server's log tail): one sentence and exit 2, never a traceback.
# prep.locks.FolderInUse (another run holds OUT) and NotEnoughSpace are RuntimeErrors: exit 2 as well.
STAGE_ERRORS = (RecipeError, InputError, ClientError, FileNotFoundError, ValueError, RuntimeError)


class NotEnoughSpace(RuntimeError):
    """The free space at OUT is below the run's estimated output: said before the first request."""


BYTES_PER_TOKEN = 4      # UTF-8 Chinese is 3 bytes a character, about one character a token; JSON escapes on top
ITEM_OVERHEAD = 4096     # a cache row's keys, usage and ids, the prompt echoed into the outputs


# ---- the recipe sections every API stage has ----------------------------------------------------------

@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 1024
    samples_per_case: int = 1            # > 1: self-consistency, keep the sample that agrees most with the others
    seed: int | None = None              # sample i is asked with seed + i, so samples differ yet reruns repeat
    # Tokens a reasoning model's trace may take beyond max_tokens, counted in every token estimate (spend cap,
    # tokens_per_minute) but never sent: for endpoints whose max_tokens bounds the final answer only, as
    # DeepSeek's API documented for deepseek-reasoner at R1's launch. Where max_tokens covers the trace (vLLM,
    # DeepSeek's API today) leave it 0 and make max_tokens room for trace and answer.
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        if self.reasoning_tokens < 0:
            raise ValueError("key 'sampling.reasoning_tokens': must be 0 or more")
        if self.samples_per_case < 1:
            raise ValueError("key 'sampling.samples_per_case': must be at least 1")
        if self.max_tokens < 1:
            raise ValueError("key 'sampling.max_tokens': must be at least 1")

    def request(self) -> dict[str, Any]:
        """The sampling parameters of a request (the seed is per sample, so not here)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}


@dataclass
class PromptFiles:
    system: str = "data/prompts/system.txt"
    user: str = "data/prompts/user.txt"


@dataclass
class ApiRecipe:
    """What every API-stage recipe holds: whom to ask (client, or a server to start) and how."""

    client: ClientSettings = field(default_factory=ClientSettings)
    sampling: Sampling = field(default_factory=Sampling)
    structured_output: StructuredOutput = field(default_factory=StructuredOutput)
    prompts: PromptFiles = field(default_factory=PromptFiles)
    server: str | dict[str, Any] | None = None   # a serve recipe (path) or inline mapping; the stage starts/stops it
    recipe_path: str = field(default="", init=False)


def check_recipe_files(recipe: ApiRecipe, path: str | Path) -> None:
    """What a run reads first, checked without asking anything: the prompt files and the serve recipe."""
    try:
        load_prompts(recipe.prompts.system, recipe.prompts.user)
    except (FileNotFoundError, ValueError) as err:
        raise RecipeError(path, "prompts", str(err)) from None
    if isinstance(recipe.server, str) and not resolve_path(recipe.server).exists():
        raise RecipeError(path, "server", f"the serve recipe {recipe.server} does not exist")


# ---- whom to ask ----------------------------------------------------------------------------------------

@dataclass
class Target:
    settings: ClientSettings       # model = the name to ask; base_url filled in once a started server is up
    spec: ServerSpec | None        # the server to start, or None for a running endpoint
    identity: str                  # what produced the answers, for cache keys, cache rows and summaries
    known_by: str = ""             # how much the identity knows of the model, in words, for the summary


def served_identity(name: str, spec: ServerSpec) -> tuple[str, str]:
    """What a self-hosted server answers with: NAME (the served name asked) plus the content digest of its model
    folder and of each LoRA adapter it serves (prep.digests.model_digest: a model retrained in place in the same
    folder is another identity); a hub id is known by its name only. The identity and how it is known."""
    served = [("", spec.model), *((f"+lora:{lora}", path) for lora, path in sorted(spec.lora_modules.items()))]
    parts, by_name = [], []
    for label, model in served:
        folder = Path(model_to_load(str(model)))
        if folder.is_dir():
            parts.append(f"{label}@{model_digest(folder)}")
        else:
            parts.append(f"{label}@{model}")
            by_name.append(str(model))
    known_by = ("content: the weights, config and tokenizer files of the served folders" if not by_name else
                f"name: {', '.join(by_name)} is not a local folder, so its name is all that is known of it")
    return name + "".join(parts), known_by


def hosted_identity(client: ClientSettings) -> tuple[str, str]:
    """A hosted endpoint is known by its model name only: what runs behind it may change unseen."""
    urls = ", ".join(endpoint.base_url or "?" for endpoint in client.resolved())
    return client.model, f"name: a running endpoint ({urls}) is known by its model name only"


def endpoint_target(client: ClientSettings, server: str | dict[str, Any] | None, model_hint: str = "") -> Target:
    """The recipe's server (asked by its served name unless client.model names another) or running endpoints."""
    spec = None
    if server is not None:
        spec = load_server_spec(server)
        client = dataclasses.replace(client, model=client.model or spec.served_model_name or spec.model)
    elif not client.base_url and not client.endpoints:
        raise ClientError("client.base_url is not set and the recipe has no server: section; set one of them")
    elif client.endpoints:
        for i, item in enumerate(client.endpoints):
            if not item.base_url:
                raise ClientError(f"client.endpoints.{i}.base_url is not set and the recipe has no server: section; "
                                  f"set one of them")
    endpoints = client.resolved()
    if not client.model and endpoints[0].model:          # several endpoints, each naming its model
        client = dataclasses.replace(client, model=endpoints[0].model)
    if not client.model:
        raise ClientError(f"client.model is not set; name the model the endpoint serves{model_hint}")
    identity, known_by = served_identity(client.model, spec) if spec is not None else hosted_identity(client)
    return Target(client, spec, identity, known_by)


class StageEndpoints:
    """The endpoints, opened on first need (a finished stage starts no server): the API keys, the recipe's
    server, GET /models, then the stage's own preflight on each. A context manager: the server stops on exit.

    With several endpoints, one that cannot be reached yet is left out (`down`) and joins once it
    answers; a refused key or a missing model stops the run as with one.
    """

    def __init__(self, target: Target, server_log: Path, preflight: Callable[[ClientSettings, str], None],
                 server_url: str | None = None):
        self.target, self.server_log, self.preflight = target, server_log, preflight
        self.server_url = server_url      # the recipe's server, already running there (--server-url)
        self.settings, self.api_keys, self.down = target.settings, None, []
        self.server: dict[str, Any] = {"server_started": False, "server_start_s": 0.0}   # for the summary
        self._stack = contextlib.ExitStack()

    def open(self) -> tuple[ClientSettings, dict[str, str]]:
        if self.api_keys is None:
            for endpoint in self.settings.resolved():
                resolve_api_key(endpoint)                 # a missing key stops us before a server start
            server = self._stack.enter_context(serving(self.target.spec, self.server_log, self.server_url))
            if server is not None:
                self.settings = self.settings.with_server(server.base_url)
                started = not isinstance(server, AttachedServer)     # an attached one cost this run no start
                self.server = {"server_started": started, "server_start_s": server.start_s}
            endpoints = self.settings.resolved()          # named by their URLs, the started server's included
            api_keys = {e.name: resolve_api_key(e) for e in endpoints}
            if len(endpoints) == 1:
                check_endpoint(self.settings, api_keys[endpoints[0].name])
            else:
                self.down = check_endpoints(self.settings, api_keys)
            for endpoint in self.settings.resolved():
                if endpoint.name not in self.down:
                    self.preflight(self.settings.only(endpoint) if len(endpoints) > 1 else self.settings,
                                   api_keys[endpoint.name])
            self.api_keys = api_keys
        return self.settings, self.api_keys

    def __enter__(self) -> StageEndpoints:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def spend_cap(settings: ClientSettings) -> int | None:
    """The most tokens a run may spend: client.token_cap, or the endpoints' caps summed when each has one."""
    caps = [endpoint.token_cap for endpoint in settings.resolved()]
    summed = sum(caps) if all(cap is not None for cap in caps) else None
    return min((cap for cap in (settings.token_cap, summed) if cap is not None), default=None)


# ---- the run ---------------------------------------------------------------------------------------------

def text_digest(text: str, length: int = 12) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def reason_kind(reason: str) -> str:
    """The kind of a failure or rejection: its sentence without the details ("gave up after 4 attempts")."""
    return reason.split(" (")[0].split(";")[0].strip()


NO_REQUESTS = {"requests": 0, "succeeded": 0, "retries": 0, "retry_reasons": {}, "failed_requests": 0,
               "tokens_in": 0, "tokens_out": 0}


@dataclass
class StageRun:
    """What the asking part of a run did, for the stage's outputs and summary."""

    settings: ClientSettings                  # as asked: base_url is the started server's
    cached_before: int                        # cache rows before the run
    started: float                            # time.perf_counter() when the run began
    asked: list[Any] = field(default_factory=list)
    reports: list[RunReport] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)

    def wall_s(self) -> float:
        """Seconds since the run began, rounded for the summary."""
        return round(time.perf_counter() - self.started, 3)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [failure for report in self.reports for failure in report.failed]

    @property
    def stopped(self) -> str | None:
        return next((report.stopped for report in self.reports if report.stopped), None)

    @property
    def ask_wall_s(self) -> float:
        return sum(report.wall_s for report in self.reports)

    def spent(self) -> dict[str, int]:
        """Tokens spent so far per endpoint (the earlier rounds'), which the spend caps count."""
        spent: Counter = Counter()
        for stats in self.stats:
            for name, counts in stats.get("endpoints", {}).items():
                spent[name] += counts["tokens_in"] + counts["tokens_out"]
        return dict(spent)

    def failed_reasons(self) -> dict[str, int]:
        return dict(Counter(reason_kind(failure["error"]) for failure in self.failed))

    def client_stats(self) -> dict[str, Any]:
        """The client's counters summed over the rounds (zeros when nothing was asked); under "endpoints",
        each endpoint's requests, errors, tokens and answers per second; "stopped" when a spend cap stopped it."""
        total = {**NO_REQUESTS, "retry_reasons": Counter()}
        endpoints: dict[str, dict[str, Any]] = {}
        for stats in self.stats:
            for key, value in stats.items():
                if key == "endpoints":
                    for name, counts in value.items():
                        mine = endpoints.setdefault(name, {"base_url": counts["base_url"]})
                        for field_name, count in counts.items():
                            if field_name == "error_reasons":
                                mine[field_name] = dict(Counter(mine.get(field_name, {})) + Counter(count))
                            elif field_name != "base_url":
                                mine[field_name] = mine.get(field_name, 0) + count
                else:
                    total[key] = total[key] + (Counter(value) if key == "retry_reasons" else value)
        wall = self.ask_wall_s
        for counts in endpoints.values():
            counts["requests_per_s"] = round(counts["succeeded"] / wall, 3) if wall else 0.0
        stopped = {"stopped": self.stopped} if self.stopped else {}
        return {**total, "retry_reasons": dict(total["retry_reasons"]), "endpoints": endpoints, **stopped}


def set_aside_stale(cache: Path, identity: str) -> int:
    """Move the rows of CACHE that another model made (their "model" is not IDENTITY) to CACHE.stale.jsonl: kept,
    never mixed into this model's answers, and said on the terminal in one line. How many were moved."""
    rows = read_appended(cache) if cache.is_file() else []
    stale = [row for row in rows if row.get("model") not in (None, identity)]
    if not stale:
        return 0
    aside = cache.with_name(cache.stem + ".stale.jsonl")
    earlier = read_appended(aside) if aside.is_file() else []
    write_jsonl_atomic(aside, [*earlier, *stale])
    write_jsonl_atomic(cache, [row for row in rows if row.get("model") in (None, identity)])
    models = sorted({str(row["model"]) for row in stale})
    log.warning("%d cached answer(s) of another model (%s) moved aside to %s: every case is asked of %s",
                len(stale), ", ".join(models[:2]) + (" ..." if len(models) > 2 else ""), aside, identity)
    return len(stale)


class ApiStage:
    """One API-driven stage. Subclasses say what differs (below `run`); `run` is the rest."""

    name: ClassVar[str]                       # OUT/<name>.log, the progress bar, the command
    recipe_schema: ClassVar[type[ApiRecipe]]

    def __init__(self, recipe: ApiRecipe, cases: list[Case], prompts: PromptSet):
        self.recipe, self.cases, self.prompts = recipe, cases, prompts

    @classmethod
    def from_files(cls, config: str | Path, cases_path: str | Path, *, limit: int | None = None,
                   overlays: list[str | Path] = (), overrides: list[str] = (), **extra: Any) -> ApiStage:
        """The stage for a recipe (with overlays and `key=value` overrides) and a cases file (its first LIMIT)."""
        recipe = load_recipe(cls.recipe_schema, config, list(overrides), list(overlays))
        cases = read_cases(cli_path(cases_path)).cases      # the caller's working directory, never the repository
        prompts = load_prompts(recipe.prompts.system, recipe.prompts.user)
        return cls(recipe, cases if limit is None else cases[:limit], prompts, **extra)

    def run(self, out: str | Path, *, fresh: bool = False, progress: bool = True,
            server_url: str | None = None) -> dict[str, Any]:
        """Ask what the cache lacks, derive every output, write OUT/summary.json; the summary. SERVER_URL: the
        recipe's server is already running there (prep.api.serving.attach checks it); it is used, neither started
        nor stopped, and the answers keep the recipe's identity (the URL is in no key).

        When OUT does not exist yet the API keys are checked first; then whom to ask is resolved (the recipe's
        endpoints or server, the stage's keyed pieces): a configuration mistake leaves no OUT behind. Then it
        holds OUT's lock throughout (prep.locks.FolderInUse at once when another run holds it: nothing read,
        archived or asked, nothing written to its log). A full disk anywhere below is DiskFull naming the file,
        logged (when the log can still take a line)."""
        out = Path(out)
        if not out.exists():    # nothing cached, so every item is asked and every key is needed: check them now
            for endpoint in self.recipe.client.resolved():
                resolve_api_key(endpoint)
        target = self.resolve()
        with folder_lock(out), logging_to(out / f"{self.name}.log"):
            try:
                return self._run(out, target, fresh, progress, server_url)
            except Exception as err:
                if is_disk_full(err):
                    full = disk_full_at(err, out)
                    log.error("%s", full)
                    if full is err:
                        raise
                    raise full from err
                if isinstance(err, STAGE_ERRORS):
                    log.error("%s", err)
                raise

    def _run(self, out: Path, target: Target, fresh: bool, progress: bool, server_url: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        cache = out / "cache.jsonl"
        if fresh and (moved := archive_cache(cache)):
            log.info("moved the old cache to %s", moved)
        stale = set_aside_stale(cache, target.identity)
        run = StageRun(target.settings, cached_before=len(load_cache(cache)), started=started)
        rounds = iter(self.rounds(cache))
        first = next(rounds, None)
        if first is not None:
            cached = load_cache(cache)
            pending = [item for item in first[1] if self.key(item) not in cached]
            self.check_spend(target.settings, pending)
            self.check_space(out, pending)
        with StageEndpoints(target, out / "server.log", self.preflight, server_url) as endpoint:
            for desc, items in itertools.chain([first] if first else [], rounds):
                cached = load_cache(cache)
                pending = [item for item in items if self.key(item) not in cached]
                log.info("%s: %d items, %d cached, %d to ask %s at %s", desc, len(items), len(items) - len(pending),
                         len(pending), target.identity,
                         ", ".join(e.base_url or "(the recipe's server)" for e in endpoint.settings.resolved()))
                if pending:
                    settings, api_keys = endpoint.open()
                    report, stats = asyncio.run(self._ask(pending, settings, api_keys, endpoint.down, cache, desc,
                                                          progress, run.spent()))
                    run.asked += pending
                    run.reports.append(report)
                    run.stats.append(stats)
                    if report.stopped:      # a spend cap: no further round either
                        break
            run.settings = endpoint.settings
        summary = self.finish(out, run)
        summary["stale_cache_rows"] = summary.get("stale_cache_rows", 0) + stale
        summary["model_identity"] = {"identity": target.identity, "known_by": target.known_by}
        summary.update(endpoint.server)     # whether this run started a server, and its seconds to healthy
        write_text_atomic(out / "summary.json", json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
        log.info("summary: %s", dumps(summary))
        return summary

    async def _ask(self, items: list[Any], settings: ClientSettings, api_keys: dict[str, str], down: list[str],
                   cache: Path, desc: str, progress: bool, spent: dict[str, int]) -> tuple[RunReport, dict[str, Any]]:
        async with ChatClient(settings, api_keys=api_keys, down=down, spent=spent) as client:
            report = await run_cached(items, self.key, lambda item: self.ask(client, item), cache,
                                      max_in_flight=settings.total_concurrency * settings.in_flight_per_slot,
                                      stats=client.stats, desc=desc, label_fn=self.label, progress=progress,
                                      abort_after_failures=settings.abort_after_failures, client=client)
            return report, client.stats_json()

    def check_spend(self, settings: ClientSettings, pending: list[Any]) -> None:
        """Log (and with a cap, print) the first round's token estimate; refuse (ClientError) a run whose estimate passes the spend cap."""
        if not pending:
            return
        prompt, completion = self.estimate_tokens(pending)
        cap = spend_cap(settings)
        line = (f"{self.name}: {len(pending)} requests to ask, about {prompt} prompt tokens and at most "
                f"{completion} completion tokens ({prompt + completion} in all, repair turns and retries on top)"
                + (f"; spend cap {cap}" if cap is not None else ""))
        log.info("%s", line)
        if cap is not None:         # on the terminal when it matters; always in the stage log
            print(line, file=sys.stderr)
        if cap is not None and prompt + completion > cap:
            raise ClientError(f"the run may spend about {prompt + completion} tokens ({len(pending)} requests), "
                              f"over its spend cap of {cap}; raise client.token_cap (or the endpoints' token_cap), "
                              f"lower sampling.max_tokens, or ask fewer cases with --limit")

    def check_space(self, out: Path, pending: list[Any]) -> None:
        """NotEnoughSpace when the disk holding OUT has less free than the run's estimated output (estimate_bytes),
        before anything is asked: a full disk found later costs the requests in flight when it fills."""
        if not pending:
            return
        per_item, how = self.estimate_bytes()
        need, free = per_item * len(pending), int(free_gib(out) * 2**30)
        log.info("%s: about %.1f MB of output for %d requests (%s); %.1f MB free at %s", self.name, need / 2**20,
                 len(pending), how, free / 2**20, out)
        if free < need:
            raise NotEnoughSpace(f"not enough disk space at {out}: {free / 2**20:.1f} MB free, and this run's outputs "
                                 f"need about {need / 2**20:.1f} MB ({len(pending)} requests x about "
                                 f"{per_item / 1024:.0f} KB each, a rough estimate: {how}); free space or choose "
                                 f"another --out")

    def estimate_bytes(self) -> tuple[int, str]:
        """Rough bytes of output per request, and how that was reckoned, in words for the message: each answer
        token (sampling.max_tokens + reasoning_tokens) kept three times (cache, output files, dataset)."""
        tokens = self.recipe.sampling.max_tokens + self.recipe.sampling.reasoning_tokens
        return (3 * BYTES_PER_TOKEN * tokens + ITEM_OVERHEAD,
                f"{3 * BYTES_PER_TOKEN} bytes per sampling.max_tokens token plus {ITEM_OVERHEAD // 1024} KB per "
                f"request")

    def estimate_tokens(self, items: list[Any]) -> tuple[int, int]:
        """(prompt tokens, completion tokens) for asking ITEMS once each: one token per prompt character
        plus 4 per message, and sampling.max_tokens (plus reasoning_tokens) per answer. Items are cases or
        (case, sample) pairs."""
        prompt = sum(estimate_prompt_tokens(self.prompts.messages(item[0] if isinstance(item, tuple) else item))
                     for item in items)
        return prompt, len(items) * (self.recipe.sampling.max_tokens + self.recipe.sampling.reasoning_tokens)

    # ---- what each stage supplies ----

    def resolve(self) -> Target:
        """Whom to ask; called once, first, before OUT is made (a stage builds its keyed pieces here)."""
        return endpoint_target(self.recipe.client, self.recipe.server)

    def rounds(self, cache: Path) -> Iterable[tuple[str, list[Any]]]:
        """(progress label, items) per round, produced lazily: a round may read what the one before cached."""
        yield self.name, self.items()

    def items(self) -> list[Any]:
        raise NotImplementedError

    def key(self, item: Any) -> str:
        raise NotImplementedError

    async def ask(self, client: ChatClient, item: Any) -> dict[str, Any]:
        raise NotImplementedError

    def label(self, item: Any) -> Hashable:
        """How a failed item is named in logs and rejects."""
        return repr(item)

    def preflight(self, settings: ClientSettings, api_key: str) -> None:
        """Checks against the open endpoint before the first request (none by default)."""

    def finish(self, out: Path, run: StageRun) -> dict[str, Any]:
        """Derive the outputs from the cache (atomically); the summary."""
        raise NotImplementedError


# ---- what the stage commands share ---------------------------------------------------------------------

def stage_parser(prog: str, description: str, config_help: str, out_help: str,
                 limit_help: str = "only the first N cases", notes: str = "") -> argparse.ArgumentParser:
    """--config --overlay --set --print-config --input --out --limit --resume/--fresh --no-progress, with the
    shared help layout and exit-code table (prep.cli; NOTES: what the statuses mean for this command beyond it)."""
    parser = command_parser(prog.removeprefix("python -m "), description, notes)
    recipe_arguments(parser, config_help)
    parser.add_argument("--input", required=True, help="cases JSONL ({id, feature_content})")
    parser.add_argument("--out", required=True, type=Path, help=out_help)
    parser.add_argument("--limit", type=int, metavar="N", help=limit_help)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", dest="fresh", action="store_false", help="reuse the cache (default)")
    group.add_argument("--fresh", dest="fresh", action="store_true",
                       help="move the cache aside and ask everything again")
    parser.set_defaults(fresh=False)  # two actions share the dest; without this --resume's default (True) wins
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--server-url", metavar="URL", help="the recipe's server: is already running at URL (e.g. "
                        "http://127.0.0.1:8000/v1, started by the pipeline or launch.serve with the same serve "
                        "recipe): checked to serve that model, used, not started or stopped")
    return parser


class _StageLog(logging.FileHandler):
    """A stage's log file: a line the full disk refuses is dropped quietly (the command says the disk is full in
    one sentence), where logging would print a traceback of the refused line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if is_disk_full(sys.exc_info()[1] or Exception()):
            return
        super().handleError(record)


@contextlib.contextmanager
def logging_to(path: Path) -> Iterator[logging.Handler]:
    """The `medkd` loggers also write to PATH while the block runs."""
    handler = _StageLog(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("medkd")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        handler.close()


def fail(err: BaseException) -> int:
    """Bad input, an endpoint problem, an output folder in use or too little disk: one sentence on stderr (its
    traceback too with MEDKD_DEBUG=1), exit status 2."""
    return user_error(err, EXIT_BAD_INPUT)


def disk_full(err: DiskFull) -> int:
    """The disk filled while the run wrote: its one sentence on stderr, exit status 3 (EXIT_DISK_FULL)."""
    print(f"error: {err}", file=sys.stderr)
    return EXIT_DISK_FULL


def retry_status(summary: dict[str, Any], out: Path) -> int:
    """Exit 1 when a spend cap stopped the run, requests failed after their retries or cases are incomplete
    (a re-run asks for just what is missing), else 0; the message says which of these it is."""
    if summary.get("stopped"):
        print(f"error: {summary['stopped']}", file=sys.stderr)
        return 1
    failed, incomplete = summary["failed"], summary["incomplete"]
    if not failed and not incomplete:
        return 0
    said = []
    if failed:
        said.append(f"{failed} requests failed after retries")
    if incomplete:
        said.append(f"{incomplete} of {summary.get('cases', '?')} cases are incomplete (answers they need are not in "
                    f"{out / 'cache.jsonl'}" + ("" if failed else
                                                 ", though no request failed: rows were set aside or removed while "
                                                 "the run ran, see the warnings above") + ")")
    print(f"error: {' and '.join(said)} (see {out / 'summary.json'}); run the same command again to ask for them",
          file=sys.stderr)
    return 1
