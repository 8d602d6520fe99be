"""Stage two on two processes trains exactly as on one: DDP, FSDP2 and DeepSpeed ZeRO-3 on CPU (gloo).

Each run is the real command, `python -m launch.distill` with the full-parameter recipe, the CPU overlay and
`--set` overrides; MEDKD_NUM_PROCESSES=2 makes it re-run itself under `accelerate launch` on two CPU processes.
The global batch is the same: one process x 2 rows per step against two processes x 1 row (accelerate hands
rank r the r-th row of each step from one seeded order). Every packed row holds one case (max_length is the
longest case and no two cases fit together), so the one-process step packs its two rows into one padding-free
row and the two-process step gives each rank one case. The optimiser is plain SGD without clipping, so a wrong
gradient scale (the loss normaliser across ranks, a head shard read as the whole head) changes the weights
instead of hiding behind Adam's normalisation or the clip. Compared: the logged loss of every step
(trainer_state.json) and the final weights, 1e-5 against an update of order 1e-1.

accelerate 1.13 builds FSDP and DeepSpeed only on GPU-type devices; tests/cpu_sharding/sitecustomize.py lifts
exactly those two gates in the workers, and makes gloo's asynchronous collectives complete in order for DeepSpeed
(which relies on CUDA stream order; see its docstring). Each sharded run is checked to be what it claims by what
its checkpoint holds (FSDP's and DeepSpeed's own checkpoint files).

The DDP run is also the reference of the multi-node launch path: two "machines" (launch.multinode, machine ranks 0
and 1, one process each, rendezvous at 127.0.0.1 on gloo) train exactly as one machine with two processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from custom_losses.train.launcher import PROCESSES_ENV, launch_argv
from prep.api.process import free_port
from prep.config import compose
from prep.paths import REPO_ROOT
from tests.test_kd_trainer import softlabel_rows

RECIPE = "recipes/distill/qwen2.5-7b-instruct-full-zero3.yaml"
CPU_OVERLAY = "recipes/distill/overrides/cpu-tiny.yaml"
STEPS = 4
ROWS_PER_STEP = 2
SHARDING_PATCH = REPO_ROOT / "tests" / "cpu_sharding"
# FSDP2 as transformers' TrainingArguments configure it (the accelerate config stays the plain multi-GPU one).
FSDP2 = ["fsdp=true", "fsdp_config={version: 2, transformer_layer_cls_to_wrap: [Qwen2DecoderLayer]}"]


@pytest.fixture(scope="module")
def softlabels(tmp_path_factory, qwen_tokenizer) -> tuple[Path, int]:
    """STEPS x ROWS_PER_STEP soft-label rows (tests.test_kd_trainer's synthetic teacher) and the max_length that
    packs each case into a row of its own."""
    from datasets import Dataset, DatasetDict

    from custom_losses.kd.token_weights import TokenWeightConfig
    from custom_losses.kd.trainer import build_kd_features

    rows = softlabel_rows(qwen_tokenizer, STEPS * ROWS_PER_STEP)
    lengths = [len(build_kd_features(row, qwen_tokenizer, TokenWeightConfig())["input_ids"]) for row in rows]
    assert 2 * min(lengths) > max(lengths), f"two cases would share a packed row: {lengths}"
    folder = tmp_path_factory.mktemp("softlabels")
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(folder / "dataset"))
    return folder, max(lengths)


def distill_args(out: Path, softlabels: tuple[Path, int], processes: int, *overrides: str) -> list[str]:
    """launch.distill's arguments for a run of PROCESSES processes in all, ROWS_PER_STEP rows a step between them."""
    folder, max_length = softlabels
    sets = [f"dataset_path={folder}", f"output_dir={out}", f"max_length={max_length}", "use_peft=false",
            "deepspeed=null", f"per_device_train_batch_size={ROWS_PER_STEP // processes}", f"max_steps={STEPS}",
            f"save_steps={STEPS}", "optim=sgd", "learning_rate=0.5", "max_grad_norm=0", "logging_steps=1",
            *overrides]
    return ["--config", RECIPE, "--overlay", CPU_OVERLAY, *[arg for item in sets for arg in ("--set", item)]]


def run_distill(out: Path, softlabels: tuple[Path, int], processes: int, *overrides: str,
                env: dict[str, str] | None = None) -> Path:
    """launch.distill on PROCESSES CPU processes (1: plain python, the default without a GPU); returns OUT."""
    command = [sys.executable, "-m", "launch.distill", *distill_args(out, softlabels, processes, *overrides)]
    environment = {key: value for key, value in os.environ.items() if key != PROCESSES_ENV}
    if processes > 1:
        environment[PROCESSES_ENV] = str(processes)
    result = subprocess.run(command, cwd=REPO_ROOT, env={**environment, **(env or {})}, capture_output=True,
                            text=True, timeout=900)
    output = result.stdout + result.stderr
    errors = "\n".join(line for line in output.splitlines() if "Error" in line or line.startswith("error:"))
    assert result.returncode == 0, f"{' '.join(command)}\n{errors[-4000:]}\n...\n{output[-4000:]}"
    return out


def logged_steps(out: Path) -> list[dict]:
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text(encoding="utf-8"))
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in steps] == list(range(1, STEPS + 1)), steps
    return steps


def sharding_patch(**extra: str) -> dict[str, str]:
    """The workers' environment for tests/cpu_sharding/sitecustomize.py."""
    path = os.pathsep.join(filter(None, [str(SHARDING_PATCH), os.environ.get("PYTHONPATH")]))
    return {"MEDKD_TEST_CPU_SHARDING": "1", "PYTHONPATH": path, **extra}


def weights_in(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, softlabels) -> Path:
    """The reference: one process, two rows a step. A full fine-tune ends with merged/, the model vLLM serves."""
    run = run_distill(tmp_path_factory.mktemp("one") / "run", softlabels, 1)
    assert (run / "merged" / "model.safetensors").is_file() and (run / "merged" / "tokenizer.json").is_file()
    return run


def assert_trains_as_one_process(two: Path, one: Path, tiny_model_dir: Path) -> None:
    expected, found = logged_steps(one), logged_steps(two)
    for step, (want, got) in enumerate(zip(expected, found), start=1):
        # The same cases in every step (step 1's loss) and the same update before it (steps 2+).
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), f"step {step}: loss {got} vs {want}"
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), f"step {step}: {got} vs {want}"
    assert len({round(entry["loss"], 4) for entry in expected}) == STEPS, "every step must see other cases"
    start, reference, weights = weights_in(tiny_model_dir), weights_in(one / "model"), weights_in(two / "model")
    assert set(weights) == set(reference)
    moved = max(float((reference[name] - start[name]).abs().max()) for name in reference)
    apart = {name: float((weights[name] - reference[name]).abs().max()) for name in reference}
    assert moved > 1e-2, f"the reference hardly trained (largest change {moved}); the comparison would be empty"
    worst = max(apart, key=apart.get)
    assert apart[worst] <= 1e-5, f"{worst} differs by {apart[worst]:.2e} after {STEPS} steps (updates up to {moved:.2e})"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, softlabels) -> Path:
    """One machine, two processes (DDP), one row each a step: checked against one process, and the reference of
    the two-machine run."""
    return run_distill(tmp_path_factory.mktemp("ddp") / "run", softlabels, 2)


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process(one_process, two_processes, tiny_model_dir):
    checkpoint = two_processes / f"checkpoint-{STEPS}"
    assert (checkpoint / "rng_state_1.pth").exists(), "two ranks saved their RNG states"
    assert not (checkpoint / "pytorch_model_fsdp.bin").exists() and not list(checkpoint.glob("global_step*"))
    assert_trains_as_one_process(two_processes, one_process, tiny_model_dir)


@pytest.mark.slow
def test_two_machines_train_as_one_machine_with_two_processes(two_processes, softlabels, tmp_path):
    """Two "machines" on localhost: launch.multinode with machine ranks 0 and 1, one CPU process each, meeting at
    127.0.0.1 (torchrun's static rendezvous through accelerate's multi-node flags; gloo). The run folder is shared, as
    on a cluster. The recipe states the effective batch of the one-machine run (2 rows), so the derived accumulation
    is 1: every step's loss and gradient norm, and the final weights, are the two-process run's."""
    out, port = tmp_path / "two-machines", free_port()
    args = distill_args(out, softlabels, 2, f"effective_batch_size={ROWS_PER_STEP}")
    environment = {key: value for key, value in os.environ.items() if key != PROCESSES_ENV}
    machines = [subprocess.Popen([sys.executable, "-m", "launch.multinode", "--nodes", "2", "--node-rank", str(rank),
                                  "--main-address", "127.0.0.1", "--main-port", str(port), "--gpus-per-node", "1",
                                  "distill", *args], cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = []
    try:
        for machine in machines:
            outputs.append(machine.communicate(timeout=600)[0])
    finally:
        for machine in machines:
            machine.kill()
    for rank, (machine, output) in enumerate(zip(machines, outputs)):
        assert machine.returncode == 0, f"machine {rank}:\n{output[-4000:]}"
        assert (f"[multinode] distill on machine {rank} of 2, rendezvous 127.0.0.1:{port}: 1 process here, 2 in all\n"
                f"[multinode] effective batch 2 rows per optimiser step = 1 per device x 2 processes (2 machines x 1) x "
                f"gradient_accumulation_steps 1 (derived from the recipe's effective_batch_size 2; the recipe says 1)"
                ) in output, output[-3000:]
        assert f"--num_machines 2 --machine_rank {rank} --main_process_ip 127.0.0.1" in output, output[-3000:]
    expected, found = logged_steps(two_processes), logged_steps(out)
    for step, (want, got) in enumerate(zip(expected, found), start=1):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), f"step {step}: {got} vs {want}"
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6), f"step {step}: {got} vs {want}"
    reference, weights = weights_in(two_processes / "model"), weights_in(out / "model")
    assert set(weights) == set(reference)
    worst = max(float((weights[name] - reference[name]).abs().max()) for name in reference)
    assert worst <= 1e-6, f"the two-machine weights differ from the one-machine run's by {worst:.2e}"


@pytest.mark.slow
def test_fsdp2_on_two_processes_equals_one_process(one_process, softlabels, tmp_path, tiny_model_dir):
    two = run_distill(tmp_path / "fsdp", softlabels, 2, *FSDP2, env=sharding_patch())
    checkpoint = two / f"checkpoint-{STEPS}"
    # What only accelerate's FSDP checkpointing writes (a plain DDP run writes model.safetensors and optimizer.pt).
    assert (checkpoint / "pytorch_model_fsdp.bin").exists() and (checkpoint / "optimizer.bin").exists()
    assert_trains_as_one_process(two, one_process, tiny_model_dir)


@pytest.mark.slow
def test_zero3_on_two_processes_equals_one_process(one_process, softlabels, tmp_path, tiny_model_dir):
    pytest.importorskip("deepspeed")
    # The recipe's own ZeRO-3 JSON in fp32 (the tiny CPU run has no bf16); the trainer reads a JSON path.
    zero3 = compose(REPO_ROOT / compose(REPO_ROOT / RECIPE)["deepspeed"], overrides=["bf16.enabled=false"])
    assert zero3["zero_optimization"]["stage"] == 3
    config = tmp_path / "zero3_fp32.json"
    config.write_text(json.dumps(zero3), encoding="utf-8")
    # use_cpu=false: with use_cpu transformers never hands DeepSpeed the run; DS_ACCELERATOR=cpu keeps it on CPU.
    two = run_distill(tmp_path / "zero3", softlabels, 2, f"deepspeed={config}", "use_cpu=false",
                      env=sharding_patch(DS_ACCELERATOR="cpu"))
    shards = sorted(path.name for path in (two / f"checkpoint-{STEPS}" / f"global_step{STEPS}").iterdir())
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards, shards   # DeepSpeed's own per-rank shards
    assert_trains_as_one_process(two, one_process, tiny_model_dir)


def test_num_processes_override_starts_accelerate_without_a_gpu(monkeypatch):
    monkeypatch.delenv("MEDKD_ACCELERATE_CONFIG", raising=False)
    monkeypatch.delenv(PROCESSES_ENV, raising=False)
    assert launch_argv("launch.distill", ["--config", "r.yaml"], 0) == [sys.executable, "-m", "launch.distill",
                                                                       "--config", "r.yaml"]
    monkeypatch.setenv(PROCESSES_ENV, "2")
    argv = launch_argv("launch.distill", ["--config", "r.yaml"], 0)
    assert argv[:7] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(REPO_ROOT / "recipes/accelerate/multi-gpu.yaml"), "--num_processes", "2"]
    assert argv[7] == "--main_process_port" and 0 < int(argv[8]) < 65536, "two runs on one machine need two ports"
    assert argv[9:] == ["-m", "launch.distill", "--config", "r.yaml"]
    monkeypatch.setenv(PROCESSES_ENV, "two")
    with pytest.raises(ValueError, match=f"{PROCESSES_ENV} must be a whole number of processes.*'two'"):
        launch_argv("launch.distill", [], 0)


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without a GPU says")
def test_gpu_recipe_is_refused_on_a_machine_without_gpu(softlabels, tmp_path):
    command = [sys.executable, "-m", "launch.distill", "--config", RECIPE, "--set", f"dataset_path={softlabels[0]}",
               "--set", f"output_dir={tmp_path / 'out'}"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={key: value for key, value in os.environ.items() if key != PROCESSES_ENV})
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: {RECIPE} (bf16/fp16) needs a CUDA GPU and none is visible (no NVIDIA driver, or "
                     f"CUDA_VISIBLE_DEVICES hides them); fix: run it on a machine with an NVIDIA GPU; on a CPU, add "
                     f"--overlay recipes/distill/overrides/cpu-tiny.yaml (the tiny model in fp32)"], result.stderr[-3000:]
    assert not (tmp_path / "out").exists(), "nothing starts"
