"""Score prediction files against reference answers: disease-set P/R/F1, reason ROUGE-L, valid-JSON share.

    python -m launch.score REF.jsonl PRED.jsonl [PRED2.jsonl ...] --out DIR [--names a b]
                           [--config recipes/score/default.yaml] [--set fuzzy_threshold=0.6 ...]
                           [--curves NAME=PATH ...] [--contamination REPORT.json]

REF is JSONL of {id, reason, diseases} or prep.stages.teacher's sft/valid.jsonl ({id, messages}); each PRED
is a submission or predict's predictions.jsonl. Writes DIR/scores.md, scores.csv, scores.json,
scores.png and per_case.jsonl, and prints the table. Settings come from the score recipe; `--set`
overrides its keys. `--curves sft=runs/stage1/sft distill=runs/stage2/distill` also plots each run's
training curves (loss, eval loss; distill's kd, ce and diseases_weight_share) from its trainer_state.json
(PATH: that file, or the training output folder) into DIR/curves-NAME.png, linked from scores.md.
Bad input (recipe, reference, a trainer state, arguments): one sentence and exit 2.
"""
from __future__ import annotations

import argparse
import sys

from prep.config import RecipeError, add_recipe_arguments
from prep.eval.curves import curve_path, parse_curve_specs
from prep.eval.score import DEFAULT_RECIPE, console_report, read_contamination, score_files, validate_recipe
from prep.jsonio import InputError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.score", description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="reference answers: JSONL of {id, reason, diseases} or sft/valid.jsonl")
    parser.add_argument("predictions", nargs="+", help="submission or predictions JSONL files, one per run")
    parser.add_argument("--out", required=True, help="folder for scores.md/.csv/.json/.png and per_case.jsonl")
    parser.add_argument("--names", nargs="+", help="run labels, one per prediction file (default: from file names)")
    parser.add_argument("--curves", nargs="+", default=[], metavar="NAME=PATH",
                        help="training curves to plot: NAME=a trainer_state.json or a training output folder "
                             "(e.g. sft=runs/stage1/sft distill=runs/stage2/distill) -> DIR/curves-NAME.png")
    parser.add_argument("--contamination", metavar="REPORT.json",
                        help="a contamination report (the pipeline's scores/contamination.json) to add to scores.md")
    add_recipe_arguments(parser, f"score recipe (default {DEFAULT_RECIPE})", default=DEFAULT_RECIPE, overlays=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = validate_recipe(args.config, overrides=args.overrides)
        curves = parse_curve_specs(args.curves)
        contamination = read_contamination(args.contamination) if args.contamination else None
        runs = score_files(args.reference, args.predictions, args.names, settings, args.out, curves, contamination)
    except (InputError, RecipeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(console_report(runs), end="")
    print(f"wrote {args.out}/scores.md, scores.csv, scores.json, scores.png, per_case.jsonl")
    for name in curves:
        print(f"wrote {curve_path(args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
