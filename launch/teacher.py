"""Ask the teacher for an answer to every case, from any OpenAI-compatible endpoint or a vLLM server the recipe
starts, and turn the answers into the SFT dataset of stage one. The recipe names the endpoint (client.base_url,
client.model, client.api_key_env) or the server to start (server:), the sampling, the answer constraint, the
prompt files and the repair turns. A rerun (the default, --resume) asks only for what OUT/cache.jsonl lacks;
--fresh moves the cache aside first.

Reads: the teacher recipe (recipes/teacher/*.yaml), the cases (--input), the prompt files it names, the API key
from the environment variable client.api_key_env names (never from the recipe).
Writes: under OUT: cache.jsonl, rejects.jsonl, sft/train.jsonl, sft/valid.jsonl, sft/dataset/, summary.json,
teacher.log (and server.log).

Example:
    python -m launch.teacher --config recipes/teacher/local-tiny-vllm.yaml --input data/sample_cases.jsonl \\
        --out runs/teacher-tiny --limit 4

Relative paths given here are relative to the working directory (prep.paths). See docs/RELIABILITY.md.
"""
from __future__ import annotations

import sys

from prep.cli import parse_command, print_config
from prep.jsonio import DiskFull
from prep.stages.api_stage import STAGE_ERRORS, disk_full, fail, retry_status, stage_parser
from prep.stages.teacher import TeacherStage


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m launch.teacher", __doc__, "teacher recipe (recipes/teacher/*.yaml)",
                          "output folder (cache, rejects, sft/, summary.json, teacher.log)",
                          "label only the first N cases")
    args = parse_command(parser, argv)
    if args.print_config:
        return print_config(args.config, args.overlays, args.overrides)
    try:
        stage = TeacherStage.from_files(args.config, args.input, limit=args.limit, overlays=args.overlays,
                                        overrides=args.overrides)
        summary = stage.run(args.out, fresh=args.fresh, progress=not args.no_progress,
                                server_url=args.server_url)
    except STAGE_ERRORS as err:
        return fail(err)
    except DiskFull as err:
        return disk_full(err)
    print(f"{summary['answered']}/{summary['cases']} cases answered ({summary['rejected']} rejected, "
          f"{summary['failed']} failed, {summary['incomplete']} incomplete); {summary['retries']} retries; "
          f"outputs in {args.out}", file=sys.stderr)
    return retry_status(summary, args.out)


if __name__ == "__main__":
    sys.exit(main())
