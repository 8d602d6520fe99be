"""Running a pipeline: the preflight (the doctor, in process), the plan printed or carried out step by step.

The plan itself (which steps, which keys) is custom_losses.pipeline.plan; each step is a process
(custom_losses.pipeline.steps); this module sits above both and above the doctor.
"""
from __future__ import annotations

import json
from pathlib import Path

from custom_losses.checks.doctor import lines, passed, run_doctor
from custom_losses.pipeline.plan import absolute, layout_of, plan_pipeline, validate_recipe
from custom_losses.pipeline.steps import Decision, PipelineError, run_decision
from prep.api.process import stderr_silenced
from prep.jsonio import write_text_atomic


def preflight(config: str | Path, overrides: list[str]) -> list[str]:
    """The doctor (custom_losses.checks.doctor, in this process) on this pipeline recipe: case files, every
    stage recipe, the teacher's split, CUDA, GPU memory against each step's estimate, precision, attention,
    bitsandbytes, vLLM, NCCL, disk, models and teacher endpoints, in seconds and before any GPU or API time.
    Its lines, for the log; PipelineError with its FAIL lines when the recipe cannot run here."""
    with stderr_silenced():   # the doctor imports the trainers' libraries to check them
        results = run_doctor(absolute(config), overrides)
    if not passed(results):
        failed = [result.line() for result in results if result.failed]
        raise PipelineError("this run cannot start here (the doctor, python -m launch.doctor):\n" + "\n".join(failed))
    return lines(results)


# --------------------------------------------------------------------------- running

def print_plan(decisions: list[Decision]) -> None:
    width = max(len(decision.step.name) for decision in decisions)
    for decision in decisions:
        print(decision.line(width), flush=True)


def steps_until(decisions: list[Decision], until: str | None) -> list[Decision]:
    """The decisions up to and including the step named UNTIL (all of them when None)."""
    if until is None:
        return decisions
    names = [decision.step.name for decision in decisions]
    if until not in names:
        raise PipelineError(f"--until {until}: no such step; the steps are {', '.join(names)}")
    return decisions[:names.index(until) + 1]


def run_pipeline(config: str | Path, overrides: list[str] = (), *, plan_only: bool = False,
                 until: str | None = None) -> Path:
    """Load the pipeline recipe CONFIG with OVERRIDES, check everything, run every step that is not up to date
    (up to the step UNTIL); the run folder. PLAN_ONLY prints each step's decision and runs nothing.

    Raises RecipeError, InputError, PipelineError or a stage validator's own error (one sentence each)."""
    recipe = validate_recipe(config, overrides=overrides)
    out = layout_of(recipe).out
    if plan_only:
        print_plan(steps_until(plan_pipeline(recipe), until))
        return out
    logs, stamps = out / "logs", out / "stamps"
    for line in preflight(config, list(overrides)):
        print(f"[pipeline] preflight: {line}", flush=True)
    logs.mkdir(parents=True, exist_ok=True)
    stamps.mkdir(parents=True, exist_ok=True)
    decisions = steps_until(plan_pipeline(recipe), until)
    summary = [run_decision(decision, logs, stamps, recipe.step_timeout_s, recipe.progress_interval_s)
               for decision in decisions]
    write_text_atomic(out / "pipeline_summary.json", json.dumps(summary, indent=1))
    width = max(len(row["step"]) for row in summary)
    for row in summary:
        print(f"[pipeline] {row['step']:<{width}}  {row['status']:<7}  {row['seconds']:>7.0f} s")
    return out
