"""Merge a stage-one run's LoRA adapter into a full model for vLLM; the adapter stays where it is. By default the
base is loaded and merged in the precision the student is served in (recipes/serve/qwen2.5-7b-student-1gpu.yaml's
--dtype); --dtype overrides it. A re-run with the same adapter does nothing. It takes no recipe: the adapter's own
config names the base model.

Reads: OUTPUT_DIR (the SFT recipe's output_dir: adapter_config.json and the adapter weights) and the base model it
names.
Writes: the merged model folder (default OUTPUT_DIR/../merged); the last line on stdout is that folder.

Example:
    python -m launch.merge runs/stage1/sft --dtype bfloat16

Serve the merged model:  recipes/serve/qwen2.5-7b-student-1gpu.yaml with model=runs/stage1/merged
or the adapter itself:   the base model with lora_modules {student: runs/stage1/sft}, max_lora_rank >= r
"""
from __future__ import annotations

import sys

from custom_losses.train.memory import PreflightError
from custom_losses.train.merge import DTYPES, merge
from prep.cli import command_parser, user_error
from prep.config import RecipeError


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("launch.merge", __doc__)
    parser.add_argument("output_dir", help="the SFT run's output_dir, e.g. runs/stage1/sft")
    parser.add_argument("--out", help="where the merged model goes (default: OUTPUT_DIR/../merged)")
    parser.add_argument("--dtype", choices=DTYPES, help="the precision the base is loaded and merged in (default: the one the student is served in)")
    args = parser.parse_args(argv)
    try:
        print(merge(args.output_dir, args.out, args.dtype))
    except (PreflightError, RecipeError, OSError, ValueError) as err:
        return user_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
