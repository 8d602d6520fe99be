"""Check a stage-one run before any GPU time is spent, and write the config it will run.

`preflight` composes the recipe (custom_losses.train.sft_config), then checks, cheapest first: the
datasets exist and every row is a chat in prep.stages.teacher's layout; the base model is a complete local
folder (or in the HF cache, or reachable) whose chat template is data/qwen2.5_chat_template.jinja;
every row fits the recipe's sequence_len with that template (Axolotl would otherwise drop or, with
`excess_length_strategy: raise`, stop on it mid-run); the GPUs are there and the memory estimator
says the recipe fits them (custom_losses.train.memory.check_fits); the disk holds the checkpoints and the
merged model. Each problem is one sentence naming the file, line or key.

On success it writes <output_dir>/medkd-sft.yaml and returns a Plan: the config, the output folder,
the GPU count and whether to train, resume or do nothing (the same config already trained to the
end). The command is `python -m launch.sft`.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custom_losses.train.checkpoints import ResumeRefused, claim_output_dir, mark_finished
from custom_losses.train.memory import GIB, PreflightError, check_fits, gpu_memories_gib, shape_for
from custom_losses.train.sft_config import COMPOSED_NAME, check_required, compose, write_composed
from prep.digests import DigestCache, default_digest_cache, why_not_current
from prep.jsonio import InputError, iter_json_lines, parse_object_line
from prep.paths import free_gib
from prep.tokenizer import CHAT_TEMPLATE_PATH

__all__ = ["PreflightError", "Plan", "preflight", "mark_done", "chat_template_of", "local_model_folder"]

ROLES = {"system", "user", "assistant", "tool"}
# Keys whose change makes old checkpoints in output_dir belong to another model.
RESUME_KEYS = ("base_model", "adapter", "lora_r", "lora_alpha", "lora_target_linear", "lora_target_modules",
                 "load_in_4bit", "load_in_8bit", "deepspeed")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class Plan:
    config_path: Path
    output_dir: Path
    gpus: int
    status: str                      # train | resume | done
    resume_from: str = ""


# ---- datasets ------------------------------------------------------------------------------------

def read_chat_rows(path: str | Path, field_messages: str = "messages") -> list[tuple[int, dict]]:
    """(line, row) for each row of a chat JSONL in prep.stages.teacher's layout; InputError on the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "dataset file not found (run python -m launch.teacher first, or point the recipe at it)")
    rows = []
    for line, text in iter_json_lines(path):
        row = parse_object_line(path, line, text)
        messages = row.get(field_messages)
        if not isinstance(messages, list) or not messages:
            raise InputError(path, line, "must be a non-empty list of chat messages", field_messages)
        for index, message in enumerate(messages):
            well_formed = isinstance(message, dict) and message.get("role") in ROLES
            if not well_formed or not isinstance(message.get("content"), str):
                raise InputError(path, line, f"message {index} needs a role ({', '.join(sorted(ROLES))}) and a "
                                 f"string content", field_messages)
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise InputError(path, line, "the last message must be a non-empty assistant answer (the training target)",
                             field_messages)
        rows.append((line, row))
    if not rows:
        raise InputError(path, None, "dataset has no rows")
    return rows


def dataset_paths(config: dict[str, Any]) -> list[tuple[str, dict]]:
    found = []
    for key in ("datasets", "test_datasets"):
        for index, dataset in enumerate(config.get(key) or []):
            found.append((f"{key}.{index}", dataset))
    return found


# ---- base model ----------------------------------------------------------------------------------

def same_template(a: str, b: str) -> bool:
    # Jinja drops one trailing newline of a template (keep_trailing_newline=False), so that byte renders nothing.
    return a.removesuffix("\n") == b.removesuffix("\n")


def local_model_folder(base_model: str) -> Path | None:
    """The folder holding BASE_MODEL: itself when local, else its snapshot in the HF cache (None if absent)."""
    folder = Path(base_model)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_model, local_files_only=True))
    except Exception:  # not cached (or not a repo id)
        return None


def check_base_model(base_model: str) -> Path | None:
    """A usable base model folder (None when it will be downloaded by Axolotl); PreflightError otherwise."""
    folder = local_model_folder(base_model)
    if folder is None:
        if Path(base_model).is_absolute() or base_model.startswith((".", "runs/")):
            raise PreflightError(f"base_model {base_model}: folder not found")
        if os.environ.get("HF_HUB_OFFLINE", "0") == "1":
            raise PreflightError(f"base_model {base_model}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                                 f"download it first or run with HF_HUB_OFFLINE=0")
        try:
            from huggingface_hub import model_info

            model_info(base_model, timeout=15)
        except Exception as err:  # unreachable hub, unknown repo, gated without token
            raise PreflightError(f"base_model {base_model}: not cached and the hub did not answer "
                                 f"({type(err).__name__})") from None
        return None
    if not (folder / "config.json").is_file():
        raise PreflightError(f"base_model {folder}: no config.json")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise PreflightError(f"base_model {folder}: no weight files (*.safetensors or *.bin)")
    for name in TOKENIZER_FILES:
        if not (folder / name).is_file():
            raise PreflightError(f"base_model {folder}: tokenizer file {name} missing")
    template = chat_template_of(folder)
    if template is None or not same_template(template, CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")):
        raise PreflightError(f"base_model {folder}: its chat template differs from {CHAT_TEMPLATE_PATH.name}, the one "
                             f"prep and inference use; training with it would teach another prompt format")
    return folder


def chat_template_of(folder: Path) -> str | None:
    """The chat template a tokenizer folder carries: chat_template.jinja wins, as in transformers."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


# ---- lengths -------------------------------------------------------------------------------------

def token_lengths(rows: list[tuple[int, dict]], tokenizer, field_messages: str = "messages") -> list[int]:
    texts = [tokenizer.apply_chat_template(row[field_messages], tokenize=False) for _, row in rows]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def check_lengths(path: str, rows: list[tuple[int, dict]], lengths: list[int], sequence_len: int) -> None:
    too_long = [(line, row.get("id"), length) for (line, row), length in zip(rows, lengths) if length > sequence_len]
    if too_long:
        line, row_id, length = max(too_long, key=lambda item: item[2])
        raise InputError(path, line, f"{len(too_long)} row(s) exceed sequence_len {sequence_len} with the chat "
                         f"template (longest: id {row_id}, {length} tokens); raise sequence_len or shorten them in "
                         f"prep — Axolotl would drop or stop on them", "messages")


# ---- disk ----------------------------------------------------------------------------------------

def disk_needed_gib(config: dict[str, Any], shape) -> float:
    """Checkpoints (save_total_limit of them), the final weights and the merged bf16 model."""
    keep = int(config.get("save_total_limit") or 2)
    if config.get("adapter"):
        trainable = shape.lora_params(int(config.get("lora_r") or 0))
        checkpoint, final = trainable * (4 + 8), trainable * 4
    else:
        checkpoint, final = shape.params * (2 + 12), shape.params * 2
    merged = shape.params * 2
    return (keep * checkpoint + final + merged) / GIB * 1.1


def check_checkpoint_disk(config: dict[str, Any], log: Log) -> None:
    """Room on output_dir's disk for the checkpoints and the merged model the run will write."""
    output_dir = Path(config["output_dir"])
    needed, free = disk_needed_gib(config, shape_for(str(config["base_model"]))), free_gib(output_dir)
    if free < needed:
        raise PreflightError(f"output_dir {output_dir}: {free:.1f} GiB free, about {needed:.1f} GiB needed for "
                             f"checkpoints and the merged model")
    log(f"[preflight] disk: {free:.0f} GiB free, ~{needed:.1f} GiB needed")


# ---- resume / done -------------------------------------------------------------------------------

def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What an SFT run's result is made of, as prep.digests records it: the composed config and the content of
    every local dataset file it names (a file rewritten in place is another run)."""
    cache = DigestCache(default_digest_cache())
    identity: dict[str, Any] = {"recipe": config}
    for _, dataset in dataset_paths(config):
        path = dataset.get("path")
        if isinstance(path, str) and Path(path).is_file():
            identity[f"file:{path}"] = cache.file(Path(path))
    cache.save()
    return identity


def is_done(config: dict[str, Any], identity: dict[str, Any] | None = None) -> bool:
    """The run record in output_dir says this very run trained to the end."""
    return why_not_current(Path(config["output_dir"]), identity or run_identity(config)) is None


def mark_done(output_dir: str | Path) -> None:
    """Record that the run in OUTPUT_DIR trained to the end."""
    mark_finished(output_dir)


def resumable_checkpoints(config: dict[str, Any], identity: dict[str, Any], fresh: bool,
                          log: Log = _stderr) -> list[Path]:
    """The complete checkpoints this run may resume from (its identity recorded, not done); --fresh deletes them
    and the last run's model files, checkpoints of another setup (RESUME_KEYS, or other data) refuse."""
    output_dir = Path(config["output_dir"])
    if fresh and output_dir.is_dir():
        # The last run's model files too (an adapter left beside a full fine-tune's weights would be served as
        # the model); folders (Axolotl's dataset cache, TensorBoard's runs/) stay.
        for path in output_dir.glob("*"):
            if path.is_file():
                path.unlink()
    try:
        return claim_output_dir(output_dir, identity, fresh, lambda message: log(f"[preflight] {message}"),
                                recipe_keys=RESUME_KEYS)
    except ResumeRefused as err:
        raise PreflightError(str(err)) from None


# ---- the whole check -----------------------------------------------------------------------------

def check_data_and_model(config: dict[str, Any], log: Log) -> None:
    """Datasets well-formed, base model complete with the one chat template, every row within sequence_len."""
    from prep.tokenizer import load_tokenizer

    datasets = []
    for key, dataset in dataset_paths(config):
        path = dataset.get("path")
        if not isinstance(path, str) or not Path(path).suffix:
            continue  # a hub dataset: Axolotl fetches it
        field_messages = dataset.get("field_messages") or "messages"
        rows = read_chat_rows(path, field_messages)
        datasets.append((key, path, rows, field_messages))
        log(f"[preflight] {key}: {path}: {len(rows)} rows")
    folder = check_base_model(str(config["base_model"]))
    log(f"[preflight] base model: {folder or str(config['base_model']) + ' (Axolotl downloads it)'}")
    # Lengths with the base model's tokenizer (the rebuilt Qwen2.5 one when it is not local yet).
    tokenizer = load_tokenizer(str(folder) if folder else None)
    sequence_len = int(config.get("sequence_len") or 512)
    for key, path, rows, field_messages in datasets:
        lengths = token_lengths(rows, tokenizer, field_messages)
        check_lengths(path, rows, lengths, sequence_len)
        log(f"[preflight] {key}: longest row {max(lengths)} tokens <= sequence_len {sequence_len}")


def preflight(recipe: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = (),
              fresh: bool = False, force: bool = False, log: Log = _stderr) -> Plan:
    """Compose and check a run (see the module docstring); write its config unless it already finished."""
    config = compose(recipe, overlays, overrides)
    check_required(config, recipe)
    output_dir = Path(config["output_dir"])
    check_data_and_model(config, log)
    gpus = gpu_memories_gib()
    log(f"[preflight] {check_fits(config, str(recipe), force=force, gpus=gpus)}")
    check_checkpoint_disk(config, log)
    identity = run_identity(config)
    if not fresh and is_done(config, identity):
        return Plan(output_dir / COMPOSED_NAME, output_dir, len(gpus), "done")
    existing = resumable_checkpoints(config, identity, fresh, log)
    sources = " + ".join(str(item) for item in (recipe, *overlays)) + "".join(f" --set {o}" for o in overrides)
    config_path = write_composed(config, f"# Composed by python -m launch.sft from {sources}\n")
    status = "resume" if existing and config.get("auto_resume_from_checkpoints") else "train"
    return Plan(config_path, output_dir, len(gpus), status, str(existing[-1]) if status == "resume" else "")
