"""Stage two: distil the teacher's top-k soft labels into the student with TRL and our weighted top-k loss. The
recipe is checked first (unknown keys, bad loss knobs, a missing soft-label folder: one sentence, exit 2). Then
the trainer starts: plain python without a GPU, `accelerate launch` with the accelerate config that fits the
visible GPUs otherwise (MEDKD_ACCELERATE_CONFIG overrides it). Re-running resumes from the last checkpoint, but
only into the same run: checkpoints made under another composed recipe, other soft labels or another starting
model are refused in one sentence (exit 2) unless --fresh (custom_losses.train.distill.claim_run).

Reads: the distill recipe (recipes/distill/*.yaml: TRL's script, training and model arguments in one file) and its
overlays, the soft-label dataset (dataset_path), the starting model (model_name_or_path, e.g. stage one's merged
model), the lexicon.
Writes: under output_dir: distill.log, checkpoints, medkd-run.json (the run record), adapter/, trainer_state.json
and merged/ (the merged model).

Example:
    python -m launch.distill --config recipes/distill/qwen2.5-7b-instruct-qlora-1gpu.yaml \\
        --overlay recipes/distill/overrides/cpu-tiny.yaml --set dataset_path=runs/softlabels-tiny/dataset

`accelerate launch -m launch.distill --config ...` runs the trainer directly.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from custom_losses.train.checkpoints import ResumeRefused
from custom_losses.train.distill import claim_run, parse_recipe, train
from custom_losses.train.launcher import is_worker, launch_argv, note, run_logged, visible_gpus
from custom_losses.train.memory import PreflightError
from custom_losses.train.needs import check_training_machine
from prep.api.preconditions import Unmet
from prep.cli import command_parser, parse_command, print_config, recipe_arguments, user_error
from prep.config import RecipeError
from prep.jsonio import InputError

NOTES = "For launch.distill, a failed training run exits with the trainer's own status (its log: output_dir/distill.log)."


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = command_parser("launch.distill", __doc__, NOTES)
    recipe_arguments(parser, "distill recipe (recipes/distill/*.yaml)")
    parser.add_argument("--fresh", action="store_true", help="delete old checkpoints and train from the start")
    return parse_command(parser, argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.print_config:
        return print_config(args.config, args.overlays, args.overrides)
    try:
        check_training_machine("distill", args.config, args.overlays, args.overrides)   # before TRL imports
        script_args, training_args, model_args = parse_recipe(args.config, args.overlays, args.overrides)
        claim_run(args.config, args.overlays, args.overrides, fresh=args.fresh)  # before the model loads
        if is_worker():
            train(script_args, training_args, model_args)
            return 0
    except (RecipeError, InputError, PreflightError, ResumeRefused, Unmet) as err:
        return user_error(err)
    log = Path(training_args.output_dir) / "distill.log"
    # --fresh has deleted the checkpoints here, once: the trainer processes (one per GPU) must not race to again.
    command = launch_argv("launch.distill", [arg for arg in argv if arg != "--fresh"], visible_gpus())
    log.parent.mkdir(parents=True, exist_ok=True)
    note(f"[distill] {' '.join(command)} (log: {log})", log)
    return run_logged(command, log)


if __name__ == "__main__":
    sys.exit(main())
