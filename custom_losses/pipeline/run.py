"""Running a pipeline: the preflight (the doctor, in process), the plan printed or carried out step by step.

The plan itself (which steps, which keys) is custom_losses.pipeline.plan; each step is a process
(custom_losses.pipeline.steps); this module sits above both and above the doctor. A run holds its run
folder's lock (prep.locks) from after validation to its end: a second pipeline on the same folder is
refused in one sentence.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Collection
from pathlib import Path

from custom_losses.checks.doctor import lines, passed, run_doctor
from custom_losses.pipeline.cost import estimate_run
from custom_losses.pipeline.cost_report import check_budget, estimate_lines, record_actuals, write_report
from custom_losses.pipeline.model_card import write_model_card
from custom_losses.pipeline.plan import (
    absolute,
    build_plan,
    contamination_figures,
    layout_of,
    missing_case_files,
    plan_pipeline,
    validate_recipe,
)
from custom_losses.pipeline.servers import SharedServer, add_starts, step_starts
from custom_losses.pipeline.steps import Decision, PipelineError, run_decision
from custom_losses.pipeline.teachers import stage_lines
from prep.api.process import stderr_silenced
from prep.config import parse_override
from prep.jsonio import write_text_atomic
from prep.locks import folder_lock
from prep.near_duplicates import contamination_line
from prep.paths import cli_path

# Pipeline keys that name data paths: given on the command line (--set), relative to the working directory.
COMMAND_LINE_PATH_KEYS = ("out", "train_cases", "test_cases")


def command_line_paths(overrides: list[str]) -> list[str]:
    """OVERRIDES with the relative data paths among them (COMMAND_LINE_PATH_KEYS) made absolute against the working
    directory, as every command's data paths are (prep.paths): `--set out=runs/x` run from /tmp is /tmp/runs/x.
    The same keys inside the recipe file keep the recipe rule (the working directory when present, else the repo)."""
    made = []
    for item in overrides:
        key, value = parse_override(item) if "=" in item and not item.startswith("-") else (None, None)
        if key in COMMAND_LINE_PATH_KEYS and isinstance(value, str) and value and not os.path.isabs(value):
            item = f"{key}={json.dumps(str(cli_path(value)))}"
        made.append(item)
    return made


def preflight(config: str | Path, overrides: list[str], steps: Collection[str] | None = None,
              overlays: list[str] = ()) -> list[str]:
    """The doctor (custom_losses.checks.doctor, in this process) on this pipeline recipe: case files, every
    stage recipe, the teacher's split, CUDA, GPU memory against each step's estimate, precision, attention,
    bitsandbytes, vLLM, NCCL, disk, models and teacher endpoints, in seconds and before any GPU or API time.
    STEPS (the names of the steps that will run) limits the machine's checks to what they need: a teacher run
    (`--until teacher`) passes on a CPU box. Its lines, for the log; PipelineError with its FAIL lines when the
    recipe cannot run here."""
    with stderr_silenced():   # the doctor imports the trainers' libraries to check them
        results = run_doctor(absolute(config), overrides, only=steps, overlays=overlays)
    if not passed(results):
        failed = [result.line() for result in results if result.failed]
        raise PipelineError("this run cannot start here (the doctor, python -m launch.doctor):\n" + "\n".join(failed))
    return lines(results)


# --------------------------------------------------------------------------- running

def print_plan(decisions: list[Decision], limit: int | None = None) -> None:
    if limit:
        print(f"--limit {limit}: a trial on the first {limit} training and test cases; the limit is part of every "
              f"step's key, so a full run's outputs are not taken as up to date here (nor this trial's by a full run)",
              flush=True)
    width = max(len(decision.step.name) for decision in decisions)
    for decision in decisions:
        print(decision.line(width), flush=True)


def unkeyed_decisions(recipe, limit: int | None) -> list[Decision]:
    """Every step, to run, when the case files their keys are made from are not there yet (for --plan only)."""
    return [Decision(step, "", {}, "its key needs the case files") for step in build_plan(recipe, limit)]


def print_stages(recipe) -> None:
    """Whom each stage asks and what stage two can do with that teacher (custom_losses.pipeline.teachers.stage_lines), under
    the step lines: which teacher is hosted, where stage two's answers come from, the tokenizer, on-policy rounds."""
    for line in stage_lines(recipe):
        print(f"[pipeline] {line}", flush=True)


def print_estimate(recipe, decisions: list[Decision], limit: int | None, config: str | Path, refuse: bool):
    """The cost estimate of the steps that run (custom_losses.pipeline.cost), printed; REFUSE: PipelineError (exit 2)
    when it passes the recipe's budget, else a line saying it would. The estimate."""
    estimate = estimate_run(recipe, decisions, limit, str(config))
    for line in estimate_lines(estimate):
        print(f"[pipeline] estimate: {line}", flush=True)
    try:
        check_budget(recipe.budget, estimate)
    except PipelineError as err:
        if refuse:
            raise
        print(f"[pipeline] estimate: a run would be refused: {err}", flush=True)
    return estimate


def steps_until(decisions: list[Decision], until: str | None) -> list[Decision]:
    """The decisions up to and including the step named UNTIL (all of them when None), counted in the stages' own
    order (a step's rank), so that a step the run order brings forward to share a server (soft labels after the
    teacher) is not run by `--until sft`; in the run order."""
    if until is None:
        return decisions
    names = [decision.step.name for decision in decisions]
    if until not in names:
        raise PipelineError(f"--until {until}: no such step; the steps are {', '.join(names)}")
    last = decisions[names.index(until)].step.rank
    return [decision for decision in decisions if decision.step.rank <= last]


def steps_only(decisions: list[Decision], only: list[str] | None) -> list[Decision]:
    """The decisions of the steps ONLY names (all when None), in the run order. A named step whose input step is
    neither named nor up to date would read stale or missing outputs: PipelineError naming the step to add."""
    if only is None:
        return decisions
    by_name = {decision.step.name: decision for decision in decisions}
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise PipelineError(f"--only {','.join(only)}: no step {unknown[0]}; the steps are {', '.join(by_name)}")
    for name in only:
        for dep in by_name[name].step.deps:
            if dep not in only and dep in by_name and by_name[dep].runs:
                raise PipelineError(f"--only {','.join(only)}: {name} reads what {dep} writes, which is not up to "
                                    f"date ({by_name[dep].reason}); add it: --only {dep},{','.join(only)}")
    return [decision for decision in decisions if decision.step.name in only]


def run_steps(decisions: list[Decision], logs: Path, stamps: Path, timeout_s: float,
              progress_interval_s: float) -> list[dict]:
    """Run every decision in order, each API step on the server it shares with its neighbours when they serve the
    same model alike (custom_losses.pipeline.servers); the summary rows, each with its server_starts and
    server_start_s (the pipeline's starts for the step and the step's own)."""
    summary = []
    with SharedServer(logs) as shared:    # stopped when the run ends, a step fails or the run is interrupted
        for index, decision in enumerate(decisions):
            url, started = shared.before(decisions, index)
            row = run_decision(decision, logs, stamps, timeout_s, progress_interval_s, url)
            summary.append(add_starts(row, started, step_starts(decision.step, row["status"])))
    return summary


def run_pipeline(config: str | Path, overrides: list[str] = (), *, overlays: list[str] = (), plan_only: bool = False,
                 until: str | None = None, limit: int | None = None, only: list[str] | None = None) -> Path:
    """Load the pipeline recipe CONFIG with OVERRIDES, check everything, run every step that is not up to date
    (up to the step UNTIL, or only the steps ONLY names); the run folder. PLAN_ONLY prints each step's decision and
    runs nothing. OVERLAYS are
    YAML files merged over CONFIG before OVERRIDES (prep.config.compose); LIMIT: a trial on the first LIMIT cases.

    Raises RecipeError, InputError, PipelineError, prep.locks.FolderInUse (another pipeline holds the run
    folder) or a stage validator's own error (one sentence each). A relative out, train_cases or test_cases in
    OVERRIDES is the working directory's (command_line_paths)."""
    began = time.monotonic()
    overrides = command_line_paths(list(overrides))
    recipe = validate_recipe(config, overlays, overrides)
    out = layout_of(recipe).out
    if until and only:
        raise PipelineError("--until and --only: give one of them")
    if plan_only:
        # Before the cases are in place the plan still says what would run and whom it asks; keys, up-to-date
        # decisions and the price need the cases.
        missing = missing_case_files(recipe)
        planned = unkeyed_decisions(recipe, limit) if missing else plan_pipeline(recipe, limit)
        decisions = steps_only(steps_until(planned, until), only)
        print_plan(decisions, limit)
        print_stages(recipe)
        if missing:
            print(f"[pipeline] estimate: not priced: {missing}", flush=True)
        else:
            print_estimate(recipe, decisions, limit, config, refuse=False)
        return out
    with folder_lock(out, choose="another run folder (out in the recipe, or --set out=...)"):
        logs, stamps = out / "logs", out / "stamps"
        decisions = steps_only(steps_until(plan_pipeline(recipe, limit), until), only)
        running = [decision.step.name for decision in decisions if decision.runs]
        print_stages(recipe)
        estimate = print_estimate(recipe, decisions, limit, config, refuse=True)   # before the first paid step
        for line in preflight(config, overrides, running, overlays):
            print(f"[pipeline] preflight: {line}", flush=True)
        logs.mkdir(parents=True, exist_ok=True)
        stamps.mkdir(parents=True, exist_ok=True)
        summary = run_steps(decisions, logs, stamps, recipe.step_timeout_s, recipe.progress_interval_s)
        copied = contamination_figures(recipe) if any(row["step"] == "score" for row in summary) else None
        for row in summary:   # on the score row, whose step wrote them (scores.md has the same section)
            if row["step"] == "score" and copied:
                row["contamination"] = copied
        write_text_atomic(out / "pipeline_summary.json", json.dumps(summary, indent=1))
        write_report(out, estimate, record_actuals(recipe, decisions, summary, stamps, limit), summary,
                     time.monotonic() - began)
        card = write_model_card(recipe, decisions)    # None until the submission is up to date
    width = max(len(row["step"]) for row in summary)
    for row in summary:
        print(f"[pipeline] {row['step']:<{width}}  {row['status']:<7}  {row['seconds']:>7.0f} s")
    if copied:
        print(f"[pipeline] test_cases copying train_cases: {contamination_line(copied)}")
    if card is not None:
        print(f"[pipeline] final model (it answered the submission; ship this folder): {card.parent} (card: {card})")
    return out
