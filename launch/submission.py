"""Check a competition submission against its case file, or write one from predictions. `check` validates
SUBMISSION against the input CASES (every input id once, in input order, non-empty string fields, valid JSON) and
prints each problem as `path:line: problem`. `write` takes the answers for exactly the cases of CASES from
PREDICTIONS (predict's `predictions.jsonl`, which may cover more cases) and writes OUT atomically, only when it
validates; a case without an answer stops it with the ids listed.

Reads: the case file CASES, and SUBMISSION (check) or PREDICTIONS (write).
Writes: check: nothing (its verdict on stdout, problems on stderr); write: the submission file OUT.

Example:
    python -m launch.submission check data/sample_cases.jsonl runs/demo/submission.jsonl
    python -m launch.submission write data/sample_cases.jsonl runs/demo/stage1/predict/predictions.jsonl \\
        runs/submission.jsonl
"""
from __future__ import annotations

import argparse
import sys

from prep.cli import command_parser, user_error
from prep.eval.submission import SubmissionError, check_submission, write_submission_from_predictions
from prep.jsonio import InputError
from prep.records import read_cases

NOTES = ("For launch.submission, 2 means the submission is invalid or a file cannot be read (check); 1 that a case "
         "has no answer (write: predict again).")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("launch.submission", __doc__, NOTES)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{check,write}",
                                     help="check a submission, or write one from predictions")
    check = commands.add_parser("check", help="validate SUBMISSION against CASES; path:line: problem lines, exit 2")
    check.add_argument("cases", help="the input case file (JSONL of id, feature_content)")
    check.add_argument("submission", help="the submission JSONL to check")
    check.add_argument("--max-problems", type=int, default=50, help="print at most this many problems (default 50)")
    write = commands.add_parser("write", help="write OUT for the cases of CASES from PREDICTIONS, validated")
    write.add_argument("cases", help="the input case file: the submission has one line per case, in its order")
    write.add_argument("predictions", help="JSONL of {id, reason, diseases, ...} (e.g. predict's predictions.jsonl)")
    write.add_argument("out", help="the submission file to write")
    return parser.parse_args(argv)


def check(cases: str, submission: str, max_problems: int) -> int:
    try:
        problems = check_submission(cases, submission)
    except InputError as err:
        return user_error(err, 2, "cannot read the cases")
    for problem in problems[:max_problems]:
        print(problem, file=sys.stderr)
    if len(problems) > max_problems:
        print(f"... and {len(problems) - max_problems} more problems", file=sys.stderr)
    if problems:
        print(f"{submission}: INVALID ({len(problems)} problems)", file=sys.stderr)
        return 2
    print(f"{submission}: ok ({len(read_cases(cases).cases)} lines, one per case of {cases}, in input order)")
    return 0


def write(cases: str, predictions: str, out: str) -> int:
    try:
        path = write_submission_from_predictions(cases, predictions, out)
    except InputError as err:
        return user_error(err, 2)
    except SubmissionError as err:
        return user_error(err, 1, f"error: {out}")
    print(f"{path}: written and valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "check":
        return check(args.cases, args.submission, args.max_problems)
    return write(args.cases, args.predictions, args.out)


if __name__ == "__main__":
    sys.exit(main())
