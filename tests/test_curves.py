"""What a run leaves to watch it by: tracking asked for by the recipes, and the report's training curves.

The curves read trainer_state.json files written by transformers' own TrainerState (the class the
Trainer saves); test_distill's real run checks them on a trainer's own log history."""
import os
import subprocess
from pathlib import Path

import pytest

from prep.eval.curves import KEYS, parse_curve_specs, plot_curves, read_curves, read_log_history, trainer_state_path
from prep.jsonio import InputError
from tests.conftest import REPO_ROOT

SFT_RECIPES = sorted((REPO_ROOT / "recipes" / "sft").glob("*.yaml"))
DISTILL_RECIPES = sorted((REPO_ROOT / "recipes" / "distill").glob("*.yaml"))


def save_state(path, log_history):
    from transformers import TrainerState

    path.parent.mkdir(parents=True, exist_ok=True)
    TrainerState(global_step=max((e.get("step", 0) for e in log_history), default=0),
                 log_history=log_history).save_to_json(str(path))
    return path


def distill_history(steps=10, eval_every=5):
    """Stage two's log: our trainer's per-step keys, an eval every EVAL_EVERY steps, the Trainer's closing summary."""
    history = []
    for step in range(1, steps + 1):
        history.append({"step": step, "epoch": step / steps, "loss": 5 - 0.3 * step, "kd_loss": 4 - 0.3 * step,
                        "ce_loss": 9 - 0.1 * step, "diseases_weight_share": 0.5 + 0.001 * step, "grad_norm": 1.0,
                        "learning_rate": 1e-4})
        if step % eval_every == 0:
            history.append({"step": step, "epoch": step / steps, "eval_loss": 4.5 - 0.2 * step,
                            "eval_kd_loss": 3.5 - 0.2 * step, "eval_runtime": 1.0})
    history.append({"step": steps, "train_runtime": 12.0, "train_loss": 3.0, "total_flos": 1.0})
    return history


def test_curves_hold_one_point_per_logged_step(tmp_path):
    history = distill_history()
    plotted = plot_curves(history, "distill", tmp_path / "distill.png")
    assert (tmp_path / "distill.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(plotted) == {"loss", "eval_loss", "kd_loss", "ce_loss", "eval_kd_loss", "diseases_weight_share"}
    for key, (steps, values) in plotted.items():
        logged = [entry for entry in history if key in entry]
        assert steps == [entry["step"] for entry in logged] and values == pytest.approx([e[key] for e in logged]), key
    assert len(plotted["loss"][0]) == 10 and len(plotted["eval_loss"][0]) == 2  # train_loss (the summary) is not loss
    # Stage one (Axolotl) logs loss and eval_loss only: one panel, its two lines.
    sft = [{"step": s, "loss": 2.0 / s, "ppl": 9.0} for s in range(1, 17)] + [{"step": 8, "eval_loss": 1.0}]
    assert {key: len(xy[0]) for key, xy in plot_curves(sft, "sft", tmp_path / "sft.png").items()} == \
        {"loss": 16, "eval_loss": 1}


def test_a_training_folder_is_read_from_its_own_state_else_its_last_checkpoint(tmp_path):
    sft = tmp_path / "sft"  # Axolotl's layout: the state only in checkpoint-N/
    save_state(sft / "checkpoint-8" / "trainer_state.json", distill_history(8))
    last = save_state(sft / "checkpoint-16" / "trainer_state.json", distill_history(16))
    (sft / "checkpoint-24").mkdir()  # cut off while saving: no state, not a candidate
    assert trainer_state_path(sft) == last
    assert read_log_history(sft)[1][-1]["train_runtime"] == 12.0
    own = save_state(sft / "trainer_state.json", distill_history(16))  # distill's layout: output_dir's own wins
    assert trainer_state_path(sft) == own and trainer_state_path(own) == own


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "not found: give a trainer_state.json or the training output folder holding one"),
    (lambda p: p, "no trainer_state.json in the folder nor in a checkpoint-N/ under it"),
    (lambda p: (p / "trainer_state.json").write_text("{") and p / "trainer_state.json", "not valid JSON"),
    (lambda p: (p / "s.json").write_text('{"global_step": 3}') and p / "s.json", "no log_history list"),
    (lambda p: save_state(p / "s.json", [{"step": 1, "train_runtime": 1.0}]), "nothing to plot: no log entry has"),
])
def test_a_bad_trainer_state_is_one_sentence_naming_it(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as caught:
        read_curves({"run": path})
    assert str(caught.value).startswith(str(path))


def test_curve_specs_are_name_equals_path():
    assert parse_curve_specs(["sft=runs/a/sft", "distill=x=y"]) == {"sft": Path("runs/a/sft"), "distill": Path("x=y")}
    for bad in (["sft"], ["=p"], ["a b=p"], ["sft="]):
        with pytest.raises(ValueError, match="expected NAME=PATH"):
            parse_curve_specs(bad)
    with pytest.raises(ValueError, match="names 'a' twice"):
        parse_curve_specs(["a=1", "a=2"])
    assert set(KEYS) >= {"loss", "eval_loss", "kd_loss", "ce_loss", "diseases_weight_share"}


def test_gpu_recipes_track_to_tensorboard_and_the_cpu_overlays_track_nothing(tmp_path):
    """Composed as the commands compose them: GPU recipes log to TensorBoard (W&B only when a user names a
    project); the CPU overlay, used by the demo and the tests, turns tracking off."""
    from custom_losses.train.distill import parse_recipe
    from custom_losses.train.sft_config import compose

    assert SFT_RECIPES and DISTILL_RECIPES
    for recipe in SFT_RECIPES:
        gpu, cpu = compose(recipe), compose(recipe, [REPO_ROOT / "recipes/sft/overrides/cpu-tiny.yaml"])
        assert gpu.get("use_tensorboard") is True and not gpu.get("wandb_project"), recipe.name
        assert cpu.get("use_tensorboard") is False and not cpu.get("wandb_project"), recipe.name
    paths = [f"dataset_path={tmp_path}", f"output_dir={tmp_path / 'o'}"]
    for recipe in DISTILL_RECIPES:
        gpu = parse_recipe(recipe, [], [*paths, "bf16=false", "use_cpu=true"])[1]  # no GPU here: parse as on CPU
        cpu = parse_recipe(recipe, [REPO_ROOT / "recipes/distill/overrides/cpu-tiny.yaml"], paths)[1]
        assert gpu.report_to == ["tensorboard"] and cpu.report_to == [], recipe.name


def test_env_sh_leaves_a_users_tracking_settings_alone():
    env = {key: value for key, value in os.environ.items() if key != "WANDB_MODE"}
    show = "source launch/env.sh; echo ${WANDB_MODE-unset}"
    assert subprocess.run(["bash", "-c", show], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout == "unset\n"
    assert subprocess.run(["bash", "-c", show], cwd=REPO_ROOT, env={**env, "WANDB_MODE": "offline"},
                          capture_output=True, text=True, check=True).stdout == "offline\n"
