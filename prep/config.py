"""Recipes are the only configuration: YAML files validated into typed dataclasses.

Unknown keys, missing keys and wrong types stop the run with one sentence naming the file and the
key, before any GPU or API time is spent. Command-line overrides (`--set key=value`, dotted keys
for nested sections) change recipe keys; they never hold settings of their own.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from prep.paths import resolve_path

T = TypeVar("T")


class RecipeError(ValueError):
    def __init__(self, path: str | Path, key: str | None, problem: str):
        self.path, self.key, self.problem = str(path), key, problem
        super().__init__(f"{path}: key '{key}': {problem}" if key else f"{path}: {problem}")


def _sets(data: Any, key: str) -> bool:
    """Whether the mapping DATA sets the dotted KEY (or a section above or below it)."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def key_source(key: str | None, recipe: str | Path, overlays: list[str | Path] = (),
               overrides: list[str] = ()) -> str:
    """Where KEY's value came from, as a user would look for it: `--set KEY` (the last override naming it or a
    section of it; its value is not repeated, it may be a secret), else the last overlay file that sets it, else
    the recipe file."""
    if key:
        for item in reversed(list(overrides)):
            name = item.split("=", 1)[0].strip()
            if name == key or key.startswith(name + ".") or name.startswith(key + "."):
                return f"--set {name}"
        for overlay in reversed(list(overlays)):
            try:
                if _sets(read_yaml(overlay), key):
                    return str(overlay)
            except RecipeError:
                continue
    return str(recipe)


def unknown_key(key: str, known: list[str], prefix: str = "") -> str:
    """The problem text for an unknown KEY: the closest KNOWN name, or the known names when none is close."""
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f"unknown key (did you mean '{prefix}{close[0]}'?)" if close else \
        f"unknown key (known keys: {', '.join(known)})"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe file as a mapping: YAML, or strict JSON for `.json` files (DeepSpeed configs)."""
    path = resolve_path(path)
    is_json = path.suffix == ".json"
    try:
        text = path.read_text(encoding="utf-8-sig")     # -sig: a leading byte-order mark is not JSON
        data = json.loads(text) if is_json else yaml.safe_load(text)
    except FileNotFoundError:
        raise RecipeError(path, None, "recipe file not found") from None
    except json.JSONDecodeError as err:
        raise RecipeError(path, None, f"not valid JSON at line {err.lineno}: {err.msg}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(path, None, f"not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        kind = "a JSON recipe must be a JSON object" if is_json else "a recipe must be a YAML mapping of keys to values"
        raise RecipeError(path, None, kind)
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` -> (key, value parsed as YAML; an empty value is null)."""
    if "=" not in item or item.startswith("-"):
        raise ValueError(f"override '{item}' must look like key=value")
    key, raw = item.split("=", 1)
    return key.strip(), (yaml.safe_load(raw) if raw.strip() else None)


def set_key(data: dict[str, Any], key: str, value: Any, item: str = "") -> None:
    """Set a dotted KEY in DATA in place: sections are created as needed, integers index lists."""
    parts = key.split(".")
    target: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(target, list):
            if not part.isdigit() or int(part) >= len(target):
                where = ".".join(parts[:depth + 1])
                raise ValueError(f"override '{item or key}': '{where}' is not an item of a {len(target)}-item list")
            if last:
                target[int(part)] = value
            else:
                target = target[int(part)]
        elif last:
            target[part] = value
        else:
            if not isinstance(target.get(part), (dict, list)):
                target[part] = {}
            target = target[part]


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """`key=value` strings (the one override syntax, from `--set`) applied to a deep copy of DATA."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        key, value = parse_override(item)
        set_key(data, key, value, item)
    return data


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """OVERLAY over BASE: mappings merge key by key, anything else (lists included) is replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def compose(recipe: str | Path, overlays: list[str | Path] = (), overrides: list[str] = ()) -> dict[str, Any]:
    """The one way a run's settings are put together: the recipe, each overlay file merged over it in
    order, then each `key=value` override. Errors name the recipe file."""
    data = read_yaml(recipe)
    for overlay in overlays:
        data = deep_merge(data, read_yaml(overlay))
    try:
        return apply_overrides(data, overrides)
    except ValueError as err:
        raise RecipeError(recipe, None, str(err)) from None


def add_recipe_arguments(parser: argparse.ArgumentParser, recipe_help: str, *, default: str | None = None,
                         overlays: bool = True) -> None:
    """The recipe flags every command shares: --config RECIPE, --overlay FILE (repeatable, merged in order)
    and --set KEY=VALUE (repeatable): `args.config`, `args.overlays`, `args.overrides`."""
    parser.add_argument("--config", required=default is None, default=default, metavar="RECIPE", help=recipe_help)
    if overlays:
        parser.add_argument("--overlay", dest="overlays", action="append", default=[], metavar="FILE",
                            help="a YAML file merged over the recipe (repeatable, in order)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key: dotted keys reach into sections, integers index lists, "
                             "values are YAML (repeatable)")


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
            raise RecipeError(path, f"{prefix}{key}", unknown_key(str(key), list(fields), prefix))
    values = {}
    for name, field in fields.items():
        annotation = hints[name]
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise RecipeError(path, f"{prefix}{name}", "missing (required)")
            continue
        value = data[name]
        if not _type_ok(value, annotation):
            # A value under a key's name may be the key itself (pasted where the variable's name goes): not echoed.
            shown = "" if any(word in name for word in ("api_key", "secret", "password")) else f" {value!r}"
            raise RecipeError(path, f"{prefix}{name}", f"expected {_describe(annotation)}, got {type(value).__name__}{shown}")
        nested = annotation if dataclasses.is_dataclass(annotation) else None
        if nested is None and typing.get_origin(annotation) in (typing.Union, types.UnionType):
            nested = next((arg for arg in typing.get_args(annotation) if dataclasses.is_dataclass(arg)), None)
            nested = nested if isinstance(value, dict) else None
        values[name] = build(nested, value, path, f"{prefix}{name}.") if nested else value
    try:
        return schema(**values)
    except ValueError as err:  # __post_init__ range checks
        raise RecipeError(path, None, str(err)) from None


def load_recipe(schema: type[T], path: str | Path, overrides: list[str] | None = None,
                overlays: list[str | Path] = ()) -> T:
    """Compose, then validate a recipe; the result keeps `recipe_path` when the schema has it."""
    data = compose(path, overlays, overrides or [])
    try:
        recipe = build(schema, data, path)
    except RecipeError as err:     # named where the user will look for it: a --set, an overlay or the file
        source = key_source(err.key, path, list(overlays), overrides or [])
        if source == str(path):
            raise
        raise RecipeError(source, err.key, err.problem) from None
    if hasattr(recipe, "recipe_path"):
        object.__setattr__(recipe, "recipe_path", str(path))
    return recipe


# The keys of the trainers' recipe dialects that name local files or folders, resolved like every recipe path
# (prep.paths.resolve_path) before a trainer sees them: Axolotl's (SFT, with its datasets' `path`s) and TRL's
# (distill). One table for both; prep.digests.recipe_inputs walks every string instead, since any key (a prompt
# file, a lexicon, a serve recipe) may name a file a step reads.
PATH_KEYS = {"sft": ("output_dir", "dataset_prepared_path", "deepspeed", "lora_model_dir"),
             "distill": ("dataset_path", "output_dir", "init_adapter_path", "tokenizer_path", "lexicon_path",
                         "deepspeed")}


def resolve_path_keys(data: dict[str, Any], dialect: str) -> dict[str, Any]:
    """DATA with the DIALECT's path keys (PATH_KEYS) made absolute, in place; DATA."""
    for key in PATH_KEYS[dialect]:
        if isinstance(data.get(key), str) and data[key]:
            data[key] = str(resolve_path(data[key]).absolute())
    return data
