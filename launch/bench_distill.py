"""Measure stage two's batches on the real step-one cases, packed versus unpacked, and the CPU speed of each. It
answers whether packing whole cases into rows of max_length pays: how much padding it removes and how much faster
a training step goes.

Reads: the step-one cases (--cases, from ../shared), the published example answers (--examples), the distill
recipes (--recipe, default every recipes/distill/*.yaml) and the soft-label recipe, the tiny model.
Writes: the tables on stdout; nothing on disk.

Example:
    python -m launch.bench_distill --limit 200 --cpu-cases 16

Part one (no model): each case rendered as the distill data is (the soft-label recipe's prompts, Qwen2.5's
chat template) plus an answer; for each distill recipe (default: every recipes/distill/*.yaml) the
unpacked batches (per_device_train_batch_size cases, right-padded) and the packed ones
(custom_losses.kd.packing rows of up to max_length): real tokens per micro-batch, padded fraction and
optimiser steps per epoch on the GPUs the recipe's header names. Answers: the published examples'
lengths (the headline) and, as the worst case, the soft-label recipe's whole max_tokens budget (why:
custom_losses/checks/distill_bench.py). Part two: the tiny model on CPU (the CPU recipe + overlay), answer
tokens per second of forward + backward, unpacked versus packed, same cases, same run.
Last line: `pad_fraction_packed=A tokens_per_forward_ratio=B cpu_speedup=C`: A the packed rows' unused
max_length capacity (1 - fill), B packed over unpacked real tokens per micro-batch, both for the worst recipe;
C packed over unpacked answer tokens per CPU second.
Without the competition data (../shared) it says so and exits 0.
"""
from __future__ import annotations

import sys

from custom_losses.checks.distill_bench import CASES_PATH, EXAMPLES_PATH, SOFTLABEL_RECIPE, run
from prep.cli import command_parser
from prep.config import RecipeError
from prep.jsonio import InputError
from prep.paths import RECIPES_DIR

CPU_RECIPE = "recipes/distill/qwen2.5-7b-instruct-qlora-1gpu.yaml"
CPU_OVERLAY = "recipes/distill/overrides/cpu-tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("launch.bench_distill", __doc__)
    parser.add_argument("--cases", default=str(CASES_PATH), help="step-one cases (JSONL)")
    parser.add_argument("--examples", default=str(EXAMPLES_PATH), help="published example answers (JSONL, bingli_json)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N cases (part one)")
    parser.add_argument("--recipe", dest="recipes", action="append", help="distill recipe (repeatable; default: all)")
    parser.add_argument("--softlabels", default=SOFTLABEL_RECIPE, help="the soft-label recipe (prompts, max_tokens, top_k)")
    parser.add_argument("--cpu-cases", type=int, default=48, help="cases in the CPU part (0: skip it)")
    parser.add_argument("--cpu-recipe", default=CPU_RECIPE, help="distill recipe of the CPU part")
    parser.add_argument("--cpu-overlay", dest="cpu_overlays", action="append", help=f"its overlay (default {CPU_OVERLAY})")
    args = parser.parse_args(argv)
    recipes = args.recipes or sorted(str(path) for path in (RECIPES_DIR / "distill").glob("*.yaml"))
    try:
        return run(args.cases, recipes, args.softlabels, args.examples, args.limit, args.cpu_cases, args.cpu_recipe,
                   args.cpu_overlays or [CPU_OVERLAY])
    except (RecipeError, InputError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
