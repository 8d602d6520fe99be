"""The whole pipeline in one command: stage one (teacher -> SFT -> merge -> predict) and stage two (soft
labels -> distill -> predict), then the score table and the validated submission; make-like.

    python -m launch.pipeline --config recipes/pipeline/<one>.yaml [--stages 1,2] [--set key=value ...]
        [--plan] [--until STEP]
    (or: bash launch/run.sh RECIPE ...)

Each step runs one stage command (launch.teacher, launch.sft, launch.merge, launch.predict,
launch.softlabels, launch.distill, launch.score, launch.submission) with its own log under OUT/logs/.
A step whose content key (its composed recipe, the content of its inputs, its upstream steps' keys and
its code) matches the stamp of its last run is skipped; after a crash, run the same command again.
--plan prints `STEP run (reason)` or `STEP skip (up to date)` for every step and runs nothing (make -n).
Everything is checked first
(recipes, case files, disk, GPUs, teacher endpoint, vLLM environment): bad input is one sentence and
exit 2 before any step starts; so is a run folder another pipeline is running in. A relative
`--set out=...` (train_cases, test_cases) is relative to the working directory. Exit status: 0 done, 2
bad input or a failed step (its log named), 3 the disk filled while the pipeline itself wrote.
"""
from __future__ import annotations

import argparse
import sys

from custom_losses.pipeline.run import run_pipeline
from custom_losses.pipeline.steps import PipelineError
from prep.config import RecipeError, add_recipe_arguments
from prep.jsonio import InputError, disk_full_at, is_disk_full
from prep.locks import FolderInUse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.pipeline", description=__doc__.splitlines()[0])
    add_recipe_arguments(parser, "pipeline recipe (recipes/pipeline/*.yaml)", overlays=False)
    parser.add_argument("--stages", help="comma list overriding the recipe's stages, e.g. 1")
    parser.add_argument("--plan", action="store_true", help="print which steps would run and why; run nothing")
    parser.add_argument("--until", metavar="STEP", help="stop after this step (e.g. teacher, sft)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = args.overrides + ([f"stages=[{args.stages}]"] if args.stages else [])
    try:
        out = run_pipeline(args.config, overrides, plan_only=args.plan, until=args.until)
    except (RecipeError, InputError, PipelineError, FileNotFoundError, FolderInUse) as err:
        print(f"[pipeline] error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a stage validator's own error (ClientError, ValueError, ...): still one sentence
        if is_disk_full(err):
            print(f"[pipeline] error: {disk_full_at(err, 'the run folder')}", file=sys.stderr)
            return 3
        print(f"[pipeline] error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if args.plan or args.until:
        return 0
    print(f"[pipeline] scores: {out / 'scores' / 'scores.md'} and {out / 'scores' / 'scores.png'}")
    curves = sorted((out / "scores").glob("curves-*.png"))   # the score step wrote them (custom_losses.pipeline.plan.curve_files)
    print(f"[pipeline] training curves: {' and '.join(map(str, curves))}")
    print(f"[pipeline] submission (validated): {out / 'submission.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
