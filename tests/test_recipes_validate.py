"""Every file under recipes/ loads and validates (torchtune's "every config validates").

Files are discovered by folder, so a new recipe is picked up without touching this test, and each is
validated by the validator custom_losses.pipeline.catalogue names for its folder: the same call the pipeline's preflight
makes. A recipes/ folder the catalogue does not know fails here. Overlays (`<folder>/overrides/*.yaml`)
are validated merged over every recipe of their folder. On top of that:
  sft/*.yaml              Axolotl's own validation for the GPUs they are written for, and no key Axolotl
                          would silently ignore (a typo)
  sft/overrides/*.yaml    merged over every sft recipe, then Axolotl's validation for a CPU
  deepspeed/*.json        referenced by an sft recipe
Also here: the SFT recipes agree on the data, template and masking keys; their headers name the GPUs,
the estimator's prediction and the launch command; their LoRA rank fits the vLLM serve recipe.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from custom_losses.pipeline import catalogue
from custom_losses.train.sft_config import compose
from prep.paths import REPO_ROOT
from tests.sft_fixtures import axolotl_checks

RECIPES = REPO_ROOT / "recipes"
ALL_FILES = sorted(p for p in RECIPES.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))
SFT_RECIPES = sorted(p for p in (RECIPES / "sft").glob("*.yaml"))
SFT_OVERLAYS = sorted((RECIPES / "sft" / catalogue.OVERLAY_FOLDER).glob("*.yaml"))
# The CPU overlays (cpu-*.yaml) are checked as CPU runs here; GPU overlays (sdpa.yaml, the attention fallback) only
# for their keys here, and against GPU capabilities by tests/test_doctor.py.
SFT_CPU_OVERLAYS = sorted((RECIPES / "sft" / catalogue.OVERLAY_FOLDER).glob("cpu-*.yaml"))
# medkd's own keys in an Axolotl recipe, read by medkd and left alone by Axolotl: the effective batch that
# launch.multinode keeps when the GPU count changes (custom_losses.train.launcher.batch_plan).
MEDKD_SFT_KEYS = {"effective_batch_size"}
GPU = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_90"}
CPU = {"bf16": False, "fp8": False, "tf32": False, "n_gpu": 1, "compute_capability": None}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def gpus_for(config: dict) -> int:
    return 4 if config.get("deepspeed") else 1


def cpu_overrides(recipe: Path) -> list[str]:
    """DeepSpeed hard-codes NCCL: a CPU run of a DeepSpeed recipe drops it, as the CPU overlay's header says."""
    return ["deepspeed=null"] if compose(recipe).get("deepspeed") else []


@pytest.fixture(scope="module")
def axolotl_results() -> dict[str, dict]:
    """One Axolotl process validates every SFT recipe (as written) and every overlay over every recipe."""
    jobs = []
    for recipe in SFT_RECIPES:
        config = compose(recipe)
        jobs.append({"label": rel(recipe), "kind": "validate", "config": config, "strict_keys": True,
                     "capabilities": {**GPU, "n_gpu": gpus_for(config)}})
    for overlay in SFT_OVERLAYS:
        keys = list(yaml.safe_load(overlay.read_text()) or {})
        jobs.append({"label": f"{rel(overlay)}:keys", "kind": "known_keys", "keys": keys})
    for overlay in SFT_CPU_OVERLAYS:
        for recipe in SFT_RECIPES:
            config = compose(recipe, [overlay], cpu_overrides(recipe))
            jobs.append({"label": f"{rel(overlay)}+{rel(recipe)}", "kind": "validate", "config": config,
                         "capabilities": CPU, "report": ["lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel",
                                                         "lora_embedding_kernel", "attn_implementation", "bf16"]})
    # What Axolotl does with a row longer than sequence_len, by default and with the recipes' key.
    for strategy in ("drop", "raise"):
        jobs.append({"label": f"excess:{strategy}", "kind": "excess_length", "lengths": [300, 5000],
                     "sequence_len": 4096, "strategy": strategy})
    return axolotl_checks(jobs)


def folder_recipes(folder: str) -> list[Path]:
    return sorted(p for p in (RECIPES / folder).glob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))


@pytest.mark.parametrize("path", ALL_FILES, ids=rel)
def test_every_recipe_file_validates(path: Path):
    folder = catalogue.recipe_folder(path)
    assert folder in catalogue.FOLDERS, f"{rel(path)}: recipes/{folder}/ has no validator in custom_losses.pipeline.catalogue"
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)   # every file at least parses
    assert isinstance(data, dict), f"{rel(path)}: not a mapping"
    if catalogue.is_overlay(path):
        recipes = folder_recipes(folder)
        assert recipes, f"{rel(path)}: an overlay with no recipe in recipes/{folder}/ to lay it over"
        for recipe in recipes:
            extra = cpu_overrides(recipe) if folder == "sft" else []
            catalogue.validate(folder, recipe, overlays=[path], overrides=extra)
    else:
        catalogue.validate(folder, path)


def test_every_catalogue_entry_names_a_function():
    assert set(catalogue.FOLDERS) == set(catalogue._validators())
    for folder in catalogue.FOLDERS:
        assert callable(catalogue.validator(folder)), folder
    with pytest.raises(KeyError, match=r"recipes/nope/ has no validator"):
        catalogue.validator("nope")


@pytest.mark.integration
@pytest.mark.parametrize("recipe", SFT_RECIPES, ids=rel)
def test_sft_recipe_passes_axolotl_validation(recipe: Path, axolotl_results):
    result = axolotl_results[rel(recipe)]
    assert result["ok"], f"{rel(recipe)}: Axolotl rejects it: {result.get('error')}"
    unknown = [key for key in result["unknown_keys"] if key not in MEDKD_SFT_KEYS]
    assert unknown == [], f"{rel(recipe)}: keys Axolotl would silently ignore: {unknown}"


@pytest.mark.integration
@pytest.mark.parametrize("overlay", SFT_OVERLAYS, ids=rel)
def test_sft_overlay_keys_are_axolotls(overlay: Path, axolotl_results):
    assert axolotl_results[f"{rel(overlay)}:keys"]["unknown_keys"] == [], f"{rel(overlay)}: unknown Axolotl keys"


@pytest.mark.integration
@pytest.mark.parametrize("overlay", SFT_CPU_OVERLAYS, ids=rel)
def test_sft_cpu_overlay_passes_axolotl_validation_over_every_recipe(overlay: Path, axolotl_results):
    for recipe in SFT_RECIPES:
        result = axolotl_results[f"{rel(overlay)}+{rel(recipe)}"]
        assert result["ok"], f"{rel(overlay)} over {rel(recipe)}: Axolotl rejects it: {result.get('error')}"
        values = result["values"]
        kernels = [values[k] for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")]
        assert kernels == [False] * 4, "the CUDA-only LoRA kernels must be off on a CPU"
        assert values["attn_implementation"] == "eager" and not values.get("bf16")


@pytest.mark.parametrize("path", sorted((RECIPES / "deepspeed").glob("*.json")), ids=rel)
def test_deepspeed_config_is_used_by_an_sft_recipe(path: Path):
    users = [r for r in SFT_RECIPES if Path(str(compose(r).get("deepspeed"))).name == path.name]
    assert users, f"{rel(path)}: no sft recipe uses it"


@pytest.mark.parametrize("bad,message", [
    ('{"zero_optimization": {"stage": 4}}', "key 'zero_optimization.stage': must be 0, 1, 2 or 3, got 4"),
    ('{"zero_optimization": {"stage": 2},}', "not valid JSON at line 1"),
    ("[1]", "a JSON recipe must be a JSON object"),
])
def test_deepspeed_validator_names_the_problem(tmp_path, bad, message):
    path = tmp_path / "zero.json"
    path.write_text(bad, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(message)):
        catalogue.validate("deepspeed", path)


def test_accelerate_validator_refuses_precision_and_cpu(tmp_path):
    single = RECIPES / "accelerate" / "single-gpu.yaml"
    with pytest.raises(ValueError, match="key 'mixed_precision': must be 'no'"):
        catalogue.validate("accelerate", single, overrides=["mixed_precision=bf16"])
    with pytest.raises(ValueError, match="key 'use_cpu': must be false"):
        catalogue.validate("accelerate", single, overrides=["use_cpu=true"])
    with pytest.raises(ValueError, match="accelerate cannot load it"):
        catalogue.validate("accelerate", single, overrides=["num_procesess=2"])


def test_multi_node_accelerate_configs_split_their_processes_and_meet_at_one_address():
    for name in ("multi-node.yaml", "fsdp2.yaml"):
        config = yaml.safe_load((RECIPES / "accelerate" / name).read_text())
        assert config["num_processes"] % config["num_machines"] == 0
        assert config["rdzv_backend"] == "static" and config["same_network"] is True
    assert yaml.safe_load((RECIPES / "accelerate" / "multi-node.yaml").read_text())["num_machines"] > 1
    fsdp = yaml.safe_load((RECIPES / "accelerate" / "fsdp2.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["num_machines"] == 1, "one machine unless the launcher passes --num_machines"
    multi = RECIPES / "accelerate" / "multi-node.yaml"
    with pytest.raises(ValueError, match=r"key 'num_processes': 15 processes do not split evenly over 2 machines"):
        catalogue.validate("accelerate", multi, overrides=["num_processes=15"])
    with pytest.raises(ValueError, match=r"key 'same_network': must be false with rdzv_backend c10d"):
        catalogue.validate("accelerate", multi, overrides=["rdzv_backend=c10d"])
    catalogue.validate("accelerate", multi, overrides=["rdzv_backend=c10d", "same_network=false"])


SERVE_RECIPES = sorted((RECIPES / "serve").glob("*.yaml"))


def parallel(spec, flag: str) -> int:
    from prep.api.serving import vllm_flag

    return int(vllm_flag(spec.extra_args, flag) or 1)


@pytest.mark.parametrize("recipe", [r for r in SERVE_RECIPES if (yaml.safe_load(r.read_text()).get("nodes") or 1) > 1],
                         ids=rel)
def test_teacher_over_several_nodes_is_tensor_x_pipeline_parallel_on_ray(recipe: Path):
    spec = catalogue.validate("serve", recipe)
    tensor, pipeline = parallel(spec, "--tensor-parallel-size"), parallel(spec, "--pipeline-parallel-size")
    assert tensor * pipeline == spec.nodes * spec.gpus_per_node
    assert tensor == spec.gpus_per_node and pipeline == spec.nodes, "tensor parallel inside a node, pipeline across"
    header = "".join(line for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"ray start --head --port=6379 --num-gpus={spec.gpus_per_node}" in header
    assert f"ray start --address=HEAD_IP:6379 --num-gpus={spec.gpus_per_node}" in header
    assert f"python -m launch.serve --config {rel(recipe)}" in header


def test_several_node_recipes_exist_and_the_8_gpu_predict_server_uses_every_gpu():
    several = [r.name for r in SERVE_RECIPES if (yaml.safe_load(r.read_text()).get("nodes") or 1) > 1]
    assert {"qwen2.5-72b-instruct-2x4-ray.yaml", "deepseek-v3-2x8-ray.yaml"} <= set(several)
    spec = catalogue.validate("serve", RECIPES / "serve" / "qwen2.5-7b-student-dp8.yaml")
    assert parallel(spec, "--data-parallel-size") == 8 == spec.gpus_per_node and spec.nodes == 1
    assert parallel(spec, "--tensor-parallel-size") == 1


@pytest.mark.parametrize("overrides,message", [
    (["gpus_per_node=4"], r"tensor x pipeline x data parallel = 8 x 2 x 1 = 16 GPUs, but the recipe states nodes 2 x "
                          r"gpus_per_node 4 = 8"),
    (["extra_args.5=mp"], r"a server over 2 machines needs --distributed-executor-backend ray \(got mp\)"),
    (["gpus_per_node=null"], r"key 'gpus_per_node': missing: a server over 2 machines must state their GPUs"),
    (["extra_args.3=two"], r"--pipeline-parallel-size must be a whole number >= 1, got 'two'"),
    (["extra_args.2=-tp"], r"key 'extra_args': tensor parallel size given twice \(--tensor-parallel-size and -tp\)"),
])
def test_serve_validator_holds_the_parallel_sizes_against_the_machines(overrides, message):
    recipe = RECIPES / "serve" / "deepseek-v3-2x8-ray.yaml"
    assert yaml.safe_load(recipe.read_text())["extra_args"][4:6] == ["--distributed-executor-backend", "ray"]
    with pytest.raises(ValueError, match=message):
        catalogue.validate("serve", recipe, overrides=overrides)


# ---- SFT recipes: what they must agree on ---------------------------------------------------------

@pytest.mark.parametrize("recipe", SFT_RECIPES, ids=rel)
def test_sft_recipe_data_template_and_masking_keys(recipe: Path):
    config = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    assert config["chat_template"] == "tokenizer_default", "render with the base model's own template"
    assert config["train_on_inputs"] is False
    for key, split in (("datasets", "train"), ("test_datasets", "valid")):
        (dataset,) = config[key]
        assert dataset["path"] == f"runs/stage1/teacher/sft/{split}.jsonl", "prep.stages.teacher --out runs/stage1/teacher writes here"
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
               "dataloader_pin_memory", "dataloader_prefetch_factor", "use_tensorboard", "wandb_project"}
    for overlay in SFT_CPU_OVERLAYS:
        keys = set(yaml.safe_load(overlay.read_text()) or {})
        assert keys <= allowed, f"{rel(overlay)} changes {sorted(keys - allowed)}: data, template and masking stay the recipe's"


@pytest.mark.parametrize("recipe", SFT_RECIPES, ids=rel)
def test_sft_recipe_header_names_gpus_memory_and_launch(recipe: Path):
    from custom_losses.train.memory import estimate_config

    header = "".join(line for line in recipe.read_text(encoding="utf-8").splitlines(keepends=True) if line.startswith("#"))
    assert re.search(r"^# GPUs: ", header, re.M)
    assert f"python -m launch.sft --config {rel(recipe)}" in header, "the command that launches it"
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


@pytest.mark.integration
def test_over_long_rows_stop_preprocessing_instead_of_vanishing(axolotl_results):
    # Axolotl's default drops a too-long row with nothing but a log line: one training case gone.
    assert axolotl_results["excess:drop"] == {"ok": True, "kept": 1}
    # The recipes' `excess_length_strategy: raise` (asserted above for each) makes the same row an error.
    assert "exceeds the maximum 4096" in axolotl_results["excess:raise"]["raised"]
