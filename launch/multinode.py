"""Train on several machines: run this once on every machine of the job (SLURM: launch/slurm/train.sbatch does).

    python -m launch.multinode [--nodes N] [--node-rank R] [--main-address HOST] [--main-port PORT]
                               [--gpus-per-node G] {sft,distill} --config RECIPE [--overlay FILE]... [--set k=v]...

--nodes, --node-rank    the machines in the run and this one's rank (0 = the main machine); default: SLURM's
                        SLURM_NNODES / SLURM_NODEID, else torchrun-style NNODES / NODE_RANK, else 1 / 0
--main-address, --main-port
                        the main machine's address and a free port on it, where torchrun's rendezvous meets;
                        default: MASTER_ADDR / MASTER_PORT (29500)
--gpus-per-node G       processes on each machine; default: the visible GPUs (or MEDKD_NUM_PROCESSES)
{sft,distill} ...       the stage and its own arguments, as `python -m launch.sft` / `launch.distill` take them

It prints where this machine stands and the batch: when the recipe states `effective_batch_size` (rows per
optimiser step over all processes), gradient_accumulation_steps is derived from it and the world size (nodes x
processes per node) and passed to the stage as `--set gradient_accumulation_steps=N`, so the recipe trains with
the same batch on 8 GPUs or 2 x 8. Then it runs the stage command, which starts `accelerate launch` with
--num_machines, --machine_rank, --main_process_ip and --main_process_port (recipes/accelerate/multi-node.yaml;
MEDKD_ACCELERATE_CONFIG picks another, e.g. fsdp2.yaml). DeepSpeed ZeRO-2/3 comes from the recipe's
`deepspeed:` as on one machine. The run folder must be on a filesystem all machines share.
Exit status: the stage's; 2 when this machine's place or the batch cannot be worked out (one sentence).
"""
from __future__ import annotations

import argparse
import os
import sys

from custom_losses.train.launcher import STAGES, resolve_cluster, run_multinode
from prep.config import RecipeError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.multinode", description=__doc__.splitlines()[0])
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
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
