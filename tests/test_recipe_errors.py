"""One validation standard for every recipe dialect: a typo or a bad value, given in the recipe file, in an overlay
or with --set, stops validation in one sentence that names where it came from and the key (with the closest known
key for a typo), before anything loads. Checked through the catalogue, the path the pipeline's preflight and the
doctor take, so a typo in any stage recipe of a pipeline stops the pipeline the same way."""
from __future__ import annotations

import pytest
import yaml

from custom_losses.pipeline import catalogue
from prep.config import RecipeError
from tests.conftest import REPO_ROOT

RECIPES = REPO_ROOT / "recipes"
# dialect: (recipe, overlays it runs with here, typo key, the key it means, a key, a value of the wrong type)
CASES = {
    "teacher": ("teacher/local-tiny-vllm.yaml", (), "sampling.temprature", "sampling.temperature",
                "sampling.temperature", "hot"),
    "softlabels": ("softlabels/local-tiny-vllm.yaml", (), "sampling.temprature", "sampling.temperature",
                   "sampling.temperature", "hot"),
    "serve": ("serve/tiny-cpu.yaml", (), "startup_timout_s", "startup_timeout_s", "startup_timeout_s", "never"),
    "predict": ("predict/tiny-cpu.yaml", (), "sampling.max_token", "sampling.max_tokens", "sampling.max_tokens",
                "lots"),
    "score": ("score/default.yaml", (), "fuzzy_treshold", "fuzzy_threshold", "fuzzy_threshold", "close"),
    "pipeline": ("pipeline/tiny-cpu.yaml", (), "step_timout_s", "step_timeout_s", "step_timeout_s", "never"),
    "sft": ("sft/qwen2.5-7b-instruct-qlora-1gpu.yaml", ("sft/overrides/cpu-tiny.yaml",), "learnig_rate",
            "learning_rate", "learning_rate", "fast"),
    "distill": ("distill/qwen2.5-7b-instruct-qlora-1gpu.yaml", ("distill/overrides/cpu-tiny.yaml",),
                "learnig_rate", "learning_rate", "lora_r", "abc"),
}


def nested(key: str, value: object) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def refusal(folder: str, recipe, overlays=(), overrides=()) -> str:
    with pytest.raises((RecipeError, ValueError)) as caught:
        catalogue.validate(folder, recipe, overlays, overrides)
    message = str(caught.value)
    assert "\n" not in message.strip(), message
    return message


def merged_into(recipe, key: str, value: object, out):
    """A copy of RECIPE (in the recipes folder, so its own relative names resolve as before) with KEY set."""
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    section, *rest = key.split(".")
    if rest:
        data.setdefault(section, {})[rest[0]] = value
    else:
        data[section] = value
    out.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return out


@pytest.mark.parametrize("where", ["--set", "overlay", "file"])
@pytest.mark.parametrize("dialect", sorted(CASES))
def test_a_typo_and_a_bad_value_name_the_key_and_where_they_came_from(dialect, where, tmp_path):
    recipe_name, overlays, typo, meant, key, bad = CASES[dialect]
    recipe, overlays = RECIPES / recipe_name, [RECIPES / name for name in overlays]
    for wrong_key, value, expected in ((typo, 1, f"unknown key (did you mean '{meant}'?)"), (key, bad, None)):
        if where == "--set":
            message = refusal(dialect, recipe, overlays, [f"{wrong_key}={value}"])
            source = f"--set {wrong_key}"
        elif where == "overlay":
            overlay = tmp_path / f"overlay-{wrong_key}.yaml"
            overlay.write_text(yaml.safe_dump(nested(wrong_key, value)), encoding="utf-8")
            message = refusal(dialect, recipe, [*overlays, overlay])
            source = str(overlay)
        else:
            copy = merged_into(recipe, wrong_key, value, recipe.parent / f".test-{dialect}-{tmp_path.name}.yaml")
            try:   # alone: an overlay that sets the same key (the CPU overlays set learning_rate) would win
                message = refusal(dialect, copy)
            finally:
                copy.unlink()
            source = str(copy)
        assert message.startswith(f"{source}: key '{wrong_key}"), message
        if expected:
            assert expected in message, message
        else:
            assert repr(bad) in message or bad in message, message
