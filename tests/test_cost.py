"""What a run costs (custom_losses.pipeline.cost, cost_report): the plan's estimate on the GPU recipes without a GPU,
the budget's refusal, the token arithmetic against a hand count, measured figures preferred, actuals in a stamp."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from custom_losses.pipeline.cost import estimate_run, model_config, model_params
from custom_losses.pipeline.cost_report import (
    duration,
    final_lines,
    record_actuals,
    write_report,
)
from custom_losses.pipeline.plan import plan_pipeline, validate_recipe
from launch import pipeline
from prep.digests import read_record, write_record
from prep.paths import REPO_ROOT
from prep.prompts import load_prompts
from prep.records import read_cases
from prep.tokenizer import load_tokenizer

SAMPLE = REPO_ROOT / "data" / "sample_cases.jsonl"
GPU_RECIPES = ("recipes/pipeline/qwen2.5-7b-8gpu.yaml", "recipes/pipeline/qwen2.5-7b-1gpu.yaml")


def placeholder_cases(tmp_path: Path) -> list[str]:
    """The GPU recipes' case files (git-ignored data/competition/) stood in for by the bundled sample cases."""
    return [f"train_cases={SAMPLE}", f"test_cases={SAMPLE}", f"out={tmp_path / 'run'}"]


def plan_of(config: str, overrides: list[str], limit: int | None = None):
    recipe = validate_recipe(REPO_ROOT / config, [], overrides)
    return recipe, plan_pipeline(recipe, limit)


@pytest.mark.integration      # the first plan here pays the tokenizer's and the pipeline's imports (~15 s on 2 cores)
@pytest.mark.parametrize("config", GPU_RECIPES)
def test_gpu_plan_prints_each_step_and_total_with_sources(config, tmp_path, capsys):
    argv = ["--config", str(REPO_ROOT / config), "--plan"]
    for item in placeholder_cases(tmp_path):
        argv += ["--set", item]
    assert pipeline.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split()[2]: line for line in out.splitlines() if line.startswith("[pipeline] estimate: ")
            and len(line.split()) > 3}
    for step in ("teacher", "sft", "predict-stage1", "total"):
        assert step in rows, out
    # columns: step, requests, prompt, completion, train tokens, GPUs, GPU-h, wall (value unit), USD, how
    teacher, sft, total = rows["teacher"].split(), rows["sft"].split(), rows["total"].split()
    assert int(teacher[3].replace(",", "")) > 0                            # requests
    assert float(sft[8]) > 0 and "FLOPs/token" in rows["sft"]              # GPU-hours, from the FLOPs model
    assert float(total[8]) > 0 and float(total[11].replace(",", "")) > 0   # GPU-hours and USD in all
    assert f"{config} `estimate:`" in out                                  # where the assumptions come from
    assert "data/models/qwen2.5-7b-instruct.json" in out
    assert "measured figures:" in out and "the real Qwen2.5 tokenizer" in out
    if "1gpu" in config:   # the hosted teacher is priced by its tokens, and named
        assert "hosted qwen2.5-72b-instruct" in rows["teacher"] and float(teacher[11].replace(",", "")) > 0


def test_budget_refuses_before_any_step(tmp_path, capsys):
    argv = ["--config", str(REPO_ROOT / GPU_RECIPES[0]), "--set", "budget.max_gpu_hours=0.5"]
    for item in placeholder_cases(tmp_path):
        argv += ["--set", item]
    assert pipeline.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget.max_gpu_hours 0.5" in err[0] and "teacher" in err[0], err
    assert not (tmp_path / "run" / "logs").exists()
    assert not list((tmp_path / "run").glob("stamps/*.json"))


def test_tokens_against_a_hand_count(tmp_path):
    two = tmp_path / "two.jsonl"
    two.write_text("".join(line + "\n" for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:2]), encoding="utf-8")
    recipe, decisions = plan_of("recipes/pipeline/tiny-cpu.yaml", [f"train_cases={two}", f"test_cases={two}",
                                                                   f"out={tmp_path / 'run'}"])
    teacher = estimate_run(recipe, decisions, None, "tiny-cpu.yaml").steps[0]
    prompts, tokenizer = load_prompts(), load_tokenizer()
    by_hand = 0
    for case in read_cases(two).cases:   # Qwen2.5's ChatML, written out
        text = (f"<|im_start|>system\n{prompts.system}<|im_end|>\n<|im_start|>user\n{prompts.user(case)}<|im_end|>\n"
                "<|im_start|>assistant\n")
        by_hand += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    # local-tiny-vllm.yaml: one sample per case, max_tokens 120; tiny-cpu.yaml: answers 0.2 of it
    assert (teacher.step, teacher.requests, teacher.prompt_tokens) == ("teacher", 2, by_hand)
    assert teacher.completion_tokens == 2 * 24


def test_measured_figures_are_preferred(tmp_path):
    recipe, decisions = plan_of(GPU_RECIPES[0], placeholder_cases(tmp_path))
    config, _ = model_config("Qwen/Qwen2.5-7B-Instruct")
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"source": "launch.bench_gpu", "device": "NVIDIA H100", "params":
                                    model_params(config)[0], "sft_tokens_per_s": 1000.0}), encoding="utf-8")
    estimate = estimate_run(recipe, decisions, None, GPU_RECIPES[0], measured)
    sft = next(step for step in estimate.steps if step.step == "sft")
    assert str(measured) in sft.how and "1,000 tokens/s per GPU measured" in sft.how
    assert sft.wall_s == pytest.approx(recipe.estimate.sft.start_s + sft.train_tokens / (1000.0 * 8))
    assert any(str(measured) in line and "launch.bench_gpu" in line for line in estimate.assumptions)
    distill = next(step for step in estimate.steps if step.step == "distill")
    assert "FLOPs/token" in distill.how           # nothing measured for distill: the FLOPs model
    other = tmp_path / "other.json"                # measured on another model: not used
    other.write_text(json.dumps({"params": 123, "sft_tokens_per_s": 1000.0}), encoding="utf-8")
    sft = next(step for step in estimate_run(recipe, decisions, None, "x", other).steps if step.step == "sft")
    assert "FLOPs/token" in sft.how


def test_model_sizes_from_published_configs():
    for name, total_b, active_b in (("Qwen/Qwen2.5-7B-Instruct", 7.62, 7.62), ("Qwen2.5-72B-Instruct", 72.7, 72.7),
                                    ("deepseek-chat", 671, 37)):
        config, source = model_config(name)
        assert source.startswith("data/models/")
        total, active = model_params(config)
        assert total / 1e9 == pytest.approx(total_b, rel=0.01) and active / 1e9 == pytest.approx(active_b, rel=0.03)


def test_actuals_in_the_stamp_and_the_report(tmp_path):
    out = tmp_path / "run"
    recipe, decisions = plan_of("recipes/pipeline/tiny-cpu.yaml", [f"out={out}"])
    estimate = estimate_run(recipe, decisions, None, "tiny-cpu.yaml")
    teacher = decisions[0]
    summary_path = out / "stage1" / "teacher" / "summary.json"
    summary_path.parent.mkdir(parents=True)
    summary_path.write_text(json.dumps({"requests": 13, "tokens_in": 4000, "tokens_out": 300}), encoding="utf-8")
    stamps = out / "stamps"
    write_record(stamps / "teacher.json", teacher.parts, done=True, key=teacher.key, seconds=34.0)
    rows = [{"step": "teacher", "status": "ran", "seconds": 34.0, "server_starts": 1, "server_start_s": 26.5},
            {"step": "sft", "status": "skipped", "seconds": 0.0}]
    actuals = record_actuals(recipe, decisions, rows, stamps, None)
    stamp = read_record(stamps / "teacher.json")
    assert stamp["done"] and stamp["key"] == teacher.key and stamp["seconds"] == 34.0   # the record kept
    assert {k: stamp["actual"][k] for k in ("requests", "prompt_tokens", "completion_tokens", "wall_s", "gpus",
                                            "gpu_hours")} == {"requests": 13, "prompt_tokens": 4000,
                                                              "completion_tokens": 300, "wall_s": 60.5, "gpus": 0,
                                                              "gpu_hours": 0.0}
    # 60.5 s: the step's 34 s and the 26.5 s the pipeline spent starting the server it shared (the step started none)
    scores = out / "scores" / "scores.md"
    scores.parent.mkdir()
    scores.write_text("# Scores\n\n| run | f1 |\n\n## Training curves\n\nx\n", encoding="utf-8")
    write_report(out, estimate, actuals, rows, 100.0)
    write_report(out, estimate, actuals, rows, 100.0)    # a re-run replaces the section, never repeats it
    text = scores.read_text(encoding="utf-8")
    assert text.count("## Cost: estimated and actual") == 1 and "## Training curves" in text
    assert "| step | estimated | actual |" in text and f"| teacher | {duration(estimate.steps[0].wall_s)}," in text
    assert "| 60 s, 0.00 GPU-h, 4,300 API tokens, $0.00 |" in text      # the actual: 60.5 s, 4000 + 300 tokens
    lines = final_lines(out)
    assert lines[0] == "| step | estimated | actual |" and lines[-2].startswith("cost: estimated ")   # the table
    assert [line for line in lines if line.startswith("| total |")] == [line for line in text.splitlines()
                                                                       if line.startswith("| total |")]
    assert lines[-1].startswith("server_starts=1 server_start_s=26.5 wall_s=100 estimated_wall_s=")
    assert float(lines[-1].split("estimated_wall_s=")[1]) == pytest.approx(recipe.estimate.preflight_s
                                                                             + estimate.steps[0].wall_s, abs=0.1)
