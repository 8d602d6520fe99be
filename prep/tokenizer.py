"""The real Qwen2.5 tokenizer, rebuilt offline from the BPE ranks that ship in the `dashscope` wheel.

No model hub is reachable here, yet every token count, training mask and soft-label id must be
exactly Qwen2.5's. The ranks (`qwen.tiktoken`, 151,643 base64 tokens) give the vocabulary; the
merges are recovered from them (a token of rank r splits into exactly two parts when BPE runs with
only lower ranks); Qwen2's pre-tokenizer regex, NFC normalisation, the 22 added tokens and the
ChatML template complete it. A real checkpoint folder (`--tokenizer DIR`) is always preferred.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from prep.paths import REPO_ROOT, cache_dir

BUILDER_VERSION = "1"

# Qwen2's pre-tokenizer split (identical to the tiktoken pattern Qwen ships).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (content, special) for ids 151643..151664, as in Qwen2.5-*-Instruct's tokenizer_config.json.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
FIRST_ADDED_ID = 151643
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE_PATH = REPO_ROOT / "data" / "qwen2.5_chat_template.jinja"


def default_ranks_path() -> Path:
    return cache_dir() / "qwen.tiktoken"


def load_ranks(path: str | Path) -> dict[bytes, int]:
    ranks = {}
    for line in Path(path).read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_split(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's merge loop over TOKEN's bytes, using only ranks below MAX_RANK."""
    parts = [bytes([byte]) for byte in token]
    while True:
        best_index, best_rank = None, None
        for index in range(len(parts) - 1):
            rank = ranks.get(parts[index] + parts[index + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_index, best_rank = index, rank
        if best_index is None:
            return parts
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_split(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"rank {rank} does not split into exactly two lower-rank parts: {parts!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer_json(ranks: dict[bytes, int]) -> dict:
    """The `tokenizers` JSON of Qwen2.5's tokenizer (same components as the hub's tokenizer.json)."""
    to_unicode = _byte_to_unicode()
    as_text = lambda token: "".join(to_unicode[byte] for byte in token)  # noqa: E731
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = [[as_text(left), as_text(right)] for left, right in recover_merges(ranks)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": FIRST_ADDED_ID + offset, "content": content, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": special}
            for offset, (content, special) in enumerate(ADDED_TOKENS)
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": {**byte_level, "trim_offsets": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(FIRST_ADDED_ID + offset): {"content": content, "lstrip": False, "normalized": False,
                                             "rstrip": False, "single_word": False, "special": special}
            for offset, (content, special) in enumerate(ADDED_TOKENS)
        },
        "additional_special_tokens": [content for content, special in ADDED_TOKENS[1:14]],
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


def write_tokenizer_files(out_dir: str | Path, ranks_path: str | Path | None = None) -> Path:
    """Write tokenizer.json + tokenizer_config.json (with the chat template) into OUT_DIR."""
    ranks_path = Path(ranks_path or default_ranks_path())
    if not ranks_path.exists():
        raise FileNotFoundError(f"{ranks_path}: Qwen BPE ranks missing; run `bash launch/setup.sh` (it extracts them from the dashscope wheel)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer_json(load_ranks(ranks_path))
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), ensure_ascii=False, indent=2), encoding="utf-8")
    return out_dir


def tokenizer_dir(ranks_path: str | Path | None = None) -> Path:
    """The cached tokenizer folder, rebuilt when the ranks, the template or this builder change."""
    ranks_path = Path(ranks_path or default_ranks_path())
    key = hashlib.sha256()
    for part in (BUILDER_VERSION.encode(), ranks_path.read_bytes() if ranks_path.exists() else b"", CHAT_TEMPLATE_PATH.read_bytes()):
        key.update(part)
    target = cache_dir() / f"qwen2.5-tokenizer-{key.hexdigest()[:10]}"
    if not (target / "tokenizer_config.json").exists():
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        write_tokenizer_files(staging, ranks_path)
        try:
            os.replace(staging, target)
        except OSError:  # another process won the race; its folder is identical
            pass
    return target


@lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None):
    """A transformers tokenizer: from a model folder when given, else the rebuilt Qwen2.5 one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or tokenizer_dir()))


def chat_token_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of MESSAGES rendered by the tokenizer's chat template (the one template everywhere)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
