"""Build the tiny random-weight Qwen2 fixture (real Qwen2.5 tokenizer) and print its folder.

    python -m launch.tiny_model [--out DIR]

Without --out it is built once into the cache (.cache/tiny-qwen2.5-<hash>, or $MEDKD_CACHE) and
reused; recipes name it by prep.qwen.TINY_MODEL_NAME.
"""
from __future__ import annotations

import argparse
import sys

from prep.testing.tiny_model import build_tiny_model, tiny_model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write here instead of the cache")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out) if args.out else tiny_model_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
