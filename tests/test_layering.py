"""The house's shape, checked statically: commands on top of a library whose imports flow one way.

Every import statement counts, including those inside functions (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from prep.paths import REPO_ROOT

PACKAGES = ("prep", "custom_losses", "launch", "tests")
# The lowest layer: the record schema, answers, prompts, tokenizer, I/O, paths, constants, recipe loading.
BASE = {"prep.paths", "prep.qwen", "prep.jsonio", "prep.records", "prep.answers", "prep.prompts", "prep.tokenizer",
        "prep.config"}
# What each room may import from medkd (itself included).
ALLOWED = {"prep": {"prep"}, "custom_losses": {"prep", "custom_losses"},
           "launch": {"prep", "custom_losses", "launch"}, "tests": set(PACKAGES)}
MAX_COMMAND_LINES = 200
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """medkd modules PATH imports anywhere in its body (`from prep import x` counts as prep.x when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in PACKAGES)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in source_files()}
    return {name: {m for m in imported_modules(path) if m in modules} for name, path in modules.items()}


def test_rooms_import_only_downwards(graph):
    wrong = [f"{module} imports {target}" for module, targets in graph.items() for target in targets
             if target.split(".")[0] not in ALLOWED[module.split(".")[0]]]
    assert wrong == []


def test_base_layer_imports_nothing_above_it(graph):
    wrong = [f"{module} imports {target}" for module in BASE for target in graph.get(module, ())
             if target not in BASE]
    assert wrong == []


def test_no_import_cycles(graph):
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_tiny_fixture_is_named_in_one_module():
    named = [str(p.relative_to(REPO_ROOT)) for p in source_files() if p.parts[-2] != "tests"
             and "medkd/tiny-qwen2.5" in p.read_text(encoding="utf-8")]
    assert named == ["prep/qwen.py"]


def test_no_path_hacks():
    patterns = ("sys.path.insert", "parents[1]")
    hacks = [str(p.relative_to(REPO_ROOT)) for p in source_files()
             if p.name != "test_layering.py" and any(hack in p.read_text(encoding="utf-8") for hack in patterns)]
    assert hacks == ["prep/paths.py"]


def test_commands_are_thin():
    long = {str(p.relative_to(REPO_ROOT)): n for p in sorted((REPO_ROOT / "launch").glob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_COMMAND_LINES}
    assert long == {}


def test_long_functions_say_why():
    """A function over 60 lines needs a docstring that gives the reason it is not split."""
    unexplained = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not ast.get_docstring(node):
                    unexplained.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert unexplained == []
