"""`launch.doctor`: each check fails with its sentence when its condition is faked (no GPU, a missing module,
too little disk, a bad key against the fault server), the attention fallback overlay validates over every SFT
recipe, and the doctor passes the tiny CPU pipeline here and fails a GPU pipeline naming the missing GPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from custom_losses.checks.doctor import check_teacher, passed, run_doctor
from custom_losses.checks.machine import (
    SDPA_OVERLAY,
    Gpu,
    Machine,
    StepNeeds,
    check_allreduce,
    check_attention,
    check_bitsandbytes,
    check_cuda,
    check_disk,
    check_gpu_memory,
    check_model,
    check_precision,
    check_vllm,
)
from custom_losses.pipeline import catalogue
from custom_losses.train.sft_config import compose
from prep.paths import REPO_ROOT
from tests.sft_fixtures import axolotl_checks

RECIPES = REPO_ROOT / "recipes"
SFT_RECIPES = sorted((RECIPES / "sft").glob("*.yaml"))
H100 = Gpu("NVIDIA H100 80GB HBM3", 79.6, (9, 0))
RTX4090 = Gpu("NVIDIA GeForce RTX 4090", 23.6, (8, 9))
T4 = Gpu("Tesla T4", 14.6, (7, 5))


def gpu_step(name: str = "sft", **fields) -> StepNeeds:
    return StepNeeds(name, "train", f"recipes/{name}/x.yaml", ["bf16/fp16"], **fields)


def test_no_gpu_fails_cuda_in_one_sentence_and_cpu_steps_pass():
    result = check_cuda([gpu_step(), StepNeeds("predict-stage1", "serve", "p.yaml", [])], Machine(torch_version="2.13.0"))
    assert result.failed
    assert result.line().startswith("FAIL cuda: no CUDA GPU visible") and "needed by sft (bf16/fp16)" in result.line()
    assert "fix: run this recipe on a machine with NVIDIA GPUs" in result.line()
    cpu_build = check_cuda([gpu_step()], Machine(driver="550.54", torch_version="2.13.0+cpu"))
    assert cpu_build.failed and "is a CPU build" in cpu_build.detail and "bash launch/setup.sh" in cpu_build.fix
    too_few = check_cuda([StepNeeds("teacher", "serve", "t.yaml", ["vLLM"], gpus=8)], Machine((H100,), "550.54"))
    assert too_few.failed and "1 GPU(s) visible, teacher needs 8" in too_few.detail
    assert check_cuda([StepNeeds("sft", "train", "s.yaml", [])], Machine()).line() == \
        "ok   cuda: not needed: every step runs on the CPU"


def test_gpu_memory_against_each_step_estimate():
    steps = [gpu_step(estimate_gib=30.2), StepNeeds("predict-stage1", "serve", "p.yaml", ["vLLM"], estimate_gib=16.0,
                                                    budget_fraction=0.9)]
    result = check_gpu_memory(steps, [H100, RTX4090])
    assert result.failed and result.detail.startswith("sft 30.2 GiB > 23.6 GiB (recipes/sft/x.yaml)")
    assert "NVIDIA GeForce RTX 4090" in result.detail and "launch.estimate_memory" in result.fix
    assert not check_gpu_memory(steps, [H100]).failed
    assert check_gpu_memory(steps, []).status == "skip"


def test_bf16_on_a_pre_ampere_gpu_fails():
    result = check_precision([gpu_step(bf16=True, tf32=True)], [T4])
    assert result.failed and "Tesla T4 (compute capability 7.5) has neither; asked by sft (bf16+tf32)" in result.detail
    assert not check_precision([gpu_step(bf16=True)], [H100]).failed


def test_missing_attention_module_names_the_sdpa_overlay():
    result = check_attention({"sft": "flash_attention_2", "distill": "sdpa"},
                             {"flash_attention_2": "medkd_no_such_flash_attn"})
    assert result.failed
    assert "sft names flash_attention_2 but `import medkd_no_such_flash_attn` fails (ModuleNotFoundError" in result.detail
    assert "distill" not in result.detail and SDPA_OVERLAY in result.fix
    assert check_attention({"sft": "sdpa", "distill": "eager"}).line().startswith("ok   attention: sft sdpa, distill eager")


def test_missing_bitsandbytes_fails_for_a_4bit_step():
    result = check_bitsandbytes([gpu_step(four_bit=True)], [H100], module="medkd_no_such_bitsandbytes")
    assert result.failed and "sft load 4-bit weights but `import medkd_no_such_bitsandbytes` fails" in result.detail
    assert check_bitsandbytes([gpu_step()], []).line() == "ok   bitsandbytes: no 4-bit step"


def test_vllm_missing_environment_or_module():
    assert check_vllm("/nonexistent/.venv-vllm/bin/python", "0.32.0").line().startswith(
        "FAIL vllm: /nonexistent/.venv-vllm/bin/python: the vLLM environment is missing; fix: bash launch/setup.sh "
        "without MEDKD_SKIP_VLLM=1")
    result = check_vllm(sys.executable, "0.32.0")   # the training environment has no vLLM
    assert result.failed and "`import vllm` fails in" in result.detail and "No module named 'vllm'" in result.detail
    # setup.sh leaves an environment whose stamp matches as it is: a broken one must go first
    assert result.fix.startswith("rm -rf .venv-vllm && bash launch/setup.sh")


def test_too_little_disk(tmp_path):
    result = check_disk(tmp_path / "run" / "not-yet", 100000)
    assert result.failed and f"GiB free at {tmp_path}, the recipe asks for min_free_disk_gb=100000" in result.detail
    assert "--set out=" in result.fix
    assert not check_disk(tmp_path, 0.001).failed


def test_model_offline_and_not_cached_fails_naming_hf_download(tmp_path, monkeypatch):
    from prep.testing.tiny_model import TINY_MODEL_NAME

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    name = "medkd-test/not-a-cached-model"
    result = check_model(name, offline=True, key="base_model in the pipeline recipe")
    assert result.line().startswith(f"FAIL model {name}: {name} (base_model in the pipeline recipe) is neither a local "
                                    f"folder nor in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1 keeps the hub out" in result.detail
    assert result.fix.startswith(f"download it once: `HF_HUB_OFFLINE=0 .venv/bin/hf download {name}`")
    assert check_model(TINY_MODEL_NAME, offline=True).status == "ok"


def test_a_missing_model_folder_is_no_such_folder_not_hf_download(tmp_path):
    """An absolute (or relative) path that is not there: the fix is the key, never `hf download /models/...`."""
    missing = tmp_path / "models" / "nope"
    result = check_model(str(missing), offline=True, key="base_model in the pipeline recipe")
    assert result.failed and f"(base_model in the pipeline recipe): no such folder ({missing})" in result.detail
    assert "hf download" not in result.line() and result.fix.startswith("correct base_model in the pipeline recipe")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    assert "has no config.json" in check_model(str(incomplete), offline=True).detail
    (incomplete / "config.json").write_text("{}")
    no_weights = check_model(str(incomplete), offline=True)
    assert "has no weights" in no_weights.detail and "launch.merge" in no_weights.fix
    (incomplete / "model.safetensors").write_bytes(b"\0")
    assert check_model(str(incomplete), offline=True).line() == f"ok   model {incomplete}: local folder {incomplete}"


def test_attention_fix_says_how_flash_attn_is_built_and_when_it_cannot_be():
    """setup.sh builds flash-attn only with MEDKD_FLASH_ATTN=1, and only against a CUDA torch: a CPU build gets the
    sdpa fallback, not a build "matching torch 2.13.0+cpu"."""
    missing = {"flash_attention_2": "medkd_no_such_flash_attn"}
    cpu = check_attention({"sft": "flash_attention_2"}, missing, Machine(torch_version="2.13.0+cpu"))
    assert cpu.failed and "torch 2.13.0+cpu here is a CPU build" in cpu.detail
    assert "flash attention runs on NVIDIA GPUs only" in cpu.fix and "+cpu" not in cpu.fix
    assert "MEDKD_FLASH_ATTN=1 bash launch/setup.sh" in cpu.fix and SDPA_OVERLAY in cpu.fix
    gpu = check_attention({"sft": "flash_attention_2"}, missing,
                          Machine((H100,), "550.54", torch_version="2.13.0+cu128", torch_cuda="12.8"))
    assert gpu.fix.startswith("`MEDKD_FLASH_ATTN=1 bash launch/setup.sh` builds flash-attn against torch 2.13.0+cu128 "
                              "(CUDA 12.8); or run without it")


def test_bad_teacher_key_against_the_fault_server(monkeypatch):
    from prep.testing.fault_server import FaultServer

    with FaultServer(api_key="the-right-key") as server:
        teacher = catalogue.validate("teacher", RECIPES / "teacher" / "dashscope-qwen2.5-72b-instruct.yaml",
                                     overrides=[f"client.base_url={server.base_url}", "client.model=fault-model"])
        monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-wrong-key-1234")
        result = check_teacher("teacher", teacher)
        assert result.failed and "refused the API key (HTTP 401" in result.detail
        assert result.fix == "check that environment variable DASHSCOPE_API_KEY holds a valid key for this endpoint"
        assert "sk-wrong-key-1234" not in result.line()
        monkeypatch.setenv("DASHSCOPE_API_KEY", "the-right-key")
        good = check_teacher("teacher", teacher).line()
        assert good.startswith("ok   teacher endpoint: ") and server.base_url in good, good
        monkeypatch.delenv("DASHSCOPE_API_KEY")
        unset = check_teacher("teacher", teacher)
        assert "DASHSCOPE_API_KEY is not set" in unset.detail and unset.fix.startswith("export the API key")


def test_an_unreachable_teacher_with_its_key_set_is_not_told_to_set_the_key(monkeypatch):
    from prep.api.process import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"           # nothing listens there
    recipe = RECIPES / "teacher" / "dashscope-qwen2.5-72b-instruct.yaml"
    teacher = catalogue.validate("teacher", recipe, overrides=[f"client.base_url={url}", "client.model=m"])
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-a-good-key")
    result = check_teacher("teacher", teacher)
    assert result.failed and result.detail.startswith(f"cannot reach {url}")
    assert "environment variable" not in result.fix and "the key is not what failed" in result.fix
    assert result.fix.startswith("start the server behind it, or correct client.base_url in ")


@pytest.mark.integration
def test_allreduce_across_two_processes():
    """The NCCL check's machinery, on gloo: two real processes all-reduce and report a bandwidth."""
    result = check_allreduce(2, backend="gloo", timeout_s=120)
    assert result.line().startswith("ok   gloo: all-reduce across 2 processes:"), result.line()
    assert check_allreduce(1).line() == "ok   nccl: 1 GPU: no all-reduce between GPUs"


def test_gpu_pipeline_on_this_cpu_machine_fails_naming_the_missing_gpu(monkeypatch):
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    results = run_doctor(RECIPES / "pipeline" / "qwen2.5-7b-1gpu.yaml", machine=Machine(torch_version="2.13.0+cpu"),
                         vllm_python=None, offline=True)
    assert not passed(results)
    gpu_lines = [r.line() for r in results if "GPU" in r.detail and r.failed]
    assert len(gpu_lines) == 1 and gpu_lines[0].startswith("FAIL cuda: no CUDA GPU visible"), gpu_lines
    assert {r.check for r in results if r.status == "skip"} >= {"gpu memory", "bf16/tf32"}


@pytest.mark.integration
def test_sdpa_overlay_validates_over_every_sft_recipe():
    """The attention fallback: Axolotl 0.19 accepts it over each SFT recipe on an Ampere GPU (sm_80, where its
    sdpa + packing + bf16 warning applies; Hopper only drops the warning), keeps bf16 and packing, and the
    catalogue's SFT validator accepts it too."""
    overlay = REPO_ROOT / SDPA_OVERLAY
    keys = list(yaml.safe_load(overlay.read_text()))
    jobs = [{"label": "keys", "kind": "known_keys", "keys": keys}]
    for recipe in SFT_RECIPES:
        config = compose(recipe, [overlay])
        jobs.append({"label": recipe.name, "kind": "validate", "config": config,
                     "capabilities": {"bf16": True, "fp8": False, "tf32": True, "compute_capability": "sm_80",
                                      "n_gpu": 4 if config.get("deepspeed") else 1},
                     "report": ["attn_implementation", "sdpa_varlen", "bf16", "sample_packing"]})
        catalogue.validate("sft", recipe, overlays=[overlay])
    results = axolotl_checks(jobs)
    assert results["keys"]["unknown_keys"] == []
    for recipe in SFT_RECIPES:
        result = results[recipe.name]
        assert result["ok"], f"{recipe.name} + sdpa.yaml: Axolotl rejects it: {result.get('error')}"
        assert result["values"]["attn_implementation"] == "sdpa" and result["values"]["sdpa_varlen"] is True
        assert result["values"]["bf16"] is True and result["values"]["sample_packing"] is True


@pytest.mark.integration
def test_doctor_command_passes_the_tiny_cpu_pipeline():
    out = subprocess.run([sys.executable, "-m", "launch.doctor", "--config", "recipes/pipeline/tiny-cpu.yaml"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    # Only the check lines: a library may log to stdout too (DeepSpeed's accelerator warning does).
    lines = [line for line in out.stdout.splitlines() if line.startswith(("ok   ", "skip ", "FAIL "))]
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert lines and not [line for line in lines if line.startswith("FAIL")], out.stdout
    checks = {line[5:].split(":", 1)[0] for line in lines}
    assert {"case files", "recipes", "cuda", "gpu memory", "attention", "vllm", "disk", "teacher endpoint"} <= checks


def test_a_recipe_that_does_not_validate_is_one_fail_line(tmp_path):
    """A typo in the pipeline recipe: one FAIL line naming the key, and no check that would need the recipe."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(RECIPES / "pipeline" / "tiny-cpu.yaml").read_text().replace("min_free_disk_gb: 2",
                                                                                    "min_free_disk_gbb: 2"))
    results = run_doctor(bad, machine=Machine(), vllm_python=None, offline=True)
    assert len(results) == 1 and results[0].line().startswith("FAIL recipes: ") and "min_free_disk_gbb" in results[0].line()


def test_missing_competition_data_is_one_failure_naming_the_key_and_where_it_goes(tmp_path):
    """A GPU pipeline recipe on a clean clone: the case files are the user's to put in data/competition/ (or to
    name with --set); the doctor says so once, the split is skipped rather than failed, and --plan refuses in
    one sentence instead of a raw [Errno 2]."""
    from custom_losses.checks.doctor import check_case_files, check_split
    from custom_losses.pipeline.plan import plan_pipeline, validate_recipe
    from custom_losses.pipeline.steps import PipelineError

    missing = tmp_path / "train.jsonl"
    result = check_case_files({"train_cases": missing, "test_cases": missing})
    assert result.failed and f"{missing} (the recipe's train_cases) not found" in result.line()
    assert "data/competition/README.md" in result.line() and "--set train_cases=PATH" in result.line()
    assert check_split(missing, None).status == "skip"
    assert (REPO_ROOT / "data" / "competition" / "README.md").is_file()
    recipe = validate_recipe(RECIPES / "pipeline" / "qwen2.5-7b-1gpu.yaml", overrides=[f"train_cases={missing}"])
    with pytest.raises(PipelineError, match=r"\(the recipe's train_cases\) not found: put your cases there"):
        plan_pipeline(recipe)


def test_a_teacher_only_run_is_not_held_to_the_gpu_steps_needs(monkeypatch):
    """ONLY (the pipeline's steps that will run): the GPU pipeline's teacher step on this CPU box needs no CUDA,
    attention implementation or base model; the whole recipe run still does."""
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    args = dict(machine=Machine(torch_version="2.13.0+cpu"), vllm_python=None, offline=True)
    overrides = [f"train_cases={REPO_ROOT / 'data' / 'sample_cases.jsonl'}",
                 f"test_cases={REPO_ROOT / 'data' / 'sample_cases.jsonl'}"]
    recipe = RECIPES / "pipeline" / "qwen2.5-7b-1gpu.yaml"
    teacher_only = {r.check: r for r in run_doctor(recipe, overrides, only={"teacher"}, **args)}
    assert not teacher_only["cuda"].failed and not teacher_only["attention"].failed
    assert not any(check.startswith("model ") for check in teacher_only)
    assert teacher_only["teacher endpoint"].failed        # the key it needs is still checked
    whole = {r.check: r for r in run_doctor(recipe, overrides, **args)}
    assert whole["cuda"].failed
