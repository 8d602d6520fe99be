"""The command-line surface every `python -m launch.<command>` shares: its help layout, the recipe flags and
`--print-config`, and the one exit-code table.

A command's module docstring is its help: a paragraph that says what it does, then `Reads:`, `Writes:` and
`Example:` sections. `command_parser` shows it whole (argparse would take the first line only, cutting a
sentence in two) and appends EXIT_CODES, the table docs/RELIABILITY.md shows (tests/test_cli_help.py holds
both to it), so no command words its exit statuses its own way.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prep.config import RecipeError, add_recipe_arguments, compose

EXIT_DONE, EXIT_INCOMPLETE, EXIT_BAD_INPUT, EXIT_DISK_FULL = 0, 1, 2, 3

# (status, meaning, what to do): the one table, in every --help and in docs/RELIABILITY.md.
EXIT_CODES: tuple[tuple[int, str, str], ...] = (
    (EXIT_DONE, "done", "nothing"),
    (EXIT_INCOMPLETE, "not everything finished: some items failed after their retries, cases are incomplete, a spend "
                      "cap stopped the run, a step crashed; the message says which",
     "run the same command again (after fixing what it names): only what is missing is done"),
    (EXIT_BAD_INPUT, "stopped before the work: bad input (bad lines in a case, answer or submission file, a missing "
                     "file), recipe, config or environment (a doctor check failed), an endpoint problem, the "
                     "output folder in use by another run, or too little free disk",
     "fix what the one sentence names"),
    (EXIT_DISK_FULL, "the disk filled while writing",
     "free space and run the same command again: nothing finished is lost"),
)


def exit_code_text() -> str:
    """EXIT_CODES as plain text for --help."""
    rows = [textwrap.fill(f"{status}  {meaning}" + (f"; {todo}." if todo != "nothing" else "."), width=100,
                          initial_indent="  ", subsequent_indent="     ") for status, meaning, todo in EXIT_CODES]
    return "Exit status:\n" + "\n".join(rows)


def exit_code_markdown() -> str:
    """EXIT_CODES as the Markdown table docs/RELIABILITY.md shows."""
    rows = [f"| {status} | {meaning} | {'—' if todo == 'nothing' else todo} |" for status, meaning, todo in EXIT_CODES]
    return "\n".join(["| status | meaning | what to do |", "|---|---|---|", *rows])


def command_parser(module: str, doc: str, notes: str = "") -> argparse.ArgumentParser:
    """The parser of command MODULE (`launch.x`): DOC (its module docstring) whole as the description, then
    NOTES (what its statuses mean for it, when they say more than the table) and the exit-code table."""
    epilog = "\n\n".join(part for part in (textwrap.fill(notes.strip(), width=100), exit_code_text()) if part)
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.strip(), epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def recipe_arguments(parser: argparse.ArgumentParser, recipe_help: str, *, default: str | None = None) -> None:
    """--config, --overlay, --set (prep.config.add_recipe_arguments) and --print-config."""
    add_recipe_arguments(parser, recipe_help, default=default)
    parser.add_argument("--print-config", action="store_true",
                        help="print the composed recipe (after --overlay and --set) as YAML and exit 0; runs nothing, "
                             "creates no folder")


def parse_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """PARSER's arguments from ARGV; with --print-config only --config is required (the recipe is all it reads)."""
    given = list(sys.argv[1:] if argv is None else argv)
    if "--print-config" in given:
        for action in parser._actions:    # argparse has no public way to relax `required` for one flag
            if action.dest != "config":
                action.required = False
    return parser.parse_args(given)


def print_config(config: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> int:
    """Print the composed recipe as YAML and return the exit status: 0, or 2 with one sentence for a bad recipe.
    API keys are never in a recipe (only the names of the variables that hold them), so nothing secret is shown."""
    import yaml

    try:
        data: dict[str, Any] = compose(config, list(overlays), list(overrides))
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # The --set values are not echoed in the header (one may be a secret pasted by mistake); they are in the YAML.
    print(f"# {config}" + "".join(f" + {overlay}" for overlay in overlays) +
          "".join(f" --set {item.split('=', 1)[0]}" for item in overrides))
    print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    return EXIT_DONE


def pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags launch.pipeline and launch.doctor share beyond the recipe's, with one meaning in both."""
    parser.add_argument("--stages", metavar="1,2",
                        help="comma list overriding the recipe's stages, e.g. 1 (the same as --set stages=[1])")


def stages_overrides(stages: str | None) -> list[str]:
    """--stages as the `--set` item it stands for (none when not given)."""
    return [f"stages=[{stages}]"] if stages else []


DEBUG_ENV = "MEDKD_DEBUG"


def debugging() -> bool:
    """MEDKD_DEBUG is set: refusals show their traceback (for a bug report), not only their sentence."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def user_error(err: BaseException, status: int = EXIT_BAD_INPUT, prefix: str = "error") -> int:
    """A user's mistake or an unmet precondition: `PREFIX: <its sentence>` on stderr (its traceback first only with
    MEDKD_DEBUG=1), and STATUS, the command's exit status. Every command refuses through here."""
    if debugging():
        traceback.print_exception(err, file=sys.stderr)
    print(f"{prefix}: {err}", file=sys.stderr)
    return status
