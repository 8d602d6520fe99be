"""One vLLM server across the adjacent steps that serve the same model alike (custom_losses.pipeline.servers), the
run order that makes them adjacent (custom_losses.pipeline.plan.run_order), and a stage told its server already
runs (--server-url: prep.api.serving.attach)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from custom_losses.pipeline.plan import build_plan, plan_pipeline, validate_recipe
from custom_losses.pipeline.run import run_steps, steps_until
from custom_losses.pipeline.servers import SharedServer, share_key, step_server
from custom_losses.pipeline.steps import Decision, PipelineError
from prep.api.serving import attach, load_server_spec
from prep.stages.api_stage import endpoint_target
from prep.stages.teacher import validate_recipe as teacher_recipe
from tests.conftest import REPO_ROOT, SAMPLE_CASES

TINY = REPO_ROOT / "recipes" / "pipeline" / "tiny-cpu.yaml"
TEACHER = REPO_ROOT / "recipes" / "teacher" / "local-tiny-vllm.yaml"
SERVE = REPO_ROOT / "recipes" / "serve" / "tiny-cpu.yaml"
RUN_ORDER = ["teacher", "softlabels", "predict-base", "sft", "merge", "predict-stage1", "distill", "predict-stage2",
             "student-1", "mix-1", "softlabels-1", "distill-1", "predict-round1", "score", "submission"]


def decisions_for(tmp_path: Path, skipped: tuple[str, ...] = ()) -> list[Decision]:
    """The demo's plan as decisions, every step running but SKIPPED (no keys made: they do not matter here)."""
    recipe = validate_recipe(TINY, overrides=[f"out={tmp_path / 'run'}"])
    return [Decision(step, "k", {}, None if step.name in skipped else "test") for step in build_plan(recipe)]


def test_the_run_order_puts_the_teachers_other_work_behind_it_and_until_keeps_its_steps(tmp_path):
    decisions = decisions_for(tmp_path)
    assert [d.step.name for d in decisions] == RUN_ORDER
    # --until counts in the stages' own order: soft labels (stage two) are not part of a run --until sft.
    assert [d.step.name for d in steps_until(decisions, "sft")] == ["teacher", "sft"]
    assert [d.step.name for d in steps_until(decisions, "predict-base")] == ["teacher", "predict-base", "sft", "merge"]
    assert [d.step.name for d in steps_until(decisions, "softlabels")] == RUN_ORDER[:6]
    assert [d.step.name for d in steps_until(decisions, "student-1")] == RUN_ORDER[:9]


def test_steps_serving_one_model_alike_share_and_any_serve_setting_parts_them(tmp_path):
    decisions = decisions_for(tmp_path)
    by_name = {d.step.name: d.step for d in decisions}
    keys = {name: share_key(step_server(by_name[name])) for name in ("teacher", "softlabels", "predict-base")}
    # predict pins the training chat template, which the tiny model carries itself: the same server.
    assert "--chat-template" in step_server(by_name["predict-base"]).extra_args
    assert len(set(keys.values())) == 1
    spec = step_server(by_name["teacher"])
    other_template = tmp_path / "template.jinja"
    other_template.write_text("{{ messages }}", encoding="utf-8")
    for changed in ({"extra_args": [*spec.extra_args, "--max-logprobs", "20"]},
                    {"extra_args": [*spec.extra_args, "--chat-template", str(other_template)]},
                    {"extra_args": [*spec.extra_args, "--max-model-len", "2048"]},
                    {"lora_modules": {"student-lora": str(tmp_path)}}, {"served_model_name": "other"},
                    {"env": {**spec.env, "VLLM_CPU_KVCACHE_SPACE": "2"}}):
        assert share_key(dataclasses.replace(spec, **changed)) != keys["teacher"], changed
    assert share_key(dataclasses.replace(spec, startup_timeout_s=1.0)) == keys["teacher"]   # shapes no answer


def test_the_pipeline_starts_a_server_only_for_a_step_whose_next_running_step_shares_it(tmp_path):
    decisions = decisions_for(tmp_path)
    index = {d.step.name: i for i, d in enumerate(decisions)}
    teacher_key = share_key(step_server(decisions[0].step))
    assert SharedServer.next_key(decisions, index["teacher"]) == teacher_key
    assert SharedServer.next_key(decisions, index["predict-base"]) is None          # SFT trains next
    assert SharedServer.next_key(decisions, index["softlabels-1"]) is None          # distill-1 trains next
    # Skipped steps are passed over: with soft labels up to date the teacher still shares with predict-base.
    skipping = decisions_for(tmp_path, skipped=("softlabels",))
    assert SharedServer.next_key(skipping, index["teacher"]) == teacher_key
    skipping = decisions_for(tmp_path, skipped=("softlabels", "predict-base"))
    assert SharedServer.next_key(skipping, index["teacher"]) is None
    # A step that runs nothing needing a server or the machine (the score table) leaves the server up; nothing
    # is started for a step that serves alone or a step that trains.
    shared = SharedServer(tmp_path)
    for name in ("score", "sft", "predict-base"):
        url, starts = shared.before(skipping, index[name])
        assert url is None and starts == {"server_starts": 0, "server_start_s": 0.0}


def server_pid(log: Path) -> int:
    found = re.findall(r"Started server process \[(\d+)\]", log.read_text(errors="replace"))
    assert found, log.read_text(errors="replace")[-2000:]
    return int(found[-1])


def session_alive(pid: int) -> list[str]:
    """The processes still in the server's session (it is its own session's leader): its engine workers too."""
    return subprocess.run(["pgrep", "-s", str(pid)], capture_output=True, text=True).stdout.split()


def port_open(url: str) -> bool:
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=2):
        return True
    return False


def gone(pid: int, url: str, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not session_alive(pid) and not port_open(url):
            return True
        time.sleep(0.5)
    return False


@pytest.mark.vllm
def test_a_stage_told_its_server_runs_uses_it_keeps_its_identity_and_starts_none(vllm_server, tmp_path):
    from launch.teacher import main as teacher_main

    out = tmp_path / "teacher"
    assert teacher_main(["--config", str(TEACHER), "--input", str(SAMPLE_CASES), "--limit", "3", "--out", str(out),
                         "--no-progress", "--server-url", vllm_server.base_url]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["server_started"] is False and summary["server_start_s"] == 0.0
    recipe = teacher_recipe(TEACHER)
    assert summary["model_identity"]["identity"] == endpoint_target(recipe.client, recipe.server).identity
    assert not (out / "server.log").exists()
    assert port_open(vllm_server.base_url)   # used, not stopped
    # A server that serves another model (or the same name from another folder) is refused, never asked.
    spec = load_server_spec(SERVE)
    for other in (dataclasses.replace(spec, served_model_name="other"), dataclasses.replace(spec, model=str(tmp_path))):
        with pytest.raises(RuntimeError, match="does not serve"):
            attach(other, vllm_server.base_url)
    with pytest.raises(RuntimeError, match="context of 4096"):
        attach(dataclasses.replace(spec, extra_args=[*spec.extra_args, "--max-model-len", "2048"]),
               vllm_server.base_url)


@pytest.mark.vllm
@pytest.mark.integration
def test_a_failed_step_leaves_no_shared_server_behind(tmp_path, capsys):
    recipe = validate_recipe(TINY, overrides=[f"out={tmp_path / 'run'}"])
    decisions = [d for d in plan_pipeline(recipe) if d.step.name in ("teacher", "softlabels")]
    teacher = decisions[0].step
    teacher.argv[teacher.argv.index("--input") + 1] = str(tmp_path / "missing.jsonl")   # fails after the start
    logs, stamps = tmp_path / "run" / "logs", tmp_path / "run" / "stamps"
    logs.mkdir(parents=True)
    stamps.mkdir()
    with pytest.raises(PipelineError, match="step teacher failed"):
        run_steps(decisions, logs, stamps, recipe.step_timeout_s, recipe.progress_interval_s)
    url = re.search(r"vLLM server ready at (\S+)", capsys.readouterr().out).group(1)
    pid = server_pid(logs / "server-teacher.log")
    assert "--server-url" in (logs / "teacher.log").read_text()     # the step was told the shared server's URL
    assert gone(pid, url, within_s=5), session_alive(pid)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_sigkilled_pipeline_takes_its_shared_server_along(tmp_path):
    out = tmp_path / "run"
    stdout = tmp_path / "pipeline.out"
    command = [sys.executable, "-m", "launch.pipeline", "--config", str(TINY), "--set", f"out={out}",
               "--until", "softlabels"]
    with open(stdout, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    pid = url = None
    try:
        deadline = time.monotonic() + 900
        while not (found := re.search(r"teacher: running .*", stdout.read_text(errors="replace"))):
            assert process.poll() is None, stdout.read_text()[-3000:]
            assert time.monotonic() < deadline, "the teacher step never started"
            time.sleep(0.5)
        assert found
        url = re.search(r"vLLM server ready at (\S+)", stdout.read_text()).group(1)
        pid = server_pid(out / "logs" / "server-teacher.log")
        assert session_alive(pid) and port_open(url)
        os.kill(process.pid, signal.SIGKILL)    # the pipeline alone, as the OOM killer or a lost shell would
        process.wait()
        assert gone(pid, url, within_s=60), session_alive(pid)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for leftover in session_alive(pid) if pid else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(leftover), signal.SIGKILL)
