"""Let the student answer every case through vLLM, then write a validated submission. The model (--model) is a
merged model folder or hub id, or a PEFT adapter folder served on its base model with --enable-lora. The recipe
either starts the vLLM server (its server: section) or names a running one (client.base_url, --set server=null).
A case left without an answer stops the run with its id listed; `--set fill_missing.enabled=true` fills such cases
by a retry at a higher temperature.

Reads: the predict recipe (recipes/predict/*.yaml), the cases (--input), the model (--model).
Writes: under OUT: cache.jsonl, predictions.jsonl (id, reason, diseases, raw_valid, filled), submission.jsonl (only
when every case has an answer, after validation), summary.json, predict.log (and server.log).

Example:
    python -m launch.predict --config recipes/predict/tiny-cpu.yaml --input data/sample_cases.jsonl \\
        --out runs/predict-tiny --model runs/demo/stage1/merged

Relative --input and --out are relative to the working directory (--model, which may also be a hub id or a served
name, is looked for there, then in the repository).
"""
from __future__ import annotations

import sys

from prep.cli import parse_command, print_config
from prep.jsonio import DiskFull
from prep.stages.api_stage import STAGE_ERRORS, disk_full, fail, stage_parser
from prep.stages.predict import PredictStage


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m launch.predict", __doc__, "predict recipe (recipes/predict/*.yaml)",
                          "output folder (cache, predictions, submission, summary, log)",
                          "answer only the first N cases",
                          "For launch.predict, 1 means no submission was written (the message says why).")
    parser.add_argument("--model", help="merged model folder or hub id, or a LoRA adapter folder (default: the "
                                        "recipe's server.model; with server=null, the served model name to ask)")
    args = parse_command(parser, argv)
    if args.print_config:
        return print_config(args.config, args.overlays, args.overrides)
    try:
        stage = PredictStage.from_files(args.config, args.input, model=args.model, limit=args.limit,
                                        overlays=args.overlays, overrides=args.overrides)
        summary = stage.run(args.out, fresh=args.fresh, progress=not args.no_progress,
                                server_url=args.server_url)
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
