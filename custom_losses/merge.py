"""Fold an SFT run's LoRA adapter into a full bf16 model that vLLM serves; keep the adapter as it is.

    python -m launch.merge OUTPUT_DIR [--out DIR] [--dtype bfloat16|float32]

OUTPUT_DIR is the recipe's output_dir (runs/<run>/sft): the adapter Axolotl saved and the
medkd-sft.yaml launch/sft.sh composed, which names the base model. The merged model goes to
runs/<run>/merged by default, written beside it and swapped in, with a medkd-merge.json stamp; a
re-run with the same adapter does nothing. The adapter is merged into the bf16 base weights (never
into 4-bit ones: a QLoRA adapter is served the same way). The tokenizer files, chat template
included, are copied byte for byte from the base model folder, so the merged model renders prompts
exactly as training did. A full fine-tune's output is already a model: it gets the tokenizer files
and the stamp, nothing is merged.

The adapter stays servable on its own: vLLM `--enable-lora --max-lora-rank R` with R >= its r.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from custom_losses.sft_config import COMPOSED_NAME
from custom_losses.sft_preflight import PreflightError, local_model_folder
from prep.jsonio import write_text_atomic

STAMP_NAME = "medkd-merge.json"
# Everything a tokenizer folder may hold; copied from the base model when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
SERVE_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "serve" / "qwen2.5-7b-student-1gpu.yaml"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def run_config(output_dir: Path) -> dict[str, Any]:
    composed = output_dir / COMPOSED_NAME
    if composed.is_file():
        return yaml.safe_load(composed.read_text(encoding="utf-8"))
    adapter = output_dir / "adapter_config.json"
    if adapter.is_file():  # trained without launch/sft.sh: the adapter names its base
        return {"base_model": json.loads(adapter.read_text())["base_model_name_or_path"], "adapter": "lora"}
    raise PreflightError(f"{output_dir}: neither {COMPOSED_NAME} nor adapter_config.json; is this an SFT output_dir?")


def default_out(output_dir: Path) -> Path:
    return output_dir.parent / "merged"


def max_serving_rank() -> int:
    return int(yaml.safe_load(SERVE_RECIPE.read_text(encoding="utf-8")).get("max_lora_rank", 0))


def copy_tokenizer_files(base: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
            copied.append(name)
    return copied


def merge(output_dir: str | Path, out: str | Path | None = None, dtype: str = "bfloat16",
          log=lambda message: print(message, file=sys.stderr)) -> Path:
    import torch

    output_dir = Path(output_dir)
    config = run_config(output_dir)
    out = Path(out) if out else default_out(output_dir)
    base = local_model_folder(str(config["base_model"]))
    if base is None:
        raise PreflightError(f"base_model {config['base_model']}: not found locally or in the HF cache")
    is_adapter = (output_dir / "adapter_config.json").is_file()
    weights = output_dir / ("adapter_model.safetensors" if is_adapter else "model.safetensors")
    if not weights.is_file() and not is_adapter:
        weights = next(iter(sorted(output_dir.glob("model*.safetensors"))), weights)
    if not weights.is_file():
        raise PreflightError(f"{output_dir}: no {weights.name}; has training finished?")

    stamp = {"source": str(output_dir.resolve()), "weights_sha256": file_digest(weights),
             "base_model": str(base), "dtype": dtype, "kind": "lora-merged" if is_adapter else "full"}
    previous = out / STAMP_NAME
    if previous.is_file() and json.loads(previous.read_text()) == stamp:
        log(f"[merge] {out} is already this merge: nothing to do")
        return out

    staging = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if is_adapter:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
        rank = int(adapter_config.get("r") or 0)
        if rank > max_serving_rank():
            log(f"[merge] warning: adapter r={rank} is above max_lora_rank {max_serving_rank()} of {SERVE_RECIPE.name}; "
                f"raise it there to serve the adapter itself")
        log(f"[merge] folding {output_dir} (r={rank}) into {base} in {dtype}")
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype), low_cpu_mem_usage=True)
        model = PeftModel.from_pretrained(model, str(output_dir)).merge_and_unload()
        model.save_pretrained(staging, safe_serialization=True, max_shard_size="5GB")
    else:
        log(f"[merge] {output_dir} is a full fine-tune: copying it")
        for path in output_dir.iterdir():
            if path.is_file() and (path.suffix in (".safetensors", ".json") and not path.name.startswith(("medkd", "trainer"))):
                shutil.copy2(path, staging / path.name)
    copied = copy_tokenizer_files(base, staging)
    write_text_atomic(staging / STAMP_NAME, json.dumps(stamp, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    log(f"[merge] wrote {out} (tokenizer files from the base: {', '.join(copied)})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.merge", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the SFT run's output_dir, e.g. runs/stage1/sft")
    parser.add_argument("--out", help="where the merged model goes (default: OUTPUT_DIR/../merged)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)
    try:
        print(merge(args.output_dir, args.out, args.dtype))
    except (PreflightError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
