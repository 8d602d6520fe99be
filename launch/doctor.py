"""Can this box run this pipeline recipe? One line per check, in under a minute, before any paid step.

    python -m launch.doctor --config recipes/pipeline/<one>.yaml [--set key=value ...] [--smoke]

Checks: the case files, every stage recipe, CUDA and the driver, each GPU's memory against every training
and serving step's estimate, bf16/tf32, each recipe's attention implementation, bitsandbytes' CUDA kernels
(4-bit recipes), vLLM at the pinned version, NCCL all-reduce (several GPUs), free disk, the models on disk
or on the hub (HF_HUB_OFFLINE aware), each hosted teacher's endpoint and key. Each line is `ok`, `skip`
or `FAIL <check>: <what is wrong>; fix: <the fix>`. --smoke then runs a few real-shape training steps and
one vLLM request (custom_losses.checks.smoke). Exit 0 only when the recipe can run here; 1 otherwise.
The checks live in custom_losses/checks/doctor.py (the recipe's: case files, split, teacher endpoints) and
custom_losses/checks/machine.py (the machine's: GPUs, memory, precision, attention, bitsandbytes, vLLM, NCCL,
disk, models).
"""
from __future__ import annotations

import argparse
import sys

from custom_losses.checks.doctor import diagnose
from prep.config import add_recipe_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.doctor", description=__doc__.splitlines()[0])
    add_recipe_arguments(parser, "pipeline recipe (recipes/pipeline/*.yaml)", overlays=False)
    parser.add_argument("--smoke", action="store_true",
                        help="after the checks pass, run the real-shape smoke steps (a few minutes)")
    args = parser.parse_args(argv)
    return 0 if diagnose(args.config, args.overrides, smoke=args.smoke, report=lambda line: print(line, flush=True)) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
