"""Stage two: distil the teacher's top-k soft labels into the student (recipes/distill/*.yaml, TRL + our loss).

    python -m launch.distill --config RECIPE [--overlay FILE]... [--set key=value]... [--fresh]

--config          recipes/distill/*.yaml (TRL's script, training and model arguments in one file)
--overlay FILE    merged over it in order, e.g. recipes/distill/overrides/cpu-tiny.yaml for a CPU run
--set key=value   override a recipe key, e.g. --set dataset_path=runs/stage2/softlabels --set max_steps=20
--fresh           delete output_dir's checkpoints and train from the start

The recipe is checked first (unknown keys, bad loss knobs, a missing soft-label folder: one sentence,
exit 2). Then the trainer starts: plain python without a GPU, `accelerate launch` with the accelerate
config that fits the visible GPUs otherwise (MEDKD_ACCELERATE_CONFIG overrides it); its output is
appended to output_dir/distill.log. Re-running resumes from the last checkpoint, but only into the
same run: checkpoints made under another composed recipe, other soft labels or another starting model
are refused in one sentence (exit 2) unless --fresh (custom_losses.train.distill.claim_run, which records
the run in output_dir/medkd-run.json, prep.digests' run record). The end writes output_dir/adapter, trainer_state.json
and merged. `accelerate launch -m launch.distill --config ...` runs the
trainer directly.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from custom_losses.train.checkpoints import ResumeRefused
from custom_losses.train.distill import claim_run, parse_recipe, train
from custom_losses.train.launcher import is_worker, launch_argv, note, run_logged, visible_gpus
from custom_losses.train.memory import PreflightError
from prep.config import RecipeError, add_recipe_arguments
from prep.jsonio import InputError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.distill", description=__doc__.splitlines()[0])
    add_recipe_arguments(parser, "recipes/distill/*.yaml")
    parser.add_argument("--fresh", action="store_true", help="delete old checkpoints and train from the start")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        script_args, training_args, model_args = parse_recipe(args.config, args.overlays, args.overrides)
        claim_run(args.config, args.overlays, args.overrides, fresh=args.fresh)  # before the model loads
        if is_worker():
            train(script_args, training_args, model_args)
            return 0
    except (RecipeError, InputError, PreflightError, ResumeRefused) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log = Path(training_args.output_dir) / "distill.log"
    # --fresh has deleted the checkpoints here, once: the trainer processes (one per GPU) must not race to again.
    command = launch_argv("launch.distill", [arg for arg in argv if arg != "--fresh"], visible_gpus())
    log.parent.mkdir(parents=True, exist_ok=True)
    note(f"[distill] {' '.join(command)} (log: {log})", log)
    return run_logged(command, log)


if __name__ == "__main__":
    sys.exit(main())
