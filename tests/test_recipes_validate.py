"""Every file under recipes/ loads and validates (torchtune's "every config validates").

Files are discovered by folder, so a new recipe is picked up without touching this test:
  sft/*.yaml              Axolotl configs: Axolotl's own validation for the GPUs they are written for,
                          and no key Axolotl would silently ignore (a typo)
  sft/overrides/*.yaml    overlays: merged over every sft recipe, then Axolotl's validation for a CPU
  deepspeed/*.json        DeepSpeed configs: JSON with a ZeRO stage, referenced by an sft recipe
  accelerate/*.yaml       accelerate launch configs: YAML with the keys accelerate needs
  serve/*.yaml            launch.vllm_server.load_server_spec
  teacher/, predict/, distill/, pipeline/ and anything new: the owning module's validate_recipe(path)
                          or its recipe schema when importable, else parsed and reported as skipped
Also here: the SFT recipes agree on the data, template and masking keys; their headers name the GPUs,
the estimator's prediction and the launch command; their LoRA rank fits the vLLM serve recipe.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

from custom_losses.sft_config import compose
from tests.sft_fixtures import axolotl_checks
from prep.paths import REPO_ROOT

RECIPES = REPO_ROOT / "recipes"
ALL_FILES = sorted(p for p in RECIPES.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))
SFT_RECIPES = sorted(p for p in (RECIPES / "sft").glob("*.yaml"))
SFT_OVERLAYS = sorted((RECIPES / "sft" / "overrides").glob("*.yaml"))
GPU = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_90"}
CPU = {"bf16": False, "fp8": False, "tf32": False, "n_gpu": 1, "compute_capability": None}
# Recipe folders owned by other modules: (module, validator function, recipe dataclass, applies to) tried
# in order; the first candidate that applies to a file validates it. (launch.distill's parse_recipe
# builds TrainingArguments, which refuses bf16 on a CPU, so distill recipes need a validate_recipe.)
OWNERS = {
    "softlabels": [("prep.softlabels", "validate_recipe", "SoftLabelRecipe", lambda data: True)],
    "teacher": [("prep.teacher", "validate_recipe", "TeacherRecipe", lambda data: True)],
    "predict": [("prep.predict", "validate_recipe", "PredictRecipe", lambda data: True)],
    "distill": [("custom_losses.distill", "validate_recipe", None, lambda data: True)],
    "pipeline": [("prep.pipeline", "validate_recipe", "PipelineRecipe", lambda data: True)],
}

def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def gpus_for(config: dict) -> int:
    return 4 if config.get("deepspeed") else 1


@pytest.fixture(scope="module")
def axolotl_results() -> dict[str, dict]:
    """One Axolotl process validates every SFT recipe (as written) and every overlay over every recipe."""
    jobs = []
    for recipe in SFT_RECIPES:
        config = compose(recipe)
        jobs.append({"label": rel(recipe), "kind": "validate", "config": config, "strict_keys": True,
                     "capabilities": {**GPU, "n_gpu": gpus_for(config)}})
    for overlay in SFT_OVERLAYS:
        jobs.append({"label": f"{rel(overlay)}:keys", "kind": "known_keys", "keys": list(yaml.safe_load(overlay.read_text()) or {})})
        for recipe in SFT_RECIPES:
            # DeepSpeed hard-codes NCCL: a CPU run of a DeepSpeed recipe drops it, as the overlay's header says.
            config = compose(recipe, [overlay], ["deepspeed=null"] if compose(recipe).get("deepspeed") else [])
            jobs.append({"label": f"{rel(overlay)}+{rel(recipe)}", "kind": "validate", "config": config,
                         "capabilities": CPU, "report": ["lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel",
                                                         "lora_embedding_kernel", "attn_implementation", "bf16"]})
    # What Axolotl does with a row longer than sequence_len, by default and with the recipes' key.
    for strategy in ("drop", "raise"):
        jobs.append({"label": f"excess:{strategy}", "kind": "excess_length", "lengths": [300, 5000],
                     "sequence_len": 4096, "strategy": strategy})
    return axolotl_checks(jobs)


def check_owned(path: Path, folder: str, data: dict) -> str | None:
    """Validate with the owning module; returns a skip reason when no validator is importable."""
    module_name, validator_name, schema_name, _ = next(c for c in OWNERS[folder] if c[3](data))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        return f"{module_name} not importable ({err})"
    validator = getattr(module, validator_name, None)
    if validator is not None:
        validator(path)
        return None
    schema = getattr(module, schema_name, None) if schema_name else None
    if schema is not None:
        from prep.config import load_recipe

        load_recipe(schema, path)
        return None
    return f"{module_name} has no {validator_name}()" + (f" or {schema_name}" if schema_name else "")


@pytest.mark.parametrize("path", ALL_FILES, ids=rel)
def test_every_recipe_file_validates(path: Path, axolotl_results):
    parts = path.relative_to(RECIPES).parts
    folder = parts[0] if len(parts) > 1 else ""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)   # every file at least parses
    assert isinstance(data, dict), f"{rel(path)}: not a mapping"

    if folder == "sft" and len(parts) == 2:
        result = axolotl_results[rel(path)]
        assert result["ok"], f"{rel(path)}: Axolotl rejects it: {result.get('error')}"
        assert result["unknown_keys"] == [], f"{rel(path)}: keys Axolotl would silently ignore: {result['unknown_keys']}"
    elif folder == "sft" and parts[1] == "overrides":
        assert axolotl_results[f"{rel(path)}:keys"]["unknown_keys"] == [], f"{rel(path)}: unknown Axolotl keys"
        for recipe in SFT_RECIPES:
            result = axolotl_results[f"{rel(path)}+{rel(recipe)}"]
            assert result["ok"], f"{rel(path)} over {rel(recipe)}: Axolotl rejects it: {result.get('error')}"
            values = result["values"]
            assert [values[k] for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")] \
                == [False] * 4, "the CUDA-only LoRA kernels must be off on a CPU"
            assert values["attn_implementation"] == "eager" and not values.get("bf16")
    elif folder == "deepspeed":
        stage = data["zero_optimization"]["stage"]
        assert stage in (0, 1, 2, 3)
        users = [r for r in SFT_RECIPES if Path(str(compose(r).get("deepspeed"))).name == path.name]
        assert users, f"{rel(path)}: no sft recipe uses it"
    elif folder == "accelerate":
        from accelerate.commands.config.config_args import load_config_from_file

        config = load_config_from_file(str(path))                   # accelerate's own loader and enums
        assert config.num_processes >= 1 and config.use_cpu is False
        assert str(config.mixed_precision) == "no", "precision comes from the Axolotl recipe, not from here"
    elif folder == "serve":
        from prep.serving import load_server_spec

        spec = load_server_spec(path)
        assert spec.model
    elif folder in OWNERS:  # the owner validates overlays in subfolders too (launch.distill does)
        reason = check_owned(path, folder, data)
        if reason:
            pytest.skip(f"{rel(path)} parses; {reason}")
    else:
        pytest.skip(f"{rel(path)} parses; no validator for recipes/{'/'.join(parts[:-1])}/")


# ---- SFT recipes: what they must agree on ---------------------------------------------------------

@pytest.mark.parametrize("recipe", SFT_RECIPES, ids=rel)
def test_sft_recipe_data_template_and_masking_keys(recipe: Path):
    config = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    assert config["chat_template"] == "tokenizer_default", "render with the base model's own template"
    assert config["train_on_inputs"] is False
    for key, split in (("datasets", "train"), ("test_datasets", "valid")):
        (dataset,) = config[key]
        assert dataset["path"] == f"runs/stage1/teacher/sft/{split}.jsonl", "prep.teacher --out runs/stage1/teacher writes here"
        assert dataset["type"] == "chat_template" and dataset["field_messages"] == "messages"
        assert dataset["roles_to_train"] == ["assistant"] and dataset["train_on_eos"] == "turn"
    assert config["output_dir"] == "runs/stage1/sft" and config["dataset_prepared_path"].startswith("runs/stage1/sft/")
    # Longest real case ~1.8k tokens with the prompts, +800 for an answer: 4096 holds it; never drop silently.
    assert config["sequence_len"] >= 4096 and config["excess_length_strategy"] == "raise"
    assert config["sample_packing"] is True and config["gradient_checkpointing"] is True
    assert config["bf16"] is True and config["attn_implementation"] == "flash_attention_2"
    assert "axolotl.integrations.liger.LigerPlugin" in config["plugins"]
    assert config["auto_resume_from_checkpoints"] is True
    if config.get("adapter"):
        assert config["lora_target_linear"] is True
    if config.get("adapter") == "qlora":
        assert config["load_in_4bit"] is True
        assert config["bnb_config_kwargs"] == {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}


def test_sft_recipes_cover_the_three_methods():
    methods = {(c.get("adapter"), bool(c.get("load_in_4bit")), Path(str(c.get("deepspeed"))).name)
               for c in (yaml.safe_load(p.read_text()) for p in SFT_RECIPES)}
    assert ("qlora", True, "None") in methods                  # one GPU, 4-bit
    assert ("lora", False, "zero2.json") in methods            # several GPUs, bf16, ZeRO-2
    assert (None, False, "zero3_bf16.json") in methods         # full fine-tune, ZeRO-3


def test_cpu_overlay_changes_only_what_the_hardware_or_fixture_forces():
    allowed = {"base_model", "bf16", "fp16", "tf32", "attn_implementation", "lora_mlp_kernel", "lora_qkv_kernel",
               "lora_o_kernel", "lora_embedding_kernel", "plugins", "lora_target_modules", "sequence_len",
               "gradient_accumulation_steps", "optimizer", "learning_rate", "max_steps", "evals_per_epoch",
               "saves_per_epoch", "save_steps", "dataset_num_proc", "dataloader_num_workers",
               "dataloader_pin_memory", "dataloader_prefetch_factor"}
    for overlay in SFT_OVERLAYS:
        keys = set(yaml.safe_load(overlay.read_text()) or {})
        assert keys <= allowed, f"{rel(overlay)} changes {sorted(keys - allowed)}: data, template and masking stay the recipe's"


@pytest.mark.parametrize("recipe", SFT_RECIPES, ids=rel)
def test_sft_recipe_header_names_gpus_memory_and_launch(recipe: Path):
    from custom_losses.memory import estimate_config

    header = "".join(line for line in recipe.read_text(encoding="utf-8").splitlines(keepends=True) if line.startswith("#"))
    assert re.search(r"^# GPUs: ", header, re.M)
    assert f"bash launch/sft.sh {rel(recipe)}" in header, "the command that launches it"
    assert "runs/<run>/teacher/sft/" in header and "runs/<run>/sft/" in header, "the run-folder convention"
    predictions = re.findall(r"^#\s+(\d+) GPUs?: ([0-9.]+) GiB", header, re.M)
    assert predictions, "the memory the estimator predicts, as '#   N GPU(s): X GiB'"
    config = compose(recipe)
    for gpus, stated in predictions:
        predicted = estimate_config(config, int(gpus)).total
        assert abs(predicted - float(stated)) <= 0.1, f"header says {stated} GiB on {gpus} GPU(s); the estimator says {predicted:.1f}"


def test_lora_rank_fits_the_vllm_serve_recipe():
    serve = yaml.safe_load((RECIPES / "serve" / "qwen2.5-7b-student-1gpu.yaml").read_text())
    for recipe in SFT_RECIPES:
        config = yaml.safe_load(recipe.read_text())
        if config.get("adapter"):
            assert config["lora_r"] <= serve["max_lora_rank"], f"{rel(recipe)}: vLLM's --max-lora-rank must be >= lora_r"


def test_over_long_rows_stop_preprocessing_instead_of_vanishing(axolotl_results):
    # Axolotl's default drops a too-long row with nothing but a log line: one training case gone.
    assert axolotl_results["excess:drop"] == {"ok": True, "kept": 1}
    # The recipes' `excess_length_strategy: raise` (asserted above for each) makes the same row an error.
    assert "exceeds the maximum 4096" in axolotl_results["excess:raise"]["raised"]
