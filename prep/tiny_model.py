"""Build the tiny Qwen2-architecture model used by the tests, the CPU demo and the benchmarks.

Random weights, but the real Qwen2.5 tokenizer, vocabulary size and ChatML template, so every code
path (masking, soft-label ids, chat template, vLLM serving) is the one a real Qwen2.5 checkpoint takes.
head_dim is 64 because vLLM's CPU attention rejects 16. Built into the cache, never committed.

    python -m launch.tiny_model [--out DIR]     # prints the folder
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

from prep.paths import cache_dir
from prep.tokenizer import tokenizer_dir

# Shape knobs of the tiny model; the vocabulary and special ids are Qwen2.5-7B-Instruct's.
TINY_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
    "use_sliding_window": False,
    "initializer_range": 0.02,
}
GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": False}
SEED = 1234
# What recipes write as the model name to mean this locally built fixture.
TINY_MODEL_NAME = "medkd/tiny-qwen2.5"


def build_tiny_model(out_dir: str | Path) -> Path:
    """Write a random-weight Qwen2 model and the Qwen2.5 tokenizer files into OUT_DIR."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(SEED)
    config = Qwen2Config(**{key: value for key, value in TINY_CONFIG.items() if key not in ("architectures", "model_type")})
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    for name in os.listdir(tokenizer_dir()):
        shutil.copy2(tokenizer_dir() / name, out_dir / name)
    return out_dir


def tiny_model_dir() -> Path:
    """The cached tiny model folder; rebuilt when its config or the tokenizer changes."""
    key = hashlib.sha256(json.dumps([TINY_CONFIG, GENERATION_CONFIG, SEED, tokenizer_dir().name]).encode()).hexdigest()[:10]
    target = cache_dir() / f"tiny-qwen2.5-{key}"
    if not (target / "model.safetensors").exists():
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        build_tiny_model(staging)
        try:
            os.replace(staging, target)
        except OSError:  # built concurrently by another process: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """`medkd/tiny-qwen2.5` in a recipe names the locally built fixture; anything else is a folder or hub id."""
    return str(tiny_model_dir()) if name == TINY_MODEL_NAME else name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write here instead of the cache")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out) if args.out else tiny_model_dir())


if __name__ == "__main__":
    main()
