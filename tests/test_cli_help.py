"""Every command's surface: its --help (a description, what it reads and writes, an example, the one exit-code
table, help on every option, the common flags), --print-config, the doctor's --stages/--overlay, the pipeline's
--limit, and the shell entry points' --help.

The commands are found by globbing launch/*.py, so a new command is held to the same surface without a new test.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from prep.cli import exit_code_markdown, exit_code_text
from prep.paths import REPO_ROOT

COMMANDS = sorted(path.stem for path in (REPO_ROOT / "launch").glob("*.py") if path.stem != "__init__")
# The flags that mean the same everywhere: a command that takes the first needs the rest.
COMMON = {"--config": ("--overlay", "--set", "--print-config"), "--input": ("--out", "--limit")}
TINY_PIPELINE = "recipes/pipeline/tiny-cpu.yaml"
# Commands whose --config is not composed by prep.config.compose yet, so --overlay/--set/--print-config would be
# flags that do nothing: each entry is a gap to close, not a design.
NOT_COMPOSED = {"bench_learning": "custom_losses.checks.learning_bench reads its pipeline recipe by path only"}


def command_help(name: str, argv: list[str], capsys: pytest.CaptureFixture,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[str, argparse.ArgumentParser]:
    """The help text `python -m launch.NAME ARGV` prints, in this process, and the parser that printed it."""
    module = importlib.import_module(f"launch.{name}")
    printed: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.print_help

    def print_help(parser: argparse.ArgumentParser, file=None) -> None:
        printed.append(parser)
        original(parser, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", print_help)
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    assert stopped.value.code in (0, None), f"launch.{name} --help exited {stopped.value.code}"
    return capsys.readouterr().out, printed[-1]


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every argument of PARSER and of its sub-commands."""
    found = []
    for action in parser._actions:
        found.append(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += options(sub)
    return found


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_help_says_what_it_does_reads_writes_how_to_run_it_and_its_exit_codes(name, capsys, monkeypatch):
    text, parser = command_help(name, ["--help"], capsys, monkeypatch)
    body = text.split("\n\n", 1)[1]           # after the usage block
    paragraph = " ".join(body.split("\n\n", 1)[0].split())
    assert paragraph[0].isupper() and paragraph.endswith(".") and len(paragraph.split()) >= 15, paragraph
    assert re.search(r"^Reads: \S", text, re.MULTILINE), f"launch.{name}: no 'Reads:' line"
    assert re.search(r"^Writes: \S", text, re.MULTILINE), f"launch.{name}: no 'Writes:' line"
    example = re.split(r"\nExamples?\b[^\n]*:\n", text, maxsplit=1)
    assert len(example) == 2, f"launch.{name}: no 'Example:' section"
    assert re.search(rf"^\s+python -m launch\.{name}\b", example[1], re.MULTILINE), f"launch.{name}: no example line"
    assert exit_code_text() in text
    bare = [action.option_strings or action.dest for action in options(parser)
            if not action.help or action.help == argparse.SUPPRESS]
    assert bare == [], f"launch.{name}: options without help text"
    flags = {flag for action in options(parser) for flag in action.option_strings}
    for flag, others in COMMON.items():
        if flag in flags and not (flag == "--config" and name in NOT_COMPOSED):
            assert set(others) <= flags, f"launch.{name} takes {flag} but lacks {set(others) - flags}"


def test_sub_command_help_has_help_on_every_option(capsys, monkeypatch):
    for sub in ("check", "write"):
        text, _ = command_help("submission", [sub, "--help"], capsys, monkeypatch)
        assert f"python -m launch.submission {sub}" in text


def test_the_docs_exit_code_table_is_the_one_in_prep_cli():
    text = (REPO_ROOT / "docs" / "RELIABILITY.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- exit-codes:[^\n]*-->\n(.*?)\n<!-- /exit-codes -->", text, re.DOTALL)
    assert table and table.group(1) == exit_code_markdown()


RECIPES = {
    "teacher": ("recipes/teacher/local-tiny-vllm.yaml", "sampling.temperature", 0.125),
    "softlabels": ("recipes/softlabels/local-tiny-vllm.yaml", "sampling.temperature", 0.125),
    "predict": ("recipes/predict/tiny-cpu.yaml", "sampling.temperature", 0.125),
    "serve": ("recipes/serve/tiny-cpu.yaml", "port", 8123),
    "sft": ("recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml", "output_dir", "runs/printed"),
    "distill": ("recipes/distill/qwen2.5-7b-instruct-qlora-1gpu.yaml", "output_dir", "runs/printed"),
    "score": ("recipes/score/default.yaml", "fuzzy_threshold", 0.25),
    "estimate_memory": ("recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml", "sequence_len", 512),
    "bench_teacher": ("recipes/teacher/local-tiny-vllm.yaml", "sampling.max_tokens", 77),
    "pipeline": (TINY_PIPELINE, "out", "runs/printed"),
    "doctor": (TINY_PIPELINE, "out", "runs/printed"),
}


def dig(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_print_config_prints_the_composed_recipe_and_creates_nothing(name, tmp_path, capsys, monkeypatch):
    recipe, key, value = RECIPES[name]
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"overlaid_key": "from the overlay"}), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    module = importlib.import_module(f"launch.{name}")
    # Neither --input nor --out (nor score's positional files): --print-config needs only the recipe.
    code = module.main(["--config", str(REPO_ROOT / recipe), "--overlay", str(overlay), "--set", f"{key}={value}",
                        "--print-config"])
    printed = capsys.readouterr().out
    assert code == 0
    composed = yaml.safe_load(printed)
    assert dig(composed, key) == value and composed["overlaid_key"] == "from the overlay"
    assert list(work.iterdir()) == []


def test_every_command_that_takes_a_recipe_is_covered_by_the_print_config_test(capsys, monkeypatch):
    takes = [name for name in COMMANDS if name not in NOT_COMPOSED
             and "--config" in {flag for action in options(command_help(name, ["--help"], capsys, monkeypatch)[1])
                               for flag in action.option_strings}]
    assert sorted(takes) == sorted(RECIPES)


def test_print_config_of_a_bad_recipe_is_one_sentence_and_exit_2(tmp_path, capsys):
    from launch.teacher import main

    assert main(["--config", str(tmp_path / "missing.yaml"), "--print-config"]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_doctor_takes_the_pipelines_stages_and_overlays(monkeypatch, tmp_path):
    import launch.doctor

    seen = {}

    def diagnose(config, overrides, smoke, report, overlays):
        seen.update(config=config, overrides=overrides, overlays=overlays)
        return True

    monkeypatch.setattr(launch.doctor, "diagnose", diagnose)
    assert launch.doctor.main(["--config", TINY_PIPELINE, "--stages", "1", "--overlay", "o.yaml",
                               "--set", "out=x"]) == 0
    assert seen == {"config": TINY_PIPELINE, "overrides": ["out=x", "stages=[1]"], "overlays": ["o.yaml"]}


def test_the_doctor_composes_an_overlay_and_names_it_when_it_is_wrong(tmp_path):
    from custom_losses.checks.doctor import run_doctor
    from custom_losses.checks.machine import Machine

    overlay = tmp_path / "typo.yaml"
    overlay.write_text("stagez: [1]\n", encoding="utf-8")
    results = run_doctor(TINY_PIPELINE, [], Machine(), vllm_python=None, offline=True, overlays=[overlay])
    assert [result.check for result in results] == ["recipes"] and results[0].failed
    assert str(overlay) in results[0].line() and "stagez" in results[0].line()


@pytest.mark.integration
def test_the_doctor_with_an_overlay_and_stages_checks_stage_one_only(tmp_path):
    """The real load (every stage recipe validated, ~20 s): --stages 1 as an overlay or as the flag's override."""
    from custom_losses.checks.doctor import load

    overlay = tmp_path / "stage-one.yaml"
    overlay.write_text("stages: [1]\n", encoding="utf-8")
    for overrides, overlays in (([], [overlay]), (["stages=[1]"], [])):
        recipe = load(TINY_PIPELINE, overrides, 0, overlays=overlays)
        assert "distill" not in {step.name for step in recipe.steps} and "softlabels" not in recipe.validated


def test_pipeline_limit_is_in_the_plan_and_in_every_steps_key(tmp_path, capsys):
    from custom_losses.pipeline.plan import plan_pipeline, validate_recipe
    from launch.pipeline import main

    out = tmp_path / "run"
    assert main(["--config", TINY_PIPELINE, "--plan", "--limit", "3", "--set", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("--limit 3: a trial on the first 3") and "part of every step's key" in printed
    assert not out.exists()                          # --plan writes nothing

    recipe = validate_recipe(TINY_PIPELINE, overrides=[f"out={out}"])
    full, trial = plan_pipeline(recipe), {d.step.name: d for d in plan_pipeline(recipe, 3)}
    for decision in full:
        limited = trial[decision.step.name]
        assert limited.key != decision.key and limited.parts["limit"] == "3" and "limit" not in decision.parts
    told = {name for name, d in trial.items() if "--limit" in d.step.argv}
    assert told == {"teacher", "softlabels", "softlabels-1", "student-1"}      # the steps that read the case files
    assert trial["teacher"].step.argv[trial["teacher"].step.argv.index("--limit") + 1] == "3"
    assert str(out / "test_cases.first3.jsonl") in trial["submission"].step.argv


def test_pipeline_takes_overlays(tmp_path, capsys):
    from launch.pipeline import main

    overlay = tmp_path / "elsewhere.yaml"
    overlay.write_text(yaml.safe_dump({"out": str(tmp_path / "from-overlay"), "stages": [1]}), encoding="utf-8")
    assert main(["--config", TINY_PIPELINE, "--overlay", str(overlay), "--plan"]) == 0
    steps = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "teacher" in steps and "distill" not in steps


# ---- the shell entry points -------------------------------------------------------------------------------------

@pytest.fixture()
def shell_copy(tmp_path: Path) -> Path:
    """launch/run.sh, demo.sh and env.sh in a copy whose setup.sh only leaves a mark: what ran is visible."""
    (tmp_path / "launch").mkdir()
    for name in ("run.sh", "demo.sh", "env.sh"):
        shutil.copy(REPO_ROOT / "launch" / name, tmp_path / "launch" / name)
    (tmp_path / "launch" / "setup.sh").write_text("touch setup-ran\n", encoding="utf-8")
    return tmp_path


def run_shell(root: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PY"}
    return subprocess.run(["bash", str(root / "launch" / script), *args], capture_output=True, text=True,
                          cwd=root, env=env, timeout=60)


@pytest.mark.integration
@pytest.mark.parametrize("script", ["run.sh", "demo.sh"])
def test_shell_help_prints_usage_and_runs_no_setup(shell_copy, script):
    done = run_shell(shell_copy, script, "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: bash launch/{script}")
    assert not (shell_copy / "setup-ran").exists()


@pytest.mark.integration
def test_run_sh_without_a_recipe_prints_its_usage_and_exits_2(shell_copy):
    done = run_shell(shell_copy, "run.sh")
    assert done.returncode == 2 and done.stderr.startswith("usage: bash launch/run.sh")
    assert not (shell_copy / "setup-ran").exists()


@pytest.mark.integration
def test_run_sh_plan_skips_setup_when_the_environment_exists(shell_copy):
    python = shell_copy / ".venv" / "bin" / "python"
    with contextlib.suppress(FileNotFoundError):
        run_shell(shell_copy, "run.sh", TINY_PIPELINE, "--plan")       # no environment yet: setup runs
    assert (shell_copy / "setup-ran").exists()
    (shell_copy / "setup-ran").unlink()
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "pipeline $*"\n', encoding="utf-8")
    python.chmod(0o755)
    done = run_shell(shell_copy, "run.sh", TINY_PIPELINE, "--plan")
    assert done.returncode == 0 and done.stdout.strip() == f"pipeline -m launch.pipeline --config {TINY_PIPELINE} --plan"
    assert not (shell_copy / "setup-ran").exists()


REFUSALS = {   # a command and arguments it refuses in one sentence, before any work
    "onpolicy": lambda tmp: ["--teacher", str(tmp / "none"), "--student", str(tmp / "none.jsonl"), "--mix", "0.5",
                             "--seed", "1", "--round", "1", "--out", str(tmp / "answers.jsonl")],
    "merge": lambda tmp: [str(tmp / "no-run"), "--out", str(tmp / "merged")],
    "estimate_memory": lambda tmp: ["--config", str(tmp / "no-recipe.yaml")],
    "score": lambda tmp: [str(tmp / "none.jsonl"), str(tmp / "none.jsonl"), "--out", str(tmp / "scores")],
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_every_refusal_is_one_sentence_and_medkd_debug_adds_its_traceback(name, tmp_path, capsys, monkeypatch):
    """prep.cli.user_error is the one way a command refuses: `error: ...` and exit 2; MEDKD_DEBUG=1 (README's
    environment table) puts the traceback above the same sentence, for a bug report."""
    main = importlib.import_module(f"launch.{name}").main
    monkeypatch.delenv("MEDKD_DEBUG", raising=False)
    assert main(REFUSALS[name](tmp_path)) == 2
    plain = capsys.readouterr().err
    assert plain.startswith("error: ") and plain.count("\n") == 1 and "Traceback" not in plain, plain
    monkeypatch.setenv("MEDKD_DEBUG", "1")
    assert main(REFUSALS[name](tmp_path)) == 2
    debug = capsys.readouterr().err
    assert debug.startswith("Traceback (most recent call last)") and debug.endswith(plain), debug
