"""Predict the peak GPU memory of an SFT or distill recipe per GPU, term by term, before any GPU time is spent.
RECIPE is an Axolotl recipe (recipes/sft/*.yaml) or a TRL distill recipe (recipes/distill/*.yaml). --model names the
model's shape when the recipe's model is a folder that does not exist yet (a distill recipe's runs/stage1/merged:
pass the model stage one starts from, e.g. Qwen/Qwen2.5-7B-Instruct). The model and the measurements it is checked
against: custom_losses/train/memory.py.

Reads: the recipe and its overlays, the model's config (a local folder, the hub, or data/models/).
Writes: the breakdown to stdout (a table, or JSON with --json); nothing on disk.

Example:
    python -m launch.estimate_memory --config recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml --gpu-mem 80 --strict
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

from custom_losses.train.memory import Estimate, estimate_recipe
from custom_losses.train.sft_config import resolve_paths
from prep.cli import command_parser, parse_command, print_config, recipe_arguments, user_error
from prep.config import RecipeError, compose

NOTES = "For launch.estimate_memory, 1 means (with --strict) that the prediction does not fit --gpu-mem."


def summary(recipe: str, result: Estimate, gpus: int) -> str:
    setup = result.setup
    checkpointing = "checkpointing" if setup.gradient_checkpointing else "no checkpointing"
    sharding = f"{setup.sharding}-{setup.zero_stage}" if setup.sharding == "ZeRO" or not setup.zero_stage else \
        f"{setup.sharding} ({'full shard' if setup.zero_stage >= 3 else 'grad + optimizer shard'})"
    loss = ", chunked top-k KD loss" if setup.loss == "topk_kd" else ""
    return (f"{recipe}: {result.shape}, {setup.method}, {setup.weight_bits}-bit base, seq {setup.seq_len} x "
            f"micro-batch {setup.micro_batch}, {checkpointing}, {gpus} GPU(s), {sharding}{loss}\n"
            f"{result.table()}")


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("launch.estimate_memory", __doc__, NOTES)
    recipe_arguments(parser, "recipes/sft/*.yaml or recipes/distill/*.yaml")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the run shards over (default 1)")
    parser.add_argument("--model", help="the model's shape (hub id or folder) instead of the recipe's model")
    parser.add_argument("--gpu-mem", type=float, help="GiB per GPU; warn when the prediction does not fit")
    parser.add_argument("--strict", action="store_true", help="exit 1 when it does not fit")
    parser.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    args = parse_command(parser, argv)
    if args.print_config:
        return print_config(args.config, args.overlays, args.overrides)
    try:
        config = compose(args.config, args.overlays, args.overrides)
        result = estimate_recipe(resolve_paths(config) if "base_model" in config else config, args.gpus, args.model)
    except (RecipeError, ValueError, OSError, KeyError) as err:
        return user_error(err)
    if args.json:
        print(json.dumps({"model": result.shape, "setup": asdict(result.setup), "terms_gib": result.terms,
                          "total_gib": result.total,
                          "activations_no_checkpointing_gib": result.activations_no_checkpointing}, indent=2))
    else:
        print(summary(args.config, result, args.gpus))
    if args.gpu_mem and result.total > args.gpu_mem:
        print(f"warning: predicted {result.total:.1f} GiB per GPU does not fit in {args.gpu_mem:g} GiB",
              file=sys.stderr)
        return 1 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
