"""Run the whole pipeline, make-like: stage one (teacher -> SFT -> merge -> predict), stage two (soft labels ->
distill -> predict, then any on-policy rounds), the score table and the validated submission. Each step runs one
stage command (launch.teacher, launch.sft, launch.merge, launch.predict, launch.softlabels, launch.distill,
launch.onpolicy, launch.score, launch.submission) with its own log. A step whose content key (its composed
recipe, the content of its inputs, its upstream steps' keys and its code) matches the stamp of its last run is
skipped, so after a crash the same command resumes. Everything is checked first by the doctor (recipes, case
files, disk, GPUs, teacher endpoints, the vLLM environment), before any step starts.

Reads: the pipeline recipe (recipes/pipeline/*.yaml) and the stage recipes it names, its train_cases and
test_cases. A relative `--set out=...` (train_cases, test_cases) is relative to the working directory.
Writes: the run folder OUT (the recipe's `out`): stage1/, stage2/, base/, scores/scores.md and scores.png,
submission.jsonl, logs/ (one log per step), stamps/ (each step's content key), pipeline_summary.json.

Example:
    python -m launch.pipeline --config recipes/pipeline/tiny-cpu.yaml --plan
    python -m launch.pipeline --config recipes/pipeline/tiny-cpu.yaml --limit 4 --set out=runs/trial
    python -m launch.pipeline --config recipes/pipeline/qwen2.5-7b-1gpu.yaml --stages 1 --until sft
    (or: bash launch/run.sh RECIPE [these flags])

--plan prints `STEP run (reason)` or `STEP skip (up to date)` for every step and runs nothing (make -n).
--limit N is a trial on the first N training cases and the first N test cases through every stage; the limit is
part of each step's content key, so a limited run and a full run never take each other's outputs as up to date
(give the trial its own --set out=... to keep both).
"""
from __future__ import annotations

import sys

from custom_losses.pipeline.cost_report import final_lines
from custom_losses.pipeline.run import run_pipeline
from custom_losses.pipeline.steps import PipelineError
from prep.cli import (
    EXIT_BAD_INPUT,
    EXIT_DISK_FULL,
    command_parser,
    parse_command,
    pipeline_arguments,
    print_config,
    recipe_arguments,
    stages_overrides,
    user_error,
)
from prep.config import RecipeError
from prep.jsonio import InputError, disk_full_at, is_disk_full
from prep.locks import FolderInUse

NOTES = "For launch.pipeline, a step that fails gives the step's own code (1 run the same command again, 2 fix " \
        "what it names, 3 free disk; a crashed step is 1, its log is named); 3 also when the pipeline's own " \
        "writes fill the disk."

PREFIX = "[pipeline] error"


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("launch.pipeline", __doc__, NOTES)
    recipe_arguments(parser, "pipeline recipe (recipes/pipeline/*.yaml)")
    pipeline_arguments(parser)
    parser.add_argument("--plan", action="store_true", help="print which steps would run and why; run nothing")
    parser.add_argument("--until", metavar="STEP", help="stop after this step (e.g. teacher, sft)")
    parser.add_argument("--only", metavar="STEP,STEP", type=lambda value: [name for name in value.split(",") if name],
                        help="run only these steps, e.g. teacher,softlabels: with hosted teachers, every paid label "
                             "on a CPU box before a GPU is rented (a step's inputs from steps not named must be up "
                             "to date)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="a trial on the first N training and test cases through every stage")
    args = parse_command(parser, argv)
    overrides = args.overrides + stages_overrides(args.stages)
    if args.print_config:
        return print_config(args.config, args.overlays, overrides)
    try:
        out = run_pipeline(args.config, overrides, overlays=args.overlays, plan_only=args.plan, until=args.until,
                           limit=args.limit, only=args.only)
    except PipelineError as err:
        return user_error(err, err.exit_code, PREFIX)
    except (RecipeError, InputError, FileNotFoundError, FolderInUse) as err:
        return user_error(err, EXIT_BAD_INPUT, PREFIX)
    except Exception as err:  # a stage validator's own error (ClientError, ValueError, ...): still one sentence
        if is_disk_full(err):
            return user_error(disk_full_at(err, "the run folder"), EXIT_DISK_FULL, PREFIX)
        return user_error(err, EXIT_BAD_INPUT, f"{PREFIX}: {type(err).__name__}")
    if args.plan or args.until or args.only:
        return 0
    print(f"[pipeline] scores: {out / 'scores' / 'scores.md'} and {out / 'scores' / 'scores.png'}")
    curves = sorted((out / "scores").glob("curves-*.png"))   # the score step wrote them (custom_losses.pipeline.plan.curve_files)
    print(f"[pipeline] training curves: {' and '.join(map(str, curves))}")
    print(f"[pipeline] submission (validated): {out / 'submission.jsonl'}")
    for line in final_lines(out):   # the cost totals, estimated and actual, and the server/wall line
        print(f"[pipeline] {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
