"""The tiny Qwen2-architecture model used by the tests, the CPU demo and the benchmarks.

Random weights, but the real Qwen2.5 tokenizer, vocabulary size and ChatML template, so every code
path (masking, soft-label ids, chat template, vLLM serving) is the one a real Qwen2.5 checkpoint takes.
head_dim is 64 because vLLM's CPU attention rejects 16. Built into the cache, never committed.
Recipes name it by prep.qwen.TINY_MODEL_NAME; `resolve_model` is the one place that name becomes a
folder. The command is `python -m launch.tiny_model`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from prep.jsonio import build_dir_once
from prep.paths import cache_dir
from prep.qwen import END_OF_TEXT_ID, IM_END_ID, TINY_MODEL_NAME, VOCAB_ROWS
from prep.tokenizer import tokenizer_dir

# Shape knobs of the tiny model; the vocabulary and special ids are Qwen2.5-7B-Instruct's.
TINY_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": VOCAB_ROWS,
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
    "bos_token_id": END_OF_TEXT_ID,
    "eos_token_id": IM_END_ID,
    "pad_token_id": END_OF_TEXT_ID,
    "use_sliding_window": False,
    "initializer_range": 0.02,
}
GENERATION_CONFIG = {"bos_token_id": END_OF_TEXT_ID, "eos_token_id": [IM_END_ID, END_OF_TEXT_ID],
                     "pad_token_id": END_OF_TEXT_ID, "do_sample": False}
SEED = 1234


def build_tiny_model(out_dir: str | Path) -> Path:
    """Write a random-weight Qwen2 model and the Qwen2.5 tokenizer files into OUT_DIR."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(SEED)
    shape = {key: value for key, value in TINY_CONFIG.items() if key not in ("architectures", "model_type")}
    model = Qwen2ForCausalLM(Qwen2Config(**shape)).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    for name in os.listdir(tokenizer_dir()):
        shutil.copy2(tokenizer_dir() / name, out_dir / name)
    return out_dir


def tiny_model_dir() -> Path:
    """The cached tiny model folder; rebuilt when its config or the tokenizer changes (tests and the vLLM
    server may build it at the same moment: build_dir_once keeps the first complete copy)."""
    fingerprint = json.dumps([TINY_CONFIG, GENERATION_CONFIG, SEED, tokenizer_dir().name])
    target = cache_dir() / f"tiny-qwen2.5-{hashlib.sha256(fingerprint.encode()).hexdigest()[:10]}"
    return build_dir_once(target, build_tiny_model)


def resolve_model(name: str) -> str:
    """The fixture's name in a recipe -> the locally built folder; anything else is a folder or hub id."""
    return str(tiny_model_dir()) if name == TINY_MODEL_NAME else name
