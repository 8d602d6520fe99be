"""Train on several machines: run this once on every machine of the job (SLURM: launch/slurm/train.sbatch does). It
prints where this machine stands and the batch: when the recipe states `effective_batch_size` (rows per optimiser
step over all processes), gradient_accumulation_steps is derived from it and the world size (nodes x processes
per node) and passed to the stage as `--set gradient_accumulation_steps=N`, so the recipe trains with the same
batch on 8 GPUs or 2 x 8. Then it runs the stage command, which starts `accelerate launch` with --num_machines,
--machine_rank, --main_process_ip and --main_process_port (recipes/accelerate/multi-node.yaml;
MEDKD_ACCELERATE_CONFIG picks another, e.g. fsdp2.yaml). DeepSpeed ZeRO-2/3 comes from the recipe's `deepspeed:`
as on one machine. The run folder must be on a filesystem all machines share.

Reads: the stage's recipe (through the stage command), SLURM_NNODES / SLURM_NODEID or NNODES / NODE_RANK,
MASTER_ADDR / MASTER_PORT, the visible GPUs (or MEDKD_NUM_PROCESSES).
Writes: what the stage writes (launch.sft, launch.distill), in the shared run folder.

Example:
    python -m launch.multinode --nodes 2 --node-rank 0 --main-address 10.0.0.1 sft \\
        --config recipes/sft/qwen2.5-7b-instruct-lora-zero2.yaml

The stage's own arguments follow its name, as `python -m launch.sft` / `launch.distill` take them.
"""
from __future__ import annotations

import argparse
import os
import sys

from custom_losses.train.launcher import STAGES, resolve_cluster, run_multinode
from prep.cli import command_parser, user_error
from prep.config import RecipeError

NOTES = ("For launch.multinode, the status is the stage's; 2 also when this machine's place or the batch cannot be "
         "worked out.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("launch.multinode", __doc__, NOTES)
    parser.add_argument("--nodes", type=int, help="machines in the run (default: SLURM's or NNODES)")
    parser.add_argument("--node-rank", type=int, help="this machine's rank, 0 = main (default: SLURM_NODEID or NODE_RANK)")
    parser.add_argument("--main-address", help="the main machine's address (default: MASTER_ADDR)")
    parser.add_argument("--main-port", type=int, help="the rendezvous port on it (default: MASTER_PORT or 29500)")
    parser.add_argument("--gpus-per-node", type=int, help="processes per machine (default: the visible GPUs)")
    parser.add_argument("stage", choices=sorted(STAGES), help="the training stage to run")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, help="the stage command's own arguments")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cluster = resolve_cluster(os.environ, args.nodes, args.node_rank, args.main_address, args.main_port)
        return run_multinode(args.stage, f"launch.{args.stage}", args.stage_args, cluster, args.gpus_per_node)
    except (RecipeError, ValueError) as err:
        return user_error(err)


if __name__ == "__main__":
    sys.exit(main())
