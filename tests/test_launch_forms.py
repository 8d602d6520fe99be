"""The launch forms the README calls supported, each run as a user types it on the tiny model with a CPU overlay.

Supported, besides medkd's own commands (`python -m launch.sft`, `python -m launch.distill`, which pick the
launcher themselves):
- `axolotl train OUT/medkd-sft.yaml`: the composed Axolotl config launch.sft writes into its output folder
  (`--preflight-only` writes it and stops). Its paths are absolute, so it runs from any folder; launch.merge
  then folds the adapter as it does after launch.sft.
- `accelerate launch [--config_file recipes/accelerate/X.yaml] -m launch.distill --config ...`: under
  accelerate, launch.distill is the trainer itself (it starts no accelerate of its own).
Not supported, and said so in the README's "Launch forms": `axolotl train recipes/sft/X.yaml` (a recipe is
medkd's: overlays, `--set`, the tiny model's name and the preflight are not Axolotl's) and wrapping
`launch.sft` in accelerate or torchrun (it starts accelerate itself). The last test holds the README to it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.sft_fixtures import SFT_ENV, logged_losses, run_sft, sft_args, write_sample_sft

SFT_RECIPE = "recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml"
SFT_CPU = "recipes/sft/overrides/cpu-tiny.yaml"
DISTILL_RECIPE = "recipes/distill/qwen2.5-7b-instruct-qlora-1gpu.yaml"
DISTILL_CPU = "recipes/distill/overrides/cpu-tiny.yaml"
VENV_BIN = Path(sys.executable).parent


def user_env() -> dict[str, str]:
    """The environment of a user with the training environment active: its bin/ first on PATH (`axolotl train`
    re-executes `accelerate` from PATH)."""
    return {**os.environ, **SFT_ENV, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.mark.integration
def test_axolotl_train_runs_the_composed_config_from_any_folder(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    write_sample_sft(run / "teacher", n_train=4, n_valid=1)
    preflight = run_sft([*sft_args(SFT_RECIPE, [SFT_CPU], ["max_steps=2", "save_steps=2"], run=run),
                         "--preflight-only"], timeout=300)
    assert preflight.returncode == 0, preflight.stdout[-3000:]
    composed = run / "sft" / "medkd-sft.yaml"
    assert composed.is_file() and not (run / "sft" / "adapter_model.safetensors").exists()

    elsewhere = tmp_path / "elsewhere"   # not the repository root: the composed config's paths are absolute
    elsewhere.mkdir()
    result = subprocess.run([str(VENV_BIN / "axolotl"), "train", str(composed)], cwd=elsewhere, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=400, env=user_env())
    assert result.returncode == 0, result.stdout[-4000:]
    assert len(logged_losses(result.stdout)) == 2, result.stdout[-3000:]
    assert (run / "sft" / "adapter_model.safetensors").is_file()
    assert (run / "sft" / "checkpoint-2" / "trainer_state.json").is_file()

    from launch.merge import main as merge  # what follows a hand-run SFT, as after launch.sft's own

    assert merge([str(run / "sft")]) == 0
    assert (run / "merged" / "config.json").is_file() and list((run / "merged").glob("*.safetensors"))


@pytest.mark.integration
def test_accelerate_launch_runs_distill_as_the_trainer(tmp_path, qwen_tokenizer, tiny_model_dir):
    from tests.test_distill import save_softlabels

    softlabels, output = save_softlabels(qwen_tokenizer, tmp_path / "softlabels", 4), tmp_path / "distill"
    command = [str(VENV_BIN / "accelerate"), "launch", "--config_file", "recipes/accelerate/single-gpu.yaml",
               "-m", "launch.distill", "--config", DISTILL_RECIPE, "--overlay", DISTILL_CPU,
               "--set", f"dataset_path={softlabels}", "--set", f"output_dir={output}",
               "--set", "max_steps=2", "--set", "save_steps=2"]
    env = {key: value for key, value in user_env().items() if key != "MEDKD_TRAINING_WORKER"}
    result = subprocess.run(command, cwd=REPO_ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=400, env=env)
    assert result.returncode == 0, result.stdout[-4000:]
    # launch.distill trained in accelerate's process: it started no launcher of its own (that one logs its
    # command line and writes distill.log).
    assert "accelerate.commands.launch" not in result.stdout
    assert not (output / "distill.log").exists()
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "kd_loss" in entry] == [1, 2]
    assert (output / "adapter").is_dir() and (output / "merged" / "config.json").is_file()


def launch_forms_section() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^### Launch forms\n(.*?)(?=^#)", text, re.S | re.M)
    assert match, "README.md has no '### Launch forms' section"
    return match.group(1)


def test_readme_says_which_launch_forms_are_supported():
    section = launch_forms_section()
    for supported in ("python -m launch.sft", "python -m launch.distill", "axolotl train OUT/medkd-sft.yaml",
                      "accelerate launch", "-m launch.distill"):
        assert supported in section, supported
    assert re.search(r"[Nn]ot supported[^\n]*\n?[^\n]*axolotl train recipes/sft/", section), section
    assert re.search(r"launch\.sft[^\n]*(accelerate|torchrun)", section), section
    assert "tests/test_launch_forms.py" in section
