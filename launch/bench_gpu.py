"""Benchmark one GPU at real shapes with random weights: the loss, an SFT step, and a distill step packed and not.
Each part prints its tokens per second, model-FLOPs utilisation and peak memory against the memory model's
prediction; the last line is `key=value` for the headline figures.

Reads: the cases whose lengths the steps use (--cases), the SFT and distill recipes named below,
data/models/qwen2.5-7b-instruct.json.
Writes: a random-weight Qwen2.5-7B-Instruct into .cache/ (built once, 15 GB); the results on stdout.

Example:
    python -m launch.bench_gpu --cpu-tiny

On one H100/H200 (custom_losses.checks.gpu_bench says what is measured and how the FLOPs are counted):
  * bench_kd_loss at hidden 3584 in bf16, 2048 and 4096 answer tokens: our chunked top-k KD loss, full-logits KD,
    TRL's chunked CE and Axolotl's fused top-k KD (when Axolotl imports), each in a fresh process;
  * on a random-weight Qwen2.5-7B-Instruct (data/models/qwen2.5-7b-instruct.json, built once into .cache/,
    15 GB): an SFT step of recipes/sft/qwen2.5-7b-instruct-lora-zero2.yaml and distill steps of
    recipes/distill/qwen2.5-7b-instruct-lora-multi-gpu.yaml packed and unpacked (bf16 LoRA, one process,
    DeepSpeed dropped), plus the two QLoRA recipes when bitsandbytes imports: tokens/s, model-FLOPs utilisation
    against the card's dense bf16 peak (target >= 40 % for bf16 LoRA at a packed 4096-token row), peak memory
    against custom_losses.train.memory's prediction.
Each missing optional module (vllm, bitsandbytes, flash_attn, liger_kernel, axolotl, deepspeed, trl) is one
`skip` line saying what is left out. `--cpu-tiny` runs the same code at tiny shapes on a CPU (the tiny Qwen2
config, the recipes' cpu-tiny overlays, hidden 64 and vocabulary 4096 in the loss): what the test suite runs.
The last line is `key=value` for the headline figures (nan where a part was skipped).

On a rented or air-gapped box with Python 3.11/3.12, CUDA and torch already installed:
  1. here: `python -m launch.tiny_model` (builds the tokenizer into .cache/), then copy the repo with .cache/;
  2. bring wheels for what the box lacks (`pip download --no-deps` here for its Python and platform):
     transformers==5.16.1 peft==0.20.0 accelerate==1.13.0 safetensors tokenizers huggingface-hub pyyaml
     (the pins in constraints.txt), and for the distill steps trl==1.9.0 datasets==4.8.4 with datasets' needs
     (pyarrow, dill, multiprocess, xxhash, fsspec, pandas); bitsandbytes for the QLoRA steps;
  3. there: `pip install --no-index --no-deps wheels/*.whl`, then
     `PYTHONPATH=. HF_HUB_OFFLINE=1 python -m launch.bench_gpu 2>&1 | tee bench_gpu.log` (not yet run on a GPU;
     most of its time goes to loading the 15 GB model for each step and compiling kernels).
"""
from __future__ import annotations

import sys

from custom_losses.checks.gpu_bench import BenchPlan, LossSettings, run_bench
from custom_losses.checks.loss_bench import QWEN25_7B_HIDDEN, TRL_CHUNK
from prep.cli import command_parser
from prep.config import RecipeError
from prep.jsonio import InputError
from prep.paths import REPO_ROOT
from prep.qwen import VOCAB_ROWS

SHARED_CASES = REPO_ROOT.parent / "shared" / "data" / "healthai2025" / "camp_data_step_1_without_answer.jsonl"
SAMPLE_CASES = REPO_ROOT / "data" / "sample_cases.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("launch.bench_gpu", __doc__, "For launch.bench_gpu, 1 means a step failed (its line says which).")
    parser.add_argument("--cases", help="cases whose lengths the training steps use (default: the competition's "
                                        "step-one cases if present and not --cpu-tiny, else data/sample_cases.jsonl)")
    parser.add_argument("--steps", type=int, help="optimiser steps per training part, the first a warm-up "
                                                  "(default 4 on a GPU, 2 with --cpu-tiny)")
    parser.add_argument("--no-qlora", action="store_true", help="leave out the QLoRA recipes")
    parser.add_argument("--cpu-tiny", action="store_true", help="tiny shapes on the CPU (what the tests run)")
    parser.add_argument("--import-name", action="append", default=[], metavar="MODULE=NAME",
                        help="look an optional module up under another name (a missing name shows its skip line)")
    args = parser.parse_args(argv)

    import torch

    if not args.cpu_tiny and not torch.cuda.is_available():
        print("error: no CUDA GPU visible; --cpu-tiny runs the same code at tiny shapes on the CPU", file=sys.stderr)
        return 2
    try:
        names = dict(item.split("=", 1) for item in args.import_name)
    except ValueError:
        print(f"error: --import-name wants MODULE=NAME, got {args.import_name}", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu_tiny else "cuda"
    # The tiny run renders the 12 bundled cases: tokenising 3000 real ones costs a CPU more than the steps.
    cases = args.cases or str(SHARED_CASES if SHARED_CASES.exists() and not args.cpu_tiny else SAMPLE_CASES)
    plan = BenchPlan(cases=cases, tiny=args.cpu_tiny, steps=args.steps or (2 if args.cpu_tiny else 4),
                     qlora=not args.no_qlora and not args.cpu_tiny, import_names=names)
    if args.cpu_tiny:
        loss = LossSettings(seqs=[64], hidden=64, vocab=4096, k=20, dtype="float32", chunk=TRL_CHUNK,
                            repeats=1, fresh_process=False)
    else:
        loss = LossSettings(seqs=[2048, 4096], hidden=QWEN25_7B_HIDDEN, vocab=VOCAB_ROWS, k=20, dtype="bfloat16",
                            chunk=TRL_CHUNK, repeats=5, fresh_process=True)
    try:
        return run_bench(plan, loss, device)
    except (RecipeError, InputError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
