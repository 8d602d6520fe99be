"""The whole pipeline in one command: stage one (teacher -> SFT -> merge -> predict -> score) and
stage two (soft labels -> distill -> predict -> score), make-like.

    python -m launch.pipeline --config recipes/pipeline/<one>.yaml [--stages 1,2] [--set key=value ...]
    (or: bash launch/run.sh RECIPE ...)

Each step runs one of the stage commands users run by hand, with its own log file. A step whose
stamp matches its command and whose outputs validate is skipped; a crashed run is restarted with
the same command and every step resumes from its own cache or checkpoint. Everything is checked
before anything costly starts (recipes, cases, disk, GPUs, teacher endpoint, vLLM environment).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prep.serving import new_session_dying_with_parent
from prep.config import RecipeError, load_recipe
from prep.paths import resolve_path
from prep.jsonio import InputError, dumps, read_jsonl, write_jsonl_atomic, write_text_atomic
from prep.records import read_cases
from prep.paths import REPO_ROOT

PYTHON = sys.executable


@dataclass
class StageOne:
    teacher: str                                            # recipes/teacher/*.yaml
    sft: str                                                # recipes/sft/*.yaml (Axolotl)
    predict: str                                            # recipes/predict/*.yaml
    teacher_set: list[str] = field(default_factory=list)    # prep.teacher --set overrides
    sft_overlays: list[str] = field(default_factory=list)   # YAML overlays merged over the SFT recipe
    sft_set: list[str] = field(default_factory=list)        # Axolotl key=value overrides
    predict_set: list[str] = field(default_factory=list)


@dataclass
class StageTwo:
    softlabels: str                                         # recipes/softlabels/*.yaml
    distill: str                                            # recipes/distill/*.yaml (TRL)
    predict: str
    softlabels_set: list[str] = field(default_factory=list)
    distill_overlays: list[str] = field(default_factory=list)
    distill_set: list[str] = field(default_factory=list)    # key=value -> --key value for launch/distill.py
    predict_set: list[str] = field(default_factory=list)


@dataclass
class PipelineRecipe:
    train_cases: str                  # cases the teacher labels
    test_cases: str                   # cases the submission answers
    out: str                          # run folder: OUT/stage1, OUT/stage2, OUT/base, OUT/scores, OUT/submission.jsonl
    base_model: str                   # the untuned student, scored as the baseline
    stage1: StageOne
    stage2: StageTwo | None = None
    stages: list[int] = field(default_factory=lambda: [1, 2])
    min_free_disk_gb: float = 50.0
    step_timeout_s: float = 48 * 3600
    score_baseline: bool = True

    def __post_init__(self) -> None:
        if not set(self.stages) <= {1, 2} or not self.stages:
            raise ValueError("stages must be a non-empty subset of [1, 2]")
        if 2 in self.stages and self.stage2 is None:
            raise ValueError("stages includes 2 but the recipe has no stage2 section")


@dataclass
class Step:
    name: str
    argv: list[str]
    outputs: list[Path]                               # all must exist for the step to count as done
    validate: Callable[[], None] | None = None        # raises when the outputs are not complete and valid
    before: Callable[[], None] | None = None          # cheap local preparation (e.g. write an input file)

    def stamp(self) -> str:
        return hashlib.sha256("\0".join(self.argv).encode()).hexdigest()[:16]


class PipelineError(RuntimeError):
    pass


# --------------------------------------------------------------------------- the plan

def distill_flags(stage: StageTwo, dataset: Path, output: Path, model: Path) -> list[str]:
    flags = []
    for overlay in stage.distill_overlays:
        flags += ["--config", overlay]
    for item in stage.distill_set:
        key, value = item.split("=", 1)
        flags += [f"--{key}", value]
    return flags + ["--dataset_path", str(dataset), "--output_dir", str(output), "--model_name_or_path", str(model)]


def predict_step(name: str, recipe: str, sets: list[str], model: str | Path, cases: Path, out: Path) -> Step:
    argv = [PYTHON, "-m", "launch.predict", "--config", recipe, "--model", str(model), "--input", str(cases),
            "--out", str(out), "--no-progress"] + [arg for item in sets for arg in ("--set", item)]
    return Step(name, argv, [out / "predictions.jsonl", out / "submission.jsonl"],
                validate=lambda: _check_submission(cases, out / "submission.jsonl"))


def _check_submission(cases: Path, submission: Path) -> None:
    from prep.submission import check_submission

    problems = check_submission(cases, submission)
    if problems:
        raise PipelineError(f"{submission}: {problems[0]}")


def _check_jsonl_ids_unique(path: Path) -> None:
    ids = [row.get("id") for row in read_jsonl(path)]
    if len(ids) != len(set(ids)):
        raise PipelineError(f"{path}: duplicate ids")


def build_plan(recipe: PipelineRecipe) -> list[Step]:
    out = resolve_path(recipe.out)
    train_cases, test_cases = resolve_path(recipe.train_cases), resolve_path(recipe.test_cases)
    s1, scored = out / "stage1", []
    teacher_out = s1 / "teacher"
    valid_reference = teacher_out / "sft" / "valid.jsonl"
    predict_cases = out / "predict_cases.jsonl"
    steps = [
        Step("teacher", [PYTHON, "-m", "prep.teacher", "--config", recipe.stage1.teacher, "--input", str(train_cases),
                         "--out", str(teacher_out), "--no-progress"] + [a for s in recipe.stage1.teacher_set for a in ("--set", s)],
             [teacher_out / "summary.json", teacher_out / "sft" / "train.jsonl", valid_reference],
             validate=lambda: (_check_jsonl_ids_unique(teacher_out / "sft" / "train.jsonl"), _check_jsonl_ids_unique(valid_reference))),
        Step("sft", ["bash", "launch/sft.sh", recipe.stage1.sft, *recipe.stage1.sft_overlays, *recipe.stage1.sft_set, "--run", str(s1)],
             [s1 / "sft" / "adapter_config.json"]),
        Step("merge", ["bash", "launch/merge.sh", str(s1 / "sft")], [s1 / "merged" / "config.json"]),
    ]
    # One server per model answers the validation cases (for the score) and the test cases together.
    prepare_predict_cases = lambda: write_predict_cases(train_cases, test_cases, valid_reference, predict_cases)  # noqa: E731
    if recipe.score_baseline:
        base = predict_step("predict-base", recipe.stage1.predict, recipe.stage1.predict_set, recipe.base_model, predict_cases, out / "base" / "predict")
        base.before = prepare_predict_cases
        steps.append(base)
        scored.append(("base", out / "base" / "predict" / "predictions.jsonl"))
    stage1_predict = predict_step("predict-stage1", recipe.stage1.predict, recipe.stage1.predict_set, s1 / "merged", predict_cases, s1 / "predict")
    stage1_predict.before = prepare_predict_cases
    steps.append(stage1_predict)
    scored.append(("stage1", s1 / "predict" / "predictions.jsonl"))
    final_predictions = s1 / "predict" / "predictions.jsonl"
    if 2 in recipe.stages:
        s2 = out / "stage2"
        stage2 = recipe.stage2
        steps += [
            Step("softlabels", [PYTHON, "-m", "prep.softlabels", "--config", stage2.softlabels, "--input", str(train_cases),
                                "--out", str(s2 / "softlabels"), "--no-progress"] + [a for s in stage2.softlabels_set for a in ("--set", s)],
                 [s2 / "softlabels" / "dataset" / "dataset_dict.json"]),
            Step("distill", ["bash", "launch/distill.sh", stage2.distill,
                             *distill_flags(stage2, s2 / "softlabels", s2 / "distill", s1 / "merged")],
                 [s2 / "distill" / "merged" / "config.json"]),
            predict_step("predict-stage2", stage2.predict, stage2.predict_set, s2 / "distill" / "merged", predict_cases, s2 / "predict"),
        ]
        steps[-1].before = prepare_predict_cases
        scored.append(("stage2", s2 / "predict" / "predictions.jsonl"))
        final_predictions = s2 / "predict" / "predictions.jsonl"
    scores = out / "scores"
    steps.append(Step("score", [PYTHON, "-m", "launch.score", str(valid_reference), *[str(p) for _, p in scored],
                                "--out", str(scores), "--names", *[n for n, _ in scored]],
                      [scores / "scores.md", scores / "scores.png"]))
    submission = out / "submission.jsonl"
    steps.append(Step("submission", [PYTHON, "-m", "launch.pipeline", "write-submission", str(test_cases), str(final_predictions),
                                     str(submission)], [submission], validate=lambda: _check_submission(test_cases, submission)))
    return steps


def write_predict_cases(train_cases: Path, test_cases: Path, valid_reference: Path, out: Path) -> None:
    """Test cases, then the validation cases not already among them (ids from the teacher's split)."""
    tests = read_cases(test_cases).cases
    valid_ids = {row["id"] for row in read_jsonl(valid_reference)}
    seen = {case.id for case in tests}
    extra = [case for case in read_cases(train_cases).cases if case.id in valid_ids and case.id not in seen]
    write_jsonl_atomic(out, [case.to_json() for case in tests + extra])


def write_final_submission(test_cases: str, predictions: str, submission: str) -> None:
    """The submission for exactly the test cases, from predictions that may cover more cases."""
    from prep.submission import write_submission
    from prep.answers import Answer

    answers = {row["id"]: Answer(row["reason"], row["diseases"]) for row in read_jsonl(predictions)
               if row.get("reason") and row.get("diseases")}
    write_submission(submission, read_cases(test_cases).cases, answers)


# --------------------------------------------------------------------------- preflight

def validate_recipe(path: str | Path) -> PipelineRecipe:
    """The pipeline recipe's own keys, and that every stage recipe and overlay it names exists."""
    recipe = load_recipe(PipelineRecipe, path)
    stages = [recipe.stage1] + ([recipe.stage2] if recipe.stage2 else [])
    named = [value for stage in stages for key, value in vars(stage).items() if isinstance(value, str)]
    named += [overlay for stage in stages for overlay in getattr(stage, "sft_overlays", []) + getattr(stage, "distill_overlays", [])]
    for name in named:
        if not resolve_path(name).exists():
            raise RecipeError(path, None, f"names {name}, which does not exist")
    return recipe


def preflight(recipe: PipelineRecipe, recipe_path: str) -> list[str]:
    """Everything that can be checked in seconds, before any GPU or API time; returns notes."""
    notes = []
    for path in (recipe.train_cases, recipe.test_cases):
        read_cases(resolve_path(path))  # raises InputError naming file:line:field
    from prep.teacher import TeacherRecipe
    from prep.predict import PredictRecipe

    teacher = load_recipe(TeacherRecipe, recipe.stage1.teacher, recipe.stage1.teacher_set)
    load_recipe(PredictRecipe, recipe.stage1.predict, recipe.stage1.predict_set)
    notes.append(sft_memory_check(recipe))
    if 2 in recipe.stages:
        from prep.softlabels import SoftLabelRecipe

        softlabels = load_recipe(SoftLabelRecipe, recipe.stage2.softlabels, recipe.stage2.softlabels_set)
        load_recipe(PredictRecipe, recipe.stage2.predict, recipe.stage2.predict_set)
        from custom_losses.distill import parse_recipe

        try:
            parse_recipe(["--config", recipe.stage2.distill, *distill_flags(recipe.stage2, Path("x"), Path("x"), Path("x"))])
        except SystemExit as exit_:
            raise PipelineError(f"{recipe.stage2.distill}: {exit_}") from None
    out = resolve_path(recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(out).free / 2**30
    if free_gb < recipe.min_free_disk_gb:
        raise PipelineError(f"{out}: {free_gb:.1f} GiB free, the recipe asks for min_free_disk_gb={recipe.min_free_disk_gb}")
    vllm_python = Path(os.environ.get("MEDKD_VLLM_PYTHON", REPO_ROOT / ".venv-vllm" / "bin" / "python"))
    if not vllm_python.exists():
        raise PipelineError(f"{vllm_python}: the vLLM environment is missing; run `bash launch/setup.sh`")
    teachers = [("teacher", teacher)] + ([("soft-label teacher", softlabels)] if 2 in recipe.stages else [])
    for role, teacher_recipe in teachers:
        notes.append(check_teacher(role, teacher_recipe))
    return notes


def check_teacher(role: str, teacher) -> str:
    """A hosted teacher must answer now (key set, key accepted, model listed); a self-hosted one is started later."""
    if teacher.server is not None:
        return f"{role} is self-hosted: its step starts the vLLM server"
    from prep.client import check_endpoint
    from prep.teacher import resolve_settings

    settings, _ = resolve_settings(teacher)
    check_endpoint(settings)  # one sentence on a missing key, 401, wrong model or unreachable endpoint
    return f"{role} endpoint {settings.base_url} answers"


def sft_memory_check(recipe: PipelineRecipe) -> str:
    """Compose the SFT config (the dataset does not exist yet) and hold it against the GPUs here."""
    from custom_losses.memory import estimate_config
    from custom_losses.sft_preflight import compose, gpu_memories_gib, needs_gpu

    stage = recipe.stage1
    config = compose(stage.sft, stage.sft_overlays, stage.sft_set, str(resolve_path(recipe.out) / "stage1"))
    gpus, reasons = gpu_memories_gib(), needs_gpu(config)
    if reasons and not gpus:
        raise PipelineError(f"{stage.sft}: needs a CUDA GPU ({', '.join(reasons)}) and none is visible")
    if not gpus:
        return "no GPU: CPU run"
    peak, smallest = estimate_config(config, len(gpus)).total, min(memory for _, memory in gpus)
    if peak > smallest:
        raise PipelineError(f"{stage.sft}: predicted peak {peak:.1f} GiB per GPU, the smallest GPU has {smallest:.1f} GiB")
    return f"SFT predicted peak {peak:.1f} GiB per GPU <= {smallest:.1f} GiB on {len(gpus)} GPU(s)"


# --------------------------------------------------------------------------- running

def step_done(step: Step, stamps: Path) -> bool:
    stamp = stamps / f"{step.name}.json"
    if not stamp.exists() or json.loads(stamp.read_text()).get("stamp") != step.stamp():
        return False
    if not all(path.exists() for path in step.outputs):
        return False
    if step.validate:
        try:
            step.validate()
        except (PipelineError, InputError, ValueError):
            return False
    return True


def run_step(step: Step, logs: Path, timeout_s: float) -> float:
    log_path = logs / f"{step.name}.log"
    started = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(step.argv)}\n")
        log.flush()
        # Own session, so a timeout ends the step's whole process tree.
        process = subprocess.Popen(step.argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=new_session_dying_with_parent)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
            raise PipelineError(f"step {step.name} ran past {timeout_s:.0f} s; see {log_path}") from None
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise PipelineError(f"step {step.name} failed (exit {code}); see {log_path}; last lines:\n{tail}")
    return time.monotonic() - started


def run_pipeline(recipe: PipelineRecipe, recipe_path: str) -> Path:
    out = resolve_path(recipe.out)
    logs, stamps = out / "logs", out / "stamps"
    logs.mkdir(parents=True, exist_ok=True)
    stamps.mkdir(parents=True, exist_ok=True)
    for note in preflight(recipe, recipe_path):
        print(f"[pipeline] preflight: {note}", flush=True)
    summary = []
    for step in build_plan(recipe):
        if step_done(step, stamps):
            print(f"[pipeline] {step.name}: done already, skipped", flush=True)
            summary.append({"step": step.name, "status": "skipped", "seconds": 0.0})
            continue
        if step.before:
            step.before()
        print(f"[pipeline] {step.name}: running (log {logs / (step.name + '.log')})", flush=True)
        seconds = run_step(step, logs, recipe.step_timeout_s)
        missing = [str(path) for path in step.outputs if not path.exists()]
        if missing:
            raise PipelineError(f"step {step.name} finished without writing {missing[0]}")
        if step.validate:
            step.validate()
        write_text_atomic(stamps / f"{step.name}.json", dumps({"stamp": step.stamp(), "seconds": round(seconds, 1)}))
        print(f"[pipeline] {step.name}: finished in {seconds:.0f} s", flush=True)
        summary.append({"step": step.name, "status": "ran", "seconds": round(seconds, 1)})
    write_text_atomic(out / "pipeline_summary.json", json.dumps(summary, indent=1))
    width = max(len(row["step"]) for row in summary)
    for row in summary:
        print(f"[pipeline] {row['step']:<{width}}  {row['status']:<7}  {row['seconds']:>7.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["write-submission"]:
        write_final_submission(*argv[1:4])
        return 0
    parser = argparse.ArgumentParser(prog="python -m launch.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="pipeline recipe (recipes/pipeline/*.yaml)")
    parser.add_argument("--stages", help="comma list overriding the recipe's stages, e.g. 1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    args = parser.parse_args(argv)
    overrides = args.set + ([f"stages=[{args.stages}]"] if args.stages else [])
    try:
        recipe = load_recipe(PipelineRecipe, args.config, overrides)
        out = run_pipeline(recipe, args.config)
    except (RecipeError, InputError, PipelineError, FileNotFoundError) as err:
        print(f"[pipeline] error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a stage recipe's own validation (ClientError, ValueError ...)
        print(f"[pipeline] error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(f"[pipeline] scores: {out / 'scores' / 'scores.md'} and {out / 'scores' / 'scores.png'}")
    print(f"[pipeline] submission (validated): {out / 'submission.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
