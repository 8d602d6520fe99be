"""How the trainers are started: plain python without a GPU, `accelerate launch` with one or more.

Both stages go through here: stage one runs Axolotl (`train_axolotl`), stage two re-executes
launch.distill under accelerate. The accelerate config follows the GPU count
(recipes/accelerate/single-gpu.yaml or multi-gpu.yaml; MEDKD_ACCELERATE_CONFIG overrides it). Sharding
(DeepSpeed ZeRO, FSDP) is not an accelerate setting here: the training recipe names it (`deepspeed:`,
`fsdp:` / `fsdp_config:`) and the trainer builds accelerate's plugin from it, so one plain multi-GPU
config serves DDP, ZeRO and FSDP recipes alike.

MEDKD_NUM_PROCESSES=N overrides the process count. On a machine without a GPU, N >= 1 starts N trainer
processes under `accelerate launch` on the CPU (torchrun; the recipe's `use_cpu: true` makes them talk
over gloo): how the tests check that two ranks train as one process does.

Several machines: `python -m launch.multinode` runs on each of them (SLURM: launch/slurm/train.sbatch starts
it once per node). It works out where this machine stands (`resolve_cluster`: flags, else SLURM's variables,
else torchrun-style NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT), derives the gradient accumulation that
keeps the recipe's `effective_batch_size` at the new world size (`batch_plan`), and runs the stage command
with MEDKD_NUM_MACHINES, MEDKD_MACHINE_RANK, MEDKD_MAIN_PROCESS_IP and MEDKD_MAIN_PROCESS_PORT set. The stage
command then adds accelerate's own multi-node flags (--num_machines, --machine_rank, --main_process_ip,
--main_process_port) to its `accelerate launch`, with recipes/accelerate/multi-node.yaml: torchrun's static
rendezvous at the main machine's address. Nothing here talks to the other machines; torchrun does.

A trainer runs as a child process in the command's process group, so killing the group (Ctrl-C, the
pipeline's timeout, a test) stops everything; it also gets SIGTERM when the command itself dies. Its
stdout and stderr are passed through and appended to a log file in the run's output folder.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from custom_losses.train.memory import gpu_memories_gib
from custom_losses.train.sft_preflight import Plan, mark_done
from prep.api.process import die_with_parent, free_port
from prep.config import add_recipe_arguments, compose
from prep.paths import RECIPES_DIR, REPO_ROOT, resolve_path

ACCELERATE_CONFIG_ENV = "MEDKD_ACCELERATE_CONFIG"
PROCESSES_ENV = "MEDKD_NUM_PROCESSES"
# Where this machine stands in a multi-node run, set by launch.multinode for the stage command it starts; named
# after the `accelerate launch` flags they become.
MACHINES_ENV, MACHINE_RANK_ENV = "MEDKD_NUM_MACHINES", "MEDKD_MACHINE_RANK"
MAIN_IP_ENV, MAIN_PORT_ENV = "MEDKD_MAIN_PROCESS_IP", "MEDKD_MAIN_PROCESS_PORT"
DEFAULT_MAIN_PORT = 29500   # torchrun's and accelerate's default
# Set in a trainer's environment by `run_logged`; a command seeing it is the trainer, not the launcher.
WORKER_ENV = "MEDKD_TRAINING_WORKER"
# What `accelerate launch` puts in its workers' environment (single process and torchrun alike).
ACCELERATE_MARKERS = ("LOCAL_RANK", "ACCELERATE_MIXED_PRECISION")
# Trainer hygiene, not settings: live output for the log, and no telemetry (a failing Axolotl run was
# seen retrying it for over 10 minutes). The caller's environment wins.
# W&B is not switched off here: a recipe that reports to it must be able to (launch/env.sh defaults it off).
TRAINER_ENV = {"PYTHONUNBUFFERED": "1", "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1",
               "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}


def visible_gpus() -> int:
    return len(gpu_memories_gib())


def is_worker() -> bool:
    """True inside a trainer started by `run_logged` or by `accelerate launch`."""
    return os.environ.get(WORKER_ENV) == "1" or any(key in os.environ for key in ACCELERATE_MARKERS)


def accelerate_config(gpus: int, machines: int = 1) -> Path:
    """The `accelerate launch --config_file` for GPUS processes on each of MACHINES machines."""
    override = os.environ.get(ACCELERATE_CONFIG_ENV)
    if override:
        return resolve_path(override).absolute()
    name = "multi-node.yaml" if machines > 1 else "multi-gpu.yaml" if gpus > 1 else "single-gpu.yaml"
    return RECIPES_DIR / "accelerate" / name


def trainer_processes(gpus: int) -> int:
    """How many trainer processes to start: one per GPU, or MEDKD_NUM_PROCESSES when set."""
    value = os.environ.get(PROCESSES_ENV, "").strip()
    if not value:
        return gpus
    if not value.isdigit():
        raise ValueError(f"{PROCESSES_ENV} must be a whole number of processes (0 = no accelerate), got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Cluster:
    """Where this machine stands in a run over several: accelerate's multi-node flags."""

    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int = DEFAULT_MAIN_PORT

    def __post_init__(self) -> None:
        if self.num_machines < 1:
            raise ValueError(f"the number of machines must be at least 1, got {self.num_machines}")
        if not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(f"machine rank {self.machine_rank} is outside 0..{self.num_machines - 1} "
                             f"({self.num_machines} machines)")
        if not 0 < self.main_process_port < 65536:
            raise ValueError(f"rendezvous port {self.main_process_port} is not a TCP port")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("a run over several machines needs the main machine's address")

    def env(self) -> dict[str, str]:
        """The variables launch.multinode hands the stage command (read back by `cluster_from_env`)."""
        return {MACHINES_ENV: str(self.num_machines), MACHINE_RANK_ENV: str(self.machine_rank),
                MAIN_IP_ENV: self.main_process_ip, MAIN_PORT_ENV: str(self.main_process_port)}


def _whole(value: str, name: str) -> int:
    if not value.strip().isdigit():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def cluster_from_env(env: Mapping[str, str] | None = None) -> Cluster | None:
    """The cluster launch.multinode set for this stage command; None on one machine."""
    env = os.environ if env is None else env
    if _whole(env.get(MACHINES_ENV) or "1", MACHINES_ENV) <= 1:
        return None
    return Cluster(_whole(env[MACHINES_ENV], MACHINES_ENV), _whole(env.get(MACHINE_RANK_ENV, ""), MACHINE_RANK_ENV),
                   env.get(MAIN_IP_ENV, ""), _whole(env.get(MAIN_PORT_ENV, str(DEFAULT_MAIN_PORT)), MAIN_PORT_ENV))


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        if env.get(name, "").strip():
            return name, env[name].strip()
    return None


def resolve_cluster(env: Mapping[str, str], nodes: int | None = None, node_rank: int | None = None,
                    main_address: str | None = None, main_port: int | None = None) -> Cluster:
    """This machine's place in the run: each flag given, else the scheduler's variables (SLURM: SLURM_NNODES or
    SLURM_JOB_NUM_NODES, SLURM_NODEID; torchrun-style: NNODES, NODE_RANK), MASTER_ADDR and MASTER_PORT for the
    rendezvous (the sbatch template exports MASTER_ADDR, the first host of the job). ValueError naming what is
    missing."""
    if env.get("SLURM_LOCALID", "0") not in ("", "0"):
        raise ValueError(f"SLURM started {env.get('SLURM_NTASKS_PER_NODE', 'several')} tasks on this node: launch.multinode "
                         "must run once per node (srun --ntasks-per-node=1); accelerate starts the GPU processes")
    if nodes is None:
        # SLURM_NNODES before SLURM_JOB_NUM_NODES: the step's nodes, which SLURM_NODEID counts (srun may use fewer)
        found = _first(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "NNODES")
        nodes = _whole(found[1], found[0]) if found else 1
    if node_rank is None:
        found = _first(env, "SLURM_NODEID", "NODE_RANK")
        if found is None and nodes > 1:
            raise ValueError(f"{nodes} machines but this machine's rank is unknown: pass --node-rank, or run under "
                             "SLURM (SLURM_NODEID) or set NODE_RANK")
        node_rank = _whole(found[1], found[0]) if found else 0
    if main_address is None:
        main_address = env.get("MASTER_ADDR", "").strip()
        if not main_address and nodes > 1:
            raise ValueError(f"{nodes} machines but no rendezvous address: pass --main-address or export MASTER_ADDR "
                             "(under SLURM: MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1))")
    if main_port is None:
        main_port = _whole(env.get("MASTER_PORT", "") or str(DEFAULT_MAIN_PORT), "MASTER_PORT")
    return Cluster(nodes, node_rank, main_address or "127.0.0.1", main_port)


def launch_argv(module: str, args: Sequence[str], gpus: int) -> list[str]:
    """`python -m MODULE ARGS` without a GPU, else the same module under `accelerate launch`, one process per GPU
    (or MEDKD_NUM_PROCESSES); several processes get a free rendezvous port. Under launch.multinode (MEDKD_NUM_MACHINES
    > 1) every machine starts as many and they meet at the main machine's address: accelerate's multi-node flags."""
    processes = trainer_processes(gpus)
    cluster = cluster_from_env()
    if cluster is not None:
        if processes == 0:
            raise ValueError(f"a run over {cluster.num_machines} machines needs GPUs here (or {PROCESSES_ENV})")
        return [sys.executable, "-m", "accelerate.commands.launch",
                "--config_file", str(accelerate_config(processes, cluster.num_machines)),
                "--num_machines", str(cluster.num_machines), "--machine_rank", str(cluster.machine_rank),
                "--main_process_ip", cluster.main_process_ip, "--main_process_port", str(cluster.main_process_port),
                "--num_processes", str(processes * cluster.num_machines), "-m", module, *args]
    if processes == 0:
        return [sys.executable, "-m", module, *args]
    port = ["--main_process_port", str(free_port())] if processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(processes)),
            "--num_processes", str(processes), *port, "-m", module, *args]


# ---- the batch across world sizes ------------------------------------------------------------------

# Per stage: the module it runs, and its recipe's keys for the rows one process takes per forward pass and the
# accumulation steps (Axolotl's names for stage one, TRL's for stage two). `effective_batch_size` is medkd's key
# in both: rows per optimiser step over all processes, what a recipe keeps when the GPU count changes.
# Each training stage's batch keys: (per-device batch, gradient accumulation), in its own recipe dialect.
STAGES = {"sft": ("micro_batch_size", "gradient_accumulation_steps"),
          "distill": ("per_device_train_batch_size", "gradient_accumulation_steps")}
EFFECTIVE_BATCH_KEY = "effective_batch_size"


def derived_accumulation(effective_batch: int, per_device: int, world_size: int) -> int:
    """The gradient accumulation steps that make PER_DEVICE rows x WORLD_SIZE processes x steps == EFFECTIVE_BATCH;
    ValueError when no whole number of steps does."""
    for name, value in (("effective batch", effective_batch), ("per-device batch", per_device),
                        ("world size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    per_pass = per_device * world_size
    if effective_batch % per_pass:
        raise ValueError(f"effective batch {effective_batch} is not a whole number of passes of {per_pass} rows "
                         f"({per_device} per device x {world_size} processes): make {EFFECTIVE_BATCH_KEY} a multiple "
                         f"of {per_pass}, or change the per-device batch")
    return effective_batch // per_pass


@dataclass(frozen=True)
class BatchPlan:
    per_device: int
    accumulation: int
    world_size: int
    machines: int
    recipe_accumulation: int
    effective_batch: int | None       # the recipe's effective_batch_size; None when it states none

    @property
    def rows_per_step(self) -> int:
        return self.per_device * self.accumulation * self.world_size

    def describe(self) -> str:
        shape = (f"{self.machines} machines x {self.world_size // self.machines}" if self.machines > 1
                 else f"{self.world_size}")
        line = (f"effective batch {self.rows_per_step} rows per optimiser step = {self.per_device} per device x "
                f"{self.world_size} processes ({shape}) x gradient_accumulation_steps {self.accumulation}")
        if self.effective_batch is None:
            return f"{line} (the recipe's; it states no {EFFECTIVE_BATCH_KEY}, so the batch follows the GPU count)"
        return f"{line} (derived from the recipe's {EFFECTIVE_BATCH_KEY} {self.effective_batch}; " \
               f"the recipe says {self.recipe_accumulation})"


def batch_plan(config: Mapping[str, Any], stage: str, world_size: int, machines: int = 1) -> BatchPlan:
    """How a composed STAGE recipe's batch lands on WORLD_SIZE processes: the accumulation derived from its
    effective_batch_size when it states one, else its own."""
    per_device_key, accumulation_key = STAGES[stage]
    per_device, recipe_accumulation = config.get(per_device_key) or 1, config.get(accumulation_key) or 1
    effective = config.get(EFFECTIVE_BATCH_KEY)
    accumulation = recipe_accumulation if effective is None else derived_accumulation(effective, per_device, world_size)
    return BatchPlan(per_device, accumulation, world_size, machines, recipe_accumulation, effective)


def stage_recipe(stage_args: Sequence[str]) -> dict[str, Any]:
    """The composed recipe a stage command's --config / --overlay / --set arguments name (other flags ignored)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_recipe_arguments(parser, "recipe")
    known, _ = parser.parse_known_args(list(stage_args))
    return compose(known.config, known.overlays, known.overrides)


def keep_effective_batch(stage: str, stage_args: Sequence[str], world_size: int, machines: int = 1
                         ) -> tuple[list[str], str]:
    """The arguments that keep the STAGE recipe's effective batch on WORLD_SIZE processes (`--set
    gradient_accumulation_steps=N`, derived; none when the recipe states no effective_batch_size) and the line that
    says so. A stage command on one machine can append them to its own arguments before it launches."""
    plan = batch_plan(stage_recipe(stage_args), stage, world_size, machines)
    extra = [] if plan.effective_batch is None else ["--set", f"{STAGES[stage][1]}={plan.accumulation}"]
    return extra, plan.describe()


def run_multinode(stage: str, command: str, stage_args: Sequence[str], cluster: Cluster,
                  processes_per_machine: int | None = None) -> int:
    """Run `python -m COMMAND STAGE_ARGS` (the STAGE's command module, named by the caller) on this machine as one of CLUSTER's, with the accumulation that keeps
    the recipe's effective batch on CLUSTER.num_machines x PROCESSES_PER_MACHINE processes (default: one per visible
    GPU, or MEDKD_NUM_PROCESSES); its exit code."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
    if processes_per_machine is None:
        # Probing the GPUs costs seconds (torch, the driver): not when MEDKD_NUM_PROCESSES says the count.
        processes_per_machine = trainer_processes(0 if os.environ.get(PROCESSES_ENV, "").strip() else visible_gpus())
    if processes_per_machine < 1:
        raise ValueError("no GPU here: pass --gpus-per-node (or set MEDKD_NUM_PROCESSES for CPU processes)")
    world_size = processes_per_machine * cluster.num_machines
    where = (f"machine {cluster.machine_rank} of {cluster.num_machines}, rendezvous "
             f"{cluster.main_process_ip}:{cluster.main_process_port}" if cluster.num_machines > 1 else "one machine")
    sys.stderr.write(f"[multinode] {stage} on {where}: {processes_per_machine} "
                     f"process{'es' if processes_per_machine > 1 else ''} here, {world_size} in all\n")
    sys.stderr.flush()
    extra, description = keep_effective_batch(stage, stage_args, world_size, cluster.num_machines)
    sys.stderr.write(f"[multinode] {description}\n")
    argv = [sys.executable, "-m", command, *stage_args, *extra]
    env = {**os.environ, **cluster.env(), PROCESSES_ENV: str(processes_per_machine)}
    return subprocess.run(argv, cwd=REPO_ROOT, env=env, preexec_fn=die_with_parent).returncode


def _pump(source: TextIO, sink: TextIO, log: TextIO, lock: threading.Lock) -> None:
    for line in iter(source.readline, ""):
        with lock:
            sink.write(line)
            sink.flush()
            log.write(line)
            log.flush()


def run_logged(argv: Sequence[str], log_path: str | Path, cwd: Path | None = None) -> int:
    """Run ARGV as a trainer (in CWD, default ours); its stdout and stderr go to ours and are appended to LOG_PATH.

    Returns its exit code.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**TRAINER_ENV, **os.environ, WORKER_ENV: "1"}
    lock = threading.Lock()
    with open(log_path, "a", encoding="utf-8") as log:
        process = subprocess.Popen(list(argv), cwd=cwd, env=env, text=True, errors="replace", stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, preexec_fn=die_with_parent)
        pumps = [threading.Thread(target=_pump, args=(stream, sink, log, lock), daemon=True)
                 for stream, sink in ((process.stdout, sys.stdout), (process.stderr, sys.stderr))]
        for pump in pumps:
            pump.start()
        code = process.wait()
        for pump in pumps:
            pump.join()
    return code


def note(message: str, log_path: Path) -> None:
    """A line of the launcher's own on stderr and in the run's log."""
    line = f"{message}\n"
    sys.stderr.write(line)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(line)


def train_axolotl(plan: Plan) -> int:
    """Train a preflighted stage-one run with Axolotl, logging to OUTPUT_DIR/train.log; mark it done on success.

    N GPUs: Axolotl tokenises once in this process first, so N ranks do not race on the prepared-dataset folder;
    over several machines only the main one does (the others' ranks wait for it in the rendezvous, then Axolotl
    loads what it prepared: the run folder is on a filesystem every machine sees).
    """
    log = plan.output_dir / "train.log"
    config = str(plan.config_path)
    if plan.status == "resume":
        note(f"[sft] resuming from {plan.resume_from}", log)
    note(f"[sft] {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} training {config} on {plan.gpus} GPU(s); "
         f"log: {log}", log)
    cluster = cluster_from_env()
    if (plan.gpus > 1 and cluster is None) or (cluster is not None and cluster.machine_rank == 0):
        code = run_logged([sys.executable, "-m", "axolotl.cli.preprocess", config], log, REPO_ROOT)
        if code != 0:
            return code
    code = run_logged(launch_argv("axolotl.cli.train", [config], plan.gpus), log, REPO_ROOT)
    if code != 0:
        return code
    mark_done(plan.output_dir)
    note(f"[sft] {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} finished: adapter/model in {plan.output_dir} "
         f"(merge: python -m launch.merge {plan.output_dir})", log)
    return 0
