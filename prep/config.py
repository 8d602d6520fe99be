"""Recipes are the only configuration: YAML files validated into typed dataclasses.

Unknown keys, missing keys and wrong types stop the run with one sentence naming the file and the
key, before any GPU or API time is spent. Command-line overrides (`--set key=value`, dotted keys
for nested sections) change recipe keys; they never hold settings of their own.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


class RecipeError(ValueError):
    def __init__(self, path: str | Path, key: str | None, problem: str):
        self.path, self.key = str(path), key
        super().__init__(f"{path}: key '{key}': {problem}" if key else f"{path}: {problem}")


def resolve_path(path: str | Path) -> Path:
    """Recipe paths are relative to the working directory when they exist there, else to the repo root."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = resolve_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(path, None, "recipe file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(path, None, f"not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise RecipeError(path, None, "a recipe must be a YAML mapping of keys to values")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """`key=value` strings (values parsed as YAML; dotted keys reach into sections) applied to a copy."""
    data = dict(data)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        target = data
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            target[parent] = dict(target.get(parent) or {})
            target = target[parent]
        target[leaf] = value
    return data


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_type_ok(item, item_type) for item in value)
    if origin is dict:
        key_type, value_type = typing.get_args(annotation) or (Any, Any)
        return isinstance(value, dict) and all(_type_ok(k, key_type) and _type_ok(v, value_type) for k, v in value.items())
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return annotation.__name__ if isinstance(annotation, type) else text


def build(schema: type[T], data: dict[str, Any], path: str | Path, prefix: str = "") -> T:
    """Validate DATA against the dataclass SCHEMA (recursively for nested dataclasses)."""
    hints = typing.get_type_hints(schema)
    fields = {field.name: field for field in dataclasses.fields(schema) if field.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(fields)})"
            raise RecipeError(path, f"{prefix}{key}", f"unknown key{hint}")
    values = {}
    for name, field in fields.items():
        annotation = hints[name]
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise RecipeError(path, f"{prefix}{name}", "missing (required)")
            continue
        value = data[name]
        if not _type_ok(value, annotation):
            raise RecipeError(path, f"{prefix}{name}", f"expected {_describe(annotation)}, got {type(value).__name__} {value!r}")
        nested = annotation if dataclasses.is_dataclass(annotation) else None
        if nested is None and typing.get_origin(annotation) in (typing.Union, types.UnionType):
            nested = next((arg for arg in typing.get_args(annotation) if dataclasses.is_dataclass(arg)), None)
            nested = nested if isinstance(value, dict) else None
        values[name] = build(nested, value, path, f"{prefix}{name}.") if nested else value
    try:
        return schema(**values)
    except ValueError as err:  # __post_init__ range checks
        raise RecipeError(path, None, str(err)) from None


def load_recipe(schema: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read, override and validate a recipe; the result keeps `recipe_path` when the schema has it."""
    data = apply_overrides(read_yaml(path), overrides)
    recipe = build(schema, data, path)
    if hasattr(recipe, "recipe_path"):
        object.__setattr__(recipe, "recipe_path", str(path))
    return recipe
