"""The house's shape, checked statically: commands on top of a library whose sub-packages depend one way.

A module depends on another when it imports it (anywhere in its body: a lazy import is still a dependency),
names it in an importlib string (`import_module("x")`, or a string that is a module path), or builds a command
line that runs it (`[..., "-m", "launch.x", ...]`, or an f-string `f"launch.{name}"` after "-m"). Text that
tells a user which command to run (docstrings, messages) is not a dependency and is not read.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from prep.paths import REPO_ROOT

PACKAGES = ("prep", "custom_losses", "launch", "tests")
# The lowest layer: the record schema, answers, prompts, tokenizer, I/O, paths, constants, recipe loading, digests.
BASE = ("prep.paths", "prep.qwen", "prep.jsonio", "prep.locks", "prep.records", "prep.answers", "prep.prompts",
        "prep.tokenizer", "prep.config", "prep.digests", "prep.cli", "prep.near_duplicates", "prep")
# What each room may depend on (its own room is always allowed). A room is a sub-package, "base", or a top package.
ALLOWED = {
    "base": set(),
    "prep.testing": {"base"},
    "prep.api": {"base", "prep.testing"},
    "prep.eval": {"base"},
    "prep.stages": {"base", "prep.testing", "prep.api", "prep.eval"},
    "custom_losses.kd": {"base"},
    "custom_losses.train": {"base", "prep.testing", "prep.api", "custom_losses.kd"},
    # The pipeline's plan (its recipe, steps and catalogue) validates every stage recipe, so it imports every stage;
    # its steps are processes of the commands, named in one table (COMMAND_TABLE).
    "custom_losses.pipeline": {"base", "prep.testing", "prep.api", "prep.stages", "prep.eval", "custom_losses.kd",
                               "custom_losses.train", "launch"},
    # The doctor, smoke steps and benchmarks check a pipeline recipe on this machine.
    "custom_losses.checks": {"base", "prep.testing", "prep.api", "prep.stages", "prep.eval", "custom_losses.kd",
                             "custom_losses.train", "custom_losses.pipeline"},
    # Running a pipeline: the doctor first, in process, then the plan's steps.
    "custom_losses.pipeline.run": {"base", "prep.testing", "prep.api", "prep.stages", "prep.eval", "custom_losses.kd",
                                   "custom_losses.train", "custom_losses.pipeline", "custom_losses.checks", "launch"},
    "launch": {"base", "prep.testing", "prep.api", "prep.stages", "prep.eval", "custom_losses.kd",
               "custom_losses.train", "custom_losses.pipeline", "custom_losses.checks", "custom_losses.pipeline.run"},
    "tests": {"base", "prep.testing", "prep.api", "prep.stages", "prep.eval", "custom_losses.kd",
              "custom_losses.train", "custom_losses.pipeline", "custom_losses.checks", "custom_losses.pipeline.run",
              "launch"},
}
# The one module of the libraries that names the commands a pipeline step runs.
COMMAND_TABLE = "custom_losses.pipeline.steps"
# custom_losses.pipeline.run is a room of its own: it stands above the checks (it runs the doctor first), which stand
# above the rest of the pipeline package (the recipe and plan they check).
MAX_COMMAND_LINES = 200
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 600
MODULE_STRING = re.compile(r"^(prep|custom_losses|launch|tests)(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?$")


def room(module: str) -> str:
    """The room of a dotted module name: base, a sub-package (prep.api), or a top package (launch, tests)."""
    if any(module == base or (base != "prep" and module.startswith(base + ".")) for base in BASE):
        return "base"                         # a base module, or a name in one (prep.answers.answer_json)
    parts = module.split(".")
    if parts[0] in ("launch", "tests"):
        return parts[0]
    if module == "custom_losses":
        return "custom_losses.kd"            # the package re-exports the loss's names
    if module == "custom_losses.pipeline.run" or module.startswith("custom_losses.pipeline.run."):
        return "custom_losses.pipeline.run"  # above the doctor it runs first
    return ".".join(parts[:2])


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(root: Path = REPO_ROOT) -> list[Path]:
    return sorted(p for package in PACKAGES if (root / package).is_dir() for p in (root / package).rglob("*.py"))


def _text(node: ast.AST) -> str | None:
    """A string constant's value, or an f-string's leading literal part (`f"launch.{x}"` -> "launch.")."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def _docstring_nodes(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def references(source: str) -> dict[str, str]:
    """medkd modules SOURCE depends on -> how (import, importlib string, module string, `-m` command line)."""
    tree = ast.parse(source)
    docstrings = _docstring_nodes(tree)
    found: dict[str, str] = {}

    def add(name: str, how: str) -> None:
        name = name.split(":")[0].rstrip(".")
        if name.split(".")[0] in PACKAGES:
            found.setdefault(name, how)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, "import")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            add(node.module, "import")
            for alias in node.names:
                add(f"{node.module}.{alias.name}", "import")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "find_spec", "__import__") and node.args and (text := _text(node.args[0])):
            add(text, "importlib string")
        elif isinstance(node, (ast.List, ast.Tuple)):
            items = [_text(item) for item in node.elts]
            for flag, target in zip(items, items[1:]):
                if flag == "-m" and target:
                    add(target, "-m command line")
        elif isinstance(node, ast.Constant) and id(node) not in docstrings and isinstance(node.value, str) \
                and MODULE_STRING.match(node.value):
            add(node.value, "module string")
    return found


def violations(root: Path = REPO_ROOT) -> list[str]:
    """Every dependency under ROOT that its room may not have, as `module -> target (how)`."""
    files = {module_name(p, root): p for p in source_files(root)}
    wrong = []
    for module, path in files.items():
        own, seen = room(module), set()
        for target, how in references(path.read_text(encoding="utf-8")).items():
            if target.split(".")[0] == "launch" and target != "launch" and how != "import" \
                    and module.split(".")[0] not in ("launch", "tests") and module != COMMAND_TABLE:
                wrong.append(f"{module} -> {target} ({how}; commands are named in {COMMAND_TABLE} only)")
                continue
            other = room(target)
            if other != own and other not in ALLOWED[own] and other not in seen:
                seen.add(other)
                wrong.append(f"{module} -> {target} ({how})")
    return wrong


def medkd_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in source_files(root)}
    return {name: {m for m in references(path.read_text(encoding="utf-8")) if m in files and m != name}
            for name, path in files.items()}


def test_rooms_depend_only_downwards():
    assert violations() == []


@pytest.mark.parametrize("planted, where", [
    ('argv = [sys.executable, "-m", "launch.teacher", "--config", "x.yaml"]\n', "prep/stages/planted.py"),
    ('argv = [PYTHON, "-m", f"launch.{folder}"]\n', "custom_losses/train/planted.py"),
    ('trainer = importlib.import_module("custom_losses.kd.trainer")\n', "prep/stages/planted.py"),
    ('VALIDATORS = {"sft": "custom_losses.train.sft_config:validate_recipe"}\n', "prep/api/planted.py"),
    ("from custom_losses.pipeline import plan\n", "custom_losses/train/planted.py"),
    ("from prep.stages import teacher\n", "prep/api/planted.py"),
    ("from custom_losses.pipeline.run import run_pipeline\n", "custom_losses/checks/planted.py"),
    ("from custom_losses.checks.doctor import run_doctor\n", "custom_losses/pipeline/planted.py"),
    ("import tests.conftest\n", "launch/planted.py"),
])
def test_a_planted_back_reference_fails_the_check(tmp_path, planted, where):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    target = tmp_path / where
    target.parent.mkdir(parents=True, exist_ok=True)
    assert violations(tmp_path) == []
    target.write_text(f'"""A module that tells users: run `python -m launch.teacher` (text, not a dependency)."""\n'
                      f"{planted}", encoding="utf-8")
    wrong = violations(tmp_path)
    assert len(wrong) == 1 and wrong[0].startswith(module_name(target, tmp_path) + " -> ")


def test_text_that_names_a_command_is_not_a_dependency(tmp_path):
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "told.py").write_text(
        '"""Run `python -m launch.teacher`."""\n'
        'def f():\n    raise ValueError("run python -m launch.doctor --config recipes/pipeline/x.yaml first")\n',
        encoding="utf-8")
    assert violations(tmp_path) == []


def test_the_command_table_names_real_commands():
    from custom_losses.pipeline.steps import COMMANDS

    missing = [module for module in COMMANDS.values() if not (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file()]
    assert missing == []


def test_no_import_cycles():
    graph = medkd_graph()
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


def test_every_sub_package_says_what_it_holds():
    unsaid = [str(init.relative_to(REPO_ROOT)) for package in ("prep", "custom_losses", "launch")
              for init in sorted((REPO_ROOT / package).rglob("__init__.py"))
              if not ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))]
    assert unsaid == []


def test_no_library_module_is_over_600_lines():
    long = {str(p.relative_to(REPO_ROOT)): n for package in ("prep", "custom_losses")
            for p in sorted((REPO_ROOT / package).rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_the_tiny_fixture_is_named_in_one_module():
    named = [str(p.relative_to(REPO_ROOT)) for p in source_files() if p.parts[-2] != "tests"
             and "medkd/tiny-qwen2.5" in p.read_text(encoding="utf-8")]
    assert named == ["prep/qwen.py"]


def test_no_path_hacks():
    patterns = ("sys.path.insert", "parents[1]")
    hacks = [str(p.relative_to(REPO_ROOT)) for p in source_files()
             if p.name != "test_layering.py" and any(hack in p.read_text(encoding="utf-8") for hack in patterns)]
    assert hacks == ["prep/paths.py"]


def test_yaml_is_read_in_one_place():
    """Recipes and YAML files are read through prep.config (one loader, one error message for a bad file)."""
    readers = [str(p.relative_to(REPO_ROOT)) for package in ("prep", "custom_losses", "launch")
               for p in sorted((REPO_ROOT / package).rglob("*.py")) if "yaml.safe_load" in p.read_text(encoding="utf-8")]
    assert readers == ["prep/config.py"]


def test_commands_are_thin():
    long = {str(p.relative_to(REPO_ROOT)): n for p in sorted((REPO_ROOT / "launch").glob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_COMMAND_LINES}
    assert long == {}


LONG_REASON = re.compile(r"\blong because\b", re.IGNORECASE)


def test_long_functions_say_why():
    """A function over 60 lines needs a docstring sentence `Long because ...` giving the reason it is not split."""
    unexplained = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not LONG_REASON.search(ast.get_docstring(node) or ""):
                    unexplained.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert unexplained == []
