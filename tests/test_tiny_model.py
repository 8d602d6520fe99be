"""The tiny fixture is a real Qwen2 checkpoint with Qwen2.5's vocabulary, tokenizer and template."""
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prep.qwen import TINY_MODEL_NAME
from prep.testing import tiny_model
from prep.tokenizer import CHAT_TEMPLATE_PATH


def test_tiny_model_loads_and_runs(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["vocab_size"] in (151936, 152064)
    assert config["hidden_size"] // config["num_attention_heads"] >= 64
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "头痛"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config["vocab_size"])
    # The chat template inside the model folder is byte-for-byte the one in data/.
    assert tokenizer.chat_template == CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


def test_builder_is_deterministic_and_the_cache_is_reused(tiny_model_dir, tmp_path):
    cached = {path.name: path.stat() for path in tiny_model_dir.iterdir()}
    # Two fresh builds write the same bytes, and the same bytes as the cached folder (built by another process).
    first, second = tiny_model.build_tiny_model(tmp_path / "a"), tiny_model.build_tiny_model(tmp_path / "b")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
        assert (first / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    # Asking again returns the cached folder untouched: nothing is rebuilt or rewritten.
    assert tiny_model.tiny_model_dir() == tiny_model_dir
    assert tiny_model.resolve_model(TINY_MODEL_NAME) == str(tiny_model_dir)
    after = {path.name: path.stat() for path in tiny_model_dir.iterdir()}
    assert {name: (s.st_ino, s.st_mtime_ns) for name, s in after.items()} == \
        {name: (s.st_ino, s.st_mtime_ns) for name, s in cached.items()}
    assert tiny_model.resolve_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
