"""launch.pipeline: bad input stops it before any step; SIGKILL inside each stage-one step, then the
same command finishes with every case exactly once and a valid submission."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from prep.jsonio import read_appended, read_jsonl
from prep.pipeline import build_plan, validate_recipe
from prep.submission import check_submission
from tests.conftest import REPO_ROOT, SAMPLE_CASES

RECIPES = REPO_ROOT / "recipes"
TINY = RECIPES / "pipeline" / "tiny-cpu.yaml"


def write_recipe(tmp_path: Path, edit) -> Path:
    recipe = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    recipe["out"] = str(tmp_path / "run")
    edit(recipe)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def run_pipeline(recipe: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The pipeline command on this machine as a CPU machine (no GPU visible, whatever is installed)."""
    return subprocess.run([sys.executable, "-m", "launch.pipeline", "--config", str(recipe), *extra], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def corrupt_cases(tmp_path: Path) -> str:
    lines = SAMPLE_CASES.read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3][:40]  # a torn line
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def unknown_teacher_key(tmp_path: Path) -> str:
    teacher = yaml.safe_load((REPO_ROOT / "recipes/teacher/local-tiny-vllm.yaml").read_text(encoding="utf-8"))
    teacher["sampling"]["temprature"] = 0.5
    path = tmp_path / "teacher.yaml"
    path.write_text(yaml.safe_dump(teacher), encoding="utf-8")
    return str(path)


BAD = {
    "corrupt case line": (lambda r, t: r.update(train_cases=corrupt_cases(t)), r"cases.jsonl:4: invalid JSON"),
    "missing key": (lambda r, t: r["stage1"].pop("teacher"), "key 'stage1.teacher': missing (required)"),
    "wrong type": (lambda r, t: r.update(min_free_disk_gb="lots"), "key 'min_free_disk_gb': expected float, got str"),
    "unknown key": (lambda r, t: r["stage1"].update(teachr="x"), "key 'stage1.teachr': unknown key (did you mean 'stage1.teacher'?)"),
    "unknown key in a stage recipe": (lambda r, t: r["stage1"].update(teacher=unknown_teacher_key(t)),
                                      "key 'sampling.temprature': unknown key (did you mean 'sampling.temperature'?)"),
    "missing stage recipe": (lambda r, t: r["stage2"].update(distill="recipes/distill/nope.yaml"), "recipes/distill/nope.yaml"),
    "bad score setting": (lambda r, t: r["score"].update(set=["fuzzy_threshold=2"]),
                          "fuzzy_threshold must be in (0, 1], got 2"),
    "GPU recipe without a GPU": (lambda r, t: r["stage1"].pop("sft_overlays"), "needs a CUDA GPU"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_stops_before_any_step(tmp_path, name):
    edit, message = BAD[name]
    recipe = write_recipe(tmp_path, lambda r: edit(r, tmp_path))
    started = time.monotonic()
    result = run_pipeline(recipe)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # No step started: a step's first act is to open its log under logs/ and its stamp goes to stamps/.
    assert not (tmp_path / "run" / "logs").exists() and not (tmp_path / "run" / "stamps").exists()
    assert ": running (log" not in result.stdout
    assert time.monotonic() - started < 90


def test_plan_passes_every_setting_as_the_stage_commands_own_flags(tmp_path):
    recipe = write_recipe(tmp_path, lambda r: r["score"].update(set=["fuzzy_threshold=0.6"]))
    plan = {step.name: step.argv for step in build_plan(validate_recipe(recipe))}
    out = tmp_path / "run"
    assert list(plan) == ["teacher", "sft", "merge", "predict-base", "predict-stage1", "softlabels", "distill",
                          "predict-stage2", "score", "submission"]
    # Recipe and case paths are absolute: the steps run in the repository wherever the pipeline started.
    assert plan["teacher"][1:5] == ["-m", "launch.teacher", "--config", f"{RECIPES}/teacher/local-tiny-vllm.yaml"]
    assert plan["teacher"][-2:] == ["--set", "split.valid_fraction=0.34"]
    sft = plan["sft"]
    assert sft[1:3] == ["-m", "launch.sft"] and "--run" not in sft
    assert sft[sft.index("--overlay") + 1] == f"{RECIPES}/sft/overrides/cpu-tiny.yaml"
    sets = [sft[i + 1] for i, arg in enumerate(sft) if arg == "--set"]
    assert sets == [f'output_dir="{out}/stage1/sft"', f'dataset_prepared_path="{out}/stage1/sft/prepared"',
                    f'datasets.0.path="{out}/stage1/teacher/sft/train.jsonl"',
                    f'test_datasets.0.path="{out}/stage1/teacher/sft/valid.jsonl"']
    assert plan["merge"][1:] == ["-m", "launch.merge", f"{out}/stage1/sft"]
    distill = plan["distill"]
    assert distill[distill.index("--overlay") + 1] == f"{RECIPES}/distill/overrides/cpu-tiny.yaml"
    assert [distill[i + 1] for i, arg in enumerate(distill) if arg == "--set"] == [
        f'dataset_path="{out}/stage2/softlabels"', f'output_dir="{out}/stage2/distill"',
        f'model_name_or_path="{out}/stage1/merged"']
    score = plan["score"]
    assert score[1:5] == ["-m", "launch.score", "--config", f"{RECIPES}/score/default.yaml"]
    assert score[-2:] == ["--set", "fuzzy_threshold=0.6"]
    assert score[score.index("--names") + 1:score.index("--names") + 4] == ["base", "stage1", "stage2"]
    assert plan["submission"][1:] == ["-m", "launch.submission", "write", str(SAMPLE_CASES),
                                      f"{out}/stage2/predict/predictions.jsonl", f"{out}/submission.jsonl"]


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the pipeline and the session of the step it runs: as if the machine lost power."""
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(child), signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


STAGE_ONE_STEPS = ["teacher", "sft", "merge", "predict-base", "predict-stage1"]


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_point(step: str, out: Path):
    """True once STEP is part-way through its real work (not just starting)."""
    log = out / "logs" / f"{step}.log"
    return {
        "teacher": lambda: _lines(out / "stage1" / "teacher" / "cache.jsonl") >= 1,
        "sft": lambda: log.exists() and "'loss'" in log.read_text(errors="replace"),
        "merge": lambda: log.exists() and log.stat().st_size > 0,
        "predict-base": lambda: _lines(out / "base" / "predict" / "cache.jsonl") >= 1,
        "predict-stage1": lambda: _lines(out / "stage1" / "predict" / "cache.jsonl") >= 1,
    }[step]


@pytest.mark.slow
def test_sigkill_inside_each_stage_one_step_then_rerun(tmp_path):
    recipe = write_recipe(tmp_path, lambda r: None)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "launch.pipeline", "--config", str(recipe), "--stages", "1"]
    for step in STAGE_ONE_STEPS:
        with open(tmp_path / f"pipeline-{step}.out", "w") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            reached, deadline = kill_point(step, out), time.monotonic() + 600
            while not reached():
                assert process.poll() is None, (tmp_path / f"pipeline-{step}.out").read_text()[-2000:]
                assert time.monotonic() < deadline, f"step {step} never got going"
                time.sleep(0.1)
            _kill_tree(process)
        assert not (out / "stamps" / f"{step}.json").exists(), f"{step} finished before the kill"
    final = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]

    cases = [json.loads(line)["id"] for line in SAMPLE_CASES.read_text(encoding="utf-8").splitlines()]
    teacher = out / "stage1" / "teacher"
    cache_keys = [row["key"] for row in read_appended(teacher / "cache.jsonl")]
    assert len(cache_keys) == len(set(cache_keys))
    train = [row["id"] for row in read_jsonl(teacher / "sft" / "train.jsonl")]
    valid = [row["id"] for row in read_jsonl(teacher / "sft" / "valid.jsonl")]
    rejected = [row["id"] for row in read_jsonl(teacher / "rejects.jsonl")] if (teacher / "rejects.jsonl").exists() else []
    assert sorted(train + valid + rejected) == sorted(cases)
    for predictions in (out / "base" / "predict" / "predictions.jsonl", out / "stage1" / "predict" / "predictions.jsonl"):
        ids = [row["id"] for row in read_jsonl(predictions)]
        assert len(ids) == len(set(ids)) and set(cases) <= set(ids)
    assert check_submission(SAMPLE_CASES, out / "submission.jsonl") == []
    assert (out / "scores" / "scores.png").exists()
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert [row["step"] for row in summary][:5] == STAGE_ONE_STEPS
