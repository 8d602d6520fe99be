"""Build the tiny random-weight Qwen2 fixture (with the real Qwen2.5 tokenizer) and print its folder. Without --out it
is built once into the cache and reused; recipes name it by prep.qwen.TINY_MODEL_NAME. Tests and the CPU demo use
it; its answers are well-formed nonsense.

Reads: the Qwen2.5 BPE ranks (built into .cache/ from the bundled files).
Writes: the model folder (.cache/tiny-qwen2.5-<hash>, or $MEDKD_CACHE, or --out); its path on stdout.

Example:
    python -m launch.tiny_model
"""
from __future__ import annotations

import sys

from prep.cli import command_parser
from prep.testing.tiny_model import build_tiny_model, tiny_model_dir


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("launch.tiny_model", __doc__)
    parser.add_argument("--out", help="write the model into this folder instead of the cache")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out) if args.out else tiny_model_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
