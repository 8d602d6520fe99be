"""Chat datasets in prep.stages.teacher's layout for the SFT tests, built by the same code path it uses.

Rows are {"id", "messages": [system, user, assistant], "agreement"} with messages from
prep.prompts.load_prompts().messages(case, Answer(...)): the assistant turn is answer_json's
canonical JSON, exactly what prep.stages.teacher writes to <run>/teacher/sft/{train,valid}.jsonl.
"""
from __future__ import annotations

from pathlib import Path

from prep.answers import Answer
from prep.jsonio import write_jsonl_atomic
from prep.paths import REPO_ROOT
from prep.prompts import load_prompts
from prep.records import Case, read_cases

SAMPLE_CASES = REPO_ROOT / "data" / "sample_cases.jsonl"

# Hand-written answers in the official style (numbered reasons citing the case; one or more diseases).
_DISEASES = ["急性扁桃体炎", "社区获得性肺炎", "2型糖尿病", "急性阑尾炎", "高血压病3级", "缺铁性贫血",
             "急性胃肠炎", "腰椎间盘突出症", "急性胆囊炎", "支气管哮喘", "泌尿系感染", "偏头痛"]


def answer_for(case: Case, index: int) -> Answer:
    chief = next((line.split(":", 1)[1].strip() for line in case.feature_content.splitlines()
                  if line.startswith("主诉")), "症状")
    disease = _DISEASES[index % len(_DISEASES)]
    return Answer(reason=f"1. 主诉{chief}。2. 结合查体与辅助检查，符合{disease}表现。", diseases=disease)


def chat_rows(cases: list[Case], answers: list[Answer] | None = None, agreement: float = 1.0) -> list[dict]:
    prompts = load_prompts()
    answers = answers or [answer_for(case, index) for index, case in enumerate(cases)]
    return [{"id": case.id, "messages": prompts.messages(case, answer), "agreement": agreement}
            for case, answer in zip(cases, answers)]


def sample_cases(limit: int | None = None) -> list[Case]:
    cases = read_cases(SAMPLE_CASES).cases
    return cases[:limit] if limit else cases


def write_sft_split(teacher_dir: Path, train: list[dict], valid: list[dict]) -> tuple[Path, Path]:
    """Write <teacher_dir>/sft/train.jsonl and valid.jsonl (the layout the recipes' data keys name)."""
    sft = Path(teacher_dir) / "sft"
    sft.mkdir(parents=True, exist_ok=True)
    return write_jsonl_atomic(sft / "train.jsonl", train), write_jsonl_atomic(sft / "valid.jsonl", valid)


def write_sample_sft(teacher_dir: Path, n_train: int = 8, n_valid: int = 2) -> tuple[Path, Path]:
    """The first N_TRAIN sample cases as train, the next N_VALID as valid."""
    rows = chat_rows(sample_cases())
    return write_sft_split(teacher_dir, rows[:n_train], rows[n_train:n_train + n_valid])


# ---- running launch.sft and reading what it wrote ------------------------------------------------

SFT_ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TRL_EXPERIMENTAL_SILENCE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_overrides(run: Path) -> list[str]:
    """The four keys that put a recipe's run under RUN (RUN/teacher/sft/ in, RUN/sft/ out), as the pipeline does."""
    return [f"output_dir={run}/sft", f"dataset_prepared_path={run}/sft/prepared",
            f"datasets.0.path={run}/teacher/sft/train.jsonl", f"test_datasets.0.path={run}/teacher/sft/valid.jsonl"]


def sft_args(recipe: str, overlays: list[str] = (), overrides: list[str] = (), run: Path | None = None) -> list[str]:
    """`python -m launch.sft` arguments: --config RECIPE --overlay ... --set ... (RUN's paths last)."""
    sets = [*overrides, *(run_overrides(run) if run else [])]
    return ["--config", recipe, *[a for o in overlays for a in ("--overlay", o)],
            *[a for s in sets for a in ("--set", s)]]


def sft_command(args: list[str]) -> list[str]:
    import sys

    return [sys.executable, "-m", "launch.sft", *args]


def run_sft(args: list[str], timeout: float = 600):
    """`python -m launch.sft ARGS` as a user runs it; returns the CompletedProcess (stdout+stderr in .stdout)."""
    import os
    import subprocess

    return subprocess.run(sft_command(args), cwd=REPO_ROOT, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, **SFT_ENV})


def run_sft_interrupted(args: list[str], checkpoint: Path, timeout: float = 600) -> str:
    """Start `python -m launch.sft ARGS`, kill it (the whole process group, as Ctrl-C or a lost node would)
    once CHECKPOINT has been written completely (the Trainer writes trainer_state.json last); its output."""
    import os
    import signal
    import subprocess
    import threading
    import time

    process = subprocess.Popen(sft_command(args), cwd=REPO_ROOT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env={**os.environ, **SFT_ENV}, start_new_session=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and not (checkpoint / "trainer_state.json").is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {checkpoint} after {timeout:.0f} s:\n{''.join(chunks)[-3000:]}")
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        reader.join(timeout=10)
    return "".join(chunks)


def logged_losses(log_text: str) -> list[float]:
    """The per-step training losses the HF Trainer logged (`{'loss': '11.94', ...}` lines), in order."""
    import re

    return [float(value) for value in re.findall(r"\{'loss': '([0-9.]+)'", log_text)]


def prepared_datasets(prepared_dir: Path) -> list:
    """Every tokenised dataset Axolotl saved under dataset_prepared_path."""
    from datasets import load_from_disk

    return [load_from_disk(str(folder)) for folder in sorted(Path(prepared_dir).iterdir()) if folder.is_dir()]


# ---- Axolotl's own checks, in a subprocess (its import patches libraries this test process shares) --

AXOLOTL_CHECKS = r'''
import json, sys
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault

def fields_of(cls):
    names = set()
    for name, info in cls.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    return names

results = {}
for job in json.load(sys.stdin):
    label, kind = job["label"], job["kind"]
    try:
        if kind == "validate":
            cfg = DictDefault(job["config"])
            prepare_plugins(cfg)
            from axolotl.integrations.config import merge_input_args
            from axolotl.utils.schemas.datasets import SFTDataset
            schema = merge_input_args()[0] if cfg.get("plugins") else __import__(
                "axolotl.utils.schemas.config", fromlist=["x"]).AxolotlConfigWCapabilities
            known = fields_of(schema)
            unknown = sorted(set(job["config"]) - known) if job.get("strict_keys") else []
            unknown += sorted(f"datasets.{key}" for ds in job["config"].get("datasets") or [] for key in ds
                              if key not in fields_of(SFTDataset)) if job.get("strict_keys") else []
            validated = validate_config(cfg, capabilities=job["capabilities"], env_capabilities={"torch_version": "2.13.0"})
            results[label] = {"ok": True, "unknown_keys": unknown,
                              "datasets": [dict(ds) for ds in validated.get("datasets") or []],
                              "values": {key: validated.get(key) for key in job.get("report", [])}}
        elif kind == "known_keys":
            from axolotl.utils.schemas.config import AxolotlConfigWCapabilities
            results[label] = {"ok": True, "unknown_keys": sorted(set(job["keys"]) - fields_of(AxolotlConfigWCapabilities))}
        elif kind == "excess_length":
            from datasets import Dataset
            from axolotl.utils.data.utils import handle_long_seq_in_dataset
            rows = {"input_ids": [[1] * n for n in job["lengths"]], "labels": [[1] * n for n in job["lengths"]],
                    "attention_mask": [[1] * n for n in job["lengths"]]}
            cfg = DictDefault({"excess_length_strategy": job["strategy"], "sequence_len": job["sequence_len"],
                               "dataset_num_proc": 1, "is_preprocess": True})
            try:
                kept = handle_long_seq_in_dataset(Dataset.from_dict(rows), job["sequence_len"], cfg)
                results[label] = {"ok": True, "kept": len(kept)}
            except ValueError as err:
                results[label] = {"ok": True, "raised": str(err)[:300]}
    except Exception as err:
        results[label] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}
print("MEDKD-AXOLOTL-CHECKS " + json.dumps(results, default=str))
'''


def axolotl_checks(jobs: list[dict], timeout: float = 300) -> dict[str, dict]:
    """Run Axolotl's config validation / length handling on JOBS in one fresh process."""
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", AXOLOTL_CHECKS], input=json.dumps(jobs, default=str), text=True,
                            capture_output=True, timeout=timeout, cwd=REPO_ROOT, env={**os.environ, **SFT_ENV})
    marker = "MEDKD-AXOLOTL-CHECKS "
    lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
    if not lines:
        raise RuntimeError(f"Axolotl checks produced no result (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len(marker):])
