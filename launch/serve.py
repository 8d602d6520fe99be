"""Serve a serve recipe with vLLM in the foreground until Ctrl-C (demos, or a teacher other machines ask).

    python -m launch.serve --config recipes/serve/tiny-cpu.yaml [--overlay FILE]... [--set KEY=VALUE]... \
        [--log runs/serve/server.log]

The stage commands start and stop the server their recipe names by themselves; this command is for
a server that outlives one command: point a stage at it with `--set server=null --set
client.base_url=URL`. A recipe's port 0 picks a free port (`--set port=8000` to fix one); the URL
is printed once the server is healthy. Exit status: 0 after Ctrl-C, 1 when the server dies, 2 when
the recipe is bad or the server cannot start (with the last lines of its log).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prep.api.serving import VLLMServer, load_server_spec
from prep.config import add_recipe_arguments
from prep.stages.api_stage import STAGE_ERRORS, fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser, "serve recipe (recipes/serve/*.yaml)")
    parser.add_argument("--log", type=Path, default=Path("runs/serve/server.log"), help="the server's log file")
    args = parser.parse_args(argv)
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
    print(f"error: the vLLM server exited with status {status}; last lines of {args.log}:\n{server.log_tail()}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
