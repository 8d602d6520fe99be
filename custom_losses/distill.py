"""Stage two: distil the teacher's top-k soft labels into the student with WeightedKDTrainer.

    accelerate launch --config_file recipes/accelerate/<one>.yaml launch/distill.py \
        --config recipes/distill/qwen2.5-7b-instruct-qlora-1gpu.yaml [--config OVERRIDE.yaml] [--key value ...]

One recipe (TRL's YAML: script, training and model arguments in one file) holds every knob; a
later `--config` layers over an earlier one, and `--key value` flags override both. Re-running
resumes from the last checkpoint in output_dir; the end writes `output_dir/adapter` (LoRA) and
`output_dir/merged` (a full model vLLM can serve, with the tokenizer and its chat template).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from prep.paths import REPO_ROOT



@dataclass
class DistillArguments:
    dataset_path: str = field(metadata={"help": "prep.softlabels output folder (its `dataset/` DatasetDict) or the dataset folder itself."})
    dataset_train_split: str = field(default="train")
    dataset_eval_split: str | None = field(default=None, metadata={"help": "e.g. validation; None = no evaluation."})
    init_adapter_path: str | None = field(default=None, metadata={"help": "Continue training this LoRA adapter (e.g. stage one's) instead of a fresh one."})
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer folder; default: the model's."})
    merge: bool = field(default=True, metadata={"help": "Write output_dir/merged for vLLM after training."})


def parse_recipe(argv: list[str]):
    """TrlParser over (DistillArguments, KDConfig, ModelConfig) with layered --config files."""
    import yaml
    from trl import ModelConfig, TrlParser

    from custom_losses.trainer import KDConfig

    configs, rest, index = [], [], 0
    while index < len(argv):
        if argv[index] == "--config":
            configs.append(argv[index + 1])
            index += 2
        else:
            rest.append(argv[index])
            index += 1
    if not configs:
        raise SystemExit("launch/distill.py needs --config RECIPE (see recipes/distill/)")
    merged: dict = {}
    for path in configs:
        resolved = Path(path) if Path(path).exists() else REPO_ROOT / path
        if not resolved.exists():
            raise SystemExit(f"{path}: recipe file not found")
        merged.update(yaml.safe_load(resolved.read_text(encoding="utf-8")) or {})
    parser = TrlParser((DistillArguments, KDConfig, ModelConfig))
    unknown = parser.set_defaults_with_config(**merged)
    if unknown:
        raise SystemExit(f"{configs[-1]}: unknown recipe keys {unknown}")
    script_args, training_args, model_args = parser.parse_args_into_dataclasses(args=rest)
    from prep.tiny_model import resolve_model

    model_args.model_name_or_path = resolve_model(model_args.model_name_or_path)
    return script_args, training_args, model_args


def validate_recipe(path: str | Path) -> None:
    """Parse a distill recipe (or an overlay, over every full recipe) into its dataclasses.

    TrainingArguments refuses bf16 without a GPU, so on a CPU machine the check runs with bf16 off
    and use_cpu on: every key and type is still validated.
    """
    import torch

    path = Path(path)
    cpu_flags = [] if torch.cuda.is_available() else ["--bf16", "false", "--use_cpu", "true"]
    if path.parent.name == "overrides":
        for recipe in sorted(path.parent.parent.glob("*.yaml")):
            parse_recipe(["--config", str(recipe), "--config", str(path), *cpu_flags])
    else:
        parse_recipe(["--config", str(path), *cpu_flags])


def load_softlabel_dataset(path: str):
    from datasets import DatasetDict, load_from_disk

    folder = Path(path)
    if (folder / "dataset").is_dir():
        folder = folder / "dataset"
    if not folder.is_dir():
        raise SystemExit(f"{path}: soft-label dataset folder not found (run prep.softlabels first)")
    dataset = load_from_disk(str(folder))
    return dataset if isinstance(dataset, DatasetDict) else DatasetDict({"train": dataset})


def teacher_temperature_of(dataset) -> float:
    temperatures = set(dataset.unique("temperature")) if "temperature" in dataset.column_names else {1.0}
    if len(temperatures) != 1:
        raise SystemExit(f"soft labels mix teacher temperatures {sorted(temperatures)}; make them with one recipe")
    return float(temperatures.pop())


def load_student(model_args, script_args, tokenizer_source: str):
    """The student with LoRA/QLoRA per the recipe (or a stage-one adapter to continue)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from accelerate import PartialState
    from trl import get_peft_config, get_quantization_config

    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    quantization = get_quantization_config(model_args)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=dtype, attn_implementation=model_args.attn_implementation,
        # A quantised model must sit whole on this process's GPU (one copy per DDP rank).
        quantization_config=quantization,
        device_map={"": PartialState().local_process_index} if quantization and torch.cuda.is_available() else None,
    )
    peft_config = get_peft_config(model_args)
    if script_args.init_adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, script_args.init_adapter_path, is_trainable=True)
        peft_config = None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    return model, tokenizer, peft_config


def merge_for_vllm(adapter_dir: Path, base_model: str, out_dir: Path, tokenizer) -> Path:
    """Fold the LoRA weights into a full-precision copy of the base model (never into 4-bit weights)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    staging = out_dir.with_name(out_dir.name + ".tmp")
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    from datasets import DatasetDict
    from transformers.trainer_utils import get_last_checkpoint

    from custom_losses.trainer import KDDataCollator, WeightedKDTrainer, build_kd_features

    script_args, training_args, model_args = parse_recipe(sys.argv[1:] if argv is None else argv)
    dataset = load_softlabel_dataset(script_args.dataset_path)
    if script_args.dataset_train_split not in dataset:
        raise SystemExit(f"{script_args.dataset_path}: no '{script_args.dataset_train_split}' split (has {list(dataset)})")
    model, tokenizer, peft_config = load_student(model_args, script_args, script_args.tokenizer_path or model_args.model_name_or_path)
    weights = training_args.weight_config()
    splits = [script_args.dataset_train_split] + ([script_args.dataset_eval_split] if script_args.dataset_eval_split else [])
    features = DatasetDict({
        split: dataset[split].map(lambda row: build_kd_features(row, tokenizer, weights),
                                  remove_columns=dataset[split].column_names, desc=f"KD features ({split})")
        for split in splits
    })
    top_k = max(len(ids) for ids in dataset[script_args.dataset_train_split][0]["target_token_ids"])
    trainer = WeightedKDTrainer(
        model=model, args=training_args, train_dataset=features[script_args.dataset_train_split],
        eval_dataset=features[script_args.dataset_eval_split] if script_args.dataset_eval_split else None,
        data_collator=KDDataCollator(tokenizer.pad_token_id, top_k), processing_class=tokenizer, peft_config=peft_config,
        teacher_temperature=teacher_temperature_of(dataset[script_args.dataset_train_split]),
    )
    output_dir = Path(training_args.output_dir)
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last:
        print(f"[distill] resuming from {last}", flush=True)
    trainer.train(resume_from_checkpoint=last)
    adapter_dir = output_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    if trainer.accelerator.is_main_process and script_args.merge and (peft_config or script_args.init_adapter_path):
        merged = merge_for_vllm(adapter_dir, model_args.model_name_or_path, output_dir / "merged", tokenizer)
        print(f"[distill] wrote {adapter_dir} and {merged}", flush=True)


if __name__ == "__main__":
    main()
