"""Serve a serve recipe with vLLM in the foreground until Ctrl-C, for demos or a teacher other machines ask. The
stage commands start and stop the server their recipe names by themselves; this command is for a server that
outlives one command: point a stage at it with `--set server=null --set client.base_url=URL`. A recipe's port 0
picks a free port (`--set port=8000` to fix one); the URL is printed once the server is healthy.

Reads: the serve recipe (recipes/serve/*.yaml) and the model it names.
Writes: the server's log (--log, default runs/serve/server.log).

Example:
    python -m launch.serve --config recipes/serve/tiny-cpu.yaml --set port=8000
"""
from __future__ import annotations

import sys
from pathlib import Path

from prep.api.serving import VLLMServer, load_server_spec
from prep.cli import command_parser, parse_command, print_config, recipe_arguments
from prep.stages.api_stage import STAGE_ERRORS, fail

NOTES = "For launch.serve, 0 follows Ctrl-C and 1 means the server died (the cause line of its log follows)."


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("launch.serve", __doc__, NOTES)
    recipe_arguments(parser, "serve recipe (recipes/serve/*.yaml)")
    parser.add_argument("--log", type=Path, default=Path("runs/serve/server.log"), help="the server's log file")
    args = parse_command(parser, argv)
    if args.print_config:
        return print_config(args.config, args.overlays, args.overrides)
    try:
        server = VLLMServer(load_server_spec(args.config, args.overrides, args.overlays), args.log).start()
    except STAGE_ERRORS as err:
        return fail(err)
    print(f"serving {server.spec.model} as {server.spec.served_model_name or server.spec.model} at "
          f"{server.base_url} (log: {args.log}); Ctrl-C stops it", flush=True)
    try:
        status = server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
    print(f"error: the vLLM server exited with status {status}: {server.cause()} (its log: {args.log})",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
