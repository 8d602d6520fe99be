"""The real Qwen2.5 tokenizer, rebuilt offline from the BPE ranks that ship in the `dashscope` wheel.

No model hub is reachable here, yet every token count, training mask and soft-label id must be
exactly Qwen2.5's. The ranks (`qwen.tiktoken`, 151,643 base64 tokens) are the vocabulary;
transformers' own tiktoken converter turns them into a byte-level BPE with Qwen2's pre-tokenizer
regex (transformers' constant), and this module adds what the ranks do not carry: NFC
normalisation, the 22 added tokens, eos/pad and the ChatML template. A real checkpoint folder
(`--tokenizer DIR`) is always preferred.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from prep.jsonio import build_dir_once
from prep.paths import DATA_DIR, cache_dir
from prep.qwen import END_OF_TEXT, FIRST_ADDED_ID, IM_END, IM_START

BUILDER_VERSION = "2"       # bump when the files written for the same ranks and template change

# (content, special) for ids FIRST_ADDED_ID.., in order, as in Qwen2.5-*-Instruct's tokenizer_config.json.
ADDED_TOKENS = [
    (END_OF_TEXT, True), (IM_START, True), (IM_END, True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
EOS_TOKEN, PAD_TOKEN = IM_END, END_OF_TEXT
CHAT_TEMPLATE_PATH = DATA_DIR / "qwen2.5_chat_template.jinja"


def default_ranks_path() -> Path:
    return cache_dir() / "qwen.tiktoken"


def split_pattern() -> str:
    """Qwen2's pre-tokenizer regex, taken from transformers' Qwen2 tokenizer (the one copy medkd uses)."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return PRETOKENIZE_REGEX


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map of byte-level BPE vocabularies (transformers')."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """Every token id's exact bytes: a byte-level BPE piece through GPT-2's byte map, an added token as its text's
    UTF-8. What a hosted API's `bytes` carry, and what the soft-label stage looks teacher tokens up by."""
    to_byte = {char: byte for byte, char in _byte_to_unicode().items()}
    added = {token_id: token.content for token_id, token in tokenizer.added_tokens_decoder.items()}
    return {token_id: added[token_id].encode("utf-8") if token_id in added else bytes(to_byte[char] for char in piece)
            for piece, token_id in tokenizer.get_vocab().items()}


@contextmanager
def _tiktoken_file_cache_off() -> Iterator[None]:
    """tiktoken keeps a copy of every file it reads under /tmp keyed by the file's *path*, so a ranks file
    replaced in place would be read stale; an empty TIKTOKEN_CACHE_DIR turns that cache off."""
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous


def build_backend(ranks_path: str | Path) -> Any:
    """The `tokenizers.Tokenizer` of Qwen2.5: transformers' TikTokenConverter, then NFC and the added tokens."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with _tiktoken_file_cache_off():
        backend = TikTokenConverter(vocab_file=str(ranks_path), pattern=split_pattern()).converted()
    if backend.get_vocab_size() != FIRST_ADDED_ID:
        raise ValueError(f"{ranks_path}: {backend.get_vocab_size()} ranks, Qwen2.5 has {FIRST_ADDED_ID}")
    backend.normalizer = normalizers.NFC()
    backend.add_tokens([AddedToken(content, special=special, normalized=False) for content, special in ADDED_TOKENS])
    for offset, (content, _) in enumerate(ADDED_TOKENS):
        if backend.token_to_id(content) != FIRST_ADDED_ID + offset:
            raise ValueError(f"{ranks_path}: {content} got id {backend.token_to_id(content)}, "
                             f"Qwen2.5 has {FIRST_ADDED_ID + offset}")
    return backend


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(FIRST_ADDED_ID + offset): {"content": content, "lstrip": False, "normalized": False,
                                             "rstrip": False, "single_word": False, "special": special}
            for offset, (content, special) in enumerate(ADDED_TOKENS)
        },
        "additional_special_tokens": [content for content, special in ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE_PATH.read_text(encoding="utf-8"),
    }


def _require_ranks(ranks_path: Path) -> Path:
    if not ranks_path.exists():
        raise FileNotFoundError(f"{ranks_path}: Qwen BPE ranks missing; run `bash launch/setup.sh` "
                                "(it extracts them from the dashscope wheel)")
    return ranks_path


def write_tokenizer_files(out_dir: str | Path, ranks_path: str | Path | None = None) -> Path:
    """Write tokenizer.json + tokenizer_config.json (with the chat template) into OUT_DIR."""
    ranks_path = _require_ranks(Path(ranks_path or default_ranks_path()))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_backend(ranks_path).save(str(out_dir / "tokenizer.json"), pretty=False)   # 8 MB instead of 19
    config = json.dumps(tokenizer_config(), ensure_ascii=False, indent=2)
    (out_dir / "tokenizer_config.json").write_text(config, encoding="utf-8")
    return out_dir


def tokenizer_dir(ranks_path: str | Path | None = None) -> Path:
    """The cached tokenizer folder, rebuilt when the ranks, the template, this builder or the converter change."""
    ranks_path = _require_ranks(Path(ranks_path or default_ranks_path()))
    key = hashlib.sha256()
    for part in (BUILDER_VERSION.encode(), version("transformers").encode(), ranks_path.read_bytes(),
                 CHAT_TEMPLATE_PATH.read_bytes()):
        key.update(part)
    target = cache_dir() / f"qwen2.5-tokenizer-{key.hexdigest()[:10]}"
    return build_dir_once(target, lambda staging: write_tokenizer_files(staging, ranks_path))


@lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None) -> Any:
    """A transformers tokenizer: from a model folder when given, else the rebuilt Qwen2.5 one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or tokenizer_dir()))


def chat_token_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of MESSAGES rendered by the tokenizer's chat template (the one template everywhere)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
