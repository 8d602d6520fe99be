"""The learning benchmark: does the tiny student learn the known teacher's diagnoses, and does stage two (our KD
trainer) beat as many more steps of SFT? custom_losses.checks.learning_bench says what it runs and how.

Reads: the pipeline recipe (--config, default recipes/pipeline/learning-cpu.yaml) and its stage recipes and
overlays, the real step-one cases it names (../shared), data/known_teacher/.
Writes: OUT (the recipe's `out`, default runs/bench-learning): cases.jsonl, the teacher's and soft labels' folders,
each trained model, logs/, bench.json; the table on stdout, last line
`acc_base=A0 acc_stage1=A1 acc_sft_more=A2 acc_kd=A3 acc_kd_tail=A4 acc_kd_weighted=A5 seeds=3`.
Measured on the shared 2-core CPU under a load of 4-7 (other work): 56 minutes with 300 stage-one steps (Axolotl
~2-4 s a step there, the distill trainer ~0.5-2 s); about 25 minutes is the estimate on a quiet machine.
Without the competition data it says so and exits 0.

Example (the full run; a quick look: --limit 300 --sft-set max_steps=40 --distill-set max_steps=20 --seeds 1):
    python -m launch.bench_learning
"""
from __future__ import annotations

import sys

from custom_losses.checks.learning_bench import DEFAULT_RECIPE, BenchError, LearningBench, report
from prep.cli import command_parser
from prep.config import RecipeError
from prep.jsonio import InputError
from prep.paths import resolve_path


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("launch.bench_learning", __doc__)
    parser.add_argument("--config", default=DEFAULT_RECIPE, help="the pipeline recipe whose stage commands it runs")
    parser.add_argument("--out", help="run folder (default: the recipe's out)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of sft_more and kd (default 3)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N matched cases")
    parser.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of every SFT run's recipe (repeatable), e.g. max_steps=40")
    parser.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of every distill run's recipe (repeatable); its max_steps sets sft_more's too")
    args = parser.parse_args(argv)
    try:
        bench = LearningBench(args.config, args.out, args.seeds, args.limit, args.sft_set, args.distill_set)
        if not resolve_path(bench.recipe.train_cases).exists():
            print(f"no competition data at {bench.recipe.train_cases}: nothing to measure")
            return 0
        figures = bench.run()
    except (RecipeError, InputError, BenchError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(report(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
