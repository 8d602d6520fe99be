"""Validate competition case files and summarise them. Each bad line is named by file, line and field, and each
file's records, unique ids, duplicate texts, field presence and lengths are summed up, before any stage reads them.

Reads: the case files (JSONL or a JSON array), the Qwen2.5 tokenizer (or --tokenizer), --against's training cases.
Writes: the summaries to stdout (JSON), the bad lines to stderr, and with --rejects the bad lines with their
reasons to that JSONL file.

Example:
    python -m launch.records data/sample_cases.jsonl --no-tokens

Every bad line is printed to stderr as `path:line: field 'x': problem`; each file's summary (records,
unique ids, duplicate texts, field presence, length percentiles in characters and Qwen2.5 tokens) is
printed to stdout as JSON, with its exact and near-duplicate groups (prep.near_duplicates). With `--against
TRAIN.jsonl` each file is also checked as a test file: its exact and near copies of TRAIN's cases, by id, with
their share, go into its summary, and the last line on stdout is `exact_copies=N near_copies=M test_cases=T`.
Relative paths are relative to the working directory (as for every command's data paths: prep.paths).
"""
from __future__ import annotations

import argparse
import json
import sys

from prep.cli import EXIT_BAD_INPUT, EXIT_DONE, command_parser
from prep.jsonio import InputError
from prep.near_duplicates import contamination_line
from prep.paths import cli_path
from prep.records import contamination_of, read_cases, summarise

NOTES = "For launch.records, 2 means a line or a file is bad (an id outside int64 included); each is named."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("launch.records", __doc__, NOTES)
    parser.add_argument("paths", nargs="+", help="case files (JSONL or a JSON array)")
    parser.add_argument("--rejects", help="write bad lines with their reasons to this JSONL file")
    parser.add_argument("--tokenizer", help="model folder whose tokenizer counts tokens "
                                            "(default: the Qwen2.5 tokenizer built from its BPE ranks)")
    parser.add_argument("--no-tokens", action="store_true", help="skip the token-length percentiles")
    parser.add_argument("--against", metavar="TRAIN.jsonl",
                        help="training cases: report which cases of each file are exact or near copies of them")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    count_tokens = None
    if not args.no_tokens:
        from prep.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    bad, train = 0, None
    if args.against:
        try:
            train = read_cases(cli_path(args.against))
        except InputError as err:  # a bad training line: the report would be against part of the file
            print(f"{err} (--against)", file=sys.stderr)
            return EXIT_BAD_INPUT
    for path in args.paths:
        try:
            result = read_cases(cli_path(path), on_error="collect", rejects_path=args.rejects)
        except InputError as err:  # the file as a whole is unreadable
            print(err, file=sys.stderr)
            bad += 1
            continue
        for problem in result.problems:
            print(problem, file=sys.stderr)
        bad += len(result.problems)
        summary = {"path": str(path), "bad_lines": len(result.problems), **summarise(result.cases, count_tokens)}
        if train is not None:
            summary["contamination"] = {"against": str(args.against), **contamination_of(train.cases, result.cases)}
        print(json.dumps(summary, ensure_ascii=False, indent=1))
        if train is not None:
            print(contamination_line(summary["contamination"]))
    return EXIT_BAD_INPUT if bad else EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
