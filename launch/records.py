"""Validate competition case files and summarise them.

    python -m launch.records CASES.jsonl [MORE.jsonl ...] [--rejects REJECTS.jsonl] [--tokenizer DIR] [--no-tokens]

Every bad line is printed to stderr as `path:line: field 'x': problem`; each file's summary (records,
unique ids, duplicate texts, field presence, length percentiles in characters and Qwen2.5 tokens) is
printed to stdout as JSON, with its exact and near-duplicate groups (prep.near_duplicates). With `--against
TRAIN.jsonl` each file is also checked as a test file: its exact and near copies of TRAIN's cases, by id, with
their share, go into its summary, and the last line on stdout is `exact_copies=N near_copies=M test_cases=T`.
Relative paths are relative to the working directory (as for every command's data paths: prep.paths). Exit status 1 when any line or file is bad (an id outside int64 included), else 0.
"""
from __future__ import annotations

import argparse
import json
import sys

from prep.jsonio import InputError
from prep.near_duplicates import contamination_line
from prep.paths import cli_path
from prep.records import contamination_of, read_cases, summarise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.records", description=__doc__.splitlines()[0])
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
            return 1
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
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
