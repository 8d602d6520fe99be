"""The student answers every case through vLLM, then a validated submission is written.

    python -m launch.predict --config recipes/predict/tiny-cpu.yaml --input data/sample_cases.jsonl \
        --out runs/predict-tiny [--model MODEL_OR_ADAPTER] [--limit N] [--resume | --fresh] [--overlay FILE]... \
        [--set KEY=VALUE]... [--no-progress]

MODEL_OR_ADAPTER is a merged model folder (or hub id), or a PEFT adapter folder, served on its base
model with --enable-lora. The recipe either starts the vLLM server (its server: section) or names a
running one (client.base_url, --set server=null). Outputs under OUT: cache.jsonl, predictions.jsonl
(id, reason, diseases, raw_valid, filled), submission.jsonl (only when every case has an answer,
after validation), summary.json, predict.log (and server.log). A case left without an answer stops
the run with its id listed; `--set fill_missing.enabled=true` fills such cases by a retry at a higher
temperature. Relative --input and --out are relative to the working directory (--model, which may
also be a hub id or a served name, is looked for there, then in the repository). Exit status: 0
submission written, 1 no submission, 2 bad input, an endpoint problem, OUT in use by another run or
too little free disk, 3 the disk filled while writing (free space and run the same command again).
"""
from __future__ import annotations

import sys

from prep.jsonio import DiskFull
from prep.stages.api_stage import STAGE_ERRORS, disk_full, fail, stage_parser
from prep.stages.predict import PredictStage


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m launch.predict", __doc__, "predict recipe (recipes/predict/*.yaml)",
                          "output folder (cache, predictions, submission, summary, log)",
                          "answer only the first N cases")
    parser.add_argument("--model", help="merged model folder or hub id, or a LoRA adapter folder (default: the "
                                        "recipe's server.model; with server=null, the served model name to ask)")
    args = parser.parse_args(argv)
    try:
        stage = PredictStage.from_files(args.config, args.input, model=args.model, limit=args.limit,
                                        overlays=args.overlays, overrides=args.overrides)
        summary = stage.run(args.out, fresh=args.fresh, progress=not args.no_progress)
    except STAGE_ERRORS as err:
        return fail(err)
    except DiskFull as err:
        return disk_full(err)
    print(f"{summary['answered']}/{summary['cases']} cases answered ({summary['raw_valid']} valid JSON as generated, "
          f"{summary['filled']} filled, {summary['failed_requests']} failed requests); outputs in {args.out}",
          file=sys.stderr)
    if summary["error"]:
        hint = stage.next_step(summary)
        print(f"error: no submission written: {summary['error']}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 1
    print(f"submission: {summary['submission']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
