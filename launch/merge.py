"""Merge a stage-one run's LoRA adapter into a full model for vLLM (the adapter stays where it is).

    python -m launch.merge OUTPUT_DIR [--out DIR] [--dtype bfloat16|float16|float32|auto]

OUTPUT_DIR is the SFT recipe's output_dir, e.g. runs/stage1/sft -> writes runs/stage1/merged.
--dtype overrides the precision the base is loaded and merged in; by default it is the one the student
is served in (recipes/serve/qwen2.5-7b-student-1gpu.yaml's --dtype). A re-run with the same adapter does
nothing. The last line on stdout is the merged folder.
Serve the merged model:  recipes/serve/qwen2.5-7b-student-1gpu.yaml with model=runs/stage1/merged
or the adapter itself:   the base model with lora_modules {student: runs/stage1/sft}, max_lora_rank >= r
"""
from __future__ import annotations

import argparse
import sys

from custom_losses.train.memory import PreflightError
from custom_losses.train.merge import DTYPES, merge
from prep.config import RecipeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.merge", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the SFT run's output_dir, e.g. runs/stage1/sft")
    parser.add_argument("--out", help="where the merged model goes (default: OUTPUT_DIR/../merged)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: the dtype the student is served in")
    args = parser.parse_args(argv)
    try:
        print(merge(args.output_dir, args.out, args.dtype))
    except (PreflightError, RecipeError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
