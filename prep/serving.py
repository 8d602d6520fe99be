"""Start, wait for, and stop a vLLM OpenAI-compatible server living in `.venv-vllm`.

The rest of medkd talks to vLLM over HTTP only (it cannot share the training environment), so the
teacher, the student's predictions, the tests and the demo all go through this one launcher.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prep.tiny_model import resolve_model  # recipes may name the tiny fixture as their model
from prep.paths import REPO_ROOT



@dataclass
class ServerSpec:
    """The `server:` section of teacher and predict recipes."""

    model: str                                  # a local folder or a hub id (GPU machines)
    served_model_name: str | None = None        # the name clients send as `model`
    host: str = "127.0.0.1"
    port: int = 0                               # 0 = pick a free port
    extra_args: list[str] = field(default_factory=list)   # e.g. [--tensor-parallel-size, "8"]
    env: dict[str, str] = field(default_factory=dict)     # e.g. {VLLM_CPU_KVCACHE_SPACE: "1"}
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> adapter folder (--enable-lora)
    max_lora_rank: int = 64                     # vLLM's --max-lora-rank; must be >= the adapter's r
    startup_timeout_s: float = 900.0
    api_key_env: str | None = None              # passed to vLLM as VLLM_API_KEY, never on argv


def vllm_python() -> str:
    python = os.environ.get("MEDKD_VLLM_PYTHON", str(REPO_ROOT / ".venv-vllm" / "bin" / "python"))
    if not Path(python).exists():
        raise FileNotFoundError(f"{python}: the vLLM environment is missing; run `bash launch/setup.sh`")
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def new_session_dying_with_parent() -> None:
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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

    @property
    def base_url(self) -> str:
        return f"http://{self.spec.host}:{self.port}/v1"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> "VLLMServer":
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **self.spec.env}
        if self.spec.api_key_env:
            if not os.environ.get(self.spec.api_key_env):
                raise RuntimeError(f"environment variable {self.spec.api_key_env} (the server's API key) is not set")
            env["VLLM_API_KEY"] = os.environ[self.spec.api_key_env]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        # Own process group, so stop() also ends vLLM's engine workers; and the server dies with its
        # parent, so a SIGKILLed run leaves no orphan server holding memory and a port.
        self.process = subprocess.Popen(command_line(self.spec, self.port), stdout=log, stderr=subprocess.STDOUT,
                                        env=env, preexec_fn=new_session_dying_with_parent)
        log.close()
        self.wait_healthy()
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        health = f"http://{self.spec.host}:{self.port}/health"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with status {self.process.returncode} while starting; "
                                   f"last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM server not healthy after {self.spec.startup_timeout_s:.0f} s; "
                           f"last lines of {self.log_path}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """`python -m launch.vllm_server MODEL [vllm args]`: serve in the foreground until Ctrl-C (for demos)."""
    argv = sys.argv[1:] if argv is None else argv
    spec = ServerSpec(model=argv[0], extra_args=argv[1:], port=8000)
    with VLLMServer(spec, REPO_ROOT / "runs" / "vllm-server.log") as server:
        print(f"serving {spec.model} at {server.base_url}", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()


def load_server_spec(source: str | Path | dict, overrides: list[str] | None = None) -> ServerSpec:
    """A serve recipe (path) or an inline `server:` mapping -> ServerSpec, with the tiny fixture resolved."""
    from prep.config import apply_overrides, build, read_yaml

    data = read_yaml(source) if isinstance(source, (str, Path)) else dict(source)
    spec = build(ServerSpec, apply_overrides(data, overrides), source if isinstance(source, (str, Path)) else "server")
    spec.model = str(resolve_model(spec.model))
    return spec
