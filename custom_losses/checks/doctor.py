"""Can this box run this pipeline recipe? Every check a rented GPU machine can fail, before the run pays for it.

    python -m launch.doctor --config recipes/pipeline/<one>.yaml [--set key=value ...] [--smoke]

One line per check, `ok   <check>: <detail>`, `FAIL <check>: <what is wrong>; fix: <exact fix>`, or
`skip <check>: <why>` when an earlier failure makes it meaningless (no GPU: nothing to hold memory
against). The recipe can run only when no line says FAIL.

The checks of the machine (GPUs, memory, precision, attention, bitsandbytes, vLLM, NCCL, disk, models) are in
custom_losses.checks.machine. This module holds the checks of the recipe itself (case files, split, teacher
endpoints) and reads what each pipeline step asks of the machine (StepNeeds). `run_doctor` gathers the facts of
this machine and of the recipe (custom_losses.pipeline.plan's stage runs, validated by
custom_losses.pipeline.catalogue as the pipeline's preflight does) and runs every check in order; a test fakes a
condition by passing it (a Machine without GPUs, a bad key against prep.testing.fault_server) rather than by
patching this code.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custom_losses.checks.machine import (
    SDPA_OVERLAY,
    CheckResult,
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
    fail,
    ok,
    pinned_version,
    skip,
    start_vllm_import,
)
from custom_losses.train.memory import (
    GIB,
    ModelShape,
    PreflightError,
    estimate_distill,
    estimate_recipe,
    shape_for,
)
from custom_losses.train.needs import train_gpu_reasons
from prep.api.process import stderr_silenced
from prep.paths import resolve_path

# vLLM's CUDA graphs, its profile run's activations and the CUDA context, on top of weights and KV cache:
# a rough allowance (vLLM reports ~1-3 GiB for 7B-70B models), not a measured figure.
SERVE_OVERHEAD_GIB = 2.0


# --------------------------------------------------------------------------- what the recipe asks of the machine

def train_step(name: str, kind_of_recipe: str, config: dict[str, Any], recipe: str, gpus: int,
               base_model: str) -> StepNeeds:
    """An SFT (Axolotl keys) or distill (TRL keys) step from its composed config."""
    reasons = train_gpu_reasons(kind_of_recipe, config)    # what launch.sft/launch.distill weigh too
    four_bit = bool(config.get("load_in_4bit") or config.get("adapter") == "qlora")
    step = StepNeeds(name, "train", recipe, reasons, max(gpus, 1), bf16=config.get("bf16") is True,
                     tf32=config.get("tf32") is True, attention=str(config.get("attn_implementation") or ""),
                     four_bit=four_bit and bool(reasons))
    if step.on_gpu:
        try:
            model = base_model if kind_of_recipe == "distill" else None
            step.estimate_gib = estimate_recipe(config, max(gpus, 1), model).total if model is None else \
                estimate_distill(config, max(gpus, 1), model).total
        except (ValueError, KeyError) as err:
            step.estimate_note = str(err)
    return step


def serve_step(name: str, spec: Any, recipe: str, model: str) -> StepNeeds:
    """A vLLM server (prep.api.serving.ServerSpec) for MODEL: a GPU unless it is a CPU recipe (VLLM_CPU_* settings)."""
    from prep.api.serving import vllm_flag

    args = [str(arg) for arg in spec.extra_args]
    tp = int(vllm_flag(args, "--tensor-parallel-size") or vllm_flag(args, "-tp") or 1)
    cpu = any(key.startswith("VLLM_CPU_") for key in spec.env)
    dtype = (vllm_flag(args, "--dtype") or "auto").lower()
    step = StepNeeds(name, "serve", recipe, [] if cpu else [f"vLLM (CUDA) serving {model}"], tp,
                     budget_fraction=float(vllm_flag(args, "--gpu-memory-utilization") or 0.9),
                     bf16=dtype in ("bfloat16", "bf16"))
    if step.on_gpu:
        try:
            shape = shape_for(model)
            step.estimate_gib = serve_estimate_gib(shape, int(vllm_flag(args, "--max-model-len") or 32768), tp,
                                                   4 if dtype in ("float32", "float") else 2)
        except ValueError as err:
            step.estimate_note = str(err)
    return step


def serve_estimate_gib(shape: ModelShape, max_model_len: int, tensor_parallel: int, dtype_bytes: int = 2) -> float:
    """What vLLM must fit in its share of each GPU: the weights and one full-length sequence's KV cache,
    split over the tensor-parallel GPUs, plus SERVE_OVERHEAD_GIB."""
    weights = shape.params * dtype_bytes
    kv = 2 * shape.layers * shape.kv_dim * dtype_bytes * max_model_len
    return (weights + kv) / tensor_parallel / GIB + SERVE_OVERHEAD_GIB


# --------------------------------------------------------------------------- the recipe's own checks

def check_case_files(paths: Sequence[str | Path] | dict[str, str | Path]) -> CheckResult:
    """Each case file (PATHS: recipe key -> path, or paths) reads with no bad line; a missing one names its key."""
    from prep.jsonio import InputError
    from prep.records import read_cases

    named = paths if isinstance(paths, dict) else {str(path): path for path in paths}
    counts = []
    for key, path in named.items():
        if not resolve_path(path).is_file():
            where = f"the recipe's {key}" if key != str(path) else "a case file"
            return fail("case files", f"{path} ({where}) not found",
                        f"put your cases there (data/competition/README.md says which file is which) or name yours: "
                        f"--set {key if key != str(path) else 'train_cases'}=PATH")
        try:
            counts.append(f"{len(read_cases(resolve_path(path)).cases)} in {path}")
        except (InputError, OSError) as err:
            return fail("case files", str(err), f"correct it (`python -m launch.records {path}` lists every bad line)")
    return ok("case files", ", ".join(dict.fromkeys(counts)))


def check_split(train_cases: str | Path, teacher: Any) -> CheckResult:
    """The teacher recipe's split must leave training rows (custom_losses.pipeline.plan.check_split)."""
    from custom_losses.pipeline.plan import check_split as pipeline_check_split
    from custom_losses.pipeline.steps import PipelineError
    from prep.jsonio import InputError

    if not resolve_path(train_cases).is_file():   # said once, by the case-file check
        return skip("split", "no training cases to split (see case files)")
    try:
        return ok("split", pipeline_check_split(resolve_path(train_cases), teacher.split))
    except (PipelineError, InputError) as err:
        return fail("split", str(err), "add cases to the training file or lower split.valid_fraction in the teacher "
                    "recipe (stage1.teacher_set)")


def check_teacher(role: str, teacher: Any, scores_answers: bool = False, generates: bool = False) -> CheckResult:
    """A hosted teacher answers now with the key it is given (custom_losses.pipeline.teachers.check_teacher; with SCORES_ANSWERS it
    must also return prompt_logprobs, with GENERATES top_k chat log-probs); a self-hosted one starts with its step."""
    from custom_losses.pipeline.steps import PipelineError
    from custom_losses.pipeline.teachers import check_teacher as pipeline_check_teacher
    from prep.api.preflight import EndpointUnreachable

    try:
        return ok(f"{role} endpoint", pipeline_check_teacher(role, teacher, scores_answers, generates))
    except PipelineError as err:   # a hosted API that cannot score given answers
        return fail(f"{role} endpoint", str(err), "host the soft-label teacher on vLLM or sample fresh answers")
    except Exception as err:  # ClientError: "what is wrong; its fix" (a missing or refused key, a model not served)
        recipe = getattr(teacher, "recipe_path", "") or "the teacher recipe"
        detail, _, fix = str(err).partition("; ")
        if isinstance(err, EndpointUnreachable) or detail.startswith("no endpoint answers"):
            fix = (f"start the server behind it, or correct client.base_url in {recipe} (the pipeline's "
                   f"stage1.teacher_set / stage2.softlabels_set); the key is not what failed")
        return fail(f"{role} endpoint", detail, fix or f"correct client.base_url/client.model in {recipe}")


# --------------------------------------------------------------------------- the whole recipe

@dataclass
class Recipe:
    """The pipeline recipe with its stage runs validated, and the steps the machine must serve."""

    pipeline: Any                                   # custom_losses.pipeline.plan.PipelineRecipe
    validated: dict[str, Any]                       # stage run name -> what its validator returned
    steps: list[StepNeeds]
    needs: frozenset[str] | None = None             # what the steps that will run need (need_of); None: all

    def needed(self, need: str) -> bool:
        return self.needs is None or need in self.needs


def need_of(step: str) -> str | None:
    """The doctor's name for what a pipeline STEP needs of the machine (a training or serving need), or None for a
    step that needs neither (merge, the on-policy mix, score, submission)."""
    if step.startswith(("distill", "softlabels")):
        return step.split("-")[0]
    if step in ("predict-base", "predict-stage1"):
        return "predict-stage1"
    if step == "predict-stage2" or step.startswith(("predict-round", "student-")):
        return "predict-stage2"
    return step if step in ("teacher", "sft") else None


def load(config: str | Path, overrides: Sequence[str], gpus: int, only: Collection[str] | None = None,
         overlays: Sequence[str | Path] = ()) -> Recipe:
    """Validate CONFIG as custom_losses.pipeline.plan.preflight does (every stage through custom_losses.pipeline.catalogue, no GPU demanded:
    the GPU checks say that), then read each training and serving step's needs."""
    from custom_losses.pipeline import catalogue
    from custom_losses.pipeline import plan as pipeline
    from custom_losses.train.sft_config import compose as compose_sft
    from prep.api.serving import load_server_spec
    from prep.config import compose

    recipe = pipeline.validate_recipe(config, list(overlays), list(overrides))
    runs = pipeline.stage_runs(recipe)
    validated = {}
    for name, run in runs.items():
        try:
            validated[name] = catalogue.validate(run.folder, run.recipe, run.overlays, run.overrides)
        except PreflightError as err:   # the SFT validator's own memory check: the gpu memory line reports it
            validated[name] = f"{err}"
    processes = int(os.environ.get("MEDKD_NUM_PROCESSES") or 0) or gpus
    steps = [train_step("sft", "sft", compose_sft(runs["sft"].recipe, runs["sft"].overlays, runs["sft"].overrides),
                        runs["sft"].recipe, processes, recipe.base_model)]
    if "distill" in runs:
        run = runs["distill"]
        steps.append(train_step("distill", "distill", compose(run.recipe, list(run.overlays), list(run.overrides)),
                                run.recipe, processes, recipe.base_model))
    for name in ("teacher", "softlabels", "predict-stage1", "predict-stage2"):
        stage = validated.get(name)
        if stage is None or stage.server is None:
            continue
        spec = load_server_spec(stage.server)
        model = recipe.base_model if name.startswith("predict") else spec.model
        steps.append(serve_step(name, spec, runs[name].recipe, model))
    if only is not None:    # the steps that will run (--until, --stages, what is up to date): what they need
        needed = {need_of(step) for step in only}
        steps = [step for step in steps if step.name in needed]
    return Recipe(recipe, validated, steps, None if only is None else frozenset(need_of(s) for s in only) - {None})


def models_of(recipe: Recipe) -> list[str]:
    """The base model and each self-hosted teacher's model that the steps to run need: what must be on disk or on
    the hub."""
    from prep.api.serving import load_server_spec

    student = ("sft", "distill", "predict-stage1", "predict-stage2")
    names = [recipe.pipeline.base_model] if any(recipe.needed(need) for need in student) else []
    for name in ("teacher", "softlabels"):
        stage = recipe.validated.get(name)
        if stage is not None and stage.server is not None and recipe.needed(name):
            names.append(load_server_spec(stage.server).model)
    return list(dict.fromkeys(names))


def run_doctor(config: str | Path, overrides: Sequence[str] = (), machine: Machine | None = None,
               vllm_python: str | None = "", offline: bool | None = None,
               report: Callable[[CheckResult], None] | None = None,
               only: Collection[str] | None = None, overlays: Sequence[str | Path] = ()) -> list[CheckResult]:
    """Every check of CONFIG (a pipeline recipe, OVERLAYS merged over it) with OVERRIDES against MACHINE (this one
    by default), in order;
    REPORT gets each result as it is made. VLLM_PYTHON "" means prep.api.serving.vllm_python(); OFFLINE None
    means HF_HUB_OFFLINE from the environment. ONLY (pipeline step names) limits the machine's checks to what
    those steps need (a teacher run on a CPU box before the GPU is rented); every stage recipe is validated
    whatever ONLY says. When the recipe does not validate that is the only line."""
    return _run(config, overrides, machine, vllm_python, offline, report, only, overlays)[0]


def _run(config: str | Path, overrides: Sequence[str], machine: Machine | None, vllm_python: str | None,
         offline: bool | None, report: Callable[[CheckResult], None] | None,
         only: Collection[str] | None = None,
         overlays: Sequence[str | Path] = ()) -> tuple[list[CheckResult], Recipe | None]:
    """run_doctor, also returning the loaded recipe. Long because it is the list of checks itself, one call each."""
    from prep.config import RecipeError

    results: list[CheckResult] = []

    def add(result: CheckResult) -> None:
        results.append(result)
        if report:
            report(result)

    if vllm_python == "":
        from prep.api.serving import vllm_python as find_vllm

        try:
            vllm_python = find_vllm()
        except FileNotFoundError:
            vllm_python = None
    vllm_import = start_vllm_import(vllm_python)
    machine = Machine.here() if machine is None else machine
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false") if offline is None else offline
    try:
        recipe = load(config, overrides, len(machine.gpus), only, overlays)
    except (RecipeError, ValueError, OSError, KeyError) as err:
        if vllm_import is not None:
            vllm_import.kill()
            vllm_import.communicate()
        add(fail("recipes", str(err), "correct the named file and key (each recipe's header says what its keys do)"))
        return results, None
    pipe = recipe.pipeline
    add(check_case_files({"train_cases": pipe.train_cases, "test_cases": pipe.test_cases}))
    notes = [f"{name}: {note}" for name, note in recipe.validated.items() if isinstance(note, str)]
    add(ok("recipes", f"{len(recipe.validated)} stage recipes validate" + (f" ({'; '.join(notes)})" if notes else "")))
    add(check_split(pipe.train_cases, recipe.validated["teacher"]))
    add(check_cuda(recipe.steps, machine))
    add(check_gpu_memory(recipe.steps, machine.gpus))
    add(check_precision(recipe.steps, machine.gpus))
    add(check_attention({step.name: step.attention for step in recipe.steps if step.kind == "train"}, machine=machine))
    add(check_bitsandbytes(recipe.steps, machine.gpus))
    add(check_vllm(vllm_python, pinned_version("vllm"), started=vllm_import))
    multi = any(step.on_gpu and step.gpus > 1 for step in recipe.steps)
    add(check_allreduce(len(machine.gpus)) if multi and len(machine.gpus) > 1 else
        ok("nccl", "no step spans several GPUs here" if machine.gpus else "no GPU: not needed"))
    add(check_disk(resolve_path(pipe.out), pipe.min_free_disk_gb))
    for name in models_of(recipe):
        add(check_model(name, offline, key="base_model in the pipeline recipe" if name == pipe.base_model else
                        "model in the teacher's serve recipe"))
    if recipe.needed("teacher"):
        add(check_teacher("teacher", recipe.validated["teacher"]))
    if "softlabels" in recipe.validated and recipe.needed("softlabels"):
        # Fresh samples: one request asks for top_k chat log-probs (a hosted API that gives fewer, or none, fails here).
        scores = pipe.stage2.scores_fixed_answers
        add(check_teacher("soft-label teacher", recipe.validated["softlabels"], scores, generates=not scores))
    return results, recipe


def diagnose(config: str | Path, overrides: Sequence[str] = (), smoke: bool = False,
             report: Callable[[str], None] = print, overlays: Sequence[str | Path] = ()) -> bool:
    """The `launch.doctor` command: every check's line to REPORT as it is made, then (with SMOKE, when every
    check passed) the real-shape smoke run; True when the recipe can run here. OVERLAYS: YAML files merged over
    CONFIG before OVERRIDES, as every command composes a recipe (prep.config.compose)."""
    with stderr_silenced():   # torch, bitsandbytes and the trainers print import noise between the check lines
        results, recipe = _run(config, overrides, None, "", None, lambda result: report(result.line()),
                               overlays=overlays)
    if smoke and passed(results) and recipe is not None:
        tiny = not any(step.on_gpu for step in recipe.steps)
        result = run_smoke(config, [*overlay_overrides(overlays), *overrides], tiny, report)
        report(result.line())
        results.append(result)
    return passed(results)


def run_smoke(config: str | Path, overrides: Sequence[str], tiny: bool,
              report: Callable[[str], None] = print) -> CheckResult:
    """custom_losses.checks.smoke.run_smoke (a few real-shape steps on this box), each of its lines streamed to REPORT;
    FAIL when any of them is a FAIL line."""
    from custom_losses.checks import smoke

    try:
        smoke_lines = smoke.run_smoke(config, list(overrides), tiny=tiny, out=report)
    except Exception as err:  # a recipe the checks passed but the smoke run refuses: still one line
        return fail("smoke", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                    "correct the named file and key")
    failed = [line for line in smoke_lines if line.startswith("FAIL")]
    if failed:
        return fail("smoke", f"{len(failed)} of {len(smoke_lines)} smoke steps failed (lines above)",
                    "fix what the FAIL lines above name before paying for the run")
    return ok("smoke", f"{len(smoke_lines)} smoke steps ran ({'tiny CPU shapes' if tiny else 'real shapes'})")


def overlay_overrides(overlays: Sequence[str | Path]) -> list[str]:
    """OVERLAYS as the `key=value` items that compose to the same recipe (each leaf set in order; mappings merge
    key by key, anything else is replaced, as prep.config.deep_merge does): for the smoke run, which takes
    overrides only."""
    import json

    from prep.config import read_yaml

    def leaves(data: dict, prefix: str) -> list[str]:
        items = []
        for key, value in data.items():
            items += leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else \
                [f"{prefix}{key}={json.dumps(value, ensure_ascii=False)}"]
        return items

    return [item for overlay in overlays for item in leaves(read_yaml(overlay), "")]


def lines(results: Sequence[CheckResult]) -> list[str]:
    return [result.line() for result in results]


def passed(results: Sequence[CheckResult]) -> bool:
    return not any(result.failed for result in results)


# The doctor's names, with the machine checks it runs (defined in custom_losses.checks.machine).
__all__ = ["CheckResult", "Gpu", "Machine", "StepNeeds", "run_doctor", "run_smoke", "lines", "passed",
           "check_case_files", "check_cuda", "check_gpu_memory", "check_precision", "check_attention",
           "check_bitsandbytes", "check_vllm", "check_allreduce", "check_disk", "check_model", "check_teacher",
           "SDPA_OVERLAY", "diagnose"]
