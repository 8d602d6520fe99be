"""The one skeleton of the API-driven stages: teacher answers, soft labels and the student's predictions.

Each stage asks an OpenAI-compatible endpoint one request per item and keeps every answer in an
append-only cache, so the three differ only in what an item is, how it is asked and keyed, and what
is derived from the cache. `ApiStage.run` is everything else, once:

    archive the cache (--fresh) -> resolve whom to ask -> for each round: the items the cache lacks ->
    open the endpoint on first need (API key, the recipe's vLLM server via prep.serving.serving,
    GET /models, the stage's preflight) -> prep.client.run_cached -> stop the server -> derive the
    outputs and the summary (the stage) -> OUT/summary.json, OUT/<stage>.log

The shared recipe sections (`client`, `sampling`, `structured_output`, `prompts`, `server`) and what
the stage commands share (flags, bad input as one sentence and exit 2, failed requests as exit 1)
live here too.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from prep.client import (
    ChatClient,
    ClientError,
    ClientSettings,
    RunReport,
    StructuredOutput,
    archive_cache,
    check_endpoint,
    load_cache,
    resolve_api_key,
    run_cached,
)
from prep.config import RecipeError, add_recipe_arguments, load_recipe
from prep.jsonio import InputError, dumps, write_text_atomic
from prep.paths import resolve_path
from prep.prompts import PromptSet, load_prompts
from prep.records import Case, read_cases
from prep.serving import ServerSpec, load_server_spec, serving

log = logging.getLogger("medkd.stage")

# Bad recipes, bad cases, endpoint problems and a vLLM server that would not start (RuntimeError,
# whose message carries the server's log tail): one sentence and exit 2, never a traceback.
STAGE_ERRORS = (RecipeError, InputError, ClientError, FileNotFoundError, ValueError, RuntimeError)


# ---- the recipe sections every API stage has ----------------------------------------------------------

@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 1024
    samples_per_case: int = 1            # > 1: self-consistency, keep the sample that agrees most with the others
    seed: int | None = None              # sample i is asked with seed + i, so samples differ yet reruns repeat

    def __post_init__(self) -> None:
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
    identity: str                  # what produced the answers, for cache keys and summaries


def endpoint_target(client: ClientSettings, server: str | dict[str, Any] | None, model_hint: str = "") -> Target:
    """The recipe's server (asked by its served name unless client.model names another) or a running endpoint."""
    spec = None
    if server is not None:
        spec = load_server_spec(server)
        client = dataclasses.replace(client, model=client.model or spec.served_model_name or spec.model)
    elif not client.base_url:
        raise ClientError("client.base_url is not set and the recipe has no server: section; set one of them")
    if not client.model:
        raise ClientError(f"client.model is not set; name the model the endpoint serves{model_hint}")
    return Target(client, spec, client.model)


class Endpoint:
    """The endpoint, opened on first need (a finished stage starts no server): the API key, the recipe's
    server, GET /models, then the stage's own preflight. A context manager: the server stops on exit."""

    def __init__(self, target: Target, server_log: Path, preflight: Callable[[ClientSettings, str], None]):
        self.target, self.server_log, self.preflight = target, server_log, preflight
        self.settings, self.api_key = target.settings, None
        self._stack = contextlib.ExitStack()

    def open(self) -> tuple[ClientSettings, str]:
        if self.api_key is None:
            api_key = resolve_api_key(self.settings)      # a missing key stops us before a server start
            server = self._stack.enter_context(serving(self.target.spec, self.server_log))
            if server is not None:
                self.settings = dataclasses.replace(self.settings, base_url=server.base_url)
            check_endpoint(self.settings, api_key)
            self.preflight(self.settings, api_key)
            self.api_key = api_key
        return self.settings, self.api_key

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


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
    def ask_wall_s(self) -> float:
        return sum(report.wall_s for report in self.reports)

    def failed_reasons(self) -> dict[str, int]:
        return dict(Counter(reason_kind(failure["error"]) for failure in self.failed))

    def client_stats(self) -> dict[str, Any]:
        """The client's counters summed over the rounds (zeros when nothing was asked)."""
        total = {**NO_REQUESTS, "retry_reasons": Counter()}
        for stats in self.stats:
            for key, value in stats.items():
                total[key] = total[key] + (Counter(value) if key == "retry_reasons" else value)
        return {**total, "retry_reasons": dict(total["retry_reasons"])}


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
        cases = read_cases(resolve_path(cases_path)).cases
        prompts = load_prompts(recipe.prompts.system, recipe.prompts.user)
        return cls(recipe, cases if limit is None else cases[:limit], prompts, **extra)

    def run(self, out: str | Path, *, fresh: bool = False, progress: bool = True) -> dict[str, Any]:
        """Ask what the cache lacks, derive every output, write OUT/summary.json; the summary."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with logging_to(out / f"{self.name}.log"):
            try:
                return self._run(out, fresh, progress)
            except STAGE_ERRORS as err:
                log.error("%s", err)
                raise

    def _run(self, out: Path, fresh: bool, progress: bool) -> dict[str, Any]:
        started = time.perf_counter()
        cache = out / "cache.jsonl"
        if fresh and (moved := archive_cache(cache)):
            log.info("moved the old cache to %s", moved)
        target = self.resolve()
        run = StageRun(target.settings, cached_before=len(load_cache(cache)), started=started)
        with Endpoint(target, out / "server.log", self.preflight) as endpoint:
            for desc, items in self.rounds(cache):
                cached = load_cache(cache)
                pending = [item for item in items if self.key(item) not in cached]
                log.info("%s: %d items, %d cached, %d to ask %s at %s", desc, len(items), len(items) - len(pending),
                         len(pending), target.identity, endpoint.settings.base_url or "(the recipe's server)")
                if pending:
                    settings, api_key = endpoint.open()
                    report, stats = asyncio.run(self._ask(pending, settings, api_key, cache, desc, progress))
                    run.asked += pending
                    run.reports.append(report)
                    run.stats.append(stats)
            run.settings = endpoint.settings
        summary = self.finish(out, run)
        write_text_atomic(out / "summary.json", json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
        log.info("summary: %s", dumps(summary))
        return summary

    async def _ask(self, items: list[Any], settings: ClientSettings, api_key: str, cache: Path, desc: str,
                   progress: bool) -> tuple[RunReport, dict[str, Any]]:
        async with ChatClient(settings, api_key=api_key) as client:
            report = await run_cached(items, self.key, lambda item: self.ask(client, item), cache,
                                      max_in_flight=settings.concurrency * settings.in_flight_per_slot,
                                      stats=client.stats, desc=desc, label_fn=self.label, progress=progress,
                                      abort_after_failures=settings.abort_after_failures)
            return report, client.stats.to_json()

    # ---- what each stage supplies ----

    def resolve(self) -> Target:
        """Whom to ask; called once, first, with the stage's log open (a stage builds its keyed pieces here)."""
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
                 limit_help: str = "only the first N cases") -> argparse.ArgumentParser:
    """--config --input --out --limit --resume/--fresh --overlay --set --no-progress."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser, config_help)
    parser.add_argument("--input", required=True, help="cases JSONL ({id, feature_content})")
    parser.add_argument("--out", required=True, type=Path, help=out_help)
    parser.add_argument("--limit", type=int, help=limit_help)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", dest="fresh", action="store_false", help="reuse the cache (default)")
    group.add_argument("--fresh", dest="fresh", action="store_true",
                       help="move the cache aside and ask everything again")
    parser.set_defaults(fresh=False)  # two actions share the dest; without this --resume's default (True) wins
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


@contextlib.contextmanager
def logging_to(path: Path) -> Iterator[logging.Handler]:
    """The `medkd` loggers also write to PATH while the block runs."""
    handler = logging.FileHandler(path, encoding="utf-8")
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
    """Bad input or an endpoint problem: one sentence on stderr, exit status 2."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def retry_status(summary: dict[str, Any], out: Path) -> int:
    """Exit 1 when requests failed after their retries (a re-run asks for just those), else 0."""
    if summary["failed"] or summary["incomplete"]:
        print(f"error: {summary['failed']} requests failed after retries (see {out / 'summary.json'}); "
              f"run the same command again to ask for them", file=sys.stderr)
        return 1
    return 0
