"""Stage two data: the teacher's top-k log-probabilities at every answer token, in the student's token ids.

    python -m launch.softlabels --config recipes/softlabels/local-tiny-vllm.yaml --input data/sample_cases.jsonl \
        --out runs/softlabels-tiny [--answers DIR_OR_JSONL] [--limit N] [--resume | --fresh] [--overlay FILE]... \
        [--set KEY=VALUE]... [--no-progress]

Without --answers the teacher generates each answer with its top-k log-probs; with --answers (the
teacher stage's output folder, or a JSONL file of rows with messages, or reason and diseases) a
self-hosted vLLM teacher scores those fixed answers. A teacher whose tokens are not Qwen2.5's is
refused. Outputs under OUT: cache.jsonl, rejects.jsonl, dataset/ (train/validation), summary.json,
softlabels.log (and server.log). Relative paths given here are relative to the working directory.
Exit status: 0 done, 1 some requests failed after their retries or cases are incomplete (run the same
command again), 2 bad input, an endpoint problem, a foreign tokenizer, OUT in use by another run or too
little free disk, 3 the disk filled while writing (free space and run the same command again).
"""
from __future__ import annotations

import sys

from prep.jsonio import DiskFull
from prep.paths import cli_path
from prep.stages.api_stage import STAGE_ERRORS, disk_full, fail, retry_status, stage_parser
from prep.stages.softlabels import SoftLabelStage


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m launch.softlabels", __doc__, "soft-label recipe (recipes/softlabels/*.yaml)",
                          "output folder (cache, rejects, dataset/, summary.json, softlabels.log)")
    parser.add_argument("--answers", help="score these fixed answers instead of generating: the teacher stage's "
                                          "output folder or a JSONL file (rows with messages, or reason and diseases)")
    args = parser.parse_args(argv)
    try:
        answers = cli_path(args.answers) if args.answers else None      # the working directory's, never the repo's
        stage = SoftLabelStage.from_files(args.config, args.input, answers=answers, limit=args.limit,
                                          overlays=args.overlays, overrides=args.overrides)
        summary = stage.run(args.out, fresh=args.fresh, progress=not args.no_progress)
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
