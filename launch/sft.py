"""Stage one: fine-tune the student with Axolotl on the teacher's answers (recipes/sft/*.yaml).

    python -m launch.sft --config RECIPE [--overlay FILE]... [--set key=value]... [--fresh] [--force]
                         [--preflight-only]

--config          recipes/sft/*.yaml (an Axolotl config)
--overlay FILE    merged over it in order, e.g. recipes/sft/overrides/cpu-tiny.yaml for a CPU smoke run
--set key=value   override a key (dotted keys, list items by index: --set datasets.0.path=...); another
                  run folder is four of them: output_dir, dataset_prepared_path, datasets.0.path and
                  test_datasets.0.path (what launch.pipeline passes)
--fresh           delete old checkpoints and start over; otherwise a re-run resumes from the last
                  checkpoint, and a run that already finished with the same config does nothing
--force           train even when the memory estimate says it will not fit
--preflight-only  check everything and write the composed config, then stop

The preflight (custom_losses/train/sft_preflight.py) checks data, base model, lengths, GPUs against the
memory estimate and disk in seconds, and writes OUTPUT_DIR/medkd-sft.yaml. Training: no GPU ->
`python -m axolotl.cli.train` (CPU); 1 GPU -> accelerate with recipes/accelerate/single-gpu.yaml; N GPUs
-> Axolotl preprocesses once, then accelerate with recipes/accelerate/multi-gpu.yaml on N processes
(DeepSpeed comes from the recipe's `deepspeed:`). The log is OUTPUT_DIR/train.log. The last line on
stdout is OUTPUT_DIR. Exit 2 on bad input (one sentence), the trainer's exit code if it fails.
"""
from __future__ import annotations

import argparse
import sys

from custom_losses.train.launcher import train_axolotl
from custom_losses.train.sft_preflight import PreflightError, preflight
from prep.config import RecipeError, add_recipe_arguments
from prep.jsonio import InputError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.sft", description=__doc__.splitlines()[0])
    add_recipe_arguments(parser, "recipes/sft/*.yaml")
    parser.add_argument("--fresh", action="store_true", help="delete old checkpoints and train from the start")
    parser.add_argument("--force", action="store_true", help="continue when the memory estimate says it will not fit")
    parser.add_argument("--preflight-only", action="store_true", help="check and write the config, do not train")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = preflight(args.config, args.overlays, args.overrides, fresh=args.fresh, force=args.force)
    except (PreflightError, RecipeError, InputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if plan.status == "done":
        print(f"[sft] {plan.output_dir} already holds this run, trained to the end: nothing to do "
              f"(--fresh to train again)", file=sys.stderr)
    elif args.preflight_only:
        print(f"[sft] preflight passed: {plan.config_path}", file=sys.stderr)
        return 0
    else:
        code = train_axolotl(plan)
        if code != 0:
            return code
    print(plan.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
