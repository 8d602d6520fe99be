"""Score prediction files against reference answers: disease-set precision, recall and F1, reason ROUGE-L and the
share of valid JSON, one row per prediction file, and print the table. Settings come from the score recipe;
`--overlay` and `--set` change its keys. `--curves` also plots each training run's curves (loss, eval loss;
distill's kd, ce and diseases_weight_share) from its trainer_state.json into DIR/curves-NAME.png, linked from
scores.md.

Reads: the reference (JSONL of {id, reason, diseases}, or the teacher stage's sft/valid.jsonl of {id, messages}),
each prediction file (a submission or predict's predictions.jsonl), the score recipe (recipes/score/*.yaml), the
trainer states named by --curves.
Writes: under --out: scores.md, scores.csv, scores.json, scores.png, per_case.jsonl and curves-NAME.png.

Example:
    python -m launch.score runs/demo/stage1/teacher/sft/valid.jsonl runs/demo/stage1/predict/predictions.jsonl \\
        --out runs/scores --names stage1 --curves sft=runs/demo/stage1/sft
"""
from __future__ import annotations

import argparse
import sys

from prep.cli import command_parser, parse_command, print_config, recipe_arguments, user_error
from prep.config import RecipeError
from prep.eval.curves import curve_path, parse_curve_specs
from prep.eval.score import DEFAULT_RECIPE, console_report, read_contamination, score_files, validate_recipe
from prep.jsonio import InputError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("launch.score", __doc__)
    parser.add_argument("reference", help="reference answers: JSONL of {id, reason, diseases} or sft/valid.jsonl")
    parser.add_argument("predictions", nargs="+", help="submission or predictions JSONL files, one per run")
    parser.add_argument("--out", required=True, help="folder for scores.md/.csv/.json/.png and per_case.jsonl")
    parser.add_argument("--names", nargs="+", help="run labels, one per prediction file (default: from file names)")
    parser.add_argument("--curves", nargs="+", default=[], metavar="NAME=PATH",
                        help="training curves to plot: NAME=a trainer_state.json or a training output folder "
                             "(e.g. sft=runs/stage1/sft distill=runs/stage2/distill) -> DIR/curves-NAME.png")
    parser.add_argument("--contamination", metavar="REPORT.json",
                        help="a contamination report (the pipeline's scores/contamination.json) to add to scores.md")
    recipe_arguments(parser, f"score recipe (default {DEFAULT_RECIPE})", default=DEFAULT_RECIPE)
    return parse_command(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        return print_config(args.config, args.overlays, args.overrides)
    try:
        settings = validate_recipe(args.config, args.overlays, overrides=args.overrides)
        curves = parse_curve_specs(args.curves)
        contamination = read_contamination(args.contamination) if args.contamination else None
        runs = score_files(args.reference, args.predictions, args.names, settings, args.out, curves, contamination)
    except (InputError, RecipeError, ValueError) as err:
        return user_error(err)
    print(console_report(runs), end="")
    print(f"wrote {args.out}/scores.md, scores.csv, scores.json, scores.png, per_case.jsonl")
    for name in curves:
        print(f"wrote {curve_path(args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
