"""Make one on-policy round's answers: the student's own answer for a share of the training cases, the teacher's for
the rest. The pipeline runs this as round R's `mix-R` step (stage2.on_policy_rounds, stage2.on_policy_mix); the
soft-label step then scores the answers with `--answers`. It takes no recipe: the pipeline recipe's stage2 keys
are its flags.

Reads: the teacher stage's output folder (its sft/train.jsonl and sft/valid.jsonl), the student's predictions.jsonl
on the training cases.
Writes: the answers file --out (JSONL, atomically); the last line on stdout is the counts by split and source, as
JSON.

Example:
    python -m launch.onpolicy --teacher runs/demo/stage1/teacher \\
        --student runs/demo/stage2/round-1/student/predictions.jsonl --mix 0.5 --seed 2025 --round 1 \\
        --out runs/demo/stage2/round-1/answers.jsonl
"""
from __future__ import annotations

import json
import sys

from prep.cli import command_parser, user_error
from prep.jsonio import InputError
from prep.stages.onpolicy import mix_answers


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("launch.onpolicy", __doc__)
    parser.add_argument("--teacher", required=True, help="the teacher stage's output folder (its sft/*.jsonl)")
    parser.add_argument("--student", required=True, help="the student's predictions.jsonl on the training cases")
    parser.add_argument("--mix", type=float, required=True, help="share of training cases given the student's answer")
    parser.add_argument("--seed", type=int, required=True, help="seed of the draw of which cases get the student's answer")
    parser.add_argument("--round", type=int, required=True, help="the round number (a different draw each round)")
    parser.add_argument("--out", required=True, help="the answers file to write (JSONL)")
    args = parser.parse_args(argv)
    try:
        summary = mix_answers(args.teacher, args.student, args.out, args.mix, args.seed, args.round)
    except (InputError, OSError, ValueError) as err:
        return user_error(err)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
