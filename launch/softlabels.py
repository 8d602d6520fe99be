"""Record the teacher's top-k log-probabilities at every answer token, in the student's token ids: stage two's
data. Without --answers the teacher generates each answer with its top-k log-probs; with --answers (the teacher
stage's output folder, or a JSONL file of rows with messages, or reason and diseases) a self-hosted vLLM teacher
scores those fixed answers. A teacher with another tokenizer (softlabels.teacher_tokenizer: foreign) has its
top-k aligned onto Qwen2.5's tokens; one whose tokens are not Qwen2.5's without that key is refused (exit 2).

Reads: the soft-label recipe (recipes/softlabels/*.yaml), the cases (--input), the fixed answers (--answers) or
the teacher stage's split and agreement (--split-from), the prompt files, the API key from the variable client.api_key_env names.
Writes: under OUT: cache.jsonl, rejects.jsonl, dataset/ (train/validation), summary.json, softlabels.log (and
server.log).

Example:
    python -m launch.softlabels --config recipes/softlabels/local-tiny-vllm.yaml --input data/sample_cases.jsonl \\
        --answers runs/teacher-tiny --out runs/softlabels-tiny

Relative paths given here are relative to the working directory. See docs/RELIABILITY.md.
"""
from __future__ import annotations

import sys

from prep.cli import parse_command, print_config
from prep.jsonio import DiskFull
from prep.paths import cli_path
from prep.stages.api_stage import STAGE_ERRORS, disk_full, fail, retry_status, stage_parser
from prep.stages.softlabels import SoftLabelStage


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m launch.softlabels", __doc__, "soft-label recipe (recipes/softlabels/*.yaml)",
                          "output folder (cache, rejects, dataset/, summary.json, softlabels.log)")
    parser.add_argument("--answers", help="score these fixed answers instead of generating: the teacher stage's "
                                          "output folder or a JSONL file (rows with messages, or reason and diseases)")
    parser.add_argument("--split-from", help="fresh samples: the teacher stage's output folder (or answers JSONL) whose "
                                             "held-out ids become the validation split and whose agreement weighs "
                                             "each case, so stage two never trains on what stage one's score rates")
    args = parse_command(parser, argv)
    if args.print_config:
        return print_config(args.config, args.overlays, args.overrides)
    try:
        answers = cli_path(args.answers) if args.answers else None      # the working directory's, never the repo's
        split_from = cli_path(args.split_from) if args.split_from else None
        stage = SoftLabelStage.from_files(args.config, args.input, answers=answers, split_from=split_from,
                                          limit=args.limit,
                                          overlays=args.overlays, overrides=args.overrides)
        summary = stage.run(args.out, fresh=args.fresh, progress=not args.no_progress,
                                server_url=args.server_url)
    except STAGE_ERRORS as err:
        return fail(err)
    except DiskFull as err:
        return disk_full(err)
    print(f"{summary['answered']}/{summary['cases']} cases have soft labels ({summary['rejected']} rejected, "
          f"{summary['failed']} failed, {summary['incomplete']} incomplete, {summary['without_answer']} without an "
          f"answer); {summary['bytes_per_answer_token']} bytes per answer token on disk; outputs in {args.out}",
          file=sys.stderr)
    return retry_status(summary, args.out)


if __name__ == "__main__":
    sys.exit(main())
