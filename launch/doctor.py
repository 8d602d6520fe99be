"""Check whether this machine can run a pipeline recipe, one line per check, in under a minute and before any paid
step. It checks the case files, every stage recipe, CUDA and the driver, each GPU's memory against every training
and serving step's estimate, bf16/tf32, each recipe's attention implementation, bitsandbytes' CUDA kernels (4-bit
recipes), vLLM at the pinned version, NCCL all-reduce (several GPUs), free disk, the models on disk or on the hub
(HF_HUB_OFFLINE aware) and each hosted teacher's endpoint and key. Give it the same --config, --overlay, --set and
--stages as the pipeline: `python -m launch.pipeline` runs these checks itself before its first step.

Reads: the pipeline recipe and the stage recipes it names, the case files, the machine (GPUs, disk, the vLLM
environment), each hosted teacher's endpoint (one GET /models).
Writes: nothing but its lines on stdout (--smoke: a temporary folder, removed afterwards).

Example:
    python -m launch.doctor --config recipes/pipeline/qwen2.5-7b-1gpu.yaml --stages 1
    python -m launch.doctor --config recipes/pipeline/tiny-cpu.yaml --smoke

Each line is `ok`, `skip` or `FAIL <check>: <what is wrong>; fix: <the fix>`. --smoke then runs a few real-shape
training steps and one vLLM request (custom_losses.checks.smoke). The checks live in
custom_losses/checks/doctor.py (the recipe's) and custom_losses/checks/machine.py (the machine's).
"""
from __future__ import annotations

import sys

from custom_losses.checks.doctor import diagnose
from prep.cli import (
    EXIT_BAD_INPUT,
    EXIT_DONE,
    command_parser,
    parse_command,
    pipeline_arguments,
    print_config,
    recipe_arguments,
    stages_overrides,
)

NOTES = "For launch.doctor, 2 means a check failed (its FAIL line says what to fix), as the pipeline's preflight " \
        "exits 2 for the same failure; a bad recipe is a FAIL line too."


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("launch.doctor", __doc__, NOTES)
    recipe_arguments(parser, "pipeline recipe (recipes/pipeline/*.yaml)")
    pipeline_arguments(parser)
    parser.add_argument("--smoke", action="store_true",
                        help="after the checks pass, run the real-shape smoke steps (a few minutes)")
    args = parse_command(parser, argv)
    overrides = args.overrides + stages_overrides(args.stages)
    if args.print_config:
        return print_config(args.config, args.overlays, overrides)
    ok = diagnose(args.config, overrides, smoke=args.smoke, report=lambda line: print(line, flush=True),
                  overlays=args.overlays)
    return EXIT_DONE if ok else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
