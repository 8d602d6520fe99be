"""Stage two: distil the teacher's top-k soft labels into the student with WeightedKDTrainer.

One recipe (recipes/distill/*.yaml, TRL's layout: script, training and model arguments in one file)
holds every knob; overlays and `--set key=value` overrides are composed over it by prep.config, and
the result is handed to TRL's parser as its config (`parse_recipe`, the one boundary where medkd's
spelling becomes TRL's). `train` resumes from the last checkpoint in output_dir and ends by writing
`output_dir/adapter` (LoRA) or `output_dir/model` (a full fine-tune), `output_dir/trainer_state.json` (the
logged curves) and `output_dir/merged` (the model vLLM serves, with the base's tokenizer files and chat
template). A resume happens only into the same run: `claim_run` refuses checkpoints made under another
composed recipe, other soft labels or another starting model (--fresh starts over). The command is
`python -m launch.distill`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from custom_losses.train.checkpoints import claim_output_dir, complete_checkpoints, mark_finished
from custom_losses.train.merge import base_folder, copy_full_model, merge_adapter
from prep import config as recipe_config
from prep.config import RecipeError, key_source, unknown_key
from prep.digests import files_digest, model_digest
from prep.jsonio import InputError
from prep.paths import resolve_path
from prep.testing.tiny_model import resolve_model

REQUIRED_KEYS = ("model_name_or_path", "dataset_path", "output_dir")
# Recipe keys left out of a run's identity, since they do not change the weights trained: where the run
# lives (output_dir; the data's content is in the identity as its own digest, so its path is not), what is
# logged, saved or tracked, and what is done after training (the merge is redone from the adapter each time).
RESULT_NEUTRAL_KEYS = ("output_dir", "dataset_path", "report_to", "run_name", "logging_steps", "logging_first_step",
                       "save_strategy", "save_steps", "save_total_limit", "merge", "merge_dtype",
                       "dataloader_num_workers")
# The files of a saved `datasets` folder that hold its content: not state.json (a fingerprint that differs
# between two saves of the same rows) nor the cache-*.arrow files `.map` leaves there while training.
DATA_PATTERNS = ("data-*.arrow", "dataset_info.json", "dataset_dict.json")


@dataclass
class DistillArguments:
    dataset_path: str = field(metadata={"help": "prep.stages.softlabels output folder (its `dataset/` DatasetDict) "
                                                "or the dataset folder itself."})
    dataset_train_split: str = field(default="train")
    dataset_eval_split: str | None = field(default=None, metadata={"help": "e.g. validation; None = no evaluation."})
    init_adapter_path: str | None = field(default=None, metadata={
        "help": "Continue training this LoRA adapter (e.g. stage one's) instead of a fresh one."})
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer folder; default: the model's."})
    merge: bool = field(default=True, metadata={
        "help": "Write output_dir/merged for vLLM after training (the merged LoRA, or the full model as saved)."})
    effective_batch_size: int | None = field(default=None, metadata={
        "help": "Rows per optimiser step over all processes = per_device_train_batch_size x "
                "gradient_accumulation_steps x processes; launch.multinode derives gradient_accumulation_steps from "
                "it and the world size and passes it as --set; None keeps the recipe's."})
    merge_dtype: str | None = field(default=None, metadata={
        "help": "Precision of the merged model: bfloat16 | float16 | float32 | auto; default: the dtype the "
                "student is served in (custom_losses.train.merge.served_dtype)."})


def _resolve_paths(data: dict[str, Any]) -> dict[str, Any]:
    recipe_config.resolve_path_keys(data, "distill")
    model = data.get("model_name_or_path")
    if isinstance(model, str) and model:
        resolved = resolve_model(model)
        local = resolve_path(resolved)
        data["model_name_or_path"] = str(local.absolute()) if local.is_dir() else resolved
    return data


def composed_recipe(recipe: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> dict:
    """The recipe with its overlays and overrides, local paths made absolute: what TRL's parser gets."""
    return _resolve_paths(recipe_config.compose(recipe, list(overlays), list(overrides)))


def parse_recipe(recipe: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = ()):
    """The composed recipe parsed by TRL into (DistillArguments, KDConfig, ModelConfig); RecipeError on a bad key."""
    from trl import ModelConfig, TrlParser

    from custom_losses.kd.trainer import KDConfig

    data = composed_recipe(recipe, overlays, overrides)
    for key in REQUIRED_KEYS:
        if not data.get(key):
            raise RecipeError(recipe, key, "missing (required)")
    parser = TrlParser((DistillArguments, KDConfig, ModelConfig))
    known = sorted({action.dest for action in parser._actions if action.dest != "help"})
    for key in data:
        if key not in known:
            raise RecipeError(key_source(key, recipe, list(overlays), list(overrides)), key, unknown_key(key, known))

    def refuse(message: str) -> NoReturn:   # argparse's own error() prints the whole usage and exits
        bad = re.search(r"argument --([\w]+)", message)
        key = bad[1] if bad else None
        problem = message.split(": ", 1)[1] if bad and ": " in message else message
        raise RecipeError(key_source(key, recipe, list(overlays), list(overrides)), key, problem)

    parser.error = refuse
    parser.set_defaults_with_config(**data)
    try:
        script_args, training_args, model_args = parser.parse_args_into_dataclasses(args=[])
    except ValueError as err:  # the dataclasses' own range and consistency checks
        if isinstance(err, RecipeError):
            raise
        raise RecipeError(recipe, None, str(err).strip().splitlines()[0]) from None
    _check_lm_head_lora(model_args, recipe, overlays, overrides)
    return script_args, training_args, model_args


def _check_lm_head_lora(model_args, recipe: str | Path, overlays: Sequence[str | Path],
                        overrides: Sequence[str] = ()) -> None:
    """The trainer's refusal (custom_losses.kd.trainer.kd_head_route), made before anything loads: a LoRA on lm_head
    trains through the KD loss only as one weight W + B @ A, which dropout on its input rules out."""
    targets = model_args.lora_target_modules or []
    targets = [targets] if isinstance(targets, str) else targets
    if model_args.use_peft and any(t.split(".")[-1] == "lm_head" for t in targets) and model_args.lora_dropout > 0:
        raise RecipeError(key_source("lora_dropout", recipe, list(overlays), list(overrides)), "lora_dropout",
                          f"{model_args.lora_dropout} with lm_head in lora_target_modules: the KD loss trains a LoRA "
                          f"on lm_head only without dropout; set lora_dropout: 0 or leave lm_head out")


def validate_recipe(path: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> str:
    """Parse a distill recipe (or an overlay, over every full recipe) into its dataclasses; returns a note.

    TrainingArguments refuses bf16 without a GPU, so on a CPU machine the check runs with bf16 off
    and use_cpu on: every key and type is still validated.
    """
    import torch

    path = resolve_path(path)
    if path.parent.name == "overrides":
        recipes = sorted(path.parent.parent.glob("*.yaml"))
        return "; ".join(f"{recipe.name}: {validate_recipe(recipe, [path, *overlays], overrides)}"
                         for recipe in recipes)
    cpu = [] if torch.cuda.is_available() else ["bf16=false", "use_cpu=true"]
    _, training_args, model_args = parse_recipe(path, overlays, [*overrides, *cpu])
    return f"distill {model_args.model_name_or_path} -> {training_args.output_dir}"


def softlabel_folder(path: str) -> Path:
    """The `datasets` folder prep.stages.softlabels wrote under PATH (or PATH itself)."""
    folder = Path(path)
    if (folder / "dataset").is_dir():
        folder = folder / "dataset"
    if not folder.is_dir():
        raise InputError(path, None, "soft-label dataset folder not found (run python -m launch.softlabels first)")
    return folder


def dataset_digest(folder: Path) -> str:
    """A digest of a saved dataset's content (DATA_PATTERNS files), each file read once per change
    (prep.digests.DigestCache: a dataset of many GB costs a stat per file on every launch and resume)."""
    paths = sorted(path for pattern in DATA_PATTERNS for path in folder.rglob(pattern) if path.is_file())
    return files_digest((str(path.relative_to(folder)), path) for path in paths)


def starting_model(model_name_or_path: str) -> str:
    """What the student starts from: a local model folder's content digest (a model retrained in place is
    another start), else the model's hub name, which the recipe already holds."""
    folder = Path(model_name_or_path)
    return f"model {model_digest(folder)}" if folder.is_dir() else model_name_or_path


def claim_run(recipe: str | Path, overlays: Sequence[str | Path], overrides: Sequence[str], fresh: bool = False,
              log: Callable[[str], None] = lambda m: print(m, flush=True)) -> list[Path]:
    """Before the model loads: the checkpoints this run may resume from. Its identity (the composed recipe but
    RESULT_NEUTRAL_KEYS, the soft labels' content digest, the starting model's) is recorded in output_dir's run
    record (prep.digests.RUN_RECORD); checkpoints of another identity raise ResumeRefused, which names --fresh."""
    data = composed_recipe(recipe, overlays, overrides)
    identity = {"recipe": {key: value for key, value in data.items() if key not in RESULT_NEUTRAL_KEYS},
                "soft-label data": dataset_digest(softlabel_folder(data["dataset_path"])),
                "starting model": starting_model(str(data["model_name_or_path"]))}
    return claim_output_dir(Path(data["output_dir"]), identity, fresh, lambda message: log(f"[distill] {message}"),
                            dataset_path=str(data["dataset_path"]))


def load_softlabel_dataset(path: str):
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(softlabel_folder(path)))
    return dataset if isinstance(dataset, DatasetDict) else DatasetDict({"train": dataset})


def teacher_temperature_of(dataset, path: str) -> float:
    temperatures = set(dataset.unique("temperature")) if "temperature" in dataset.column_names else {1.0}
    if len(temperatures) != 1:
        raise InputError(path, None, f"soft labels mix teacher temperatures {sorted(temperatures)}; make them "
                                     f"with one recipe")
    return float(temperatures.pop())


def load_student(model_args, script_args, tokenizer_source: str):
    """The student with LoRA/QLoRA per the recipe (or a stage-one adapter to continue)."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
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


def kd_features(dataset, splits: list[str], tokenizer, weights):
    """Each split's rows -> input ids, labels and the answer positions' soft labels and weights."""
    from datasets import DatasetDict

    from custom_losses.kd.trainer import build_kd_features

    return DatasetDict({
        split: dataset[split].map(lambda row: build_kd_features(row, tokenizer, weights),
                                  remove_columns=dataset[split].column_names, desc=f"KD features ({split})")
        for split in splits
    })


def check_lengths(features, rows, split: str, max_length: int | None, path: str) -> None:
    """InputError when a case (chat template + answer) is longer than max_length: packing cannot place it and an
    unpacked row would run past the length every memory figure assumes. Nothing is truncated or dropped."""
    if max_length is None:
        return
    lengths = [len(ids) for ids in features["input_ids"]]
    too_long = [(index, length) for index, length in enumerate(lengths) if length > max_length]
    if too_long:
        index, length = max(too_long, key=lambda item: item[1])
        case = rows[index]["id"] if "id" in rows.column_names else f"row {index}"
        raise InputError(path, None, f"{len(too_long)} case(s) of split '{split}' exceed max_length {max_length} with "
                                     f"the chat template and answer (longest: id {case}, {length} tokens); raise "
                                     f"max_length or shorten them in prep", "messages")


def topk_width(split) -> int:
    """Alternatives per position the collator makes room for: the rows' k (rows are ragged: a position keeps only
    its real candidates), or the widest stored position for rows written before the k column."""
    if "k" in split.column_names and len(split):
        return int(max(split["k"]))
    return max((len(ids) for row in split["target_token_ids"] for ids in row), default=1)


def build_trainer(script_args, training_args, model_args):
    """The WeightedKDTrainer over the soft-label dataset; InputError when the dataset does not match the recipe."""
    from custom_losses.kd.packing import PackedDataset
    from custom_losses.kd.trainer import KDDataCollator, WeightedKDTrainer

    dataset = load_softlabel_dataset(script_args.dataset_path)
    splits = [split for split in (script_args.dataset_train_split, script_args.dataset_eval_split) if split]
    for split in splits:
        if split not in dataset:
            raise InputError(script_args.dataset_path, None, f"no '{split}' split (has {list(dataset)})")
        if training_args.case_weight == "agreement" and "agreement" not in dataset[split].column_names:
            raise InputError(script_args.dataset_path, None, f"split '{split}' has no 'agreement' column, which "
                             f"case_weight: agreement needs (soft labels made before prep.stages.softlabels wrote it): make "
                             f"them again, or set case_weight: none", "agreement")
    train_split, eval_split = script_args.dataset_train_split, script_args.dataset_eval_split
    tokenizer_source = script_args.tokenizer_path or model_args.model_name_or_path
    from transformers import AutoTokenizer, set_seed

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    features = kd_features(dataset, splits, tokenizer, training_args.weight_config())
    for split in splits:  # before the model loads: a long case is a data problem, found in seconds
        check_lengths(features[split], dataset[split], split, training_args.max_length, script_args.dataset_path)
    # TRL's SFTTrainer draws a fresh LoRA's initial weights before Trainer.__init__ seeds anything: without
    # this, two runs of one recipe start from different adapters and differ from the first step on.
    set_seed(training_args.seed)
    model, tokenizer, peft_config = load_student(model_args, script_args, tokenizer_source)
    if training_args.kd_packing:  # bins of whole cases, fixed for the run (the sampler shuffles the bins)
        features = {split: PackedDataset(features[split], training_args.max_length) for split in splits}
    top_k = topk_width(dataset[train_split])
    collator = KDDataCollator(tokenizer.pad_token_id, top_k, padding_free=training_args.kd_padding_free)
    trainer = WeightedKDTrainer(
        model=model, args=training_args, train_dataset=features[train_split],
        eval_dataset=features[eval_split] if eval_split else None,
        data_collator=collator, processing_class=tokenizer,
        peft_config=peft_config,
        teacher_temperature=teacher_temperature_of(dataset[train_split], script_args.dataset_path),
    )
    return trainer, tokenizer, bool(peft_config or script_args.init_adapter_path)


def train(script_args, training_args, model_args, log: Callable[[str], None] = lambda m: print(m, flush=True)) -> Path:
    """Train (resuming from output_dir's last checkpoint), save the adapter (LoRA) or the weights (full fine-tune)
    and write output_dir/merged, the model vLLM serves; returns output_dir."""
    trainer, tokenizer, is_adapter = build_trainer(script_args, training_args, model_args)
    packed = trainer.train_dataset
    if training_args.kd_packing:
        log(f"[distill] packed {len(packed.lengths)} cases into {len(packed)} rows of <= {training_args.max_length} "
            f"tokens ({sum(packed.lengths) / (len(packed) * training_args.max_length):.0%} full)")
    output_dir = Path(training_args.output_dir)
    complete = complete_checkpoints(output_dir, lambda message: log(f"[distill] {message}"))
    last = str(complete[-1]) if complete else None
    if last:
        log(f"[distill] resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    trainer.save_state()  # output_dir/trainer_state.json: every logged step, for the report's curves (prep.eval.curves)
    # A LoRA run saves its adapter, a full fine-tune its weights (ZeRO-3/FSDP gather them for the save).
    saved = output_dir / ("adapter" if is_adapter else "model")
    trainer.save_model(str(saved))
    tokenizer.save_pretrained(str(saved))
    if trainer.accelerator.is_main_process and script_args.merge:
        if is_adapter:
            merged = merge_adapter(saved, model_args.model_name_or_path, output_dir / "merged",
                                   script_args.merge_dtype, script_args.tokenizer_path)
        else:  # already a whole model: merged/ is it plus the base's tokenizer files, as stage one's full recipe
            base = base_folder(script_args.tokenizer_path or model_args.model_name_or_path)
            merged = copy_full_model(saved, base, output_dir / "merged", lambda message: log(message))
        log(f"[distill] wrote {saved} and {merged}")
    if trainer.accelerator.is_main_process:
        mark_finished(output_dir)
    return output_dir
