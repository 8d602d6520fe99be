"""Which code validates which recipes: the one table from a `recipes/<folder>/` to its validator.

The pipeline's preflight and the recipe test both go through this table, so a recipe the test passes
is a recipe the pipeline accepts. The orchestrator stands above every stage, so it imports each validator
from the code that runs that stage (SFT and distillation recipes are validated by the code that trains them).

Every validator is `validate_recipe(path, overlays=(), overrides=())`: it composes the recipe with its
overlay files and `key=value` overrides (prep.config's one syntax) and raises prep.config.RecipeError
(or ValueError) with one sentence when something is wrong. It returns what it validated (the recipe
object, which the pipeline reuses) or a note for the run's log (the SFT validator says how the predicted
GPU memory fits), or None.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from prep.config import RecipeError, compose
from prep.paths import RECIPES_DIR, resolve_path


def _validators() -> dict[str, Callable[..., Any]]:
    """recipes/<folder>/ -> its validator. Built on first use: the SFT and distill validators import the training
    side's recipe code, which a command that validates one teacher recipe need not load."""
    from custom_losses.pipeline import plan
    from custom_losses.train import distill, sft_config
    from prep.eval import score
    from prep.stages import predict, softlabels, teacher

    return {"teacher": teacher.validate_recipe, "softlabels": softlabels.validate_recipe, "serve": validate_serve,
            "sft": sft_config.validate_recipe, "distill": distill.validate_recipe, "predict": predict.validate_recipe,
            "score": score.validate_recipe, "pipeline": plan.validate_recipe, "accelerate": validate_accelerate,
            "deepspeed": validate_deepspeed}


# The recipe folders that have a validator (the keys of _validators()).
FOLDERS = ("teacher", "softlabels", "serve", "sft", "distill", "predict", "score", "pipeline", "accelerate", "deepspeed")
# Overlay files live in a folder of this name inside the recipe folder they change (recipes/sft/overrides/).
OVERLAY_FOLDER = "overrides"


def validator(folder: str) -> Callable[..., Any]:
    """The validator of recipes/FOLDER/, imported now; KeyError naming the folder when there is none."""
    validators = _validators()
    if folder not in validators:
        raise KeyError(f"recipes/{folder}/ has no validator in custom_losses.pipeline.catalogue")
    return validators[folder]


def validate(folder: str, path: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = (),
             **options: Any) -> Any:
    """Validate the recipe PATH as a recipes/FOLDER/ recipe; whatever its validator returns (a str is a note).
    OPTIONS go to that validator as they are (e.g. the SFT validator's require_gpu)."""
    return validator(folder)(path, overlays=list(overlays), overrides=list(overrides), **options)


def recipe_folder(path: str | Path) -> str:
    """`sft` for recipes/sft/x.yaml and recipes/sft/overrides/y.yaml; '' for a file outside a recipe folder."""
    try:
        parts = resolve_path(path).resolve().relative_to(RECIPES_DIR.resolve()).parts
    except ValueError:
        return ""
    return parts[0] if len(parts) > 1 else ""


def is_overlay(path: str | Path) -> bool:
    return Path(path).parent.name == OVERLAY_FOLDER


def validate_accelerate(path: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> None:
    """An `accelerate launch --config_file` YAML, read by accelerate's own loader (its keys and enums), that
    starts at least one process on GPUs and leaves precision to the training recipe."""
    from accelerate.commands.config.config_args import load_config_from_file

    data = compose(path, overlays, overrides)
    with tempfile.TemporaryDirectory() as folder:
        composed = Path(folder) / Path(path).name
        composed.write_text(yaml.safe_dump(data), encoding="utf-8")
        try:
            config = load_config_from_file(str(composed))
        except (TypeError, ValueError, KeyError) as err:
            raise RecipeError(path, None, f"accelerate cannot load it: {err}") from None
    if config.num_processes is None or config.num_processes < 1:
        raise RecipeError(path, "num_processes", f"must be at least 1, got {config.num_processes}")
    if config.use_cpu:
        raise RecipeError(path, "use_cpu", "must be false: these configs launch GPU training")
    if str(config.mixed_precision) != "no":
        raise RecipeError(path, "mixed_precision", "must be 'no': precision comes from the training recipe")
    if config.num_machines > 1:
        if config.num_processes % config.num_machines:
            raise RecipeError(path, "num_processes", f"{config.num_processes} processes do not split evenly over "
                                                     f"{config.num_machines} machines (it counts all machines' GPUs)")
        if config.rdzv_backend not in ("static", "c10d"):
            raise RecipeError(path, "rdzv_backend", f"must be static or c10d, got {config.rdzv_backend!r}")
        if config.rdzv_backend == "c10d" and config.same_network:
            # same_network makes accelerate pass --master_addr/--master_port, which c10d ignores (it wants an endpoint)
            raise RecipeError(path, "same_network", "must be false with rdzv_backend c10d (torchrun then meets at "
                                                    "--rdzv_endpoint main_process_ip:main_process_port)")


def validate_deepspeed(path: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> None:
    """A DeepSpeed config: a JSON object whose zero_optimization.stage is 0-3."""
    data = compose(path, overlays, overrides)
    zero = data.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise RecipeError(path, "zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage!r}")


# vLLM's parallelism flags (long and short spellings, vllm 0.32 engine/arg_utils.py) in a serve recipe's extra_args.
PARALLEL_FLAGS = {"tensor": ("--tensor-parallel-size", "-tp"), "pipeline": ("--pipeline-parallel-size", "-pp"),
                  "data": ("--data-parallel-size", "-dp")}


def _parallel_size(extra_args: list, kind: str, path: str | Path) -> int:
    from prep.api.serving import vllm_flag

    found = {name: value for name in PARALLEL_FLAGS[kind] if (value := vllm_flag(extra_args, name)) is not None}
    if len(found) > 1:
        raise RecipeError(path, "extra_args", f"{kind} parallel size given twice ({' and '.join(found)})")
    value = next(iter(found.values()), "1")
    if not value.isdigit() or int(value) < 1:
        raise RecipeError(path, "extra_args", f"{PARALLEL_FLAGS[kind][0]} must be a whole number >= 1, got {value!r}")
    return int(value)


def validate_serve(path: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Any:
    """A serve recipe (prep.api.serving's ServerSpec), and the machines it states against the GPUs vLLM will ask for:
    tensor x pipeline x data parallel sizes must equal nodes x gpus_per_node when the recipe states them (and must
    over several machines), and a server over several machines runs on a Ray cluster (`--distributed-executor-backend
    ray`; docs/SCALING.md's `ray start` commands). Returns the ServerSpec."""
    from prep.api.serving import validate_recipe, vllm_flag

    spec = validate_recipe(path, list(overlays), list(overrides))
    nodes, per_node = getattr(spec, "nodes", 1), getattr(spec, "gpus_per_node", None)
    sizes = {kind: _parallel_size(spec.extra_args, kind, path) for kind in PARALLEL_FLAGS}
    gpus = sizes["tensor"] * sizes["pipeline"] * sizes["data"]
    if nodes < 1:
        raise RecipeError(path, "nodes", f"must be at least 1, got {nodes}")
    if nodes > 1 and per_node is None:
        raise RecipeError(path, "gpus_per_node", f"missing: a server over {nodes} machines must state their GPUs")
    if per_node is not None:
        if per_node < 1:
            raise RecipeError(path, "gpus_per_node", f"must be at least 1, got {per_node}")
        if gpus != nodes * per_node:
            raise RecipeError(path, "extra_args", f"tensor x pipeline x data parallel = {sizes['tensor']} x "
                                                  f"{sizes['pipeline']} x {sizes['data']} = {gpus} GPUs, but the recipe "
                                                  f"states nodes {nodes} x gpus_per_node {per_node} = {nodes * per_node}")
    if nodes > 1:
        backend = vllm_flag(spec.extra_args, "--distributed-executor-backend")
        if backend != "ray":
            raise RecipeError(path, "extra_args", f"a server over {nodes} machines needs --distributed-executor-backend "
                                                  f"ray (got {backend}): vLLM reaches the other machines' GPUs through "
                                                  "the Ray cluster started on them")
        if sizes["data"] > 1 and vllm_flag(spec.extra_args, "--data-parallel-backend") != "ray":
            raise RecipeError(path, "extra_args", "data parallel over several machines needs --data-parallel-backend ray")
    return spec
