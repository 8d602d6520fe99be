"""Check an SFT run before any GPU time is spent, and write the config it will run.

    python -m launch.sft_preflight RECIPE [OVERLAY.yaml ...] [key=value ...] [--run runs/NAME] [--fresh] [--force]
    python -m launch.sft_preflight --mark-done OUTPUT_DIR/medkd-sft.yaml

Composes the recipe (launch.sft_config), then checks, cheapest first: the datasets exist and every
row is a chat in prep.teacher's layout; the base model is a complete local folder (or in the HF
cache, or reachable) whose chat template is data/qwen2.5_chat_template.jinja; every row fits the
recipe's sequence_len with that template (Axolotl would otherwise drop or, with
`excess_length_strategy: raise`, stop on it mid-run); the GPUs are there and the memory estimator
says the recipe fits them; the disk holds the checkpoints and the merged model. Each problem is one
sentence naming the file, line or key, and a non-zero exit.

On success it writes <output_dir>/medkd-sft.yaml and prints shell assignments for launch/sft.sh:
CONFIG, OUTPUT_DIR, GPUS, STATUS (train | resume | done) and RESUME_FROM.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from custom_losses.sft_config import COMPOSED_NAME, compose, config_hash, split_args, write_composed
from prep.config import RecipeError
from prep.jsonio import InputError, iter_json_lines
from prep.tokenizer import CHAT_TEMPLATE_PATH

DONE_NAME = "medkd-sft.done"
GIB = 2**30
ESTIMATE_TOLERANCE = 0.15   # the memory estimator's error against published measurements
ROLES = {"system", "user", "assistant", "tool"}
# Keys whose change makes old checkpoints in output_dir belong to another model.
IDENTITY_KEYS = ("base_model", "adapter", "lora_r", "lora_alpha", "lora_target_linear", "lora_target_modules",
                 "load_in_4bit", "load_in_8bit", "deepspeed")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


class PreflightError(RuntimeError):
    """One sentence saying what is wrong and where."""


@dataclass
class Plan:
    config_path: Path
    output_dir: Path
    gpus: int
    status: str                      # train | resume | done
    resume_from: str = ""
    notes: list[str] = field(default_factory=list)

    def shell(self) -> str:
        values = {"CONFIG": str(self.config_path), "OUTPUT_DIR": str(self.output_dir), "GPUS": str(self.gpus),
                  "STATUS": self.status, "RESUME_FROM": self.resume_from}
        return "\n".join(f"{key}={shlex.quote(value)}" for key, value in values.items())


# ---- datasets ------------------------------------------------------------------------------------

def read_chat_rows(path: str | Path, field_messages: str = "messages") -> list[tuple[int, dict]]:
    """(line, row) for each row of a chat JSONL in prep.teacher's layout; InputError on the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "dataset file not found (run prep.teacher first, or point the recipe at it)")
    rows = []
    for line, text in iter_json_lines(path):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(path, line, f"not valid JSON ({err.msg})") from None
        messages = row.get(field_messages) if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise InputError(path, line, "must be a non-empty list of chat messages", field_messages)
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise InputError(path, line, f"message {index} needs a role ({', '.join(sorted(ROLES))}) and a string content",
                                 field_messages)
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
            raise PreflightError(f"base_model {base_model}: not cached and the hub did not answer ({type(err).__name__})") from None
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
        raise InputError(path, line, f"{len(too_long)} row(s) exceed sequence_len {sequence_len} with the chat template "
                         f"(longest: id {row_id}, {length} tokens); raise sequence_len or shorten them in prep — "
                         f"Axolotl would drop or stop on them", "messages")


# ---- devices, memory, disk -----------------------------------------------------------------------

def gpu_memories_gib() -> list[tuple[str, float]]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory / GIB)
                for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def needs_gpu(config: dict[str, Any]) -> list[str]:
    reasons = []
    if config.get("bf16") is True or config.get("fp16") is True:
        reasons.append("bf16/fp16")
    if str(config.get("attn_implementation") or "").startswith("flash_attention"):
        reasons.append(str(config["attn_implementation"]))
    if any(config.get(key) for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")):
        reasons.append("Axolotl's LoRA kernels")
    if any("liger" in str(plugin).lower() for plugin in config.get("plugins") or []):
        reasons.append("Liger kernels")
    if config.get("deepspeed"):
        reasons.append("DeepSpeed (NCCL)")
    return reasons


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


def free_gib(path: Path) -> float:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free / GIB


# ---- resume / done -------------------------------------------------------------------------------

def checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    return {key: config.get(key) for key in IDENTITY_KEYS}


def done_hash(config: dict[str, Any]) -> str:
    return config_hash(config)


def previous_config(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / COMPOSED_NAME
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def mark_done(config_path: str | Path) -> Path:
    config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    from prep.jsonio import write_text_atomic

    marker = Path(config["output_dir"]) / DONE_NAME
    write_text_atomic(marker, json.dumps({"config_hash": done_hash(config)}) + "\n")
    return marker


# ---- the whole check -----------------------------------------------------------------------------

def preflight(recipe: str, overlays: list[str] = (), overrides: list[str] = (), run_dir: str | None = None,
              fresh: bool = False, force: bool = False, log=lambda message: print(message, file=sys.stderr)) -> Plan:
    from custom_losses.memory import estimate_config, shape_for
    from prep.tokenizer import load_tokenizer

    config = compose(recipe, overlays, overrides, run_dir)
    for key in ("base_model", "output_dir", "datasets"):
        if not config.get(key):
            raise RecipeError(recipe, key, "missing (required)")
    output_dir = Path(config["output_dir"])
    sequence_len = int(config.get("sequence_len") or 512)

    # Datasets: present and well-formed.
    datasets = []
    for key, dataset in dataset_paths(config):
        path = dataset.get("path")
        if not isinstance(path, str) or not Path(path).suffix:
            continue  # a hub dataset: Axolotl fetches it
        rows = read_chat_rows(path, dataset.get("field_messages") or "messages")
        datasets.append((key, path, rows, dataset.get("field_messages") or "messages"))
        log(f"[preflight] {key}: {path}: {len(rows)} rows")

    # Base model: present (or fetchable) with the one chat template.
    folder = check_base_model(str(config["base_model"]))
    log(f"[preflight] base model: {folder or config['base_model'] + ' (Axolotl downloads it)'}")

    # Lengths with the base model's tokenizer (the rebuilt Qwen2.5 one when it is not local yet).
    tokenizer = load_tokenizer(str(folder) if folder else None)
    for key, path, rows, field_messages in datasets:
        lengths = token_lengths(rows, tokenizer, field_messages)
        check_lengths(path, rows, lengths, sequence_len)
        log(f"[preflight] {key}: longest row {max(lengths)} tokens <= sequence_len {sequence_len}")

    # Devices and memory.
    gpus = gpu_memories_gib()
    reasons = needs_gpu(config)
    if reasons and not gpus:
        raise PreflightError(f"{recipe}: needs a CUDA GPU ({', '.join(reasons)}) and none is visible; for a CPU smoke "
                             f"run add recipes/sft/overrides/cpu-tiny.yaml")
    shape = shape_for(str(config["base_model"]))
    if gpus:
        estimate = estimate_config(config, len(gpus))
        smallest = min(memory for _, memory in gpus)
        message = (f"predicted peak {estimate.total:.1f} GiB per GPU on {len(gpus)} GPU(s); "
                   f"smallest has {smallest:.1f} GiB ({min(gpus, key=lambda g: g[1])[0]})")
        if estimate.total > smallest:
            if not force:
                raise PreflightError(f"{recipe}: {message}: it will not fit; use more GPUs, the QLoRA recipe, "
                                     f"a smaller micro_batch_size or sequence_len (or --force)")
            log(f"[preflight] warning: {message}; continuing (--force)")
        elif estimate.total * (1 + ESTIMATE_TOLERANCE) > smallest:
            log(f"[preflight] warning: {message}: tight, within the estimator's {ESTIMATE_TOLERANCE:.0%} error")
        else:
            log(f"[preflight] memory: {message}")
    else:
        log("[preflight] no GPU: CPU run (fp32, tiny model)")

    # Disk.
    needed, free = disk_needed_gib(config, shape), free_gib(output_dir)
    if free < needed:
        raise PreflightError(f"output_dir {output_dir}: {free:.1f} GiB free, about {needed:.1f} GiB needed for "
                             f"checkpoints and the merged model")
    log(f"[preflight] disk: {free:.0f} GiB free, ~{needed:.1f} GiB needed")

    # Resume, or nothing to do.
    previous = previous_config(output_dir)
    existing = checkpoints(output_dir)
    if fresh:
        for folder_ in existing:
            shutil.rmtree(folder_)
        (output_dir / DONE_NAME).unlink(missing_ok=True)
        existing = []
    elif previous is not None and existing and run_identity(previous) != run_identity(config):
        changed = next(key for key in IDENTITY_KEYS if previous.get(key) != config.get(key))
        raise PreflightError(f"output_dir {output_dir} holds checkpoints of another setup (key '{changed}': "
                             f"{previous.get(changed)!r} -> {config.get(changed)!r}); use --run for a new run folder or --fresh")
    marker = output_dir / DONE_NAME
    if not fresh and marker.is_file() and json.loads(marker.read_text()).get("config_hash") == done_hash(config):
        return Plan(output_dir / COMPOSED_NAME, output_dir, len(gpus), "done")
    header = f"# Composed by launch/sft_preflight.py from {recipe}" + "".join(f" + {o}" for o in overlays) + \
             "".join(f" {o}" for o in overrides) + "\n"
    config_path = write_composed(config, header)
    status = "resume" if existing and config.get("auto_resume_from_checkpoints") else "train"
    return Plan(config_path, output_dir, len(gpus), status, str(existing[-1]) if status == "resume" else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.sft_preflight", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?")
    parser.add_argument("rest", nargs="*", help="overlay .yaml files and key=value overrides")
    parser.add_argument("--run", help="run folder replacing runs/stage1 in the recipe's paths")
    parser.add_argument("--fresh", action="store_true", help="delete old checkpoints and train from the start")
    parser.add_argument("--force", action="store_true", help="continue when the memory estimate says it will not fit")
    parser.add_argument("--mark-done", metavar="CONFIG", help="record that CONFIG trained to the end")
    args = parser.parse_intermixed_args(argv)
    if args.mark_done:
        print(mark_done(args.mark_done))
        return 0
    if not args.recipe:
        parser.error("RECIPE is required")
    try:
        overlays, overrides = split_args(args.rest)
        plan = preflight(args.recipe, overlays, overrides, args.run, fresh=args.fresh, force=args.force)
    except (PreflightError, RecipeError, InputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan.shell())
    return 0


if __name__ == "__main__":
    sys.exit(main())
