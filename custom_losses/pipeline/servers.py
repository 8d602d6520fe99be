"""One vLLM server across adjacent steps that serve the same model with the same settings.

Each API step (teacher, soft labels, predict) starts its recipe's server and stops it when it ends; on GPUs a 7B
server takes one or two minutes to start and a 72B teacher five to ten. When the next step that runs serves the same
model under the same settings (the same composed serve recipe: model, served name, LoRA adapters, extra_args such as
--max-logprobs and --max-model-len, environment, chat template), the pipeline starts that server itself
(prep.api.serving.VLLMServer, its log under OUT/logs/) and tells each sharing step where it runs (`--server-url`,
added when the step starts, after its key is made: the URL is in no key). The step keeps its own recipe's server
spec for its model identity and cache keys, checks that the URL serves that model, and neither starts nor stops it.

The server is stopped before a step that trains (SFT, distill, merge: they need the machine), before a step that
serves something else, when the run ends and when a step fails; a SIGKILLed pipeline takes it along
(prep.api.process: the server's parent-death signal). Steps that neither serve nor train (the on-policy mix, the
score table, the submission) leave it running.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from custom_losses.pipeline.steps import COMMANDS, Decision, PipelineError, Step
from prep.api.serving import ServerSpec, VLLMServer
from prep.config import RecipeError
from prep.jsonio import InputError

SERVING = ("teacher", "softlabels", "predict")          # stage commands that start a server and take --server-url
LIGHT = ("onpolicy", "score", "submission")             # neither serve nor need the machine: a server may stay up
NO_STARTS = {"server_starts": 0, "server_start_s": 0.0}


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value after the last FLAG in ARGV, None when absent."""
    values = [argv[index + 1] for index, arg in enumerate(argv[:-1]) if arg == flag]
    return values[-1] if values else None


def step_server(step: Step) -> ServerSpec | None:
    """The server STEP's command would start, worked out as the stage itself works it out (its recipe composed
    with the step's overlays and overrides; predict's --model, adapter and chat template); None for a step that
    starts none (not an API step, or a recipe asking a running endpoint) or whose model is not there yet."""
    if step.recipe is None or step.recipe.folder not in SERVING:
        return None
    from prep.stages import predict, softlabels, teacher  # imported late: soft labels load transformers
    from prep.stages.api_stage import endpoint_target

    stage = {"teacher": teacher, "softlabels": softlabels, "predict": predict}[step.recipe.folder]
    run = step.recipe
    try:
        recipe = stage.validate_recipe(run.recipe, list(run.overlays), list(run.overrides))
        if recipe.server is None:
            return None
        if stage is predict:
            return predict.resolve_target(recipe, flag_value(step.argv, "--model")).spec
        return endpoint_target(recipe.client, recipe.server).spec
    except (RecipeError, InputError, FileNotFoundError, ValueError, RuntimeError):
        return None     # the step says what is wrong in its own sentence, when it runs


def own_chat_template(model: str) -> str | None:
    """The chat template a model folder carries (chat_template.jinja, else tokenizer_config.json's), which vLLM
    uses when not given --chat-template; None for a hub id or a folder without one."""
    folder = Path(model)
    try:
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        return None
    return template if isinstance(template, str) else None


def share_key(spec: ServerSpec) -> str:
    """What a server does, as JSON: two steps whose specs give the same key are served alike by one server. The
    timeouts and the documented machine shape are left out (they shape no answer); a --chat-template whose file
    holds the template the model folder carries is left out too, since vLLM renders with that one when none is
    given (predict pins the training template; a tiny demo base model carries the very same one)."""
    args = [str(arg) for arg in spec.extra_args]
    own = own_chat_template(spec.model)
    kept: list[str] = []
    index = 0
    while index < len(args):
        if args[index] == "--chat-template" and index + 1 < len(args) and own is not None:
            try:
                same = Path(args[index + 1]).read_text(encoding="utf-8") == own
            except OSError:
                same = False
            if same:
                index += 2
                continue
        kept.append(args[index])
        index += 1
    return json.dumps({"model": spec.model, "served_model_name": spec.served_model_name, "host": spec.host,
                       "port": spec.port, "extra_args": kept, "env": spec.env, "lora_modules": spec.lora_modules,
                       "max_lora_rank": spec.max_lora_rank if spec.lora_modules else None,
                       "api_key_env": spec.api_key_env}, sort_keys=True)


def command_of(step: Step) -> str:
    """STEP's command, as COMMANDS names it (its recipe folder, or the tool it runs)."""
    modules = {module: name for name, module in COMMANDS.items()}
    return step.recipe.folder if step.recipe else modules.get(step.module, step.module)


class SharedServer:
    """The one server the pipeline holds for the steps that share it; a context manager that stops it on exit
    (the run's end, a failed step, an interrupt)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.server: VLLMServer | None = None
        self.key: str | None = None
        self.users: list[str] = []        # the steps that used the running server, for the log line

    def before(self, decisions: Sequence[Decision], index: int) -> tuple[str | None, dict[str, Any]]:
        """Before decision INDEX runs: the URL of the server it is to use (None: it starts its own, or serves
        nothing), and the starts made for it now ({server_starts, server_start_s}). A step that trains stops
        the server first; a step that serves something else stops it, and starts its own unless the next
        step that runs shares it, in which case the pipeline starts it here for both."""
        decision = decisions[index]
        if not decision.runs:
            return None, dict(NO_STARTS)
        command = command_of(decision.step)
        if command in LIGHT:
            return None, dict(NO_STARTS)
        spec = step_server(decision.step) if command in SERVING else None
        key = share_key(spec) if spec is not None else None
        if key is not None and key == self.key:
            self.users.append(decision.step.name)
            return self.server.base_url, dict(NO_STARTS)
        self.stop()     # a step that trains, serves another model, or whose server is not known here
        if key is None or key != self.next_key(decisions, index):
            return None, dict(NO_STARTS)
        return self.start(spec, key, decision.step.name)

    @staticmethod
    def next_key(decisions: Sequence[Decision], index: int) -> str | None:
        """The serve key of the next step after INDEX that runs and serves, when no step that trains or serves
        nothing comes between (skipped and light steps are passed over); else None."""
        for decision in decisions[index + 1:]:
            command = command_of(decision.step)
            if not decision.runs or command in LIGHT:
                continue
            if command not in SERVING:
                return None
            spec = step_server(decision.step)
            return share_key(spec) if spec is not None else None
        return None

    def start(self, spec: ServerSpec, key: str, name: str) -> tuple[str, dict[str, Any]]:
        log_path = self.logs / f"server-{name}.log"
        print(f"[pipeline] {name}: starting the vLLM server it shares with the next step(s) ({spec.model}; log "
              f"{log_path})", flush=True)
        try:
            server = VLLMServer(spec, log_path).start()
        except (RuntimeError, FileNotFoundError) as err:   # prep.api.preconditions.Unmet is a RuntimeError
            raise PipelineError(f"step {name}: the vLLM server it shares did not start: {err}") from None
        self.server, self.key, self.users = server, key, [name]
        print(f"[pipeline] {name}: vLLM server ready at {server.base_url} in {server.start_s:.0f} s", flush=True)
        return server.base_url, {"server_starts": 1, "server_start_s": server.start_s}

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.stop()
        print(f"[pipeline] stopped the vLLM server shared by {', '.join(self.users)}", flush=True)
        self.server, self.key, self.users = None, None, []

    def __enter__(self) -> SharedServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def step_starts(step: Step, status: str) -> dict[str, Any]:
    """The server starts STEP made itself (its summary.json's server_started, server_start_s), when it ran."""
    out = flag_value(step.argv, "--out")
    if status != "ran" or out is None or command_of(step) not in SERVING:
        return dict(NO_STARTS)
    try:
        summary = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return dict(NO_STARTS)
    return {"server_starts": int(bool(summary.get("server_started"))),
            "server_start_s": float(summary.get("server_start_s") or 0.0)}


def add_starts(row: dict[str, Any], pipeline: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    """ROW with the servers started for its step: by the pipeline (PIPELINE) and by the step itself (STEP)."""
    row["server_starts"] = pipeline["server_starts"] + step["server_starts"]
    row["server_start_s"] = round(pipeline["server_start_s"] + step["server_start_s"], 1)
    return row
