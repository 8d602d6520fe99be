"""The one LoRA merge: fold an adapter into a full model that vLLM serves; keep the adapter as it is.

Stage one (`merge`, the command `python -m launch.merge OUTPUT_DIR`): OUTPUT_DIR is the SFT recipe's
output_dir, holding the adapter Axolotl saved and the medkd-sft.yaml launch.sft composed, which names
the base model; the merged model goes to OUTPUT_DIR/../merged. A full fine-tune's output is already a
model: it gets the tokenizer files and the stamp, nothing is merged. Stage two (custom_losses.train.distill)
calls `merge_adapter` on output_dir/adapter.

The adapter is merged into the base weights loaded in the precision the student is served in (the
`--dtype` of recipes/serve/qwen2.5-7b-student-1gpu.yaml, unless the caller names one), never into
4-bit ones: a QLoRA adapter is served the same way. The tokenizer files, chat template included, are
copied byte for byte from the base model folder, so the merged model renders prompts exactly as
training did. The folder is written beside its place and swapped in, with its run record (prep.digests,
the record every producer keeps: the trained weights' digest, base, dtype, kind); a re-run with the same
adapter, base and dtype does nothing.

The adapter stays servable on its own: vLLM `--enable-lora --max-lora-rank R` with R >= its r.
"""
from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from custom_losses.train.memory import PreflightError
from custom_losses.train.sft_config import COMPOSED_NAME
from custom_losses.train.sft_preflight import local_model_folder
from prep.api.serving import vllm_flag
from prep.config import read_yaml
from prep.digests import RUN_RECORD, files_digest, why_not_current, write_record
from prep.jsonio import write_dir_atomic
from prep.paths import RECIPES_DIR

# Everything a tokenizer folder may hold; copied from the base model when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
SERVE_RECIPE = RECIPES_DIR / "serve" / "qwen2.5-7b-student-1gpu.yaml"
DTYPES = ("bfloat16", "float16", "float32", "auto")
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def weights_digest(paths: list[Path]) -> str:
    """The trained weights' content (every shard), each file read once per change (prep.digests.DigestCache)."""
    return files_digest((path.name, path) for path in sorted(paths))


def served_dtype() -> str:
    """The precision vLLM serves the student in (the serve recipe's --dtype; vLLM's `auto` without one)."""
    return vllm_flag(read_yaml(SERVE_RECIPE).get("extra_args") or [], "--dtype") or "auto"


def max_serving_rank() -> int:
    return int(read_yaml(SERVE_RECIPE).get("max_lora_rank", 0))


def base_folder(base_model: str) -> Path:
    folder = local_model_folder(base_model)
    if folder is None:
        raise PreflightError(f"base_model {base_model}: not found locally or in the HF cache")
    return folder


def copy_tokenizer_files(source: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
            copied.append(name)
    return copied


def _already(out: Path, identity: dict[str, Any], log: Log) -> bool:
    if why_not_current(out, identity) is None:
        log(f"[merge] {out} is already this merge: nothing to do")
        return True
    return False


def merge_adapter(adapter_dir: str | Path, base_model: str, out: str | Path, dtype: str | None = None,
                  tokenizer_dir: str | Path | None = None, log: Log = _stderr) -> Path:
    """Fold the LoRA adapter in ADAPTER_DIR into BASE_MODEL loaded in DTYPE (default: served_dtype()) -> OUT.

    Tokenizer files come from TOKENIZER_DIR (default: the base model's folder).
    """
    import torch

    adapter_dir, out, dtype = Path(adapter_dir), Path(out), dtype or served_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"merge dtype '{dtype}': expected one of {', '.join(DTYPES)}")
    base = base_folder(base_model)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise PreflightError(f"{adapter_dir}: no {weights.name}; has training finished?")
    identity = {"source": str(adapter_dir.resolve()), "trained weights": weights_digest([weights]),
                "base_model": str(base), "dtype": dtype, "kind": "lora-merged"}
    if _already(out, identity, log):
        return out
    rank = int(json.loads((adapter_dir / "adapter_config.json").read_text()).get("r") or 0)
    if rank > max_serving_rank():
        log(f"[merge] warning: adapter r={rank} is above max_lora_rank {max_serving_rank()} of {SERVE_RECIPE.name}; "
            f"raise it there to serve the adapter itself")
    log(f"[merge] folding {adapter_dir} (r={rank}) into {base} in {dtype}")

    def write(staging: Path) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch_dtype, low_cpu_mem_usage=True)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        model.save_pretrained(staging, safe_serialization=True, max_shard_size="5GB")
        copied = copy_tokenizer_files(Path(tokenizer_dir) if tokenizer_dir else base, staging)
        write_record(staging / RUN_RECORD, identity, done=True)
        log(f"[merge] tokenizer files from {tokenizer_dir or base}: {', '.join(copied)}")

    write_dir_atomic(out, write)
    log(f"[merge] wrote {out}")
    return out


def copy_full_model(output_dir: Path, base: Path, out: Path, log: Log = _stderr) -> Path:
    """A full fine-tune's output is already a model: copy it with the base's tokenizer files and a record."""
    weights = sorted(output_dir.glob("model*.safetensors"))
    if not weights:
        raise PreflightError(f"{output_dir}: no model.safetensors; has training finished?")
    identity = {"source": str(output_dir.resolve()), "trained weights": weights_digest(weights),
                "base_model": str(base), "dtype": "as trained", "kind": "full"}
    if _already(out, identity, log):
        return out
    log(f"[merge] {output_dir} is a full fine-tune: copying it")

    def write(staging: Path) -> None:
        staging.mkdir(parents=True)
        for path in output_dir.iterdir():
            ours = path.name.startswith(("medkd", "trainer"))  # the composed config, trainer state: not the model
            if path.is_file() and path.suffix in (".safetensors", ".json") and not ours:
                shutil.copy2(path, staging / path.name)
        copy_tokenizer_files(base, staging)
        write_record(staging / RUN_RECORD, identity, done=True)

    write_dir_atomic(out, write)
    log(f"[merge] wrote {out}")
    return out


def run_config(output_dir: Path) -> dict[str, Any]:
    composed = output_dir / COMPOSED_NAME
    if composed.is_file():
        return read_yaml(composed)
    adapter = output_dir / "adapter_config.json"
    if adapter.is_file():  # trained without launch.sft: the adapter names its base
        return {"base_model": json.loads(adapter.read_text())["base_model_name_or_path"], "adapter": "lora"}
    raise PreflightError(f"{output_dir}: neither {COMPOSED_NAME} nor adapter_config.json; is this an SFT output_dir?")


def merge(output_dir: str | Path, out: str | Path | None = None, dtype: str | None = None,
          log: Log = _stderr) -> Path:
    """Stage one's merge: OUTPUT_DIR (an SFT output_dir) -> OUT (default OUTPUT_DIR/../merged)."""
    output_dir = Path(output_dir)
    config = run_config(output_dir)
    out = Path(out) if out else output_dir.parent / "merged"
    if (output_dir / "adapter_config.json").is_file():
        return merge_adapter(output_dir, str(config["base_model"]), out, dtype, log=log)
    return copy_full_model(output_dir, base_folder(str(config["base_model"])), out, log)
