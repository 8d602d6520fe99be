"""Stage two: distil the teacher's top-k soft labels into the student (recipes/distill/*.yaml, TRL + our loss).

    python -m launch.distill --config RECIPE [--overlay FILE]... [--set key=value]...

--config          recipes/distill/*.yaml (TRL's script, training and model arguments in one file)
--overlay FILE    merged over it in order, e.g. recipes/distill/overrides/cpu-tiny.yaml for a CPU run
--set key=value   override a recipe key, e.g. --set dataset_path=runs/stage2/softlabels --set max_steps=20

The recipe is checked first (unknown keys, bad loss knobs, a missing soft-label folder: one sentence,
exit 2). Then the trainer starts: plain python without a GPU, `accelerate launch` with the accelerate
config that fits the visible GPUs otherwise (MEDKD_ACCELERATE_CONFIG overrides it); its output is
appended to output_dir/distill.log. Re-running resumes from the last checkpoint; the end writes
output_dir/adapter and output_dir/merged. `accelerate launch -m launch.distill --config ...` runs the
trainer directly.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from custom_losses.distill import parse_recipe, softlabel_folder, train
from custom_losses.launcher import is_worker, launch_argv, note, run_logged, visible_gpus
from custom_losses.memory import PreflightError
from prep.config import RecipeError, add_recipe_arguments
from prep.jsonio import InputError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.distill", description=__doc__.splitlines()[0])
    add_recipe_arguments(parser, "recipes/distill/*.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        script_args, training_args, model_args = parse_recipe(args.config, args.overlays, args.overrides)
        softlabel_folder(script_args.dataset_path)
        if is_worker():
            train(script_args, training_args, model_args)
            return 0
    except (RecipeError, InputError, PreflightError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log = Path(training_args.output_dir) / "distill.log"
    command = launch_argv("launch.distill", argv, visible_gpus())
    log.parent.mkdir(parents=True, exist_ok=True)
    note(f"[distill] {' '.join(command)} (log: {log})", log)
    return run_logged(command, log)


if __name__ == "__main__":
    sys.exit(main())
