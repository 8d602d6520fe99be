"""What every API-driven stage command shares: its flags, its log file, and bad input as exit 2.

prep.teacher, prep.softlabels and launch.predict differ in what they ask and write, not in how a
user drives them; keeping that here keeps the three commands alike.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from prep.client import ClientError
from prep.config import RecipeError
from prep.jsonio import InputError

# Bad recipes, bad cases, endpoint problems and a vLLM server that would not start (RuntimeError,
# whose message carries the server's log tail): one sentence and exit 2, never a traceback.
STAGE_ERRORS = (RecipeError, InputError, ClientError, FileNotFoundError, ValueError, RuntimeError)


def stage_parser(prog: str, description: str, config_help: str, out_help: str, limit_help: str) -> argparse.ArgumentParser:
    """--config --input --out --limit --resume/--fresh --set --no-progress."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--input", required=True, help="cases JSONL ({id, feature_content})")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--limit", type=int, help=limit_help)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", dest="fresh", action="store_false", help="reuse the cache (default)")
    group.add_argument("--fresh", dest="fresh", action="store_true", help="move the cache aside and ask everything again")
    parser.set_defaults(fresh=False)  # two actions share the dest; without this --resume's default (True) wins
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
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


def fail(log: logging.Logger, err: BaseException) -> int:
    log.error("%s", err)
    print(f"error: {err}", file=sys.stderr)
    return 2


def retry_status(summary: dict, out: Path) -> int:
    """Exit 1 when requests failed after their retries (a re-run asks for just those), else 0."""
    if summary["failed"] or summary["incomplete"]:
        print(f"error: {summary['failed']} requests failed after retries (see {out / 'summary.json'}); "
              f"run the same command again to ask for them", file=sys.stderr)
        return 1
    return 0
