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

A trainer runs as a child process in the command's process group, so killing the group (Ctrl-C, the
pipeline's timeout, a test) stops everything; it also gets SIGTERM when the command itself dies. Its
stdout and stderr are passed through and appended to a log file in the run's output folder.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from custom_losses.memory import gpu_memories_gib
from custom_losses.sft_preflight import Plan, mark_done
from prep.paths import RECIPES_DIR, REPO_ROOT, resolve_path

ACCELERATE_CONFIG_ENV = "MEDKD_ACCELERATE_CONFIG"
PROCESSES_ENV = "MEDKD_NUM_PROCESSES"
# Set in a trainer's environment by `run_logged`; a command seeing it is the trainer, not the launcher.
WORKER_ENV = "MEDKD_TRAINING_WORKER"
# What `accelerate launch` puts in its workers' environment (single process and torchrun alike).
ACCELERATE_MARKERS = ("LOCAL_RANK", "ACCELERATE_MIXED_PRECISION")
# Trainer hygiene, not settings: live output for the log, and no telemetry (a failing Axolotl run was
# seen retrying it for over 10 minutes). The caller's environment wins.
TRAINER_ENV = {"PYTHONUNBUFFERED": "1", "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1",
               "WANDB_MODE": "disabled", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}


def visible_gpus() -> int:
    return len(gpu_memories_gib())


def is_worker() -> bool:
    """True inside a trainer started by `run_logged` or by `accelerate launch`."""
    return os.environ.get(WORKER_ENV) == "1" or any(key in os.environ for key in ACCELERATE_MARKERS)


def accelerate_config(gpus: int) -> Path:
    override = os.environ.get(ACCELERATE_CONFIG_ENV)
    if override:
        return resolve_path(override).absolute()
    return RECIPES_DIR / "accelerate" / ("multi-gpu.yaml" if gpus > 1 else "single-gpu.yaml")


def trainer_processes(gpus: int) -> int:
    """How many trainer processes to start: one per GPU, or MEDKD_NUM_PROCESSES when set."""
    value = os.environ.get(PROCESSES_ENV, "").strip()
    if not value:
        return gpus
    if not value.isdigit():
        raise ValueError(f"{PROCESSES_ENV} must be a whole number of processes (0 = no accelerate), got {value!r}")
    return int(value)


def free_port() -> int:
    """A TCP port nobody listens on now: two multi-process runs on one machine must not share torchrun's
    default 29500 (the second would fail, or join the first's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_argv(module: str, args: Sequence[str], gpus: int) -> list[str]:
    """`python -m MODULE ARGS` without a GPU, else the same module under `accelerate launch`, one process per GPU
    (or MEDKD_NUM_PROCESSES); several processes get a free rendezvous port."""
    processes = trainer_processes(gpus)
    if processes == 0:
        return [sys.executable, "-m", module, *args]
    port = ["--main_process_port", str(free_port())] if processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(processes)),
            "--num_processes", str(processes), *port, "-m", module, *args]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the launching command dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


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
                                   stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
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

    N GPUs: Axolotl tokenises once in this process first, so N ranks do not race on the prepared-dataset folder.
    """
    log = plan.output_dir / "train.log"
    config = str(plan.config_path)
    if plan.status == "resume":
        note(f"[sft] resuming from {plan.resume_from}", log)
    note(f"[sft] {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} training {config} on {plan.gpus} GPU(s); "
         f"log: {log}", log)
    if plan.gpus > 1:
        code = run_logged([sys.executable, "-m", "axolotl.cli.preprocess", config], log, REPO_ROOT)
        if code != 0:
            return code
    code = run_logged(launch_argv("axolotl.cli.train", [config], plan.gpus), log, REPO_ROOT)
    if code != 0:
        return code
    mark_done(plan.config_path)
    note(f"[sft] {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} finished: adapter/model in {plan.output_dir} "
         f"(merge: python -m launch.merge {plan.output_dir})", log)
    return 0
