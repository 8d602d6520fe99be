"""Stage one: fine-tune the student with Axolotl on the teacher's answers. The preflight
(custom_losses/train/sft_preflight.py) checks data, base model, lengths, GPUs against the memory estimate and disk
in seconds and writes the composed config; then training starts: no GPU -> `python -m axolotl.cli.train` (CPU);
1 GPU -> accelerate with recipes/accelerate/single-gpu.yaml; N GPUs -> Axolotl preprocesses once, then accelerate
with recipes/accelerate/multi-gpu.yaml on N processes (DeepSpeed comes from the recipe's `deepspeed:`). A re-run
resumes from the last checkpoint, and a run that already finished with the same config does nothing.

Reads: the SFT recipe (recipes/sft/*.yaml, an Axolotl config) and its overlays, the datasets it names (the teacher
stage's sft/train.jsonl and sft/valid.jsonl), the base model.
Writes: under the recipe's output_dir: medkd-sft.yaml (the composed config), train.log, checkpoints, the adapter
(or the full model), trainer_state.json; the tokenised dataset under dataset_prepared_path. The last line on stdout
is OUTPUT_DIR.

Example:
    python -m launch.sft --config recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml \\
        --overlay recipes/sft/overrides/cpu-tiny.yaml --set output_dir=runs/sft-tiny

Another run folder is four overrides: output_dir, dataset_prepared_path, datasets.0.path and test_datasets.0.path
(what launch.pipeline passes).
"""
from __future__ import annotations

import argparse
import sys

from custom_losses.train.launcher import train_axolotl
from custom_losses.train.needs import check_training_machine
from custom_losses.train.sft_preflight import PreflightError, preflight
from prep.api.preconditions import Unmet
from prep.cli import command_parser, parse_command, print_config, recipe_arguments, user_error
from prep.config import RecipeError
from prep.jsonio import InputError

NOTES = "For launch.sft, a failed training run exits with the trainer's own status (its log: OUTPUT_DIR/train.log)."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("launch.sft", __doc__, NOTES)
    recipe_arguments(parser, "SFT recipe (recipes/sft/*.yaml, an Axolotl config)")
    parser.add_argument("--fresh", action="store_true", help="delete old checkpoints and train from the start "
                                                             "(otherwise a re-run resumes from the last checkpoint)")
    parser.add_argument("--force", action="store_true", help="continue when the memory estimate says it will not fit")
    parser.add_argument("--preflight-only", action="store_true", help="check and write the config, do not train")
    return parse_command(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        return print_config(args.config, args.overlays, args.overrides)
    try:
        check_training_machine("sft", args.config, args.overlays, args.overrides)   # before Axolotl imports
        plan = preflight(args.config, args.overlays, args.overrides, fresh=args.fresh, force=args.force)
    except (PreflightError, RecipeError, InputError, ValueError, Unmet) as err:
        return user_error(err)
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
