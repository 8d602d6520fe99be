"""Recipe validation: unknown, missing and mistyped keys are named with their file."""
from dataclasses import dataclass, field

import pytest

from prep.config import RecipeError, load_recipe


@dataclass
class Inner:
    size: int = 1


@dataclass
class Schema:
    name: str
    rate: float = 1.0
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    mode: str | None = None


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_recipe_with_overrides(tmp_path):
    path = write(tmp_path, "name: a\nrate: 2\ninner:\n  size: 3\n")
    recipe = load_recipe(Schema, path, ["rate=0.5", "inner.size=9", "tags=[x, y]"])
    assert recipe == Schema(name="a", rate=0.5, tags=["x", "y"], inner=Inner(9))


@pytest.mark.parametrize("text,message", [
    ("name: a\nrat: 2\n", "key 'rat': unknown key (did you mean 'rate'?)"),
    ("rate: 2\n", "key 'name': missing (required)"),
    ("name: a\nrate: fast\n", "key 'rate': expected float, got str 'fast'"),
    ("name: a\ninner:\n  size: 1.5\n", "key 'inner.size': expected int"),
    ("name: a\ninner:\n  sise: 1\n", "key 'inner.sise': unknown key (did you mean 'inner.size'?)"),
    ("name: [unclosed\n", "not valid YAML at line"),
    ("- a\n- b\n", "must be a YAML mapping"),
])
def test_bad_recipes_are_named(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(Schema, path)
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)
