"""Several machines: where a machine stands (flags, SLURM, torchrun-style variables), the `accelerate launch` line
each machine's stage command builds, and the gradient accumulation that keeps a recipe's effective batch when the
world size changes. The two-machine training run itself (two machine ranks rendezvousing at 127.0.0.1 on gloo,
against the one-machine two-process run) is tests/test_distill_distributed.py's, which shares that reference run.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from custom_losses.train import launcher
from custom_losses.train.launcher import Cluster, batch_plan, derived_accumulation, launch_argv, resolve_cluster
from prep.paths import REPO_ROOT

DISTILL = "recipes/distill/qwen2.5-7b-instruct-full-zero3.yaml"


@pytest.mark.parametrize("effective,per_device,world,expected", [
    (8, 1, 8, 1),      # the recipe's own shape
    (8, 1, 4, 2),      # half the GPUs: twice the accumulation
    (8, 1, 2, 4),
    (16, 2, 2, 4),
    (64, 1, 16, 4),    # 2 machines x 8
])
def test_derived_accumulation_keeps_the_effective_batch(effective, per_device, world, expected):
    accumulation = derived_accumulation(effective, per_device, world)
    assert accumulation == expected and per_device * world * accumulation == effective


@pytest.mark.parametrize("effective,per_device,world,message", [
    (8, 1, 16, r"effective batch 8 is not a whole number of passes of 16 rows \(1 per device x 16 processes\)"),
    (8, 3, 1, r"not a whole number of passes of 3 rows"),
    (0, 1, 8, r"effective batch must be a whole number >= 1, got 0"),
    (8, 1, True, r"world size must be a whole number >= 1, got True"),
])
def test_derived_accumulation_refuses_a_batch_that_does_not_split(effective, per_device, world, message):
    with pytest.raises(ValueError, match=message):
        derived_accumulation(effective, per_device, world)


def test_batch_plan_reads_each_stages_keys_and_says_what_it_did():
    # Axolotl's keys for stage one: written for 4 GPUs (1 x 2 x 4), run on 2 machines x 4.
    sft = batch_plan({"micro_batch_size": 1, "gradient_accumulation_steps": 2, "effective_batch_size": 8}, "sft", 8, 2)
    assert (sft.accumulation, sft.rows_per_step) == (1, 8)
    distill = batch_plan({"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                          "effective_batch_size": 16}, "distill", 4)
    assert distill.accumulation == 4 and distill.rows_per_step == 16
    assert distill.describe() == ("effective batch 16 rows per optimiser step = 1 per device x 4 processes (4) x "
                                  "gradient_accumulation_steps 4 (derived from the recipe's effective_batch_size 16; "
                                  "the recipe says 1)")
    plain = batch_plan({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3}, "distill", 16, 2)
    assert plain.accumulation == 3 and plain.rows_per_step == 96
    assert "2 per device x 16 processes (2 machines x 8)" in plain.describe()
    assert "states no effective_batch_size, so the batch follows the GPU count" in plain.describe()


def test_stage_recipe_composes_the_stage_arguments():
    config = launcher.stage_recipe(["--config", DISTILL, "--overlay", "recipes/distill/overrides/cpu-tiny.yaml",
                           "--set", "per_device_train_batch_size=2", "--fresh"])
    assert config["per_device_train_batch_size"] == 2 and config["model_name_or_path"] == "medkd/tiny-qwen2.5"


def test_cluster_from_flags_slurm_or_torchrun_variables():
    assert resolve_cluster({}) == Cluster(1, 0, "127.0.0.1", 29500)
    assert resolve_cluster({}, nodes=2, node_rank=1, main_address="10.0.0.1", main_port=6000) == \
        Cluster(2, 1, "10.0.0.1", 6000)
    slurm = {"SLURM_JOB_NUM_NODES": "4", "SLURM_NNODES": "4", "SLURM_NODEID": "3", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "0", "MASTER_ADDR": "gpu-a01", "MASTER_PORT": "29600"}
    assert resolve_cluster(slurm) == Cluster(4, 3, "gpu-a01", 29600)
    assert resolve_cluster(slurm, node_rank=0) == Cluster(4, 0, "gpu-a01", 29600), "a flag wins over the scheduler"
    torchrun = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3"}
    assert resolve_cluster(torchrun) == Cluster(2, 1, "10.1.2.3", 29500)


@pytest.mark.parametrize("env,flags,message", [
    ({"NNODES": "2", "MASTER_ADDR": "h"}, {}, "2 machines but this machine's rank is unknown: pass --node-rank"),
    ({"SLURM_NNODES": "2", "SLURM_NODEID": "0"}, {}, r"no rendezvous address: pass --main-address or export MASTER_ADDR"),
    ({"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "8",
      "MASTER_ADDR": "h"}, {}, r"SLURM started 8 tasks on this node: launch.multinode must run once per node"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, {}, r"machine rank 2 is outside 0..1 \(2 machines\)"),
    ({"NNODES": "two"}, {}, "NNODES must be a whole number, got 'two'"),
    ({}, {"main_port": 70000}, "rendezvous port 70000 is not a TCP port"),
])
def test_cluster_that_cannot_be_worked_out_is_one_sentence(env, flags, message):
    with pytest.raises(ValueError, match=message):
        resolve_cluster(env, **flags)


def test_each_machine_adds_accelerates_multinode_flags(monkeypatch):
    for name in ("MEDKD_ACCELERATE_CONFIG", launcher.PROCESSES_ENV):
        monkeypatch.delenv(name, raising=False)
    cluster = Cluster(2, 1, "10.0.0.1", 29555)
    assert launcher.cluster_from_env(cluster.env()) == cluster
    assert launcher.cluster_from_env({launcher.MACHINES_ENV: "1"}) is None
    for key, value in cluster.env().items():
        monkeypatch.setenv(key, value)
    argv = launch_argv("launch.distill", ["--config", "r.yaml"], 8)
    assert argv == [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO_ROOT / "recipes/accelerate/multi-node.yaml"), "--num_machines", "2", "--machine_rank", "1",
                    "--main_process_ip", "10.0.0.1", "--main_process_port", "29555", "--num_processes", "16",
                    "-m", "launch.distill", "--config", "r.yaml"]
    monkeypatch.setenv("MEDKD_ACCELERATE_CONFIG", "recipes/accelerate/fsdp2.yaml")
    assert launch_argv("launch.distill", [], 8)[4] == str(REPO_ROOT / "recipes/accelerate/fsdp2.yaml")
    with pytest.raises(ValueError, match="a run over 2 machines needs GPUs here"):
        launch_argv("launch.distill", [], 0)


@pytest.mark.integration
def test_multinode_command_refuses_a_batch_that_does_not_split_before_starting_anything(tmp_path):
    # 2 machines x 3 processes = 6 rows a pass; the recipe's effective batch of 8 cannot be kept: exit 2, one sentence.
    command = [sys.executable, "-m", "launch.multinode", "--nodes", "2", "--node-rank", "0", "--main-address",
               "127.0.0.1", "--gpus-per-node", "3", "distill", "--config", DISTILL,
               "--set", "effective_batch_size=8", "--set", f"output_dir={tmp_path / 'out'}"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: effective batch 8 is not a whole number of passes of 6 rows (1 per device x 6 processes): make "
        "effective_batch_size a multiple of 6, or change the per-device batch")
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_sbatch_template_runs_multinode_once_per_node_with_slurms_variables(tmp_path):
    """launch/slurm/train.sbatch as SLURM runs it, with stand-ins for the two SLURM programs it calls: `scontrol show
    hostnames` names the job's hosts, `srun` starts the command once per node with that node's SLURM_NODEID. The
    recipe's effective batch of 8 does not split over 2 nodes x 3 processes, so each node stops at once: what they
    printed shows each read its place from SLURM and the rendezvous from the first host."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2 $3" = "show hostnames gpu-[07-08]" ] && '
                                      'printf "gpu-07\\ngpu-08\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nstatus=0\n'
                                  'for node in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do\n'
                                  '  SLURM_NODEID=$node SLURM_LOCALID=0 "$@" || status=$?\ndone\nexit $status\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_SUBMIT_DIR": str(REPO_ROOT),
           launcher.PROCESSES_ENV: "3"}
    result = subprocess.run(["bash", str(REPO_ROOT / "launch/slurm/train.sbatch"), "distill", "--config", DISTILL,
                             "--set", "effective_batch_size=8", "--set", f"output_dir={tmp_path / 'out'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "[slurm] job 42: 2 nodes (gpu-[07-08]), rendezvous gpu-07:29500" in result.stdout
    error = ("error: effective batch 8 is not a whole number of passes of 6 rows (1 per device x 6 processes): make "
             "effective_batch_size a multiple of 6, or change the per-device batch")
    for node in (0, 1):
        assert (f"[multinode] distill on machine {node} of 2, rendezvous gpu-07:29500: 3 processes here, 6 in all\n"
                f"{error}\n") in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
